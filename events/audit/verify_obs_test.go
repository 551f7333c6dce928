package audit

import (
	"crypto/ed25519"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/hostkey"
)

// observe stores ev on the observation subject of vm on host as its
// agent does: chained, under an expected-sequence check, signed with key
// for that place (unsigned if key is nil). It returns the message's index.
func (h *history) observe(host, vm string, ev events.Event, key *hostkey.Key) int {
	subject := events.ObservationSubject(host, events.KindVM, vm)
	seq := uint64(len(h.msgs) + 1)
	prevSeq, prevHash := h.prev(subject)
	_, data, err := events.Seal(ev, events.KindVM, vm, events.Origin{Actor: "agent:" + host, Time: time.Unix(int64(seq), 0)}, 0, prevHash)
	if err != nil {
		h.t.Fatal(err)
	}
	m := Message{Seq: seq, Subject: subject, Data: data, Header: map[string][]string{
		jetstream.ExpectedLastSubjSeqHeader: {strconv.FormatUint(prevSeq, 10)},
		events.HeaderType:                   {string(ev.EventType())},
	}}
	if key != nil {
		m.Header[events.HeaderSigKey] = []string{key.Public()}
		m.Header[events.HeaderSig] = []string{key.Sign(subject, prevSeq, events.Hash(data))}
	}
	h.add(m)
	return len(h.msgs) - 1
}

// again stores a copy of the message at index i as the subject's next,
// as an attacker republishing it would have it stored.
func (h *history) again(i int) int {
	m := copyMsgs(h.msgs[i : i+1])[0]
	prevSeq, _ := h.prev(m.Subject)
	m.Seq = uint64(len(h.msgs) + 1)
	m.Header[jetstream.ExpectedLastSubjSeqHeader] = []string{strconv.FormatUint(prevSeq, 10)}
	h.add(m)
	return len(h.msgs) - 1
}

func (h *history) add(m Message) {
	h.msgs = append(h.msgs, m)
	h.heads[m.Subject] = m.Seq
	h.chain.Add(&h.msgs[len(h.msgs)-1])
}

func (h *history) registerHost(name string, key *hostkey.Key) {
	reg := events.HostRegistered{CPU: 4, MemoryMiB: 1024}
	if key != nil {
		reg.Key = key.Public()
	}
	h.store(events.EventSubject(events.KindHost, name), reg, events.KindHost, name)
}

func mustKey(t *testing.T) *hostkey.Key {
	t.Helper()
	key, err := hostkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// TestVerify_SignedObservations: verify learns hosts' keys from their
// registrations and names, with its code and sequence, every observation
// of a keyed host that its agent did not sign for its place (each stored,
// then sealed, as if it had been published live); the agent's own reports
// around them, and those of a host without a key, pass.
func TestVerify_SignedObservations(t *testing.T) {
	sealKey := newKey(t)
	h1, h2 := mustKey(t), mustKey(t)
	running := events.VMObserved{UID: "u", Incarnation: 3, State: events.ObservedRunning}
	crashed := events.VMObserved{UID: "u", Incarnation: 3, State: events.ObservedCrashed}
	tests := []struct {
		name   string
		attack func(h *history) int // stores the bad message, returns its index
		code   events.Code
	}{
		{"a forged signature", func(h *history) int {
			i := h.observe("h1", "web", crashed, h1)
			sig := []byte(h.msgs[i].Header[events.HeaderSig][0])
			sig[3] ^= 1
			h.msgs[i].Header[events.HeaderSig] = []string{string(sig)}
			h.chain = NewChain(0, Hash{}) // the history as stored holds the doctored header
			for j := range h.msgs {
				h.chain.Add(&h.msgs[j])
			}
			return i
		}, events.CodeForgedObservation},
		{"signed by another host's key", func(h *history) int { return h.observe("h1", "web", crashed, h2) }, events.CodeForgedObservation},
		{"unsigned", func(h *history) int { return h.observe("h1", "web", crashed, nil) }, events.CodeUnsignedObservation},
		{"an old observation published again", func(h *history) int {
			return h.again(int(h.heads[events.ObservationSubject("h1", events.KindVM, "web")]) - 2)
		}, events.CodeReplayedObservation},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHistory(t, sealKey)
			h.registerHost("h1", h1)
			h.registerHost("h2", h2)
			h.registerHost("old", nil)
			h.observe("h1", "web", running, h1)
			h.observe("h1", "web", events.VMObserved{UID: "u", Incarnation: 3, State: events.ObservedPaused}, h1)
			h.observe("old", "db", running, nil)
			bad := tc.attack(h)
			h.observe("h1", "web", running, h1) // the agent goes on after it
			h.seal()
			r := verify(t, h.msgs, []ed25519.PublicKey{pub(sealKey)}, nil)
			if len(r.Problems) != 1 || r.Problems[0].Code != tc.code || r.Problems[0].Seq != h.msgs[bad].Seq {
				t.Fatalf("problems %v, want exactly %s at seq %d", r.Problems, tc.code.Name(), h.msgs[bad].Seq)
			}
			if r.Signed != 3 || r.Unchecked != 1 {
				t.Fatalf("%d signed, %d unchecked; want 3 and 1", r.Signed, r.Unchecked)
			}
		})
	}
}

// TestVerify_KeyFromItsRegistrationOn: observations of a host before its
// key was registered are unchecked; after it, an unsigned one is a problem.
// A signed observation whose previous message was changed is that
// message's problem (chain_broken), not the observation's.
func TestVerify_KeyFromItsRegistrationOn(t *testing.T) {
	sealKey := newKey(t)
	key := mustKey(t)
	h := newHistory(t, sealKey)
	running := events.VMObserved{UID: "u", Incarnation: 3, State: events.ObservedRunning}
	h.registerHost("h1", nil)
	h.observe("h1", "web", running, nil)
	h.registerHost("h1", key)
	changed := h.observe("h1", "web", running, key)
	h.observe("h1", "web", events.VMObserved{UID: "u", Incarnation: 3, State: events.ObservedPaused}, key)
	r := verify(t, h.msgs, []ed25519.PublicKey{pub(sealKey)}, nil)
	if !r.OK() || r.Signed != 2 || r.Unchecked != 1 {
		t.Fatalf("problems %v, %d signed, %d unchecked; want none, 2, 1", r.Problems, r.Signed, r.Unchecked)
	}
	doctored := copyMsgs(h.msgs)
	doctored[changed].Data = changeActor(t, doctored[changed].Data)
	r = verify(t, doctored, []ed25519.PublicKey{pub(sealKey)}, nil)
	bad, ok := r.FirstBad()
	if !ok || bad.Seq != doctored[changed].Seq {
		t.Fatalf("problems %v, want the changed observation at %d first", r.Problems, doctored[changed].Seq)
	}
}

// TestAhead_SameReportAsTheVerifierAlone: a signature worked out ahead,
// for the key and place its headers name, counts only where those are the
// host's key and the subject's previous message as the Verifier read
// them. A report signed by another host's key, and one whose previous
// message was cut from the history (its signature holds for the place its
// header names, which is no longer its place), get the same verdict both
// ways: verify runs each history alone and through Ahead, and compares.
func TestAhead_SameReportAsTheVerifierAlone(t *testing.T) {
	sealKey := newKey(t)
	h1, h2 := mustKey(t), mustKey(t)
	h := newHistory(t, sealKey)
	h.registerHost("h1", h1)
	for i := range 6 {
		h.observe("h1", "web", events.VMObserved{UID: "u", Incarnation: uint64(i + 1), State: events.ObservedRunning}, h1)
	}
	other := h.observe("h1", "web", events.VMObserved{UID: "u", Incarnation: 9, State: events.ObservedCrashed}, h2)
	h.seal()
	if r := verify(t, h.msgs, []ed25519.PublicKey{pub(sealKey)}, nil); len(r.Problems) != 1 || r.Problems[0].Seq != h.msgs[other].Seq {
		t.Fatalf("problems %v, want the report signed by h2's key only", r.Problems)
	}
	cut := append(copyMsgs(h.msgs[:4]), copyMsgs(h.msgs[5:])...)
	r := verify(t, cut, []ed25519.PublicKey{pub(sealKey)}, nil)
	if bad, ok := r.FirstBad(); !ok || bad.Code != events.CodeHistoryGap {
		t.Fatalf("problems %v, want the gap first", r.Problems)
	}
	if r.Signed != 4 {
		t.Errorf("%d signatures held, want 4: the one after the cut is not for its place", r.Signed)
	}
}
