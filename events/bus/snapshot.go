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
	msgs, err := readCaughtUp(ctx, js, stream, filter, jetstream.DeliverLastPerSubjectPolicy)
	if err != nil {
		return nil, fmt.Errorf("snapshot %s %s: %w", stream, filter, err)
	}
	return msgs, nil
}

// ReadSubject reads every message stored on subject of stream, oldest
// first.
func ReadSubject(ctx context.Context, js jetstream.JetStream, stream, subject string) ([]Message, error) {
	msgs, err := readCaughtUp(ctx, js, stream, subject, jetstream.DeliverAllPolicy)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", subject, err)
	}
	return msgs, nil
}
