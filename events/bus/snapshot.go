package bus

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// LastPerSubject reads the last message of every subject of stream that
// matches filter, as of the moment it starts: a snapshot of a
// MaxMsgsPerSubject stream such as LOOM_GOALS, or the newest report on
// each of an agent's observation subjects.
func LastPerSubject(ctx context.Context, js jetstream.JetStream, stream, filter string) ([]Message, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", stream, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil, fmt.Errorf("stream %s info: %w", stream, err)
	}
	if info.State.Msgs == 0 || len(info.State.Subjects) == 0 {
		return nil, nil
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
		DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("snapshot %s %s: %w", stream, filter, err)
	}
	defer Forget(js, stream, cons)
	var out []Message
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		batch, err := cons.Fetch(256, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, fmt.Errorf("snapshot %s %s: %w", stream, filter, err)
		}
		for msg := range batch.Messages() {
			meta, err := msg.Metadata()
			if err != nil {
				return nil, fmt.Errorf("snapshot %s: metadata: %w", stream, err)
			}
			out = append(out, Message{Seq: meta.Sequence.Stream, Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data(), Time: meta.Timestamp})
			if meta.NumPending == 0 {
				return out, nil
			}
		}
		if err := batch.Error(); err != nil {
			return nil, fmt.Errorf("snapshot %s %s: %w", stream, filter, err)
		}
	}
}

// Forget deletes the server's consumer behind an ordered consumer that is
// read no more. Left alone it outlives its reader by its inactivity
// threshold (five minutes), and a stream takes 1,000 consumers at most: a
// one-shot read repeated a few times a second would use them all up.
func Forget(js jetstream.JetStream, stream string, cons jetstream.Consumer) {
	info := cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = js.DeleteConsumer(ctx, stream, info.Name)
}
