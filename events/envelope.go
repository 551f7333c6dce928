package events

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// Header names Loom sets on every message it stores, so a reader can route
// a message without decoding it.
const (
	HeaderType    = "Loom-Type"    // the event type, e.g. "vm.created"
	HeaderVersion = "Loom-Version" // the payload schema version, decimal
)

// Header names an agent sets on every observation it signs with its host
// key: the signature of the observation's subject, its place in the
// subject and its stored bytes (events/hostkey says what is signed and why
// in a header), and the public key that made it. A host registered with a
// key must sign; the read models and `loom audit verify` check the
// signature with the registered key, never with the one in the header.
const (
	HeaderSig    = "Loom-Sig"     // the signature, unpadded URL-safe base64
	HeaderSigKey = "Loom-Sig-Key" // the signer's public nkey, "U…"
)

// HashSize is the size of a PrevHash: SHA-256.
const HashSize = sha256.Size

// Envelope is what every event on LOOM_EVENTS is stored as. Its stream
// sequence is its position and is not part of it.
type Envelope struct {
	// ID is the event's ULID.
	ID string `msgpack:"id" json:"id"`
	// Type names the payload, e.g. "vm.created".
	Type Type `msgpack:"type" json:"type"`
	// Version is the payload's schema version.
	Version int `msgpack:"v" json:"v"`
	// Kind and AggregateID name the aggregate the event belongs to.
	Kind        Kind   `msgpack:"kind" json:"kind"`
	AggregateID string `msgpack:"agg" json:"agg"`
	// Time is the decider's clock at decision time. Two deciders' clocks
	// need not agree; order comes from the stream.
	Time UnixNano `msgpack:"time" json:"time"`
	// Actor is who asked for the decision.
	Actor string `msgpack:"actor" json:"actor"`
	// CommandID is the command that caused the event (causation).
	CommandID string `msgpack:"cmd,omitempty" json:"cmd,omitempty"`
	// CorrelationID ties together the events of one piece of work.
	CorrelationID string `msgpack:"corr,omitempty" json:"corr,omitempty"`
	// PrevHash is the SHA-256 of the stored bytes of the previous event on
	// the same subject; empty for a subject's first event.
	PrevHash []byte `msgpack:"prev,omitempty" json:"prev,omitempty"`
	// Payload is the msgpack-encoded event body.
	Payload msgpack.RawMessage `msgpack:"payload" json:"-"`
}

// At is the decider's time as a time.Time.
func (e *Envelope) At() time.Time { return e.Time.Time() }

// Validate checks what every envelope must have.
func (e *Envelope) Validate() error {
	switch {
	case e.ID == "":
		return errors.New("envelope: missing id")
	case e.Type == "":
		return errors.New("envelope: missing type")
	case e.Version < 1:
		return fmt.Errorf("envelope: bad version %d", e.Version)
	case e.Kind == "" || e.AggregateID == "":
		return errors.New("envelope: missing aggregate")
	case len(e.PrevHash) != 0 && len(e.PrevHash) != HashSize:
		return fmt.Errorf("envelope: prev hash is %d bytes, want %d", len(e.PrevHash), HashSize)
	}
	return nil
}

// Hash is the SHA-256 of stored bytes: what the next event on the same
// subject carries as PrevHash.
func Hash(data []byte) []byte {
	sum := sha256.Sum256(data)
	return sum[:]
}

// Record is an event as read back from the stream: where it sits, when the
// server stored it, its raw bytes, and the decoded envelope and payload.
type Record struct {
	// Seq is the stream sequence: the event's position in all history.
	Seq uint64
	// Subject is the subject it was stored on.
	Subject string
	// Stored is the server's timestamp.
	Stored time.Time
	// Data is the stored bytes; Hash(Data) is the next event's PrevHash.
	Data []byte
	// Envelope is the decoded envelope.
	Envelope Envelope
	// Event is the decoded payload, upcast to the newest version.
	Event Event
}

// DecodeRecord decodes stored bytes into a Record. It fails on a corrupt
// envelope, an unknown type or version, or a payload that does not decode:
// each error says which, so a reader can flag the message and move on.
func DecodeRecord(seq uint64, subject string, stored time.Time, data []byte) (Record, error) {
	rec := Record{Seq: seq, Subject: subject, Stored: stored, Data: data}
	if err := Unmarshal(data, &rec.Envelope); err != nil {
		return rec, fmt.Errorf("%w: seq %d: %w", ErrCorrupt, seq, err)
	}
	if err := rec.Envelope.Validate(); err != nil {
		return rec, fmt.Errorf("%w: seq %d: %w", ErrCorrupt, seq, err)
	}
	ev, err := DecodePayload(rec.Envelope.Type, rec.Envelope.Version, rec.Envelope.Payload)
	if err != nil {
		return rec, fmt.Errorf("seq %d: %w", seq, err)
	}
	rec.Event = ev
	return rec, nil
}

// Errors of decoding.
var (
	// ErrCorrupt means the bytes are not a valid envelope.
	ErrCorrupt = errors.New("corrupt event")
	// ErrStaleEpoch means an observation acted under lease epochs that
	// are not its VM's current ones.
	ErrStaleEpoch = errors.New("observation under a stale lease epoch")
	// ErrUnknownType means no decoder knows the event type.
	ErrUnknownType = errors.New("unknown event type")
	// ErrUnknownVersion means the type is known but not that version.
	ErrUnknownVersion = errors.New("unknown event version")
)

// Origin is who and what caused an event: the context a decider stamps on
// every envelope it writes.
type Origin struct {
	Actor         string
	CommandID     string
	CorrelationID string
	// Time is the decider's clock.
	Time time.Time
}

// Seal wraps ev for aggregate (kind, id) as the index-th event of its
// command, chained to prevHash, and encodes it. It returns the envelope and
// the exact bytes to store.
func Seal(ev Event, kind Kind, id string, origin Origin, index int, prevHash []byte) (Envelope, []byte, error) {
	version := CurrentVersion(ev.EventType())
	if version == 0 {
		return Envelope{}, nil, fmt.Errorf("seal: %w %q", ErrUnknownType, ev.EventType())
	}
	payload, err := Marshal(ev)
	if err != nil {
		return Envelope{}, nil, fmt.Errorf("seal %s: %w", ev.EventType(), err)
	}
	env := Envelope{
		ID:            EventID(origin.Time, origin.Actor, origin.CommandID, index),
		Type:          ev.EventType(),
		Version:       version,
		Kind:          kind,
		AggregateID:   id,
		Time:          NanosOf(origin.Time),
		Actor:         origin.Actor,
		CommandID:     origin.CommandID,
		CorrelationID: origin.CorrelationID,
		PrevHash:      prevHash,
		Payload:       payload,
	}
	data, err := Marshal(&env)
	if err != nil {
		return Envelope{}, nil, fmt.Errorf("seal %s: %w", ev.EventType(), err)
	}
	return env, data, nil
}

// Head is where a subject stands: the stream sequence of its last event and
// the hash of that event's stored bytes. A writer appends with
// expected-last-subject-sequence Seq and PrevHash Hash. The zero Head is an
// empty subject.
type Head struct {
	Seq  uint64 `msgpack:"seq" json:"seq"`
	Hash []byte `msgpack:"hash,omitempty" json:"hash,omitempty"`
}
