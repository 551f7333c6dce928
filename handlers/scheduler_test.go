package handlers

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// crashAt makes the step index of command commandID fail the first time it
// is tried, as if the process died just before it.
func crashAt(commandID string, index int) func(*Service) {
	var crashed atomic.Bool
	return func(s *Service) {
		s.stepHook = func(c *command, i int) error {
			if c.id == commandID && i == index && crashed.CompareAndSwap(false, true) {
				return errors.New("injected crash")
			}
			return nil
		}
	}
}

// caughtUp waits until r's read model has applied the whole stream.
func caughtUp(t *testing.T, b *bustest.Bus, r *replica) {
	t.Helper()
	if err := r.reader.WaitFor(context.Background(), lastSeq(t, b)); err != nil {
		t.Fatal(err)
	}
}

func reconcile(t *testing.T, b *bustest.Bus, r *replica) {
	t.Helper()
	caughtUp(t, b, r)
	if err := r.svc.ReconcileOnce(context.Background()); err != nil {
		t.Fatalf("reconcile: %v", err)
	}
	caughtUp(t, b, r)
}

// schedulerFixture is two hosts and an image, served by one replica whose
// steps opts may crash.
func schedulerFixture(t *testing.T, opts ...func(*Service)) (*bustest.Bus, *replica, *replica) {
	t.Helper()
	b := bustest.Start(t)
	r := startReplica(t, b, opts...)
	registerHost(t, r.nc, "h1", 4, 4096)
	registerHost(t, r.nc, "h2", 4, 4096)
	registerImage(t, r.nc, "debian")
	return b, r, r
}

func TestScheduler_CompletesCreateCutShort(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cut    int
		before int // events appended before the cut
	}{
		{"after vm.created", createStepAllocated, 1},
		{"after host.allocated", createStepImageLease, 2},
		{"after the image lease", createStepDiskLease, 3},
		{"after the disk lease", createStepPlaced, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, r, _ := schedulerFixture(t, crashAt("c1", tc.cut))
			reply := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 1024))
			if code(reply.Error) != events.CodeInternal || len(reply.Events) != tc.before {
				t.Fatalf("cut create: %+v, want internal after %d events", reply, tc.before)
			}
			reconcile(t, b, r)

			vm, _, _ := r.reader.VM(context.Background(), "web")
			if vm.Phase != events.PhasePlaced || vm.UID != events.DeriveUID("alice", "c1") {
				t.Fatalf("after reconcile: %+v, want alice's c1 placed", vm)
			}
			allocations := 0
			for _, h := range replayHosts(t, b.JS) {
				if a, ok := h.Allocations["web"]; ok {
					allocations++
					if h.Name != vm.Host || a.UID != vm.UID {
						t.Fatalf("allocation %+v on %s, vm on %s", a, h.Name, vm.Host)
					}
				}
			}
			if allocations != 1 {
				t.Fatalf("%d allocations, want 1", allocations)
			}
			// The scheduler acted as alice's c1: her retry gets the whole result.
			again := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 1024))
			want := createChain
			if again.Error != nil || !again.Replayed || !reflect.DeepEqual(types(again.Events), want) {
				t.Fatalf("retry: %+v, want %v replayed", again, want)
			}
			before := lastSeq(t, b)
			reconcile(t, b, r)
			if got := lastSeq(t, b); got != before {
				t.Fatalf("a second pass appended: stream at %d, want %d", got, before)
			}
		})
	}
}

// TestScheduler_RacesRetry completes a cut create while its client retries
// it: whoever comes second finds the step done, and there is one VM and one
// allocation.
func TestScheduler_RacesRetry(t *testing.T) {
	b, r, _ := schedulerFixture(t, crashAt("c1", createStepAllocated))
	call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 1024))
	caughtUp(t, b, r)
	var wg sync.WaitGroup
	var retry events.Reply
	wg.Go(func() {
		var err error
		if retry, err = tryCall(r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 1024)); err != nil {
			t.Error(err)
		}
	})
	wg.Go(func() {
		if err := r.svc.ReconcileOnce(context.Background()); err != nil {
			t.Errorf("reconcile: %v", err)
		}
	})
	wg.Wait()
	if retry.Error != nil {
		t.Fatalf("retry: %v", retry.Error)
	}
	allocations := 0
	for _, h := range replayHosts(t, b.JS) {
		allocations += len(h.Allocations)
	}
	if allocations != 1 {
		t.Fatalf("%d allocations, want 1", allocations)
	}
	caughtUp(t, b, r)
	result, _, _ := r.reader.CommandResult(context.Background(), "alice", "c1")
	if got, want := types(result), createChain; !reflect.DeepEqual(got, want) {
		t.Fatalf("c1 appended %v, want %v", got, want)
	}
}

func TestScheduler_ReleasesOrphans(t *testing.T) {
	b, r, _ := schedulerFixture(t, crashAt("d1", deleteStepReleased))
	must(t, r.nc, events.KindVM, events.VerbCreate, createCmd("web", "c1", 2, 1024))
	must(t, r.nc, events.KindVM, events.VerbCreate, createCmd("db", "c2", 1, 512))
	if reply := call(t, r.nc, events.KindVM, events.VerbDelete, events.FormatMsgpack, "", vmCmd("web", "d1")); code(reply.Error) != events.CodeInternal {
		t.Fatalf("cut delete: %+v", reply)
	}
	// An allocation no VM was ever created for.
	ghost := events.HostAllocated{VM: "ghost", UID: "0000", CPU: 1, MemoryMiB: 1}
	caughtUp(t, b, r)
	_, head, _ := r.reader.Host(context.Background(), "h2")
	env, data, err := events.Seal(ghost, events.KindHost, "h2", events.Origin{Actor: "someone", CommandID: "g1", Time: time.Now()}, 0, head.Hash)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.Append(context.Background(), b.JS, "loom.evt.host.h2", &env, data, head.Seq, "ghost"); err != nil {
		t.Fatal(err)
	}

	reconcile(t, b, r)
	hosts := replayHosts(t, b.JS)
	var left []string
	for _, h := range hosts {
		for vm := range h.Allocations {
			left = append(left, vm)
		}
	}
	if !reflect.DeepEqual(left, []string{"db"}) {
		t.Fatalf("allocations left: %v, want only db's", left)
	}
	released := map[string]string{}
	for _, key := range [][2]string{{"anonymous", "c1"}, {"someone", "g1"}} {
		result, _, _ := r.reader.CommandResult(context.Background(), key[0], key[1])
		if a, ok := find(result, events.TypeHostReleased); ok {
			released[key[1]] = a.Subject
		}
	}
	if want := map[string]string{"c1": "loom.evt.host.h1", "g1": "loom.evt.host.h2"}; !reflect.DeepEqual(released, want) {
		t.Fatalf("released as %v, want %v", released, want)
	}
}

func TestScheduler_RunCompletesOnNudge(t *testing.T) {
	b, r, _ := schedulerFixture(t, crashAt("c1", createStepPlaced), func(s *Service) { s.cfg.ReconcileInterval = time.Hour })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.svc.RunScheduler(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("scheduler: %v", err)
		}
	}()
	// The cut create nudges the scheduler, which places the VM.
	call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 1024))
	waitFor(t, 10*time.Second, func() error {
		vm, _, _ := r.reader.VM(context.Background(), "web")
		if vm.Phase != events.PhasePlaced {
			return errors.New("web not placed yet")
		}
		return nil
	})
	caughtUp(t, b, r)
}
