package handlers

import (
	"context"

	"github.com/loomctl/loom/events"
)

// The event indexes of a vm.create. Each step's Nats-Msg-Id derives from
// (actor, command id, index), so whoever repeats a step (a retry of the
// command, or the scheduler completing it) derives the same id and the
// stream drops the repeat.
const (
	createStepCreated   = 0 // vm.created on the VM's subject
	createStepAllocated = 1 // host.allocated on the chosen host's subject
	createStepPlaced    = 2 // vm.placed on the VM's subject
	createStepWithdrawn = 3 // vm.deleted when no host had room after all
	createStepReleased  = 4 // host.released by the scheduler, for an allocation left behind
	createStepAddress   = 7 // net.address_bound on the VM's net, before vm.placed (5, 6: its leases)
)

// maxAdmissions bounds how often a create looks for another host after the
// one it was admitted to filled up under it.
const maxAdmissions = 3

// createRun is one handling of a vm.create.
type createRun struct {
	c    *command
	cmd  *events.CreateVM
	uid  string
	need capacity
	// recorded is what earlier handlings appended, from the Reader.
	recorded []events.Appended
	// appended is what this handling appended, or found appended.
	appended []events.Appended
	// fresh is true once this handling appended an event itself.
	fresh bool
	// vmHead is the VM subject's sequence after the last VM step.
	vmHead uint64
}

func (r *createRun) add(res stepResult) {
	if res.appended != nil {
		r.appended = append(r.appended, *res.appended)
		r.fresh = r.fresh || !res.replayed
	}
}

func (r *createRun) done(t events.Type) bool {
	_, ok := find(r.recorded, t)
	if !ok {
		_, ok = find(r.appended, t)
	}
	return ok
}

func (s *Service) serveCreate(ctx context.Context, req *request) *events.Reply {
	var cmd events.CreateVM
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.create(ctx, c, &cmd)
}

// create runs vm.create as a chain of single-subject steps: vm.created,
// host.allocated, vm.placed. A command that already took effect gets its
// original result; one cut short is carried on from where it stopped.
func (s *Service) create(ctx context.Context, c *command, cmd *events.CreateVM) *events.Reply {
	recorded, fault := s.recordedCreate(ctx, c, cmd.Name)
	if fault != nil {
		return failed(fault, nil)
	}
	if _, ok := find(recorded, events.TypeVMPlaced); ok {
		return &events.Reply{Events: recorded, Replayed: true}
	}
	if _, ok := find(recorded, events.TypeVMDeleted); ok {
		return &events.Reply{Events: recorded, Replayed: true, Error: noCapacity(cmd.Name, capacity{cmd.CPU, cmd.MemoryMiB})}
	}
	r := &createRun{c: c, cmd: cmd, uid: events.DeriveUID(c.actor, c.id), need: capacity{cmd.CPU, cmd.MemoryMiB}, recorded: recorded}
	fault = s.runCreate(ctx, r)
	if fault != nil {
		if len(r.recorded)+len(r.appended) > 0 {
			s.Nudge() // a step may be left undone, or an allocation orphaned: let the scheduler look
		}
		return failed(fault, merge(r.recorded, r.appended))
	}
	return s.createReply(ctx, r)
}

// recordedCreate is what earlier handlings of the create appended, as the
// Reader knows it. A partial result (created, then neither placed nor
// withdrawn) may only mean the Reader lags the command's last steps: it is
// read again once the Reader has caught up with the VM's subject, read
// through the stream leader, so that a retry of a withdrawn create gets
// its original answer rather than a guess from a stale read.
func (s *Service) recordedCreate(ctx context.Context, c *command, vm string) ([]events.Appended, *events.Fault) {
	recorded, _, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return nil, unavailable("read command result", err)
	}
	_, created := find(recorded, events.TypeVMCreated)
	_, placed := find(recorded, events.TypeVMPlaced)
	_, withdrawn := find(recorded, events.TypeVMDeleted)
	if !created || placed || withdrawn {
		return recorded, nil
	}
	if _, fault := s.catchUp(ctx, events.EventSubject(events.KindVM, vm)); fault != nil {
		return nil, fault
	}
	if recorded, _, err = s.cfg.Reader.CommandResult(ctx, c.actor, c.id); err != nil {
		return nil, unavailable("read command result", err)
	}
	return recorded, nil
}

// runCreate takes the steps of r that are not done yet. Before the first
// one the create is admitted, so that a create that fits nowhere appends
// nothing; if the room is gone by the allocation, the VM is withdrawn.
func (s *Service) runCreate(ctx context.Context, r *createRun) *events.Fault {
	defer s.holds.release(r.uid)
	if !r.done(events.TypeVMCreated) {
		if fault := s.precheck(ctx, r); fault != nil {
			return fault
		}
		if _, fault := s.admit(ctx, r.cmd.Name, r.uid, r.need); fault != nil {
			return fault
		}
		res, fault := appendStep(ctx, s, s.vms, r.c, r.cmd.Name, createStepCreated, events.TypeVMCreated, func(vm *events.VMState) (events.Event, *events.Fault) {
			return decideCreate(*vm, r.cmd, r.c.origin)
		})
		r.add(res)
		if fault != nil {
			return fault
		}
	}
	if fault := s.liveIncarnation(ctx, r); fault != nil {
		return fault
	}
	p, ok := r.allocation()
	if !ok {
		var res stepResult
		var fault *events.Fault
		p, res, fault = s.allocate(ctx, r.c, r.cmd.Name, r.uid, r.need)
		r.add(res)
		if fault != nil && fault.Code == events.CodeNoCapacity {
			return s.withdraw(ctx, r, ReasonNoCapacity, fault)
		}
		if fault != nil {
			return fault
		}
	}
	res, leased, fault := s.placeLeased(ctx, r.c, r.cmd.Name, r.uid, r.cmd.Image, p)
	for _, l := range leased {
		r.add(l)
	}
	if fault != nil && fault.Code == events.CodeLeaseHeld {
		return s.withdraw(ctx, r, ReasonLeaseHeld, fault)
	}
	r.add(res)
	r.vmHead = res.head.Seq
	return fault
}

// liveIncarnation checks that the VM the command created was not deleted
// meanwhile, and takes its size from it: a retry allocates what was
// created, whatever it asks for now.
func (s *Service) liveIncarnation(ctx context.Context, r *createRun) *events.Fault {
	fault, err := check(ctx, s, s.vms, r.cmd.Name, func(vm *events.VMState) *events.Fault {
		if vm.UID != r.uid || vm.Phase == events.PhaseDeleting || vm.Phase == events.PhaseGone {
			return events.Errorf(events.CodeVMNotFound, "vm %s was deleted before it could be placed", r.cmd.Name)
		}
		r.need = capacity{vm.CPU, vm.MemoryMiB}
		return nil
	})
	if err != nil {
		return unavailable("read vm "+r.cmd.Name, err)
	}
	return fault
}

// allocation is where an earlier step of this command allocated the VM.
func (r *createRun) allocation() (placement, bool) {
	a, ok := find(r.appended, events.TypeHostAllocated)
	if !ok {
		a, ok = find(r.recorded, events.TypeHostAllocated)
	}
	if !ok {
		return placement{}, false
	}
	return placement{host: aggregateOf(a), allocSeq: a.Seq}, true
}

// aggregateOf names the aggregate an appended event belongs to.
func aggregateOf(a events.Appended) string {
	addr, err := events.ParseEventSubject(a.Subject)
	if err != nil {
		return ""
	}
	return addr.ID
}

// precheck refuses a create whose name is taken or whose image is not
// registered, before anything is set aside or appended.
func (s *Service) precheck(ctx context.Context, r *createRun) *events.Fault {
	fault, err := check(ctx, s, s.vms, r.cmd.Name, func(vm *events.VMState) *events.Fault {
		_, fault := decideCreate(*vm, r.cmd, r.c.origin)
		return fault
	})
	if err != nil {
		return unavailable("read vm "+r.cmd.Name, err)
	}
	if fault != nil {
		return fault
	}
	fault, err = check(ctx, s, s.images, r.cmd.Image, func(img *events.ImageState) *events.Fault {
		if !img.Registered {
			return events.Errorf(events.CodeImageNotFound, "no image %s is registered", r.cmd.Image)
		}
		return nil
	})
	if err != nil {
		return unavailable("read image "+r.cmd.Image, err)
	}
	if fault != nil || r.cmd.Net == "" {
		return fault
	}
	fault, err = check(ctx, s, s.nets, r.cmd.Net, func(n *events.NetState) *events.Fault {
		if !n.Created {
			return events.Errorf(events.CodeNetNotFound, "no net %s", r.cmd.Net)
		}
		if _, free := n.FreeAddr(); !free {
			return events.Errorf(events.CodeNetFull, "net %s (%s) has no free address", r.cmd.Net, n.CIDR)
		}
		return nil
	})
	if err != nil {
		return unavailable("read net "+r.cmd.Net, err)
	}
	return fault
}

// allocate makes sure the VM incarnation uid holds an allocation: one a
// host already holds for it, or a new one on the host admission picks. If
// that host fills up first (another writer took the room), the VM is
// admitted again, elsewhere.
func (s *Service) allocate(ctx context.Context, c *command, vm, uid string, need capacity) (placement, stepResult, *events.Fault) {
	return s.allocateExcept(ctx, c, vm, uid, need, "")
}

// allocateExcept is allocate, ignoring an allocation on host except (the
// host a VM is moved off).
func (s *Service) allocateExcept(ctx context.Context, c *command, vm, uid string, need capacity, except string) (placement, stepResult, *events.Fault) {
	if p, ok := s.findAllocation(vm, uid, except); ok {
		return p, stepResult{}, nil
	}
	for range maxAdmissions {
		host, fault := s.admit(ctx, vm, uid, need)
		if fault != nil {
			return placement{}, stepResult{}, fault
		}
		others := s.holds.on(host, uid)
		var existing placement
		res, fault := appendStep(ctx, s, s.hosts, c, host, createStepAllocated, events.TypeHostAllocated, func(h *hostView) (events.Event, *events.Fault) {
			if a, ok := h.state.Allocations[vm]; ok && a.UID == uid {
				existing = placement{host: host, allocSeq: a.Seq}
			}
			return decideAllocate(h, reserved(&h.state, others), allocation{vm: vm, uid: uid, need: need})
		})
		switch {
		case fault != nil && fault.Code == events.CodeNoCapacity:
			s.holds.release(uid)
			continue
		case fault != nil:
			return placement{}, res, fault
		case res.appended != nil:
			return placement{host: aggregateOf(*res.appended), allocSeq: res.appended.Seq}, res, nil
		}
		return existing, res, nil
	}
	return placement{}, stepResult{}, noCapacity(vm, need)
}

// place binds the pending incarnation uid to its allocation.
func (s *Service) place(ctx context.Context, c *command, vm, uid string, p placement) (stepResult, *events.Fault) {
	return appendStep(ctx, s, s.vms, c, vm, createStepPlaced, events.TypeVMPlaced, func(state *events.VMState) (events.Event, *events.Fault) {
		return decidePlace(*state, uid, p)
	})
}

// withdraw deletes a created VM that found no room after all, and answers
// with cause; unless another handling (a scheduler elsewhere) placed it
// meanwhile, in which case the create took effect after all.
func (s *Service) withdraw(ctx context.Context, r *createRun, reason string, cause *events.Fault) *events.Fault {
	var placed bool
	res, fault := appendStep(ctx, s, s.vms, r.c, r.cmd.Name, createStepWithdrawn, events.TypeVMDeleted, func(vm *events.VMState) (events.Event, *events.Fault) {
		placed = vm.UID == r.uid && vm.Phase == events.PhasePlaced
		return decideWithdraw(*vm, r.uid, reason), nil
	})
	r.add(res)
	r.vmHead = res.head.Seq
	switch {
	case fault != nil:
		return fault
	case placed:
		return nil
	}
	return cause
}

// createReply reports every event of the command. When a step found its
// work done by another handling of the same command (a retry racing the
// original), that handling's events come from the Reader once it has
// caught up with the VM.
func (s *Service) createReply(ctx context.Context, r *createRun) *events.Reply {
	all := merge(r.recorded, r.appended)
	_, created := find(all, events.TypeVMCreated)
	_, allocated := find(all, events.TypeHostAllocated)
	_, placed := find(all, events.TypeVMPlaced)
	if !created || !allocated || !placed {
		if err := s.cfg.Reader.WaitFor(ctx, r.vmHead); err == nil {
			if result, _, err := s.cfg.Reader.CommandResult(ctx, r.c.actor, r.c.id); err == nil {
				all = merge(all, result)
			}
		}
	}
	return &events.Reply{Events: all, Replayed: !r.fresh && len(all) > 0}
}
