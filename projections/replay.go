package projections

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
)

// Replaying: the read models as they stood at one point of the history,
// built by the runner's own decode, apply and commit, for an auditor who
// can read LOOM_EVENTS and nothing else.

// ReplayOptions configures ReplayTo. The zero value stops at the first
// message that does not decode.
type ReplayOptions struct {
	// SkipCorrupt flags a message that does not decode (corrupt bytes, an
	// unknown type or version) and goes on past it, as Run does, instead
	// of stopping before it.
	SkipCorrupt bool
}

// ReplayResult is what ReplayTo did.
type ReplayResult struct {
	// From is the first sequence this call applied; zero when the store
	// held the point already.
	From uint64
	// Applied is the last sequence the read models reflect.
	Applied uint64
	// Skipped are the messages at or below Applied that do not decode,
	// which SkipCorrupt let the replay pass, in stream order: this call's
	// and those of earlier replays into the same store.
	Skipped []Flagged
	// Flagged are all the messages at or below Applied that the read
	// models flagged and skipped, in stream order: Skipped, and those that
	// decode but cannot be applied (a stale observation, an event on a
	// subject it does not belong on), which the live read models flag too.
	Flagged []Flagged
}

// ReplayTo builds the read models from LOOM_EVENTS up to and including
// sequence upTo, from the sequence after Applied, and stops there: the
// store then answers as the live read models did when they had applied
// upTo. It applies the messages exactly as Run does, in batches, but it
// follows nothing and retries nothing.
//
// A message that does not decode stops the replay before it, with a
// *events.Fault (corrupt_event or unknown_event) naming its sequence,
// subject and reason, everything before it applied; with SkipCorrupt it is
// flagged as Run flags it and reported in Skipped. In strict mode a store
// that an earlier replay took past such a message is refused the same way,
// so the answer does not depend on the directory's past.
//
// It refuses, with a Fault: upTo zero, or beyond the stream's last sequence
// (invalid_argument); a store that reflects a sequence past upTo
// (invalid_argument: replay into an empty store); a sequence missing from
// the stream (history_gap). On an error the result says how far it got.
// It cannot run beside Run (ErrRunning).
func (s *Store) ReplayTo(ctx context.Context, js jetstream.JetStream, upTo uint64, opts ReplayOptions) (ReplayResult, error) {
	if !s.running.CompareAndSwap(false, true) {
		return ReplayResult{}, ErrRunning
	}
	defer s.running.Store(false)
	result := ReplayResult{Applied: s.Applied()}
	switch {
	case upTo == 0:
		return result, events.Errorf(events.CodeInvalidArgument, "replay to sequence 0: the history starts at 1")
	case result.Applied > upTo:
		return result, events.Errorf(events.CodeInvalidArgument,
			"these read models reflect sequence %d already, past %d: replay into an empty directory", result.Applied, upTo)
	}
	info, err := streamInfo(ctx, js)
	if err != nil {
		return result, err
	}
	first, last := info.State.FirstSeq, info.State.LastSeq
	switch {
	case last < upTo:
		return result, events.Errorf(events.CodeInvalidArgument, "%s ends at sequence %d, before %d", events.StreamEvents, last, upTo)
	case result.Applied < upTo && first > result.Applied+1:
		return result, events.Errorf(events.CodeHistoryGap, "%s starts at sequence %d: sequences %d to %d are not in it",
			events.StreamEvents, first, result.Applied+1, first-1)
	}
	if result.Skipped, err = s.skippedBefore(ctx, js, opts); err != nil {
		return result, err
	}
	if result.Applied < upTo {
		result.From = result.Applied + 1
		r := &replay{upTo: upTo, last: result.Applied, skipCorrupt: opts.SkipCorrupt}
		err = s.applyUpTo(ctx, js, r)
		result.Skipped = append(result.Skipped, r.skipped...)
		result.Applied = s.Applied()
		if err != nil {
			return result, err
		}
	}
	if result.Flagged, err = s.FlaggedEvents(ctx); err != nil {
		return result, err
	}
	return result, nil
}

// replay is the state of one ReplayTo past what the store held.
type replay struct {
	upTo        uint64
	skipCorrupt bool
	// last is the last sequence admitted.
	last uint64
	// skipped are the messages admitted under skipCorrupt that do not decode.
	skipped []Flagged
}

// applyUpTo applies the stream from the sequence after Applied up to r.upTo,
// through the runner's consumer, batches and commits.
func (s *Store) applyUpTo(ctx context.Context, js jetstream.JetStream, r *replay) error {
	feed, err := s.subscribe(ctx, js, r.last+1)
	if err != nil {
		return err
	}
	defer feed.stop()
	deliveries := make([]delivery, 0, s.opts.MaxBatch)
	for r.last < r.upTo {
		deliveries, err = s.collect(ctx, feed, deliveries[:0])
		if err != nil {
			return fmt.Errorf("replay %s after sequence %d: %w", events.StreamEvents, r.last, err)
		}
		ready, stop := r.admit(deliveries)
		if err := s.applyDeliveries(ready); err != nil {
			return err
		}
		if stop != nil {
			return stop
		}
	}
	return nil
}

// admit returns the deliveries to apply: those in sequence up to upTo,
// until one that does not decode (unless skipCorrupt) or a missing
// sequence, which stop says. Redeliveries of what it admitted already are
// kept: the batch skips them, as it does for Run.
func (r *replay) admit(deliveries []delivery) (ready []delivery, stop error) {
	for i := range deliveries {
		d := &deliveries[i]
		seq := d.rec.Seq
		switch {
		case r.last >= r.upTo:
			return deliveries[:i], nil
		case seq <= r.last:
			continue
		case seq != r.last+1:
			return deliveries[:i], events.Errorf(events.CodeHistoryGap, "sequence %d is not in %s: it goes from %d to %d",
				r.last+1, events.StreamEvents, r.last, seq)
		case d.err != nil && !r.skipCorrupt:
			return deliveries[:i], undecodable(seq, d.rec.Subject, d.err)
		case d.err != nil:
			r.skipped = append(r.skipped, Flagged{Seq: seq, Subject: d.rec.Subject, Code: decodeCode(d.err), Reason: d.err.Error()})
		}
		r.last = seq
		if d.pending == 0 && seq < r.upTo {
			// The stream's last sequence was upTo or more when the replay
			// began, and nothing follows this message: the rest is gone.
			return deliveries[:i+1], events.Errorf(events.CodeHistoryGap, "%s holds nothing after sequence %d: sequences %d to %d are not in it",
				events.StreamEvents, seq, seq+1, r.upTo)
		}
	}
	return deliveries, nil
}

// skippedBefore lists the messages the store flagged that do not decode:
// what an earlier replay into it skipped under SkipCorrupt. The flagged
// table does not say whether a message failed to decode or to apply, so
// each flagged corrupt or unknown is read again from the stream (through
// the leader) and decoded. Without SkipCorrupt the first one found is the
// error a fresh replay would stop with.
func (s *Store) skippedBefore(ctx context.Context, js jetstream.JetStream, opts ReplayOptions) ([]Flagged, error) {
	flagged, err := s.FlaggedEvents(ctx)
	if err != nil {
		return nil, err
	}
	var skipped []Flagged
	for _, f := range flagged {
		if f.Code != events.CodeCorruptEvent && f.Code != events.CodeUnknownEvent {
			continue
		}
		msg, err := bus.MessageAt(ctx, js.Conn(), events.StreamEvents, f.Seq)
		if errors.Is(err, bus.ErrNoMessage) {
			return nil, events.Errorf(events.CodeHistoryGap, "sequence %d, which these read models flagged, is not in %s any more", f.Seq, events.StreamEvents)
		}
		if err != nil {
			return nil, fmt.Errorf("read flagged sequence %d again: %w", f.Seq, err)
		}
		d := decodeDelivery(msg.Seq, msg.Subject, msg.Time, msg.Data, msg.Header, 0, hostkey.NewVerifier())
		switch {
		case d.err == nil:
			continue
		case !opts.SkipCorrupt:
			return nil, undecodable(f.Seq, f.Subject, d.err)
		}
		skipped = append(skipped, f)
	}
	return skipped, nil
}

// undecodable is the error a strict replay stops with.
func undecodable(seq uint64, subject string, err error) *events.Fault {
	return events.Errorf(decodeCode(err), "sequence %d on %s does not decode: %v; the replay stops before it", seq, subject, err)
}
