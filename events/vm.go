package events

import (
	"fmt"
	"slices"
)

// VM event types.
const (
	TypeVMCreated     Type = "vm.created"
	TypeVMPlaced      Type = "vm.placed"
	TypeVMGoalChanged Type = "vm.goal_changed"
	TypeVMDeleted     Type = "vm.deleted"
)

// Desired is the state a goal asks a VM to be in.
type Desired string

// The desired states.
const (
	DesiredRunning Desired = "running"
	DesiredPaused  Desired = "paused"
	DesiredStopped Desired = "stopped"
	DesiredAbsent  Desired = "absent"
)

// Valid tells whether d is one of the desired states.
func (d Desired) Valid() bool {
	switch d {
	case DesiredRunning, DesiredPaused, DesiredStopped, DesiredAbsent:
		return true
	}
	return false
}

// Reasons a goal says absent.
const (
	AbsentDeleted  = "deleted"
	AbsentMigrated = "migrated"
	AbsentHostLost = "host-lost"
	// AbsentMigrationFailed is the goal on the target of a migration that
	// did not happen: whatever arrived there goes.
	AbsentMigrationFailed = "migration-failed"
)

// VMCreated records a new VM (a new incarnation of a name) and its spec.
// It does not place it: vm.placed does, after the host allocated it.
type VMCreated struct {
	UID       string  `msgpack:"uid" json:"uid"`
	Image     string  `msgpack:"image" json:"image"`
	CPU       int     `msgpack:"cpu" json:"cpu"`
	MemoryMiB int     `msgpack:"mem_mib" json:"mem_mib"`
	Desired   Desired `msgpack:"desired" json:"desired"`
	// OnHostLost is what happens to the VM if its host is declared lost
	// (v2; v1 VMs restart).
	OnHostLost HostLostPolicy `msgpack:"on_host_lost" json:"on_host_lost"`
	// Net is the virtual network the VM has an address on (v3; empty:
	// none, as every VM before v3).
	Net string `msgpack:"net,omitempty" json:"net,omitempty"`
}

// HostLostPolicy says what becomes of a VM whose host was declared lost,
// once its leases expired.
type HostLostPolicy string

// The policies.
const (
	// RestartElsewhere places the VM on another host under new leases;
	// with local disks its disk is provisioned again from its image.
	RestartElsewhere HostLostPolicy = "restart"
	// LeaveStopped keeps the VM on its host with a goal of stopped.
	LeaveStopped HostLostPolicy = "stop"
)

// Valid tells whether p is a policy.
func (p HostLostPolicy) Valid() bool { return p == RestartElsewhere || p == LeaveStopped }

// VMPlaced binds the VM to a host whose allocation for it is at
// AllocationSeq on the host's subject. The goal follows from here.
type VMPlaced struct {
	UID           string `msgpack:"uid" json:"uid"`
	Host          string `msgpack:"host" json:"host"`
	AllocationSeq uint64 `msgpack:"alloc_seq" json:"alloc_seq"`
	// Leases are the grants the VM runs under on Host (v2): shared on its
	// image, exclusive on its disk, taken before this placement.
	Leases []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
	// From is the host a placed VM was moved off (v2), and Reason why
	// (AbsentHostLost); empty for a first placement.
	From   string `msgpack:"from,omitempty" json:"from,omitempty"`
	Reason string `msgpack:"reason,omitempty" json:"reason,omitempty"`
	// Reprovisioned says the VM's disk was provisioned again from its
	// image on Host: what it wrote on From's local disk is not carried.
	Reprovisioned bool `msgpack:"reprovisioned,omitempty" json:"reprovisioned,omitempty"`
}

// VMGoalChanged records a new desired state for a VM that exists.
type VMGoalChanged struct {
	UID     string  `msgpack:"uid" json:"uid"`
	Desired Desired `msgpack:"desired" json:"desired"`
}

// VMDeleted records that the VM must go: its goal becomes absent.
type VMDeleted struct {
	UID    string `msgpack:"uid" json:"uid"`
	Reason string `msgpack:"reason" json:"reason"`
}

func (VMCreated) EventType() Type     { return TypeVMCreated }
func (VMPlaced) EventType() Type      { return TypeVMPlaced }
func (VMGoalChanged) EventType() Type { return TypeVMGoalChanged }
func (VMDeleted) EventType() Type     { return TypeVMDeleted }

// Phase is where a VM is in its life.
type Phase string

// The phases.
const (
	PhaseNone     Phase = ""         // never created, or gone
	PhasePending  Phase = "pending"  // created, not yet placed
	PhasePlaced   Phase = "placed"   // on a host, goal published
	PhaseDeleting Phase = "deleting" // deleted, the agent has not yet reported it gone
	PhaseGone     Phase = "gone"     // deleted and reported absent
)

// VMState is a VM aggregate folded from its decision events and its host's
// observations of it.
type VMState struct {
	Name      string  `msgpack:"name" json:"name"`
	UID       string  `msgpack:"uid,omitempty" json:"uid,omitempty"`
	Phase     Phase   `msgpack:"phase,omitempty" json:"phase,omitempty"`
	Image     string  `msgpack:"image,omitempty" json:"image,omitempty"`
	CPU       int     `msgpack:"cpu,omitempty" json:"cpu,omitempty"`
	MemoryMiB int     `msgpack:"mem_mib,omitempty" json:"mem_mib,omitempty"`
	Host      string  `msgpack:"host,omitempty" json:"host,omitempty"`
	Desired   Desired `msgpack:"desired,omitempty" json:"desired,omitempty"`
	// AbsentReason says why Desired is absent.
	AbsentReason string `msgpack:"absent_reason,omitempty" json:"absent_reason,omitempty"`
	// CreatedBy is the actor whose command created this incarnation, and
	// CreateCommand that command's id: together they derive UID.
	CreatedBy     string `msgpack:"created_by,omitempty" json:"created_by,omitempty"`
	CreateCommand string `msgpack:"create_command,omitempty" json:"create_command,omitempty"`
	// Incarnation is the stream sequence of the decision that produced the
	// current goal; zero while no goal exists.
	Incarnation uint64 `msgpack:"incarnation,omitempty" json:"incarnation,omitempty"`
	// Leases are the grants the VM runs under on Host, from its placement.
	Leases []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
	// OnHostLost is the VM's host-loss policy.
	OnHostLost HostLostPolicy `msgpack:"on_host_lost,omitempty" json:"on_host_lost,omitempty"`
	// Net is the virtual network the VM has an address on, if any.
	Net string `msgpack:"net,omitempty" json:"net,omitempty"`
	// Left is the host the VM was last moved off, whose goal must say
	// absent (LeftReason) so that it never resumes the VM there; LeftAt
	// is the incarnation of that absent goal, and LeftGone says the host
	// reported the VM absent under it, so its goal subject may go.
	Left       string `msgpack:"left,omitempty" json:"left,omitempty"`
	LeftReason string `msgpack:"left_reason,omitempty" json:"left_reason,omitempty"`
	LeftAt     uint64 `msgpack:"left_at,omitempty" json:"left_at,omitempty"`
	LeftGone   bool   `msgpack:"left_gone,omitempty" json:"left_gone,omitempty"`
	// Observed is the host agent's last report.
	Observed Observation `msgpack:"observed" json:"observed"`
	// Checkpoints is the VM's catalog: every checkpoint of this
	// incarnation not yet deleted and removed, oldest first.
	Checkpoints []Checkpoint `msgpack:"checkpoints,omitempty" json:"checkpoints,omitempty"`
	// Step is the checkpoint or restore the goal asks for, until the host
	// reports on it or another decision replaces the goal.
	Step *GoalStep `msgpack:"step,omitempty" json:"step,omitempty"`
	// Schedule is the VM's checkpoint schedule, if any.
	Schedule *CheckpointSchedule `msgpack:"schedule,omitempty" json:"schedule,omitempty"`
	// Migration is the migration under way, if any; LastMigration how the
	// last one ended.
	Migration     *Migration     `msgpack:"migration,omitempty" json:"migration,omitempty"`
	LastMigration *LastMigration `msgpack:"last_migration,omitempty" json:"last_migration,omitempty"`
}

// Observation is what a host agent last reported of a VM.
type Observation struct {
	Host        string        `msgpack:"host,omitempty" json:"host,omitempty"`
	Incarnation uint64        `msgpack:"incarnation,omitempty" json:"incarnation,omitempty"`
	State       ObservedState `msgpack:"state,omitempty" json:"state,omitempty"`
	Fault       *Fault        `msgpack:"fault,omitempty" json:"fault,omitempty"`
	// Leases are the grants the agent acted under.
	Leases []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
	// Seq is the stream sequence of the observation.
	Seq uint64 `msgpack:"seq,omitempty" json:"seq,omitempty"`
	// Time is the agent's clock at the observation.
	Time UnixNano `msgpack:"time,omitempty" json:"time,omitempty"`
}

// Exists tells whether the name is taken by a live incarnation.
func (s *VMState) Exists() bool {
	return s.Phase != PhaseNone && s.Phase != PhaseGone
}

// Converged tells whether the agent has reported the current goal done.
func (s *VMState) Converged() bool {
	if s.Incarnation == 0 {
		return false
	}
	return s.Observed.Incarnation == s.Incarnation && s.Observed.State.Satisfies(s.Desired)
}

// Apply folds one event into the state: a decision on loom.evt.vm.<name>, or
// an observation on loom.obs.<host>.vm.<name>.
func (s *VMState) Apply(rec *Record) error {
	if rec.Envelope.Kind != KindVM {
		return fmt.Errorf("vm %s: event %s of kind %s", s.Name, rec.Envelope.Type, rec.Envelope.Kind)
	}
	s.Name = rec.Envelope.AggregateID
	switch ev := rec.Event.(type) {
	case VMCreated:
		*s = VMState{Name: s.Name, UID: ev.UID, Phase: PhasePending, Image: ev.Image, CPU: ev.CPU,
			MemoryMiB: ev.MemoryMiB, Desired: ev.Desired, OnHostLost: ev.OnHostLost, Net: ev.Net,
			CreatedBy: rec.Envelope.Actor, CreateCommand: rec.Envelope.CommandID}
	case VMPlaced:
		if ev.UID != s.UID {
			break
		}
		if ev.From != "" {
			if s.Phase != PhasePlaced || s.Host != ev.From {
				return fmt.Errorf("vm %s: moved off %s, but it is %s on %q", s.Name, ev.From, s.Phase, s.Host)
			}
			if ev.From != ev.Host { // placed again on its own host (new grants) leaves nothing
				s.Left, s.LeftReason, s.LeftAt, s.LeftGone = ev.From, ev.Reason, rec.Seq, false
				s.Observed = Observation{}
			}
		}
		s.Host, s.Phase, s.Incarnation, s.Leases, s.Step = ev.Host, PhasePlaced, rec.Seq, ev.Leases, nil
	case VMGoalChanged:
		if ev.UID == s.UID {
			s.Desired, s.Step = ev.Desired, nil
			if s.Phase == PhasePlaced {
				s.Incarnation = rec.Seq
			}
		}
	case VMDeleted:
		if ev.UID == s.UID {
			s.Desired, s.AbsentReason, s.Step = DesiredAbsent, ev.Reason, nil
			if s.Phase == PhasePending {
				s.Phase = PhaseGone // never placed: nothing on any host to wait for
			} else {
				s.Phase, s.Incarnation = PhaseDeleting, rec.Seq
			}
		}
	case VMObserved:
		return s.applyObservation(rec, ev)
	case VMCheckpointRequested, VMRestoreRequested, VMCheckpointDeleted, VMCheckpointScheduled:
		s.applyCheckpointDecision(rec)
	case VMCheckpointTaken, VMRestored, VMCheckpointFailed, VMCheckpointRemoved:
		return s.applyCheckpointReport(rec)
	case VMMigrationStarted, VMMigrationCancelling, VMMigrationFailed, VMMigrated:
		return s.applyMigrationDecision(rec)
	case VMMigrationReceived, VMMigrationSent, VMMigrationAborted:
		return s.applyMigrationReport(rec)
	case VMProgress:
		// Progress is for people watching; it changes no state.
	default:
		return fmt.Errorf("vm %s: %w %s", s.Name, errNotForAggregate, rec.Envelope.Type)
	}
	return nil
}

// applyObservation folds a report of the VM's host. A report that names
// lease epochs other than the VM's current ones acted under grants that
// were revoked or replaced: it is refused (ErrStaleEpoch), and the read
// models flag it.
func (s *VMState) applyObservation(rec *Record, ev VMObserved) error {
	addr, err := ParseEventSubject(rec.Subject)
	if err == nil && addr.Observed && ev.UID == s.UID && s.Left != "" && addr.Host == s.Left && addr.Host != s.Host {
		// The host the VM was moved off came back and destroyed it there:
		// its absent goal may go.
		if ev.State == ObservedAbsent && ev.Incarnation >= s.LeftAt {
			s.LeftGone = true
		}
		return nil
	}
	if err != nil || !addr.Observed || ev.UID != s.UID || addr.Host != s.Host {
		return nil // another incarnation, or a host the VM is not on: not about this VM
	}
	if ev.Incarnation < s.Observed.Incarnation {
		return nil
	}
	if len(ev.Leases) > 0 && !slices.Equal(ev.Leases, s.Leases) {
		return fmt.Errorf("%w: vm %s on %s reported under %v, it runs under %v", ErrStaleEpoch, s.Name, addr.Host, ev.Leases, s.Leases)
	}
	s.Observed = Observation{Host: addr.Host, Incarnation: ev.Incarnation, State: ev.State, Fault: ev.Fault,
		Leases: ev.Leases, Seq: rec.Seq, Time: rec.Envelope.Time}
	if s.Phase == PhaseDeleting && ev.State == ObservedAbsent && ev.Incarnation >= s.Incarnation {
		s.Phase = PhaseGone
	}
	return nil
}
