package bus_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// TestLastStoredBy resolves times to the last message stored at or before
// them, by the stored timestamps alone: at each message's own time, just
// before it, between two messages, before the first and after the last.
func TestLastStoredBy(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()
	if _, err := bus.LastStoredBy(ctx, b.Conn, events.StreamEvents, time.Now()); !errors.Is(err, bus.ErrNoMessage) {
		t.Fatalf("empty stream: %v, want ErrNoMessage", err)
	}
	var stored []time.Time // stored[i] is sequence i+1's
	var prev []byte
	for i := range 6 {
		env, data := seal(t, "h1", i, prev)
		appended, err := bus.Append(ctx, b.JS, events.EventSubject(events.KindHost, "h1"), &env, data, uint64(i), fmt.Sprintf("id-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		prev = events.Hash(data)
		seq := appended.Seq
		m, err := bus.MessageAt(ctx, b.Conn, events.StreamEvents, seq)
		if err != nil || m.Seq != seq {
			t.Fatalf("message at %d: %+v, %v", seq, m, err)
		}
		stored = append(stored, m.Time)
	}
	// want is the last sequence stored at or before at, by a linear scan;
	// zero if none.
	want := func(at time.Time) uint64 {
		var seq uint64
		for i, s := range stored {
			if !s.After(at) {
				seq = uint64(i + 1)
			}
		}
		return seq
	}
	var times []time.Time
	for i, s := range stored {
		times = append(times, s, s.Add(-time.Nanosecond))
		if i > 0 {
			times = append(times, stored[i-1].Add(s.Sub(stored[i-1])/2))
		}
	}
	times = append(times, stored[0].Add(-time.Hour), stored[len(stored)-1].Add(time.Hour))
	distinct := 0
	for _, at := range times {
		m, err := bus.LastStoredBy(ctx, b.Conn, events.StreamEvents, at)
		w := want(at)
		switch {
		case w == 0 && !errors.Is(err, bus.ErrNoMessage):
			t.Fatalf("at %s (before the first message): %+v, %v; want ErrNoMessage", at.Format(time.RFC3339Nano), m, err)
		case w == 0:
		case err != nil || m.Seq != w || !m.Time.Equal(stored[w-1]):
			t.Fatalf("at %s: sequence %d stored %s (%v), want %d stored %s", at.Format(time.RFC3339Nano), m.Seq,
				m.Time.Format(time.RFC3339Nano), err, w, stored[w-1].Format(time.RFC3339Nano))
		}
		if w > 0 && !stored[w-1].Equal(at) {
			distinct++
		}
	}
	if distinct == 0 {
		t.Fatal("every time probed was a stored time: the test would not see an off-by-one")
	}
	if _, err := bus.MessageAt(ctx, b.Conn, events.StreamEvents, 99); !errors.Is(err, bus.ErrNoMessage) {
		t.Fatalf("message at 99: %v, want ErrNoMessage", err)
	}
}
