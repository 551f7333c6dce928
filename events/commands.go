package events

import (
	"fmt"

	"github.com/loomctl/loom/events/hostkey"
)

// Command verbs, served on loom.cmd.<kind>.<verb>.
const (
	VerbRegister = "register"
	VerbCordon   = "cordon"
	VerbUncordon = "uncordon"
	VerbCreate   = "create"
	VerbStart    = "start"
	VerbStop     = "stop"
	VerbPause    = "pause"
	VerbResume   = "resume"
	VerbDelete   = "delete"
)

// HeaderActor names who sends a command. Until per-role NATS identities
// attest the requester, it is the client's word.
const HeaderActor = "Loom-Actor"

// CommandMeta is what every command carries besides its arguments.
type CommandMeta struct {
	// CommandID is chosen by the client and reused on every retry of the
	// same command: Loom acts on it at most once and answers every retry
	// with the original result.
	CommandID string `msgpack:"command_id" json:"command_id"`
	// CorrelationID ties the command to a larger piece of work (optional).
	CorrelationID string `msgpack:"correlation_id,omitempty" json:"correlation_id,omitempty"`
}

// MaxCommandIDLen bounds command ids.
const MaxCommandIDLen = 128

// Validate checks the command id.
func (m CommandMeta) Validate() error {
	if len(m.CommandID) > MaxCommandIDLen {
		return fmt.Errorf("command_id is %d bytes, at most %d allowed", len(m.CommandID), MaxCommandIDLen)
	}
	return nil
}

// RegisterHost adds a host and its capacity to the fleet.
type RegisterHost struct {
	CommandMeta `msgpack:",inline"`
	Name        string            `msgpack:"name" json:"name"`
	CPU         int               `msgpack:"cpu" json:"cpu"`
	MemoryMiB   int               `msgpack:"mem_mib" json:"mem_mib"`
	Address     string            `msgpack:"addr,omitempty" json:"addr,omitempty"`
	Labels      map[string]string `msgpack:"labels,omitempty" json:"labels,omitempty"`
	// Key, if set, is the public half of the host's key, "U…": its agent
	// signs every observation with the key, and observations of the host
	// that are not signed by it are flagged and skipped. A host registered
	// without one may be given one by registering again; a key, once
	// registered, cannot be changed or removed that way.
	Key string `msgpack:"key,omitempty" json:"key,omitempty"`
}

// CordonHost stops new placements on a host; UncordonHost allows them again.
type CordonHost struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	Reason      string `msgpack:"reason,omitempty" json:"reason,omitempty"`
	// Uncordon reverses a cordon.
	Uncordon bool `msgpack:"uncordon,omitempty" json:"uncordon,omitempty"`
}

// RegisterImage adds an image VMs can be created from.
type RegisterImage struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	Format      string `msgpack:"format" json:"format"`
	SizeBytes   int64  `msgpack:"size" json:"size"`
	Source      string `msgpack:"source,omitempty" json:"source,omitempty"`
	Checksum    string `msgpack:"checksum,omitempty" json:"checksum,omitempty"`
	// Boot, if set, boots the image's VMs from a kernel on the hosts.
	Boot *ImageBoot `msgpack:"boot,omitempty" json:"boot,omitempty"`
}

// CreateVM creates a VM from an image and places it on a host with room.
type CreateVM struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	Image       string `msgpack:"image" json:"image"`
	CPU         int    `msgpack:"cpu" json:"cpu"`
	MemoryMiB   int    `msgpack:"mem_mib" json:"mem_mib"`
	// Stopped creates the VM without starting it.
	Stopped bool `msgpack:"stopped,omitempty" json:"stopped,omitempty"`
	// OnHostLost is what happens if the VM's host is declared lost:
	// restart (the default) or stop.
	OnHostLost HostLostPolicy `msgpack:"on_host_lost,omitempty" json:"on_host_lost,omitempty"`
	// Net, if set, gives the VM an address on that virtual network.
	Net string `msgpack:"net,omitempty" json:"net,omitempty"`
}

// VMCommand names the VM a start, stop, pause, resume or delete acts on.
type VMCommand struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
}

// Limits on what a command may ask for.
const (
	MaxCPU       = 1024
	MaxMemoryMiB = 16 << 20 // 16 TiB
)

// Validate checks a RegisterHost's arguments.
func (c *RegisterHost) Validate() error {
	if err := ValidateName("host", c.Name); err != nil {
		return err
	}
	if c.CPU < 1 || c.CPU > MaxCPU {
		return fmt.Errorf("cpu %d out of range 1..%d", c.CPU, MaxCPU)
	}
	if c.MemoryMiB < 1 || c.MemoryMiB > MaxMemoryMiB {
		return fmt.Errorf("mem_mib %d out of range 1..%d", c.MemoryMiB, MaxMemoryMiB)
	}
	if c.Key != "" {
		if _, err := hostkey.ParsePublic(c.Key); err != nil {
			return err
		}
	}
	return c.CommandMeta.Validate()
}

// Validate checks a CordonHost's arguments.
func (c *CordonHost) Validate() error {
	if err := ValidateName("host", c.Name); err != nil {
		return err
	}
	return c.CommandMeta.Validate()
}

// ImageFormats lists the image formats Loom accepts.
var imageFormats = map[string]bool{"qcow2": true, "raw": true}

// Validate checks a RegisterImage's arguments.
func (c *RegisterImage) Validate() error {
	if err := ValidateName("image", c.Name); err != nil {
		return err
	}
	if !imageFormats[c.Format] {
		return fmt.Errorf("format %q: want qcow2 or raw", c.Format)
	}
	if c.SizeBytes < 0 {
		return fmt.Errorf("size %d is negative", c.SizeBytes)
	}
	if err := c.Boot.Validate(); err != nil {
		return err
	}
	return c.CommandMeta.Validate()
}

// Validate checks a CreateVM's arguments.
func (c *CreateVM) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	if err := ValidateName("image", c.Image); err != nil {
		return err
	}
	if c.CPU < 1 || c.CPU > MaxCPU {
		return fmt.Errorf("cpu %d out of range 1..%d", c.CPU, MaxCPU)
	}
	if c.MemoryMiB < 1 || c.MemoryMiB > MaxMemoryMiB {
		return fmt.Errorf("mem_mib %d out of range 1..%d", c.MemoryMiB, MaxMemoryMiB)
	}
	if c.OnHostLost != "" && !c.OnHostLost.Valid() {
		return fmt.Errorf("on_host_lost %q: want %s or %s", c.OnHostLost, RestartElsewhere, LeaveStopped)
	}
	if c.Net != "" {
		if err := ValidateName("net", c.Net); err != nil {
			return err
		}
	}
	return c.CommandMeta.Validate()
}

// Validate checks a VMCommand's arguments.
func (c *VMCommand) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	return c.CommandMeta.Validate()
}

// Appended is one event a command appended, as the reply reports it.
type Appended struct {
	Seq     uint64 `msgpack:"seq" json:"seq"`
	Subject string `msgpack:"subject" json:"subject"`
	Type    Type   `msgpack:"type" json:"type"`
	ID      string `msgpack:"id" json:"id"`
}

// Reply answers a command: the events it appended, or a Fault.
type Reply struct {
	Events []Appended `msgpack:"events,omitempty" json:"events,omitempty"`
	Error  *Fault     `msgpack:"error,omitempty" json:"error,omitempty"`
	// Replayed is true when the command had already taken effect and this
	// is its original result.
	Replayed bool `msgpack:"replayed,omitempty" json:"replayed,omitempty"`
}

// LastSeq is the highest sequence the reply reports; a query naming it as
// MinSeq reads the command's own writes.
func (r *Reply) LastSeq() uint64 {
	var last uint64
	for _, e := range r.Events {
		last = max(last, e.Seq)
	}
	return last
}
