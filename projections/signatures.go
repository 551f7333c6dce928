package projections

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/hostkey"
)

// Signed observations. A host registered with a key (host.registered v2)
// has every observation on its loom.obs.<host>.… subjects checked before it
// is folded: it must carry a signature (events/hostkey) that verifies with
// the registered key over its subject, the sequence of the subject's
// previous message and its stored bytes, and its PrevHash must be the hash
// of that message. The runner keeps the head of every observation subject
// for this (heads.go), as it does for decision subjects. What fails is
// flagged, with its own code, and never applied:
//
//   - unsigned_observation: no signature;
//   - forged_observation: chained to the subject's last message, but not
//     signed for it by the host's key (another host's key, bytes changed
//     after signing, or a copy of the last message published again to
//     replay what followed it);
//   - replayed_observation: neither chained to the subject's last message
//     nor signed for this place (an old observation published again);
//   - chain_broken: signed for this place, but naming another previous
//     message than the one there.
//
// Observations of a host registered without a key (or not registered) are
// taken as they come: the legacy, insecure mode, in which anyone who may
// publish on a host's subjects speaks for it. Observations stored before
// a host's key was registered were taken that way, and stay taken.
//
// Verifying costs an ed25519 verification, ~50 µs here, more than the rest
// of applying a message. So the consumer's goroutine verifies ahead, with
// the key the message names and the sequence it was appended under
// (Nats-Expected-Last-Subject-Sequence), both taken from its headers; the
// runner uses that answer only when the key is the host's and the
// sequence is the subject's previous one as it folded them, and verifies
// again itself otherwise. Either way the answer is that of the runner's
// own check, whatever the headers claim.

// Unsafe switches protections of the read models off, for the tests that
// show what each guards: never set it in production.
type Unsafe struct {
	// NoSignatureCheck applies observations of hosts registered with a key
	// without checking their signatures.
	NoSignatureCheck bool
}

// checkSignature checks an observation of a host registered with a key; it
// returns a *rejection if it must not be applied, nil if it may (or its
// host has no key), and any other error if the store failed.
func (b *batch) checkSignature(d *delivery) error {
	host, err := b.r.hosts.load(b.s.db, d.addr.Host)
	if err != nil {
		return err
	}
	key := host.state.Key
	if key == "" {
		return nil
	}
	subject := d.rec.Subject
	prev, err := b.head(subject)
	if err != nil {
		return err
	}
	sig := &d.sig
	if !sig.Present {
		return &rejection{code: events.CodeUnsignedObservation,
			reason: fmt.Sprintf("not signed, but host %s is registered with key %s: is its agent running without --host-key?", d.addr.Host, key)}
	}
	valid := false
	if pub, err := b.r.keys.Key(key); err == nil {
		valid = sig.HoldsFor(b.r.keys, key, pub, subject, prev.Seq, d.hash)
	}
	chained := bytes.Equal(d.rec.Envelope.PrevHash, prev.Hash)
	switch {
	case valid && chained:
		return nil
	case valid:
		return &rejection{code: events.CodeChainBroken,
			reason: fmt.Sprintf("signed by host %s's key to follow seq %d on its subject, but names another message as its previous", d.addr.Host, prev.Seq)}
	case chained:
		return &rejection{code: events.CodeForgedObservation,
			reason: fmt.Sprintf("its signature does not verify with host %s's key %s after seq %d%s", d.addr.Host, key, prev.Seq, signedBy(sig, key))}
	}
	return &rejection{code: events.CodeReplayedObservation,
		reason: fmt.Sprintf("it does not follow its subject's last message (seq %d), and is not signed by host %s's key for this place: an old observation published again?",
			prev.Seq, d.addr.Host)}
}

// signedBy says which key the headers name, when it is not the host's.
func signedBy(sig *hostkey.Claim, key string) string {
	switch {
	case !sig.Decoded:
		return " (its signature header is malformed)"
	case sig.Signer != key:
		return fmt.Sprintf(" (it names %q as its signer)", sig.Signer)
	}
	return ""
}

// head is where subject stands before the message being applied: in this
// batch, or as committed.
func (b *batch) head(subject string) (events.Head, error) {
	if h, ok := b.heads[subject]; ok {
		return h, nil
	}
	value, closer, err := b.s.db.Get(nameKey(prefixHead, subject))
	if errors.Is(err, pebble.ErrNotFound) {
		return events.Head{}, nil
	}
	if err != nil {
		return events.Head{}, fmt.Errorf("head of %s: %w", subject, err)
	}
	defer func() { _ = closer.Close() }()
	h, err := decodeHead(value)
	if err != nil {
		return events.Head{}, fmt.Errorf("head of %s: %w", subject, err)
	}
	h.Hash = bytes.Clone(h.Hash)
	return h, nil
}
