package handlers

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// stepResult is what one step of a command did.
type stepResult struct {
	// appended is the step's event: appended now, or found appended by an
	// earlier attempt of the same command. Nil when the step changed
	// nothing.
	appended *events.Appended
	// replayed is true when appended was found rather than appended now.
	replayed bool
	// head is the aggregate's head after the step, as far as it is known.
	head events.Head
}

// decideFunc decides one step on an aggregate's current state: the event to
// append, nil to change nothing, or a fault. It runs under the cache's lock
// and must not keep references into the state.
type decideFunc[S any] func(state *S) (events.Event, *events.Fault)

// appendStep decides the index-th event of command c on aggregate id of t
// and appends it on the aggregate's subject, expecting the head it decided
// on. Decisions on one aggregate are serialized within the process. When
// another writer moved the subject, it waits for the Reader to catch up,
// answers with the command's own event if an earlier attempt already
// appended it, and otherwise decides again, a bounded number of times.
func appendStep[S any](ctx context.Context, s *Service, t *table[S], c *command, id string, index int, typ events.Type, decide decideFunc[S]) (stepResult, *events.Fault) {
	if s.stepHook != nil {
		if err := s.stepHook(c, index); err != nil {
			return stepResult{}, events.Errorf(events.CodeInternal, "%s %s step %d: %v", t.kind, id, index, err)
		}
	}
	subject := events.EventSubject(t.kind, id)
	unlock, err := s.locks.lock(ctx, subject)
	if err != nil {
		return stepResult{}, unavailable("wait for "+subject, err)
	}
	defer unlock()
	for attempt := 1; ; attempt++ {
		ev, head, fault, err := decideCurrent(ctx, s, t, id, decide)
		if err != nil {
			return stepResult{}, unavailable("read "+subject, err)
		}
		if fault != nil || ev == nil {
			return stepResult{head: head}, fault
		}
		res, retry, fault := appendDecided(ctx, s, t, c, id, index, typ, ev, head)
		if !retry {
			return res, fault
		}
		if attempt >= s.cfg.MaxAttempts {
			return stepResult{}, events.Errorf(events.CodeConflict,
				"%s kept changing: %d attempts lost to other writers; the command did not take effect, retrying is safe", subject, attempt)
		}
		if err := backoff(ctx, attempt); err != nil {
			return stepResult{}, unavailable("retry "+subject, err)
		}
	}
}

// decideCurrent decides on id's cached state. An outcome that appends
// nothing (a fault, or no change) is not checked by the stream, and the
// cache may lag other writers: such an outcome is believed only once the
// subject's last event, read through the stream leader, is the one it was
// decided on. Otherwise it is decided again on fresh state.
func decideCurrent[S any](ctx context.Context, s *Service, t *table[S], id string, decide decideFunc[S]) (events.Event, events.Head, *events.Fault, error) {
	for attempt := 1; ; attempt++ {
		var ev events.Event
		var fault *events.Fault
		var head events.Head
		err := t.view(ctx, id, func(state *S, h events.Head) {
			ev, fault = decide(state)
			head = h
		})
		if err != nil || (ev != nil && fault == nil) {
			return ev, head, fault, err
		}
		ok, err := current(ctx, s, t, id, head)
		if err != nil || ok || attempt >= s.cfg.MaxAttempts {
			return ev, head, fault, err
		}
	}
}

// check runs a read-only check on id's cached state. A failed check is
// believed only once confirmed current, as in decideCurrent.
func check[S any](ctx context.Context, s *Service, t *table[S], id string, f func(state *S) *events.Fault) (*events.Fault, error) {
	for attempt := 1; ; attempt++ {
		var fault *events.Fault
		var head events.Head
		err := t.view(ctx, id, func(state *S, h events.Head) {
			fault, head = f(state), h
		})
		if err != nil || fault == nil {
			return nil, err
		}
		ok, err := current(ctx, s, t, id, head)
		if err != nil || ok || attempt >= s.cfg.MaxAttempts {
			return fault, err
		}
	}
}

// current tells whether head is still the last event of t's aggregate id,
// read through the stream leader. If it is not, it drops the cached entry
// and waits until the Reader has applied the last event, so that the next
// view is fresh.
func current[S any](ctx context.Context, s *Service, t *table[S], id string, head events.Head) (bool, error) {
	last, err := lastOn(ctx, s, events.EventSubject(t.kind, id))
	if err != nil {
		return false, err
	}
	if last == head.Seq {
		return true, nil
	}
	t.drop(id)
	if err := s.cfg.Reader.WaitFor(ctx, last); err != nil {
		return false, lagging(last, err)
	}
	return false, nil
}

// lastOn is the sequence of the last message on subject (a filter),
// read through the leader; zero when there is none.
func lastOn(ctx context.Context, s *Service, subject string) (uint64, error) {
	last, err := bus.LastOnSubject(ctx, s.cfg.Conn, events.StreamEvents, subject)
	if errors.Is(err, bus.ErrNoMessage) {
		return 0, nil
	}
	return last.Seq, err
}

// catchUp reads the last sequence on subject (a filter) through the
// stream leader and waits until the Reader has applied it, so that what
// the Reader answers next reflects every event on subject so far. It
// returns that sequence.
func (s *Service) catchUp(ctx context.Context, subject string) (uint64, *events.Fault) {
	last, err := lastOn(ctx, s, subject)
	if err != nil {
		return 0, unavailable("read last of "+subject, err)
	}
	if err := s.cfg.Reader.WaitFor(ctx, last); err != nil {
		return 0, lagging(last, err)
	}
	return last, nil
}

// appendDecided seals ev and appends it expecting head. retry says the
// subject moved and the step must be decided again.
func appendDecided[S any](ctx context.Context, s *Service, t *table[S], c *command, id string, index int, typ events.Type, ev events.Event, head events.Head) (res stepResult, retry bool, fault *events.Fault) {
	subject := events.EventSubject(t.kind, id)
	env, data, err := events.Seal(ev, t.kind, id, c.origin, index, head.Hash)
	if err != nil {
		return stepResult{}, false, events.Errorf(events.CodeInternal, "%v", err)
	}
	ack, err := bus.Append(ctx, s.publisher, subject, &env, data, head.Seq, events.MsgID(c.actor, c.id, index))
	switch {
	case err == nil && !ack.Duplicate:
		t.advance(id, head, &events.Record{Seq: ack.Seq, Subject: subject, Data: data, Envelope: env, Event: ev})
		appended := events.Appended{Seq: ack.Seq, Subject: subject, Type: env.Type, ID: env.ID}
		return stepResult{appended: &appended, head: events.Head{Seq: ack.Seq, Hash: events.Hash(data)}}, false, nil
	case err == nil:
		// An earlier attempt of this command appended this step, maybe on
		// another aggregate of the same kind (an allocation on another host).
		t.drop(id)
		s.metrics.repeats.Inc()
		appended, fault := s.recorded(ctx, c, ack.Seq)
		if fault != nil {
			return stepResult{}, false, fault
		}
		return stepResult{appended: appended, replayed: true, head: events.Head{Seq: ack.Seq}}, false, nil
	case errors.Is(err, bus.ErrWrongLastSeq):
		t.drop(id)
		s.metrics.conflicts.WithLabelValues(string(t.kind)).Inc()
		appended, fault := s.afterConflict(ctx, c, subject, typ)
		if fault != nil || appended != nil {
			return stepResult{appended: appended, replayed: appended != nil, head: events.Head{Seq: seqOf(appended)}}, false, fault
		}
		return stepResult{}, true, nil
	case errors.Is(err, bus.ErrTryAgain):
		return stepResult{}, true, nil
	}
	return stepResult{}, false, unavailable("append to "+subject, err)
}

func seqOf(a *events.Appended) uint64 {
	if a == nil {
		return 0
	}
	return a.Seq
}

// afterConflict waits until the Reader has applied the subject's last event,
// read through the stream leader, and returns the command's own event of
// type typ if the command already appended it (another attempt, or the
// scheduler completing it).
func (s *Service) afterConflict(ctx context.Context, c *command, subject string, typ events.Type) (*events.Appended, *events.Fault) {
	if _, fault := s.catchUp(ctx, subject); fault != nil {
		return nil, fault
	}
	result, _, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return nil, unavailable("read command result", err)
	}
	for _, a := range result {
		if sameStep(a, typ, subject) {
			return &a, nil
		}
	}
	return nil, nil
}

// sameStep tells whether a, an event of the command, is the step of type typ
// on subject. An allocation is the one step that may have landed on another
// aggregate than the one tried: a retry may have chosen another host.
func sameStep(a events.Appended, typ events.Type, subject string) bool {
	return a.Type == typ && (typ == events.TypeHostAllocated || a.Subject == subject)
}

// recorded is the event at seq, which command c appended: from the Reader
// once it has applied seq, or else from the stream itself.
func (s *Service) recorded(ctx context.Context, c *command, seq uint64) (*events.Appended, *events.Fault) {
	if err := s.cfg.Reader.WaitFor(ctx, seq); err != nil {
		return nil, lagging(seq, err)
	}
	result, _, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return nil, unavailable("read command result", err)
	}
	for _, a := range result {
		if a.Seq == seq {
			return &a, nil
		}
	}
	_, env, subject, err := s.envelopeAt(ctx, seq, "")
	if err != nil {
		return nil, unavailable(fmt.Sprintf("read event %d", seq), err)
	}
	return &events.Appended{Seq: seq, Subject: subject, Type: env.Type, ID: env.ID}, nil
}

// envelopeAt reads the envelope stored at seq or, when subject is set, the
// first one on subject at or after seq. It returns jetstream.ErrMsgNotFound
// when there is none.
func (s *Service) envelopeAt(ctx context.Context, seq uint64, subject string) (uint64, events.Envelope, string, error) {
	stream, err := s.cfg.JS.Stream(ctx, events.StreamEvents)
	if err != nil {
		return 0, events.Envelope{}, "", err
	}
	var opts []jetstream.GetMsgOpt
	if subject != "" {
		opts = append(opts, jetstream.WithGetMsgSubject(subject))
	}
	msg, err := stream.GetMsg(ctx, seq, opts...)
	if err != nil {
		return 0, events.Envelope{}, "", err
	}
	var env events.Envelope
	if err := events.Unmarshal(msg.Data, &env); err != nil {
		return 0, events.Envelope{}, "", fmt.Errorf("%w: seq %d: %w", events.ErrCorrupt, msg.Sequence, err)
	}
	return msg.Sequence, env, msg.Subject, nil
}

// backoff waits a jittered, growing delay before attempt+1.
func backoff(ctx context.Context, attempt int) error {
	limit := min(time.Millisecond<<min(attempt, 6), 50*time.Millisecond)
	t := time.NewTimer(limit/2 + rand.N(limit/2+1))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
