package projections

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

func TestRun_RedeliveryChangesNothing(t *testing.T) {
	deliveries := historyDeliveries(newHistory(testFleet, 5, 1), 600)
	commits := 0
	s := openStore(t, t.TempDir(), Options{OnCommit: func(uint64, []string) { commits++ }})
	if err := s.applyDeliveries(deliveries[:400]); err != nil {
		t.Fatal(err)
	}
	before, applied := dump(t, s), s.Applied()

	// Late redeliveries of what is applied, in any order, alone in a batch.
	again := slices.Concat(deliveries[399:400], deliveries[100:200], deliveries[:1])
	if err := s.applyDeliveries(again); err != nil {
		t.Fatal(err)
	}
	if d := diff(before, dump(t, s)); len(d) > 0 || s.Applied() != applied || commits != 1 {
		t.Fatalf("redelivery changed the store: %v, applied %d (want %d), %d commits (want 1)", d, s.Applied(), applied, commits)
	}

	// Mixed into new messages, they are skipped there too.
	mixed := slices.Concat(deliveries[400:450], deliveries[10:20], deliveries[450:600], deliveries[420:421])
	if err := s.applyDeliveries(mixed); err != nil {
		t.Fatal(err)
	}
	want := openStore(t, t.TempDir(), Options{})
	if err := want.applyDeliveries(deliveries); err != nil {
		t.Fatal(err)
	}
	if d := diff(dump(t, want), dump(t, s)); len(d) > 0 {
		t.Fatalf("redeliveries mixed into a batch changed the result: %v", d)
	}
}

func TestRun_FlagsCorruptAndUnknownAndGoesOn(t *testing.T) {
	b := bustest.Start(t)
	p := newPublisher(t, b)
	s := openStore(t, t.TempDir(), Options{})
	run(t, s, b.JS)
	ctx := context.Background()

	vm := events.EventSubject(events.KindVM, "web")
	p.event(vm, events.VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 512, Desired: events.DesiredRunning}, "c1")
	catchUp(t, s, p.event(events.EventSubject(events.KindHost, "h1"), events.HostRegistered{CPU: 2, MemoryMiB: 1024}, "c2"))
	before := dump(t, s)

	corrupt := p.raw(vm, []byte{0xde, 0xad, 0xbe, 0xef})
	unknown := p.raw(events.EventSubject("disk", "d1"), mustMarshal(t, &events.Envelope{ID: "x", Type: "disk.attached",
		Version: 1, Kind: "disk", AggregateID: "d1", Payload: []byte{0x80}}))
	catchUp(t, s, unknown)

	flagged, err := s.FlaggedEvents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	codes := map[uint64]events.Code{}
	for _, f := range flagged {
		codes[f.Seq] = f.Code
	}
	if len(flagged) != 2 || codes[corrupt] != events.CodeCorruptEvent || codes[unknown] != events.CodeUnknownEvent {
		t.Fatalf("flagged = %+v, want %d corrupt and %d unknown", flagged, corrupt, unknown)
	}
	if got := metricValue(t, s.metrics.flagged); got != 2 {
		t.Fatalf("flagged counter = %v, want 2", got)
	}
	state, head, err := s.VM(ctx, "web")
	if err != nil || state.UID != "u1" || state.Phase != events.PhasePending || head.Seq != corrupt {
		t.Fatalf("vm after a corrupt message: %+v head %d err %v; want it unchanged, head at %d", state, head.Seq, err, corrupt)
	}
	// Only the flagged table, the heads (the VM's is in its row, whose
	// state is checked above) and the applied sequence moved.
	got := changedKeys(before, dump(t, s))
	want := []string{string(keyApplied), string(flaggedKey(corrupt)), string(flaggedKey(unknown)),
		string(nameKey(prefixHead, events.EventSubject("disk", "d1"))), string(nameKey(prefixVM, "web"))}
	if !slices.Equal(got, want) {
		t.Fatalf("changed keys = %q, want %q", got, want)
	}

	// And the runner goes on.
	next := p.event(vm, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted}, "c3")
	catchUp(t, s, next)
	if state, _, _ := s.VM(ctx, "web"); state.Phase != events.PhaseGone {
		t.Fatalf("vm after delete: %+v", state)
	}
}

func TestRun_WaitsForTheStream(t *testing.T) {
	ctx := context.Background()
	js := bustest.StartBare(t, t.TempDir()).JS
	s := openStore(t, t.TempDir(), Options{})
	run(t, s, js) // LOOM_EVENTS does not exist yet: Run retries

	if err := bus.EnsureStreams(ctx, js, bus.StreamsConfig{}); err != nil {
		t.Fatal(err)
	}
	p := &publisher{t: t, js: js, prev: map[string][]byte{}, last: map[string]uint64{}}
	catchUp(t, s, p.event(events.EventSubject(events.KindImage, "demo"), events.ImageRegistered{Format: "raw"}, "c1"))
}

func TestRun_FollowsAcrossANATSRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	first, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: dir, Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	port := first.Addr().(*net.TCPAddr).Port
	nc := bustest.Connect(t, first.ClientURL())
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.EnsureStreams(ctx, js, bus.StreamsConfig{}); err != nil {
		t.Fatal(err)
	}
	p := &publisher{t: t, js: js, prev: map[string][]byte{}, last: map[string]uint64{}}
	s := openStore(t, t.TempDir(), Options{})
	run(t, s, js)
	catchUp(t, s, p.event(events.EventSubject(events.KindImage, "a"), events.ImageRegistered{Format: "raw"}, "c1"))

	first.Stop()
	second, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: dir, Port: port})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(second.Stop)
	waitFor(t, 10*time.Second, func() error {
		if !nc.IsConnected() {
			return errors.New("not reconnected")
		}
		return nil
	})
	catchUp(t, s, p.event(events.EventSubject(events.KindImage, "b"), events.ImageRegistered{Format: "raw"}, "c2"))
	images, err := s.Images(ctx)
	if err != nil || len(images) != 2 {
		t.Fatalf("images = %+v, %v; want a and b", images, err)
	}
}

func TestRun_OneAtATime(t *testing.T) {
	b := bustest.Start(t)
	s := openStore(t, t.TempDir(), Options{})
	first := run(t, s, b.JS)
	waitFor(t, 5*time.Second, func() error {
		if !s.running.Load() {
			return errors.New("not running yet")
		}
		return nil
	})
	if err := s.Run(context.Background(), b.JS); !errors.Is(err, ErrRunning) {
		t.Fatalf("second Run: %v, want ErrRunning", err)
	}
	first.halt()
}

func TestRun_StopsWithErrClosed(t *testing.T) {
	b := bustest.Start(t)
	p := newPublisher(t, b)
	s := openStore(t, t.TempDir(), Options{})
	ran := make(chan error, 1)
	go func() { ran <- s.Run(context.Background(), b.JS) }()
	catchUp(t, s, p.event(events.EventSubject(events.KindImage, "a"), events.ImageRegistered{Format: "raw"}, "c1"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	p.event(events.EventSubject(events.KindImage, "b"), events.ImageRegistered{Format: "raw"}, "c2")
	select {
	case err := <-ran:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("Run after Close: %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run still running after Close and a new event")
	}
	if _, _, err := s.VM(context.Background(), "x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v, want ErrClosed", err)
	}
}

func TestWaitFor_Faults(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	var f *events.Fault
	if err := s.WaitFor(ctx, 1); !errors.As(err, &f) || f.Code != events.CodeTimeout {
		t.Fatalf("WaitFor past its deadline: %v, want a timeout fault", err)
	}
	if err := s.WaitFor(context.Background(), 0); err != nil {
		t.Fatalf("WaitFor(0): %v", err)
	}
	waited := make(chan error, 1)
	go func() { waited <- s.WaitFor(context.Background(), 1) }()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; !errors.As(err, &f) || f.Code != events.CodeUnavailable {
		t.Fatalf("WaitFor across Close: %v, want an unavailable fault", err)
	}
}

func TestOnCommit_ReportsChangedVMs(t *testing.T) {
	b := bustest.Start(t)
	p := newPublisher(t, b)
	var mu sync.Mutex
	changed := map[string]int{}
	var last uint64
	s := openStore(t, t.TempDir(), Options{OnCommit: func(seq uint64, vms []string) {
		mu.Lock()
		defer mu.Unlock()
		if !slices.IsSorted(vms) || seq <= last {
			t.Errorf("OnCommit(%d, %v) after %d: want rising sequences and sorted names", seq, vms, last)
		}
		last = seq
		for _, vm := range vms {
			changed[vm]++
		}
	}})
	run(t, s, b.JS)
	for _, name := range []string{"b", "a"} {
		p.event(events.EventSubject(events.KindVM, name), events.VMCreated{UID: "u-" + name, Image: "demo", CPU: 1, MemoryMiB: 64,
			Desired: events.DesiredRunning}, "create-"+name)
	}
	// Neither a progress report nor a report on another incarnation changes
	// a VM; a host event changes no VM.
	p.event(events.ObservationSubject("h1", events.KindVM, "a"), events.VMProgress{UID: "u-a", Step: "x"}, "")
	p.event(events.ObservationSubject("h1", events.KindVM, "b"), events.VMObserved{UID: "other", State: events.ObservedRunning}, "")
	catchUp(t, s, p.event(events.EventSubject(events.KindHost, "h1"), events.HostRegistered{CPU: 1, MemoryMiB: 1}, "reg"))
	// OnCommit runs after WaitFor hears of the commit: wait for it too.
	waitFor(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if last != s.Applied() {
			return fmt.Errorf("OnCommit heard of %d, the store applied %d", last, s.Applied())
		}
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	if len(changed) != 2 || changed["a"] != 1 || changed["b"] != 1 {
		t.Fatalf("changed = %v up to %d, want a and b once each", changed, last)
	}
}

func TestOpen_OtherRowLayoutRebuilds(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.applyDeliveries(historyDeliveries(newHistory(testFleet, 3, 1), 300)); err != nil {
		t.Fatal(err)
	}
	if err := s.db.Set(keyLayout, []byte("written by another build"), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, Options{})
	rows := dump(t, s)
	if s.Applied() != 0 || len(rows) != 1 || string(rows[0].key) != string(keyLayout) {
		t.Fatalf("after a layout change: applied %d, %d keys; want 0 and only the layout", s.Applied(), len(rows))
	}
}

func TestCollectors(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	registry := prometheus.NewRegistry()
	registry.MustRegister(s.Collectors()...)
	deliveries := historyDeliveries(newHistory(testFleet, 4, 1), 500)
	if err := s.applyDeliveries(deliveries); err != nil {
		t.Fatal(err)
	}
	flagged, err := s.FlaggedEvents(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name string
		got  float64
		want float64
	}{
		{"applied seq", metricValue(t, s.metrics.appliedSeq), 500},
		{"applied", metricValue(t, s.metrics.applied), float64(500 - len(flagged))},
		{"flagged", metricValue(t, s.metrics.flagged), float64(len(flagged))},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	families, err := registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range families {
		names = append(names, f.GetName())
	}
	want := []string{"loom_projections_applied_seq", "loom_projections_batch_apply_seconds", "loom_projections_batch_events",
		"loom_projections_events_applied_total", "loom_projections_events_flagged_total"}
	if !slices.Equal(names, want) {
		t.Errorf("metrics = %v, want %v", names, want)
	}
}

// changedKeys lists the keys whose values differ between two dumps, or
// that only one has, in key order.
func changedKeys(a, b []keyValue) []string {
	values := map[string]string{}
	for _, kv := range a {
		values[string(kv.key)] = string(kv.value)
	}
	var out []string
	for _, kv := range b {
		if v, ok := values[string(kv.key)]; !ok || v != string(kv.value) {
			out = append(out, string(kv.key))
		}
		delete(values, string(kv.key))
	}
	for k := range values {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// metricValue reads a gauge's or a counter's value.
func metricValue(t testing.TB, m prometheus.Metric) float64 {
	t.Helper()
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		t.Fatal(err)
	}
	if out.Counter != nil {
		return out.Counter.GetValue()
	}
	return out.Gauge.GetValue()
}

func mustMarshal(t testing.TB, v any) []byte {
	t.Helper()
	data, err := events.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}
