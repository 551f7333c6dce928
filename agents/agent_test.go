package agents

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

func TestPlan(t *testing.T) {
	const (
		running = events.DesiredRunning
		paused  = events.DesiredPaused
		stopped = events.DesiredStopped
		absent  = events.DesiredAbsent
	)
	tests := []struct {
		name    string
		desired events.Desired
		found   bool
		state   libvirt.State
		current bool
		want    []step
	}{
		{"running from nothing", running, false, 0, false, []step{stepDefine, stepStart}},
		{"running from shutoff", running, true, libvirt.StateShutoff, true, []step{stepStart}},
		{"running from paused", running, true, libvirt.StatePaused, true, []step{stepResume}},
		{"running from crashed", running, true, libvirt.StateCrashed, true, []step{stepDestroy, stepStart}},
		{"running already", running, true, libvirt.StateRunning, true, nil},
		{"running, old metadata", running, true, libvirt.StateRunning, false, []step{stepDefine}},
		{"running while shutting down", running, true, libvirt.StateShutdown, true, nil},
		{"paused from nothing", paused, false, 0, false, []step{stepDefine, stepStart, stepSuspend}},
		{"paused from running", paused, true, libvirt.StateRunning, true, []step{stepSuspend}},
		{"paused from shutoff", paused, true, libvirt.StateShutoff, true, []step{stepStart, stepSuspend}},
		{"paused already", paused, true, libvirt.StatePaused, true, nil},
		{"stopped from nothing", stopped, false, 0, false, []step{stepDefine}},
		{"stopped from running", stopped, true, libvirt.StateRunning, true, []step{stepShutdown}},
		{"stopped from paused", stopped, true, libvirt.StatePaused, true, []step{stepDestroy}},
		{"stopped from crashed", stopped, true, libvirt.StateCrashed, true, []step{stepDestroy}},
		{"stopped already, old metadata", stopped, true, libvirt.StateShutoff, false, []step{stepDefine}},
		{"stopped already", stopped, true, libvirt.StateShutoff, true, nil},
		{"absent from running", absent, true, libvirt.StateRunning, true, []step{stepDestroy, stepUndefine}},
		{"absent from shutoff", absent, true, libvirt.StateShutoff, false, []step{stepUndefine}},
		{"absent already", absent, false, 0, false, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := plan(tc.desired, tc.found, tc.state, tc.current)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("plan = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestConfig_Validate(t *testing.T) {
	b := &bustest.Bus{Conn: &nats.Conn{}}
	js, _ := jetstream.New(b.Conn)
	dial := func(context.Context) (Hypervisor, error) { return nil, errors.New("no") }
	valid := Config{Host: "h1", Conn: b.Conn, JS: js, Dial: dial}
	tests := []struct {
		name   string
		change func(*Config)
		ok     bool
	}{
		{"valid", func(*Config) {}, true},
		{"no host", func(c *Config) { c.Host = "" }, false},
		{"bad host", func(c *Config) { c.Host = "a.b" }, false},
		{"no conn", func(c *Config) { c.Conn = nil }, false},
		{"no hypervisor", func(c *Config) { c.Dial = nil }, false},
		{"renew not below ttl", func(c *Config) { c.TTL, c.RenewInterval = time.Second, time.Second }, false},
		{"negative grace", func(c *Config) { c.StopGrace = -1 }, false},
		{"backoff above max", func(c *Config) { c.RetryBackoff, c.MaxRetryBackoff = time.Second, time.Millisecond }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid
			tc.change(&cfg)
			err := cfg.Validate()
			if (err == nil) != tc.ok {
				t.Fatalf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestUUID_RoundTrip(t *testing.T) {
	uid := events.DeriveUID("test", "cmd-1")
	u, err := parseUUID(uid)
	if err != nil {
		t.Fatalf("parseUUID(%q): %v", uid, err)
	}
	if got := formatUUID(u); got != uid {
		t.Fatalf("formatUUID = %q, want %q", got, uid)
	}
	for _, bad := range []string{"", "not-a-uuid", strings.Replace(uid, "-", "x", 1), strings.Replace(uid, "a", "g", 1) + "zz"} {
		if _, err := parseUUID(bad); err == nil {
			t.Errorf("parseUUID(%q) succeeded, want an error", bad)
		}
	}
}

func TestQueue_OneWorkerPerKey(t *testing.T) {
	q := newQueue()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var mu sync.Mutex
	running := map[string]int{}
	var runs atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				key, ok := q.next(ctx)
				if !ok {
					return
				}
				mu.Lock()
				running[key]++
				if running[key] > 1 {
					t.Errorf("key %s held by two workers", key)
				}
				mu.Unlock()
				runs.Add(1)
				mu.Lock()
				running[key]--
				mu.Unlock()
				q.done(key)
			}
		})
	}
	for i := range 200 {
		q.add(fmt.Sprintf("vm%d", i%5), time.Time{})
	}
	waitFor(t, 5*time.Second, func() error {
		q.mu.Lock()
		defer q.mu.Unlock()
		if len(q.waiting) != 0 || len(q.busy) != 0 {
			return fmt.Errorf("%d waiting, %d busy", len(q.waiting), len(q.busy))
		}
		return nil
	})
	if n := runs.Load(); n < 5 || n > 200 {
		t.Fatalf("runs = %d, want between 5 and 200", n)
	}

	// A delayed key waits; an earlier add brings it forward.
	start := time.Now()
	q.add("later", start.Add(time.Hour))
	q.add("later", start.Add(50*time.Millisecond))
	waitFor(t, 5*time.Second, func() error {
		q.mu.Lock()
		defer q.mu.Unlock()
		if _, ok := q.waiting["later"]; ok {
			return errors.New("delayed key still waiting")
		}
		return nil
	})
	if elapsed := time.Since(start); elapsed < 50*time.Millisecond {
		t.Fatalf("delayed key ran after %s, want at least 50ms", elapsed)
	}
	cancel()
	wg.Wait()
}

// fakeSetup is a bus, a fake libvirtd and an agent config on them.
type fakeSetup struct {
	bus  *bustest.Bus
	host *fakeHost
	cfg  Config
}

func newFakeSetup(t *testing.T, host string) *fakeSetup {
	b := bustest.Start(t)
	h := newFakeHost()
	cfg := testConfig(t, b, host)
	cfg.Dial = h.dial
	return &fakeSetup{bus: b, host: h, cfg: cfg}
}

func TestAgent_DefineFailsOnce(t *testing.T) {
	s := newFakeSetup(t, "h1")
	var failed atomic.Bool
	s.host.setFail(func(op, name string) error {
		if op == "define" && failed.CompareAndSwap(false, true) {
			return &libvirt.Error{Code: codeInternal, Message: "internal error: disk full"}
		}
		return nil
	})
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))

	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
	obs := observations(t, s.bus.JS, "h1", "vm1")
	if len(obs) != 2 {
		t.Fatalf("observations = %+v, want failed then running", obs)
	}
	fault := obs[0].Fault
	if obs[0].State != events.ObservedFailed || fault == nil || fault.Code != events.CodeLibvirtError ||
		!strings.Contains(fault.Message, "disk full") || !strings.Contains(fault.Message, "libvirt error 1") {
		t.Fatalf("first observation = %+v (fault %+v), want failed with libvirt_error carrying code 1 and the message", obs[0], fault)
	}
	if d, _ := s.host.domain("vm1"); d.state != libvirt.StateRunning || formatUUID(d.uuid) != uid || d.metadata["incarnation"] != "10" {
		t.Fatalf("domain = %+v, want running with the goal's uuid and metadata", d)
	}
	if got := metricValue(t, a.Agent, "loom_agent_actions_total", map[string]string{"kind": "define", "result": "error"}); got != 1 {
		t.Fatalf("define errors = %v, want 1", got)
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_StartFailsWithLibvirtCode(t *testing.T) {
	s := newFakeSetup(t, "h1")
	var refuse atomic.Bool
	refuse.Store(true)
	var attempts atomic.Int64
	s.host.setFail(func(op, name string) error {
		if op == "start" && refuse.Load() {
			attempts.Add(1)
			return &libvirt.Error{Code: 38, Message: "system error: cannot allocate memory"}
		}
		return nil
	})
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))

	failed := waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedFailed)
	if failed.Fault == nil || failed.Fault.Code != events.CodeLibvirtError || !strings.Contains(failed.Fault.Message, "start domain vm1: libvirt error 38: system error") {
		t.Fatalf("fault = %+v, want libvirt_error carrying code 38", failed.Fault)
	}
	// It retries with backoff, and the repeated failure is reported once.
	waitFor(t, 10*time.Second, func() error {
		if n := attempts.Load(); n < 3 {
			return fmt.Errorf("%d start attempts, want 3", n)
		}
		return nil
	})
	if obs := observations(t, s.bus.JS, "h1", "vm1"); len(obs) != 1 {
		t.Fatalf("observations = %+v, want the failure once", obs)
	}
	refuse.Store(false)
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_ShutdownGraceThenDestroy(t *testing.T) {
	s := newFakeSetup(t, "h1")
	s.cfg.StopGrace = 2500 * time.Millisecond
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	s.host.setIgnoreShutdown(true)
	started := time.Now()
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredStopped, 20))
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedStopped)
	if elapsed := time.Since(started); elapsed < s.cfg.StopGrace {
		t.Fatalf("stopped after %s, before the grace of %s", elapsed, s.cfg.StopGrace)
	}
	if n := s.host.count("destroy"); n != 1 {
		t.Fatalf("destroy calls = %d, want 1", n)
	}
	var progress []events.Record
	for _, rec := range records(t, s.bus.JS, vmSubject("h1", "vm1")) {
		if p, ok := rec.Event.(events.VMProgress); ok {
			if p.Step != "shutdown" || p.Incarnation != 20 || p.Total != 2500 || p.Done < 1000 {
				t.Errorf("progress = %+v", p)
			}
			progress = append(progress, rec)
		}
	}
	if len(progress) < 1 || len(progress) > 2 {
		t.Fatalf("%d progress reports in a 2.5s grace, want 1 or 2", len(progress))
	}
	for i := 1; i < len(progress); i++ {
		if gap := progress[i].Envelope.At().Sub(progress[i-1].Envelope.At()); gap < time.Second {
			t.Fatalf("progress reports %s apart, want at least 1s", gap)
		}
	}
	if got := metricValue(t, a.Agent, "loom_agent_observations_published_total", map[string]string{"type": "vm.progress"}); int(got) != len(progress) {
		t.Fatalf("progress metric = %v, want %d", got, len(progress))
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_LibvirtUnavailable(t *testing.T) {
	s := newFakeSetup(t, "h1")
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	s.host.kill()
	waitFor(t, 5*time.Second, func() error {
		if v := metricValue(t, a.Agent, "loom_agent_libvirt_connected", nil); v != 0 {
			return errors.New("still connected")
		}
		return nil
	})
	// A converged VM has nothing to report; one with work pending does.
	if obs := observations(t, s.bus.JS, "h1", "vm1"); len(obs) != 1 {
		t.Fatalf("observations = %+v, want only running", obs)
	}
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredPaused, 20))
	down := waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedFailed)
	if down.Fault == nil || down.Fault.Code != events.CodeLibvirtUnavailable {
		t.Fatalf("fault = %+v, want libvirt_unavailable", down.Fault)
	}

	s.host.revive()
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedPaused)
	if d, _ := s.host.domain("vm1"); d.state != libvirt.StatePaused {
		t.Fatalf("domain state = %s, want paused", d.state)
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

// A converged VM whose look at libvirtd is cut off by the connection
// dropping has nothing to report: nothing is known to have changed. A
// failed report would tell the control plane its running VM is down
// whenever libvirtd restarts at the wrong moment.
func TestAgent_ConnectionLostMidLookOfAConvergedVM(t *testing.T) {
	s := newFakeSetup(t, "h1")
	option, reconciles := countReconciles("vm1")
	a := startAgent(t, s.cfg, option)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	// The next look at vm1 takes libvirtd away under it; a libvirt event
	// makes the agent look.
	var lost atomic.Bool
	s.host.setFail(func(op, name string) error {
		if op == "lookup" && name == "vm1" && lost.CompareAndSwap(false, true) {
			s.host.kill()
		}
		return nil
	})
	s.host.setState("vm1", libvirt.StateRunning, "resumed")
	waitFor(t, 5*time.Second, func() error {
		if !lost.Load() || metricValue(t, a.Agent, "loom_agent_libvirt_connected", nil) != 0 {
			return errors.New("libvirtd not lost yet")
		}
		return nil
	})
	before := reconciles.Load()
	s.host.revive()
	// The reconnection looks at every VM again.
	waitFor(t, 5*time.Second, func() error {
		if reconciles.Load() == before {
			return errors.New("vm1 not looked at since libvirtd came back")
		}
		return nil
	})
	if obs := observations(t, s.bus.JS, "h1", "vm1"); len(obs) != 1 {
		t.Fatalf("observations = %+v, want only running", obs)
	}
}

func TestAgent_DriftBackoff(t *testing.T) {
	s := newFakeSetup(t, "h1")
	s.cfg.RetryBackoff, s.cfg.MaxRetryBackoff = 300*time.Millisecond, time.Second
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	// The guest pauses by itself, three times in a row: each time the agent
	// reports it and resumes it, waiting longer each time after the first.
	for drift, atLeast := range []time.Duration{0, 300 * time.Millisecond, 600 * time.Millisecond} {
		s.host.setState("vm1", libvirt.StatePaused, "suspended")
		var recs []events.Record
		waitFor(t, 10*time.Second, func() error {
			recs = records(t, s.bus.JS, vmSubject("h1", "vm1"))
			if n := len(recs); n != 3+2*drift {
				return fmt.Errorf("%d events, want %d", n, 3+2*drift)
			}
			return nil
		})
		reported, repaired := recs[len(recs)-2], recs[len(recs)-1]
		if o := reported.Event.(events.VMObserved); o.State != events.ObservedPaused || !o.Unrequested {
			t.Fatalf("drift %d: report %+v, want unrequested paused", drift, o)
		}
		if o := repaired.Event.(events.VMObserved); o.State != events.ObservedRunning || o.Unrequested {
			t.Fatalf("drift %d: report %+v, want running", drift, o)
		}
		if gap := repaired.Envelope.At().Sub(reported.Envelope.At()); gap < atLeast {
			t.Fatalf("drift %d: resumed %s after the report, want at least %s", drift, gap, atLeast)
		}
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_LivenessChain(t *testing.T) {
	s := newFakeSetup(t, "h1")
	s.cfg.TTL = 300 * time.Millisecond // a renewal every 100ms
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Watch every message on the subject, with its stream sequence.
	stream, err := s.bus.JS.Stream(ctx, events.StreamLiveness)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{events.LivenessSubject("h1")}})
	if err != nil {
		t.Fatal(err)
	}
	type seen struct {
		seq     uint64
		renewal events.Renewal
	}
	var mu sync.Mutex
	var got []seen
	cc, err := cons.Consume(func(m jetstream.Msg) {
		meta, _ := m.Metadata()
		var r events.Renewal
		_ = events.Unmarshal(m.Data(), &r)
		mu.Lock()
		got = append(got, seen{meta.Sequence.Stream, r})
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Stop()
	renewals := func() []seen {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(got)
	}

	a := startAgent(t, s.cfg)
	waitFor(t, 5*time.Second, func() error {
		if n := len(renewals()); n < 3 {
			return fmt.Errorf("%d renewals", n)
		}
		return nil
	})
	first := renewals()
	for i, r := range first {
		if r.renewal.Host != "h1" || r.renewal.Agent != a.id || r.renewal.TTLMillis != 300 {
			t.Fatalf("renewal %d = %+v", i, r.renewal)
		}
		if i > 0 && r.seq <= first[i-1].seq {
			t.Fatalf("renewal seqs %d then %d, want increasing", first[i-1].seq, r.seq)
		}
	}

	// foreignWrite writes on the agent's liveness subject; rejoined waits
	// until the agent counted a renewal of result and renewed past seq.
	foreignWrite := func(typ string, data []byte) uint64 {
		msg := &nats.Msg{Subject: events.LivenessSubject("h1"), Data: data, Header: nats.Header{}}
		msg.Header.Set(events.HeaderType, typ)
		ack, err := s.bus.JS.PublishMsg(ctx, msg)
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	rejoined := func(result string, seq uint64) {
		t.Helper()
		waitFor(t, 5*time.Second, func() error {
			if metricValue(t, a.Agent, "loom_agent_liveness_renewals_total", map[string]string{"result": result}) < 1 {
				return fmt.Errorf("no %s renewal yet", result)
			}
			m, r, err := lastLiveness(t, s.bus.Conn, "h1")
			if err != nil {
				return err
			}
			if m.Seq <= seq || r.Agent != a.id {
				return fmt.Errorf("last liveness message seq %d (foreign write at %d)", m.Seq, seq)
			}
			return nil
		})
	}

	// A foreign write breaks the chain: the agent's next renewal is
	// rejected, it re-reads and renews on top of what it found.
	foreign := foreignWrite("host.lost", []byte("lost"))
	rejoined("rejected", foreign)

	// A lost marker (the failure detector's) is told apart: the agent
	// learns it was declared lost, counts it, and rejoins on top of it.
	data, err := events.Marshal(&events.LostMarker{Host: "h1", RenewalSeq: foreign, Detector: "test"})
	if err != nil {
		t.Fatal(err)
	}
	rejoined("lost", foreignWrite(events.LivenessLostMarker, data))

	// A restarted agent continues the chain from what stands.
	a.stop(t)
	m, _, err := lastLiveness(t, s.bus.Conn, "h1")
	if err != nil {
		t.Fatal(err)
	}
	b := startAgent(t, s.cfg)
	waitFor(t, 5*time.Second, func() error {
		last, r, err := lastLiveness(t, s.bus.Conn, "h1")
		if err != nil {
			return err
		}
		if r.Agent != b.id || last.Seq <= m.Seq {
			return errors.New("no renewal from the new agent yet")
		}
		return nil
	})
	if n := metricValue(t, b.Agent, "loom_agent_liveness_renewals_total", map[string]string{"result": "rejected"}); n != 0 {
		t.Fatalf("restarted agent had %v rejected renewals, want 0", n)
	}
}

func TestAgent_ObservationConflict(t *testing.T) {
	s := newFakeSetup(t, "h1")
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	// Someone else (a second agent for h1) appends to the VM's subject.
	subject := vmSubject("h1", "vm1")
	appendForeign(t, s, uid)

	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredPaused, 20))
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedPaused)
	if n := metricValue(t, a.Agent, "loom_agent_subject_conflicts_total", nil); n != 1 {
		t.Fatalf("conflicts = %v, want 1", n)
	}
	checkSubject(t, s.bus.JS, subject)
}

// TestAgent_TwoAgentsOneHost runs two agents for one host by mistake. They
// must not fork the observation chain or repeat a report; each rejected
// append is a conflict they recover from.
func TestAgent_TwoAgentsOneHost(t *testing.T) {
	s := newFakeSetup(t, "h1")
	a := startAgent(t, s.cfg)
	b := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	for i, desired := range []events.Desired{events.DesiredRunning, events.DesiredPaused, events.DesiredStopped, events.DesiredRunning} {
		incarnation := uint64(10 * (i + 1))
		publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, desired, incarnation))
		waitObserved(t, s.bus.JS, "h1", "vm1", incarnation, observedFor[desired])
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
	conflicts := metricValue(t, a.Agent, "loom_agent_subject_conflicts_total", nil) +
		metricValue(t, b.Agent, "loom_agent_subject_conflicts_total", nil)
	t.Logf("%v conflicts", conflicts)
}

func TestAgent_Orphans(t *testing.T) {
	s := newFakeSetup(t, "h1")
	uid := events.DeriveUID("t", "vm1")
	stray, _ := parseUUID(events.DeriveUID("t", "stray"))
	s.host.defineDirect("stray", stray, libvirt.StateRunning)
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	hostSubject := events.ObservationSubject("h1", events.KindHost, "h1")
	orphanEvents := func() []events.Event {
		var out []events.Event
		for _, rec := range records(t, s.bus.JS, hostSubject) {
			if _, ok := rec.Event.(events.HostAgentStarted); !ok {
				out = append(out, rec.Event)
			}
		}
		return out
	}

	a := startAgent(t, s.cfg)
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
	waitFor(t, 5*time.Second, func() error {
		if n := len(orphanEvents()); n != 1 {
			return fmt.Errorf("%d host events", n)
		}
		return nil
	})
	found, ok := orphanEvents()[0].(events.HostOrphanFound)
	if !ok || found.Domain != "stray" || found.UUID != formatUUID(stray) || found.State != events.ObservedRunning {
		t.Fatalf("host event = %+v, want stray found", orphanEvents()[0])
	}
	if d, ok := s.host.domain("stray"); !ok || d.state != libvirt.StateRunning {
		t.Fatalf("orphan domain = %+v, %v; want it untouched", d, ok)
	}

	// A restarted agent does not report it again; its removal is reported once.
	a.stop(t)
	b := startAgent(t, s.cfg)
	waitFor(t, 5*time.Second, func() error {
		if metricValue(t, b.Agent, "loom_agent_libvirt_connected", nil) != 1 {
			return errors.New("not connected")
		}
		return nil
	})
	s.host.removeDirect("stray")
	waitFor(t, 5*time.Second, func() error {
		evs := orphanEvents()
		if len(evs) != 2 {
			return fmt.Errorf("host events = %+v, want found then cleared", evs)
		}
		if cleared, ok := evs[1].(events.HostOrphanCleared); !ok || cleared.Domain != "stray" {
			return fmt.Errorf("second host event = %+v, want stray cleared", evs[1])
		}
		return nil
	})
	checkSubject(t, s.bus.JS, hostSubject)
}

// TestAgent_RestartAtEveryStep kills the agent at each mutating hypervisor
// call of each goal of a VM's life, before the call or right after it took
// effect, and checks that a new agent converges, and that the next one
// after it finds nothing to do: no repeated action, no repeated report.
func TestAgent_RestartAtEveryStep(t *testing.T) {
	b := bustest.Start(t)
	uid := events.DeriveUID("t", "vm1")
	desired := []events.Desired{events.DesiredRunning, events.DesiredPaused, events.DesiredStopped, events.DesiredRunning, events.DesiredAbsent}
	goals := make([]events.Goal, len(desired))
	for i, d := range desired {
		goals[i] = goalOf("", "vm1", uid, d, uint64(10*(i+1)))
	}
	for i := range goals {
		t.Run(fmt.Sprintf("goal%d-%s", i, desired[i]), func(t *testing.T) {
			t.Parallel()
			for kill := 1; ; kill++ {
				for _, after := range []bool{false, true} {
					host := fmt.Sprintf("g%d-k%d-%v", i, kill, after)
					if !killAndRestart(t, b, host, goals[:i], goals[i], kill, after) {
						t.Logf("killed at each of %d calls, before and after", kill-1)
						return
					}
				}
			}
		})
	}
}

// observedFor is the state that meets each desired one.
var observedFor = map[events.Desired]events.ObservedState{
	events.DesiredRunning: events.ObservedRunning, events.DesiredPaused: events.ObservedPaused,
	events.DesiredStopped: events.ObservedStopped, events.DesiredAbsent: events.ObservedAbsent,
}

// killAndRestart brings vm1 on a fresh host through before, then runs an
// agent towards goal that is killed at its kill-th mutating call, then two
// more agents: the first must converge, the second must find nothing to do.
// It reports whether the kill happened (false: the agent converged first).
func killAndRestart(t *testing.T, b *bustest.Bus, host string, before []events.Goal, goal events.Goal, kill int, after bool) (killed bool) {
	t.Helper()
	fake := newFakeHost()
	cfg := testConfig(t, b, host)
	cfg.Dial = fake.dial
	onHost := func(g events.Goal) events.Goal { g.Host = host; return g }
	want := observedFor[goal.Desired]

	r := startAgent(t, cfg)
	for _, g := range before {
		publishGoal(t, b.JS, onHost(g))
		waitObserved(t, b.JS, host, g.VM, g.Incarnation, observedFor[g.Desired])
	}
	r.stop(t)

	var calls atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fake.setFail(func(op, name string) error {
		if op == "lookup" || op == "list" || op == "events" || calls.Add(1) != int64(kill) {
			return nil
		}
		cancel()
		if after {
			return nil // the fake still carries the call out
		}
		return context.Canceled
	})
	r = startAgentIn(t, ctx, cfg)
	publishGoal(t, b.JS, onHost(goal))
	waitFor(t, 15*time.Second, func() error {
		if r.exitedNow() {
			return nil
		}
		if last, ok := lastObserved(t, b.JS, host, goal.VM); ok && last.Incarnation == goal.Incarnation && last.State == want {
			return nil
		}
		return errors.New("neither killed nor converged")
	})
	r.stop(t)
	killed = calls.Load() >= int64(kill)
	fake.setFail(nil)

	r = startAgent(t, cfg)
	waitObserved(t, b.JS, host, goal.VM, goal.Incarnation, want)
	r.stop(t)

	option, reconciles := countReconciles(goal.VM)
	stored := len(records(t, b.JS, vmSubject(host, goal.VM)))
	r = startAgent(t, cfg, option)
	waitFor(t, 5*time.Second, func() error {
		if reconciles.Load() == 0 {
			return errors.New("not reconciled yet")
		}
		return nil
	})
	if n := metricValue(t, r.Agent, "loom_agent_actions_total", nil); n != 0 {
		t.Fatalf("%s: converged agent took %v actions", host, n)
	}
	if now := len(records(t, b.JS, vmSubject(host, goal.VM))); now != stored {
		t.Fatalf("%s: converged agent published %d events", host, now-stored)
	}
	r.stop(t)
	checkSubject(t, b.JS, vmSubject(host, goal.VM))
	d, found := fake.domain(goal.VM)
	if got := observedState(d.describe(goal.VM), found); got != want {
		t.Fatalf("%s: domain is %s, want %s", host, got, want)
	}
	return killed
}

// appendForeign appends, unsigned, a report that vm1 on h1 (at
// incarnation 10) stopped, as someone else than the agent would: the next
// message on the VM's subject. It returns where it landed.
func appendForeign(t *testing.T, s *fakeSetup, uid string) bus.Appended {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	subject := vmSubject("h1", "vm1")
	last, err := bus.LastOnSubject(ctx, s.bus.Conn, events.StreamEvents, subject)
	if err != nil {
		t.Fatal(err)
	}
	foreign := events.VMObserved{UID: uid, Incarnation: 10, State: events.ObservedStopped, Unrequested: true}
	env, data, err := events.Seal(foreign, events.KindVM, "vm1", events.Origin{Actor: "agent:h1", Time: time.Now()}, 0, events.Hash(last.Data))
	if err != nil {
		t.Fatal(err)
	}
	at, err := bus.Append(ctx, s.bus.JS, subject, &env, data, last.Seq, "")
	if err != nil {
		t.Fatal(err)
	}
	return at
}
