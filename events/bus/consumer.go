package bus

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// Every reader of a stream reads through an ordered consumer, which lives
// on the server until its reader deletes it or its inactivity threshold
// (five minutes) passes. A stream takes 1,000 consumers at most: one-shot
// reads repeated a few times a second, or a reader restarted in a crash
// loop, would use them all up. So each reader makes its consumer with
// OrderedConsumer and deletes it with Forget when it stops.

// OrderedConsumer makes an ordered consumer of s. A creation cut short by
// ctx may still land on the server, with no consumer value left to delete
// it by; so the consumer gets a name prefix of its own, and a failed
// creation deletes what it may have made under that name.
func OrderedConsumer(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, cfg jetstream.OrderedConsumerConfig) (jetstream.Consumer, error) {
	if cfg.NamePrefix == "" {
		cfg.NamePrefix = nuid.Next()
	}
	cons, err := s.OrderedConsumer(ctx, cfg)
	if err != nil {
		// nats.go names an ordered consumer's server consumers PREFIX_1,
		// PREFIX_2, ...: the first is made here.
		forgetName(js, s.CachedInfo().Config.Name, cfg.NamePrefix+"_1")
		return nil, err
	}
	return cons, nil
}

// Forget deletes the server's consumer behind an ordered consumer that is
// read no more; call it once its messages are stopped. It waits at most
// two seconds, so a reader whose server has gone still stops promptly;
// what it cannot delete the server drops in time.
func Forget(js jetstream.JetStream, stream string, cons jetstream.Consumer) {
	if info := cons.CachedInfo(); info != nil {
		forgetName(js, stream, info.Name)
	}
}

func forgetName(js jetstream.JetStream, stream, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = js.DeleteConsumer(ctx, stream, name)
}

// readCaughtUp reads what an ordered consumer of stream filtered to
// filter delivers by policy, up to the message after which nothing was
// pending; nothing, without making a consumer, if no message matches.
func readCaughtUp(ctx context.Context, js jetstream.JetStream, stream, filter string, policy jetstream.DeliverPolicy) ([]Message, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", stream, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil, fmt.Errorf("stream %s info: %w", stream, err)
	}
	if len(info.State.Subjects) == 0 {
		return nil, nil
	}
	cons, err := OrderedConsumer(ctx, js, s, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}, DeliverPolicy: policy})
	if err != nil {
		return nil, err
	}
	defer Forget(js, stream, cons)
	// Messages keeps the consumer made above; a Fetch would make another.
	it, err := cons.Messages()
	if err != nil {
		return nil, err
	}
	defer it.Stop()
	var out []Message
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			return nil, err
		}
		meta, err := msg.Metadata()
		if err != nil {
			return nil, fmt.Errorf("metadata: %w", err)
		}
		out = append(out, Message{Seq: meta.Sequence.Stream, Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data(), Time: meta.Timestamp})
		if meta.NumPending == 0 {
			return out, nil
		}
	}
}
