package bus

import (
	"context"
	"fmt"

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
	msgs, err := readCaughtUp(ctx, js, s, stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
		DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return nil, fmt.Errorf("snapshot %s %s: %w", stream, filter, err)
	}
	return msgs, nil
}

// ReadSubject reads every message stored on subject of stream, oldest
// first.
func ReadSubject(ctx context.Context, js jetstream.JetStream, stream, subject string) ([]Message, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", stream, err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		return nil, fmt.Errorf("stream %s info: %w", stream, err)
	}
	if info.State.Subjects[subject] == 0 {
		return nil, nil
	}
	msgs, err := readCaughtUp(ctx, js, s, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", subject, err)
	}
	return msgs, nil
}
