package handlers

import (
	"context"
	"testing"

	"github.com/loomctl/loom/events"
)

// agentStarted reports, as host's agent would, how other hosts migrate
// VMs to it.
func agentStarted(t *testing.T, r *replica, host string) {
	t.Helper()
	agentStartedAt(t, r, host, "192.0.2."+host[1:])
}

// agentStartedAt is agentStarted with the host's tunnel endpoint.
func agentStartedAt(t *testing.T, r *replica, host, endpoint string) {
	t.Helper()
	reportOn(t, r, host, events.KindHost, host, events.HostAgentStarted{Agent: "a-" + host, StorageDir: "/var/lib/loom/" + host,
		MigrateURI: "qemu+tcp://" + host + "/system", MigrateListen: "tcp:" + host, TunnelEndpoint: endpoint})
}

// migrating creates web, makes the other host able to receive it and
// starts its migration there; it returns the VM as it then stands.
func migrating(t *testing.T) (*replica, events.VMState, func(), func()) {
	t.Helper()
	b, r, _ := schedulerFixture(t)
	must(t, r.nc, events.KindNet, events.VerbCreate, &events.CreateNet{CommandMeta: events.CommandMeta{CommandID: "n1"}, Name: "blue", CIDR: "10.77.0.0/24"})
	createVM(t, b, r, "web", func(c *events.CreateVM) { c.Net = "blue" })
	ctx := context.Background()
	vm, _, _ := r.reader.VM(ctx, "web")
	to := map[string]string{"h1": "h2", "h2": "h1"}[vm.Host]
	expectCode(t, r, events.VerbMigrate, &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: "m0"}, Name: "web", To: to}, events.CodeHostCannotReceive)
	expectCode(t, r, events.VerbMigrate, &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: "m0b"}, Name: "web", To: vm.Host}, events.CodeInvalidArgument)
	agentStarted(t, r, to)

	cmd := &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: "m1"}, Name: "web"} // the scheduler picks the one host that can
	reply := must(t, r.nc, events.KindVM, events.VerbMigrate, cmd)
	if got := types(reply.Events); len(got) != 2 || got[0] != events.TypeHostAllocated || got[1] != events.TypeVMMigrationStarted ||
		reply.Events[1].Seq != reply.Events[0].Seq+1 {
		t.Fatalf("migrate appended %+v: want host.allocated and vm.migration_started, contiguous", reply.Events)
	}
	if again := must(t, r.nc, events.KindVM, events.VerbMigrate, cmd); !again.Replayed || again.LastSeq() != reply.LastSeq() {
		t.Fatalf("a retried migrate acted again: %+v", again)
	}
	caughtUp(t, b, r)
	vm, _, _ = r.reader.VM(ctx, "web")
	if m := vm.Migration; m == nil || m.To != to || m.AllocSeq != reply.Events[0].Seq || vm.Incarnation != reply.LastSeq() {
		t.Fatalf("after migrate: %+v migration %+v", vm, vm.Migration)
	}
	if h, _, _ := r.reader.Host(ctx, to); h.Allocations["web"].UID != vm.UID {
		t.Fatalf("no capacity reserved on %s: %+v", to, h.Allocations)
	}
	return r, vm, func() { caughtUp(t, b, r) }, func() { reconcile(t, b, r) }
}

// A migration through the control plane: started with the target's
// capacity in one atomic append, nothing else accepted while it runs,
// and once the target runs the domain and the source sent it, one atomic
// append moves the VM and its grants; the read models agree on the new
// epochs, and the source's allocation goes back.
func TestMigrate_Handoff(t *testing.T) {
	r, vm, sync, pass := migrating(t)
	ctx := context.Background()
	m := vm.Migration
	goal, _ := events.GoalOf(&vm)
	in, ok := events.IncomingGoalOf(&vm)
	if goal.Migrate == nil || goal.Migrate.To != m.To || !ok || in.Host != m.To || in.Incoming == nil || in.Incoming.From != m.From {
		t.Fatalf("goals: source %+v, target %+v", goal, in)
	}
	expectCode(t, r, events.VerbStop, vmCmd("web", "stop1"), events.CodeVMMigrating)
	expectCode(t, r, events.VerbCheckpoint, &events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: "ck1"}, Name: "web", Kind: events.CheckpointDisk}, events.CodeVMMigrating)
	expectCode(t, r, events.VerbMigrate, &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: "m2"}, Name: "web"}, events.CodeVMMigrating)

	report(t, r, m.To, "web", events.VMMigrationReceived{UID: vm.UID, Incarnation: vm.Incarnation, Migration: m.ID, Disk: m.DestDisk, TotalMillis: 3000, DowntimeMillis: 30})
	sync()
	if err := r.svc.advanceMigration(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if after, _, _ := r.reader.VM(ctx, "web"); after.Host != m.From {
		t.Fatal("moved before the source said it sent the domain")
	}
	sync()
	if n, _, _ := r.reader.Net(ctx, "blue"); len(n.Bindings) != 1 || n.Bindings[0].Host != m.To {
		t.Fatalf("the address does not lead to where the guest runs once the target said so: %+v", n.Bindings)
	}
	report(t, r, m.From, "web", events.VMMigrationSent{UID: vm.UID, Incarnation: vm.Incarnation, Migration: m.ID, Millis: 3100, Leases: vm.Leases})
	sync()
	if err := r.svc.advanceMigration(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	sync()
	after, _, _ := r.reader.VM(ctx, "web")
	if after.Host != m.To || after.Migration != nil || after.Left != m.From || after.LeftReason != events.AbsentMigrated ||
		after.LastMigration == nil || !after.LastMigration.Moved || after.LastMigration.DowntimeMillis != 30 {
		t.Fatalf("after the handoff: %+v last %+v", after, after.LastMigration)
	}
	if len(after.Leases) != len(vm.Leases) {
		t.Fatalf("leases %+v, want as many as %+v", after.Leases, vm.Leases)
	}
	for _, l := range after.Leases {
		state, _ := r.reader.LeaseOf(ctx, l.Resource, vm.UID)
		g, held := state.Grant(l.Mode, vm.UID)
		if !held || g.Epoch != l.Epoch || g.Host != m.To {
			t.Errorf("the vm runs under %+v, the lease says %+v (held %v)", l, g, held)
		}
	}
	pass()
	if h, _, _ := r.reader.Host(ctx, m.From); h.Allocations["web"].UID == vm.UID {
		t.Errorf("the source kept its allocation: %+v", h.Allocations)
	}
	if h, _, _ := r.reader.Host(ctx, m.To); h.Allocations["web"].UID != vm.UID {
		t.Errorf("the target lost its allocation: %+v", h.Allocations)
	}
}

// A migration its source aborted (or was cancelled in time) ends with the
// VM on the source under its grants, the target told to drop whatever
// arrived, and the target's capacity given back.
func TestMigrate_AbortedOrCancelled(t *testing.T) {
	r, vm, sync, pass := migrating(t)
	ctx := context.Background()
	m := vm.Migration
	must(t, r.nc, events.KindVM, events.VerbMigrate, &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: "c1"}, Name: "web", Cancel: true})
	sync()
	cancelling, _, _ := r.reader.VM(ctx, "web")
	if goal, _ := events.GoalOf(&cancelling); goal.Migrate == nil || !goal.Migrate.Cancel {
		t.Fatalf("the source's goal does not ask it to cancel: %+v", goal.Migrate)
	}
	report(t, r, m.From, "web", events.VMMigrationAborted{UID: vm.UID, Incarnation: cancelling.Incarnation, Migration: m.ID,
		Fault: events.Errorf(events.CodeLibvirtError, "operation aborted: migration job: canceled by client"), Leases: vm.Leases})
	sync()
	if err := r.svc.advanceMigration(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	pass()
	after, _, _ := r.reader.VM(ctx, "web")
	if after.Host != m.From || after.Migration != nil || after.Left != m.To || after.LeftReason != events.AbsentMigrationFailed ||
		after.LastMigration == nil || after.LastMigration.Moved || after.LastMigration.Reason != MigrationCancelled {
		t.Fatalf("after the abort: %+v last %+v", after, after.LastMigration)
	}
	if goal, _ := events.GoalOf(&after); goal.Migrate != nil || goal.Host != m.From || !slicesEqual(goal.Leases, vm.Leases) {
		t.Fatalf("source goal after the abort: %+v", goal)
	}
	if h, _, _ := r.reader.Host(ctx, m.To); h.Allocations["web"].UID == vm.UID {
		t.Errorf("the target kept its allocation: %+v", h.Allocations)
	}
}

// A VM whose grant lapsed while it moved may not run on the target: the
// migration fails instead of recording the move.
func TestMigrate_LapsedGrantFailsTheHandoff(t *testing.T) {
	r, vm, sync, _ := migrating(t)
	ctx := context.Background()
	m := vm.Migration
	for _, l := range vm.Leases {
		if l.Mode == events.LeaseExclusive {
			call(t, r.nc, events.KindLease, events.VerbBreak, events.FormatMsgpack, "ops", &events.BreakLease{CommandMeta: events.CommandMeta{CommandID: "b1"},
				Resource: l.Resource, Holder: vm.UID, Force: true, Reason: "disk needed elsewhere"})
		}
	}
	report(t, r, m.To, "web", events.VMMigrationReceived{UID: vm.UID, Incarnation: vm.Incarnation, Migration: m.ID})
	report(t, r, m.From, "web", events.VMMigrationSent{UID: vm.UID, Incarnation: vm.Incarnation, Migration: m.ID})
	sync()
	if err := r.svc.advanceMigration(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	sync()
	after, _, _ := r.reader.VM(ctx, "web")
	if after.Host != m.From || after.LastMigration == nil || after.LastMigration.Reason != MigrationLapsed {
		t.Fatalf("after a lapsed handoff: %+v last %+v", after, after.LastMigration)
	}
}

func slicesEqual(a, b []events.LeaseEpoch) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// A migration is refused, with its own code, to a host that is cordoned
// (or lost), has no room, is the VM's own, or cannot receive; and while
// the VM is stopped.
func TestMigrate_RefusesBadTargets(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	registerHost(t, r.nc, "tiny", 1, 64)
	createVM(t, b, r, "web")
	ctx := context.Background()
	vm, _, _ := r.reader.VM(ctx, "web")
	other := map[string]string{"h1": "h2", "h2": "h1"}[vm.Host]
	for _, h := range []string{other, "tiny"} {
		agentStarted(t, r, h)
	}
	migrate := func(id, to string) *events.MigrateVM {
		return &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: id}, Name: "web", To: to}
	}
	expectCode(t, r, events.VerbMigrate, migrate("m1", "tiny"), events.CodeNoCapacity)
	expectCode(t, r, events.VerbMigrate, migrate("m2", "nowhere"), events.CodeHostNotFound)
	must(t, r.nc, events.KindHost, events.VerbCordon, &events.CordonHost{CommandMeta: events.CommandMeta{CommandID: "cordon"}, Name: other, Reason: "maintenance"})
	expectCode(t, r, events.VerbMigrate, migrate("m3", other), events.CodeHostUnavailable)
	expectCode(t, r, events.VerbMigrate, migrate("m4", ""), events.CodeNoCapacity) // the scheduler finds none either
	must(t, r.nc, events.KindVM, events.VerbStop, vmCmd("web", "stop"))
	expectCode(t, r, events.VerbMigrate, migrate("m5", other), events.CodeVMNotRunning)
	expectCode(t, r, events.VerbMigrate, &events.MigrateVM{CommandMeta: events.CommandMeta{CommandID: "m6"}, Name: "web", Cancel: true}, events.CodeNoMigration)
}
