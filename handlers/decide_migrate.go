package handlers

import (
	"cmp"
	"path/filepath"
	"slices"

	"github.com/loomctl/loom/events"
)

// prefixMigration prefixes the id a migrate command derives; it names the
// VM's disk on the target.
const prefixMigration = "mg"

// Reasons a migration ends without the VM moving.
const (
	MigrationAborted   = "aborted"   // the source could not do it
	MigrationCancelled = "cancelled" // a person asked, and the source stopped it in time
	MigrationLapsed    = "lapsed"    // the VM's grants lapsed while it moved: it may not run on the target
)

// migratable refuses a migration of vm now, or says nothing.
func migratable(vm events.VMState, name string) *events.Fault {
	if fault := placedFault(vm, name); fault != nil {
		return fault
	}
	switch {
	case vm.Migration != nil:
		return events.Errorf(events.CodeVMMigrating, "vm %s is already moving from %s to %s (migration %s)", name, vm.Migration.From, vm.Migration.To, vm.Migration.ID)
	case vm.Step != nil:
		return events.Errorf(events.CodeVMBusy, "vm %s: checkpoint %s is being %s by host %s; migrate it once that is done", name, vm.Step.Checkpoint, stepVerb(vm.Step.Op), vm.Host)
	case vm.Desired != events.DesiredRunning:
		return events.Errorf(events.CodeVMNotRunning, "vm %s is %s; only a running VM is migrated live (resume or start it first)", name, vm.Desired)
	}
	return nil
}

// targetFault refuses host h as the target of vm, or says nothing.
func targetFault(vm events.VMState, h events.HostState, need capacity, used capacity) *events.Fault {
	free := capacity{h.CPU, h.MemoryMiB}.minus(used)
	switch {
	case !h.Registered:
		return events.Errorf(events.CodeHostNotFound, "no host %s", h.Name)
	case h.Name == vm.Host:
		return events.Errorf(events.CodeInvalidArgument, "vm %s already runs on %s", vm.Name, h.Name)
	case h.Lost:
		return events.Errorf(events.CodeHostUnavailable, "host %s is declared lost", h.Name)
	case h.Cordoned:
		return events.Errorf(events.CodeHostUnavailable, "host %s is cordoned (%s)", h.Name, h.CordonReason)
	case h.Agent == nil || h.Agent.MigrateURI == "":
		return events.Errorf(events.CodeHostCannotReceive, "host %s's agent gave no migration address (loom agent --migrate-uri)", h.Name)
	case h.Agent.StorageDir == "":
		return events.Errorf(events.CodeHostCannotReceive, "host %s keeps no disks for its VMs", h.Name)
	case !free.covers(need):
		return events.Errorf(events.CodeNoCapacity, "host %s has %d CPU and %d MiB free; vm %s needs %d and %d",
			h.Name, free.cpu, free.memoryMiB, vm.Name, need.cpu, need.memoryMiB)
	}
	return nil
}

// chooseTarget picks the host with the most free memory that can take
// vm, or says why none can: the refusal of the last host looked at, or no
// capacity.
func chooseTarget(vm events.VMState, hosts []events.HostState) (events.HostState, *events.Fault) {
	need := capacity{vm.CPU, vm.MemoryMiB}
	var fits []events.HostState
	for _, h := range hosts {
		cpu, mem := h.Used()
		if targetFault(vm, h, need, capacity{cpu, mem}) == nil {
			fits = append(fits, h)
		}
	}
	if len(fits) == 0 {
		return events.HostState{}, events.Errorf(events.CodeNoCapacity, "no other host can take vm %s now (registered, alive, not cordoned, with a migration address and %d CPU and %d MiB free)",
			vm.Name, need.cpu, need.memoryMiB)
	}
	best := slices.MaxFunc(fits, func(a, b events.HostState) int {
		_, am := a.Free()
		_, bm := b.Free()
		return cmp.Or(cmp.Compare(am, bm), cmp.Compare(b.Name, a.Name))
	})
	return best, nil
}

// decideMigrationStart is the pair a migration starts with: the target's
// allocation and the start, with how the source reaches the target.
func decideMigrationStart(vm events.VMState, to events.HostState, id string) ([2]events.Event, *events.Fault) {
	data, disks, err := events.MigrationData(to.Agent.MigrateListen, id)
	if err != nil {
		return [2]events.Event{}, events.Errorf(events.CodeHostCannotReceive, "host %s: %v", to.Name, err)
	}
	alloc := events.HostAllocated{VM: vm.Name, UID: vm.UID, CPU: vm.CPU, MemoryMiB: vm.MemoryMiB}
	start := events.VMMigrationStarted{UID: vm.UID, Migration: id, From: vm.Host, To: to.Name, DestURI: to.Agent.MigrateURI,
		DataURI: data, DisksURI: disks, DestDisk: filepath.Join(to.Agent.StorageDir, vm.Name+"-"+vm.UID+"."+id+".qcow2")}
	return [2]events.Event{alloc, start}, nil
}

// decideCancelMigration asks the source to abort vm's migration.
func decideCancelMigration(vm events.VMState, name string) (events.Event, *events.Fault) {
	m := vm.Migration
	switch {
	case !vm.Exists():
		return nil, events.Errorf(events.CodeVMNotFound, "no vm %s", name)
	case m == nil:
		return nil, events.Errorf(events.CodeNoMigration, "vm %s is not migrating", name)
	case m.Cancelling:
		return nil, nil
	}
	return events.VMMigrationCancelling{UID: vm.UID, Migration: m.ID}, nil
}

// decideMigrationFailed ends migration id of vm uid once its source said
// it did not happen.
func decideMigrationFailed(vm events.VMState, uid, id, reason string, fault *events.Fault) events.Event {
	if vm.UID != uid || vm.Migration == nil || vm.Migration.ID != id {
		return nil
	}
	return events.VMMigrationFailed{UID: uid, Migration: id, Reason: reason, Fault: fault}
}
