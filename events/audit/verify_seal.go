package audit

import (
	"bytes"
	"cmp"
	"fmt"
	"maps"
	"slices"

	"github.com/loomctl/loom/events"
)

// seal checks a seal: its key, its signature, that it follows the seal
// before it, and that it signs the running root at its To. A seal whose
// signature verifies becomes the last seal even if what it covers does
// not match: the roots after it are counted from its root, so one
// tampering is reported once and later seals are checked on their own.
func (v *Verifier) seal(m *Message, env *events.Envelope, hash []byte) {
	ev, err := events.DecodePayload(env.Type, env.Version, env.Payload)
	s, ok := ev.(events.AuditSealed)
	if err != nil || !ok {
		v.problem(m.Seq, m.Subject, events.CodeCorruptEvent, "not a seal on the seal subject (%s): %v", env.Type, err)
		return
	}
	if len(s.Root) != len(Hash{}) {
		v.problem(m.Seq, m.Subject, events.CodeCorruptEvent, "a seal whose root is %d bytes, not %d", len(s.Root), len(Hash{}))
		return
	}
	if !v.signed(m.Seq, &s, env.PrevHash) {
		return
	}
	if s.PrevSeal != v.sealed.Seq {
		v.problem(m.Seq, m.Subject, events.CodeSealMismatch, "names the seal at %d as the one before it, but that is at %d", s.PrevSeal, v.sealed.Seq)
	}
	from := v.report.First
	if v.sealed.Seq != 0 {
		from = v.sealed.To + 1
	}
	i, found := slices.BinarySearchFunc(v.pending, s.To, func(p pending, seq uint64) int { return cmp.Compare(p.seq, seq) })
	matched := false
	switch {
	case s.From != from || s.To < s.From || s.To >= m.Seq:
		v.problem(m.Seq, m.Subject, events.CodeSealMismatch, "covers %d to %d, but the seals before it end at %d", s.From, s.To, from-1)
	case !found:
		v.problem(s.To, m.Subject, events.CodeSealMismatch, "covers up to %d, which is missing from the history", s.To)
	case !v.unsafeSkipRoots && !bytes.Equal(v.pending[i].root[:], s.Root):
		v.record(Problem{Seq: s.From, Through: s.To, Subject: m.Subject, Code: events.CodeSealMismatch,
			Message: fmt.Sprintf("these events do not hash to the root the seal at %d signed: one of them was changed, removed or put out of order", m.Seq)})
	default:
		matched = true
	}
	v.advance(m.Seq, &s, hash, i, found, matched)
}

// signed checks a seal's key and signature.
func (v *Verifier) signed(seq uint64, s *events.AuditSealed, prevHash []byte) bool {
	key, known := v.keys[s.KeyID]
	switch {
	case !known:
		v.problem(seq, events.AuditSealSubject, events.CodeUnknownKey, "signed by key %s, but the keys given are %v: give its public key with --key", s.KeyID, slices.Sorted(maps.Keys(v.keys)))
		return false
	case v.pin != nil && !slices.Contains(v.pin.Keys, s.KeyID):
		v.problem(seq, events.AuditSealSubject, events.CodeUnknownKey, "signed by key %s, which the pin does not trust (it trusts %v)", s.KeyID, v.pin.Keys)
		return false
	case !VerifySeal(key, s, prevHash):
		v.problem(seq, events.AuditSealSubject, events.CodeBadSignature, "its signature does not verify with key %s: the seal was forged or changed", s.KeyID)
		return false
	}
	return true
}

// advance makes a signed seal the last one. i is where its To is in
// pending, if found; matched says the root there is the seal's.
func (v *Verifier) advance(seq uint64, s *events.AuditSealed, hash []byte, i int, found, matched bool) {
	ref := SealRef{Seq: seq, To: s.To, Root: s.Root, Hash: hash}
	if v.report.Seals == 0 {
		v.report.FirstSeal = ref
		if v.pin != nil && (v.pin.First.Seq != seq || !bytes.Equal(v.pin.First.Hash, hash)) {
			v.problem(seq, events.AuditSealSubject, events.CodePinMismatch, "the first seal is not the one pinned (at %d): this is another history", v.pin.First.Seq)
		}
	}
	v.report.Seals++
	v.report.LastSeal, v.sealed = ref, ref
	if v.pin != nil && seq == v.pin.Last.Seq {
		v.reachedPin = true
		if !bytes.Equal(v.pin.Last.Hash, hash) {
			v.problem(seq, events.AuditSealSubject, events.CodePinMismatch, "the seal here is not the one pinned: the history was rewritten from here or before")
		}
	}
	if !found {
		return
	}
	v.pending = v.pending[i+1:]
	if matched {
		return
	}
	// Count the roots after To from the seal's root, so that what went
	// wrong before it is reported once.
	root := Hash(s.Root)
	for j := range v.pending {
		root = v.x.Next(root, v.pending[j].leaf)
		v.pending[j].root = root
	}
	v.root = root
}

// Finish ends the history and reports.
func (v *Verifier) Finish() *Report {
	r := &v.report
	if v.pin != nil && !v.reachedPin {
		v.problem(r.Last, "", events.CodePinMismatch,
			"the history ends at %d without the last seal pinned (at %d, covering up to %d): its tail was cut, or an older copy restored", r.Last, v.pin.Last.Seq, v.pin.Last.To)
	}
	r.Unsealed = r.Last - min(r.Last, v.sealed.To)
	if v.sealed.Seq == 0 && r.Messages > 0 {
		r.Unsealed = r.Messages
	}
	return r
}
