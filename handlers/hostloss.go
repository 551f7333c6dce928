package handlers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"github.com/loomctl/loom/events"
)

// What follows a host.lost, as scheduler passes: first every grant held on
// the host from before its loss expires; once a VM's grants have expired,
// the VM is moved to another host under new grants (policy restart, its
// disk provisioned again from its image) or given a goal of stopped on its
// host (policy stop). Only host.lost permits any of it, and host.lost is
// appended only after the failure detector's lost marker won the race
// against the host's next renewal: by then the host's agent is past its
// fencing deadline and starts or resumes nothing (DESIGN.md, "Liveness and
// time"). A host that rejoins finds its grants expired and its moved VMs'
// goals absent: it resumes none of them.

// expireLostLeases expires every grant held on a host that was declared
// lost, made before the loss.
func (s *Service) expireLostLeases(ctx context.Context, hosts []events.HostState, grants []events.LeaseGrant) error {
	lost := lostHosts(hosts)
	var errs []error
	for _, g := range grants {
		h, ok := lost[g.Host]
		if !ok || g.Epoch > h.LostSeq {
			continue
		}
		if err := s.expire(ctx, g); err != nil {
			errs = append(errs, fmt.Errorf("expire %s of %s: %w", g.Resource, g.ID, err))
		}
	}
	return errors.Join(errs...)
}

// lostHosts are the hosts ever declared lost (rejoined ones included:
// what was granted or placed on them before the loss ended with it), by
// name.
func lostHosts(hosts []events.HostState) map[string]events.HostState {
	lost := map[string]events.HostState{}
	for _, h := range hosts {
		if h.LostSeq != 0 {
			lost[h.Name] = h
		}
	}
	return lost
}

// expire appends lease.expired for grant g of a host declared lost, as
// the failure detector, deciding on the host as it stands then.
func (s *Service) expire(ctx context.Context, g events.LeaseGrant) error {
	ended, err := s.endGrant(ctx, detectorActor, "expire", g, func(cur events.LeaseGrant, host events.HostState) events.Event {
		if host.LostSeq < cur.Epoch {
			return nil // made since the loss: not this one
		}
		return events.LeaseExpired{Holder: g.ID, Epoch: g.Epoch, Host: g.Host, MarkerSeq: host.LostMarker}
	})
	if ended {
		s.Nudge() // the next pass may move the VM that held it
		s.metrics.scheduled.WithLabelValues("lease-expired").Inc()
		s.log.Warn("lease expired: its host was declared lost", "resource", g.Resource, "holder", g.ID, "epoch", g.Epoch, keyHost, g.Host)
	}
	return err
}

// evacuate acts on every VM placed on a host that was declared lost after
// its placement, once its grants have expired.
func (s *Service) evacuate(ctx context.Context, hosts []events.HostState, vms []events.VMState, grants []events.LeaseGrant) error {
	lost := lostHosts(hosts)
	standing := map[events.LeaseEpoch]string{}
	for _, g := range grants {
		standing[events.LeaseEpoch{Resource: g.Resource, Mode: g.Mode, Epoch: g.Epoch}] = g.ID
	}
	var errs []error
	for _, vm := range vms {
		h, ok := lost[vm.Host]
		if !ok || vm.Phase != events.PhasePlaced || !placedBefore(&vm, h.LostSeq) {
			continue
		}
		if held := heldOf(&vm, standing); held != "" {
			s.log.Debug("vm on a lost host waits for its leases to expire", keyVM, vm.Name, keyHost, vm.Host, "held", held)
			continue
		}
		var err error
		switch {
		case vm.OnHostLost == events.LeaveStopped:
			err = s.leaveStopped(ctx, vm, h)
		case vm.Desired == events.DesiredStopped:
			// Nothing to restart; it moves when it is started again.
		default:
			err = s.restartElsewhere(ctx, vm, h)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("vm %s on lost host %s: %w", vm.Name, vm.Host, err))
		}
	}
	return errors.Join(errs...)
}

// placedBefore tells whether vm's placement on its host predates the
// host.lost at lostSeq: its grants, taken just before it, are older.
func placedBefore(vm *events.VMState, lostSeq uint64) bool {
	if len(vm.Leases) == 0 {
		return vm.Incarnation < lostSeq
	}
	for _, l := range vm.Leases {
		if l.Epoch > lostSeq {
			return false
		}
	}
	return true
}

// heldOf names a grant of vm's that still stands, or "".
func heldOf(vm *events.VMState, standing map[events.LeaseEpoch]string) string {
	for _, l := range vm.Leases {
		if standing[l] == vm.UID {
			return l.Resource
		}
	}
	return ""
}

// restartElsewhere moves vm off the lost host h: a new allocation on
// another host, new grants there, then vm.placed naming where it came
// from. Each step carries the move's own command id, derived from the VM
// and the loss, so a move cut short is carried on by the next pass.
func (s *Service) restartElsewhere(ctx context.Context, vm events.VMState, h events.HostState) error {
	c := newCommand(schedulerActor, "move-"+vm.UID+"-"+strconv.FormatUint(h.LostSeq, 10), "", events.Origin{Time: s.cfg.Now()})
	defer s.holds.release(vm.UID)
	p, _, fault := s.allocateExcept(ctx, c, vm.Name, vm.UID, capacity{vm.CPU, vm.MemoryMiB}, vm.Host)
	if fault != nil && fault.Code == events.CodeNoCapacity {
		s.log.Warn("vm of a lost host has no room elsewhere yet", keyVM, vm.Name, keyHost, vm.Host)
		return nil
	}
	if fault != nil {
		return fault
	}
	res, _, fault := s.placeLeasedFrom(ctx, c, vm.Name, vm.UID, vm.Image, p, vm.Host)
	if fault != nil {
		return fault
	}
	if res.appended != nil && !res.replayed {
		s.metrics.scheduled.WithLabelValues("moved").Inc()
		s.log.Warn("vm restarted elsewhere: its host was declared lost; disk provisioned again from its image",
			keyVM, vm.Name, "from", vm.Host, "to", p.host)
	}
	return nil
}

// leaveStopped gives vm, on the lost host h, a goal of stopped.
func (s *Service) leaveStopped(ctx context.Context, vm events.VMState, h events.HostState) error {
	if vm.Desired == events.DesiredStopped {
		return nil
	}
	c := newCommand(schedulerActor, "stop-"+vm.UID+"-"+strconv.FormatUint(h.LostSeq, 10), "", events.Origin{Time: s.cfg.Now()})
	_, fault := appendStep(ctx, s, s.vms, c, vm.Name, 0, events.TypeVMGoalChanged, func(state *events.VMState) (events.Event, *events.Fault) {
		if state.UID != vm.UID || state.Phase != events.PhasePlaced || state.Host != vm.Host || state.Desired == events.DesiredStopped {
			return nil, nil
		}
		return events.VMGoalChanged{UID: vm.UID, Desired: events.DesiredStopped}, nil
	})
	if fault != nil {
		return fault
	}
	return nil
}

// completeBreaks ends every grant an operator marked breaking once its
// holder can no longer write: its host was declared lost, or its VM's
// agent reported the domain stopped (or refused to run it) under that
// grant's epoch.
func (s *Service) completeBreaks(ctx context.Context, hosts []events.HostState, vms []events.VMState, grants []events.LeaseGrant) error {
	lost := map[string]bool{}
	for _, h := range hosts {
		lost[h.Name] = h.Lost
	}
	byName := make(map[string]events.VMState, len(vms))
	for _, vm := range vms {
		byName[vm.Name] = vm
	}
	var errs []error
	for _, g := range grants {
		if !g.Breaking {
			continue
		}
		var reason string
		switch vm, ok := byName[g.VM]; {
		case lost[g.Host]:
			reason = "host " + g.Host + " was declared lost"
		case ok && vm.UID == g.ID && stoppedUnder(vm.Observed, g):
			reason = "its agent reported the domain " + string(vm.Observed.State) + " under epoch " + strconv.FormatUint(g.Epoch, 10)
		default:
			continue
		}
		if err := s.completeBreak(ctx, g, reason); err != nil {
			errs = append(errs, fmt.Errorf("break %s of %s: %w", g.Resource, g.ID, err))
		}
	}
	return errors.Join(errs...)
}

// stoppedUnder tells whether obs says the domain cannot write under g:
// stopped, gone or crashed, or refused to run because g is not current.
func stoppedUnder(obs events.Observation, g events.LeaseGrant) bool {
	if !slices.Contains(obs.Leases, events.LeaseEpoch{Resource: g.Resource, Mode: g.Mode, Epoch: g.Epoch}) {
		return false
	}
	switch obs.State {
	case events.ObservedStopped, events.ObservedAbsent, events.ObservedCrashed:
		return true
	case events.ObservedFailed:
		return obs.Fault != nil && obs.Fault.Code == events.CodeLeaseNotCurrent
	}
	return false
}

// completeBreak appends lease.broken for g, as the scheduler.
func (s *Service) completeBreak(ctx context.Context, g events.LeaseGrant, reason string) error {
	ended, err := s.endGrant(ctx, schedulerActor, "break", g, func(cur events.LeaseGrant, _ events.HostState) events.Event {
		if !cur.Breaking {
			return nil
		}
		return events.LeaseBroken{Holder: g.ID, Epoch: g.Epoch, Reason: reason}
	})
	if ended {
		s.metrics.scheduled.WithLabelValues("lease-broken").Inc()
		s.log.Warn("forced break took effect", "resource", g.Resource, "holder", g.ID, "epoch", g.Epoch, keyReason, reason)
	}
	return err
}

// endGrant ends grant g with the event decide makes of it (nil: none), on
// the control plane's own account (actor), unless g no longer stands. Its
// command id derives from the grant and the verb, so replicas doing the
// same append it once. ended says this call appended it.
func (s *Service) endGrant(ctx context.Context, actor, verb string, g events.LeaseGrant, decide func(cur events.LeaseGrant, host events.HostState) events.Event) (ended bool, err error) {
	r, err := events.ParseResource(g.Resource)
	if err != nil {
		return false, err
	}
	c := newCommand(actor, fmt.Sprintf("%s-%s-%d", verb, g.Resource, g.Epoch), "", events.Origin{Time: s.cfg.Now()})
	a, fault := s.endLease(ctx, c, r, g.ID, func(cur events.LeaseGrant, host events.HostState) (events.Event, *events.Fault) {
		if cur.Epoch != g.Epoch {
			return nil, nil // another grant of the holder's: not this one
		}
		return decide(cur, host), nil
	})
	if fault != nil && fault.Code != events.CodeLeaseNotFound {
		return false, fault
	}
	return a != nil, nil
}
