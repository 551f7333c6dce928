package projections

import (
	"strconv"

	"github.com/loomctl/loom/events"
)

// checkpoint acts on a live VM's checkpoints as handlers and its agent
// would: a checkpoint requested and taken (or failed), a restore and its
// report, a deletion and the removal of its files, a schedule set or
// cleared. With anomalies, a report comes from a host the VM is not on.
func (h *history) checkpoint() {
	vm := h.pick(func(vm *genVM) bool {
		return vm.phase == events.PhasePlaced && (vm.desired == events.DesiredRunning || vm.desired == events.DesiredPaused)
	})
	if vm == nil {
		return
	}
	on := events.EventSubject(events.KindVM, vm.name)
	obs := events.ObservationSubject(vm.host, events.KindVM, vm.name)
	disk := "/var/lib/loom/vms/" + vm.name + "-" + vm.uid
	switch n := h.rng.IntN(8); {
	case n < 3 || len(vm.checkpoints) == 0:
		id := "ck-" + strconv.Itoa(h.commands+1)
		kind := []events.CheckpointKind{events.CheckpointDisk, events.CheckpointFull}[h.rng.IntN(2)]
		vm.incarnation = h.emit(on, events.VMCheckpointRequested{UID: vm.uid, Checkpoint: id, Kind: kind, Scheduled: n == 0}, h.command(), 0)
		if h.rng.IntN(5) == 0 {
			h.emit(obs, events.VMCheckpointFailed{UID: vm.uid, Incarnation: vm.incarnation, Checkpoint: id, Op: events.CheckpointOpTake,
				Fault: events.Errorf(events.CodeLibvirtError, "no space left")}, "", 0)
			return
		}
		taken := events.VMCheckpointTaken{UID: vm.uid, Incarnation: vm.incarnation, Checkpoint: id, Kind: kind,
			Disk: disk + ".qcow2", Top: disk + "." + id + ".qcow2", DiskBytes: int64(h.rng.IntN(1 << 30)), Millis: int64(h.rng.IntN(3000))}
		if kind == events.CheckpointFull {
			taken.Memory, taken.MemoryBytes = disk+"."+id+".mem", 128<<20
		}
		if h.cfg.anomalies && h.rng.IntN(4) == 0 {
			h.emit(events.ObservationSubject(h.hosts[h.rng.IntN(len(h.hosts))].name, events.KindVM, vm.name), taken, "", 0)
		}
		h.emit(obs, taken, "", 0)
		vm.checkpoints = append(vm.checkpoints, id)
	case n < 5:
		id := vm.checkpoints[h.rng.IntN(len(vm.checkpoints))]
		restore := "rs-" + strconv.Itoa(h.commands+1)
		vm.incarnation = h.emit(on, events.VMRestoreRequested{UID: vm.uid, Checkpoint: id, Restore: restore, Kind: events.CheckpointDisk,
			Host: vm.host, Disk: disk + ".qcow2", Desired: vm.desired}, h.command(), 0)
		h.emit(obs, events.VMRestored{UID: vm.uid, Incarnation: vm.incarnation, Checkpoint: id, Restore: restore, Top: disk + "." + restore + ".qcow2"}, "", 0)
	case n < 7:
		i := h.rng.IntN(len(vm.checkpoints))
		id := vm.checkpoints[i]
		vm.checkpoints = append(vm.checkpoints[:i], vm.checkpoints[i+1:]...)
		vm.incarnation = h.emit(on, events.VMCheckpointDeleted{UID: vm.uid, Checkpoint: id, Reason: events.DeletedByCommand, Host: vm.host}, h.command(), 0)
		h.emit(obs, events.VMCheckpointRemoved{UID: vm.uid, Checkpoints: []string{id}}, "", 0)
	default:
		every := int64(0)
		if h.rng.IntN(2) == 0 {
			every = 600_000
		}
		h.emit(on, events.VMCheckpointScheduled{UID: vm.uid, EveryMillis: every, Keep: 3, Kind: events.CheckpointDisk}, h.command(), 0)
	}
}
