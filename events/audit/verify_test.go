package audit

import (
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
)

// history writes a history as Loom's writers do: events chained on their
// subjects and stored under an expected-subject-sequence check, with a
// seal every sealEvery messages.
type history struct {
	t     *testing.T
	key   ed25519.PrivateKey
	msgs  []Message
	heads map[string]uint64 // subject -> index+1 of its last message
	// last seal
	sealSeq  uint64
	sealHash []byte
	sealTo   uint64
	chain    *Chain
}

func newHistory(t *testing.T, key ed25519.PrivateKey) *history {
	return &history{t: t, key: key, heads: map[string]uint64{}, chain: NewChain(0, Hash{})}
}

func (h *history) prev(subject string) (uint64, []byte) {
	i := h.heads[subject]
	if i == 0 {
		return 0, nil
	}
	return i, events.Hash(h.msgs[i-1].Data)
}

func (h *history) store(subject string, ev events.Event, kind events.Kind, id string) {
	seq := uint64(len(h.msgs) + 1)
	prevSeq, prevHash := h.prev(subject)
	_, data, err := events.Seal(ev, kind, id, events.Origin{Actor: "t", CommandID: strconv.Itoa(int(seq)), Time: time.Unix(1, 0)}, 0, prevHash)
	if err != nil {
		h.t.Fatal(err)
	}
	m := Message{Seq: seq, Subject: subject, Data: data, Header: map[string][]string{
		jetstream.ExpectedLastSubjSeqHeader: {strconv.FormatUint(prevSeq, 10)},
		events.HeaderType:                   {string(ev.EventType())},
	}}
	h.msgs = append(h.msgs, m)
	h.heads[subject] = seq
	h.chain.Add(&m)
}

func (h *history) event(vm string, cpu int) {
	h.store(events.EventSubject(events.KindVM, vm), events.VMGoalChanged{UID: vm, Desired: events.DesiredRunning}, events.KindVM, vm)
	_ = cpu
}

func (h *history) seal() {
	s := events.AuditSealed{From: h.sealTo + 1, To: h.chain.Seq, Root: slices.Clone(h.chain.Root[:]), PrevSeal: h.sealSeq}
	Sign(h.key, &s, h.sealHash)
	h.store(events.AuditSealSubject, s, events.KindAudit, events.AuditSealID)
	h.sealSeq, h.sealHash, h.sealTo = uint64(len(h.msgs)), events.Hash(h.msgs[len(h.msgs)-1].Data), s.To
}

// build writes n events over a few VMs with a seal after every every.
func build(t *testing.T, key ed25519.PrivateKey, n, every int) *history {
	h := newHistory(t, key)
	for i := range n {
		h.event(fmt.Sprintf("vm-%d", i%5), i)
		if (i+1)%every == 0 {
			h.seal()
		}
	}
	return h
}

// verify checks msgs with a Verifier alone, and again through Ahead (on
// three workers, in batches of five, with the pin as it was), and fails the test if the two
// reports differ: every test of the Verifier is one of Ahead too.
func verify(t *testing.T, msgs []Message, keys []ed25519.PublicKey, pin *Pin) *Report {
	t.Helper()
	var pinAhead *Pin
	if pin != nil {
		cp := *pin
		cp.Keys = slices.Clone(pin.Keys)
		pinAhead = &cp
	}
	v := NewVerifier(keys, pin)
	for i := range msgs {
		v.Add(&msgs[i])
	}
	alone := v.Finish()
	a := newAhead(NewVerifier(keys, pinAhead), 3, 5)
	for i := range msgs {
		m := msgs[i]
		a.Add(&m)
	}
	if ahead := a.Finish(); !reflect.DeepEqual(alone, ahead) {
		t.Fatalf("checked ahead, the report differs:\n%+v\nalone:\n%+v", ahead, alone)
	}
	return alone
}

func newKey(t *testing.T) ed25519.PrivateKey {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func pub(k ed25519.PrivateKey) ed25519.PublicKey { return k.Public().(ed25519.PublicKey) }

// copyMsgs deep-copies a history, so a doctored copy leaves the original.
func copyMsgs(msgs []Message) []Message {
	out := make([]Message, len(msgs))
	for i, m := range msgs {
		out[i] = Message{Seq: m.Seq, Subject: m.Subject, Data: slices.Clone(m.Data), Header: map[string][]string{}}
		for k, v := range m.Header {
			out[i].Header[k] = slices.Clone(v)
		}
	}
	return out
}

// renumber gives msgs consecutive sequences from 1, as a copy that was
// written afresh would have them.
func renumber(msgs []Message) []Message {
	for i := range msgs {
		msgs[i].Seq = uint64(i + 1)
	}
	return msgs
}

func TestVerify_OriginalPassesAndPins(t *testing.T) {
	key := newKey(t)
	h := build(t, key, 40, 10)
	h.event("vm-0", 0) // one unsealed
	r := verify(t, h.msgs, []ed25519.PublicKey{pub(key)}, nil)
	if !r.OK() {
		t.Fatalf("original: %v", r.Problems)
	}
	if r.Seals != 4 || r.LastSeal.Seq != 44 || r.LastSeal.To != 43 || r.Unsealed != 2 {
		t.Fatalf("report = %d seals, last %+v, %d unsealed; want 4, seal at 44 to 43, 2 unsealed", r.Seals, r.LastSeal, r.Unsealed)
	}
	pin := Advanced(nil, r, []string{KeyID(pub(key))})
	if r := verify(t, h.msgs, []ed25519.PublicKey{pub(key)}, pin); !r.OK() {
		t.Fatalf("against its own pin: %v", r.Problems)
	}
}

// TestVerify_CatchesEachDoctoring is issue 5's list: each doctored copy
// fails, naming the first bad event, and the original passes with the
// same pin.
func TestVerify_CatchesEachDoctoring(t *testing.T) {
	key := newKey(t)
	h := build(t, key, 60, 10)
	keys := []ed25519.PublicKey{pub(key)}
	original := verify(t, h.msgs, keys, nil)
	pin := Advanced(nil, original, []string{KeyID(pub(key))})
	// Messages 1..10 are events, 11 a seal, 12..21 events (vm-(i%5)),
	// 22 a seal, and so on.
	tests := []struct {
		name     string
		doctor   func([]Message) []Message
		code     events.Code
		firstBad uint64
	}{
		{"one event changed", func(m []Message) []Message {
			m[13].Data = changeActor(t, m[13].Data)
			return m
		}, events.CodeChainBroken, 14},
		{"one event removed", func(m []Message) []Message {
			return slices.Delete(m, 13, 14)
		}, events.CodeHistoryGap, 14},
		{"one event removed, the rest renumbered", func(m []Message) []Message {
			// vm-2's next event (19, now 18) was stored on the condition
			// that vm-2's last was at 14.
			return renumber(slices.Delete(m, 13, 14))
		}, events.CodeChainBroken, 14},
		{"two events swapped", func(m []Message) []Message {
			// vm-1's at 13 and vm-2's at 14: each subject's chain holds,
			// but vm-2's next event (19) was stored when vm-2's last was
			// at 14.
			m[12].Data, m[13].Data = m[13].Data, m[12].Data
			m[12].Subject, m[13].Subject = m[13].Subject, m[12].Subject
			m[12].Header, m[13].Header = m[13].Header, m[12].Header
			return m
		}, events.CodeChainBroken, 13},
		{"a subject dropped", func(m []Message) []Message {
			return slices.DeleteFunc(m, func(m Message) bool { return m.Subject == "loom.evt.vm.vm-3" })
		}, events.CodeHistoryGap, 4},
		{"the tail cut", func(m []Message) []Message {
			return m[:40]
		}, events.CodePinMismatch, 40},
		{"an older copy restored", func(m []Message) []Message {
			// The same first 44 messages, then other writes and seals:
			// at 66 stands another seal than the one pinned.
			old := build(t, key, 40, 10)
			for i := range 20 {
				old.event(fmt.Sprintf("other-%d", i%3), i)
				if (i+1)%10 == 0 {
					old.seal()
				}
			}
			return old.msgs
		}, events.CodePinMismatch, 66},
		{"a seal forged with another key", func(m []Message) []Message {
			forged := build(t, newKey(t), 60, 10)
			return forged.msgs
		}, events.CodeUnknownKey, 11},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := verify(t, tt.doctor(copyMsgs(h.msgs)), keys, pin)
			bad, ok := r.FirstBad()
			if !ok {
				t.Fatal("the doctored copy verified")
			}
			if bad.Code != tt.code || bad.Seq != tt.firstBad {
				t.Errorf("first bad = %v; want %s at %d\nall: %v", bad, tt.code.Name(), tt.firstBad, r.Problems)
			}
		})
	}
	if r := verify(t, h.msgs, keys, pin); !r.OK() {
		t.Fatalf("the original, after: %v", r.Problems)
	}
}

// changeActor rewrites one event's actor and re-encodes it: a change that
// still decodes.
func changeActor(t *testing.T, data []byte) []byte {
	var env events.Envelope
	if err := events.Unmarshal(data, &env); err != nil {
		t.Fatal(err)
	}
	env.Actor = "mallory"
	out, err := events.Marshal(&env)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestVerify_RootCatchesWhatChainsCannot swaps the last two events before a
// seal, on different subjects with no later events: every subject's chain
// and every expected sequence still hold, and only the seal's running root
// sees the new order. With the root check switched off the swap goes
// unseen.
func TestVerify_RootCatchesWhatChainsCannot(t *testing.T) {
	key := newKey(t)
	h := build(t, key, 20, 10)
	keys := []ed25519.PublicKey{pub(key)}
	swapped := copyMsgs(h.msgs)
	swapped[19], swapped[20] = swapped[20], swapped[19]
	swapped[19].Seq, swapped[20].Seq = 20, 21
	r := verify(t, swapped, keys, nil)
	if bad, ok := r.FirstBad(); !ok || bad.Code != events.CodeSealMismatch || bad.Seq != 11 || bad.Through != 21 {
		t.Fatalf("swap: %v; want seal_mismatch over 11 to 21", r.Problems)
	}
	v := NewVerifier(keys, nil)
	v.unsafeSkipRoots = true
	for i := range swapped {
		v.Add(&swapped[i])
	}
	if r := v.Finish(); !r.OK() {
		t.Fatalf("with the root check off the swap should go unseen; found %v", r.Problems)
	}
}

func TestVerify_WrongKeyFailsLoudly(t *testing.T) {
	key := newKey(t)
	h := build(t, key, 20, 10)
	other := newKey(t)
	r := verify(t, h.msgs, []ed25519.PublicKey{pub(other)}, nil)
	bad, ok := r.FirstBad()
	if !ok || bad.Code != events.CodeUnknownKey || !strings.Contains(bad.Message, KeyID(pub(key))) || !strings.Contains(bad.Message, KeyID(pub(other))) {
		t.Fatalf("wrong key: %v; want unknown_key naming both key ids", r.Problems)
	}
	// A seal whose signature was changed, under the right key id.
	doctored := copyMsgs(h.msgs)
	doctored[10].Data = resign(t, doctored[10].Data, other, KeyID(pub(key)))
	r = verify(t, doctored, []ed25519.PublicKey{pub(key)}, nil)
	if bad, ok := r.FirstBad(); !ok || bad.Code != events.CodeBadSignature || bad.Seq != 11 {
		t.Fatalf("forged signature: %v; want bad_signature at 11", r.Problems)
	}
}

// resign signs the seal in data with key but claims keyID.
func resign(t *testing.T, data []byte, key ed25519.PrivateKey, keyID string) []byte {
	var env events.Envelope
	if err := events.Unmarshal(data, &env); err != nil {
		t.Fatal(err)
	}
	ev, err := events.DecodePayload(env.Type, env.Version, env.Payload)
	if err != nil {
		t.Fatal(err)
	}
	s := ev.(events.AuditSealed)
	Sign(key, &s, env.PrevHash)
	s.KeyID = keyID
	if env.Payload, err = events.Marshal(s); err != nil {
		t.Fatal(err)
	}
	out, err := events.Marshal(&env)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestVerify_CorruptMessageReportedWithItsSequence(t *testing.T) {
	key := newKey(t)
	h := build(t, key, 20, 10)
	doctored := copyMsgs(h.msgs)
	doctored[4].Data = []byte{0xc1, 0xff}
	r := verify(t, doctored, []ed25519.PublicKey{pub(key)}, nil)
	if len(r.Problems) == 0 || r.Problems[0].Code != events.CodeCorruptEvent || r.Problems[0].Seq != 5 {
		t.Fatalf("corrupt message: %v; want corrupt_event at 5 first", r.Problems)
	}
}
