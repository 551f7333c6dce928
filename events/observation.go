package events

// Observation event types: what host agents report, on loom.obs.<host>.….
const (
	TypeVMObserved        Type = "vm.observed"
	TypeVMProgress        Type = "vm.progress"
	TypeHostOrphanFound   Type = "host.orphan_found"
	TypeHostOrphanCleared Type = "host.orphan_cleared"
)

// ObservedState is the state an agent saw a domain in.
type ObservedState string

// The observed states.
const (
	ObservedRunning ObservedState = "running"
	ObservedPaused  ObservedState = "paused"
	ObservedStopped ObservedState = "stopped"
	ObservedAbsent  ObservedState = "absent"
	ObservedCrashed ObservedState = "crashed"
	ObservedFailed  ObservedState = "failed" // the agent could not act; Fault says why
)

// Satisfies tells whether a domain in this state meets the desired one.
func (o ObservedState) Satisfies(d Desired) bool {
	switch d {
	case DesiredRunning:
		return o == ObservedRunning
	case DesiredPaused:
		return o == ObservedPaused
	case DesiredStopped:
		return o == ObservedStopped
	case DesiredAbsent:
		return o == ObservedAbsent
	}
	return false
}

// Fault is an error an agent or a handler reports: a stable code from the
// catalog in schemas/errors.json and a message a person can act on.
type Fault struct {
	Code    Code   `msgpack:"code" json:"code"`
	Name    string `msgpack:"name" json:"name"`
	Message string `msgpack:"message" json:"message"`
}

func (f *Fault) Error() string { return f.Name + ": " + f.Message }

// VMObserved is an agent's report on a VM: the incarnation of the goal it
// acted on and the state it then saw. Agents report on change only. A report
// nobody asked for (a domain that stopped by itself) carries Unrequested.
type VMObserved struct {
	UID         string        `msgpack:"uid" json:"uid"`
	Incarnation uint64        `msgpack:"incarnation" json:"incarnation"`
	State       ObservedState `msgpack:"state" json:"state"`
	Fault       *Fault        `msgpack:"fault,omitempty" json:"fault,omitempty"`
	Unrequested bool          `msgpack:"unrequested,omitempty" json:"unrequested,omitempty"`
	// Leases are the grants the agent acted under (v2). An observation
	// under an epoch that is no longer the VM's is flagged and ignored.
	Leases []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
}

// VMProgress reports a long step under way, at most once a second.
type VMProgress struct {
	UID         string `msgpack:"uid" json:"uid"`
	Incarnation uint64 `msgpack:"incarnation" json:"incarnation"`
	Step        string `msgpack:"step" json:"step"`
	Done        int64  `msgpack:"done" json:"done"`
	Total       int64  `msgpack:"total" json:"total"`
}

// HostOrphanFound reports a domain on the host that no goal names. Agents
// never destroy such a domain on their own.
type HostOrphanFound struct {
	Domain string        `msgpack:"domain" json:"domain"`
	UUID   string        `msgpack:"uuid" json:"uuid"`
	State  ObservedState `msgpack:"state" json:"state"`
}

// HostOrphanCleared reports that an orphan domain is gone or now has a goal.
type HostOrphanCleared struct {
	Domain string `msgpack:"domain" json:"domain"`
}

func (VMObserved) EventType() Type        { return TypeVMObserved }
func (VMProgress) EventType() Type        { return TypeVMProgress }
func (HostOrphanFound) EventType() Type   { return TypeHostOrphanFound }
func (HostOrphanCleared) EventType() Type { return TypeHostOrphanCleared }

// IsObservation tells the types only host agents write, on loom.obs
// subjects; every other type is a decision, on loom.evt.
func IsObservation(t Type) bool {
	switch t {
	case TypeVMObserved, TypeVMProgress, TypeHostOrphanFound, TypeHostOrphanCleared,
		TypeVMCheckpointTaken, TypeVMRestored, TypeVMCheckpointFailed, TypeVMCheckpointRemoved,
		TypeVMMigrationReceived, TypeVMMigrationSent, TypeVMMigrationAborted, TypeHostAgentStarted:
		return true
	}
	return false
}
