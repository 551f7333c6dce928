package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
)

// MessageAt reads the message at sequence seq of stream through the stream
// leader; ErrNoMessage when the stream holds none there (not stored yet,
// or removed).
func MessageAt(ctx context.Context, nc *nats.Conn, stream string, seq uint64) (Message, error) {
	return leaderGet(ctx, nc, stream, map[string]any{"seq": seq}, fmt.Sprintf("get sequence %d", seq))
}

// LastStoredBy reads, through the stream leader, the last message stream
// stored at or before t by the stream's own clock: the time the server
// stored it, not the time an event carries, since deciders' clocks need not
// agree. ErrNoMessage means the stream stored nothing by t. A message
// missing just before the first one stored after t (removed) is an error:
// there is no earlier message to name in its place.
//
// It relies on stored times growing with the sequence, as the server's own
// search by time does: true of one server, and across leader changes as far
// as the servers' clocks agree. For a t still to come the answer moves on
// as messages are stored.
func LastStoredBy(ctx context.Context, nc *nats.Conn, stream string, t time.Time) (Message, error) {
	for {
		after, err := leaderGet(ctx, nc, stream, map[string]any{"start_time": t.Add(time.Nanosecond), "next_by_subj": ">"},
			"get the first message stored after "+t.Format(time.RFC3339Nano))
		if errors.Is(err, ErrNoMessage) {
			// Nothing stored after t: the answer is the last message, unless
			// one arrived since.
			last, err := LastOnSubject(ctx, nc, stream, ">")
			if err != nil || !last.Time.After(t) {
				return last, err
			}
			continue
		}
		if err != nil {
			return Message{}, err
		}
		if after.Seq == 1 {
			return Message{}, ErrNoMessage
		}
		before, err := MessageAt(ctx, nc, stream, after.Seq-1)
		if errors.Is(err, ErrNoMessage) {
			return Message{}, fmt.Errorf("sequence %d, the one before the first message stored after %s, is not in stream %s",
				after.Seq-1, t.Format(time.RFC3339Nano), stream)
		}
		return before, err
	}
}
