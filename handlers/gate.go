package handlers

import (
	"context"
	"fmt"

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
// places it there under their epochs. leased are the lease events, found
// or appended.
func (s *Service) placeLeased(ctx context.Context, c *command, vm, uid, image string, p placement) (placed stepResult, leased []events.Appended, fault *events.Fault) {
	return s.placeLeasedFrom(ctx, c, vm, uid, image, p, "")
}

// placeLeasedFrom is placeLeased for a VM placed on host from, which it
// moves off (from empty: a pending VM's first placement).
func (s *Service) placeLeasedFrom(ctx context.Context, c *command, vm, uid, image string, p placement, from string) (placed stepResult, leased []events.Appended, fault *events.Fault) {
	holder := events.LeaseHolder{ID: uid, VM: vm, Host: p.host}
	for _, l := range vmLeases(vm, image) {
		a, fault := s.acquireForVM(ctx, c, l, holder)
		if a != nil {
			leased = append(leased, *a)
		}
		if fault != nil {
			return stepResult{}, leased, fault
		}
		p.leases = append(p.leases, events.LeaseEpoch{Resource: l.resource.String(), Mode: l.mode, Epoch: a.Seq})
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

// acquireForVM takes one of a VM's leases. A grant that stands in the way
// but belongs to an earlier incarnation of the same VM name is given back
// first: that incarnation is gone (its name could not be taken again
// otherwise), so it can no longer write.
func (s *Service) acquireForVM(ctx context.Context, c *command, l vmLease, holder events.LeaseHolder) (*events.Appended, *events.Fault) {
	for range 2 {
		a, fault := s.acquire(ctx, c, l.index, l.resource, l.mode, holder, true)
		if fault == nil || fault.Code != events.CodeLeaseHeld {
			return a, fault
		}
		state, err := s.cfg.Reader.Lease(ctx, l.resource.String())
		if err != nil {
			return nil, unavailable("read lease "+l.resource.String(), err)
		}
		stale := 0
		for _, g := range standingGrants(&state) {
			if g.VM == holder.VM && g.ID != holder.ID {
				if err := s.releaseOrphanGrant(ctx, g, "an earlier incarnation of "+g.VM+" is gone"); err != nil {
					return nil, unavailable("release "+g.Resource, err)
				}
				stale++
			}
		}
		if stale == 0 {
			return nil, fault
		}
	}
	return s.acquire(ctx, c, l.index, l.resource, l.mode, holder, true)
}

// standingGrants lists a lease's grants that are not void.
func standingGrants(l *events.LeaseState) []events.LeaseGrant {
	var out []events.LeaseGrant
	if l.Exclusive.Epoch != 0 {
		out = append(out, l.Exclusive)
	}
	for _, h := range sortedKeys(l.Shared) {
		if g := l.Shared[h]; !g.Void {
			out = append(out, g)
		}
	}
	return out
}

// releaseOrphanGrant gives back a grant whose holder can no longer write,
// as the scheduler: its command id derives from the grant, so replicas
// doing the same never append twice.
func (s *Service) releaseOrphanGrant(ctx context.Context, g events.LeaseGrant, reason string) error {
	r, err := events.ParseResource(g.Resource)
	if err != nil {
		return err
	}
	c := newCommand(schedulerActor, fmt.Sprintf("release-%s-%d", g.Resource, g.Epoch), "", events.Origin{Time: s.cfg.Now()})
	a, fault := s.endLease(ctx, c, r, g.ID, func(cur events.LeaseGrant, _ events.HostState) (events.Event, *events.Fault) {
		if cur.Epoch != g.Epoch {
			return nil, nil // another grant of the holder's: not this orphan
		}
		return events.LeaseReleased{Holder: g.ID, Epoch: g.Epoch, Reason: reason}, nil
	})
	if fault != nil && fault.Code != events.CodeLeaseNotFound {
		return fault
	}
	if a != nil {
		s.metrics.scheduled.WithLabelValues("lease-released").Inc()
		s.log.Info("orphan lease released", "resource", g.Resource, "holder", g.ID, "epoch", g.Epoch, keyReason, reason)
	}
	return nil
}
