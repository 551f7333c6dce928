package events

import (
	"fmt"
	"regexp"
	"time"
)

// Checkpoints. A checkpoint belongs to one incarnation of a VM and lives
// on the VM's subject: the decisions (requested, restore requested,
// deleted, scheduled) are the VM's events, the outcomes (taken, restored,
// failed, removed) are its host agent's observations. Together they are
// the catalog: libvirt keeps no snapshot metadata (it would block
// migration), and each entry says on which host its files are.
//
// What a checkpoint is on disk. A VM's disk is a chain of qcow2 layers on
// its image. Taking checkpoint C freezes the layer the VM wrote to until
// then (its "top") and makes a new, empty top on it, named after C; the
// frozen layer, with the layers and image under it, is C's disk. A full
// checkpoint also saves the guest's memory and device state to a file at
// the same instant. Restoring C makes a fresh top on C's frozen layer
// (named after the restore), so C itself is never written and can be
// restored again; with memory, the guest resumes from the saved state.
const (
	TypeVMCheckpointRequested Type = "vm.checkpoint_requested"
	TypeVMRestoreRequested    Type = "vm.restore_requested"
	TypeVMCheckpointDeleted   Type = "vm.checkpoint_deleted"
	TypeVMCheckpointScheduled Type = "vm.checkpoint_scheduled"

	TypeVMCheckpointTaken   Type = "vm.checkpoint_taken"
	TypeVMRestored          Type = "vm.restored"
	TypeVMCheckpointFailed  Type = "vm.checkpoint_failed"
	TypeVMCheckpointRemoved Type = "vm.checkpoint_removed"
)

// CheckpointKind is what a checkpoint saves.
type CheckpointKind string

// The kinds.
const (
	// CheckpointDisk saves the disk only (an external qcow2 overlay, taken
	// atomically); restoring it boots the guest from that disk.
	CheckpointDisk CheckpointKind = "disk"
	// CheckpointFull saves the disk and the guest's memory and device
	// state; restoring it resumes the guest where it was.
	CheckpointFull CheckpointKind = "full"
)

// Valid tells whether k is a kind.
func (k CheckpointKind) Valid() bool { return k == CheckpointDisk || k == CheckpointFull }

// VMCheckpointRequested asks the VM's host to take checkpoint Checkpoint.
// It is the goal's step until the host reports the outcome.
type VMCheckpointRequested struct {
	UID        string         `msgpack:"uid" json:"uid"`
	Checkpoint string         `msgpack:"checkpoint" json:"checkpoint"`
	Kind       CheckpointKind `msgpack:"kind" json:"kind"`
	// Scheduled says the VM's schedule asked, not a person: only these
	// count toward the schedule's keep.
	Scheduled bool `msgpack:"scheduled,omitempty" json:"scheduled,omitempty"`
}

// VMRestoreRequested asks the VM's host to bring the VM back to
// Checkpoint, on a fresh top layer named after Restore. It names the
// checkpoint's files as the catalog has them.
type VMRestoreRequested struct {
	UID        string         `msgpack:"uid" json:"uid"`
	Checkpoint string         `msgpack:"checkpoint" json:"checkpoint"`
	Restore    string         `msgpack:"restore" json:"restore"`
	Kind       CheckpointKind `msgpack:"kind" json:"kind"`
	Host       string         `msgpack:"host" json:"host"`
	Disk       string         `msgpack:"disk" json:"disk"`
	Memory     string         `msgpack:"memory,omitempty" json:"memory,omitempty"`
	// Desired is the VM's desired state after the restore: a full
	// checkpoint resumes the guest, so a stopped VM becomes running.
	Desired Desired `msgpack:"desired" json:"desired"`
}

// VMCheckpointDeleted takes a checkpoint out of the catalog. Its host
// removes its files: the memory at once, the disk layer once no later
// layer builds on it. Files on a host the VM no longer runs on stay there,
// and the event says so (Stranded).
type VMCheckpointDeleted struct {
	UID        string `msgpack:"uid" json:"uid"`
	Checkpoint string `msgpack:"checkpoint" json:"checkpoint"`
	Reason     string `msgpack:"reason" json:"reason"`
	Host       string `msgpack:"host,omitempty" json:"host,omitempty"`
	Stranded   bool   `msgpack:"stranded,omitempty" json:"stranded,omitempty"`
}

// Reasons a checkpoint is deleted.
const (
	DeletedByCommand  = "command"
	DeletedBySchedule = "schedule" // beyond the schedule's keep
)

// VMCheckpointScheduled sets (or, with Every zero, clears) the VM's
// checkpoint schedule: a checkpoint of Kind every Every, keeping the last
// Keep scheduled ones.
type VMCheckpointScheduled struct {
	UID         string         `msgpack:"uid" json:"uid"`
	EveryMillis int64          `msgpack:"every_ms" json:"every_ms"`
	Keep        int            `msgpack:"keep" json:"keep"`
	Kind        CheckpointKind `msgpack:"kind" json:"kind"`
}

// VMCheckpointTaken reports a checkpoint taken on the reporting host:
// Disk is its frozen layer, Memory its state file (full only), Top the
// layer the VM writes to from now on. Sizes are the files' own bytes on
// disk; Millis is how long the guest's checkpoint took.
type VMCheckpointTaken struct {
	UID         string         `msgpack:"uid" json:"uid"`
	Incarnation uint64         `msgpack:"incarnation" json:"incarnation"`
	Checkpoint  string         `msgpack:"checkpoint" json:"checkpoint"`
	Kind        CheckpointKind `msgpack:"kind" json:"kind"`
	Disk        string         `msgpack:"disk" json:"disk"`
	Memory      string         `msgpack:"memory,omitempty" json:"memory,omitempty"`
	Top         string         `msgpack:"top" json:"top"`
	DiskBytes   int64          `msgpack:"disk_bytes" json:"disk_bytes"`
	MemoryBytes int64          `msgpack:"memory_bytes,omitempty" json:"memory_bytes,omitempty"`
	Millis      int64          `msgpack:"ms" json:"ms"`
	Leases      []LeaseEpoch   `msgpack:"leases,omitempty" json:"leases,omitempty"`
}

// VMRestored reports a VM brought back to Checkpoint on the reporting
// host, writing to Top from now on.
type VMRestored struct {
	UID         string       `msgpack:"uid" json:"uid"`
	Incarnation uint64       `msgpack:"incarnation" json:"incarnation"`
	Checkpoint  string       `msgpack:"checkpoint" json:"checkpoint"`
	Restore     string       `msgpack:"restore" json:"restore"`
	Top         string       `msgpack:"top" json:"top"`
	Millis      int64        `msgpack:"ms" json:"ms"`
	Leases      []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
}

// VMCheckpointFailed reports a checkpoint step that failed: Op is take,
// restore or remove. The VM is left as the fault says; a failed take
// leaves no checkpoint file behind.
type VMCheckpointFailed struct {
	UID         string       `msgpack:"uid" json:"uid"`
	Incarnation uint64       `msgpack:"incarnation" json:"incarnation"`
	Checkpoint  string       `msgpack:"checkpoint" json:"checkpoint"`
	Op          string       `msgpack:"op" json:"op"`
	Fault       *Fault       `msgpack:"fault" json:"fault"`
	Leases      []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
}

// Ops of a failed checkpoint step.
const (
	CheckpointOpTake    = "take"
	CheckpointOpRestore = "restore"
	CheckpointOpRemove  = "remove"
)

// VMCheckpointRemoved reports that the host removed the files of deleted
// checkpoints. KeptDisk lists those whose disk layer stays because a
// later layer builds on it (it goes with the VM).
type VMCheckpointRemoved struct {
	UID         string   `msgpack:"uid" json:"uid"`
	Checkpoints []string `msgpack:"checkpoints" json:"checkpoints"`
	KeptDisk    []string `msgpack:"kept_disk,omitempty" json:"kept_disk,omitempty"`
}

func (VMCheckpointRequested) EventType() Type { return TypeVMCheckpointRequested }
func (VMRestoreRequested) EventType() Type    { return TypeVMRestoreRequested }
func (VMCheckpointDeleted) EventType() Type   { return TypeVMCheckpointDeleted }
func (VMCheckpointScheduled) EventType() Type { return TypeVMCheckpointScheduled }
func (VMCheckpointTaken) EventType() Type     { return TypeVMCheckpointTaken }
func (VMRestored) EventType() Type            { return TypeVMRestored }
func (VMCheckpointFailed) EventType() Type    { return TypeVMCheckpointFailed }
func (VMCheckpointRemoved) EventType() Type   { return TypeVMCheckpointRemoved }

// CheckpointState is where a catalog entry is.
type CheckpointState string

// The states.
const (
	CheckpointRequested CheckpointState = "requested"
	CheckpointTaken     CheckpointState = "taken"
	CheckpointFailedSt  CheckpointState = "failed"
	// CheckpointDeleting is deleted from the catalog, its files not yet
	// reported removed by its host.
	CheckpointDeleting CheckpointState = "deleting"
)

// Checkpoint is one entry of a VM's catalog.
type Checkpoint struct {
	ID        string          `msgpack:"id" json:"id"`
	Kind      CheckpointKind  `msgpack:"kind" json:"kind"`
	State     CheckpointState `msgpack:"state" json:"state"`
	Scheduled bool            `msgpack:"scheduled,omitempty" json:"scheduled,omitempty"`
	// Host is where the checkpoint's files are: the VM's host when it was
	// requested, whatever became of the VM since.
	Host        string   `msgpack:"host" json:"host"`
	Disk        string   `msgpack:"disk,omitempty" json:"disk,omitempty"`
	Memory      string   `msgpack:"memory,omitempty" json:"memory,omitempty"`
	DiskBytes   int64    `msgpack:"disk_bytes,omitempty" json:"disk_bytes,omitempty"`
	MemoryBytes int64    `msgpack:"memory_bytes,omitempty" json:"memory_bytes,omitempty"`
	Millis      int64    `msgpack:"ms,omitempty" json:"ms,omitempty"`
	RequestedAt UnixNano `msgpack:"requested_at" json:"requested_at"`
	// RequestedSeq and TakenSeq are the stream sequences of the request
	// and of the host's report.
	RequestedSeq uint64 `msgpack:"requested_seq" json:"requested_seq"`
	TakenSeq     uint64 `msgpack:"taken_seq,omitempty" json:"taken_seq,omitempty"`
	Fault        *Fault `msgpack:"fault,omitempty" json:"fault,omitempty"`
	// Restores counts the times the VM was brought back to it.
	Restores int `msgpack:"restores,omitempty" json:"restores,omitempty"`
}

// GoalStep is a one-off action the goal asks of the host besides its
// desired state: take a checkpoint, or restore one.
type GoalStep struct {
	Op         string         `msgpack:"op" json:"op"` // CheckpointOpTake or CheckpointOpRestore
	Checkpoint string         `msgpack:"checkpoint" json:"checkpoint"`
	Kind       CheckpointKind `msgpack:"kind" json:"kind"`
	// Restore names the restore (and the fresh top layer it makes); Disk
	// and Memory are the checkpoint's files. Restore only.
	Restore string `msgpack:"restore,omitempty" json:"restore,omitempty"`
	Disk    string `msgpack:"disk,omitempty" json:"disk,omitempty"`
	Memory  string `msgpack:"memory,omitempty" json:"memory,omitempty"`
}

// CheckpointFiles are the files of a deleted checkpoint its host must
// remove.
type CheckpointFiles struct {
	Checkpoint string `msgpack:"checkpoint" json:"checkpoint"`
	Disk       string `msgpack:"disk,omitempty" json:"disk,omitempty"`
	Memory     string `msgpack:"memory,omitempty" json:"memory,omitempty"`
}

// CheckpointSchedule is a VM's standing order for checkpoints.
type CheckpointSchedule struct {
	EveryMillis int64          `msgpack:"every_ms" json:"every_ms"`
	Keep        int            `msgpack:"keep" json:"keep"`
	Kind        CheckpointKind `msgpack:"kind" json:"kind"`
}

// Every is the schedule's period.
func (s CheckpointSchedule) Every() time.Duration {
	return time.Duration(s.EveryMillis) * time.Millisecond
}

// Limits of a checkpoint schedule.
const (
	MinCheckpointEvery = time.Minute
	MaxCheckpointKeep  = 1000
)

// checkpointIDPattern is what a checkpoint or restore id looks like: it
// names files on the hosts.
var checkpointIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidateCheckpointID checks an id that will name files.
func ValidateCheckpointID(id string) error {
	if !checkpointIDPattern.MatchString(id) {
		return fmt.Errorf("checkpoint id %q: want 1-63 of a-z, 0-9 and '-', starting with a letter or digit", id)
	}
	return nil
}

// DeriveStepID derives the id of the checkpoint, restore or migration a
// command makes, prefix first: the same command always derives the same
// id, so a retry names the same files.
func DeriveStepID(prefix, actor, commandID string) string {
	return prefix + "-" + derive("checkpoint", actor, commandID)[:16]
}

// CheckpointOf returns the VM's catalog entry id, and whether it has one.
func (s *VMState) CheckpointOf(id string) (*Checkpoint, bool) {
	for i := range s.Checkpoints {
		if s.Checkpoints[i].ID == id {
			return &s.Checkpoints[i], true
		}
	}
	return nil, false
}

// StepPending tells whether the VM's goal carries a step its host has not
// reported on yet.
func (s *VMState) StepPending() bool { return s.Step != nil }
