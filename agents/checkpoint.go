package agents

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// Checkpointer is what checkpoints need of libvirt on a host with disks.
// *libvirt.Client has it; a host without it reports every checkpoint step
// unsupported.
type Checkpointer interface {
	// TakeSnapshot takes an external checkpoint of a live domain: a new
	// top overlay, and with Memory set its memory and device state,
	// keeping no snapshot metadata in libvirt.
	TakeSnapshot(ctx context.Context, domain string, s libvirt.Snapshot) error
	// DiskSource is the file the domain's disk writes to now.
	DiskSource(ctx context.Context, domain string) (string, error)
	// RestoreMemory starts the defined domain from a memory file, its disk
	// pointed at disk.
	RestoreMemory(ctx context.Context, memory, disk string, paused bool) error
}

// checkpointer is hv's Checkpointer, or the fault that says why there is
// none for goal's VM.
func (a *Agent) checkpointer(hv Hypervisor, goal events.Goal) (Checkpointer, *events.Fault) {
	if disk, _ := a.vmFiles(goal); disk == "" {
		return nil, events.Errorf(events.CodeCheckpointUnsupported, "host %s keeps no disks for its VMs (or %s has no disk from an image): nothing to checkpoint", a.cfg.Host, goal.VM)
	}
	cp, ok := hv.(Checkpointer)
	if !ok {
		return nil, events.Errorf(events.CodeCheckpointUnsupported, "this host's hypervisor connection cannot take checkpoints")
	}
	return cp, nil
}

// takeCheckpoint carries out a goal's take step on its live domain. The
// new top is recorded before libvirt makes it, so a crash in between
// leaves the VM writing where it did; a take found done (its layer is the
// domain's disk) is reported, not taken again.
func (a *Agent) takeCheckpoint(ctx context.Context, hv Hypervisor, goal events.Goal) error {
	step := goal.Step
	cp, fault := a.checkpointer(hv, goal)
	if fault != nil {
		return a.stepFailed(ctx, goal, fault)
	}
	layer := a.layerPath(goal, step.Checkpoint)
	memory := ""
	if step.Kind == events.CheckpointFull {
		memory = a.memoryPath(goal, step.Checkpoint)
	}
	current, err := cp.DiskSource(ctx, goal.VM)
	if err != nil {
		return err
	}
	if current == layer { // taken before a restart, or before a report was lost
		prev, err := backingOf(layer)
		if err != nil {
			return err
		}
		return a.reportTaken(ctx, goal, prev, layer, memory, 0)
	}
	next, prev, err := a.topRecord(goal)
	if err != nil {
		return err
	}
	if next != layer { // no earlier attempt of this step: the top is what the VM writes to
		if prev, err = a.top(goal); err != nil {
			return err
		}
	}
	if prev != current {
		return a.stepFailed(ctx, goal, events.Errorf(events.CodeLibvirtError,
			"domain %s writes to %s, its top layer is %s: refusing to checkpoint a disk Loom does not know", goal.VM, current, prev))
	}
	// Files of an earlier attempt that did not complete go first: the
	// domain does not write to them (it writes to prev).
	if err := removeFiles(layer, memory); err != nil {
		return err
	}
	if err := a.setTop(goal, layer, prev); err != nil {
		return err
	}
	started := time.Now()
	err = cp.TakeSnapshot(ctx, goal.VM, libvirt.Snapshot{Name: step.Checkpoint, Overlay: layer, Memory: memory})
	took := time.Since(started)
	if err != nil {
		if unavailable(err) || ctx.Err() != nil {
			// Whether it happened is unknown: leave the files and the
			// top (both right either way) for the retry to look at.
			return err
		}
		now, derr := cp.DiskSource(ctx, goal.VM)
		switch {
		case derr != nil:
			return errors.Join(err, derr)
		case now == layer: // it happened after all
			return a.reportTaken(ctx, goal, prev, layer, memory, took)
		}
		// libvirt's atomic snapshot left the domain writing to prev.
		if rerr := errors.Join(removeFiles(layer, memory), a.setTop(goal, prev, prev)); rerr != nil {
			return errors.Join(err, rerr)
		}
		return a.stepFailed(ctx, goal, faultOf(err))
	}
	a.metrics.action("checkpoint", nil)
	a.log.Info("checkpoint taken", logVM, goal.VM, "checkpoint", step.Checkpoint, "kind", step.Kind, "took", took.Round(time.Millisecond))
	return a.reportTaken(ctx, goal, prev, layer, memory, took)
}

// reportTaken reports goal's take step done: frozen is the checkpoint's
// disk, top the layer the VM writes to now.
func (a *Agent) reportTaken(ctx context.Context, goal events.Goal, frozen, top, memory string, took time.Duration) error {
	step := goal.Step
	return a.reportStep(ctx, goal, events.VMCheckpointTaken{UID: goal.UID, Incarnation: goal.Incarnation,
		Checkpoint: step.Checkpoint, Kind: step.Kind, Disk: frozen, Memory: memory, Top: top,
		DiskBytes: allocated(frozen), MemoryBytes: allocated(memory), Millis: took.Milliseconds(), Leases: goal.Leases})
}

// restoreCheckpoint carries out a goal's restore step: the domain goes
// down, a fresh top is made on the checkpoint's frozen layer, and a full
// checkpoint's guest is started from its saved memory; a disk checkpoint's
// guest is left to the plan, which boots it if the goal says running.
// found and active say where the domain is now. A restore found done (its
// layer is the top) is reported, not done again.
func (a *Agent) restoreCheckpoint(ctx context.Context, hv Hypervisor, goal events.Goal, uuid [16]byte, found, active bool) error {
	step := goal.Step
	cp, fault := a.checkpointer(hv, goal)
	if fault != nil {
		return a.stepFailed(ctx, goal, fault)
	}
	layer := a.layerPath(goal, step.Restore)
	prev, err := a.top(goal)
	if err != nil {
		return err
	}
	if prev == layer {
		return a.reportStep(ctx, goal, events.VMRestored{UID: goal.UID, Incarnation: goal.Incarnation,
			Checkpoint: step.Checkpoint, Restore: step.Restore, Top: layer, Leases: goal.Leases})
	}
	if fault := a.checkRestore(goal); fault != nil {
		return a.stepFailed(ctx, goal, fault)
	}
	if step.Kind == events.CheckpointFull {
		// It starts the domain: what starting needs, it needs.
		if fault := a.fence.check(BootNanos()); fault != nil {
			a.metrics.fenced.Inc()
			return fault
		}
		if fault := a.checkLeases(ctx, goal); fault != nil {
			return fault
		}
	}
	started := time.Now()
	if found && active {
		if err := hv.Destroy(ctx, goal.VM); err != nil {
			return err
		}
	}
	// The top file names the new layer only once the restore is done: a
	// crash before that finds the step not done, and does it all again
	// (the domain is destroyed first, and the layer made anew).
	if err := makeLayer(ctx, layer, step.Disk, "qcow2"); err != nil {
		return a.stepFailed(ctx, goal, faultOf(err))
	}
	if err := hv.Define(ctx, a.domainSpecOn(goal, uuid, layer)); err != nil {
		return err
	}
	if step.Kind == events.CheckpointFull {
		err := cp.RestoreMemory(ctx, step.Memory, layer, goal.Desired == events.DesiredPaused)
		if err != nil && (unavailable(err) || ctx.Err() != nil) {
			return err // the retry does it again
		}
		if err != nil {
			// The VM stays on the disk it had; the plan starts it there.
			if derr := hv.Define(ctx, a.domainSpecOn(goal, uuid, prev)); derr != nil {
				return errors.Join(err, derr)
			}
			_ = os.Remove(layer)
			return a.stepFailed(ctx, goal, faultOf(fmt.Errorf("restore the memory of checkpoint %s (the VM goes on from its own disk, booted again): %w", step.Checkpoint, err)))
		}
	}
	if err := a.setTop(goal, layer, prev); err != nil {
		return err
	}
	took := time.Since(started)
	a.dropAbandoned(goal, prev, step.Disk)
	a.metrics.action("restore", nil)
	a.log.Info("checkpoint restored", logVM, goal.VM, "checkpoint", step.Checkpoint, "kind", step.Kind, "took", took.Round(time.Millisecond))
	return a.reportStep(ctx, goal, events.VMRestored{UID: goal.UID, Incarnation: goal.Incarnation,
		Checkpoint: step.Checkpoint, Restore: step.Restore, Top: layer, Millis: took.Milliseconds(), Leases: goal.Leases})
}

// checkRestore checks a restore step's files before anything is touched:
// they must be this VM's, and there.
func (a *Agent) checkRestore(goal events.Goal) *events.Fault {
	step := goal.Step
	files := []string{step.Disk}
	if step.Kind == events.CheckpointFull {
		files = append(files, step.Memory)
	}
	for _, f := range files {
		if !a.ownFile(goal, f) {
			return events.Errorf(events.CodeInvalidArgument, "restore of %s names %q, which is not one of its files on host %s", goal.VM, f, a.cfg.Host)
		}
		if _, err := os.Stat(f); err != nil {
			return events.Errorf(events.CodeCheckpointFilesMissing, "checkpoint %s of %s: %v; the VM was left as it was", step.Checkpoint, goal.VM, err)
		}
	}
	return nil
}

// dropAbandoned removes the top a restore left, the branch the VM wrote
// since its last checkpoint: no checkpoint's disk is a top, so nothing
// needs it. It keeps the file if anything builds on it.
func (a *Agent) dropAbandoned(goal events.Goal, old, frozen string) {
	if old == frozen || !a.ownFile(goal, old) {
		return
	}
	if on, err := a.layersOn(goal, old); err != nil || len(on) > 0 {
		return
	}
	if err := os.Remove(old); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("remove the layer a restore left", logVM, goal.VM, "layer", old, logErr, err)
	}
}

// dropCheckpoints removes the files of the deleted checkpoints goal
// names: the memory always, the disk layer unless a later layer builds on
// it or the VM writes to it. Paths that are not the VM's are refused.
func (a *Agent) dropCheckpoints(ctx context.Context, goal events.Goal) error {
	removed := events.VMCheckpointRemoved{UID: goal.UID}
	top, err := a.top(goal)
	if err != nil {
		return err
	}
	for _, d := range goal.Drop { // all checked before anything is removed
		for _, f := range []string{d.Disk, d.Memory} {
			if f != "" && !a.ownFile(goal, f) {
				return a.reportStep(ctx, goal, events.VMCheckpointFailed{UID: goal.UID, Incarnation: goal.Incarnation, Checkpoint: d.Checkpoint,
					Op: events.CheckpointOpRemove, Fault: events.Errorf(events.CodeInvalidArgument, "checkpoint %s names %q, not one of %s's files", d.Checkpoint, f, goal.VM), Leases: goal.Leases})
			}
		}
	}
	for _, d := range goal.Drop {
		if d.Memory != "" {
			if err := os.Remove(d.Memory); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		keep := d.Disk == top || d.Disk == a.vmBase(goal)+".qcow2"
		if !keep && d.Disk != "" {
			on, err := a.layersOn(goal, d.Disk)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			keep = len(on) > 0
		}
		if keep {
			removed.KeptDisk = append(removed.KeptDisk, d.Checkpoint)
		} else if d.Disk != "" {
			if err := os.Remove(d.Disk); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		removed.Checkpoints = append(removed.Checkpoints, d.Checkpoint)
	}
	return a.reportStep(ctx, goal, removed)
}

// stepFailed reports that goal's step could not be done, and why. The VM
// goes on to its desired state: a failed step is reported, not retried.
func (a *Agent) stepFailed(ctx context.Context, goal events.Goal, fault *events.Fault) error {
	a.log.Warn("checkpoint step failed", logVM, goal.VM, "op", goal.Step.Op, "checkpoint", goal.Step.Checkpoint, logErr, fault)
	return a.reportStep(ctx, goal, events.VMCheckpointFailed{UID: goal.UID, Incarnation: goal.Incarnation,
		Checkpoint: goal.Step.Checkpoint, Op: goal.Step.Op, Fault: fault, Leases: goal.Leases})
}

// removeFiles removes files that may not exist; empty names are skipped.
func removeFiles(files ...string) error {
	var errs []error
	for _, f := range files {
		if f == "" {
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
