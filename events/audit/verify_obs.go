package audit

import (
	"bytes"
	"crypto/ed25519"
	"strings"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/hostkey"
)

// Signed observations, as the verifier checks them. It learns each host's
// key from the host.registered events it reads, in stream order (they are
// sealed like everything else), and from then on checks every observation
// on the host's loom.obs.<host>.… subjects as the read models do: signed by
// that key, for the subject, the sequence of the subject's previous message
// and the stored bytes (events/hostkey). Observations of hosts without a
// key, or from before their key, are counted, not checked: the legacy mode.
//
// An observation whose signature holds is chained as any event: if it
// names another previous message than the one the history has, that one
// was changed, and the chain check says so. One whose signature does not
// hold is the bad message itself (unsigned, forged, or an old one published
// again), and is reported instead of the message before it.

// observationPrefix starts every observation subject.
const observationPrefix = "loom.obs."

// learnKey records the key of a host.registered event that carries one,
// on its host's own subject (the read models flag one elsewhere).
func (v *Verifier) learnKey(m *Message, env *events.Envelope) {
	if env.Type != events.TypeHostRegistered || env.Kind != events.KindHost || m.Subject[len(hostSubjectPrefix):] != env.AggregateID {
		return
	}
	ev, err := events.DecodePayload(env.Type, env.Version, env.Payload)
	reg, ok := ev.(events.HostRegistered)
	if err != nil || !ok {
		v.problem(m.Seq, m.Subject, events.CodeCorruptEvent, "a host.registered that does not decode: %v", err)
		return
	}
	if reg.Key == "" {
		return // a key once registered stays, as in the read models
	}
	key, err := hostkey.ParsePublic(reg.Key)
	if err != nil {
		v.problem(m.Seq, m.Subject, events.CodeCorruptEvent, "registers host %s with a key that does not parse: %v", env.AggregateID, err)
		return
	}
	v.hostKeys[env.AggregateID] = hostKey{public: reg.Key, key: key}
}

// hostKey is a host's registered key.
type hostKey struct {
	public string
	key    ed25519.PublicKey
}

// observation checks an observation's signature, if its host has a key.
// It returns false if the signature does not hold (the problem is
// recorded), true if it holds or is not checked.
func (v *Verifier) observation(m *Message, env *events.Envelope, hash *Hash) bool {
	host, _, _ := strings.Cut(m.Subject[len(observationPrefix):], ".")
	key, keyed := v.hostKeys[host]
	if !keyed {
		v.report.Unchecked++
		return true
	}
	prev := v.heads[m.Subject]
	value := header(m, events.HeaderSig)
	if value == "" {
		v.problem(m.Seq, m.Subject, events.CodeUnsignedObservation, "not signed, but host %s is registered with key %s", host, key.public)
		return false
	}
	claim := m.pre.claim // read ahead, if it was (ahead.go)
	if !m.pre.done {
		claim.Decoded = v.sigs.Decode(&claim.Sig, value)
	}
	switch {
	case claim.HoldsFor(v.sigs, key.public, key.key, m.Subject, prev.seq, hash[:]):
		v.report.Signed++
		return true
	case bytes.Equal(env.PrevHash, prev.hash[:]) || (prev.seq == 0 && len(env.PrevHash) == 0):
		v.problem(m.Seq, m.Subject, events.CodeForgedObservation,
			"its signature does not verify with host %s's key %s after seq %d on its subject%s", host, key.public, prev.seq, namedSigner(m, key.public))
	default:
		v.problem(m.Seq, m.Subject, events.CodeReplayedObservation,
			"it does not follow its subject's last message (seq %d), and is not signed by host %s's key for this place: an old observation published again?", prev.seq, host)
	}
	return false
}

// header is the first value of a stored header, or "".
func header(m *Message, name string) string {
	if values := m.Header[name]; len(values) > 0 {
		return values[0]
	}
	return ""
}

// namedSigner says which key the headers name, when it is not the host's.
func namedSigner(m *Message, key string) string {
	if signer := header(m, events.HeaderSigKey); signer != key {
		return " (it names " + signer + " as its signer)"
	}
	return ""
}
