package handlers

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// storm sends creates of 1 CPU from clients goroutines through the queue
// group and counts how many succeeded and how many found no capacity; any
// other answer fails the test.
func storm(t *testing.T, nc *nats.Conn, creates, clients int) (ok, full int) {
	t.Helper()
	work := make(chan int)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for i := range work {
				name := fmt.Sprintf("vm%02d", i)
				reply, err := tryCall(nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "storm", createCmd(name, "create-"+name, 1, 256))
				if err != nil {
					t.Error(err)
					continue
				}
				mu.Lock()
				switch code(reply.Error) {
				case 0:
					ok++
				case events.CodeNoCapacity:
					full++
				default:
					t.Errorf("create %s: %v", name, reply.Error)
				}
				mu.Unlock()
			}
		})
	}
	for i := range creates {
		work <- i
	}
	close(work)
	wg.Wait()
	return ok, full
}

// stormFixture is hosts hosts of cpu CPUs and an image, with replicas
// serving commands; opts adjust every replica.
func stormFixture(t *testing.T, replicas, hosts, cpu int, opts ...func(*Service)) (*bustest.Bus, *nats.Conn) {
	t.Helper()
	b := bustest.Start(t)
	for range replicas {
		startReplica(t, b, opts...)
	}
	nc := bustest.Connect(t, b.URL)
	for i := range hosts {
		registerHost(t, nc, fmt.Sprintf("h%d", i+1), cpu, 64<<10)
	}
	registerImage(t, nc, "debian")
	return b, nc
}

func TestCreate_ConcurrentNeverOvercommits(t *testing.T) {
	for _, replicas := range []int{1, 2} {
		t.Run(fmt.Sprintf("replicas=%d", replicas), func(t *testing.T) {
			b, nc := stormFixture(t, replicas, 3, 4)
			ok, full := storm(t, nc, 40, 16)
			if ok != 12 || full != 28 {
				t.Fatalf("%d created, %d no_capacity; want 12 and 28", ok, full)
			}
			allocated := 0
			for _, h := range replayHosts(t, b.JS) { // fails the test on any over-commit
				allocated += len(h.Allocations)
			}
			if allocated != 12 {
				t.Fatalf("%d allocations, want 12", allocated)
			}
		})
	}
}

// TestCreate_OvercommitsWithoutSeqCheck runs the storm over two replicas
// whose appends skip the expected-last-subject-sequence check. Each
// replica's cache then misses the other's allocations, and the hosts are
// over-committed: the check is what keeps TestCreate_ConcurrentNeverOvercommits
// green.
func TestCreate_OvercommitsWithoutSeqCheck(t *testing.T) {
	unchecked := func(s *Service) { s.publisher = uncheckedPublisher{s.publisher} }
	b, nc := stormFixture(t, 2, 3, 4, unchecked)
	ok, _ := storm(t, nc, 40, 16)
	_, overcommits := foldHosts(t, b.JS)
	if ok <= 12 || len(overcommits) == 0 {
		t.Fatalf("%d created and no host over-committed without the check: this scenario would not catch its loss", ok)
	}
	t.Logf("without the check: %d created on 12 CPUs; first over-commit: %s", ok, overcommits[0])
}

func TestCreate_TwoReplicasRaceOnOneHost(t *testing.T) {
	b, nc := stormFixture(t, 2, 1, 4)
	ok, full := storm(t, nc, 20, 8)
	if ok != 4 || full != 16 {
		t.Fatalf("%d created, %d no_capacity; want 4 and 16", ok, full)
	}
	hosts := replayHosts(t, b.JS)
	if got := len(hosts["h1"].Allocations); got != 4 {
		t.Fatalf("%d allocations on h1, want 4", got)
	}
}

// TestCreate_WithdrawsWhenRoomTakenMeanwhile has another writer fill the
// admitted host between vm.created and host.allocated: the create finds no
// room anywhere, withdraws its VM and answers no_capacity, and so does its
// retry.
func TestCreate_WithdrawsWhenRoomTakenMeanwhile(t *testing.T) {
	var b *bustest.Bus
	intruder := func(s *Service) {
		s.stepHook = func(c *command, index int) error {
			if c.id != "c1" || index != createStepAllocated {
				return nil
			}
			last, err := bus.LastOnSubject(context.Background(), b.Conn, events.StreamEvents, "loom.evt.host.h1")
			if err != nil {
				return err
			}
			full := events.HostAllocated{VM: "other", UID: "u-other", CPU: 4, MemoryMiB: 1}
			env, data, err := events.Seal(full, events.KindHost, "h1", events.Origin{Actor: "elsewhere", CommandID: "x1", Time: time.Now()}, 0, events.Hash(last.Data))
			if err != nil {
				return err
			}
			_, err = bus.Append(context.Background(), b.JS, "loom.evt.host.h1", &env, data, last.Seq, "x1")
			return err
		}
	}
	b, nc := stormFixture(t, 1, 1, 4, intruder)
	reply := call(t, nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 256))
	want := []events.Type{events.TypeVMCreated, events.TypeVMDeleted}
	if code(reply.Error) != events.CodeNoCapacity || !reflect.DeepEqual(types(reply.Events), want) {
		t.Fatalf("create: %+v, want no_capacity after %v", reply, want)
	}
	again := call(t, nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 2, 256))
	if code(again.Error) != events.CodeNoCapacity || !again.Replayed || !reflect.DeepEqual(again.Events, reply.Events) {
		t.Fatalf("retry: %+v, want the original no_capacity, replayed", again)
	}
	hosts := replayHosts(t, b.JS)
	if _, ok := hosts["h1"].Allocations["web"]; ok {
		t.Fatal("web was allocated")
	}
	// The name is free again: the withdrawn VM is gone.
	r := startReplica(t, b)
	waitFor(t, 5*time.Second, func() error {
		if vm, _, _ := r.reader.VM(context.Background(), "web"); vm.Phase != events.PhaseGone || vm.AbsentReason != ReasonNoCapacity {
			return fmt.Errorf("web is %+v, want gone for no capacity", vm)
		}
		return nil
	})
}

// TestCreate_RetryAfterDeleteCreatesNothing deletes a VM whose create was
// cut short before it was placed: the retry must not bring it back.
func TestCreate_RetryAfterDeleteCreatesNothing(t *testing.T) {
	b, r, _ := schedulerFixture(t, crashAt("c1", createStepAllocated))
	call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 256))
	reply := must(t, r.nc, events.KindVM, events.VerbDelete, vmCmd("web", "d1"))
	if got := types(reply.Events); !reflect.DeepEqual(got, []events.Type{events.TypeVMDeleted}) {
		t.Fatalf("delete of a pending vm appended %v", got)
	}
	before := lastSeq(t, b)
	again := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 256))
	if code(again.Error) != events.CodeVMNotFound {
		t.Fatalf("retry: %+v, want vm_not_found", again)
	}
	reconcile(t, b, r)
	if got := lastSeq(t, b); got != before {
		t.Fatalf("stream at %d, want %d: the retry or the scheduler appended", got, before)
	}
}
