package handlers

import (
	"context"

	"github.com/loomctl/loom/events"
)

// The gate: a VM is placed, and so gets a goal, only under its leases. The
// create chain takes them between the allocation and the placement, each
// an idempotent step of the create command, and vm.placed names their
// epochs, which the goal carries to the agent. A create that cannot have
// a lease is withdrawn like one that finds no room; what it took before
// (an allocation, the image's shared grant) is an orphan, which the
// scheduler gives back.

// The event indexes of a create's lease steps.
const (
	createStepImageLease = 5 // lease.granted, shared, on image/<image>
	createStepDiskLease  = 6 // lease.granted, exclusive, on disk/<vm>
)

// ReasonLeaseHeld is the reason of the vm.deleted that withdraws a created
// VM whose disk or image another holder has.
const ReasonLeaseHeld = "lease-held"

// vmLease is one lease a VM runs under.
type vmLease struct {
	index    int
	resource events.Resource
	mode     events.LeaseMode
}

// vmLeases are the leases a VM of that name and image runs under: shared
// on its read-only base image, exclusive on its writable disk, named after
// the VM (a new incarnation of the name writes the same disk, so it waits
// until the old one can no longer write).
func vmLeases(vm, image string) []vmLease {
	return []vmLease{
		{createStepImageLease, events.Resource{Kind: events.ResourceImage, Name: image}, events.LeaseShared},
		{createStepDiskLease, events.Resource{Kind: events.ResourceDisk, Name: vm}, events.LeaseExclusive},
	}
}

// placeLeased takes the pending incarnation uid's leases for its host and
// places it there under their epochs. leased are the lease steps, found
// or appended.
func (s *Service) placeLeased(ctx context.Context, c *command, vm, uid, image string, p placement) (placed stepResult, leased []stepResult, fault *events.Fault) {
	return s.placeLeasedFrom(ctx, c, vm, uid, image, p, "")
}

// placeLeasedFrom is placeLeased for a VM placed on host from, which it
// moves off (from empty: a pending VM's first placement).
func (s *Service) placeLeasedFrom(ctx context.Context, c *command, vm, uid, image string, p placement, from string) (placed stepResult, leased []stepResult, fault *events.Fault) {
	leased, p.leases, fault = s.takeLeases(ctx, c, vm, image, events.LeaseHolder{ID: uid, VM: vm, Host: p.host})
	if fault != nil {
		return stepResult{}, leased, fault
	}
	// Its address goes with it: bound to the host before the placement
	// that gives the host its goal, so the goal names it.
	var net string
	if err := s.vms.view(ctx, vm, func(state *events.VMState, _ events.Head) {
		if state.UID == uid {
			net = state.Net
		}
	}); err != nil {
		return stepResult{}, leased, unavailable("read vm "+vm, err)
	}
	bound, fault := s.bindAddress(ctx, c, vm, uid, net, p.host)
	if bound.appended != nil {
		leased = append(leased, bound)
	}
	if fault != nil {
		return stepResult{}, leased, fault
	}
	if from == "" {
		placed, fault = s.place(ctx, c, vm, uid, p)
	} else {
		placed, fault = appendStep(ctx, s, s.vms, c, vm, createStepPlaced, events.TypeVMPlaced, func(state *events.VMState) (events.Event, *events.Fault) {
			return decideMove(*state, uid, from, p), nil
		})
	}
	return placed, leased, fault
}

// takeLeases takes a VM's leases for holder, as steps of command c, and
// returns the steps and the epochs.
func (s *Service) takeLeases(ctx context.Context, c *command, vm, image string, holder events.LeaseHolder) ([]stepResult, []events.LeaseEpoch, *events.Fault) {
	var steps []stepResult
	var epochs []events.LeaseEpoch
	for _, l := range vmLeases(vm, image) {
		res, fault := s.acquireForVM(ctx, c, l, holder)
		if res.appended != nil {
			steps = append(steps, res)
		}
		if fault != nil {
			return steps, epochs, fault
		}
		epochs = append(epochs, events.LeaseEpoch{Resource: l.resource.String(), Mode: l.mode, Epoch: res.appended.Seq})
	}
	return steps, epochs, nil
}

// acquireForVM takes one of a VM's leases. A grant that stands in the way
// but belongs to an earlier incarnation of the same VM name is given back
// first: that incarnation is gone (its name could not be taken again
// otherwise), so it can no longer write.
func (s *Service) acquireForVM(ctx context.Context, c *command, l vmLease, holder events.LeaseHolder) (stepResult, *events.Fault) {
	for range 2 {
		res, fault := s.acquire(ctx, c, l.index, l.resource, l.mode, holder, true)
		if fault == nil || fault.Code != events.CodeLeaseHeld {
			return res, fault
		}
		state, err := s.cfg.Reader.Lease(ctx, l.resource.String())
		if err != nil {
			return stepResult{}, unavailable("read lease "+l.resource.String(), err)
		}
		stale := 0
		for _, g := range state.Holding() {
			if g.VM == holder.VM && g.ID != holder.ID {
				if err := s.releaseOrphanGrant(ctx, g, "an earlier incarnation of "+g.VM+" is gone"); err != nil {
					return stepResult{}, unavailable("release "+g.Resource, err)
				}
				stale++
			}
		}
		if stale == 0 {
			return stepResult{}, fault
		}
	}
	return s.acquire(ctx, c, l.index, l.resource, l.mode, holder, true)
}

// releaseOrphanGrant gives back a grant whose holder can no longer write,
// as the scheduler.
func (s *Service) releaseOrphanGrant(ctx context.Context, g events.LeaseGrant, reason string) error {
	released, err := s.endGrant(ctx, schedulerActor, "release", g, func(events.LeaseGrant, events.HostState) events.Event {
		return events.LeaseReleased{Holder: g.ID, Epoch: g.Epoch, Reason: reason}
	})
	if released {
		s.metrics.scheduled.WithLabelValues("lease-released").Inc()
		s.log.Info("orphan lease released", "resource", g.Resource, "holder", g.ID, "epoch", g.Epoch, keyReason, reason)
	}
	return err
}

// The event indexes of a start's or resume's steps, besides the goal
// change (stepOnly): its new grants, then vm.placed naming them.
const startStepPlaced = createStepPlaced

// serveStart serves start and resume: a VM whose grants lapsed (broken by
// an operator, expired with its host) first takes new ones on its host and
// is placed again under them, so that its goal never says running without
// current leases; then its goal changes.
func (s *Service) serveStart(verb string) serveFunc {
	return func(ctx context.Context, req *request) *events.Reply {
		var cmd events.VMCommand
		c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
		if fault != nil {
			return failed(fault, nil)
		}
		// A retry takes the steps again (each is idempotent, and one cut
		// short is finished) and answers with everything the command did.
		recorded, _, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
		if err != nil {
			return failed(unavailable("read command result", err), nil)
		}
		steps, fault := s.renewLapsed(ctx, c, cmd.Name)
		if fault == nil {
			var res stepResult
			res, fault = appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMGoalChanged, func(vm *events.VMState) (events.Event, *events.Fault) {
				return decideGoal(*vm, cmd.Name, verb)
			})
			steps = append(steps, res)
		}
		fresh := false
		var appended []events.Appended
		for _, st := range steps {
			if st.appended != nil {
				appended = append(appended, *st.appended)
				fresh = fresh || !st.replayed
			}
		}
		all := merge(recorded, appended)
		return &events.Reply{Events: all, Error: fault, Replayed: !fresh && len(all) > 0}
	}
}

// renewLapsed gives a placed VM new grants on its host for those that
// lapsed, and places it again under them; it appends nothing when every
// grant stands, and refuses while one is being broken. Each read of a
// grant waits until the read model has the resource's last event, read
// through the leader.
func (s *Service) renewLapsed(ctx context.Context, c *command, name string) ([]stepResult, *events.Fault) {
	vm, _, err := s.cfg.Reader.VM(ctx, name)
	if err != nil {
		return nil, unavailable("read vm "+name, err)
	}
	if vm.Phase != events.PhasePlaced {
		return nil, nil // decideGoal answers for a VM that is not placed
	}
	lapsed := false
	for _, l := range vm.Leases {
		g, ok, err := s.grantStanding(ctx, l, vm.UID)
		if err != nil {
			return nil, unavailable("read lease "+l.Resource, err)
		}
		if ok && g.Breaking {
			return nil, events.Errorf(events.CodeLeaseHeld, "vm %s's %s lease on %s (epoch %d) is being broken by %s: it starts again once the break completes",
				vm.Name, l.Mode, l.Resource, l.Epoch, g.BreakingBy)
		}
		lapsed = lapsed || !ok
	}
	if !lapsed && len(vm.Leases) > 0 {
		return nil, nil
	}
	fault, err := check(ctx, s, s.hosts, vm.Host, func(h *hostView) *events.Fault {
		if h.state.Lost {
			return events.Errorf(events.CodeHostNotFound, "host %s was declared lost", vm.Host)
		}
		return nil
	})
	if err != nil {
		return nil, unavailable("read host "+vm.Host, err)
	}
	if fault != nil {
		// Left stopped on a host declared lost, its grants expired: it
		// starts elsewhere, as the scheduler moves a VM that was running.
		return s.moveToStart(ctx, c, vm)
	}
	p := placement{host: vm.Host}
	if a, ok := s.findAllocation(vm.Name, vm.UID, ""); ok && a.host == vm.Host {
		p.allocSeq = a.allocSeq
	}
	steps, epochs, fault := s.takeLeases(ctx, c, vm.Name, vm.Image, events.LeaseHolder{ID: vm.UID, VM: vm.Name, Host: vm.Host})
	p.leases = epochs
	if fault != nil {
		return steps, fault
	}
	res, fault := appendStep(ctx, s, s.vms, c, vm.Name, startStepPlaced, events.TypeVMPlaced, func(state *events.VMState) (events.Event, *events.Fault) {
		if state.UID != vm.UID || state.Phase != events.PhasePlaced || state.Host != vm.Host {
			return nil, events.Errorf(events.CodeConflict, "vm %s moved while its leases were taken again; retrying is safe", vm.Name)
		}
		return events.VMPlaced{UID: vm.UID, Host: vm.Host, AllocationSeq: p.allocSeq, Leases: p.leases, From: vm.Host, Reason: "leases-renewed"}, nil
	})
	if res.appended != nil {
		steps = append(steps, res)
	}
	return steps, fault
}

// moveToStart moves vm off its lost host to start it: a new allocation on
// another host, new grants there, and vm.placed naming the host it left.
func (s *Service) moveToStart(ctx context.Context, c *command, vm events.VMState) ([]stepResult, *events.Fault) {
	defer s.holds.release(vm.UID)
	p, allocated, fault := s.allocateExcept(ctx, c, vm.Name, vm.UID, capacity{vm.CPU, vm.MemoryMiB}, vm.Host)
	var steps []stepResult
	if allocated.appended != nil {
		steps = append(steps, allocated)
	}
	if fault != nil {
		return steps, fault
	}
	placed, leased, fault := s.placeLeasedFrom(ctx, c, vm.Name, vm.UID, vm.Image, p, vm.Host)
	steps = append(steps, leased...)
	if placed.appended != nil {
		steps = append(steps, placed)
	}
	return steps, fault
}

// grantStanding is uid's grant l, and whether it still stands, as the
// leader has the resource now.
func (s *Service) grantStanding(ctx context.Context, l events.LeaseEpoch, uid string) (events.LeaseGrant, bool, error) {
	r, err := events.ParseResource(l.Resource)
	if err != nil {
		return events.LeaseGrant{}, false, nil
	}
	if _, fault := s.catchUp(ctx, events.LeaseWildcard(r)); fault != nil {
		return events.LeaseGrant{}, false, fault
	}
	state, err := s.cfg.Reader.LeaseOf(ctx, l.Resource, uid)
	if err != nil {
		return events.LeaseGrant{}, false, err
	}
	g, ok := state.Grant(l.Mode, uid)
	return g, ok && !g.Void && g.Epoch == l.Epoch, nil
}
