package events

import (
	"testing"
	"time"
)

// history builds records as a stream would store them, numbering them from 1.
type history struct {
	t    *testing.T
	seq  uint64
	recs []*Record
}

func (h *history) add(subject string, ev Event, commandID string) *Record {
	h.t.Helper()
	addr, err := ParseEventSubject(subject)
	if err != nil {
		h.t.Fatal(err)
	}
	h.seq++
	origin := Origin{Actor: "t", CommandID: commandID, Time: time.Unix(1700000000+int64(h.seq), 0)}
	env, data, err := Seal(ev, addr.Kind, addr.ID, origin, 0, nil)
	if err != nil {
		h.t.Fatal(err)
	}
	rec := &Record{Seq: h.seq, Subject: subject, Data: data, Envelope: env, Event: ev}
	h.recs = append(h.recs, rec)
	return rec
}

func TestVMState_Lifecycle(t *testing.T) {
	h := &history{t: t}
	vm := EventSubject(KindVM, "web-1")
	obs := ObservationSubject("h1", KindVM, "web-1")
	var s VMState
	apply := func(rec *Record) {
		t.Helper()
		if err := s.Apply(rec); err != nil {
			t.Fatal(err)
		}
	}

	apply(h.add(vm, VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 256, Desired: DesiredRunning}, "c1"))
	if s.Phase != PhasePending || !s.Exists() || s.Incarnation != 0 || s.CreateCommand != "c1" {
		t.Fatalf("after create: %+v", s)
	}
	if _, ok := GoalOf(&s); ok {
		t.Fatal("an unplaced VM has no goal")
	}
	placed := h.add(vm, VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1}, "c1")
	apply(placed)
	if s.Phase != PhasePlaced || s.Host != "h1" || s.Incarnation != placed.Seq || s.Converged() {
		t.Fatalf("after place: %+v", s)
	}
	goal, ok := GoalOf(&s)
	if !ok || goal.Incarnation != placed.Seq || goal.Desired != DesiredRunning || goal.Spec.MemoryMiB != 256 {
		t.Fatalf("goal after place: %+v %v", goal, ok)
	}

	// Observations from another host, of another incarnation's UID, or of
	// an older incarnation change nothing.
	apply(h.add(ObservationSubject("h2", KindVM, "web-1"), VMObserved{UID: "u1", Incarnation: placed.Seq, State: ObservedRunning}, ""))
	apply(h.add(obs, VMObserved{UID: "other", Incarnation: placed.Seq, State: ObservedRunning}, ""))
	if s.Observed.State != "" {
		t.Fatalf("foreign observation applied: %+v", s.Observed)
	}
	apply(h.add(obs, VMObserved{UID: "u1", Incarnation: placed.Seq, State: ObservedRunning}, ""))
	if !s.Converged() {
		t.Fatalf("running at the goal's incarnation should converge: %+v", s)
	}

	paused := h.add(vm, VMGoalChanged{UID: "u1", Desired: DesiredPaused}, "c2")
	apply(paused)
	if s.Converged() || s.Incarnation != paused.Seq {
		t.Fatalf("a new goal is not converged until observed: %+v", s)
	}
	apply(h.add(obs, VMObserved{UID: "u1", Incarnation: placed.Seq - 1, State: ObservedPaused}, ""))
	if s.Observed.Incarnation != placed.Seq {
		t.Fatal("an older incarnation's report went backwards")
	}
	apply(h.add(obs, VMObserved{UID: "u1", Incarnation: paused.Seq, State: ObservedPaused}, ""))
	if !s.Converged() {
		t.Fatalf("paused should converge: %+v", s)
	}

	deleted := h.add(vm, VMDeleted{UID: "u1", Reason: AbsentDeleted}, "c3")
	apply(deleted)
	if s.Phase != PhaseDeleting || !s.Exists() || s.Desired != DesiredAbsent || s.Incarnation != deleted.Seq {
		t.Fatalf("after delete: %+v", s)
	}
	if g, ok := GoalOf(&s); !ok || g.Desired != DesiredAbsent || g.AbsentReason != AbsentDeleted {
		t.Fatalf("deleting VM's goal: %+v %v", g, ok)
	}
	apply(h.add(obs, VMObserved{UID: "u1", Incarnation: deleted.Seq, State: ObservedAbsent}, ""))
	if s.Phase != PhaseGone || s.Exists() {
		t.Fatalf("reported absent: %+v", s)
	}
	if _, ok := GoalOf(&s); ok {
		t.Fatal("a gone VM has no goal")
	}

	// The name can be used again: a new incarnation starts clean.
	apply(h.add(vm, VMCreated{UID: "u2", Image: "demo", CPU: 2, MemoryMiB: 128, Desired: DesiredStopped}, "c4"))
	if s.UID != "u2" || s.Phase != PhasePending || s.Host != "" || s.Observed.State != "" {
		t.Fatalf("new incarnation: %+v", s)
	}
}

func TestVMState_DeletePendingIsGone(t *testing.T) {
	h := &history{t: t}
	vm := EventSubject(KindVM, "a")
	var s VMState
	for _, rec := range []*Record{
		h.add(vm, VMCreated{UID: "u", Image: "i", CPU: 1, MemoryMiB: 1, Desired: DesiredRunning}, "c1"),
		h.add(vm, VMDeleted{UID: "u", Reason: AbsentDeleted}, "c2"),
	} {
		if err := s.Apply(rec); err != nil {
			t.Fatal(err)
		}
	}
	if s.Phase != PhaseGone {
		t.Fatalf("a VM deleted before placement has nothing to wait for: %+v", s)
	}
}

func TestHostState_Capacity(t *testing.T) {
	h := &history{t: t}
	host := EventSubject(KindHost, "h1")
	var s HostState
	apply := func(ev Event) {
		t.Helper()
		if err := s.Apply(h.add(host, ev, "c")); err != nil {
			t.Fatal(err)
		}
	}
	if s.Fits(1, 1) {
		t.Fatal("an unregistered host fits nothing")
	}
	apply(HostRegistered{CPU: 4, MemoryMiB: 1024})
	apply(HostAllocated{VM: "a", UID: "ua", CPU: 3, MemoryMiB: 512})
	if !s.Fits(1, 512) || s.Fits(2, 1) || s.Fits(1, 513) {
		t.Fatalf("fits after one allocation: used %v", s.Allocations)
	}
	apply(HostCordoned{Reason: "x"})
	if s.Fits(1, 1) {
		t.Fatal("a cordoned host takes no VM")
	}
	apply(HostUncordoned{})
	apply(HostReleased{VM: "a", UID: "not-ua", Reason: "x"})
	if cpu, _ := s.Used(); cpu != 3 {
		t.Fatal("a release for another incarnation freed capacity")
	}
	apply(HostReleased{VM: "a", UID: "ua", Reason: "deleted"})
	if cpu, mem := s.Free(); cpu != 4 || mem != 1024 {
		t.Fatalf("free after release = %d, %d", cpu, mem)
	}
	if err := s.Apply(h.add(EventSubject(KindVM, "x"), VMDeleted{}, "c")); err == nil {
		t.Fatal("a VM event applied to a host")
	}
}

// TestHostState_KeyStays: a host's key comes with its registration, and a
// later registration without one does not take it away (the handler
// refuses that; a history that holds one anyway never downgrades the host
// to unsigned observations).
func TestHostState_KeyStays(t *testing.T) {
	h := &history{t: t}
	host := EventSubject(KindHost, "h1")
	const key = "UASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLF"
	var s HostState
	for _, ev := range []HostRegistered{{CPU: 4, MemoryMiB: 1024}, {CPU: 4, MemoryMiB: 1024, Key: key}, {CPU: 4, MemoryMiB: 1024}} {
		if err := s.Apply(h.add(host, ev, "c")); err != nil {
			t.Fatal(err)
		}
	}
	if s.Key != key {
		t.Fatalf("key %q, want %s", s.Key, key)
	}
}

func TestRegisterHost_ValidatesKey(t *testing.T) {
	cmd := RegisterHost{Name: "h1", CPU: 1, MemoryMiB: 1, Key: "UASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLF"}
	if err := cmd.Validate(); err != nil {
		t.Fatalf("a valid key: %v", err)
	}
	for _, bad := range []string{"U123", "UASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLG",
		"AASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLF"} {
		cmd.Key = bad
		if err := cmd.Validate(); err == nil {
			t.Errorf("key %q accepted", bad)
		}
	}
}
