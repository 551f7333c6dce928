package handlers_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/handlers"
	"github.com/loomctl/loom/internal/eventually"
)

// appendEvents appends n chained events on a few subjects, as writers do.
// It returns the last one's sequence.
func appendEvents(t *testing.T, b *bustest.Bus, n int, tag string) uint64 {
	t.Helper()
	ctx := t.Context()
	var last uint64
	for i := range n {
		vm := fmt.Sprintf("%s-%d", tag, i%3)
		subject := events.EventSubject(events.KindVM, vm)
		head, err := bus.LastOnSubject(ctx, b.Conn, events.StreamEvents, subject)
		var prev []byte
		if err == nil {
			prev = events.Hash(head.Data)
		}
		env, data, err := events.Seal(events.VMGoalChanged{UID: vm, Desired: events.DesiredRunning}, events.KindVM, vm,
			events.Origin{Actor: "t", CommandID: fmt.Sprintf("%s-%d", tag, i), Time: time.Now()}, 0, prev)
		if err != nil {
			t.Fatal(err)
		}
		a, err := bus.Append(ctx, b.JS, subject, &env, data, head.Seq, "")
		if err != nil {
			t.Fatal(err)
		}
		last = a.Seq
	}
	return last
}

func startSealer(t *testing.T, b *bustest.Bus, key ed25519.PrivateKey, span uint64) {
	t.Helper()
	s, err := handlers.NewSealer(handlers.SealerConfig{JS: b.JS, Conn: b.Conn, Key: key, Every: 20 * time.Millisecond, Span: span})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sealer: %v", err)
		}
	})
}

// verifyStream reads the whole stream into a Verifier.
func verifyStream(t *testing.T, b *bustest.Bus, key ed25519.PrivateKey) *audit.Report {
	t.Helper()
	ctx := t.Context()
	last, err := bus.LastSeq(ctx, b.JS, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := b.JS.Stream(ctx, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	v := audit.NewVerifier([]ed25519.PublicKey{key.Public().(ed25519.PublicKey)}, nil)
	for seq := uint64(0); seq < last; {
		msg, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		meta, _ := msg.Metadata()
		seq = meta.Sequence.Stream
		v.Add(&audit.Message{Seq: seq, Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()})
	}
	return v.Finish()
}

// lastSeal is where the last seal is and what it covers up to.
func lastSeal(t *testing.T, b *bustest.Bus) (seq, to uint64, err error) {
	seq, _, sealed, err := handlers.LastSeal(t.Context(), b.Conn)
	return seq, sealed.To, err
}

// sealedTo waits until a seal covers upTo.
func sealedTo(t *testing.T, b *bustest.Bus, upTo uint64) {
	t.Helper()
	eventually.WaitFor(t, 20*time.Second, "everything sealed", func() error {
		_, to, err := lastSeal(t, b)
		if err != nil {
			return err
		}
		if to < upTo {
			return fmt.Errorf("the last seal covers up to %d, not %d", to, upTo)
		}
		return nil
	})
}

func TestSealer_SealsWithoutGapsAcrossReplicasAndRestarts(t *testing.T) {
	b := bustest.Start(t)
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	appendEvents(t, b, 30, "before") // history from before the first seal
	startSealer(t, b, key, 7)        // catching up in spans of 7
	startSealer(t, b, key, 7)        // a second replica racing it
	lastEvent := appendEvents(t, b, 50, "during")
	sealedTo(t, b, lastEvent)
	r := verifyStream(t, b, key)
	if !r.OK() || r.Seals < 80/7 {
		t.Fatalf("report: %d seals, last %+v, problems %v", r.Seals, r.LastSeal, r.Problems)
	}

	// Idle, the sealers do not seal their own seals over and over: once
	// only the last seal itself is unsealed, the stream stays where it is
	// for many sealing periods.
	var last uint64
	eventually.WaitFor(t, 20*time.Second, "only the last seal unsealed", func() error {
		seq, to, err := lastSeal(t, b)
		if err != nil {
			return err
		}
		if last, err = bus.LastSeq(t.Context(), b.JS, events.StreamEvents); err != nil {
			return err
		}
		if to+1 != seq || seq != last {
			return fmt.Errorf("the last seal at %d covers up to %d; the stream ends at %d", seq, to, last)
		}
		return nil
	})
	time.Sleep(10 * 20 * time.Millisecond) // nothing to wait for: absence
	if now, _ := bus.LastSeq(t.Context(), b.JS, events.StreamEvents); now != last {
		t.Fatalf("idle stream grew from %d to %d", last, now)
	}

	// A sealer started later goes on from the last seal.
	startSealer(t, b, key, 1000)
	sealedTo(t, b, appendEvents(t, b, 5, "after"))
	if r := verifyStream(t, b, key); !r.OK() {
		t.Fatalf("after a restart: %v", r.Problems)
	}
}
