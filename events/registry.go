package events

import "fmt"

// Type names an event, "<kind>.<what happened>".
type Type string

// Event is a decoded event payload.
type Event interface {
	// EventType names the payload's type.
	EventType() Type
}

// typeInfo is what the codec knows of one event type.
type typeInfo struct {
	// version is the newest schema version; writers always write it.
	version int
	// decoders decode each known version, upcasting old ones to the newest.
	decoders map[int]func(payload []byte) (Event, error)
}

// decodeAs is the decoder of a version whose shape is T itself.
func decodeAs[T Event]() func([]byte) (Event, error) {
	return func(payload []byte) (Event, error) {
		var ev T
		if err := Unmarshal(payload, &ev); err != nil {
			return nil, err
		}
		return ev, nil
	}
}

// current registers a type whose only version is its Go shape.
func current[T Event]() typeInfo {
	return typeInfo{version: 1, decoders: map[int]func([]byte) (Event, error){1: decodeAs[T]()}}
}

// registry lists every event type. It is read-only after package init.
var registry = map[Type]typeInfo{
	TypeHostRegistered: versions[HostRegistered](map[int]func([]byte) (Event, error){
		1: upcast(upcastHostRegisteredV1),
	}),
	TypeHostCordoned:   current[HostCordoned](),
	TypeHostUncordoned: current[HostUncordoned](),
	TypeHostAllocated:  current[HostAllocated](),
	TypeHostReleased:   current[HostReleased](),
	TypeHostLost:       current[HostLost](),
	TypeHostRejoined:   current[HostRejoined](),
	TypeImageRegistered: versions[ImageRegistered](map[int]func([]byte) (Event, error){
		1: upcast(upcastImageRegisteredV1),
	}),
	TypeVMCreated: versions[VMCreated](map[int]func([]byte) (Event, error){
		1: upcast(upcastVMCreatedV1),
		2: upcast(upcastVMCreatedV2),
	}),
	TypeVMPlaced: versions[VMPlaced](map[int]func([]byte) (Event, error){
		1: upcast(upcastVMPlacedV1),
	}),
	TypeVMGoalChanged: current[VMGoalChanged](),
	TypeVMDeleted:     current[VMDeleted](),
	TypeVMObserved: versions[VMObserved](map[int]func([]byte) (Event, error){
		1: upcast(upcastVMObservedV1),
	}),
	TypeVMProgress:        current[VMProgress](),
	TypeHostOrphanFound:   current[HostOrphanFound](),
	TypeHostOrphanCleared: current[HostOrphanCleared](),
	TypeLeaseGranted:      current[LeaseGranted](),
	TypeLeaseReleased:     current[LeaseReleased](),
	TypeLeaseExpired:      current[LeaseExpired](),
	TypeLeaseBreaking:     current[LeaseBreaking](),
	TypeLeaseBroken:       current[LeaseBroken](),

	TypeVMCheckpointRequested: current[VMCheckpointRequested](),
	TypeVMRestoreRequested:    current[VMRestoreRequested](),
	TypeVMCheckpointDeleted:   current[VMCheckpointDeleted](),
	TypeVMCheckpointScheduled: current[VMCheckpointScheduled](),
	TypeVMCheckpointTaken:     current[VMCheckpointTaken](),
	TypeVMRestored:            current[VMRestored](),
	TypeVMCheckpointFailed:    current[VMCheckpointFailed](),
	TypeVMCheckpointRemoved:   current[VMCheckpointRemoved](),

	TypeVMMigrationStarted:    current[VMMigrationStarted](),
	TypeVMMigrated:            current[VMMigrated](),
	TypeVMMigrationFailed:     current[VMMigrationFailed](),
	TypeVMMigrationCancelling: current[VMMigrationCancelling](),
	TypeVMMigrationReceived:   current[VMMigrationReceived](),
	TypeVMMigrationSent:       current[VMMigrationSent](),
	TypeVMMigrationAborted:    current[VMMigrationAborted](),
	TypeHostAgentStarted:      current[HostAgentStarted](),
	TypeNetCreated:            current[NetCreated](),
	TypeNetAddressBound:       current[NetAddressBound](),
	TypeNetAddressReleased:    current[NetAddressReleased](),
	TypeAuditSealed:           current[AuditSealed](),
}

// Types lists every registered event type with its newest version.
func Types() map[Type]int {
	out := make(map[Type]int, len(registry))
	for t, info := range registry {
		out[t] = info.version
	}
	return out
}

// Versions lists every version of t that can still be decoded.
func Versions(t Type) []int {
	info, ok := registry[t]
	if !ok {
		return nil
	}
	out := make([]int, 0, len(info.decoders))
	for v := 1; len(out) < len(info.decoders); v++ {
		if _, ok := info.decoders[v]; ok {
			out = append(out, v)
		}
	}
	return out
}

// CurrentVersion is the version writers use for t; 0 if t is unknown.
func CurrentVersion(t Type) int { return registry[t].version }

// DecodePayload decodes a payload of type t at version v, upcasting it to
// the newest version.
func DecodePayload(t Type, v int, payload []byte) (Event, error) {
	info, ok := registry[t]
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownType, t)
	}
	decode, ok := info.decoders[v]
	if !ok {
		return nil, fmt.Errorf("%w: %s v%d (this build knows up to v%d)", ErrUnknownVersion, t, v, info.version)
	}
	ev, err := decode(payload)
	if err != nil {
		return nil, fmt.Errorf("%w: %s v%d payload: %w", ErrCorrupt, t, v, err)
	}
	return ev, nil
}
