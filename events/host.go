package events

import (
	"errors"
	"fmt"
)

// Host event types.
const (
	TypeHostRegistered Type = "host.registered"
	TypeHostCordoned   Type = "host.cordoned"
	TypeHostUncordoned Type = "host.uncordoned"
	TypeHostAllocated  Type = "host.allocated"
	TypeHostReleased   Type = "host.released"
	TypeHostLost       Type = "host.lost"
	TypeHostRejoined   Type = "host.rejoined"
)

// HostRegistered records a host joining the fleet with its capacity (v1),
// and the public half of its host key (v2).
type HostRegistered struct {
	CPU       int               `msgpack:"cpu" json:"cpu"`
	MemoryMiB int               `msgpack:"mem_mib" json:"mem_mib"`
	Address   string            `msgpack:"addr,omitempty" json:"addr,omitempty"`
	Labels    map[string]string `msgpack:"labels,omitempty" json:"labels,omitempty"`
	// Key, if set, is the host's public key, "U…" (events/hostkey): from
	// this event on, every observation on the host's loom.obs subjects
	// must be signed with it, or the read models flag it and skip it. A
	// host without one is in the legacy, insecure mode: its observations
	// are taken unsigned, from anyone who may publish on its subjects.
	Key string `msgpack:"key,omitempty" json:"key,omitempty"`
}

// HostCordoned records that no new VM may be placed on the host.
type HostCordoned struct {
	Reason string `msgpack:"reason,omitempty" json:"reason,omitempty"`
}

// HostUncordoned records that the host takes new VMs again.
type HostUncordoned struct{}

// HostAllocated reserves a VM's CPU and memory on the host. The host's
// subject is the one place capacity is decided, so two allocations can
// never both take the last free core.
type HostAllocated struct {
	VM        string `msgpack:"vm" json:"vm"`
	UID       string `msgpack:"uid" json:"uid"`
	CPU       int    `msgpack:"cpu" json:"cpu"`
	MemoryMiB int    `msgpack:"mem_mib" json:"mem_mib"`
}

// HostReleased gives a VM's allocation back.
type HostReleased struct {
	VM     string `msgpack:"vm" json:"vm"`
	UID    string `msgpack:"uid" json:"uid"`
	Reason string `msgpack:"reason" json:"reason"`
}

// HostLost records that the failure detector declared the host lost: its
// lost marker on loom.live.<host> won the race against the host's next
// renewal. Nothing is placed on a lost host; its VMs' leases may expire.
type HostLost struct {
	// MarkerSeq is the LOOM_LIVENESS sequence of the winning lost marker,
	// RenewalSeq that of the last renewal it superseded.
	MarkerSeq  uint64 `msgpack:"marker_seq" json:"marker_seq"`
	RenewalSeq uint64 `msgpack:"renewal_seq" json:"renewal_seq"`
}

// HostRejoined records that a host declared lost renewed again, after its
// lost marker: a new host epoch, whose agent must not resume what ran
// before it was declared lost.
type HostRejoined struct {
	// RenewalSeq is the LOOM_LIVENESS sequence of the first renewal after
	// the lost marker: the new host epoch.
	RenewalSeq uint64 `msgpack:"renewal_seq" json:"renewal_seq"`
}

func (HostRegistered) EventType() Type { return TypeHostRegistered }
func (HostLost) EventType() Type       { return TypeHostLost }
func (HostRejoined) EventType() Type   { return TypeHostRejoined }
func (HostCordoned) EventType() Type   { return TypeHostCordoned }
func (HostUncordoned) EventType() Type { return TypeHostUncordoned }
func (HostAllocated) EventType() Type  { return TypeHostAllocated }
func (HostReleased) EventType() Type   { return TypeHostReleased }

// Allocation is one VM's share of a host.
type Allocation struct {
	UID       string `msgpack:"uid" json:"uid"`
	CPU       int    `msgpack:"cpu" json:"cpu"`
	MemoryMiB int    `msgpack:"mem_mib" json:"mem_mib"`
	// CommandID is the command that allocated it.
	CommandID string `msgpack:"cmd" json:"cmd"`
	// Seq is the stream sequence of the host.allocated event.
	Seq uint64 `msgpack:"seq" json:"seq"`
}

// HostState is a host aggregate folded from its events.
type HostState struct {
	Name       string            `msgpack:"name" json:"name"`
	Registered bool              `msgpack:"registered" json:"registered"`
	CPU        int               `msgpack:"cpu" json:"cpu"`
	MemoryMiB  int               `msgpack:"mem_mib" json:"mem_mib"`
	Address    string            `msgpack:"addr,omitempty" json:"addr,omitempty"`
	Labels     map[string]string `msgpack:"labels,omitempty" json:"labels,omitempty"`
	// Key is the host's public key, "U…", as registered; empty for a host
	// in the legacy mode, whose observations are not signed.
	Key          string `msgpack:"key,omitempty" json:"key,omitempty"`
	Cordoned     bool   `msgpack:"cordoned,omitempty" json:"cordoned,omitempty"`
	CordonReason string `msgpack:"cordon_reason,omitempty" json:"cordon_reason,omitempty"`
	// Allocations by VM name.
	Allocations map[string]Allocation `msgpack:"allocs,omitempty" json:"allocations,omitempty"`
	// RegisteredBy is the actor who registered the host, RegisterCommand
	// the command's id.
	RegisteredBy    string `msgpack:"registered_by,omitempty" json:"registered_by,omitempty"`
	RegisterCommand string `msgpack:"register_command,omitempty" json:"register_command,omitempty"`
	// Orphans are domains the host's agent found that no goal names, by name.
	Orphans map[string]HostOrphanFound `msgpack:"orphans,omitempty" json:"orphans,omitempty"`
	// Lost says the failure detector declared the host lost, at the
	// LOOM_LIVENESS sequence LostMarker, and it has not rejoined since.
	Lost       bool   `msgpack:"lost,omitempty" json:"lost,omitempty"`
	LostMarker uint64 `msgpack:"lost_marker,omitempty" json:"lost_marker,omitempty"`
	// LostSeq is the LOOM_EVENTS sequence of the last host.lost, kept
	// after a rejoin: every grant and placement on the host older than it
	// was made before the host was lost, and ended with it.
	LostSeq uint64 `msgpack:"lost_seq,omitempty" json:"lost_seq,omitempty"`
	// Epoch is the LOOM_LIVENESS sequence of the renewal the host last
	// rejoined with; zero if it was never lost.
	Epoch uint64 `msgpack:"epoch,omitempty" json:"epoch,omitempty"`
	// Agent is what the host's agent last said of itself when it started.
	Agent *HostAgentStarted `msgpack:"agent,omitempty" json:"agent,omitempty"`
}

// Used sums the host's allocations.
func (h *HostState) Used() (cpu, memoryMiB int) {
	for _, a := range h.Allocations {
		cpu += a.CPU
		memoryMiB += a.MemoryMiB
	}
	return cpu, memoryMiB
}

// Free is the capacity not allocated.
func (h *HostState) Free() (cpu, memoryMiB int) {
	usedCPU, usedMem := h.Used()
	return h.CPU - usedCPU, h.MemoryMiB - usedMem
}

// Fits tells whether a VM of that size can be placed on the host now.
func (h *HostState) Fits(cpu, memoryMiB int) bool {
	freeCPU, freeMem := h.Free()
	return h.Registered && !h.Cordoned && !h.Lost && cpu <= freeCPU && memoryMiB <= freeMem
}

// Apply folds one event of the host's subject into the state.
func (h *HostState) Apply(rec *Record) error {
	if rec.Envelope.Kind != KindHost {
		return fmt.Errorf("host %s: event %s of kind %s", h.Name, rec.Envelope.Type, rec.Envelope.Kind)
	}
	h.Name = rec.Envelope.AggregateID
	switch ev := rec.Event.(type) {
	case HostRegistered:
		h.Registered = true
		h.CPU, h.MemoryMiB, h.Address = ev.CPU, ev.MemoryMiB, ev.Address
		h.Labels = ev.Labels
		if ev.Key != "" {
			// A key once recorded stays: a registration without one
			// never takes a host back to unsigned observations.
			h.Key = ev.Key
		}
		h.RegisteredBy, h.RegisterCommand = rec.Envelope.Actor, rec.Envelope.CommandID
	case HostCordoned:
		h.Cordoned, h.CordonReason = true, ev.Reason
	case HostUncordoned:
		h.Cordoned, h.CordonReason = false, ""
	case HostLost:
		h.Lost, h.LostMarker, h.LostSeq = true, ev.MarkerSeq, rec.Seq
	case HostRejoined:
		h.Lost, h.Epoch = false, ev.RenewalSeq
	case HostAllocated:
		if h.Allocations == nil {
			h.Allocations = make(map[string]Allocation)
		}
		h.Allocations[ev.VM] = Allocation{UID: ev.UID, CPU: ev.CPU, MemoryMiB: ev.MemoryMiB,
			CommandID: rec.Envelope.CommandID, Seq: rec.Seq}
	case HostReleased:
		if a, ok := h.Allocations[ev.VM]; ok && a.UID == ev.UID {
			delete(h.Allocations, ev.VM)
		}
	case HostOrphanFound:
		if h.Orphans == nil {
			h.Orphans = make(map[string]HostOrphanFound)
		}
		h.Orphans[ev.Domain] = ev
	case HostOrphanCleared:
		delete(h.Orphans, ev.Domain)
	case HostAgentStarted:
		agent := ev
		h.Agent = &agent
	default:
		return fmt.Errorf("host %s: %w %s", h.Name, errNotForAggregate, rec.Envelope.Type)
	}
	return nil
}

var errNotForAggregate = errors.New("event type does not apply to this aggregate")
