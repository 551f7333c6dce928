package handlers

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// minPassTimeout is the least time a scheduler pass is given.
const minPassTimeout = 30 * time.Second

// schedulerActor is the actor of what the scheduler decides on its own
// (not as the step of a command it completes).
const schedulerActor = "loom:scheduler"

// Nudge asks the scheduler for a pass soon. It never blocks.
func (s *Service) Nudge() {
	select {
	case s.nudge <- struct{}{}:
	default:
	}
}

// RunScheduler is the process manager of vm.create: it completes creates
// that stopped between steps and gives back allocations no VM stands on. It
// makes a pass at once, then every ReconcileInterval and on Nudge, until
// ctx ends; it returns nil then. Every replica may run one: each step it
// takes is checked against the subject's last sequence and carries the
// original command's Nats-Msg-Id, so it cannot repeat what a handler or
// another scheduler did.
func (s *Service) RunScheduler(ctx context.Context) error {
	ticker := time.NewTicker(s.cfg.ReconcileInterval)
	defer ticker.Stop()
	watching := make(chan error, 1)
	go func() { watching <- s.watchMigrations(ctx) }()
	defer func() {
		if err := <-watching; err != nil {
			s.log.Warn("migration reports were not watched; the scheduler's passes moved migrations on", keyErr, err)
		}
	}()
	var lastLogged time.Time
	for {
		// A pass waits for the read model; bound it, so a stuck read model
		// is logged rather than waited for in silence.
		pass, cancel := context.WithTimeout(ctx, max(2*s.cfg.ReconcileInterval, minPassTimeout))
		err := s.ReconcileOnce(pass)
		cancel()
		if err != nil && ctx.Err() == nil && time.Since(lastLogged) > time.Minute {
			s.log.Warn("scheduler pass; will retry", keyErr, err)
			lastLogged = time.Now()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		case <-s.nudge:
		}
	}
}

// located is an allocation and the host that holds it.
type located struct {
	host  string
	vm    string
	alloc events.Allocation
}

// ReconcileOnce makes one scheduler pass over the read model: it places
// every pending VM that no create in this process is working on (using an
// allocation it already has, or a new one) and releases every allocation
// whose VM is gone, deleted, another incarnation, or placed elsewhere. It
// returns the errors of the steps that failed; the others stand.
//
// A pass sees at least everything appended before it began: it first waits
// for the read model to reach the stream's last sequence.
func (s *Service) ReconcileOnce(ctx context.Context) error {
	// The grants are read before the VMs: a grant follows its VM's
	// vm.created in the stream, so every VM a grant names is then known.
	grants, err := s.cfg.Reader.AllLeases(ctx)
	if err != nil {
		return fmt.Errorf("list leases: %w", err)
	}
	hosts, allocations, vms, err := s.snapshot(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hosts {
		// Pick up what other writers did to each host, for admission.
		errs = append(errs, s.hosts.refresh(ctx, h.Name))
	}
	errs = append(errs, s.completeCreates(ctx, vms, allocations))
	errs = append(errs, s.releaseOrphans(ctx, vms, allocations))
	errs = append(errs, s.releaseOrphanLeases(ctx, grants, vms))
	errs = append(errs, s.expireLostLeases(ctx, hosts, grants))
	errs = append(errs, s.evacuate(ctx, hosts, vms, grants))
	errs = append(errs, s.completeBreaks(ctx, hosts, vms, grants))
	errs = append(errs, s.scheduleCheckpoints(ctx, vms))
	errs = append(errs, s.advanceMigrations(ctx, vms))
	errs = append(errs, s.releaseOrphanAddresses(ctx, vms))
	errs = append(errs, s.rebindMovedEndpoints(ctx, hosts))
	return errors.Join(errs...)
}

// releaseOrphanLeases gives back the grants held by VMs that can no longer
// write: a VM incarnation withdrawn before it ran, deleted and reported
// absent by its agent, or replaced by a new incarnation of its name. A
// grant that names no VM belongs to a client, which releases it itself.
func (s *Service) releaseOrphanLeases(ctx context.Context, grants []events.LeaseGrant, vms []events.VMState) error {
	byName := make(map[string]events.VMState, len(vms))
	for _, vm := range vms {
		byName[vm.Name] = vm
	}
	var errs []error
	for _, g := range grants {
		vm, known := byName[g.VM]
		if g.VM == "" || g.Void {
			continue
		}
		var reason string
		switch {
		case !known || vm.UID != g.ID:
			reason = "vm " + g.VM + " incarnation " + g.ID + " is gone"
		case vm.Phase == events.PhaseGone:
			reason = "vm " + g.VM + " is gone (" + vm.AbsentReason + ")"
		default:
			continue
		}
		if err := s.releaseOrphanGrant(ctx, g, reason); err != nil {
			errs = append(errs, fmt.Errorf("release %s of %s: %w", g.Resource, g.ID, err))
		}
	}
	return errors.Join(errs...)
}

// withdrawPending deletes a pending VM whose leases another holder has, as
// the command that created it, so that it does not wait forever.
func (s *Service) withdrawPending(ctx context.Context, c *command, vm events.VMState, cause *events.Fault) error {
	res, fault := appendStep(ctx, s, s.vms, c, vm.Name, createStepWithdrawn, events.TypeVMDeleted, func(state *events.VMState) (events.Event, *events.Fault) {
		return decideWithdraw(*state, vm.UID, ReasonLeaseHeld), nil
	})
	if fault != nil {
		return fault
	}
	if res.appended != nil && !res.replayed {
		s.log.Warn("pending vm withdrawn: its leases are held elsewhere", keyVM, vm.Name, keyErr, cause)
	}
	return nil
}

// snapshot reads the hosts, their allocations in order, and the VMs, once
// the read model has applied the stream's last sequence.
func (s *Service) snapshot(ctx context.Context) ([]events.HostState, []located, []events.VMState, error) {
	last, err := bus.LastSeq(ctx, s.cfg.JS, events.StreamEvents)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := s.cfg.Reader.WaitFor(ctx, last); err != nil {
		return nil, nil, nil, fmt.Errorf("wait for read model to reach %d: %w", last, err)
	}
	hosts, err := s.cfg.Reader.Hosts(ctx)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("list hosts: %w", err)
	}
	slices.SortFunc(hosts, func(a, b events.HostState) int { return cmp.Compare(a.Name, b.Name) })
	var allocations []located
	var newest uint64
	for _, h := range hosts {
		for _, vm := range slices.Sorted(maps.Keys(h.Allocations)) {
			a := h.Allocations[vm]
			allocations = append(allocations, located{host: h.Name, vm: vm, alloc: a})
			newest = max(newest, a.Seq)
		}
	}
	// Every VM's vm.created precedes its allocations in the stream: once the
	// read model has applied the newest allocation, it knows every VM that
	// any allocation names, even if it moved on between the two reads.
	if err := s.cfg.Reader.WaitFor(ctx, newest); err != nil {
		return nil, nil, nil, fmt.Errorf("wait for read model to reach %d: %w", newest, err)
	}
	vms, err := s.cfg.Reader.AllVMs(ctx)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("list vms: %w", err)
	}
	return hosts, allocations, vms, nil
}

// completeCreates places the pending VMs.
func (s *Service) completeCreates(ctx context.Context, vms []events.VMState, allocations []located) error {
	byUID := map[string][]located{}
	for _, l := range allocations {
		byUID[l.alloc.UID] = append(byUID[l.alloc.UID], l)
	}
	slices.SortFunc(vms, func(a, b events.VMState) int { return cmp.Compare(a.Name, b.Name) })
	var errs []error
	for _, vm := range vms {
		if vm.Phase != events.PhasePending || s.holds.has(vm.UID) {
			continue
		}
		if err := s.completeCreate(ctx, vm, byUID[vm.UID]); err != nil {
			errs = append(errs, fmt.Errorf("complete create of vm %s: %w", vm.Name, err))
		}
	}
	return errors.Join(errs...)
}

// completeCreate takes the steps a create of vm left undone, as the
// command that created it: allocate if no host holds an allocation for it,
// then place. With no room anywhere the VM stays pending until there is.
func (s *Service) completeCreate(ctx context.Context, vm events.VMState, allocations []located) error {
	actor, err := s.creatorOf(vm)
	if err != nil {
		return err
	}
	c := newCommand(actor, vm.CreateCommand, "", events.Origin{Time: s.cfg.Now()})
	var p placement
	if len(allocations) > 0 {
		first := slices.MinFunc(allocations, func(a, b located) int { return cmp.Compare(a.alloc.Seq, b.alloc.Seq) })
		p = placement{host: first.host, allocSeq: first.alloc.Seq}
	} else {
		var fault *events.Fault
		p, _, fault = s.allocate(ctx, c, vm.Name, vm.UID, capacity{vm.CPU, vm.MemoryMiB})
		s.holds.release(vm.UID)
		if fault != nil && fault.Code == events.CodeNoCapacity {
			s.log.Debug("pending vm has no room yet", keyVM, vm.Name, keyErr, fault)
			return nil
		}
		if fault != nil {
			return fault
		}
	}
	res, _, fault := s.placeLeased(ctx, c, vm.Name, vm.UID, vm.Image, p)
	if fault != nil && fault.Code == events.CodeLeaseHeld {
		return s.withdrawPending(ctx, c, vm, fault)
	}
	if fault != nil && fault.Code != events.CodeVMNotFound { // deleted meanwhile: its allocation is an orphan now
		return fault
	}
	if res.appended != nil && !res.replayed {
		s.metrics.scheduled.WithLabelValues("placed").Inc()
		s.log.Info("interrupted create completed", keyVM, vm.Name, keyHost, p.host, keyCommand, vm.CreateCommand)
	}
	return nil
}

// releaseOrphans gives back the allocations no VM stands on.
func (s *Service) releaseOrphans(ctx context.Context, vms []events.VMState, allocations []located) error {
	byName := make(map[string]events.VMState, len(vms))
	for _, vm := range vms {
		byName[vm.Name] = vm
	}
	var errs []error
	for _, l := range allocations {
		vm, known := byName[l.vm]
		reason := orphanReason(l.host, l.alloc, vm, known)
		if reason == "" {
			continue
		}
		if err := s.release(ctx, l, reason); err != nil {
			errs = append(errs, fmt.Errorf("release vm %s on host %s: %w", l.vm, l.host, err))
		}
	}
	return errors.Join(errs...)
}

// orphanReason says why an allocation on host must be given back, or ""
// if its VM stands on it (or is pending, and will be placed).
func orphanReason(host string, a events.Allocation, vm events.VMState, known bool) string {
	switch {
	case !known || vm.UID != a.UID:
		return ReleaseOrphaned
	case vm.Phase == events.PhaseDeleting || vm.Phase == events.PhaseGone:
		return ReleaseDeleted
	case vm.Phase == events.PhasePlaced && vm.Host != host && (vm.Migration == nil || vm.Migration.To != host):
		return ReleaseOrphaned
	}
	return ""
}

// release appends host.released for an allocation, as the command that
// made it.
func (s *Service) release(ctx context.Context, l located, reason string) error {
	actor, err := s.actorOf(ctx, l.alloc.Seq, l.alloc.CommandID)
	if err != nil {
		return err
	}
	c := newCommand(actor, l.alloc.CommandID, "", events.Origin{Time: s.cfg.Now()})
	res, fault := appendStep(ctx, s, s.hosts, c, l.host, createStepReleased, events.TypeHostReleased, func(h *hostView) (events.Event, *events.Fault) {
		return decideRelease(h.state, l.vm, l.alloc.UID, reason), nil
	})
	if fault != nil {
		return fault
	}
	if res.appended != nil && !res.replayed {
		s.metrics.scheduled.WithLabelValues("released").Inc()
		s.log.Info("allocation released", keyHost, l.host, keyVM, l.vm, keyReason, reason)
	}
	return nil
}

// creatorOf is the actor of the command that created vm's incarnation, as
// the VM's state records it; the pair must derive the VM's UID, or the
// steps taken in its name would not be the create's own.
func (s *Service) creatorOf(vm events.VMState) (string, error) {
	if vm.CreatedBy == "" || events.DeriveUID(vm.CreatedBy, vm.CreateCommand) != vm.UID {
		return "", fmt.Errorf("vm %s: creator %q and command %q do not derive uid %s", vm.Name, vm.CreatedBy, vm.CreateCommand, vm.UID)
	}
	return vm.CreatedBy, nil
}

// actorOf is the actor of the event at seq, which command commandID
// appended.
func (s *Service) actorOf(ctx context.Context, seq uint64, commandID string) (string, error) {
	_, env, _, err := s.envelopeAt(ctx, seq, "")
	if err != nil {
		return "", fmt.Errorf("read event %d: %w", seq, err)
	}
	if env.CommandID != commandID {
		return "", fmt.Errorf("event %d belongs to command %q, not %q", seq, env.CommandID, commandID)
	}
	return env.Actor, nil
}
