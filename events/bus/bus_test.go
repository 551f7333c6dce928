package bus_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

func seal(t testing.TB, name string, index int, prev []byte) (events.Envelope, []byte) {
	t.Helper()
	origin := events.Origin{Actor: "test", CommandID: "cmd-" + name, Time: time.Unix(1700000000, 0)}
	env, data, err := events.Seal(events.HostRegistered{CPU: 4, MemoryMiB: 4096}, events.KindHost, name, origin, index, prev)
	if err != nil {
		t.Fatalf("seal: %v", err)
	}
	return env, data
}

func TestAppend_OptimisticConcurrency(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()
	subject := events.EventSubject(events.KindHost, "h1")

	env, data := seal(t, "h1", 0, nil)
	first, err := bus.Append(ctx, b.JS, subject, &env, data, 0, "id-0")
	if err != nil {
		t.Fatalf("first append: %v", err)
	}
	// A writer that read the subject while it was empty must now lose.
	env2, data2 := seal(t, "h1", 1, events.Hash(data))
	if _, err := bus.Append(ctx, b.JS, subject, &env2, data2, 0, "id-1"); !errors.Is(err, bus.ErrWrongLastSeq) {
		t.Fatalf("stale append: err=%v, want ErrWrongLastSeq", err)
	}
	second, err := bus.Append(ctx, b.JS, subject, &env2, data2, first.Seq, "id-1")
	if err != nil || second.Seq <= first.Seq {
		t.Fatalf("append after first: seq=%d err=%v", second.Seq, err)
	}
	// A retry with the same Nats-Msg-Id is reported as a duplicate of the
	// original, whatever sequence it expected.
	dup, err := bus.Append(ctx, b.JS, subject, &env2, data2, second.Seq, "id-1")
	if err != nil || !dup.Duplicate || dup.Seq != second.Seq {
		t.Fatalf("duplicate: %+v err=%v, want duplicate of %d", dup, err, second.Seq)
	}

	last, err := bus.LastOnSubject(ctx, b.Conn, events.StreamEvents, subject)
	if err != nil {
		t.Fatalf("last: %v", err)
	}
	if last.Seq != second.Seq || string(last.Data) != string(data2) || last.Header.Get(events.HeaderType) != "host.registered" {
		t.Fatalf("last = seq %d type %q, want seq %d host.registered", last.Seq, last.Header.Get(events.HeaderType), second.Seq)
	}
	if _, err := bus.LastOnSubject(ctx, b.Conn, events.StreamEvents, "loom.evt.host.nobody"); !errors.Is(err, bus.ErrNoMessage) {
		t.Fatalf("last of empty subject: err=%v, want ErrNoMessage", err)
	}
}

func TestEnsureStreams_IdempotentAndGuarded(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()
	if err := bus.EnsureStreams(ctx, b.JS, bus.StreamsConfig{}); err != nil {
		t.Fatalf("second ensure: %v", err)
	}
	stream, err := b.JS.Stream(ctx, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	cfg := stream.CachedInfo().Config
	if !cfg.DenyDelete || !cfg.DenyPurge || cfg.MaxAge != 0 || cfg.Duplicates < 2*time.Minute || !cfg.AllowAtomicPublish {
		t.Fatalf("LOOM_EVENTS settings: %+v", cfg)
	}
	// Someone loosens the system of record: ensure puts it back.
	cfg.MaxAge = time.Hour
	if _, err := b.JS.UpdateStream(ctx, cfg); err != nil {
		t.Fatalf("loosen: %v", err)
	}
	if err := bus.EnsureStreams(ctx, b.JS, bus.StreamsConfig{}); err != nil {
		t.Fatalf("ensure after loosening: %v", err)
	}
	stream, _ = b.JS.Stream(ctx, events.StreamEvents)
	if got := stream.CachedInfo().Config.MaxAge; got != 0 {
		t.Fatalf("max age after ensure = %v, want 0", got)
	}
	// A stream stored in memory cannot become file-backed: refuse.
	if err := b.JS.DeleteStream(ctx, events.StreamGoals); err != nil {
		t.Fatal(err)
	}
	mem := bus.StreamConfigs(bus.StreamsConfig{Memory: true})[1]
	if _, err := b.JS.CreateStream(ctx, mem); err != nil {
		t.Fatal(err)
	}
	if err := bus.EnsureStreams(ctx, b.JS, bus.StreamsConfig{}); !errors.Is(err, bus.ErrStreamSettings) {
		t.Fatalf("ensure over memory stream: err=%v, want ErrStreamSettings", err)
	}
}

func TestLastPerSubject(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()
	if got, err := bus.LastPerSubject(ctx, b.JS, events.StreamGoals, events.HostGoals("h1")); err != nil || len(got) != 0 {
		t.Fatalf("empty snapshot = %v, %v", got, err)
	}
	for i, vm := range []string{"a", "b", "a", "c", "a"} {
		if _, err := b.JS.Publish(ctx, events.GoalSubject("h1", vm), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.JS.Publish(ctx, events.GoalSubject("h2", "z"), []byte{9}); err != nil {
		t.Fatal(err)
	}
	got, err := bus.LastPerSubject(ctx, b.JS, events.StreamGoals, events.HostGoals("h1"))
	if err != nil {
		t.Fatal(err)
	}
	last := map[string]byte{}
	for _, m := range got {
		last[m.Subject] = m.Data[0]
	}
	want := map[string]byte{"loom.goal.h1.a": 4, "loom.goal.h1.b": 1, "loom.goal.h1.c": 3}
	if len(last) != len(want) {
		t.Fatalf("snapshot = %v, want %v", last, want)
	}
	for k, v := range want {
		if last[k] != v {
			t.Fatalf("snapshot = %v, want %v", last, want)
		}
	}
	// A snapshot leaves no consumer behind: a stream takes 1,000 at most,
	// and an ordered consumer left alone lingers for five minutes.
	stream, err := b.JS.Stream(ctx, events.StreamGoals)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := stream.Info(ctx); err != nil || info.State.Consumers != 0 {
		t.Errorf("after the snapshots: %v consumers (%v), want none", info.State.Consumers, err)
	}
}

func TestLeaderReads_LastAndNextOnSubject(t *testing.T) {
	b := bustest.Start(t)
	ctx := context.Background()
	seqs := map[string][]uint64{}
	for _, subject := range []string{"loom.evt.lease.disk.d.x", "loom.evt.lease.disk.d.s.a", "loom.evt.lease.disk.d.x", "loom.evt.vm.v"} {
		ack, err := b.JS.Publish(ctx, subject, []byte("m"))
		if err != nil {
			t.Fatal(err)
		}
		seqs[subject] = append(seqs[subject], ack.Sequence)
	}
	x := seqs["loom.evt.lease.disk.d.x"]
	if m, err := bus.NextOnSubject(ctx, b.Conn, events.StreamEvents, "loom.evt.lease.disk.d.x", x[0]+1); err != nil || m.Seq != x[1] {
		t.Fatalf("next of .x after %d = %d, %v; want %d", x[0], m.Seq, err, x[1])
	}
	if _, err := bus.NextOnSubject(ctx, b.Conn, events.StreamEvents, "loom.evt.lease.disk.d.x", x[1]+1); !errors.Is(err, bus.ErrNoMessage) {
		t.Fatalf("next of .x past its last: %v, want ErrNoMessage", err)
	}
	if m, err := bus.LastOnSubject(ctx, b.Conn, events.StreamEvents, "loom.evt.lease.disk.d.>"); err != nil || m.Seq != x[1] {
		t.Fatalf("last on the wildcard = %d, %v; want %d", m.Seq, err, x[1])
	}
}
