package handlers

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// Leases. A resource's lease lives on several subjects (events/lease.go):
// an exclusive grant appends on .x expecting the last sequence of the
// whole resource, read through the leader; a shared grant appends on its
// holder's own subject expecting that subject's head, and then asks the
// leader whether an exclusive grant reached .x since the state it decided
// on. If one did, the fold is the judge: the shared grant may be void, and
// the command then answers lease_held. Releases, breaks and expiries
// append on the grant's own subject, expecting its head.
//
// A lease command is one event, so it needs no process manager: a retry
// finds its event through the stream's duplicate window or the command
// results, like any step.

// leaseStep is the index of a lease command's one event.
const leaseStep = 0

func (s *Service) serveAcquire(ctx context.Context, req *request) *events.Reply {
	var cmd events.AcquireLease
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	r, _ := events.ParseResource(cmd.Resource) // Validate parsed it
	res, fault := s.acquire(ctx, c, leaseStep, r, cmd.Mode, cmd.LeaseHolder, false)
	return leaseReply(res.appended, fault)
}

func (s *Service) serveRelease(ctx context.Context, req *request) *events.Reply {
	var cmd events.ReleaseLease
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	r, _ := events.ParseResource(cmd.Resource)
	appended, fault := s.endLease(ctx, c, r, cmd.Holder, func(g events.LeaseGrant, _ events.HostState) (events.Event, *events.Fault) {
		if cmd.Epoch != 0 && cmd.Epoch != g.Epoch {
			return nil, events.Errorf(events.CodeLeaseNotFound, "%s holds %s under epoch %d, not %d", cmd.Holder, r, g.Epoch, cmd.Epoch)
		}
		if fault := s.vmStillHolds(ctx, g); fault != nil {
			return nil, fault
		}
		return events.LeaseReleased{Holder: g.ID, Epoch: g.Epoch, Reason: cmd.Reason}, nil
	})
	return leaseReply(appended, fault)
}

// vmStillHolds refuses to release a VM's grant for a client while the VM
// exists: its domain may be writing, and the grant passes on only once it
// cannot. Loom gives it back itself when the VM is gone; an operator takes
// it from a running VM with a forced break.
func (s *Service) vmStillHolds(ctx context.Context, g events.LeaseGrant) *events.Fault {
	if g.VM == "" {
		return nil
	}
	fault, err := check(ctx, s, s.vms, g.VM, func(vm *events.VMState) *events.Fault {
		if vm.UID != g.ID || !vm.Exists() {
			return nil
		}
		return events.Errorf(events.CodeLeaseLive, "%s's %s grant on %s (epoch %d) belongs to VM %s, which may still be writing: it is given back once the VM is deleted and gone; to take it from a running VM, break it with force",
			g.ID, g.Mode, g.Resource, g.Epoch, g.VM)
	})
	if err != nil {
		return unavailable("read vm "+g.VM, err)
	}
	return fault
}

func (s *Service) serveBreak(ctx context.Context, req *request) *events.Reply {
	var cmd events.BreakLease
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	r, _ := events.ParseResource(cmd.Resource)
	appended, fault := s.endLease(ctx, c, r, cmd.Holder, func(g events.LeaseGrant, host events.HostState) (events.Event, *events.Fault) {
		return decideBreak(g, host, cmd.Force, cmd.Reason)
	})
	return leaseReply(appended, fault)
}

// decideBreak breaks a grant whose holder can no longer write (its host
// was declared lost) at once; a live one only with force, and then only
// marks it breaking.
func decideBreak(g events.LeaseGrant, host events.HostState, force bool, reason string) (events.Event, *events.Fault) {
	switch {
	case host.Lost:
		if reason == "" {
			reason = "host " + g.Host + " was declared lost"
		}
		return events.LeaseBroken{Holder: g.ID, Epoch: g.Epoch, Reason: reason}, nil
	case g.Breaking:
		return nil, nil // already marked: the break waits for the holder
	case !force:
		return nil, events.Errorf(events.CodeLeaseLive,
			"%s's %s grant on %s (epoch %d) is live: its host %s is not declared lost; break it with force to mark it breaking until the holder stops",
			g.ID, g.Mode, g.Resource, g.Epoch, g.Host)
	}
	return events.LeaseBreaking{Holder: g.ID, Epoch: g.Epoch, Reason: reason}, nil
}

func leaseReply(appended *events.Appended, fault *events.Fault) *events.Reply {
	var evs []events.Appended
	if appended != nil {
		evs = []events.Appended{*appended}
	}
	return &events.Reply{Events: evs, Error: fault}
}

// acquire grants holder a lease on r in mode, as the index-th event of
// command c, or answers with the grant it already holds. internal is set
// by a VM's own create, which may make a disk resource by taking its first
// grant.
func (s *Service) acquire(ctx context.Context, c *command, index int, r events.Resource, mode events.LeaseMode, holder events.LeaseHolder, internal bool) (stepResult, *events.Fault) {
	if s.stepHook != nil {
		if err := s.stepHook(c, index); err != nil {
			return stepResult{}, events.Errorf(events.CodeInternal, "lease %s step %d: %v", r, index, err)
		}
	}
	if fault := s.checkLeaseHolder(ctx, holder); fault != nil {
		return stepResult{}, fault
	}
	subject := events.LeaseSubject(r, mode, holder.ID)
	if recorded, fault := s.leaseRecorded(ctx, c, subject); fault != nil || recorded != nil {
		if fault == nil && mode == events.LeaseShared {
			fault = s.voidFault(ctx, r, holder.ID, recorded.Seq)
		}
		return found(recorded, fault)
	}
	for attempt := 1; ; attempt++ {
		expect, head, state, fault := s.acquireView(ctx, r, mode, holder.ID)
		if fault != nil {
			return stepResult{}, fault
		}
		if g, ok := state.Grant(mode, holder.ID); ok && !g.Void && g.Host == holder.Host {
			// Held already: by an earlier attempt of this command, or by
			// another command of the same holder. Either way it holds, if
			// the read is not stale: an exclusive view waited for the
			// resource's last event; a shared one asks the leader whether
			// the grant is still its subject's last.
			if mode == events.LeaseExclusive {
				return found(s.recorded(ctx, c, g.Epoch))
			}
			last, err := lastOn(ctx, s, subject)
			if err != nil {
				return stepResult{}, unavailable("read last of "+subject, err)
			}
			if last == g.Epoch {
				return found(s.recorded(ctx, c, g.Epoch))
			}
			if err := s.cfg.Reader.WaitFor(ctx, last); err != nil {
				return stepResult{}, lagging(last, err)
			}
			continue
		}
		if fault := s.checkResource(ctx, r, &state, internal); fault != nil {
			return stepResult{}, fault
		}
		if fault := grantable(&state, mode, holder.ID); fault != nil {
			if ok, err := s.leaseCurrent(ctx, r, state.Last); err != nil || !ok {
				if err != nil {
					return stepResult{}, unavailable("read lease "+r.String(), err)
				}
				continue // the refusal was decided on a lagging read: decide again
			}
			return stepResult{}, fault
		}
		ev := events.LeaseGranted{Mode: mode, LeaseHolder: holder}
		appended, fresh, retry, fault := s.appendLease(ctx, c, index, r, subject, ev, head, expect)
		if fault != nil || !retry {
			if fault == nil && mode == events.LeaseShared {
				fault = s.checkNotVoid(ctx, r, holder.ID, appended.Seq, state)
			}
			return stepResult{appended: appended, replayed: !fresh}, fault
		}
		if attempt >= s.cfg.MaxAttempts {
			return stepResult{}, events.Errorf(events.CodeConflict,
				"%s kept changing: %d attempts lost to other writers; the command did not take effect, retrying is safe", r, attempt)
		}
		if err := backoff(ctx, attempt); err != nil {
			return stepResult{}, unavailable("retry "+subject, err)
		}
	}
}

// found is the result of a step whose event an earlier handling (or
// another command of the same holder) appended.
func found(a *events.Appended, f *events.Fault) (stepResult, *events.Fault) {
	return stepResult{appended: a, replayed: a != nil}, f
}

// acquireView is what a grant decides on: the lease's state, the head of
// the subject it appends on, and the check its append makes. An exclusive
// grant reads the whole resource's last sequence through the leader and
// waits until the read model has applied it, so that it decides on every
// grant that its append's check will count.
func (s *Service) acquireView(ctx context.Context, r events.Resource, mode events.LeaseMode, holder string) (bus.Expect, events.Head, events.LeaseState, *events.Fault) {
	subject := events.LeaseSubject(r, mode, holder)
	var expect bus.Expect
	if mode == events.LeaseExclusive {
		last, fault := s.catchUp(ctx, events.LeaseWildcard(r))
		if fault != nil {
			return expect, events.Head{}, events.LeaseState{}, fault
		}
		expect = bus.Expect{Subject: events.LeaseWildcard(r), Seq: last}
	}
	// The head before the state, as in endLease. A shared grant looks only
	// at the exclusive grant and its own; an exclusive one at every grant.
	head, err := s.cfg.Reader.Head(ctx, subject)
	if err != nil {
		return expect, head, events.LeaseState{}, unavailable("read head of "+subject, err)
	}
	var state events.LeaseState
	if mode == events.LeaseShared {
		state, err = s.cfg.Reader.LeaseOf(ctx, r.String(), holder)
	} else {
		state, err = s.cfg.Reader.Lease(ctx, r.String())
	}
	if err != nil {
		return expect, head, state, unavailable("read lease "+r.String(), err)
	}
	if mode == events.LeaseShared || s.cfg.Unsafe.NarrowExclusiveCheck {
		expect = bus.Expect{Seq: head.Seq}
	}
	return expect, head, state, nil
}

// grantable refuses a grant that a standing one excludes.
func grantable(state *events.LeaseState, mode events.LeaseMode, holder string) *events.Fault {
	var in []string
	for _, g := range state.Holding() {
		if mode == events.LeaseExclusive || g.Mode == events.LeaseExclusive {
			in = append(in, describeGrant(g))
		}
	}
	if len(in) == 0 {
		return nil
	}
	const show = 5
	more := ""
	if len(in) > show {
		in, more = in[:show], fmt.Sprintf(" and %d more", len(in)-show)
	}
	return events.Errorf(events.CodeLeaseHeld, "%s cannot have a %s lease on %s: held by %s%s",
		holder, mode, state.Resource, strings.Join(in, ", "), more)
}

func describeGrant(g events.LeaseGrant) string {
	who := g.ID
	if g.VM != "" {
		who = "VM " + g.VM + " (" + g.ID + ")"
	}
	d := fmt.Sprintf("%s on host %s, %s, epoch %d", who, g.Host, g.Mode, g.Epoch)
	if g.Breaking {
		d += ", breaking"
	}
	return d
}

// checkLeaseHolder refuses a holder on a host that is not registered or
// was declared lost: its grant could never be expired, or is expired
// already.
func (s *Service) checkLeaseHolder(ctx context.Context, holder events.LeaseHolder) *events.Fault {
	if holder.Host == "" {
		return events.Errorf(events.CodeInvalidArgument, "holder %s names no host: a lease is held by something running on a host, whose loss expires it", holder.ID)
	}
	fault, err := check(ctx, s, s.hosts, holder.Host, func(h *hostView) *events.Fault {
		switch {
		case !h.state.Registered:
			return events.Errorf(events.CodeHostNotFound, "no host registered as %q", holder.Host)
		case h.state.Lost:
			return events.Errorf(events.CodeInvalidArgument, "host %s was declared lost: nothing on it may take a lease until it rejoins", holder.Host)
		}
		return nil
	})
	if err != nil {
		return unavailable("read host "+holder.Host, err)
	}
	return fault
}

// checkResource refuses a lease on what does not exist: an image that is
// not registered, or a disk no VM ever took (unless this is a VM's own
// create, which makes its disk).
func (s *Service) checkResource(ctx context.Context, r events.Resource, state *events.LeaseState, internal bool) *events.Fault {
	switch r.Kind {
	case events.ResourceImage:
		fault, err := check(ctx, s, s.images, r.Name, func(img *events.ImageState) *events.Fault {
			if !img.Registered {
				return events.Errorf(events.CodeResourceNotFound, "no image registered as %q", r.Name)
			}
			return nil
		})
		if err != nil {
			return unavailable("read image "+r.Name, err)
		}
		return fault
	case events.ResourceDisk:
		if state.Grants == 0 && !internal {
			return events.Errorf(events.CodeResourceNotFound, "no disk %q: a disk exists once a VM was created with it", r.Name)
		}
	}
	return nil
}

// leaseCurrent tells whether the read model's lease state, whose last
// event is last, is the resource's newest, read through the leader; if it
// is not, it waits until the read model has caught up.
func (s *Service) leaseCurrent(ctx context.Context, r events.Resource, last uint64) (bool, error) {
	newest, err := lastOn(ctx, s, events.LeaseWildcard(r))
	if err != nil || newest <= last {
		return err == nil, err
	}
	if err := s.cfg.Reader.WaitFor(ctx, newest); err != nil {
		return false, lagging(newest, err)
	}
	return false, nil
}

// checkNotVoid makes sure a shared grant at seq is not void: that no
// exclusive grant reached the resource's .x subject between the state the
// grant was decided on and the grant itself. When one may have, the read
// model's fold of the grant is the answer.
func (s *Service) checkNotVoid(ctx context.Context, r events.Resource, holder string, seq uint64, decidedOn events.LeaseState) *events.Fault {
	xHead, err := s.cfg.Reader.Head(ctx, events.LeaseExclusiveSubject(r))
	if err != nil {
		return unavailable("read head of "+events.LeaseExclusiveSubject(r), err)
	}
	if decidedOn.Last < xHead.Seq {
		xHead.Seq = decidedOn.Last // decide from the older of the two: the check only gets stricter
	}
	next, err := bus.NextOnSubject(ctx, s.cfg.Conn, events.StreamEvents, events.LeaseExclusiveSubject(r), xHead.Seq+1)
	switch {
	case errors.Is(err, bus.ErrNoMessage) || (err == nil && next.Seq > seq):
		return nil // nothing reached .x before the grant
	case err != nil:
		return unavailable("read "+events.LeaseExclusiveSubject(r), err)
	}
	return s.voidFault(ctx, r, holder, seq)
}

// voidFault answers lease_held if the read model folded holder's shared
// grant at seq as void.
func (s *Service) voidFault(ctx context.Context, r events.Resource, holder string, seq uint64) *events.Fault {
	if err := s.cfg.Reader.WaitFor(ctx, seq); err != nil {
		return lagging(seq, err)
	}
	state, err := s.cfg.Reader.LeaseOf(ctx, r.String(), holder)
	if err != nil {
		return unavailable("read lease "+r.String(), err)
	}
	if g, ok := state.Shared[holder]; ok && g.Epoch == seq && g.Void {
		s.metrics.voidGrants.Inc()
		return events.Errorf(events.CodeLeaseHeld, "%s cannot have a shared lease on %s: an exclusive grant (%s) landed first; the grant at %d is void",
			holder, r, describeGrant(state.Exclusive), seq)
	}
	return nil
}

// endLease ends holder's standing grant on r with the event decide makes
// of it (nil: nothing to append), on the grant's own subject.
func (s *Service) endLease(ctx context.Context, c *command, r events.Resource, holder string, decide func(events.LeaseGrant, events.HostState) (events.Event, *events.Fault)) (*events.Appended, *events.Fault) {
	for attempt := 1; ; attempt++ {
		if recorded, fault := s.leaseRecorded(ctx, c, ""); fault != nil || recorded != nil {
			return recorded, fault
		}
		// The heads are read before the state: the state is then at least
		// as new as the head the append expects, so a state newer than
		// that head makes the append fail and the step is decided again;
		// the other order could append on a head newer than the state
		// decided on.
		heads := map[events.LeaseMode]events.Head{}
		for _, m := range []events.LeaseMode{events.LeaseExclusive, events.LeaseShared} {
			subject := events.LeaseSubject(r, m, holder)
			h, err := s.cfg.Reader.Head(ctx, subject)
			if err != nil {
				return nil, unavailable("read head of "+subject, err)
			}
			heads[m] = h
		}
		state, err := s.cfg.Reader.LeaseOf(ctx, r.String(), holder)
		if err != nil {
			return nil, unavailable("read lease "+r.String(), err)
		}
		// A void shared grant was never held: there is nothing to end.
		mode := events.LeaseShared
		g, ok := state.Grant(mode, holder)
		ok = ok && !g.Void
		if !ok {
			mode = events.LeaseExclusive
			g, ok = state.Grant(mode, holder)
		}
		var ev events.Event
		var fault *events.Fault
		if !ok {
			fault = events.Errorf(events.CodeLeaseNotFound, "%s holds no lease on %s", holder, r)
		} else {
			host, _, err := s.cfg.Reader.Host(ctx, g.Host)
			if err != nil {
				return nil, unavailable("read host "+g.Host, err)
			}
			ev, fault = decide(g, host)
		}
		if fault != nil || ev == nil {
			if ok, err := s.leaseCurrent(ctx, r, state.Last); err != nil {
				return nil, unavailable("read lease "+r.String(), err)
			} else if !ok && attempt < s.cfg.MaxAttempts {
				continue
			}
			return nil, fault
		}
		subject, head := events.LeaseSubject(r, mode, holder), heads[mode]
		appended, _, retry, fault := s.appendLease(ctx, c, leaseStep, r, subject, ev, head, bus.Expect{Seq: head.Seq})
		if fault != nil || !retry {
			return appended, fault
		}
		if attempt >= s.cfg.MaxAttempts {
			return nil, events.Errorf(events.CodeConflict,
				"%s kept changing: %d attempts lost to other writers; the command did not take effect, retrying is safe", subject, attempt)
		}
		if err := backoff(ctx, attempt); err != nil {
			return nil, unavailable("retry "+subject, err)
		}
	}
}

// leaseRecorded is the lease event an earlier handling of command c
// appended on subject (any lease subject if empty), if the read model
// knows of one.
func (s *Service) leaseRecorded(ctx context.Context, c *command, subject string) (*events.Appended, *events.Fault) {
	result, _, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return nil, unavailable("read command result", err)
	}
	for _, a := range result {
		if a.Subject == subject || subject == "" && strings.HasPrefix(a.Subject, "loom.evt.lease.") {
			return &a, nil
		}
	}
	return nil, nil
}

// appendLease seals ev as the lease command's event and appends it on
// subject after head, with expect's check. retry says the check failed and
// the command must be decided again; a command that already appended its
// event (a retry) gets that event.
func (s *Service) appendLease(ctx context.Context, c *command, index int, r events.Resource, subject string, ev events.Event, head events.Head, expect bus.Expect) (appended *events.Appended, fresh, retry bool, fault *events.Fault) {
	env, data, err := events.Seal(ev, events.KindLease, r.String(), c.origin, index, head.Hash)
	if err != nil {
		return nil, false, false, events.Errorf(events.CodeInternal, "%v", err)
	}
	ack, err := bus.AppendExpecting(ctx, s.publisher, subject, &env, data, expect, events.MsgID(c.actor, c.id, index))
	switch {
	case err == nil && !ack.Duplicate:
		return &events.Appended{Seq: ack.Seq, Subject: subject, Type: env.Type, ID: env.ID}, true, false, nil
	case err == nil:
		s.metrics.repeats.Inc()
		appended, fault := s.recorded(ctx, c, ack.Seq)
		return appended, false, false, fault
	case errors.Is(err, bus.ErrWrongLastSeq):
		s.metrics.conflicts.WithLabelValues(string(events.KindLease)).Inc()
		appended, fault := s.afterConflict(ctx, c, subject, env.Type)
		if fault != nil || appended != nil {
			return appended, false, false, fault
		}
		return nil, false, true, nil
	case errors.Is(err, bus.ErrTryAgain):
		return nil, false, true, nil
	}
	return nil, false, false, unavailable("append to "+subject, err)
}
