package handlers

import (
	"context"

	"github.com/loomctl/loom/events"
)

// The event indexes of a vm.delete.
const (
	deleteStepDeleted  = 0 // vm.deleted on the VM's subject
	deleteStepReleased = 1 // host.released on its host's subject
)

func (s *Service) serveDelete(ctx context.Context, req *request) *events.Reply {
	var cmd events.VMCommand
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.delete(ctx, c, cmd.Name)
}

// delete runs vm.delete: vm.deleted, then host.released for the VM's
// allocation. Each step is idempotent; if the second never happens, the
// scheduler gives the allocation back.
func (s *Service) delete(ctx context.Context, c *command, name string) *events.Reply {
	recorded, found, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return failed(unavailable("read command result", err), nil)
	}
	if found {
		return s.finishDelete(ctx, c, name, recorded)
	}
	var vm events.VMState
	res, fault := appendStep(ctx, s, s.vms, c, name, deleteStepDeleted, events.TypeVMDeleted, func(state *events.VMState) (events.Event, *events.Fault) {
		vm = *state
		return decideDelete(*state, name)
	})
	if fault != nil || res.appended == nil {
		return failed(fault, nil)
	}
	return s.releaseDeleted(ctx, c, vm, []events.Appended{*res.appended}, res.replayed)
}

// finishDelete answers a delete that already took effect, giving back the
// VM's allocation if that step never happened.
func (s *Service) finishDelete(ctx context.Context, c *command, name string, recorded []events.Appended) *events.Reply {
	if _, done := find(recorded, events.TypeHostReleased); done {
		return &events.Reply{Events: recorded, Replayed: true}
	}
	var vm events.VMState
	if err := s.vms.view(ctx, name, func(state *events.VMState, _ events.Head) { vm = *state }); err != nil {
		return failed(unavailable("read vm "+name, err), recorded)
	}
	if vm.Phase != events.PhaseDeleting && vm.Phase != events.PhaseGone {
		// The name was created again since: the scheduler owns what is left.
		return &events.Reply{Events: recorded, Replayed: true}
	}
	return s.releaseDeleted(ctx, c, vm, recorded, true)
}

// releaseDeleted gives back the deleted VM's allocation on its host.
func (s *Service) releaseDeleted(ctx context.Context, c *command, vm events.VMState, appended []events.Appended, replayed bool) *events.Reply {
	if vm.Host == "" {
		return &events.Reply{Events: appended, Replayed: replayed}
	}
	res, fault := appendStep(ctx, s, s.hosts, c, vm.Host, deleteStepReleased, events.TypeHostReleased, func(h *hostView) (events.Event, *events.Fault) {
		return decideRelease(h.state, vm.Name, vm.UID, ReleaseDeleted), nil
	})
	if res.appended != nil {
		appended = merge(appended, []events.Appended{*res.appended})
		replayed = replayed && res.replayed
	}
	return &events.Reply{Events: appended, Error: fault, Replayed: replayed}
}
