package handlers

import (
	"maps"

	"github.com/loomctl/loom/events"
)

// Reasons a host.released gives.
const (
	// ReleaseDeleted gives back the allocation of a deleted VM.
	ReleaseDeleted = "deleted"
	// ReleaseOrphaned gives back an allocation no VM stands on: its VM is
	// another incarnation, never existed, or was placed elsewhere.
	ReleaseOrphaned = "orphaned"
)

// decideRegisterHost registers a new host. Registering again with the same
// spec changes nothing; with another spec it is refused, since capacity
// already allocated was decided against the first.
//
// The host's key is part of its spec, with one exception: a host
// registered without a key (the legacy mode, whose observations are taken
// unsigned) may be given one by registering again with the same spec, which
// turns signature checks on from that event. A key, once registered, is
// never changed nor removed by registering again: whoever may register
// hosts could otherwise take over a host's observations, or switch their
// checks off. (Rotating a key is a decision of its own, not built yet.)
func decideRegisterHost(h events.HostState, cmd *events.RegisterHost) (events.Event, *events.Fault) {
	want := events.HostRegistered{CPU: cmd.CPU, MemoryMiB: cmd.MemoryMiB, Address: cmd.Address, Labels: cmd.Labels, Key: cmd.Key}
	if !h.Registered {
		return want, nil
	}
	if h.CPU != want.CPU || h.MemoryMiB != want.MemoryMiB || h.Address != want.Address || !maps.Equal(h.Labels, want.Labels) {
		return nil, events.Errorf(events.CodeHostExists,
			"host %s is registered with cpu %d, mem_mib %d, addr %q and other labels; a host's spec cannot change by registering again",
			cmd.Name, h.CPU, h.MemoryMiB, h.Address)
	}
	switch {
	case h.Key == want.Key:
		return nil, nil
	case h.Key == "":
		return want, nil
	case want.Key == "":
		return nil, events.Errorf(events.CodeHostExists,
			"host %s is registered with key %s, and a key cannot be removed: register it with --key %s, or not at all", cmd.Name, h.Key, h.Key)
	}
	return nil, events.Errorf(events.CodeHostExists,
		"host %s is registered with key %s, not %s: a host's key cannot be changed by registering again", cmd.Name, h.Key, want.Key)
}

// decideCordon cordons a host (no new placements) or uncordons it. Asking
// for what already holds changes nothing.
func decideCordon(h events.HostState, name string, uncordon bool, reason string) (events.Event, *events.Fault) {
	switch {
	case !h.Registered:
		return nil, events.Errorf(events.CodeHostNotFound, "no host %s is registered", name)
	case uncordon && h.Cordoned:
		return events.HostUncordoned{}, nil
	case !uncordon && !h.Cordoned:
		return events.HostCordoned{Reason: reason}, nil
	}
	return nil, nil
}

// allocation is what a create asks of a host.
type allocation struct {
	vm   string
	uid  string
	need capacity
}

// decideAllocate reserves the VM's capacity on the host: the host's
// subject is where capacity is decided. reserved is what other creates in
// flight have set aside there. An allocation the host already holds for
// this UID is not made twice.
func decideAllocate(h *hostView, reserved capacity, a allocation) (events.Event, *events.Fault) {
	if have, ok := h.state.Allocations[a.vm]; ok && have.UID == a.uid {
		return nil, nil
	}
	switch {
	case !h.state.Registered:
		return nil, events.Errorf(events.CodeNoCapacity, "host %s is not registered", h.state.Name)
	case h.state.Cordoned:
		return nil, events.Errorf(events.CodeNoCapacity, "host %s is cordoned", h.state.Name)
	case h.state.Lost:
		return nil, events.Errorf(events.CodeNoCapacity, "host %s was declared lost (marker %d) and has not rejoined", h.state.Name, h.state.LostMarker)
	}
	if free := h.free().minus(reserved); !free.covers(a.need) {
		return nil, events.Errorf(events.CodeNoCapacity, "host %s has cpu %d and mem_mib %d free, vm %s needs %d and %d",
			h.state.Name, free.cpu, free.memoryMiB, a.vm, a.need.cpu, a.need.memoryMiB)
	}
	return events.HostAllocated{VM: a.vm, UID: a.uid, CPU: a.need.cpu, MemoryMiB: a.need.memoryMiB}, nil
}

// decideRelease gives back the allocation of the VM incarnation uid, if
// the host still holds it.
func decideRelease(h events.HostState, vm, uid, reason string) events.Event {
	if a, ok := h.Allocations[vm]; ok && a.UID == uid {
		return events.HostReleased{VM: vm, UID: uid, Reason: reason}
	}
	return nil
}
