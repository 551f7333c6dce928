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
	// ErrDuplicateInBatch means a message of an atomic batch carried a
	// Nats-Msg-Id the stream already holds: an earlier attempt stored it.
	// The batch stored nothing; what the earlier attempt stored stands.
	ErrDuplicateInBatch = errors.New("batch repeats a stored message")
)

// HeaderExpectedLastSubjSeqSubject moves the expected-last-subject-sequence
// check to another subject or filter (nats-server 2.11+; nats.go has no
// name for it).
const HeaderExpectedLastSubjSeqSubject = "Nats-Expected-Last-Subject-Sequence-Subject"

// ExpectedOnSubject is the expected-last-subject-sequence a stored message
// was appended under, as Append's headers say it, when the check was on the
// message's own subject: the sequence of the subject's previous message.
// False when the headers say none, several, or a check on another subject.
func ExpectedOnSubject(header nats.Header, subject string) (uint64, bool) {
	values := header[jetstream.ExpectedLastSubjSeqHeader]
	if len(values) != 1 {
		return 0, false
	}
	if other := header[HeaderExpectedLastSubjSeqSubject]; len(other) != 0 && other[0] != subject {
		return 0, false
	}
	seq, err := strconv.ParseUint(values[0], 10, 64)
	return seq, err == nil
}

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
	return AppendExpecting(ctx, js, subject, env, data, Expect{Seq: expectedSeq}, msgID)
}

// Expect is the check an append makes before it stores: the last stream
// sequence among the messages on Subject must be Seq (0: there are none).
// Subject may be another subject than the one appended to, or a wildcard
// filter; empty means the subject appended to.
//
// Checking another subject lets writers on different subjects exclude one
// kind of writer without excluding each other. Leases use it: shared grants,
// each on a holder's own subject, check only the resource's exclusive
// subject, so readers of one image never serialize; an exclusive grant
// checks the wildcard over all of the resource's subjects, so it lands only
// if no grant of any kind came first.
type Expect struct {
	Subject string
	Seq     uint64
}

// AppendExpecting is Append with the check spelled out.
func AppendExpecting(ctx context.Context, js jetstream.Publisher, subject string, env *events.Envelope, data []byte, expect Expect, msgID string) (Appended, error) {
	return AppendMsg(ctx, js, EventMsg(subject, env, data, msgID), env, expect)
}

// EventMsg is the message that stores a sealed event on subject: its
// bytes, its type and version in headers, and msgID (if not empty) for
// deduplication. Add headers of your own (an agent's signature), then
// AppendMsg it.
func EventMsg(subject string, env *events.Envelope, data []byte, msgID string) *nats.Msg {
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(env.Type))
	msg.Header.Set(events.HeaderVersion, strconv.Itoa(env.Version))
	if msgID != "" {
		msg.Header.Set(jetstream.MsgIDHeader, msgID)
	}
	return msg
}

// AppendMsg stores msg, an EventMsg of env, only if expect holds.
func AppendMsg(ctx context.Context, js jetstream.Publisher, msg *nats.Msg, env *events.Envelope, expect Expect) (Appended, error) {
	a, err := PublishExpecting(ctx, js, msg, expect)
	if err != nil {
		return Appended{}, fmt.Errorf("append %s: %w", env.Type, err)
	}
	return a, nil
}

// PublishExpecting stores msg (any message of any Loom stream: an event, a
// goal, a liveness renewal or marker) only if expect holds, and maps
// JetStream's answers to ErrWrongLastSeq and ErrTryAgain. msg's headers
// are kept; the check's are added.
func PublishExpecting(ctx context.Context, js jetstream.Publisher, msg *nats.Msg, expect Expect) (Appended, error) {
	if msg.Header == nil {
		msg.Header = nats.Header{}
	}
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(expect.Seq, 10))
	if expect.Subject != "" && expect.Subject != msg.Subject {
		msg.Header.Set(HeaderExpectedLastSubjSeqSubject, expect.Subject)
	}
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		return Appended{}, fmt.Errorf("publish to %s: %w", msg.Subject, classify(err))
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
		case 10201: // atomic publish batch contains duplicate message id
			return fmt.Errorf("%w: %w", ErrDuplicateInBatch, err)
		}
	}
	return err
}
