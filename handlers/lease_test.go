package handlers

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

func acquireCmd(commandID, resource string, mode events.LeaseMode, holder, host string) *events.AcquireLease {
	return &events.AcquireLease{CommandMeta: events.CommandMeta{CommandID: commandID}, Resource: resource, Mode: mode,
		LeaseHolder: events.LeaseHolder{ID: holder, VM: "vm-" + holder, Host: host}}
}

func releaseCmd(commandID, resource, holder string, epoch uint64) *events.ReleaseLease {
	return &events.ReleaseLease{CommandMeta: events.CommandMeta{CommandID: commandID}, Resource: resource, Holder: holder, Epoch: epoch}
}

// lease sends a lease command and returns its reply.
func lease(t testing.TB, nc *nats.Conn, verb string, body any) events.Reply {
	t.Helper()
	format := events.FormatMsgpack
	if _, raw := body.([]byte); raw {
		format = events.FormatJSON
	}
	return call(t, nc, events.KindLease, verb, format, "tester", body)
}

func wantCode(t testing.TB, what string, reply events.Reply, code events.Code) {
	t.Helper()
	if reply.Error == nil || reply.Error.Code != code {
		t.Fatalf("%s: reply %+v, want %s", what, reply, code.Name())
	}
}

func leaseFleet(t *testing.T) (*bustest.Bus, *replica) {
	b := bustest.Start(t)
	r := startReplica(t, b)
	registerHost(t, r.nc, "h1", 8, 8192)
	registerHost(t, r.nc, "h2", 8, 8192)
	registerImage(t, r.nc, "demo")
	return b, r
}

func TestLease_SharedExcludesExclusiveAndTheReverse(t *testing.T) {
	b, r := leaseFleet(t)
	a := lease(t, r.nc, events.VerbAcquire, acquireCmd("a", "image/demo", events.LeaseShared, "u1", "h1"))
	lease(t, r.nc, events.VerbAcquire, acquireCmd("b", "image/demo", events.LeaseShared, "u2", "h2"))
	if a.Error != nil || len(a.Events) != 1 || a.Events[0].Subject != "loom.evt.lease.image.demo.s.u1" {
		t.Fatalf("shared grant: %+v", a)
	}
	x := lease(t, r.nc, events.VerbAcquire, acquireCmd("x", "image/demo", events.LeaseExclusive, "u3", "h1"))
	wantCode(t, "exclusive over two shared", x, events.CodeLeaseHeld)
	if msg := x.Error.Message; !strings.Contains(msg, "vm-u1") || !strings.Contains(msg, "vm-u2") || !strings.Contains(msg, fmt.Sprint(a.Events[0].Seq)) {
		t.Errorf("the refusal does not name the holders and epochs: %s", msg)
	}
	// A retry of the grant answers with it and appends nothing.
	before := lastSeq(t, b)
	again := lease(t, r.nc, events.VerbAcquire, acquireCmd("a", "image/demo", events.LeaseShared, "u1", "h1"))
	if again.Error != nil || again.Events[0].Seq != a.Events[0].Seq || lastSeq(t, b) != before {
		t.Fatalf("retried grant: %+v (stream %d -> %d)", again, before, lastSeq(t, b))
	}
	lease(t, r.nc, events.VerbRelease, releaseCmd("ra", "image/demo", "u1", 0))
	lease(t, r.nc, events.VerbRelease, releaseCmd("rb", "image/demo", "u2", 0))
	x = lease(t, r.nc, events.VerbAcquire, acquireCmd("x2", "image/demo", events.LeaseExclusive, "u3", "h1"))
	if x.Error != nil || x.Events[0].Subject != "loom.evt.lease.image.demo.x" {
		t.Fatalf("exclusive on a free image: %+v", x)
	}
	wantCode(t, "shared under an exclusive", lease(t, r.nc, events.VerbAcquire, acquireCmd("c", "image/demo", events.LeaseShared, "u4", "h2")), events.CodeLeaseHeld)
	// A retry of the first grant, after its release, still gets its
	// original answer and grants nothing.
	before = lastSeq(t, b)
	late := lease(t, r.nc, events.VerbAcquire, acquireCmd("a", "image/demo", events.LeaseShared, "u1", "h1"))
	if late.Error != nil || late.Events[0].Seq != a.Events[0].Seq || lastSeq(t, b) != before {
		t.Fatalf("late retry: %+v (stream %d -> %d)", late, before, lastSeq(t, b))
	}
}

func TestLease_BadInputChangesNothing(t *testing.T) {
	b, r := leaseFleet(t)
	x := lease(t, r.nc, events.VerbAcquire, acquireCmd("x", "image/demo", events.LeaseExclusive, "u1", "h1"))
	if x.Error != nil {
		t.Fatal(x.Error)
	}
	epoch := x.Events[0].Seq
	before := lastSeq(t, b)
	for _, tc := range []struct {
		name string
		verb string
		body any
		code events.Code
	}{
		{"unknown image", events.VerbAcquire, acquireCmd("1", "image/nope", events.LeaseShared, "u2", "h1"), events.CodeResourceNotFound},
		{"disk no VM took", events.VerbAcquire, acquireCmd("2", "disk/nope", events.LeaseExclusive, "u2", "h1"), events.CodeResourceNotFound},
		{"unknown host", events.VerbAcquire, acquireCmd("3", "image/demo", events.LeaseShared, "u2", "h9"), events.CodeHostNotFound},
		{"no host", events.VerbAcquire, acquireCmd("4", "image/demo", events.LeaseShared, "u2", ""), events.CodeInvalidArgument},
		{"bad mode", events.VerbAcquire, acquireCmd("5", "image/demo", "sole", "u2", "h1"), events.CodeInvalidArgument},
		{"bad resource", events.VerbAcquire, acquireCmd("6", "vm/demo", events.LeaseShared, "u2", "h1"), events.CodeInvalidArgument},
		{"second exclusive", events.VerbAcquire, acquireCmd("7", "image/demo", events.LeaseExclusive, "u2", "h2"), events.CodeLeaseHeld},
		{"release by a non-holder", events.VerbRelease, releaseCmd("8", "image/demo", "u2", 0), events.CodeLeaseNotFound},
		{"release under a stale epoch", events.VerbRelease, releaseCmd("9", "image/demo", "u1", epoch-1), events.CodeLeaseNotFound},
		{"break of a live lease", events.VerbBreak, &events.BreakLease{CommandMeta: events.CommandMeta{CommandID: "10"}, Resource: "image/demo", Holder: "u1"}, events.CodeLeaseLive},
		{"no command id", events.VerbRelease, releaseCmd("", "image/demo", "u1", 0), events.CodeMissingCommandID},
		{"not a command", events.VerbAcquire, []byte(`{"resource": 7}`), events.CodeBadRequest},
	} {
		wantCode(t, tc.name, lease(t, r.nc, tc.verb, tc.body), tc.code)
	}
	if after := lastSeq(t, b); after != before {
		t.Fatalf("bad commands appended: stream %d -> %d", before, after)
	}
	state, _ := r.reader.Lease(context.Background(), "image/demo")
	if state.Exclusive.Epoch != epoch || state.Exclusive.ID != "u1" {
		t.Fatalf("the grant changed: %+v", state.Exclusive)
	}
}

func TestLease_BreakWaitsForALiveHolderAndIsImmediateForALostOne(t *testing.T) {
	_, r := leaseFleet(t)
	ctx := context.Background()
	x := lease(t, r.nc, events.VerbAcquire, acquireCmd("x", "image/demo", events.LeaseExclusive, "u1", "h1"))
	s := lease(t, r.nc, events.VerbAcquire, acquireCmd("s", "image/other", events.LeaseShared, "u2", "h2"))
	wantCode(t, "unregistered image", s, events.CodeResourceNotFound)

	force := &events.BreakLease{CommandMeta: events.CommandMeta{CommandID: "b1"}, Resource: "image/demo", Holder: "u1", Force: true, Reason: "stuck"}
	br := lease(t, r.nc, events.VerbBreak, force)
	if br.Error != nil || len(br.Events) != 1 || br.Events[0].Type != events.TypeLeaseBreaking {
		t.Fatalf("forced break of a live lease: %+v", br)
	}
	waitFor(t, 10*time.Second, func() error {
		l, _ := r.reader.Lease(ctx, "image/demo")
		if !l.Exclusive.Breaking || l.Exclusive.BreakingBy != "tester" || l.Exclusive.Epoch != x.Events[0].Seq {
			return fmt.Errorf("lease %+v", l.Exclusive)
		}
		return nil
	})
	// Marked breaking, it is still held: nobody else may take it.
	wantCode(t, "exclusive while breaking", lease(t, r.nc, events.VerbAcquire, acquireCmd("y", "image/demo", events.LeaseExclusive, "u3", "h2")), events.CodeLeaseHeld)

	// Once h1 is declared lost the break takes effect at once.
	if !(&detector{s: r.svc}).declare(ctx, "h1", 100, 99) {
		t.Fatal("declare h1 lost")
	}
	waitFor(t, 10*time.Second, func() error {
		if h, _, _ := r.reader.Host(ctx, "h1"); !h.Lost {
			return fmt.Errorf("h1 not lost yet")
		}
		return nil
	})
	br = lease(t, r.nc, events.VerbBreak, &events.BreakLease{CommandMeta: events.CommandMeta{CommandID: "b2"}, Resource: "image/demo", Holder: "u1"})
	if br.Error != nil || br.Events[0].Type != events.TypeLeaseBroken {
		t.Fatalf("break after host lost: %+v", br)
	}
	y := lease(t, r.nc, events.VerbAcquire, acquireCmd("y2", "image/demo", events.LeaseExclusive, "u3", "h2"))
	if y.Error != nil || y.Events[0].Seq <= x.Events[0].Seq {
		t.Fatalf("exclusive after the break: %+v", y)
	}
	wantCode(t, "grant on a lost host", lease(t, r.nc, events.VerbAcquire, acquireCmd("z", "image/demo", events.LeaseShared, "u4", "h1")), events.CodeInvalidArgument)
}

// TestLease_ConcurrentGrantsNeverOverlap races shared and exclusive grants
// and releases from many clients on two replicas, and folds the stream
// afterwards: no exclusive grant ever stood beside another grant, and no
// grant a client was told it holds is void. With the exclusive grant's
// check narrowed to its own subject, the same race breaks the rule.
func TestLease_ConcurrentGrantsNeverOverlap(t *testing.T) {
	t.Run("checked", func(t *testing.T) {
		if v := raceLeases(t, nil); v != "" {
			t.Fatal(v)
		}
	})
	t.Run("control: exclusive grants check only their own subject", func(t *testing.T) {
		for round := range 20 {
			narrow := func(s *Service) {
				s.cfg.Unsafe.NarrowExclusiveCheck = true
				s.cfg.Reader.(*memReader).setLenient()
			}
			if v := raceLeases(t, narrow); v != "" {
				t.Logf("round %d: %s", round, v)
				return
			}
		}
		t.Fatal("without the wildcard check no overlap showed in 20 rounds: the test cannot see what it guards")
	})
}

// raceLeases runs one race and returns the first violation it finds.
func raceLeases(t *testing.T, opt func(*Service)) string {
	b := bustest.Start(t)
	var opts []func(*Service)
	if opt != nil {
		opts = append(opts, opt)
	}
	r1, r2 := startReplica(t, b, opts...), startReplica(t, b, opts...)
	registerHost(t, r1.nc, "h1", 8, 8192)
	registerImage(t, r1.nc, "demo")
	const clients, rounds = 12, 6
	var mu sync.Mutex
	told := map[uint64]string{} // epochs clients were told they hold
	granted := map[events.LeaseMode]int{}
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc := r1.nc
			if c%2 == 1 {
				nc = r2.nc
			}
			mode := events.LeaseShared
			if c%4 == 0 {
				mode = events.LeaseExclusive
			}
			holder := fmt.Sprintf("c%d", c)
			// Exclusive clients keep asking until they had a grant each
			// round: once the readers are done, the writers get through.
			for i, got := 0, 0; got < rounds && i < 40*rounds; i++ {
				body, _ := events.EncodeAs(events.FormatMsgpack, acquireCmd(fmt.Sprintf("%s-%d", holder, i), "image/demo", mode, holder, "h1"))
				reply, err := tryCall(nc, events.KindLease, events.VerbAcquire, events.FormatMsgpack, "tester", body)
				if err != nil || reply.Error != nil {
					continue
				}
				if mode == events.LeaseExclusive {
					got++
				} else {
					got = i + 1
				}
				mu.Lock()
				told[reply.Events[0].Seq] = holder
				granted[mode]++
				mu.Unlock()
				body, _ = events.EncodeAs(events.FormatMsgpack, releaseCmd(fmt.Sprintf("%s-r%d", holder, i), "image/demo", holder, reply.Events[0].Seq))
				_, _ = tryCall(nc, events.KindLease, events.VerbRelease, events.FormatMsgpack, "tester", body)
			}
		}()
	}
	wg.Wait()
	if granted[events.LeaseExclusive] == 0 || granted[events.LeaseShared] == 0 {
		if opt != nil {
			return "" // nothing raced this round
		}
		t.Fatalf("grants: %v; the race needs both modes to succeed", granted)
	}
	return foldLeaseStream(t, b.JS, told)
}

// foldLeaseStream folds every lease event of the stream, independently of
// the read models, and reports the first overlap or void grant a client
// was told it holds.
func foldLeaseStream(t *testing.T, js jetstream.JetStream, told map[uint64]string) string {
	t.Helper()
	ctx := context.Background()
	stream, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	exclusive := map[string]uint64{}         // resource -> standing exclusive epoch
	shared := map[string]map[string]uint64{} // resource -> holder -> standing, non-void epoch
	for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
		msg, err := stream.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		addr, err := events.ParseEventSubject(msg.Subject)
		if err != nil || addr.Kind != events.KindLease {
			continue
		}
		rec, err := events.DecodeRecord(seq, msg.Subject, msg.Time, msg.Data)
		if err != nil {
			t.Fatal(err)
		}
		if shared[addr.ID] == nil {
			shared[addr.ID] = map[string]uint64{}
		}
		switch ev := rec.Event.(type) {
		case events.LeaseGranted:
			switch {
			case ev.Mode == events.LeaseExclusive && (exclusive[addr.ID] != 0 || len(shared[addr.ID]) > 0):
				return fmt.Sprintf("seq %d: exclusive grant to %s while %v / %v stood", seq, ev.ID, exclusive[addr.ID], shared[addr.ID])
			case ev.Mode == events.LeaseExclusive:
				exclusive[addr.ID] = seq
			case exclusive[addr.ID] != 0:
				if told[seq] != "" {
					return fmt.Sprintf("seq %d: %s was told it holds a void shared grant", seq, ev.ID)
				}
			default:
				shared[addr.ID][ev.ID] = seq
			}
		case events.LeaseReleased:
			if exclusive[addr.ID] == ev.Epoch {
				exclusive[addr.ID] = 0
			}
			if shared[addr.ID][ev.Holder] == ev.Epoch {
				delete(shared[addr.ID], ev.Holder)
			}
		}
	}
	return ""
}
