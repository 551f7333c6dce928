package dispatch_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/internal/eventually"
	"github.com/loomctl/loom/projections/dispatch"
)

// memReader is a VM read model in memory whose position the test controls:
// it applies only what the test hands it.
type memReader struct {
	mu     sync.Mutex
	vms    map[string]events.VMState
	images map[string]events.ImageState
	// frozen, when set, makes reads wait until it is closed.
	frozen chan struct{}
}

func (r *memReader) wait() {
	r.mu.Lock()
	frozen := r.frozen
	r.mu.Unlock()
	if frozen != nil {
		<-frozen
	}
}

func (r *memReader) apply(t *testing.T, rec *events.Record) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.vms[rec.Envelope.AggregateID]
	if err := s.Apply(rec); err != nil {
		t.Fatal(err)
	}
	r.vms[rec.Envelope.AggregateID] = s
}

func (r *memReader) VM(_ context.Context, name string) (events.VMState, events.Head, error) {
	r.wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.vms[name], events.Head{}, nil
}

func (r *memReader) Image(_ context.Context, name string) (events.ImageState, events.Head, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.images[name], events.Head{}, nil
}

func (r *memReader) Net(context.Context, string) (events.NetState, events.Head, error) {
	return events.NetState{}, events.Head{}, nil
}

func (r *memReader) AllVMs(context.Context) ([]events.VMState, error) {
	r.wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []events.VMState
	for _, s := range r.vms {
		out = append(out, s)
	}
	return out, nil
}

// writer appends events to one subject, keeping its head.
type writer struct {
	t    *testing.T
	b    *bustest.Bus
	head map[string]events.Head
}

func (w *writer) append(subject string, ev events.Event) *events.Record {
	w.t.Helper()
	addr, err := events.ParseEventSubject(subject)
	if err != nil {
		w.t.Fatal(err)
	}
	head := w.head[subject]
	origin := events.Origin{Actor: "t", CommandID: fmt.Sprintf("c%d", len(w.head)), Time: time.Unix(1700000000, 0)}
	env, data, err := events.Seal(ev, addr.Kind, addr.ID, origin, int(head.Seq), head.Hash)
	if err != nil {
		w.t.Fatal(err)
	}
	got, err := bus.Append(context.Background(), w.b.JS, subject, &env, data, head.Seq, "")
	if err != nil {
		w.t.Fatal(err)
	}
	w.head[subject] = events.Head{Seq: got.Seq, Hash: events.Hash(data)}
	return &events.Record{Seq: got.Seq, Subject: subject, Data: data, Envelope: env, Event: ev}
}

func goalOn(t *testing.T, b *bustest.Bus, host, vm string) (events.Goal, bool) {
	t.Helper()
	m, err := bus.LastOnSubject(context.Background(), b.Conn, events.StreamGoals, events.GoalSubject(host, vm))
	if errors.Is(err, bus.ErrNoMessage) {
		return events.Goal{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	var g events.Goal
	if err := events.Unmarshal(m.Data, &g); err != nil {
		t.Fatal(err)
	}
	return g, true
}

func waitFor(t *testing.T, what string, cond func() error) {
	t.Helper()
	eventually.WaitFor(t, 10*time.Second, what, cond)
}

func start(t *testing.T, b *bustest.Bus, r dispatch.Reader) *dispatch.Dispatcher {
	t.Helper()
	d := dispatch.New(dispatch.Config{Conn: b.Conn, JS: b.JS, Reader: r, Resync: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return d
}

func TestDispatcher_GoalsFollowDecisionsAndNeverGoBack(t *testing.T) {
	b := bustest.Start(t)
	w := &writer{t: t, b: b, head: map[string]events.Head{}}
	demo := map[string]events.ImageState{"demo": {Name: "demo", Registered: true, Format: "qcow2", Source: "/img/demo.qcow2",
		Boot: &events.ImageBoot{Kernel: "/img/vmlinuz", Initrd: "/img/initrd.gz"}}}
	live := &memReader{vms: map[string]events.VMState{}, images: demo}
	lagging := &memReader{vms: map[string]events.VMState{}, images: demo}
	vm := events.EventSubject(events.KindVM, "web-1")

	created := w.append(vm, events.VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 64, Desired: events.DesiredRunning})
	placed := w.append(vm, events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1})
	for _, rec := range []*events.Record{created, placed} {
		live.apply(t, rec)
		lagging.apply(t, rec)
	}
	d := start(t, b, live)
	slow := start(t, b, lagging) // a second dispatcher whose read model falls behind

	waitFor(t, "running goal", func() error {
		if g, ok := goalOn(t, b, "h1", "web-1"); !ok || g.Incarnation != placed.Seq || g.Desired != events.DesiredRunning {
			return fmt.Errorf("goal = %+v, %v", g, ok)
		}
		return nil
	})
	// The goal says where the image is and how it boots, from the images
	// read model.
	if g, _ := goalOn(t, b, "h1", "web-1"); g.Spec.Disk == nil || g.Spec.Disk.Source != "/img/demo.qcow2" || g.Spec.Disk.Boot == nil || g.Spec.Disk.Boot.Kernel != "/img/vmlinuz" {
		t.Fatalf("goal spec %+v, want the image's disk and boot", g.Spec)
	}
	for _, ev := range []events.Event{
		events.VMGoalChanged{UID: "u1", Desired: events.DesiredPaused},
		events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted},
	} {
		rec := w.append(vm, ev)
		live.apply(t, rec)
		d.Notify([]string{"web-1"})
		waitFor(t, string(rec.Envelope.Type)+" goal", func() error {
			if g, _ := goalOn(t, b, "h1", "web-1"); g.Incarnation != rec.Seq {
				return fmt.Errorf("goal = %+v, want incarnation %d", g, rec.Seq)
			}
			return nil
		})
	}
	// The lagging dispatcher resyncs every 50ms with its older state (a
	// running goal): many passes later, the goal has not gone back.
	passes := slow.Passes()
	waitFor(t, "lagging dispatcher passes", func() error {
		if slow.Passes() < passes+5 {
			return fmt.Errorf("%d passes", slow.Passes()-passes)
		}
		return nil
	})
	if g, _ := goalOn(t, b, "h1", "web-1"); g.Desired != events.DesiredAbsent || g.AbsentReason != events.AbsentDeleted {
		t.Fatalf("goal moved backwards to %+v", g)
	}
}

func TestDispatcher_RemovesGoalOfGoneVMButNotANewerOne(t *testing.T) {
	b := bustest.Start(t)
	w := &writer{t: t, b: b, head: map[string]events.Head{}}
	r := &memReader{vms: map[string]events.VMState{}}
	vm := events.EventSubject(events.KindVM, "a")
	obs := events.ObservationSubject("h1", events.KindVM, "a")
	for _, ev := range []events.Event{
		events.VMCreated{UID: "u1", Image: "i", CPU: 1, MemoryMiB: 1, Desired: events.DesiredRunning},
		events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1},
	} {
		r.apply(t, w.append(vm, ev))
	}
	d := start(t, b, r)
	waitFor(t, "goal", func() error {
		if _, ok := goalOn(t, b, "h1", "a"); !ok {
			return errors.New("no goal yet")
		}
		return nil
	})
	deleted := w.append(vm, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted})
	r.apply(t, deleted)
	d.Notify([]string{"a"})
	waitFor(t, "absent goal", func() error {
		if g, _ := goalOn(t, b, "h1", "a"); g.Desired != events.DesiredAbsent {
			return fmt.Errorf("goal = %+v", g)
		}
		return nil
	})
	r.apply(t, w.append(obs, events.VMObserved{UID: "u1", Incarnation: deleted.Seq, State: events.ObservedAbsent}))
	d.Notify([]string{"a"})
	waitFor(t, "goal removed", func() error {
		if g, ok := goalOn(t, b, "h1", "a"); ok {
			return fmt.Errorf("goal still there: %+v", g)
		}
		return nil
	})

	// A new incarnation of the name gets a goal again.
	r.apply(t, w.append(vm, events.VMCreated{UID: "u2", Image: "i", CPU: 1, MemoryMiB: 1, Desired: events.DesiredRunning}))
	placed := w.append(vm, events.VMPlaced{UID: "u2", Host: "h1", AllocationSeq: 9})
	r.apply(t, placed)
	d.Notify([]string{"a"})
	waitFor(t, "new incarnation's goal", func() error {
		if g, _ := goalOn(t, b, "h1", "a"); g.UID != "u2" || g.Incarnation != placed.Seq {
			return fmt.Errorf("goal = %+v", g)
		}
		return nil
	})
}

func TestDispatcher_LaggingReaderCannotResurrectRemovedGoal(t *testing.T) {
	b := bustest.Start(t)
	w := &writer{t: t, b: b, head: map[string]events.Head{}}
	stale := &memReader{vms: map[string]events.VMState{}}
	vm := events.EventSubject(events.KindVM, "a")
	stale.apply(t, w.append(vm, events.VMCreated{UID: "u1", Image: "i", CPU: 1, MemoryMiB: 1, Desired: events.DesiredRunning}))
	stale.apply(t, w.append(vm, events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1}))
	// The VM was deleted since: this reader has not seen it, and the goal
	// subject is empty (its goal was already removed).
	w.append(vm, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted})

	d := start(t, b, stale)
	waitFor(t, "a few passes", func() error {
		if d.Passes() < 5 {
			return fmt.Errorf("%d passes", d.Passes())
		}
		return nil
	})
	if g, ok := goalOn(t, b, "h1", "a"); ok || d.Published() != 0 {
		t.Fatalf("a stale read model published a goal for a deleted VM: %+v", g)
	}
}

// Two dispatchers agree on the goal that stands; one stalls with an older
// decision in hand while the other publishes a newer one. The stalled one's
// publish must lose: only the expected-last-subject-sequence check stops it.
func TestDispatcher_StalledDispatcherLosesTheRace(t *testing.T) {
	b := bustest.Start(t)
	w := &writer{t: t, b: b, head: map[string]events.Head{}}
	live := &memReader{vms: map[string]events.VMState{}}
	slowReader := &memReader{vms: map[string]events.VMState{}}
	vm := events.EventSubject(events.KindVM, "a")
	for _, ev := range []events.Event{
		events.VMCreated{UID: "u1", Image: "i", CPU: 1, MemoryMiB: 1, Desired: events.DesiredRunning},
		events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1},
	} {
		rec := w.append(vm, ev)
		live.apply(t, rec)
		slowReader.apply(t, rec)
	}
	d := start(t, b, live)
	waitFor(t, "first goal", func() error {
		if _, ok := goalOn(t, b, "h1", "a"); !ok {
			return errors.New("none")
		}
		return nil
	})
	slow := start(t, b, slowReader) // loads the standing goal
	waitFor(t, "slow dispatcher settled", func() error {
		if slow.Passes() < 3 {
			return fmt.Errorf("%d passes", slow.Passes())
		}
		return nil
	})

	thaw := make(chan struct{})
	slowReader.mu.Lock()
	slowReader.frozen = thaw
	slowReader.mu.Unlock()
	paused := w.append(vm, events.VMGoalChanged{UID: "u1", Desired: events.DesiredPaused})
	slowReader.apply(t, paused) // the slow one will act on this older decision
	live.apply(t, paused)
	deleted := w.append(vm, events.VMDeleted{UID: "u1", Reason: events.AbsentDeleted})
	live.apply(t, deleted)
	d.Notify([]string{"a"})
	waitFor(t, "absent goal", func() error {
		if g, _ := goalOn(t, b, "h1", "a"); g.Incarnation != deleted.Seq {
			return fmt.Errorf("goal = %+v", g)
		}
		return nil
	})
	passes := slow.Passes()
	slowReader.mu.Lock()
	slowReader.frozen = nil
	slowReader.mu.Unlock()
	close(thaw)
	waitFor(t, "slow dispatcher's passes", func() error {
		if slow.Passes() < passes+3 {
			return fmt.Errorf("%d passes", slow.Passes()-passes)
		}
		return nil
	})
	if g, _ := goalOn(t, b, "h1", "a"); g.Incarnation != deleted.Seq || g.Desired != events.DesiredAbsent {
		t.Fatalf("goal moved back to %+v", g)
	}
}

// A VM moved off a lost host leaves that host an absent goal, so that the
// host, if it comes back, destroys it; once the host reports it absent,
// that goal goes.
func TestDispatcher_HostLeftGetsAbsentGoalUntilItReportsAbsent(t *testing.T) {
	b := bustest.Start(t)
	w := &writer{t: t, b: b, head: map[string]events.Head{}}
	r := &memReader{vms: map[string]events.VMState{}}
	vm := events.EventSubject(events.KindVM, "a")
	r.apply(t, w.append(vm, events.VMCreated{UID: "u1", Image: "i", CPU: 1, MemoryMiB: 1, Desired: events.DesiredRunning}))
	r.apply(t, w.append(vm, events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1}))
	d := start(t, b, r)
	moved := w.append(vm, events.VMPlaced{UID: "u1", Host: "h2", AllocationSeq: 2, From: "h1", Reason: events.AbsentHostLost, Reprovisioned: true})
	r.apply(t, moved)
	d.Notify([]string{"a"})
	waitFor(t, "goals on both hosts", func() error {
		left, _ := goalOn(t, b, "h1", "a")
		now, _ := goalOn(t, b, "h2", "a")
		if left.Desired != events.DesiredAbsent || left.AbsentReason != events.AbsentHostLost || now.Desired != events.DesiredRunning || now.Incarnation != moved.Seq {
			return fmt.Errorf("h1 %+v, h2 %+v", left, now)
		}
		return nil
	})
	// h1 comes back and destroys the VM there.
	r.apply(t, w.append(events.ObservationSubject("h1", events.KindVM, "a"), events.VMObserved{UID: "u1", Incarnation: moved.Seq, State: events.ObservedAbsent}))
	d.Notify([]string{"a"})
	waitFor(t, "h1's goal removed", func() error {
		if g, ok := goalOn(t, b, "h1", "a"); ok {
			return fmt.Errorf("h1's goal still there: %+v", g)
		}
		return nil
	})
	if g, ok := goalOn(t, b, "h2", "a"); !ok || g.Desired != events.DesiredRunning {
		t.Fatalf("h2's goal %+v, %v", g, ok)
	}
}
