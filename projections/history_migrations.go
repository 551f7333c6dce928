package projections

import (
	"strconv"

	"github.com/loomctl/loom/events"
)

// migrate moves a running VM as handlers and agents would: the target's
// allocation and the start (one batch, so contiguous), the hosts' reports,
// then the move or, one time in four, the source's abort and the failure;
// and the allocation the VM no longer stands on given back.
func (h *history) migrate() {
	vm := h.pick(func(vm *genVM) bool { return vm.phase == events.PhasePlaced && vm.desired == events.DesiredRunning })
	if vm == nil {
		return
	}
	var to *genHost
	for _, i := range h.rng.Perm(len(h.hosts))[:min(8, len(h.hosts))] {
		if c := h.hosts[i]; c.name != vm.host && !c.cordoned && c.free() >= vm.cpu {
			to = c
			break
		}
	}
	if to == nil {
		return
	}
	cmd := h.command()
	id := "mg-" + strconv.Itoa(h.commands)
	from := h.host(vm.host)
	on := events.EventSubject(events.KindVM, vm.name)
	to.used[vm.name] = vm.cpu
	h.emit(events.EventSubject(events.KindHost, to.name), events.HostAllocated{VM: vm.name, UID: vm.uid, CPU: vm.cpu, MemoryMiB: vm.mem}, cmd, 0)
	started := h.emit(on, events.VMMigrationStarted{UID: vm.uid, Migration: id, From: from.name, To: to.name,
		DestURI: "qemu+tcp://" + to.name + "/system", DestDisk: "/var/lib/loom/vms/" + vm.name + "-" + vm.uid + "." + id + ".qcow2"}, cmd, 1)
	fromObs := events.ObservationSubject(from.name, events.KindVM, vm.name)
	end := "migration-" + id
	if h.rng.IntN(4) == 0 {
		h.emit(fromObs, events.VMMigrationAborted{UID: vm.uid, Incarnation: started, Migration: id, Fault: events.Errorf(events.CodeLibvirtError, "unable to connect")}, "", 0)
		vm.incarnation = h.emit(on, events.VMMigrationFailed{UID: vm.uid, Migration: id, Reason: "aborted"}, end, 0)
		delete(to.used, vm.name)
		h.emit(events.EventSubject(events.KindHost, to.name), events.HostReleased{VM: vm.name, UID: vm.uid, Reason: "orphaned"}, end, 1)
		return
	}
	h.emit(events.ObservationSubject(to.name, events.KindVM, vm.name), events.VMMigrationReceived{UID: vm.uid, Incarnation: started, Migration: id,
		TotalMillis: int64(h.rng.IntN(5000)), DowntimeMillis: int64(h.rng.IntN(300))}, "", 0)
	h.emit(fromObs, events.VMMigrationSent{UID: vm.uid, Incarnation: started, Migration: id, Millis: int64(h.rng.IntN(5000))}, "", 0)
	vm.host = to.name
	h.bind(vm, end)
	vm.incarnation = h.emit(on, events.VMMigrated{UID: vm.uid, Migration: id, From: from.name, To: to.name, AllocSeq: started - 1}, end, 0)
	vm.host = to.name
	delete(from.used, vm.name)
	h.emit(events.EventSubject(events.KindHost, from.name), events.HostReleased{VM: vm.name, UID: vm.uid, Reason: "orphaned"}, end, 1)
}
