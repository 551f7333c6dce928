package projections

import (
	"strconv"
	"time"

	"github.com/loomctl/loom/events"
)

// createNets creates the fleet's two virtual networks.
func (h *history) createNets() {
	h.nets = map[string]*events.NetState{}
	for i := range 2 {
		name := "net-" + strconv.Itoa(i)
		h.nets[name] = &events.NetState{Name: name, Created: true, CIDR: "10." + strconv.Itoa(i) + ".0.0/16", VNI: uint32(100 + i)}
		h.emit(events.EventSubject(events.KindNet, name), events.NetCreated{CIDR: h.nets[name].CIDR, VNI: uint32(100 + i)}, h.command(), 0)
	}
}

// bind binds vm's address, if it is on a net, to its host: allocated the
// first time, moved after.
func (h *history) bind(vm *genVM, cmd string) {
	n := h.nets[vm.net]
	if n == nil {
		return
	}
	b, ok := n.BindingOf(vm.uid)
	if !ok {
		addr, free := n.FreeAddr()
		if !free {
			return
		}
		b = events.Binding{Addr: addr.String(), MAC: events.MACOf(vm.uid)}
	}
	ev := events.NetAddressBound{Addr: b.Addr, MAC: b.MAC, VM: vm.name, UID: vm.uid, Host: vm.host, Endpoint: "192.0.2." + vm.host[len(vm.host)-2:]}
	h.fold(n, h.emit(events.EventSubject(events.KindNet, n.Name), ev, cmd, 7), ev)
}

// release gives back a gone VM's address.
func (h *history) release(vm *genVM) {
	n := h.nets[vm.net]
	if n == nil {
		return
	}
	if b, ok := n.BindingOf(vm.uid); ok {
		ev := events.NetAddressReleased{Addr: b.Addr, UID: vm.uid, Reason: "vm-gone"}
		h.fold(n, h.emit(events.EventSubject(events.KindNet, n.Name), ev, "release-address-"+vm.uid, 0), ev)
	}
}

// fold keeps the generator's copy of a net as the read model will have it.
func (h *history) fold(n *events.NetState, seq uint64, ev events.Event) {
	rec := &events.Record{Seq: seq, Envelope: events.Envelope{Kind: events.KindNet, AggregateID: n.Name, Type: ev.EventType(), Time: events.NanosOf(time.Unix(0, 0))}, Event: ev}
	if err := n.Apply(rec); err != nil {
		panic(err) // the generator makes its events itself
	}
}
