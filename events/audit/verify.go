package audit

import (
	"bytes"
	"cmp"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
)

// hostSubjectPrefix starts the decision subjects of hosts.
var hostSubjectPrefix = events.EventSubject(events.KindHost, "")

// maxProblems bounds the problems a Report lists; the rest are counted.
const maxProblems = 100

// Problem is one thing wrong with a history.
type Problem struct {
	// Seq is the first sequence the problem implicates. Through, if set,
	// ends the range it implicates (a seal that does not match what it
	// covers cannot say which of the messages was changed).
	Seq     uint64      `json:"seq"`
	Through uint64      `json:"through,omitempty"`
	Subject string      `json:"subject,omitempty"`
	Code    events.Code `json:"code"`
	Message string      `json:"message"`
}

func (p Problem) String() string {
	if p.Through != 0 {
		return fmt.Sprintf("seq %d to %d: %s: %s", p.Seq, p.Through, p.Code.Name(), p.Message)
	}
	return fmt.Sprintf("seq %d: %s: %s", p.Seq, p.Code.Name(), p.Message)
}

// SealRef names one seal: where it is stored, what it covers, and the hash
// of its stored bytes (which commits to its root and everything before).
type SealRef struct {
	Seq  uint64 `json:"seq"`
	To   uint64 `json:"to"`
	Root []byte `json:"root"`
	Hash []byte `json:"hash"`
}

// Report is what a verification found.
type Report struct {
	// First and Last are the first and last sequences read; Messages how
	// many messages were read.
	First, Last uint64
	Messages    uint64
	// Seals counts the seals that verified.
	Seals int
	// FirstSeal and LastSeal are the first and last seals that verified.
	FirstSeal, LastSeal SealRef
	// Unsealed counts the messages after the last seal's To: not yet
	// covered by any seal.
	Unsealed uint64
	// Signed counts the observations whose signature verified with their
	// host's key; Unchecked those of hosts that had no key when they were
	// stored (the legacy mode), which nothing vouches for.
	Signed, Unchecked uint64
	// Problems lists the problems found, in the order found; Dropped
	// counts those beyond the first maxProblems.
	Problems []Problem
	Dropped  int
}

// OK tells whether the history verified.
func (r *Report) OK() bool { return len(r.Problems) == 0 }

// FirstBad is the problem that names the earliest bad message; a problem
// that names one message comes before one that implicates a range.
func (r *Report) FirstBad() (Problem, bool) {
	if len(r.Problems) == 0 {
		return Problem{}, false
	}
	return slices.MinFunc(r.Problems, func(a, b Problem) int {
		if (a.Through == 0) != (b.Through == 0) {
			if a.Through == 0 {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.Seq, b.Seq)
	}), true
}

// head is where a subject stands in the history read so far.
type head struct {
	seq  uint64
	hash Hash
}

// pending is one message after the last verified seal's To.
type pending struct {
	seq        uint64
	leaf, root Hash
}

// Verifier checks a history read in stream order, one message at a time:
// that no sequence is missing, that each event's PrevHash is the hash of
// the previous event on its subject and its expected-sequence header names
// that event, that every seal is signed by a trusted key, follows the seal
// before it and signs the running root of what it covers, that every
// observation of a host registered with a key is signed by it for its
// place (verify_obs.go), and that the history holds what the pin recorded. It never stops at a problem: it
// records it and reads on, so one tampering does not hide another.
type Verifier struct {
	keys map[string]ed25519.PublicKey
	pin  *Pin

	x       *Hasher
	root    Hash
	started bool
	heads   map[string]head
	// gaps are the first sequences of the missing runs, in order.
	gaps []uint64
	// pending holds the messages after the last seal's To, which a later
	// seal must cover.
	pending []pending
	// sealed is the last seal that verified; zero Seq before the first.
	sealed     SealRef
	reachedPin bool
	report     Report
	// hostKeys are the keys hosts are registered with so far, by host.
	hostKeys map[string]hostKey
	// sigs checks observations' signatures.
	sigs *hostkey.Verifier
	// env is reused from one message to the next.
	env events.Envelope
	// unsafeSkipRoots switches the seals' root check off, for the test
	// that shows what it guards.
	unsafeSkipRoots bool
}

// NewVerifier returns a Verifier that trusts keys (by KeyID), and checks
// the history against pin unless it is nil.
func NewVerifier(keys []ed25519.PublicKey, pin *Pin) *Verifier {
	v := &Verifier{keys: map[string]ed25519.PublicKey{}, pin: pin, x: NewHasher(), heads: map[string]head{},
		hostKeys: map[string]hostKey{}, sigs: hostkey.NewVerifier()}
	for _, k := range keys {
		v.keys[KeyID(k)] = k
	}
	return v
}

func (v *Verifier) problem(seq uint64, subject string, code events.Code, format string, args ...any) {
	v.record(Problem{Seq: seq, Subject: subject, Code: code, Message: fmt.Sprintf(format, args...)})
}

func (v *Verifier) record(p Problem) {
	if len(v.report.Problems) == maxProblems {
		v.report.Dropped++
		return
	}
	v.report.Problems = append(v.report.Problems, p)
}

// Add reads the next message of the history.
func (v *Verifier) Add(m *Message) {
	v.sequence(m.Seq)
	var leaf, hash Hash
	if m.pre.done {
		leaf, hash = m.pre.leaf, m.pre.hash
	} else {
		leaf, hash = v.x.Leaf(m), sha256.Sum256(m.Data)
	}
	v.root = v.x.Next(v.root, leaf)
	v.pending = append(v.pending, pending{seq: m.Seq, leaf: leaf, root: v.root})

	// Whatever it holds, it is the subject's last message now: the next
	// event on the subject names its hash.
	defer func() { v.heads[m.Subject] = head{seq: m.Seq, hash: hash} }()
	env := &v.env
	*env = events.Envelope{}
	if err := events.Unmarshal(m.Data, env); err != nil {
		v.problem(m.Seq, m.Subject, events.CodeCorruptEvent, "not a Loom envelope: %v", err)
		return
	}
	switch {
	case strings.HasPrefix(m.Subject, observationPrefix):
		if !v.observation(m, env, &hash) {
			return // the message is the bad one, not the one before it
		}
	case strings.HasPrefix(m.Subject, hostSubjectPrefix):
		v.learnKey(m, env)
	}
	v.link(m, env)
	if m.Subject == events.AuditSealSubject {
		v.seal(m, env, slices.Clone(hash[:])) // a copy: hash stays on the stack
	}
}

// sequence checks that seq follows the last one read.
func (v *Verifier) sequence(seq uint64) {
	r := &v.report
	r.Messages++
	switch {
	case !v.started:
		v.started, r.First = true, seq
		if seq != 1 {
			v.gaps = append(v.gaps, 1)
			v.problem(1, "", events.CodeHistoryGap, "the history starts at sequence %d: sequences 1 to %d are missing", seq, seq-1)
		}
	case seq <= r.Last:
		v.problem(seq, "", events.CodeHistoryGap, "sequence %d comes after %d: the history is out of order", seq, r.Last)
	case seq != r.Last+1:
		v.gaps = append(v.gaps, r.Last+1)
		v.problem(r.Last+1, "", events.CodeHistoryGap, "sequences %d to %d are missing", r.Last+1, seq-1)
	}
	r.Last = max(r.Last, seq)
}

// link checks that an event follows the previous event on its subject.
func (v *Verifier) link(m *Message, env *events.Envelope) {
	prev, ok := v.heads[m.Subject]
	if expected, checked := bus.ExpectedOnSubject(m.Header, m.Subject); checked && expected > prev.seq {
		// The append was accepted only if the subject's last event was
		// at expected. If this event still names the one before it by
		// hash, that one was moved there from expected; otherwise the
		// one at expected is gone.
		if ok && bytes.Equal(env.PrevHash, prev.hash[:]) {
			v.problem(min(prev.seq, expected), m.Subject, events.CodeChainBroken,
				"the subject's event at %d was stored at %d (so says the next one, at %d): events were moved", prev.seq, expected, m.Seq)
			return
		}
		v.problem(expected, m.Subject, events.CodeChainBroken,
			"the subject's event at %d is missing (the next one, at %d, was stored after it)", expected, m.Seq)
		return
	}
	switch {
	case !ok && len(env.PrevHash) != 0:
		v.problem(m.Seq, m.Subject, events.CodeChainBroken, "names a previous event on its subject, but the history has none before it")
	case ok && !bytes.Equal(env.PrevHash, prev.hash[:]):
		if gap := v.gapAfter(prev.seq); gap != 0 {
			v.problem(gap, m.Subject, events.CodeChainBroken, "the previous event on its subject is not the one at %d that this event at %d names: it was among the missing", prev.seq, m.Seq)
			return
		}
		v.problem(prev.seq, m.Subject, events.CodeChainBroken, "the event at %d is not the one the next event on its subject (at %d) names as its previous: it was changed", prev.seq, m.Seq)
	}
}

// gapAfter is the first missing sequence after seq, or zero.
func (v *Verifier) gapAfter(seq uint64) uint64 {
	i := sort.Search(len(v.gaps), func(i int) bool { return v.gaps[i] > seq })
	if i == len(v.gaps) {
		return 0
	}
	return v.gaps[i]
}
