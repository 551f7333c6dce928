package events

import (
	"errors"
	"testing"
)

// The catalog follows a checkpoint from request to removal: the request is
// the goal's step, the host's report completes it, a restore is a step of
// its own, a deletion asks the host to remove the files, and their removal
// takes the entry out. Reports from another host, another incarnation or
// under other leases change nothing.
func TestVMState_CheckpointCatalog(t *testing.T) {
	h := &history{t: t}
	vm := EventSubject(KindVM, "web-1")
	obs := ObservationSubject("h1", KindVM, "web-1")
	leases := []LeaseEpoch{{Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 3}}
	var s VMState
	apply := func(rec *Record) {
		t.Helper()
		if err := s.Apply(rec); err != nil {
			t.Fatal(err)
		}
	}
	apply(h.add(vm, VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 256, Desired: DesiredRunning}, "c1"))
	apply(h.add(vm, VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1, Leases: leases}, "c1"))

	req := h.add(vm, VMCheckpointRequested{UID: "u1", Checkpoint: "ck-1", Kind: CheckpointFull}, "c2")
	apply(req)
	goal, _ := GoalOf(&s)
	if goal.Incarnation != req.Seq || goal.Step == nil || goal.Step.Op != CheckpointOpTake || goal.Step.Checkpoint != "ck-1" {
		t.Fatalf("goal after the request: %+v", goal)
	}
	// Another host's report, or another incarnation's, is not about it.
	apply(h.add(ObservationSubject("h2", KindVM, "web-1"), VMCheckpointTaken{UID: "u1", Checkpoint: "ck-1", Disk: "/x"}, ""))
	apply(h.add(obs, VMCheckpointTaken{UID: "u0", Checkpoint: "ck-1", Disk: "/x"}, ""))
	if c, _ := s.CheckpointOf("ck-1"); c.State != CheckpointRequested || s.Step == nil {
		t.Fatalf("foreign reports changed the entry: %+v step %+v", c, s.Step)
	}
	// A report under other epochs is refused.
	err := s.Apply(h.add(obs, VMCheckpointTaken{UID: "u1", Checkpoint: "ck-1", Disk: "/x",
		Leases: []LeaseEpoch{{Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 2}}}, ""))
	if !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("stale report: %v", err)
	}
	taken := h.add(obs, VMCheckpointTaken{UID: "u1", Incarnation: req.Seq, Checkpoint: "ck-1", Kind: CheckpointFull,
		Disk: "/d/web-1.qcow2", Memory: "/d/web-1.ck-1.mem", Top: "/d/web-1.ck-1.qcow2", DiskBytes: 10, MemoryBytes: 20, Leases: leases}, "")
	apply(taken)
	c, _ := s.CheckpointOf("ck-1")
	if c.State != CheckpointTaken || c.Host != "h1" || c.Disk != "/d/web-1.qcow2" || c.TakenSeq != taken.Seq || s.Step != nil {
		t.Fatalf("after taken: %+v step %+v", c, s.Step)
	}

	// A stop replaces a pending request's step; the entry waits for a report.
	apply(h.add(vm, VMCheckpointRequested{UID: "u1", Checkpoint: "ck-2", Kind: CheckpointDisk}, "c3"))
	apply(h.add(vm, VMGoalChanged{UID: "u1", Desired: DesiredStopped}, "c4"))
	if c, _ := s.CheckpointOf("ck-2"); s.Step != nil || c.State != CheckpointRequested {
		t.Fatalf("after a stop: step %+v entry %+v", s.Step, c)
	}
	apply(h.add(obs, VMCheckpointFailed{UID: "u1", Checkpoint: "ck-2", Op: CheckpointOpTake, Fault: Errorf(CodeVMNotRunning, "stopped")}, ""))
	if c, _ := s.CheckpointOf("ck-2"); c.State != CheckpointFailedSt || c.Fault == nil {
		t.Fatalf("after failed: %+v", c)
	}

	restore := h.add(vm, VMRestoreRequested{UID: "u1", Checkpoint: "ck-1", Restore: "rs-1", Kind: CheckpointFull, Host: "h1",
		Disk: "/d/web-1.qcow2", Memory: "/d/web-1.ck-1.mem", Desired: DesiredRunning}, "c5")
	apply(restore)
	goal, _ = GoalOf(&s)
	if goal.Desired != DesiredRunning || goal.Step == nil || goal.Step.Restore != "rs-1" || goal.Step.Memory != "/d/web-1.ck-1.mem" {
		t.Fatalf("goal after restore: %+v", goal)
	}
	apply(h.add(obs, VMRestored{UID: "u1", Incarnation: restore.Seq, Checkpoint: "ck-1", Restore: "rs-1", Top: "/d/web-1.rs-1.qcow2", Leases: leases}, ""))
	if c, _ := s.CheckpointOf("ck-1"); s.Step != nil || c.Restores != 1 {
		t.Fatalf("after restored: step %+v entry %+v", s.Step, c)
	}

	// Deleting a failed checkpoint (no files) drops it at once; a taken
	// one waits for its host to remove the files, and the goal says which.
	apply(h.add(vm, VMCheckpointDeleted{UID: "u1", Checkpoint: "ck-2", Reason: DeletedByCommand, Host: "h1"}, "c6"))
	if _, ok := s.CheckpointOf("ck-2"); ok {
		t.Fatal("a failed checkpoint stayed after its deletion")
	}
	del := h.add(vm, VMCheckpointDeleted{UID: "u1", Checkpoint: "ck-1", Reason: DeletedByCommand, Host: "h1"}, "c7")
	apply(del)
	goal, _ = GoalOf(&s)
	if goal.Incarnation != del.Seq || len(goal.Drop) != 1 || goal.Drop[0].Memory != "/d/web-1.ck-1.mem" || goal.Step != nil {
		t.Fatalf("goal after delete: %+v", goal)
	}
	apply(h.add(obs, VMCheckpointRemoved{UID: "u1", Checkpoints: []string{"ck-1"}}, ""))
	if len(s.Checkpoints) != 0 || s.Checkpoints != nil {
		t.Fatalf("catalog after removal: %+v", s.Checkpoints)
	}
	if goal, _ := GoalOf(&s); goal.Drop != nil {
		t.Fatalf("drop list after removal: %+v", goal.Drop)
	}
}

// A schedule is set and cleared by its decision.
func TestVMState_CheckpointSchedule(t *testing.T) {
	h := &history{t: t}
	vm := EventSubject(KindVM, "web-1")
	var s VMState
	for _, ev := range []Event{
		VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 256, Desired: DesiredRunning},
		VMCheckpointScheduled{UID: "u1", EveryMillis: 60000, Keep: 3, Kind: CheckpointDisk},
	} {
		if err := s.Apply(h.add(vm, ev, "c")); err != nil {
			t.Fatal(err)
		}
	}
	if s.Schedule == nil || s.Schedule.Every().Minutes() != 1 || s.Schedule.Keep != 3 {
		t.Fatalf("schedule: %+v", s.Schedule)
	}
	if err := s.Apply(h.add(vm, VMCheckpointScheduled{UID: "u1"}, "c")); err != nil {
		t.Fatal(err)
	}
	if s.Schedule != nil {
		t.Fatalf("cleared schedule: %+v", s.Schedule)
	}
}
