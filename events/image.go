package events

import "fmt"

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
}

func (ImageRegistered) EventType() Type { return TypeImageRegistered }

// ImageState is an image aggregate folded from its events.
type ImageState struct {
	Name       string `msgpack:"name" json:"name"`
	Registered bool   `msgpack:"registered" json:"registered"`
	Format     string `msgpack:"format" json:"format"`
	SizeBytes  int64  `msgpack:"size" json:"size"`
	Source     string `msgpack:"source,omitempty" json:"source,omitempty"`
	Checksum   string `msgpack:"checksum,omitempty" json:"checksum,omitempty"`
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
		s.Format, s.SizeBytes, s.Source, s.Checksum = ev.Format, ev.SizeBytes, ev.Source, ev.Checksum
		s.RegisteredBy, s.RegisterCommand = rec.Envelope.Actor, rec.Envelope.CommandID
	default:
		return fmt.Errorf("image %s: %w %s", s.Name, errNotForAggregate, rec.Envelope.Type)
	}
	return nil
}
