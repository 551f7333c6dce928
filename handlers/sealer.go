package handlers

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
)

// The sealer (events/audit says what a seal proves).
//
// It follows LOOM_EVENTS from the last seal's To, folds every message into
// the running root, and about once per SealEvery appends a seal of what it
// read since, signed with the control plane's key, expecting the last seal
// on the seal subject. Every replica of loom serve may run one: the
// expectation lets one seal land per position, so the seals form one chain
// without gaps, and a sealer whose append lost starts again from the seal
// that won. A seal covers at most SealSpan messages, so a sealer catching up
// on a long history seals it in steps.

// Defaults of the sealer.
const (
	DefaultSealEvery = time.Second
	DefaultSealSpan  = 100_000
)

// Retry bounds of the sealer when NATS is down or an append fails.
const (
	sealRetryMin = 100 * time.Millisecond
	sealRetryMax = 5 * time.Second
)

// sealerActor is the actor of the seals.
const sealerActor = "loom:sealer"

// sealFetch is how many messages the sealer reads at a time.
const sealFetch = 1000

// SealerConfig configures a Sealer.
type SealerConfig struct {
	JS   jetstream.JetStream
	Conn *nats.Conn
	// Key signs the seals.
	Key ed25519.PrivateKey
	// Every is how often the sealer seals what is new; zero means
	// DefaultSealEvery.
	Every time.Duration
	// Span bounds the messages one seal covers; zero means
	// DefaultSealSpan.
	Span   uint64
	Now    func() time.Time
	Logger *slog.Logger
}

// Sealer appends seals of LOOM_EVENTS.
type Sealer struct {
	cfg SealerConfig
	log *slog.Logger
}

// NewSealer returns a Sealer.
func NewSealer(cfg SealerConfig) (*Sealer, error) {
	if cfg.JS == nil || cfg.Conn == nil || len(cfg.Key) != ed25519.PrivateKeySize {
		return nil, errors.New("sealer: JS, Conn and an ed25519 Key are required")
	}
	if cfg.Every <= 0 {
		cfg.Every = DefaultSealEvery
	}
	if cfg.Span == 0 {
		cfg.Span = DefaultSealSpan
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Sealer{cfg: cfg, log: cfg.Logger.With("component", "sealer", "key", audit.KeyID(cfg.Key.Public().(ed25519.PublicKey)))}, nil
}

// lastSeal is where the chain of seals stands.
type lastSeal struct {
	// seq and hash are the last seal's sequence and stored hash (zero:
	// no seal yet); to and root what it covers.
	seq  uint64
	hash []byte
	to   uint64
	root audit.Hash
}

// errSealLost means another sealer appended first.
var errSealLost = errors.New("another sealer sealed first")

// Run seals until ctx ends; it returns nil then.
func (s *Sealer) Run(ctx context.Context) error {
	wait := sealRetryMin
	for {
		err := s.follow(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errSealLost) {
			// Another replica sealed: start again from its seal, after a
			// jittered pause so that replicas do not keep colliding.
			wait = sealRetryMin
			if backoff(ctx, 6) != nil {
				return nil
			}
			continue
		}
		s.log.Warn("sealing; retrying", "err", err, "in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, sealRetryMax)
	}
}

// follow reads the stream from the last seal on and seals, until ctx ends
// or an append fails.
func (s *Sealer) follow(ctx context.Context) error {
	last, err := s.load(ctx)
	if err != nil {
		return err
	}
	stream, err := s.cfg.JS.Stream(ctx, events.StreamEvents)
	if err != nil {
		return err
	}
	cons, err := bus.OrderedConsumer(ctx, s.cfg.JS, stream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: last.to + 1})
	if err != nil {
		return err
	}
	defer bus.Forget(s.cfg.JS, events.StreamEvents, cons)
	// One long-lived subscription: a Fetch on an ordered consumer makes a
	// new server-side consumer each call, and deletes the one before.
	iter, err := cons.Messages(jetstream.PullMaxMessages(sealFetch))
	if err != nil {
		return err
	}
	defer iter.Stop()
	defer context.AfterFunc(ctx, iter.Stop)()
	chain := audit.NewChain(last.to, last.root)
	// checked is when the sealer last sealed, or found nothing to seal:
	// a seal comes at most once per Every, however the appends trickle in.
	checked := s.cfg.Now()
	for {
		wait := s.cfg.Every - s.cfg.Now().Sub(checked)
		msg, err := iter.Next(jetstream.NextMaxWait(max(wait, time.Millisecond)))
		switch {
		case err == nil:
			meta, err := msg.Metadata()
			if err != nil {
				return err
			}
			if seq := meta.Sequence.Stream; seq != chain.Seq+1 {
				return fmt.Errorf("the stream skips from %d to %d: refusing to seal over a gap", chain.Seq, seq)
			}
			chain.Add(&audit.Message{Seq: meta.Sequence.Stream, Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()})
			if chain.Seq-last.to >= s.cfg.Span {
				if last, err = s.seal(ctx, last, chain); err != nil {
					return err
				}
				checked = s.cfg.Now()
			}
		case ctx.Err() != nil:
			return nil
		case !errors.Is(err, nats.ErrTimeout):
			return err
		}
		if s.cfg.Now().Sub(checked) >= s.cfg.Every {
			if sealable(last, chain) {
				if last, err = s.seal(ctx, last, chain); err != nil {
					return err
				}
			}
			checked = s.cfg.Now()
		}
	}
}

// sealable tells whether anything but the last seal itself is unsealed:
// an idle stream gets no seal of its own seals.
func sealable(last lastSeal, chain *audit.Chain) bool {
	return chain.Seq > last.to && (chain.Seq != last.seq || last.to+1 != last.seq)
}

// seal appends the seal of what chain read since last.
func (s *Sealer) seal(ctx context.Context, last lastSeal, chain *audit.Chain) (lastSeal, error) {
	sealed := events.AuditSealed{From: last.to + 1, To: chain.Seq, Root: chain.Root[:], PrevSeal: last.seq}
	audit.Sign(s.cfg.Key, &sealed, last.hash)
	env, data, err := events.Seal(sealed, events.KindAudit, events.AuditSealID,
		events.Origin{Actor: sealerActor, Time: s.cfg.Now()}, 0, last.hash)
	if err != nil {
		return last, err
	}
	msgID := "seal:" + sealed.KeyID + ":" + strconv.FormatUint(sealed.From, 10) + "-" + strconv.FormatUint(sealed.To, 10)
	a, err := bus.Append(ctx, s.cfg.JS, events.AuditSealSubject, &env, data, last.seq, msgID)
	switch {
	case errors.Is(err, bus.ErrWrongLastSeq):
		return last, errSealLost
	case err != nil:
		return last, err
	case a.Duplicate:
		return last, errSealLost
	}
	s.log.Debug("sealed", "from", sealed.From, "to", sealed.To, "seq", a.Seq)
	return lastSeal{seq: a.Seq, hash: events.Hash(data), to: sealed.To, root: chain.Root}, nil
}

// LastSeal reads the last seal through the stream leader: its stream
// sequence, stored bytes and content. bus.ErrNoMessage means there is none
// yet.
func LastSeal(ctx context.Context, nc *nats.Conn) (seq uint64, data []byte, sealed events.AuditSealed, err error) {
	msg, err := bus.LastOnSubject(ctx, nc, events.StreamEvents, events.AuditSealSubject)
	if err != nil {
		return 0, nil, sealed, err
	}
	rec, err := events.DecodeRecord(msg.Seq, msg.Subject, msg.Time, msg.Data)
	if err != nil {
		return 0, nil, sealed, fmt.Errorf("the last seal: %w", err)
	}
	sealed, ok := rec.Event.(events.AuditSealed)
	if !ok || len(sealed.Root) != len(audit.Hash{}) {
		return 0, nil, sealed, fmt.Errorf("the last message on %s (seq %d) is not a seal", events.AuditSealSubject, msg.Seq)
	}
	return msg.Seq, msg.Data, sealed, nil
}

// load reads the last seal through the stream leader; with none, the
// chain starts before the stream's first message.
func (s *Sealer) load(ctx context.Context) (lastSeal, error) {
	seq, data, sealed, err := LastSeal(ctx, s.cfg.Conn)
	if errors.Is(err, bus.ErrNoMessage) {
		stream, err := s.cfg.JS.Stream(ctx, events.StreamEvents)
		if err != nil {
			return lastSeal{}, err
		}
		info, err := stream.Info(ctx)
		if err != nil {
			return lastSeal{}, err
		}
		return lastSeal{to: max(info.State.FirstSeq, 1) - 1}, nil
	}
	if err != nil {
		return lastSeal{}, err
	}
	return lastSeal{seq: seq, hash: events.Hash(data), to: sealed.To, root: audit.Hash(sealed.Root)}, nil
}
