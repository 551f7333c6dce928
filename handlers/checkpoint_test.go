package handlers

import (
	"context"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// report publishes ev on vm's observation subject as the agent of host
// would, chained to the subject's last message.
func report(t *testing.T, r *replica, host, vm string, ev events.Event) {
	t.Helper()
	reportOn(t, r, host, events.KindVM, vm, ev)
}

// reportOn publishes ev on host's observation subject of (kind, id),
// chained to the subject's last message.
func reportOn(t *testing.T, r *replica, host string, kind events.Kind, id string, ev events.Event) {
	t.Helper()
	subject := events.ObservationSubject(host, kind, id)
	ctx := context.Background()
	var prev []byte
	last, err := bus.LastOnSubject(ctx, r.nc, events.StreamEvents, subject)
	if err == nil {
		prev = events.Hash(last.Data)
	}
	env, data, err := events.Seal(ev, kind, id, events.Origin{Actor: "agent:" + host, Time: time.Now()}, 0, prev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.AppendExpecting(ctx, r.js, subject, &env, data, bus.Expect{Seq: last.Seq}, ""); err != nil {
		t.Fatal(err)
	}
}

// expectCode sends a command and wants it refused with code.
func expectCode(t *testing.T, r *replica, verb string, body any, code events.Code) {
	t.Helper()
	reply := call(t, r.nc, events.KindVM, verb, events.FormatMsgpack, "alice", body)
	if reply.Error == nil || reply.Error.Code != code {
		t.Fatalf("%s %+v: got %+v events %v, want code %d", verb, body, reply.Error, reply.Events, code)
	}
}

// takenBy reports vm's pending checkpoint taken by its host, with files.
func takenBy(t *testing.T, r *replica, vm events.VMState) {
	t.Helper()
	step := vm.Step
	if step == nil || step.Op != events.CheckpointOpTake {
		t.Fatalf("vm %s has no checkpoint to take: %+v", vm.Name, step)
	}
	report(t, r, vm.Host, vm.Name, events.VMCheckpointTaken{UID: vm.UID, Incarnation: vm.Incarnation, Checkpoint: step.Checkpoint, Kind: step.Kind,
		Disk: "/d/" + vm.Name + ".qcow2", Memory: "/d/" + vm.Name + "." + step.Checkpoint + ".mem", Top: "/d/" + vm.Name + "." + step.Checkpoint + ".qcow2",
		DiskBytes: 1, MemoryBytes: 2, Millis: 3, Leases: vm.Leases})
}

func TestCheckpoint_TakeRestoreDelete(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "web")

	cmd := &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck1"}, Name: "web", Kind: events.CheckpointFull}
	first := must(t, r.nc, events.KindVM, events.VerbCheckpoint, cmd)
	again := must(t, r.nc, events.KindVM, events.VerbCheckpoint, cmd)
	if !again.Replayed || again.LastSeq() != first.LastSeq() {
		t.Fatalf("a retried checkpoint acted again: %+v then %+v", first, again)
	}
	caughtUp(t, b, r)
	vm, _, _ := r.reader.VM(ctx, "web")
	goal, _ := events.GoalOf(&vm)
	if goal.Incarnation != first.LastSeq() || goal.Step == nil || goal.Step.Kind != events.CheckpointFull {
		t.Fatalf("goal after the request: %+v", goal)
	}
	id := goal.Step.Checkpoint
	// One step at a time.
	expectCode(t, r, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck2"}, Name: "web", Kind: events.CheckpointDisk}, events.CodeVMBusy)
	expectCode(t, r, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs0"}, Name: "web", Checkpoint: id}, events.CodeVMBusy)

	takenBy(t, r, vm)
	caughtUp(t, b, r)
	expectCode(t, r, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs1"}, Name: "web", Checkpoint: "ck-none"}, events.CodeCheckpointNotFound)

	restore := must(t, r.nc, events.KindVM, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs2"}, Name: "web", Checkpoint: id})
	caughtUp(t, b, r)
	vm, _, _ = r.reader.VM(ctx, "web")
	step := vm.Step
	if step == nil || step.Op != events.CheckpointOpRestore || step.Disk != "/d/web.qcow2" || step.Memory != "/d/web."+id+".mem" || vm.Incarnation != restore.LastSeq() {
		t.Fatalf("after the restore request: %+v step %+v", vm, step)
	}
	report(t, r, vm.Host, "web", events.VMRestored{UID: vm.UID, Incarnation: vm.Incarnation, Checkpoint: id, Restore: step.Restore, Top: "/d/web.r.qcow2", Leases: vm.Leases})
	caughtUp(t, b, r)

	must(t, r.nc, events.KindVM, events.VerbDeleteCheckpoint, &events.DeleteCheckpoint{CommandMeta: events.CommandMeta{CommandID: "del1"}, Name: "web", Checkpoint: id})
	caughtUp(t, b, r)
	expectCode(t, r, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs3"}, Name: "web", Checkpoint: id}, events.CodeCheckpointNotFound)
	vm, _, _ = r.reader.VM(ctx, "web")
	goal, _ = events.GoalOf(&vm)
	if len(goal.Drop) != 1 || goal.Drop[0].Checkpoint != id {
		t.Fatalf("the goal does not ask the host to remove the files: %+v", goal)
	}
	report(t, r, vm.Host, "web", events.VMCheckpointRemoved{UID: vm.UID, Checkpoints: []string{id}})
	caughtUp(t, b, r)
	if vm, _, _ = r.reader.VM(ctx, "web"); len(vm.Checkpoints) != 0 {
		t.Fatalf("catalog after removal: %+v", vm.Checkpoints)
	}
}

// Bad requests: another VM's checkpoint, one never taken, a stopped VM, a
// VM that does not exist.
func TestCheckpoint_Refusals(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "web")
	if reply := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("db", "c2", 1, 512)); reply.Error != nil {
		t.Fatal(reply.Error)
	}
	must(t, r.nc, events.KindVM, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck1"}, Name: "db", Kind: events.CheckpointDisk})
	caughtUp(t, b, r)
	db, _, _ := r.reader.VM(ctx, "db")
	id := db.Step.Checkpoint
	expectCode(t, r, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs1"}, Name: "db", Checkpoint: id}, events.CodeVMBusy)
	report(t, r, db.Host, "db", events.VMCheckpointFailed{UID: db.UID, Incarnation: db.Incarnation, Checkpoint: id, Op: events.CheckpointOpTake,
		Fault: events.Errorf(events.CodeCheckpointUnsupported, "no disks"), Leases: db.Leases})
	caughtUp(t, b, r)
	expectCode(t, r, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs2"}, Name: "db", Checkpoint: id}, events.CodeCheckpointNotReady)
	expectCode(t, r, events.VerbRestore, &events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: "rs3"}, Name: "web", Checkpoint: id}, events.CodeCheckpointNotFound)

	must(t, r.nc, events.KindVM, events.VerbStop, vmCmd("web", "stop1"))
	expectCode(t, r, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck2"}, Name: "web", Kind: events.CheckpointFull}, events.CodeVMNotRunning)
	expectCode(t, r, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck3"}, Name: "nope", Kind: events.CheckpointFull}, events.CodeVMNotFound)
	expectCode(t, r, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck4"}, Name: "web", Kind: "memory"}, events.CodeInvalidArgument)
	expectCode(t, r, events.VerbSchedule, &events.ScheduleCheckpoints{CommandMeta: events.CommandMeta{CommandID: "s1"}, Name: "web", EveryMillis: 1000, Keep: 1}, events.CodeInvalidArgument)
}

// A schedule asks for a checkpoint each period, never two for one period
// however many passes (and replicas) run, and deletes the scheduled ones
// beyond its keep, oldest first, leaving a person's checkpoints alone.
func TestCheckpoint_Schedule(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	b, r, _ := schedulerFixture(t, func(s *Service) { s.cfg.Now = clock.Now })
	other := startReplica(t, b, func(s *Service) { s.cfg.Now = clock.Now })
	ctx := context.Background()
	createVM(t, b, r, "web")
	must(t, r.nc, events.KindVM, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "manual"}, Name: "web", Kind: events.CheckpointDisk})
	caughtUp(t, b, r)
	vm, _, _ := r.reader.VM(ctx, "web")
	manual := vm.Step.Checkpoint
	takenBy(t, r, vm)
	must(t, r.nc, events.KindVM, events.VerbSchedule, &events.ScheduleCheckpoints{CommandMeta: events.CommandMeta{CommandID: "s1"}, Name: "web", EveryMillis: 60_000, Keep: 2})

	var scheduled []string
	for period := range 4 {
		reconcile(t, b, r)
		reconcile(t, b, other)
		vm, _, _ = r.reader.VM(ctx, "web")
		if vm.Step == nil {
			t.Fatalf("period %d: no checkpoint requested", period)
		}
		scheduled = append(scheduled, vm.Step.Checkpoint)
		takenBy(t, r, vm)
		reconcile(t, b, r) // not due again within the period
		if vm, _, _ = r.reader.VM(ctx, "web"); vm.Step != nil {
			t.Fatalf("period %d: a second checkpoint in one period: %+v", period, vm.Step)
		}
		clock.Advance(time.Minute)
	}
	reconcile(t, b, r)
	vm, _, _ = r.reader.VM(ctx, "web")
	state := map[string]events.CheckpointState{}
	for _, c := range vm.Checkpoints {
		state[c.ID] = c.State
	}
	if state[manual] != events.CheckpointTaken {
		t.Errorf("the schedule touched a person's checkpoint: %v", state[manual])
	}
	for i, id := range scheduled {
		want := events.CheckpointTaken
		if i < len(scheduled)-2 {
			want = events.CheckpointDeleting
		}
		if id == vm.Step.Checkpoint {
			continue
		}
		if state[id] != want {
			t.Errorf("scheduled checkpoint %d (%s) is %q, want %q", i, id, state[id], want)
		}
	}
}
