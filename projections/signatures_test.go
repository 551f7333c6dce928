package projections

import (
	"context"
	"maps"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/events/hostkey"
)

// observe publishes ev on subject as the agent holding key does: chained
// to the subject's last message, appended expecting it, and signed for
// that place (unsigned if key is nil). It returns the message, for a test
// that publishes it again.
func (p *publisher) observe(subject string, ev events.Event, key *hostkey.Key) (uint64, *nats.Msg) {
	p.t.Helper()
	msg := p.observation(subject, ev, key)
	return p.publish(msg), msg
}

// observation is the message observe publishes.
func (p *publisher) observation(subject string, ev events.Event, key *hostkey.Key) *nats.Msg {
	p.t.Helper()
	addr, err := events.ParseEventSubject(subject)
	if err != nil {
		p.t.Fatal(err)
	}
	p.tick++
	origin := events.Origin{Actor: "agent:" + addr.Host, Time: time.Unix(1_800_000_000+p.tick, 0)}
	env, data, err := events.Seal(ev, addr.Kind, addr.ID, origin, 0, p.prev[subject])
	if err != nil {
		p.t.Fatal(err)
	}
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(env.Type))
	msg.Header.Set(events.HeaderVersion, strconv.Itoa(env.Version))
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(p.last[subject], 10))
	if key != nil {
		msg.Header.Set(events.HeaderSigKey, key.Public())
		msg.Header.Set(events.HeaderSig, key.Sign(subject, p.last[subject], events.Hash(data)))
	}
	return msg
}

// again publishes a copy of msg, with the expected sequence an attacker
// who wants it stored would set: the subject's current last.
func (p *publisher) again(msg *nats.Msg) uint64 {
	p.t.Helper()
	copied := &nats.Msg{Subject: msg.Subject, Data: msg.Data, Header: cloneHeader(msg.Header)}
	copied.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(p.last[msg.Subject], 10))
	return p.publish(copied)
}

// keyedFleet is two hosts registered with keys and a VM placed on h1.
type keyedFleet struct {
	bus      *bustest.Bus
	pub      *publisher
	h1, h2   *hostkey.Key
	obs      string // web's observation subject on h1
	uid      string
	placedAt uint64
}

func newKeyedFleet(t *testing.T) *keyedFleet {
	f := &keyedFleet{bus: bustest.Start(t), uid: "u-web", obs: events.ObservationSubject("h1", events.KindVM, "web")}
	f.pub = newPublisher(t, f.bus)
	var err error
	if f.h1, err = hostkey.Generate(); err != nil {
		t.Fatal(err)
	}
	if f.h2, err = hostkey.Generate(); err != nil {
		t.Fatal(err)
	}
	f.pub.event(events.EventSubject(events.KindHost, "h1"), events.HostRegistered{CPU: 4, MemoryMiB: 4096, Key: f.h1.Public()}, "reg-h1")
	f.pub.event(events.EventSubject(events.KindHost, "h2"), events.HostRegistered{CPU: 4, MemoryMiB: 4096, Key: f.h2.Public()}, "reg-h2")
	vm := events.EventSubject(events.KindVM, "web")
	f.pub.event(vm, events.VMCreated{UID: f.uid, Image: "demo", CPU: 1, MemoryMiB: 256, Desired: events.DesiredRunning}, "create-web")
	f.placedAt = f.pub.event(vm, events.VMPlaced{UID: f.uid, Host: "h1", AllocationSeq: 1}, "create-web")
	return f
}

func (f *keyedFleet) report(state events.ObservedState) events.VMObserved {
	return events.VMObserved{UID: f.uid, Incarnation: f.placedAt, State: state}
}

// observedAt is what the store holds of web's last observation.
func observedAt(t *testing.T, s *Store) events.Observation {
	t.Helper()
	vm, _, err := s.VM(context.Background(), "web")
	if err != nil {
		t.Fatal(err)
	}
	return vm.Observed
}

// flaggedCodes are the store's flagged messages' codes by sequence.
func flaggedCodes(t *testing.T, s *Store) map[uint64]events.Code {
	t.Helper()
	flagged, err := s.FlaggedEvents(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64]events.Code{}
	for _, f := range flagged {
		out[f.Seq] = f.Code
		t.Logf("flagged %d %s %s: %s", f.Seq, f.Subject, f.Code.Name(), f.Reason)
	}
	return out
}

// TestSignatures_AttackSuite publishes, on real NATS into a real store, what
// an attacker who may publish on h1's subjects can: a report with a forged
// signature, one signed by h2's key, an unsigned one, an old report
// published again, and a copy of the subject's last message followed by
// the report that once followed it. Each is flagged with its code and
// changes nothing; h1's own agent's reports, before and after, are applied.
func TestSignatures_AttackSuite(t *testing.T) {
	f := newKeyedFleet(t)
	s := openStore(t, t.TempDir(), Options{})
	run(t, s, f.bus.JS)
	p := f.pub

	running, runningMsg := p.observe(f.obs, f.report(events.ObservedRunning), f.h1)
	catchUp(t, s, running)
	if o := observedAt(t, s); o.Seq != running || o.State != events.ObservedRunning {
		t.Fatalf("h1's own signed report was not applied: %+v", o)
	}
	stopped, _ := p.observe(f.obs, f.report(events.ObservedStopped), f.h1)

	want := map[uint64]events.Code{}
	// A signature of the right shape, by nobody: h1's, one bit changed.
	msg := p.observation(f.obs, f.report(events.ObservedCrashed), f.h1)
	sig := []byte(msg.Header.Get(events.HeaderSig))
	sig[5] ^= 0x01
	msg.Header.Set(events.HeaderSig, string(sig))
	want[p.publish(msg)] = events.CodeForgedObservation
	// Signed by h2's key, on h1's subject.
	other, _ := p.observe(f.obs, f.report(events.ObservedCrashed), f.h2)
	want[other] = events.CodeForgedObservation
	// Not signed at all.
	unsigned, _ := p.observe(f.obs, f.report(events.ObservedCrashed), nil)
	want[unsigned] = events.CodeUnsignedObservation
	// h1's own "running" report, published again after "stopped".
	replay := p.again(runningMsg)
	want[replay] = events.CodeReplayedObservation
	catchUp(t, s, replay)

	got := flaggedCodes(t, s)
	for at, code := range want {
		if got[at] != code {
			t.Errorf("seq %d flagged %s, want %s", at, got[at].Name(), code.Name())
		}
	}
	if o := observedAt(t, s); o.Seq != stopped || o.State != events.ObservedStopped {
		t.Fatalf("observation after the attacks = %+v, want h1's own stopped report at %d", o, stopped)
	}

	// A copy of the subject's last message, then the report that followed
	// the original: chained by hash to the copy, but signed for the
	// original's place. Only the sequence in the signature tells.
	_, lastMsg := p.observe(f.obs, f.report(events.ObservedPaused), f.h1)
	_, followMsg := p.observe(f.obs, f.report(events.ObservedRunning), f.h1)
	copied := p.again(lastMsg)
	followAgain := p.again(followMsg)
	catchUp(t, s, followAgain)
	got = flaggedCodes(t, s)
	if got[copied] != events.CodeReplayedObservation || got[followAgain] != events.CodeForgedObservation {
		t.Fatalf("copy of the last message flagged %s, the report after it %s; want replayed_observation, forged_observation",
			got[copied].Name(), got[followAgain].Name())
	}

	// h1's agent goes on after all of it (it appends after whatever is
	// last on its subject), and is applied.
	final, _ := p.observe(f.obs, f.report(events.ObservedStopped), f.h1)
	catchUp(t, s, final)
	if o := observedAt(t, s); o.Seq != final || o.State != events.ObservedStopped {
		t.Fatalf("h1's report after the attacks = %+v, want applied at %d", o, final)
	}
	head, err := s.Head(context.Background(), f.obs)
	if err != nil || head.Seq != final || string(head.Hash) != string(p.prev[f.obs]) {
		t.Fatalf("head of %s = %d (%v), want %d", f.obs, head.Seq, err, final)
	}
}

// TestSignatures_UnsafeLetsTheForgeryThrough reads one stream into two
// stores, one with the signature check off: the report signed by h2's key
// on h1's subject is flagged by one and applied by the other.
func TestSignatures_UnsafeLetsTheForgeryThrough(t *testing.T) {
	f := newKeyedFleet(t)
	checked := openStore(t, t.TempDir(), Options{})
	unchecked := openStore(t, t.TempDir(), Options{Unsafe: Unsafe{NoSignatureCheck: true}})
	run(t, checked, f.bus.JS)
	run(t, unchecked, f.bus.JS)
	running, _ := f.pub.observe(f.obs, f.report(events.ObservedRunning), f.h1)
	forged, _ := f.pub.observe(f.obs, f.report(events.ObservedCrashed), f.h2)
	catchUp(t, checked, forged)
	catchUp(t, unchecked, forged)
	if o := observedAt(t, checked); o.Seq != running || flaggedCodes(t, checked)[forged] != events.CodeForgedObservation {
		t.Fatalf("checked: observed %+v, flagged %v; want running at %d and the forgery flagged", o, flaggedCodes(t, checked), running)
	}
	if o := observedAt(t, unchecked); o.Seq != forged || o.State != events.ObservedCrashed {
		t.Fatalf("unchecked: observed %+v; want the forged crash at %d applied", o, forged)
	}
}

// TestSignatures_LegacyHostTakesAnythingUntilItHasAKey: a host registered
// without a key has its unsigned reports applied, as before keys; once it
// is registered again with one, an unsigned report is flagged and a signed
// one applied.
func TestSignatures_LegacyHostTakesAnythingUntilItHasAKey(t *testing.T) {
	b := bustest.Start(t)
	p := newPublisher(t, b)
	s := openStore(t, t.TempDir(), Options{})
	run(t, s, b.JS)
	key, err := hostkey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	host := events.EventSubject(events.KindHost, "h1")
	p.event(host, events.HostRegistered{CPU: 4, MemoryMiB: 4096}, "reg-h1")
	vm := events.EventSubject(events.KindVM, "web")
	p.event(vm, events.VMCreated{UID: "u", Image: "demo", CPU: 1, MemoryMiB: 256, Desired: events.DesiredRunning}, "c")
	placed := p.event(vm, events.VMPlaced{UID: "u", Host: "h1", AllocationSeq: 1}, "c")
	obs := events.ObservationSubject("h1", events.KindVM, "web")
	legacy, _ := p.observe(obs, events.VMObserved{UID: "u", Incarnation: placed, State: events.ObservedRunning}, nil)
	p.event(host, events.HostRegistered{CPU: 4, MemoryMiB: 4096, Key: key.Public()}, "rekey-h1")
	unsigned, _ := p.observe(obs, events.VMObserved{UID: "u", Incarnation: placed, State: events.ObservedCrashed}, nil)
	signed, _ := p.observe(obs, events.VMObserved{UID: "u", Incarnation: placed, State: events.ObservedPaused}, key)
	catchUp(t, s, signed)
	codes := flaggedCodes(t, s)
	if _, flagged := codes[legacy]; flagged || codes[unsigned] != events.CodeUnsignedObservation || len(codes) != 1 {
		t.Fatalf("flagged %v: want only the unsigned report after the key (%d)", codes, unsigned)
	}
	if o := observedAt(t, s); o.Seq != signed {
		t.Fatalf("observed %+v, want the signed report at %d", o, signed)
	}
}

// TestSignatures_FlagExactlyTheForged applies a generated history with
// hosts with and without keys, and forgeries of every kind: exactly what
// the generator forged on the subjects of hosts with keys is flagged as
// unsigned, forged or replayed, with the code it expects, and nothing its
// agents signed is. With the check off, none is flagged and the read
// models differ.
func TestSignatures_FlagExactlyTheForged(t *testing.T) {
	for _, seed := range seeds(21, 22, 23) {
		h := newHistory(testFleet, seed, 1)
		deliveries := historyDeliveries(h, 3000)
		checked := openStore(t, t.TempDir(), Options{})
		if err := checked.applyDeliveries(deliveries); err != nil {
			t.Fatal(err)
		}
		got := map[uint64]events.Code{}
		flagged, err := checked.FlaggedEvents(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range flagged {
			switch f.Code {
			case events.CodeUnsignedObservation, events.CodeForgedObservation, events.CodeReplayedObservation, events.CodeChainBroken:
				got[f.Seq] = f.Code
			}
		}
		if len(h.forged) == 0 || !maps.Equal(got, h.forged) {
			t.Fatalf("seed %d: flagged %v\nwant the forgeries %v", seed, got, h.forged)
		}

		unchecked := openStore(t, t.TempDir(), Options{Unsafe: Unsafe{NoSignatureCheck: true}})
		if err := unchecked.applyDeliveries(deliveries); err != nil {
			t.Fatal(err)
		}
		for _, f := range mustFlagged(t, unchecked) {
			if _, forged := h.forged[f.Seq]; forged && f.Code != events.CodeStaleObservation {
				t.Fatalf("seed %d: with the check off, the forgery at %d was still flagged %s", seed, f.Seq, f.Code.Name())
			}
		}
		if d := diff(dump(t, checked), dump(t, unchecked)); len(d) == 0 {
			t.Fatalf("seed %d: the forgeries changed nothing with the check off", seed)
		}
		t.Logf("seed %d: %d forgeries flagged", seed, len(got))
	}
}

func mustFlagged(t *testing.T, s *Store) []Flagged {
	t.Helper()
	flagged, err := s.FlaggedEvents(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return flagged
}

// TestSignatures_AheadCheckChangesNothing: whether the consumer's goroutine
// verified a signature ahead or the runner verifies it, the read models
// are the same.
func TestSignatures_AheadCheckChangesNothing(t *testing.T) {
	deliveries := historyDeliveries(newHistory(testFleet, 31, 1), 3000)
	ahead := openStore(t, t.TempDir(), Options{})
	if err := ahead.applyDeliveries(deliveries); err != nil {
		t.Fatal(err)
	}
	checkedAhead := 0
	for i := range deliveries {
		if deliveries[i].sig.Checked {
			checkedAhead++
		}
		deliveries[i].sig.Checked, deliveries[i].sig.Valid = false, false
	}
	if checkedAhead == 0 {
		t.Fatal("no signature was checked ahead")
	}
	behind := openStore(t, t.TempDir(), Options{})
	if err := behind.applyDeliveries(deliveries); err != nil {
		t.Fatal(err)
	}
	if d := diff(dump(t, ahead), dump(t, behind)); len(d) > 0 {
		t.Fatalf("checked ahead and not: %v", d)
	}
}

// TestHistory_KeysKeepItsShape: the benchmark's signed history is the
// unsigned one with keys and signatures, message for message, so that
// their rates compare.
func TestHistory_KeysKeepItsShape(t *testing.T) {
	unsigned, signed := newHistory(benchFleet, 7, 1), newHistory(historyConfig{hosts: benchFleet.hosts, images: benchFleet.images, liveVMs: benchFleet.liveVMs, keys: keysAll}, 7, 1)
	withSig := 0
	for i := range 5000 {
		u, s := unsigned.next(), signed.next()
		if u.subject != s.subject || u.typ != s.typ {
			t.Fatalf("message %d: %s %s unsigned, %s %s signed", i, u.subject, u.typ, s.subject, s.typ)
		}
		if s.header.Get(events.HeaderSig) != "" {
			withSig++
		}
	}
	if withSig == 0 {
		t.Fatal("no message of the signed history is signed")
	}
}
