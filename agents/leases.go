package agents

import (
	"context"
	"errors"
	"fmt"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// Before the agent defines, starts or resumes a domain it checks that each
// grant its goal names is still current: that no later event on the
// resource revoked it. It reads through the stream leader, never a
// projection or a direct get that may lag, so that a grant revoked a
// moment ago is seen revoked. The rules follow the lease's subjects
// (events/lease.go):
//
//   - an exclusive grant at epoch e is current while e is the last event
//     on the resource's .x subject (a forced break marks it breaking there,
//     and a breaking grant starts nothing new);
//   - a shared grant at epoch s is current while s is the last event on its
//     holder's subject, and the last event on .x, if any, came before s and
//     ended an exclusive grant (an exclusive grant standing at s, or any
//     event on .x after s, means the shared grant is void or revoked).

// checkLeases returns a lease_not_current fault unless every grant goal
// names is current; an unavailable fault when the leader cannot be asked.
func (a *Agent) checkLeases(ctx context.Context, goal events.Goal) *events.Fault {
	if a.cfg.Unsafe.NoLeaseCheck {
		return nil
	}
	if len(goal.Leases) == 0 {
		return events.Errorf(events.CodeLeaseNotCurrent, "the goal of %s (incarnation %d) names no lease: a VM runs only under a current lease on its image", goal.VM, goal.Incarnation)
	}
	for _, l := range goal.Leases {
		if err := a.leaseCurrent(ctx, goal.UID, l); err != nil {
			var f *events.Fault
			if errors.As(err, &f) {
				return f
			}
			return events.Errorf(events.CodeUnavailable, "check lease %s: %v", l.Resource, err)
		}
	}
	return nil
}

// leaseCurrent checks one grant of holder.
func (a *Agent) leaseCurrent(ctx context.Context, holder string, l events.LeaseEpoch) error {
	r, err := events.ParseResource(l.Resource)
	if err != nil {
		return events.Errorf(events.CodeLeaseNotCurrent, "goal names lease %q: %v", l.Resource, err)
	}
	notCurrent := func(why string, args ...any) error {
		a.metrics.leaseRefusals.Inc()
		return events.Errorf(events.CodeLeaseNotCurrent, "%s grant on %s at epoch %d is not current: %s",
			l.Mode, l.Resource, l.Epoch, fmt.Sprintf(why, args...))
	}
	if w := a.lostWatermark.Load(); l.Epoch <= w {
		return notCurrent("this host was declared lost after it was granted (grants up to %d ended with the loss)", w)
	}
	x, err := lastOn(ctx, a, events.LeaseExclusiveSubject(r))
	if err != nil {
		return err
	}
	if l.Mode == events.LeaseExclusive {
		if x.Seq != l.Epoch {
			return notCurrent("the resource's last exclusive event is %s at %d", x.typ, x.Seq)
		}
		return nil
	}
	own, err := lastOn(ctx, a, events.LeaseSubject(r, events.LeaseShared, holder))
	if err != nil {
		return err
	}
	switch {
	case own.Seq != l.Epoch:
		return notCurrent("the holder's last event is %s at %d", own.typ, own.Seq)
	case x.Seq > l.Epoch:
		return notCurrent("an exclusive %s came after it, at %d", x.typ, x.Seq)
	case x.Seq != 0 && (x.typ == events.TypeLeaseGranted || x.typ == events.TypeLeaseBreaking):
		return notCurrent("an exclusive grant stood when it was made (%s at %d)", x.typ, x.Seq)
	}
	return nil
}

// lastEvent is the last event on a subject, as the leader has it.
type lastEvent struct {
	Seq uint64
	typ events.Type
}

func lastOn(ctx context.Context, a *Agent, subject string) (lastEvent, error) {
	m, err := bus.LastOnSubject(ctx, a.cfg.Conn, events.StreamEvents, subject)
	switch {
	case errors.Is(err, bus.ErrNoMessage):
		return lastEvent{}, nil
	case err != nil:
		return lastEvent{}, err
	}
	typ := events.Type(m.Header.Get(events.HeaderType))
	if typ == "" {
		return lastEvent{}, fmt.Errorf("event %d on %s has no %s header", m.Seq, subject, events.HeaderType)
	}
	return lastEvent{Seq: m.Seq, typ: typ}, nil
}
