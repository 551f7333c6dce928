package events

import (
	"fmt"
	"time"
)

// Checkpoint command verbs, served on loom.cmd.vm.<verb>.
const (
	VerbCheckpoint       = "checkpoint"
	VerbRestore          = "restore"
	VerbDeleteCheckpoint = "checkpoint_delete"
	VerbSchedule         = "checkpoint_schedule"
)

// CheckpointVM asks for a checkpoint of a running or paused VM.
type CheckpointVM struct {
	CommandMeta `msgpack:",inline"`
	Name        string         `msgpack:"name" json:"name"`
	Kind        CheckpointKind `msgpack:"kind" json:"kind"`
}

// RestoreVM brings a VM back to one of its own checkpoints.
type RestoreVM struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	Checkpoint  string `msgpack:"checkpoint" json:"checkpoint"`
}

// DeleteCheckpoint takes a checkpoint out of a VM's catalog and removes its
// files.
type DeleteCheckpoint struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	Checkpoint  string `msgpack:"checkpoint" json:"checkpoint"`
}

// ScheduleCheckpoints sets a VM's checkpoint schedule; Every zero clears it.
type ScheduleCheckpoints struct {
	CommandMeta `msgpack:",inline"`
	Name        string         `msgpack:"name" json:"name"`
	EveryMillis int64          `msgpack:"every_ms" json:"every_ms"`
	Keep        int            `msgpack:"keep" json:"keep"`
	Kind        CheckpointKind `msgpack:"kind,omitempty" json:"kind,omitempty"`
}

// Validate checks a CheckpointVM's arguments.
func (c *CheckpointVM) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	if !c.Kind.Valid() {
		return fmt.Errorf("kind %q: want %s or %s", c.Kind, CheckpointDisk, CheckpointFull)
	}
	return c.CommandMeta.Validate()
}

// Validate checks a RestoreVM's arguments.
func (c *RestoreVM) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	if err := ValidateCheckpointID(c.Checkpoint); err != nil {
		return err
	}
	return c.CommandMeta.Validate()
}

// Validate checks a DeleteCheckpoint's arguments.
func (c *DeleteCheckpoint) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	if err := ValidateCheckpointID(c.Checkpoint); err != nil {
		return err
	}
	return c.CommandMeta.Validate()
}

// Validate checks a ScheduleCheckpoints' arguments.
func (c *ScheduleCheckpoints) Validate() error {
	if err := ValidateName("vm", c.Name); err != nil {
		return err
	}
	if c.EveryMillis != 0 {
		every := time.Duration(c.EveryMillis) * time.Millisecond
		if every < MinCheckpointEvery || c.EveryMillis > int64(365*24*time.Hour/time.Millisecond) {
			return fmt.Errorf("every_ms %d out of range: at least %s, at most a year (0 clears the schedule)", c.EveryMillis, MinCheckpointEvery)
		}
		if c.Keep < 1 || c.Keep > MaxCheckpointKeep {
			return fmt.Errorf("keep %d out of range 1..%d", c.Keep, MaxCheckpointKeep)
		}
		if c.Kind != "" && !c.Kind.Valid() {
			return fmt.Errorf("kind %q: want %s or %s", c.Kind, CheckpointDisk, CheckpointFull)
		}
	}
	return c.CommandMeta.Validate()
}
