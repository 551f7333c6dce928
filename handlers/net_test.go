package handlers

import (
	"context"
	"testing"

	"github.com/loomctl/loom/events"
)

// A VM on a net gets the net's lowest free address, bound to its host
// before its placement (so its goal names it), and keeps it; once it is
// gone the address is given back and the next VM may have it.
func TestNet_AddressesFollowVMs(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	must(t, r.nc, events.KindNet, events.VerbCreate, &events.CreateNet{CommandMeta: events.CommandMeta{CommandID: "n1"}, Name: "blue", CIDR: "10.77.0.0/29"})
	if again := must(t, r.nc, events.KindNet, events.VerbCreate, &events.CreateNet{CommandMeta: events.CommandMeta{CommandID: "n2"}, Name: "blue", CIDR: "10.77.0.0/29"}); len(again.Events) != 0 {
		t.Fatalf("creating the same net again appended %+v", again.Events)
	}
	expectCodeKind(t, r, events.KindNet, events.VerbCreate, &events.CreateNet{CommandMeta: events.CommandMeta{CommandID: "n3"}, Name: "blue", CIDR: "10.78.0.0/24"}, events.CodeNetExists)
	expectCodeKind(t, r, events.KindVM, events.VerbCreate, &events.CreateVM{CommandMeta: events.CommandMeta{CommandID: "c0"}, Name: "x", Image: "debian", CPU: 1, MemoryMiB: 64, Net: "red"}, events.CodeNetNotFound)

	reply := call(t, r.nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", &events.CreateVM{CommandMeta: events.CommandMeta{CommandID: "c1"}, Name: "web", Image: "debian", CPU: 1, MemoryMiB: 64, Net: "blue"})
	if reply.Error != nil {
		t.Fatal(reply.Error)
	}
	got := types(reply.Events)
	if len(got) != 6 || got[4] != events.TypeNetAddressBound || got[5] != events.TypeVMPlaced {
		t.Fatalf("create on a net appended %v", got)
	}
	caughtUp(t, b, r)
	vm, _, _ := r.reader.VM(ctx, "web")
	n, _, _ := r.reader.Net(ctx, "blue")
	first, ok := n.BindingOf(vm.UID)
	if !ok || first.Addr != "10.77.0.2" || first.Host != vm.Host || first.MAC != events.MACOf(vm.UID) {
		t.Fatalf("binding %+v (%v) of %+v", first, ok, vm)
	}
	createVM(t, b, r, "db", func(c *events.CreateVM) { c.Net = "blue"; c.CommandID = "c2" })
	db, _, _ := r.reader.VM(ctx, "db")
	n, _, _ = r.reader.Net(ctx, "blue")
	if second, _ := n.BindingOf(db.UID); second.Addr != "10.77.0.3" {
		t.Fatalf("the second vm got %+v", second)
	}

	must(t, r.nc, events.KindVM, events.VerbDelete, vmCmd("web", "d1"))
	caughtUp(t, b, r)
	vm, _, _ = r.reader.VM(ctx, "web")
	reconcile(t, b, r)
	n, _, _ = r.reader.Net(ctx, "blue")
	if _, ok := n.BindingOf(vm.UID); !ok {
		t.Fatal("the address went back before its vm was gone")
	}
	observeAbsent(t, r, vm.Host, "web", vm.UID, vm.Incarnation)
	reconcile(t, b, r)
	n, _, _ = r.reader.Net(ctx, "blue")
	if _, ok := n.BindingOf(vm.UID); ok {
		t.Fatalf("the address of a gone vm was kept: %+v", n.Bindings)
	}
	// A host's port holds an address of its own, which no pass gives back.
	must(t, r.nc, events.KindNet, events.VerbAttach, &events.AttachNet{CommandMeta: events.CommandMeta{CommandID: "p1"}, Net: "blue", Host: "h2"})
	expectCodeKind(t, r, events.KindNet, events.VerbAttach, &events.AttachNet{CommandMeta: events.CommandMeta{CommandID: "p2"}, Net: "blue", Host: "h9"}, events.CodeHostNotFound)
	reconcile(t, b, r)
	n, _, _ = r.reader.Net(ctx, "blue")
	if port, ok := n.BindingOf(events.PortUID("h2")); !ok || port.Host != "h2" || port.VM != "" || port.Addr != "10.77.0.2" {
		t.Fatalf("h2's port: %+v (%v)", port, ok)
	}
	createVM(t, b, r, "cache", func(c *events.CreateVM) { c.Net = "blue"; c.CommandID = "c3" })
	cache, _, _ := r.reader.VM(ctx, "cache")
	n, _, _ = r.reader.Net(ctx, "blue")
	if b, _ := n.BindingOf(cache.UID); b.Addr != "10.77.0.4" {
		t.Fatalf("the next vm got %+v: want the lowest free address, after the port", b)
	}
}

// expectCodeKind sends a command of kind and wants it refused with code.
func expectCodeKind(t *testing.T, r *replica, kind events.Kind, verb string, body any, code events.Code) {
	t.Helper()
	reply := call(t, r.nc, kind, verb, events.FormatMsgpack, "alice", body)
	if reply.Error == nil || reply.Error.Code != code {
		t.Fatalf("%s.%s: got %+v, want code %d", kind, verb, reply.Error, code)
	}
}

// An agent that comes back on another tunnel endpoint: the next pass binds
// its VMs' addresses (and its port) to the new one.
func TestNet_RebindsWhenAHostsEndpointMoves(t *testing.T) {
	b, r, _ := schedulerFixture(t)
	ctx := context.Background()
	agentStarted(t, r, "h1")
	agentStarted(t, r, "h2")
	must(t, r.nc, events.KindNet, events.VerbCreate, &events.CreateNet{CommandMeta: events.CommandMeta{CommandID: "n1"}, Name: "blue", CIDR: "10.77.0.0/24"})
	createVM(t, b, r, "web", func(c *events.CreateVM) { c.Net = "blue" })
	vm, _, _ := r.reader.VM(ctx, "web")
	n, _, _ := r.reader.Net(ctx, "blue")
	if got, _ := n.BindingOf(vm.UID); got.Endpoint != "192.0.2."+vm.Host[1:] {
		t.Fatalf("binding %+v", got)
	}
	agentStartedAt(t, r, vm.Host, "198.51.100.7")
	reconcile(t, b, r)
	n, _, _ = r.reader.Net(ctx, "blue")
	if got, _ := n.BindingOf(vm.UID); got.Endpoint != "198.51.100.7" || got.Host != vm.Host {
		t.Fatalf("after the endpoint moved: %+v", got)
	}
	seq := lastSeq(t, b)
	reconcile(t, b, r)
	if lastSeq(t, b) != seq {
		t.Fatal("a second pass bound it again")
	}
}
