package bus_test

import (
	"context"
	"errors"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// cutShort is a stream whose consumer creations land on the server while
// their caller is told they were cut short, as when ctx ends with the
// request in flight: a fault no test can time for real.
type cutShort struct{ jetstream.Stream }

func (s cutShort) OrderedConsumer(_ context.Context, cfg jetstream.OrderedConsumerConfig) (jetstream.Consumer, error) {
	if _, err := s.Stream.OrderedConsumer(context.Background(), cfg); err != nil {
		return nil, err
	}
	return nil, context.Canceled
}

// A reader that stops leaves no consumer on the server, nor does one whose
// consumer's creation was cut short after it landed.
func TestOrderedConsumer_LeavesNoConsumerBehind(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()
	stream, err := b.JS.Stream(ctx, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	consumers := func() int {
		t.Helper()
		info, err := stream.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Consumers
	}

	cons, err := bus.OrderedConsumer(ctx, b.JS, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if n := consumers(); n != 1 {
		t.Fatalf("%d consumers while reading, want 1", n)
	}
	bus.Forget(b.JS, events.StreamEvents, cons)
	if n := consumers(); n != 0 {
		t.Fatalf("%d consumers after Forget, want none", n)
	}

	if _, err := bus.OrderedConsumer(ctx, b.JS, cutShort{stream}, jetstream.OrderedConsumerConfig{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cut-short creation: err = %v, want context.Canceled", err)
	}
	if n := consumers(); n != 0 {
		t.Fatalf("%d consumers after a creation cut short, want none", n)
	}
}
