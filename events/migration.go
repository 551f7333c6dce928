package events

import (
	"fmt"
	"strings"
)

// Live migration. A migration moves a running VM to another host while it
// runs, as a handoff of its leases: the source's epochs stay current
// until the target reported the domain running and the source reported it
// gone; then one atomic append records the move, the target's grants and
// the VM's new place. A failed or cancelled migration leaves the VM running
// on the source under its old grants.
//
//	vm.migration_started   decision, in one atomic append with the target's host.allocated
//	vm.migration_received  the target's report: the domain runs here
//	vm.migration_sent      the source's report: the domain left, with libvirt's figures
//	vm.migration_aborted   the source's report: it did not happen, the domain runs here
//	vm.migrated            decision: the handoff, with the grants made in the same append
//	vm.migration_failed    decision: the migration is over, the VM stays on the source
//	vm.migration_cancelling decision: a person asked the source to abort
const (
	TypeVMMigrationStarted    Type = "vm.migration_started"
	TypeVMMigrated            Type = "vm.migrated"
	TypeVMMigrationFailed     Type = "vm.migration_failed"
	TypeVMMigrationCancelling Type = "vm.migration_cancelling"

	TypeVMMigrationReceived Type = "vm.migration_received"
	TypeVMMigrationSent     Type = "vm.migration_sent"
	TypeVMMigrationAborted  Type = "vm.migration_aborted"

	TypeHostAgentStarted Type = "host.agent_started"
)

// VMMigrationStarted starts moving the VM from From to To, whose capacity
// for it is the host.allocated stored just before it, in the same atomic
// append (a batch is stored contiguously).
// The rest is how the source reaches the target: the target's libvirtd as
// the source's daemon dials it, where the target's QEMU listens for memory
// and disk, and the file the VM's disk becomes there.
type VMMigrationStarted struct {
	UID       string `msgpack:"uid" json:"uid"`
	Migration string `msgpack:"migration" json:"migration"`
	From      string `msgpack:"from" json:"from"`
	To        string `msgpack:"to" json:"to"`
	DestURI   string `msgpack:"dest_uri" json:"dest_uri"`
	DataURI   string `msgpack:"data_uri,omitempty" json:"data_uri,omitempty"`
	DisksURI  string `msgpack:"disks_uri,omitempty" json:"disks_uri,omitempty"`
	DestDisk  string `msgpack:"dest_disk,omitempty" json:"dest_disk,omitempty"`
}

// VMMigrated records the move: the VM runs on To under grants made in the
// same atomic append as this event. A batch is stored contiguously, so
// each grant's epoch is this event's sequence minus its Back.
type VMMigrated struct {
	UID       string       `msgpack:"uid" json:"uid"`
	Migration string       `msgpack:"migration" json:"migration"`
	From      string       `msgpack:"from" json:"from"`
	To        string       `msgpack:"to" json:"to"`
	AllocSeq  uint64       `msgpack:"alloc_seq" json:"alloc_seq"`
	Grants    []MovedGrant `msgpack:"grants" json:"grants"`
}

// MovedGrant is a grant a vm.migrated made, Back messages before it.
type MovedGrant struct {
	Resource string    `msgpack:"resource" json:"resource"`
	Mode     LeaseMode `msgpack:"mode" json:"mode"`
	Back     uint64    `msgpack:"back" json:"back"`
}

// VMMigrationFailed ends a migration that did not happen: the VM runs on
// From under its grants, and the target's allocation is given back.
type VMMigrationFailed struct {
	UID       string `msgpack:"uid" json:"uid"`
	Migration string `msgpack:"migration" json:"migration"`
	Reason    string `msgpack:"reason" json:"reason"`
	Fault     *Fault `msgpack:"fault,omitempty" json:"fault,omitempty"`
}

// VMMigrationCancelling asks the source to abort the migration. Only the
// source's report decides how it ended: an abort that came too late is a
// migration that happened.
type VMMigrationCancelling struct {
	UID       string `msgpack:"uid" json:"uid"`
	Migration string `msgpack:"migration" json:"migration"`
}

// VMMigrationReceived is the target's report: the migrated domain runs
// here, writing to Disk. The figures are libvirt's own, which it keeps on
// the target: from the start on the source to the guest running here, and
// how long the guest was paused at the switch-over.
type VMMigrationReceived struct {
	UID            string `msgpack:"uid" json:"uid"`
	Incarnation    uint64 `msgpack:"incarnation" json:"incarnation"`
	Migration      string `msgpack:"migration" json:"migration"`
	Disk           string `msgpack:"disk,omitempty" json:"disk,omitempty"`
	TotalMillis    int64  `msgpack:"total_ms,omitempty" json:"total_ms,omitempty"`
	DowntimeMillis int64  `msgpack:"downtime_ms,omitempty" json:"downtime_ms,omitempty"`
}

// VMMigrationSent is the source's report: the domain left this host.
// Millis is how long the source's call took; MemoryBytes and DiskBytes
// what it last saw copied.
type VMMigrationSent struct {
	UID         string       `msgpack:"uid" json:"uid"`
	Incarnation uint64       `msgpack:"incarnation" json:"incarnation"`
	Migration   string       `msgpack:"migration" json:"migration"`
	Millis      int64        `msgpack:"ms" json:"ms"`
	MemoryBytes int64        `msgpack:"memory_bytes,omitempty" json:"memory_bytes,omitempty"`
	DiskBytes   int64        `msgpack:"disk_bytes,omitempty" json:"disk_bytes,omitempty"`
	Leases      []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
	// UnreachableMillis is the longest the VM's address went without
	// answering this host's port during the move (0: not probed: the
	// host has no port on the VM's net).
	UnreachableMillis int64 `msgpack:"unreachable_ms,omitempty" json:"unreachable_ms,omitempty"`
}

// VMMigrationAborted is the source's report: the migration did not happen
// (it failed, or was cancelled), and the domain runs here as before.
type VMMigrationAborted struct {
	UID         string       `msgpack:"uid" json:"uid"`
	Incarnation uint64       `msgpack:"incarnation" json:"incarnation"`
	Migration   string       `msgpack:"migration" json:"migration"`
	Fault       *Fault       `msgpack:"fault" json:"fault"`
	Leases      []LeaseEpoch `msgpack:"leases,omitempty" json:"leases,omitempty"`
}

// HostAgentStarted is what a host's agent says of itself when it starts:
// where it keeps disks and how other hosts' daemons migrate VMs to it.
// A host whose agent gave no MigrateURI receives no migration.
type HostAgentStarted struct {
	Agent      string `msgpack:"agent" json:"agent"`
	StorageDir string `msgpack:"storage_dir,omitempty" json:"storage_dir,omitempty"`
	// MigrateURI is this host's libvirtd as another host's daemon dials
	// it; MigrateListen where this host's QEMU listens for incoming
	// memory and disk: "unix:DIR" (a socket per migration in DIR) or
	// "tcp:ADDRESS".
	MigrateURI    string `msgpack:"migrate_uri,omitempty" json:"migrate_uri,omitempty"`
	MigrateListen string `msgpack:"migrate_listen,omitempty" json:"migrate_listen,omitempty"`
	// TunnelEndpoint is this host's address on the underlay, where other
	// hosts send the VXLAN traffic of its VMs' addresses.
	TunnelEndpoint string `msgpack:"tunnel_endpoint,omitempty" json:"tunnel_endpoint,omitempty"`
}

func (VMMigrationStarted) EventType() Type    { return TypeVMMigrationStarted }
func (VMMigrated) EventType() Type            { return TypeVMMigrated }
func (VMMigrationFailed) EventType() Type     { return TypeVMMigrationFailed }
func (VMMigrationCancelling) EventType() Type { return TypeVMMigrationCancelling }
func (VMMigrationReceived) EventType() Type   { return TypeVMMigrationReceived }
func (VMMigrationSent) EventType() Type       { return TypeVMMigrationSent }
func (VMMigrationAborted) EventType() Type    { return TypeVMMigrationAborted }
func (HostAgentStarted) EventType() Type      { return TypeHostAgentStarted }

// Migration is a VM's migration under way, as its state tracks it.
type Migration struct {
	ID         string `msgpack:"id" json:"id"`
	From       string `msgpack:"from" json:"from"`
	To         string `msgpack:"to" json:"to"`
	AllocSeq   uint64 `msgpack:"alloc_seq" json:"alloc_seq"`
	StartedSeq uint64 `msgpack:"started_seq" json:"started_seq"`
	// The step the source carries out.
	DestURI  string `msgpack:"dest_uri" json:"dest_uri"`
	DataURI  string `msgpack:"data_uri,omitempty" json:"data_uri,omitempty"`
	DisksURI string `msgpack:"disks_uri,omitempty" json:"disks_uri,omitempty"`
	DestDisk string `msgpack:"dest_disk,omitempty" json:"dest_disk,omitempty"`
	// Cancelling says a person asked the source to abort.
	Cancelling bool `msgpack:"cancelling,omitempty" json:"cancelling,omitempty"`
	// What the hosts reported: the target runs it (ReceivedDisk is where
	// it writes), the source sent it (with libvirt's figures), or the
	// source aborted it.
	Received          bool   `msgpack:"received,omitempty" json:"received,omitempty"`
	ReceivedDisk      string `msgpack:"received_disk,omitempty" json:"received_disk,omitempty"`
	Sent              bool   `msgpack:"sent,omitempty" json:"sent,omitempty"`
	TotalMillis       int64  `msgpack:"total_ms,omitempty" json:"total_ms,omitempty"`
	DowntimeMillis    int64  `msgpack:"downtime_ms,omitempty" json:"downtime_ms,omitempty"`
	UnreachableMillis int64  `msgpack:"unreachable_ms,omitempty" json:"unreachable_ms,omitempty"`
	Aborted           *Fault `msgpack:"aborted,omitempty" json:"aborted,omitempty"`
}

// LastMigration is the outcome of a VM's last migration, kept once it is over.
type LastMigration struct {
	ID             string `msgpack:"id" json:"id"`
	From           string `msgpack:"from" json:"from"`
	To             string `msgpack:"to" json:"to"`
	Moved          bool   `msgpack:"moved" json:"moved"`
	TotalMillis    int64  `msgpack:"total_ms,omitempty" json:"total_ms,omitempty"`
	DowntimeMillis int64  `msgpack:"downtime_ms,omitempty" json:"downtime_ms,omitempty"`
	// UnreachableMillis is how long the VM's address went unanswered
	// from the host it left, if that host has a port on its net.
	UnreachableMillis int64  `msgpack:"unreachable_ms,omitempty" json:"unreachable_ms,omitempty"`
	Reason            string `msgpack:"reason,omitempty" json:"reason,omitempty"`
	Fault             *Fault `msgpack:"fault,omitempty" json:"fault,omitempty"`
	Seq               uint64 `msgpack:"seq" json:"seq"`
}

// MigrateStep is what the goal asks of the source: move the domain.
type MigrateStep struct {
	Migration string `msgpack:"migration" json:"migration"`
	To        string `msgpack:"to" json:"to"`
	DestURI   string `msgpack:"dest_uri" json:"dest_uri"`
	DataURI   string `msgpack:"data_uri,omitempty" json:"data_uri,omitempty"`
	DisksURI  string `msgpack:"disks_uri,omitempty" json:"disks_uri,omitempty"`
	DestDisk  string `msgpack:"dest_disk,omitempty" json:"dest_disk,omitempty"`
	// Cancel asks the source to abort it.
	Cancel bool `msgpack:"cancel,omitempty" json:"cancel,omitempty"`
}

// IncomingStep is what the goal asks of the target: expect the domain,
// arriving from From, and report it once it runs.
type IncomingStep struct {
	Migration string `msgpack:"migration" json:"migration"`
	From      string `msgpack:"from" json:"from"`
	Disk      string `msgpack:"disk,omitempty" json:"disk,omitempty"`
}

// MigrationData turns a target's listen setting into the URIs its QEMU
// listens on for memory and for the disk copy of migration id.
func MigrationData(listen, id string) (data, disks string, err error) {
	switch kind, where, _ := strings.Cut(listen, ":"); kind {
	case "":
		return "", "", nil
	case "unix":
		return "unix://" + where + "/" + id + ".mem.sock", "unix://" + where + "/" + id + ".disk.sock", nil
	case "tcp":
		return "tcp://" + where, "tcp://" + where, nil
	default:
		return "", "", fmt.Errorf("migrate listen %q: want unix:DIR or tcp:ADDRESS", listen)
	}
}

// VerbMigrate moves a running VM to another host while it runs.
const VerbMigrate = "migrate"

// MigrateVM moves a VM to To, or to a host the scheduler chooses; with
// Cancel, it asks the source to abort the migration under way.
type MigrateVM struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	To          string `msgpack:"to,omitempty" json:"to,omitempty"`
	Cancel      bool   `msgpack:"cancel,omitempty" json:"cancel,omitempty"`
}

// Validate checks a MigrateVM's arguments.
func (c *MigrateVM) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	if c.To != "" {
		if err := ValidateName("host", c.To); err != nil {
			return err
		}
	}
	return c.CommandMeta.Validate()
}
