package handlers

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/loomctl/loom/events"
)

// scheduleCheckpoints is the process manager of checkpoint schedules: for
// each VM with one, it asks for a checkpoint once Every has passed since
// the last scheduled one was requested (on this replica's clock against
// the request's stamped time: a skewed clock moves a checkpoint, it never
// doubles one), and deletes the scheduled checkpoints beyond Keep, oldest
// first. A checkpoint asked for by a person is never deleted by it.
//
// Each step's command id derives from the VM's incarnation and the
// sequence of the last scheduled request, so replicas racing on one VM
// derive one checkpoint id and one Nats-Msg-Id, and the subject check
// lets one of them through.
func (s *Service) scheduleCheckpoints(ctx context.Context, vms []events.VMState) error {
	now := s.cfg.Now()
	var errs []error
	for _, vm := range vms {
		if vm.Schedule == nil || vm.Phase != events.PhasePlaced {
			continue
		}
		if fault := s.reportsSeen(ctx, vm.Name); fault != nil {
			errs = append(errs, fault)
			continue
		}
		errs = append(errs, s.pruneScheduled(ctx, vm))
		if due, after := checkpointDue(vm, now); due {
			errs = append(errs, s.requestScheduled(ctx, vm, after))
		}
	}
	return errors.Join(errs...)
}

// checkpointDue tells whether vm's schedule wants a checkpoint at now, and
// the sequence of the scheduled request it follows (0 for the first). A
// VM that is stopped, or busy with a step, waits.
func checkpointDue(vm events.VMState, now time.Time) (due bool, after uint64) {
	if vm.Step != nil || (vm.Desired != events.DesiredRunning && vm.Desired != events.DesiredPaused) {
		return false, 0
	}
	var last *events.Checkpoint
	for i := range vm.Checkpoints {
		if c := &vm.Checkpoints[i]; c.Scheduled && (last == nil || c.RequestedSeq > last.RequestedSeq) {
			last = c
		}
	}
	if last == nil {
		return true, 0
	}
	return now.Sub(last.RequestedAt.Time()) >= vm.Schedule.Every(), last.RequestedSeq
}

// requestScheduled asks for vm's next scheduled checkpoint.
func (s *Service) requestScheduled(ctx context.Context, vm events.VMState, after uint64) error {
	c := newCommand(schedulerActor, "checkpoint-"+vm.UID+"-"+strconv.FormatUint(after, 10), "", events.Origin{Time: s.cfg.Now()})
	cmd := events.CheckpointVM{Name: vm.Name, Kind: vm.Schedule.Kind}
	id := events.DeriveStepID(prefixCheckpoint, c.actor, c.id)
	res, fault := appendStep(ctx, s, s.vms, c, vm.Name, stepOnly, events.TypeVMCheckpointRequested, func(state *events.VMState) (events.Event, *events.Fault) {
		if state.UID != vm.UID || state.Schedule == nil {
			return nil, nil // another incarnation, or the schedule was cleared meanwhile
		}
		if due, last := checkpointDue(*state, s.cfg.Now()); !due || last != after {
			return nil, nil // another replica went first
		}
		return decideCheckpoint(*state, &cmd, id, true)
	})
	if fault != nil {
		return fault
	}
	if res.appended != nil && !res.replayed {
		s.log.Info("scheduled checkpoint requested", keyVM, vm.Name, "checkpoint", id)
	}
	return nil
}

// pruneScheduled deletes vm's scheduled checkpoints beyond its schedule's
// Keep, oldest first. Ones not taken (failed, or still requested) count.
func (s *Service) pruneScheduled(ctx context.Context, vm events.VMState) error {
	var scheduled []events.Checkpoint
	for _, c := range vm.Checkpoints {
		if c.Scheduled && c.State != events.CheckpointDeleting && (vm.Step == nil || vm.Step.Checkpoint != c.ID) {
			scheduled = append(scheduled, c)
		}
	}
	var errs []error
	for i := 0; i < len(scheduled)-vm.Schedule.Keep; i++ {
		ck := scheduled[i]
		c := newCommand(schedulerActor, "prune-"+vm.UID+"-"+ck.ID, "", events.Origin{Time: s.cfg.Now()})
		_, fault := appendStep(ctx, s, s.vms, c, vm.Name, stepOnly, events.TypeVMCheckpointDeleted, func(state *events.VMState) (events.Event, *events.Fault) {
			if state.UID != vm.UID {
				return nil, nil
			}
			return decideDeleteCheckpoint(*state, vm.Name, ck.ID, events.DeletedBySchedule)
		})
		if fault != nil && fault.Code != events.CodeCheckpointNotFound {
			errs = append(errs, fault)
		}
	}
	return errors.Join(errs...)
}
