package bus

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
)

// Errors of appending.
var (
	// ErrWrongLastSeq means another writer appended to the subject since
	// the sequence the append expected: decide again on fresh state.
	ErrWrongLastSeq = errors.New("subject changed since it was read")
	// ErrTryAgain means the stream cannot check sequences right now (a new
	// leader catching up); retrying is safe.
	ErrTryAgain = errors.New("stream busy, try again")
)

// Appended is where an appended event landed.
type Appended struct {
	// Seq is the event's stream sequence. For a duplicate, it is the
	// sequence of the original.
	Seq uint64
	// Duplicate is true when the stream already held an event of the same
	// Nats-Msg-Id: this append did nothing.
	Duplicate bool
}

// Append stores a sealed event on subject, only if the subject's last
// stream sequence is still expectedSeq (0: the subject is empty). msgID
// deduplicates retries within the stream's duplicate window.
func Append(ctx context.Context, js jetstream.Publisher, subject string, env *events.Envelope, data []byte, expectedSeq uint64, msgID string) (Appended, error) {
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(env.Type))
	msg.Header.Set(events.HeaderVersion, strconv.Itoa(env.Version))
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(expectedSeq, 10))
	if msgID != "" {
		msg.Header.Set(jetstream.MsgIDHeader, msgID)
	}
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		return Appended{}, fmt.Errorf("append %s to %s: %w", env.Type, subject, classify(err))
	}
	return Appended{Seq: ack.Sequence, Duplicate: ack.Duplicate}, nil
}

// classify maps JetStream's answers to the errors callers act on.
func classify(err error) error {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		switch apiErr.ErrorCode {
		case jetstream.JSErrCodeStreamWrongLastSequence, jetstream.JSErrCodeStreamWrongLastSequenceConstant:
			return fmt.Errorf("%w: %w", ErrWrongLastSeq, err)
		case 10163, 10158: // expected-sequence check temporarily unavailable; msg id in process
			return fmt.Errorf("%w: %w", ErrTryAgain, err)
		}
	}
	return err
}
