package handlers

import (
	"github.com/loomctl/loom/events"
)

// Prefixes of the ids a command derives for a checkpoint and a restore:
// they name files on the VM's host.
const (
	prefixCheckpoint = "ck"
	prefixRestore    = "rs"
)

// decideCheckpoint asks for a checkpoint of a live VM: one placed, with a
// guest to checkpoint (running or paused), and no other step under way.
// A retry of the same command (the same derived id) appends nothing.
func decideCheckpoint(vm events.VMState, cmd *events.CheckpointVM, id string, scheduled bool) (events.Event, *events.Fault) {
	if _, ok := vm.CheckpointOf(id); ok {
		return nil, nil
	}
	if fault := liveForStep(vm, cmd.Name); fault != nil {
		return nil, fault
	}
	if vm.Desired != events.DesiredRunning && vm.Desired != events.DesiredPaused {
		return nil, events.Errorf(events.CodeVMNotRunning, "vm %s is %s; a checkpoint needs a running or paused guest (start it first)", cmd.Name, vm.Desired)
	}
	return events.VMCheckpointRequested{UID: vm.UID, Checkpoint: id, Kind: cmd.Kind, Scheduled: scheduled}, nil
}

// decideRestore brings a VM back to one of its own taken checkpoints, on
// the host its files are on. A full checkpoint resumes the guest: a VM
// that is stopped becomes running, a paused one stays paused.
func decideRestore(vm events.VMState, cmd *events.RestoreVM, restore string) (events.Event, *events.Fault) {
	if vm.Step != nil && vm.Step.Restore == restore {
		return nil, nil // this command's own restore, retried
	}
	if fault := liveForStep(vm, cmd.Name); fault != nil {
		return nil, fault
	}
	c, ok := vm.CheckpointOf(cmd.Checkpoint)
	switch {
	case !ok:
		return nil, events.Errorf(events.CodeCheckpointNotFound,
			"vm %s has no checkpoint %s: it was deleted, or it is another VM's (a VM goes back only to its own; `loom vm checkpoints %s` lists them)", cmd.Name, cmd.Checkpoint, cmd.Name)
	case c.State == events.CheckpointDeleting:
		return nil, events.Errorf(events.CodeCheckpointNotFound, "checkpoint %s of vm %s was deleted", cmd.Checkpoint, cmd.Name)
	case c.State != events.CheckpointTaken:
		return nil, events.Errorf(events.CodeCheckpointNotReady, "checkpoint %s of vm %s is %s, not taken: there is nothing to restore", cmd.Checkpoint, cmd.Name, c.State)
	case c.Host != vm.Host:
		return nil, events.Errorf(events.CodeCheckpointElsewhere,
			"checkpoint %s of vm %s is on host %s, and the vm runs on %s now; checkpoints are not copied between hosts", cmd.Checkpoint, cmd.Name, c.Host, vm.Host)
	}
	desired := vm.Desired
	if c.Kind == events.CheckpointFull && desired == events.DesiredStopped {
		desired = events.DesiredRunning
	}
	return events.VMRestoreRequested{UID: vm.UID, Checkpoint: c.ID, Restore: restore, Kind: c.Kind, Host: c.Host,
		Disk: c.Disk, Memory: c.Memory, Desired: desired}, nil
}

// decideDeleteCheckpoint takes a checkpoint out of the VM's catalog. One
// the goal's step is still working on cannot go; one whose files are on a
// host the VM left is deleted from the catalog, and the event says its
// files stay there.
func decideDeleteCheckpoint(vm events.VMState, name, checkpoint, reason string) (events.Event, *events.Fault) {
	if fault := liveFault(vm, name); fault != nil {
		return nil, fault
	}
	c, ok := vm.CheckpointOf(checkpoint)
	switch {
	case !ok:
		return nil, events.Errorf(events.CodeCheckpointNotFound, "vm %s has no checkpoint %s", name, checkpoint)
	case c.State == events.CheckpointDeleting:
		return nil, nil // deleted already
	case vm.Step != nil && vm.Step.Checkpoint == checkpoint:
		return nil, events.Errorf(events.CodeVMBusy, "checkpoint %s of vm %s is being %s by its host; delete it once that is done", checkpoint, name, stepVerb(vm.Step.Op))
	}
	return events.VMCheckpointDeleted{UID: vm.UID, Checkpoint: checkpoint, Reason: reason, Host: c.Host,
		Stranded: c.Host != vm.Host && (c.Disk != "" || c.Memory != "")}, nil
}

// decideSchedule sets or clears the VM's checkpoint schedule; setting the
// one it has changes nothing.
func decideSchedule(vm events.VMState, cmd *events.ScheduleCheckpoints) (events.Event, *events.Fault) {
	if fault := liveFault(vm, cmd.Name); fault != nil {
		return nil, fault
	}
	want := events.VMCheckpointScheduled{UID: vm.UID}
	if cmd.EveryMillis > 0 {
		kind := cmd.Kind
		if kind == "" {
			kind = events.CheckpointDisk
		}
		want.EveryMillis, want.Keep, want.Kind = cmd.EveryMillis, cmd.Keep, kind
	}
	have := events.VMCheckpointScheduled{UID: vm.UID}
	if s := vm.Schedule; s != nil {
		have.EveryMillis, have.Keep, have.Kind = s.EveryMillis, s.Keep, s.Kind
	}
	if want == have {
		return nil, nil
	}
	return want, nil
}

// liveForStep refuses a checkpoint step on a VM that cannot take one now.
func liveForStep(vm events.VMState, name string) *events.Fault {
	if fault := placedFault(vm, name); fault != nil {
		return fault
	}
	switch {
	case vm.Migration != nil:
		return migratingFault(vm, name)
	case vm.Step != nil:
		return events.Errorf(events.CodeVMBusy, "vm %s: checkpoint %s is being %s by host %s; wait until it reports",
			name, vm.Step.Checkpoint, stepVerb(vm.Step.Op), vm.Host)
	}
	return nil
}

// stepVerb says what a step does, for messages.
func stepVerb(op string) string {
	if op == events.CheckpointOpRestore {
		return "restored"
	}
	return "taken"
}

// liveFault refuses a command on a VM that is gone or going.
func liveFault(vm events.VMState, name string) *events.Fault {
	switch {
	case vm.Phase == events.PhaseDeleting:
		return events.Errorf(events.CodeVMDeleting, "vm %s is being deleted", name)
	case !vm.Exists():
		return events.Errorf(events.CodeVMNotFound, "no vm %s", name)
	}
	return nil
}

// placedFault refuses a command that needs the VM on a host.
func placedFault(vm events.VMState, name string) *events.Fault {
	if fault := liveFault(vm, name); fault != nil {
		return fault
	}
	if vm.Phase != events.PhasePlaced {
		return events.Errorf(events.CodeVMNotPlaced, "vm %s is not placed on a host yet", name)
	}
	return nil
}
