package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// An atomic batch is stored contiguously even while other writers append
// single messages as fast as they can: a vm.migrated finds its grants'
// epochs by counting back from its own sequence, so this must hold. A
// batch whose check fails stores nothing.
func TestPublishBatch_ContiguousAndAllOrNothing(t *testing.T) {
	b := bustest.Start(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			subject := events.EventSubject(events.KindHost, "noise-"+strconv.Itoa(w))
			for i := 0; ctx.Err() == nil; i++ {
				env, data := seal(t, "noise-"+strconv.Itoa(w), i, nil)
				msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
				msg.Header.Set(events.HeaderType, string(env.Type))
				if _, err := b.JS.PublishMsg(ctx, msg); err != nil && ctx.Err() == nil {
					t.Errorf("noise: %v", err)
					return
				}
			}
		}()
	}
	const size = 5
	for round := range 40 {
		msgs := make([]*nats.Msg, size)
		for i := range msgs {
			name := fmt.Sprintf("b%d-%d", round, i)
			env, data := seal(t, name, 0, nil)
			msgs[i] = &nats.Msg{Subject: events.EventSubject(events.KindHost, name), Data: data, Header: nats.Header{}}
			msgs[i].Header.Set(events.HeaderType, string(env.Type))
			msgs[i].Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
		}
		last, err := bus.PublishBatch(ctx, b.Conn, msgs)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i := range size {
			seq := last - uint64(size-1-i)
			m, err := bus.NextOnSubject(ctx, b.Conn, events.StreamEvents, msgs[i].Subject, seq)
			if err != nil || m.Seq != seq {
				t.Fatalf("round %d: message %d is not at %d (found %d, %v): the batch was not stored contiguously", round, i, seq, m.Seq, err)
			}
		}
	}
	cancel()
	wg.Wait()

	// A batch with one stale check stores nothing.
	taken := events.EventSubject(events.KindHost, "b0-0")
	fresh := events.EventSubject(events.KindHost, "fresh")
	envA, dataA := seal(t, "fresh", 0, nil)
	envB, dataB := seal(t, "b0-0", 1, nil)
	a := &nats.Msg{Subject: fresh, Data: dataA, Header: nats.Header{}}
	a.Header.Set(events.HeaderType, string(envA.Type))
	a.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
	stale := &nats.Msg{Subject: taken, Data: dataB, Header: nats.Header{}}
	stale.Header.Set(events.HeaderType, string(envB.Type))
	stale.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
	if _, err := bus.PublishBatch(context.Background(), b.Conn, []*nats.Msg{a, stale}); !errors.Is(err, bus.ErrWrongLastSeq) {
		t.Fatalf("stale batch: %v, want ErrWrongLastSeq", err)
	}
	if _, err := bus.LastOnSubject(context.Background(), b.Conn, events.StreamEvents, fresh); !errors.Is(err, bus.ErrNoMessage) {
		t.Fatalf("a rejected batch stored its first message: %v", err)
	}
}
