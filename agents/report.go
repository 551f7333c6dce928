package agents

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// appendAttempts bounds how often one append is tried when NATS fails.
const appendAttempts = 3

// progressEvery is the least time between two progress reports of a VM.
const progressEvery = time.Second

// errConflict means someone else appended to a subject only this agent
// should write: most likely a second agent running for the same host.
var errConflict = errors.New("another writer on an agent-owned subject")

// observe publishes obs on the VM's observation subject, unless it repeats
// the last report (same incarnation, state and fault). Only the worker
// holding the VM calls it, so the VM's subject has one writer here.
func (a *Agent) observe(ctx context.Context, name string, obs events.VMObserved) error {
	a.mu.Lock()
	v := a.vmLocked(name)
	if sameReport(v.reported, obs) {
		v.acted = false
		a.mu.Unlock()
		return nil
	}
	head := v.head
	a.mu.Unlock()

	subject := events.ObservationSubject(a.cfg.Host, events.KindVM, name)
	next, err := a.appendChained(ctx, subject, events.KindVM, name, obs, head)
	if errors.Is(err, bus.ErrWrongLastSeq) {
		return a.rereadVM(ctx, name, subject, err)
	}
	if err != nil {
		return fmt.Errorf("report vm %s: %w", name, err)
	}
	a.mu.Lock()
	v.reported, v.head, v.acted = obs, next, false
	a.mu.Unlock()
	a.metrics.observations.WithLabelValues(string(events.TypeVMObserved)).Inc()
	a.log.Debug("observed", logVM, name, logIncarnation, obs.Incarnation, logState, obs.State,
		"fault", obs.Fault, "unrequested", obs.Unrequested, logSeq, next.Seq)
	return nil
}

// progress publishes p on the VM's observation subject, at most once per
// progressEvery. A failure is logged, never returned: progress is for people
// watching. After a progress report the next observation is always
// published, as it is after a restart that finds a progress report last.
func (a *Agent) progress(ctx context.Context, name string, p events.VMProgress) {
	a.mu.Lock()
	v := a.vmLocked(name)
	if !v.lastProgress.IsZero() && time.Since(v.lastProgress) < progressEvery {
		a.mu.Unlock()
		return
	}
	head := v.head
	a.mu.Unlock()

	subject := events.ObservationSubject(a.cfg.Host, events.KindVM, name)
	next, err := a.appendChained(ctx, subject, events.KindVM, name, p, head)
	if errors.Is(err, bus.ErrWrongLastSeq) {
		_ = a.rereadVM(ctx, name, subject, err) // logged there; the next observation retries
		return
	}
	if err != nil {
		if ctx.Err() == nil {
			a.log.Warn("report progress", logVM, name, logErr, err)
		}
		return
	}
	a.mu.Lock()
	v.head, v.lastProgress = next, time.Now()
	v.reported = events.VMObserved{UID: p.UID, Incarnation: p.Incarnation}
	a.mu.Unlock()
	a.metrics.observations.WithLabelValues(string(events.TypeVMProgress)).Inc()
}

// reportStep publishes the outcome of goal's checkpoint step on the VM's
// observation subject. The next observation is always published after it,
// as after a progress report.
func (a *Agent) reportStep(ctx context.Context, goal events.Goal, ev events.Event) error {
	drop := ev.EventType() == events.TypeVMCheckpointRemoved
	if f, ok := ev.(events.VMCheckpointFailed); ok && f.Op == events.CheckpointOpRemove {
		drop = true
	}
	a.mu.Lock()
	v := a.vmLocked(goal.VM)
	head := v.head
	a.mu.Unlock()

	subject := events.ObservationSubject(a.cfg.Host, events.KindVM, goal.VM)
	next, err := a.appendChained(ctx, subject, events.KindVM, goal.VM, ev, head)
	if errors.Is(err, bus.ErrWrongLastSeq) {
		return a.rereadVM(ctx, goal.VM, subject, err)
	}
	if err != nil {
		return fmt.Errorf("report %s of vm %s: %w", ev.EventType(), goal.VM, err)
	}
	a.mu.Lock()
	v.head = next
	if drop {
		v.dropReported = goal.Incarnation
	} else {
		v.stepReported = goal.Incarnation
	}
	v.reported = events.VMObserved{UID: goal.UID, Incarnation: goal.Incarnation}
	a.mu.Unlock()
	a.metrics.observations.WithLabelValues(string(ev.EventType())).Inc()
	return nil
}

// rereadVM learns what stands on a VM's subject after an append was
// rejected because someone else wrote it, and returns the conflict.
func (a *Agent) rereadVM(ctx context.Context, name, subject string, cause error) error {
	a.log.Error("observation subject written by someone else; is a second agent running for this host?",
		logSubject, subject, logErr, cause)
	a.metrics.conflicts.Inc()
	m, err := bus.LastOnSubject(ctx, a.cfg.Conn, events.StreamEvents, subject)
	if err != nil && !errors.Is(err, bus.ErrNoMessage) {
		return fmt.Errorf("report vm %s: %w; re-read: %w", name, errConflict, err)
	}
	a.mu.Lock()
	v := a.vmLocked(name)
	v.head, v.reported = events.Head{}, events.VMObserved{}
	if err == nil {
		v.head = events.Head{Seq: m.Seq, Hash: events.Hash(m.Data)}
		if a.mine(m, 0, false) {
			v.reported = reportOf(m)
		}
	}
	a.mu.Unlock()
	return fmt.Errorf("report vm %s: %w", name, errConflict)
}

// appendChained seals ev for aggregate (kind, id), chained to head, signs
// it with the host key if there is one, and appends it on subject
// expecting head.Seq. A failed publish is retried with the same bytes,
// signature and message id, so an append whose ack was lost is
// deduplicated rather than stored twice. It returns the subject's new head.
func (a *Agent) appendChained(ctx context.Context, subject string, kind events.Kind, id string, ev events.Event, head events.Head) (events.Head, error) {
	env, data, err := events.Seal(ev, kind, id, events.Origin{Actor: a.actor, Time: a.cfg.Now()}, 0, head.Hash)
	if err != nil {
		return head, err
	}
	msgID := a.id + ":" + subject + "@" + strconv.FormatUint(head.Seq, 10)
	msg := bus.EventMsg(subject, &env, data, msgID)
	hash := events.Hash(data)
	if key := a.cfg.HostKey; key != nil {
		msg.Header.Set(events.HeaderSigKey, key.Public())
		msg.Header.Set(events.HeaderSig, key.Sign(subject, head.Seq, hash))
	}
	for attempt := 1; ; attempt++ {
		ack, err := bus.AppendMsg(ctx, a.cfg.JS, msg, &env, bus.Expect{Seq: head.Seq})
		if err == nil {
			return events.Head{Seq: ack.Seq, Hash: hash}, nil
		}
		if errors.Is(err, bus.ErrWrongLastSeq) || ctx.Err() != nil || attempt == appendAttempts {
			return head, err
		}
		if !sleepCtx(ctx, a.backoff(attempt)) {
			return head, ctx.Err()
		}
	}
}

// sameReport tells whether two reports say the same: incarnation, state
// and fault. Whether a report was requested does not matter.
func sameReport(a, b events.VMObserved) bool {
	if a.UID != b.UID || a.Incarnation != b.Incarnation || a.State != b.State {
		return false
	}
	if a.Fault == nil || b.Fault == nil {
		return a.Fault == nil && b.Fault == nil
	}
	return a.Fault.Code == b.Fault.Code && a.Fault.Message == b.Fault.Message
}
