package handlers

import (
	"context"

	"github.com/loomctl/loom/events"
)

// The event index of a command of one step.
const stepOnly = 0

// single runs a command of one step: its original result if it already
// took effect, else the step.
func (s *Service) single(ctx context.Context, c *command, step func(ctx context.Context) (stepResult, *events.Fault)) *events.Reply {
	result, found, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return failed(unavailable("read command result", err), nil)
	}
	if found {
		return &events.Reply{Events: result, Replayed: true}
	}
	res, fault := step(ctx)
	if res.appended == nil && fault == nil {
		// Nothing to append may mean the command took effect between the
		// first look and the decision (a retry racing its original): the
		// state that said so came from the Reader, so the result is there.
		if result, found, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id); err == nil && found {
			return &events.Reply{Events: result, Replayed: true}
		}
	}
	reply := &events.Reply{Error: fault, Replayed: res.replayed}
	if res.appended != nil {
		reply.Events = []events.Appended{*res.appended}
	}
	return reply
}

func (s *Service) serveRegisterHost(ctx context.Context, req *request) *events.Reply {
	var cmd events.RegisterHost
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		return appendStep(ctx, s, s.hosts, c, cmd.Name, stepOnly, events.TypeHostRegistered, func(h *hostView) (events.Event, *events.Fault) {
			return decideRegisterHost(h.state, &cmd)
		})
	})
}

// serveCordon serves cordon, or uncordon (also asked for by a cordon with
// uncordon set).
func (s *Service) serveCordon(uncordon bool) serveFunc {
	return func(ctx context.Context, req *request) *events.Reply {
		var cmd events.CordonHost
		c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
		if fault != nil {
			return failed(fault, nil)
		}
		undo := uncordon || cmd.Uncordon
		typ := events.TypeHostCordoned
		if undo {
			typ = events.TypeHostUncordoned
		}
		return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
			return appendStep(ctx, s, s.hosts, c, cmd.Name, stepOnly, typ, func(h *hostView) (events.Event, *events.Fault) {
				return decideCordon(h.state, cmd.Name, undo, cmd.Reason)
			})
		})
	}
}

func (s *Service) serveRegisterImage(ctx context.Context, req *request) *events.Reply {
	var cmd events.RegisterImage
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		return appendStep(ctx, s, s.images, c, cmd.Name, stepOnly, events.TypeImageRegistered, func(img *events.ImageState) (events.Event, *events.Fault) {
			return decideRegisterImage(*img, &cmd)
		})
	})
}

// serveGoal serves start, stop, pause or resume.
func (s *Service) serveGoal(verb string) serveFunc {
	return func(ctx context.Context, req *request) *events.Reply {
		var cmd events.VMCommand
		c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
		if fault != nil {
			return failed(fault, nil)
		}
		return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
			return appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMGoalChanged, func(vm *events.VMState) (events.Event, *events.Fault) {
				return decideGoal(*vm, cmd.Name, verb)
			})
		})
	}
}

func (s *Service) serveCheckpoint(ctx context.Context, req *request) *events.Reply {
	var cmd events.CheckpointVM
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	id := events.DeriveStepID(prefixCheckpoint, c.actor, c.id)
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		if fault := s.reportsSeen(ctx, cmd.Name); fault != nil {
			return stepResult{}, fault
		}
		return appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMCheckpointRequested, func(vm *events.VMState) (events.Event, *events.Fault) {
			return decideCheckpoint(*vm, &cmd, id, false)
		})
	})
}

func (s *Service) serveRestore(ctx context.Context, req *request) *events.Reply {
	var cmd events.RestoreVM
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	restore := events.DeriveStepID(prefixRestore, c.actor, c.id)
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		if fault := s.reportsSeen(ctx, cmd.Name); fault != nil {
			return stepResult{}, fault
		}
		return appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMRestoreRequested, func(vm *events.VMState) (events.Event, *events.Fault) {
			return decideRestore(*vm, &cmd, restore)
		})
	})
}

func (s *Service) serveDeleteCheckpoint(ctx context.Context, req *request) *events.Reply {
	var cmd events.DeleteCheckpoint
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		if fault := s.reportsSeen(ctx, cmd.Name); fault != nil {
			return stepResult{}, fault
		}
		return appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMCheckpointDeleted, func(vm *events.VMState) (events.Event, *events.Fault) {
			return decideDeleteCheckpoint(*vm, cmd.Name, cmd.Checkpoint, events.DeletedByCommand)
		})
	})
}

func (s *Service) serveSchedule(ctx context.Context, req *request) *events.Reply {
	var cmd events.ScheduleCheckpoints
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		return appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMCheckpointScheduled, func(vm *events.VMState) (events.Event, *events.Fault) {
			return decideSchedule(*vm, &cmd)
		})
	})
}

// reportsSeen makes the next decision on vm see every report its hosts
// made so far. Checkpoint decisions depend on them (a step is done once
// its host says so), and the VM cache follows decisions only: it catches
// the Reader up with the VM's observation subjects and drops the cached
// entry.
func (s *Service) reportsSeen(ctx context.Context, vm string) *events.Fault {
	if _, fault := s.catchUp(ctx, events.ObservationSubject("*", events.KindVM, vm)); fault != nil {
		return fault
	}
	s.vms.drop(vm)
	return nil
}
