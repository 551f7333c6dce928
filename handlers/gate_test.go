package handlers

import (
	"context"
	"strings"
	"testing"

	"github.com/loomctl/loom/events"
)

// observeAbsent publishes what the agent of host reports once it destroyed
// vm's domain for its goal at incarnation.
func observeAbsent(t *testing.T, r *replica, host, vm, uid string, incarnation uint64) {
	t.Helper()
	observe(t, r, host, vm, events.VMObserved{UID: uid, Incarnation: incarnation, State: events.ObservedAbsent})
}

// observe publishes an observation as the agent of host would.
func observe(t *testing.T, r *replica, host, vm string, obs events.VMObserved) {
	t.Helper()
	report(t, r, host, vm, obs)
}

func TestGate_CreatePlacesUnderItsLeases(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	reply := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 512))
	if reply.Error != nil {
		t.Fatal(reply.Error)
	}
	caughtUp(t, b, r)
	vm, _, _ := r.reader.VM(ctx, "web")
	goal, ok := events.GoalOf(&vm)
	if !ok || len(goal.Leases) != 2 {
		t.Fatalf("goal %+v: want two leases", goal)
	}
	for _, l := range goal.Leases {
		state, _ := r.reader.Lease(ctx, l.Resource)
		g, held := state.Grant(l.Mode, vm.UID)
		if !held || g.Epoch != l.Epoch || g.Host != vm.Host || g.VM != "web" || g.Void {
			t.Errorf("the goal runs under %+v, the lease says %+v (held %v)", l, g, held)
		}
		if g.Epoch >= vm.Incarnation {
			t.Errorf("grant %d does not precede the placement %d", g.Epoch, vm.Incarnation)
		}
	}
	// Another holder asking for the VM's disk is refused, by name.
	x := lease(t, r.nc, events.VerbAcquire, acquireCmd("steal", "disk/web", events.LeaseExclusive, "thief", "h2"))
	wantCode(t, "exclusive on a VM's disk", x, events.CodeLeaseHeld)
	if !strings.Contains(x.Error.Message, "VM web") {
		t.Errorf("the refusal does not name the VM: %s", x.Error.Message)
	}

	// Nobody releases a running VM's grant for it.
	wantCode(t, "release of a VM's grant", lease(t, r.nc, events.VerbRelease, releaseCmd("rel", "disk/web", vm.UID, 0)), events.CodeLeaseLive)

	// Deleted and reported absent, the VM gives its leases back.
	must(t, r.nc, events.KindVM, events.VerbDelete, vmCmd("web", "d1"))
	caughtUp(t, b, r)
	vm, _, _ = r.reader.VM(ctx, "web")
	observeAbsent(t, r, vm.Host, "web", vm.UID, vm.Incarnation)
	reconcile(t, b, r)
	for _, l := range goal.Leases {
		if state, _ := r.reader.Lease(ctx, l.Resource); state.Held() {
			t.Errorf("%s still held after the VM is gone: %+v", l.Resource, state)
		}
	}
	// A new incarnation of the name takes the disk again.
	if again := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c2", 1, 512)); again.Error != nil {
		t.Fatal(again.Error)
	}
}

func TestGate_CreateWhoseLeaseIsHeldIsWithdrawnAndLeavesNothingHeld(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	// Someone is writing the image: no VM may read it.
	if x := lease(t, r.nc, events.VerbAcquire, acquireCmd("build", "image/debian", events.LeaseExclusive, "builder", "h1")); x.Error != nil {
		t.Fatal(x.Error)
	}
	reply := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 512))
	wantCode(t, "create from an image being written", reply, events.CodeLeaseHeld)
	reconcile(t, b, r)
	vm, _, _ := r.reader.VM(ctx, "web")
	if vm.Phase != events.PhaseGone || vm.AbsentReason != ReasonLeaseHeld {
		t.Fatalf("vm after a refused lease: %+v", vm)
	}
	for _, h := range replayHosts(t, b.JS) {
		if len(h.Allocations) > 0 {
			t.Errorf("host %s keeps %v", h.Name, h.Allocations)
		}
	}
	if state, _ := r.reader.Lease(ctx, "disk/web"); state.Held() {
		t.Errorf("disk/web held: %+v", state)
	}
	// Once the builder is done, the same name can be created.
	lease(t, r.nc, events.VerbRelease, releaseCmd("built", "image/debian", "builder", 0))
	if again := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c2", 1, 512)); again.Error != nil {
		t.Fatal(again.Error)
	}
}
