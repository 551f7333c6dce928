package handlers

import (
	"context"
	"slices"
	"testing"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// declareLost records host.lost for host as the failure detector does
// once its marker won.
func declareLost(t *testing.T, r *replica, host string, marker uint64) {
	t.Helper()
	if !(&detector{s: r.svc}).declare(context.Background(), host, marker, marker-1) {
		t.Fatalf("declare %s lost", host)
	}
}

// createVM creates name as alice and waits until the reader has it.
func createVM(t *testing.T, b *bustest.Bus, r *replica, name string, opts ...func(*events.CreateVM)) {
	t.Helper()
	cmd := createCmd(name, "c1", 1, 512)
	for _, opt := range opts {
		opt(cmd)
	}
	if reply := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", cmd); reply.Error != nil {
		t.Fatal(reply.Error)
	}
	caughtUp(t, b, r)
}

func TestHostLoss_LeasesExpireThenTheVMRestartsElsewhere(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "web")
	before, _, _ := r.reader.VM(ctx, "web")

	// Nothing moves while the host is alive, however many passes.
	reconcile(t, b, r)
	if vm, _, _ := r.reader.VM(ctx, "web"); vm.Host != before.Host || vm.Incarnation != before.Incarnation {
		t.Fatalf("a pass moved a VM of a live host: %+v", vm)
	}

	declareLost(t, r, before.Host, 100)
	reconcile(t, b, r) // expires the grants
	for _, l := range before.Leases {
		state, _ := r.reader.Lease(ctx, l.Resource)
		if g, ok := state.Grant(l.Mode, before.UID); ok && g.Epoch == l.Epoch {
			t.Fatalf("%s still held under %d after its host was lost", l.Resource, l.Epoch)
		}
	}
	reconcile(t, b, r) // moves the VM
	reconcile(t, b, r) // releases the allocation it left
	after, _, _ := r.reader.VM(ctx, "web")
	if after.Host == before.Host || after.Left != before.Host || after.LeftReason != events.AbsentHostLost || after.UID != before.UID {
		t.Fatalf("after the loss: %+v", after)
	}
	if len(after.Leases) != 2 {
		t.Fatalf("moved under leases %+v", after.Leases)
	}
	for i, l := range after.Leases {
		if l.Epoch <= before.Leases[i].Epoch {
			t.Errorf("new grant %+v is not newer than %+v", l, before.Leases[i])
		}
		state, _ := r.reader.Lease(ctx, l.Resource)
		if g, ok := state.Grant(l.Mode, after.UID); !ok || g.Epoch != l.Epoch || g.Host != after.Host {
			t.Errorf("%s: grant %+v, want epoch %d on %s", l.Resource, g, l.Epoch, after.Host)
		}
	}
	m, err := bus.LastOnSubject(ctx, r.nc, events.StreamEvents, events.EventSubject(events.KindVM, "web"))
	if err != nil {
		t.Fatal(err)
	}
	rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
	if err != nil {
		t.Fatal(err)
	}
	last, _ := rec.Event.(events.VMPlaced)
	if !last.Reprovisioned || last.From != before.Host || last.Reason != events.AbsentHostLost {
		t.Errorf("the move does not say where from and that the disk was provisioned again: %+v", last)
	}
	for _, h := range replayHosts(t, b.JS) {
		if a, ok := h.Allocations["web"]; ok && h.Name != after.Host {
			t.Errorf("allocation %+v left on %s", a, h.Name)
		}
	}
	// Another pass changes nothing.
	seq := lastSeq(t, b)
	reconcile(t, b, r)
	if got := lastSeq(t, b); got != seq {
		t.Fatalf("a quiet pass appended: %d -> %d", seq, got)
	}
}

func TestHostLoss_LeaveStoppedPolicy(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "db", func(c *events.CreateVM) { c.OnHostLost = events.LeaveStopped })
	before, _, _ := r.reader.VM(ctx, "db")
	declareLost(t, r, before.Host, 100)
	reconcile(t, b, r)
	reconcile(t, b, r)
	after, _, _ := r.reader.VM(ctx, "db")
	if after.Host != before.Host || after.Desired != events.DesiredStopped || after.Left != "" {
		t.Fatalf("after the loss: %+v, want stopped on %s", after, before.Host)
	}
	for _, l := range before.Leases {
		if state, _ := r.reader.Lease(ctx, l.Resource); state.Held() {
			t.Errorf("%s still held: %+v", l.Resource, state)
		}
	}
}

// A forced break of a running VM's disk lease marks it breaking; the
// grant ends only once the VM's agent reports the domain stopped under
// it, and nobody may take the disk before.
func TestBreak_ForcedCompletesWhenTheHolderStops(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "web")
	vm, _, _ := r.reader.VM(ctx, "web")
	observe(t, r, vm.Host, "web", events.VMObserved{UID: vm.UID, Incarnation: vm.Incarnation, State: events.ObservedRunning, Leases: vm.Leases})
	br := lease(t, r.nc, events.VerbBreak, &events.BreakLease{CommandMeta: events.CommandMeta{CommandID: "b1"}, Resource: "disk/web", Holder: vm.UID, Force: true})
	if br.Error != nil {
		t.Fatal(br.Error)
	}
	reconcile(t, b, r)
	state, _ := r.reader.Lease(ctx, "disk/web")
	if !state.Exclusive.Breaking {
		t.Fatalf("a break completed while the domain runs: %+v", state)
	}
	wantCode(t, "taking a breaking disk", lease(t, r.nc, events.VerbAcquire, acquireCmd("take", "disk/web", events.LeaseExclusive, "other", "h2")), events.CodeLeaseHeld)

	fault := events.Errorf(events.CodeLeaseNotCurrent, "revoked")
	observe(t, r, vm.Host, "web", events.VMObserved{UID: vm.UID, Incarnation: vm.Incarnation, State: events.ObservedStopped, Fault: fault, Leases: vm.Leases})
	reconcile(t, b, r)
	if state, _ := r.reader.Lease(ctx, "disk/web"); state.Exclusive.Epoch != 0 {
		t.Fatalf("the break did not complete once the domain stopped: %+v", state.Exclusive)
	}
	if x := lease(t, r.nc, events.VerbAcquire, acquireCmd("take2", "disk/web", events.LeaseExclusive, "other", "h2")); x.Error != nil {
		t.Fatalf("the disk after the break: %v", x.Error)
	}
}

// A VM whose disk grant was broken starts again only under new grants:
// the start takes them and places it again, and its goal names them.
func TestGate_StartRenewsLapsedGrants(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "web")
	vm, _, _ := r.reader.VM(ctx, "web")
	must(t, r.nc, events.KindLease, events.VerbBreak, &events.BreakLease{CommandMeta: events.CommandMeta{CommandID: "b1"}, Resource: "disk/web", Holder: vm.UID, Force: true})
	wantCode(t, "start while the break waits", call(t, r.nc, events.KindVM, events.VerbStart, events.FormatMsgpack, "alice", vmCmd("web", "s0")), events.CodeLeaseHeld)
	observe(t, r, vm.Host, "web", events.VMObserved{UID: vm.UID, Incarnation: vm.Incarnation, State: events.ObservedStopped,
		Fault: events.Errorf(events.CodeLeaseNotCurrent, "revoked"), Leases: vm.Leases})
	reconcile(t, b, r)

	reply := call(t, r.nc, events.KindVM, events.VerbStart, events.FormatMsgpack, "alice", vmCmd("web", "s1"))
	if reply.Error != nil {
		t.Fatal(reply.Error)
	}
	caughtUp(t, b, r)
	after, _, _ := r.reader.VM(ctx, "web")
	if after.Host != vm.Host || after.Left != "" || len(after.Leases) != 2 || after.Leases[1].Epoch <= vm.Leases[1].Epoch {
		t.Fatalf("after the start: %+v (before %+v)", after, vm.Leases)
	}
	if after.Leases[0] != vm.Leases[0] {
		t.Errorf("the image grant, still standing, was taken again: %+v -> %+v", vm.Leases[0], after.Leases[0])
	}
	goal, _ := events.GoalOf(&after)
	if goal.Incarnation <= vm.Incarnation || goal.Leases[1] != after.Leases[1] {
		t.Fatalf("goal %+v", goal)
	}
	// A retry answers the same and appends nothing.
	seq := lastSeq(t, b)
	again := call(t, r.nc, events.KindVM, events.VerbStart, events.FormatMsgpack, "alice", vmCmd("web", "s1"))
	if again.Error != nil || !again.Replayed || lastSeq(t, b) != seq {
		t.Fatalf("retry: %+v", again)
	}
}

// A VM left stopped on a host that was declared lost stays there until it
// is started; the start then moves it to another host under new grants.
func TestHostLoss_StartMovesAStoppedVMOffALostHost(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	createVM(t, b, r, "web")
	must(t, r.nc, events.KindVM, events.VerbStop, vmCmd("web", "stop"))
	caughtUp(t, b, r)
	before, _, _ := r.reader.VM(ctx, "web")
	declareLost(t, r, before.Host, 100)
	reconcile(t, b, r) // expires its grants
	reconcile(t, b, r) // a stopped VM does not move by itself
	if vm, _, _ := r.reader.VM(ctx, "web"); vm.Host != before.Host {
		t.Fatalf("a stopped VM moved by itself: %+v", vm)
	}

	reply := call(t, r.nc, events.KindVM, events.VerbStart, events.FormatMsgpack, "alice", vmCmd("web", "start"))
	if reply.Error != nil {
		t.Fatal(reply.Error)
	}
	caughtUp(t, b, r)
	after, _, _ := r.reader.VM(ctx, "web")
	if after.Host == before.Host || after.Left != before.Host || after.Desired != events.DesiredRunning || len(after.Leases) != 2 {
		t.Fatalf("after the start: %+v", after)
	}
	if !slices.Contains(types(reply.Events), events.TypeHostAllocated) || !slices.Contains(types(reply.Events), events.TypeVMGoalChanged) {
		t.Fatalf("start appended %v", types(reply.Events))
	}
}
