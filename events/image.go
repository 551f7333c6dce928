package events

import (
	"fmt"
	"strings"
)

// TypeImageRegistered is the image registration event type.
const TypeImageRegistered Type = "image.registered"

// ImageRegistered records an image that VMs can be created from.
type ImageRegistered struct {
	// Format is the disk format, "qcow2" or "raw".
	Format string `msgpack:"format" json:"format"`
	// SizeBytes is the virtual size of the image.
	SizeBytes int64 `msgpack:"size" json:"size"`
	// Source says where the image's bytes are (a path or URL).
	Source string `msgpack:"source,omitempty" json:"source,omitempty"`
	// Checksum is the image's "sha256:<hex>" digest, when known.
	Checksum string `msgpack:"checksum,omitempty" json:"checksum,omitempty"`
	// Boot, if set, boots VMs of this image from a kernel directly (v2).
	Boot *ImageBoot `msgpack:"boot,omitempty" json:"boot,omitempty"`
}

// ImageBoot boots a VM from a kernel and an initramfs on the host, with
// the image as its disk, instead of from a bootloader on the image.
type ImageBoot struct {
	Kernel  string `msgpack:"kernel" json:"kernel"`
	Initrd  string `msgpack:"initrd,omitempty" json:"initrd,omitempty"`
	Cmdline string `msgpack:"cmdline,omitempty" json:"cmdline,omitempty"`
}

// Validate checks an ImageBoot's paths.
func (b *ImageBoot) Validate() error {
	if b == nil {
		return nil
	}
	for what, path := range map[string]string{"kernel": b.Kernel, "initrd": b.Initrd} {
		if path == "" && what == "initrd" {
			continue
		}
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, "\x00\n\r") || len(path) > 4096 {
			return fmt.Errorf("boot %s %q: want an absolute path on the hosts", what, path)
		}
	}
	if strings.ContainsAny(b.Cmdline, "\x00\n\r") || len(b.Cmdline) > 2048 {
		return fmt.Errorf("boot cmdline: one line of at most 2048 bytes")
	}
	return nil
}

// Equal tells whether two boots are the same (nil is none).
func (b *ImageBoot) Equal(o *ImageBoot) bool {
	if b == nil || o == nil {
		return b == o
	}
	return *b == *o
}

func (ImageRegistered) EventType() Type { return TypeImageRegistered }

// ImageState is an image aggregate folded from its events.
type ImageState struct {
	Name       string     `msgpack:"name" json:"name"`
	Registered bool       `msgpack:"registered" json:"registered"`
	Format     string     `msgpack:"format" json:"format"`
	SizeBytes  int64      `msgpack:"size" json:"size"`
	Source     string     `msgpack:"source,omitempty" json:"source,omitempty"`
	Checksum   string     `msgpack:"checksum,omitempty" json:"checksum,omitempty"`
	Boot       *ImageBoot `msgpack:"boot,omitempty" json:"boot,omitempty"`
	// RegisteredBy is the actor who registered the image, RegisterCommand
	// the command's id.
	RegisteredBy    string `msgpack:"registered_by,omitempty" json:"registered_by,omitempty"`
	RegisterCommand string `msgpack:"register_command,omitempty" json:"register_command,omitempty"`
}

// Apply folds one event of the image's subject into the state.
func (s *ImageState) Apply(rec *Record) error {
	if rec.Envelope.Kind != KindImage {
		return fmt.Errorf("image %s: event %s of kind %s", s.Name, rec.Envelope.Type, rec.Envelope.Kind)
	}
	s.Name = rec.Envelope.AggregateID
	switch ev := rec.Event.(type) {
	case ImageRegistered:
		s.Registered = true
		s.Format, s.SizeBytes, s.Source, s.Checksum, s.Boot = ev.Format, ev.SizeBytes, ev.Source, ev.Checksum, ev.Boot
		s.RegisteredBy, s.RegisterCommand = rec.Envelope.Actor, rec.Envelope.CommandID
	default:
		return fmt.Errorf("image %s: %w %s", s.Name, errNotForAggregate, rec.Envelope.Type)
	}
	return nil
}
