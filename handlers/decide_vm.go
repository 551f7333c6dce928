package handlers

import "github.com/loomctl/loom/events"

// ReasonNoCapacity is the reason of the vm.deleted that withdraws a created
// VM when, by the time it was to be allocated, no host had room for it
// (other replicas took the room first).
const ReasonNoCapacity = "no-capacity"

// decideCreate creates a new incarnation of the name, with the UID the
// command derives. A name taken by a live incarnation is refused; the
// command's own incarnation (a retry) is not created twice.
func decideCreate(vm events.VMState, cmd *events.CreateVM, origin events.Origin) (events.Event, *events.Fault) {
	uid := events.DeriveUID(origin.Actor, origin.CommandID)
	switch {
	case vm.UID == uid:
		return nil, nil
	case vm.Phase == events.PhaseDeleting:
		return nil, events.Errorf(events.CodeVMExists, "vm %s is still being deleted; create it again once it is gone", cmd.Name)
	case vm.Exists():
		return nil, events.Errorf(events.CodeVMExists, "vm %s already exists (uid %s); delete it first or choose another name", cmd.Name, vm.UID)
	}
	desired := events.DesiredRunning
	if cmd.Stopped {
		desired = events.DesiredStopped
	}
	policy := cmd.OnHostLost
	if policy == "" {
		policy = events.RestartElsewhere
	}
	return events.VMCreated{UID: uid, Image: cmd.Image, CPU: cmd.CPU, MemoryMiB: cmd.MemoryMiB, Desired: desired, OnHostLost: policy, Net: cmd.Net}, nil
}

// placement is where a VM's allocation stands.
type placement struct {
	host     string
	allocSeq uint64
	// leases are the grants the VM runs under on host.
	leases []events.LeaseEpoch
}

// decidePlace binds the pending incarnation uid to the host whose
// allocation for it is at p.allocSeq. A VM already placed is not placed
// again; one deleted meanwhile is not placed at all.
func decidePlace(vm events.VMState, uid string, p placement) (events.Event, *events.Fault) {
	switch {
	case vm.UID != uid || vm.Phase == events.PhaseDeleting || vm.Phase == events.PhaseGone:
		return nil, events.Errorf(events.CodeVMNotFound, "vm %s was deleted before it could be placed", vm.Name)
	case vm.Phase == events.PhasePending:
		return events.VMPlaced{UID: uid, Host: p.host, AllocationSeq: p.allocSeq, Leases: p.leases}, nil
	}
	return nil, nil
}

// decideMove moves the incarnation uid, placed on the lost host from, to
// the host of p. Its disk was local to from: it is provisioned again from
// the image, and the event says so. A VM no longer placed on from (moved
// already, or deleted) is left alone.
func decideMove(vm events.VMState, uid, from string, p placement) events.Event {
	if vm.UID != uid || vm.Phase != events.PhasePlaced || vm.Host != from {
		return nil
	}
	return events.VMPlaced{UID: uid, Host: p.host, AllocationSeq: p.allocSeq, Leases: p.leases,
		From: from, Reason: events.AbsentHostLost, Reprovisioned: true}
}

// decideWithdraw deletes the pending incarnation uid that found no room,
// or could not have its leases.
func decideWithdraw(vm events.VMState, uid, reason string) events.Event {
	if vm.UID == uid && vm.Phase == events.PhasePending {
		return events.VMDeleted{UID: uid, Reason: reason}
	}
	return nil
}

// decideGoal changes what a VM should be doing. verb is start, stop, pause
// or resume. A VM not yet placed takes the new goal too: its goal follows
// at placement. Asking for the goal it already has changes nothing.
func decideGoal(vm events.VMState, name, verb string) (events.Event, *events.Fault) {
	switch {
	case vm.Phase == events.PhaseDeleting:
		return nil, events.Errorf(events.CodeVMDeleting, "vm %s is being deleted", name)
	case !vm.Exists():
		return nil, events.Errorf(events.CodeVMNotFound, "no vm %s", name)
	case vm.Migration != nil:
		return nil, migratingFault(vm, name)
	}
	var want events.Desired
	switch verb {
	case events.VerbStart:
		want = events.DesiredRunning
	case events.VerbStop:
		want = events.DesiredStopped
	case events.VerbPause:
		if vm.Desired == events.DesiredStopped {
			return nil, events.Errorf(events.CodeInvalidArgument, "vm %s is stopped; only a running vm can be paused (start it first)", name)
		}
		want = events.DesiredPaused
	case events.VerbResume:
		if vm.Desired == events.DesiredStopped {
			return nil, events.Errorf(events.CodeInvalidArgument, "vm %s is stopped, not paused; start it instead", name)
		}
		want = events.DesiredRunning
	default:
		return nil, events.Errorf(events.CodeInternal, "no goal for verb %q", verb)
	}
	if vm.Desired == want {
		return nil, nil
	}
	return events.VMGoalChanged{UID: vm.UID, Desired: want}, nil
}

// decideDelete deletes a VM: its goal becomes absent. Deleting a VM that
// is already being deleted changes nothing.
func decideDelete(vm events.VMState, name string) (events.Event, *events.Fault) {
	switch {
	case vm.Phase == events.PhaseDeleting:
		return nil, nil
	case !vm.Exists():
		return nil, events.Errorf(events.CodeVMNotFound, "no vm %s", name)
	case vm.Migration != nil:
		return nil, migratingFault(vm, name)
	}
	return events.VMDeleted{UID: vm.UID, Reason: events.AbsentDeleted}, nil
}

// migratingFault refuses a command on a VM that is moving.
func migratingFault(vm events.VMState, name string) *events.Fault {
	m := vm.Migration
	return events.Errorf(events.CodeVMMigrating, "vm %s is moving from %s to %s (migration %s); wait for it to end, or cancel it", name, m.From, m.To, m.ID)
}
