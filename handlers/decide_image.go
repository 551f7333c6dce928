package handlers

import "github.com/loomctl/loom/events"

// decideRegisterImage registers a new image. Registering again with the
// same spec changes nothing; with another spec it is refused.
func decideRegisterImage(img events.ImageState, cmd *events.RegisterImage) (events.Event, *events.Fault) {
	want := events.ImageRegistered{Format: cmd.Format, SizeBytes: cmd.SizeBytes, Source: cmd.Source, Checksum: cmd.Checksum, Boot: cmd.Boot}
	if !img.Registered {
		return want, nil
	}
	if img.Format == want.Format && img.SizeBytes == want.SizeBytes && img.Source == want.Source && img.Checksum == want.Checksum && img.Boot.Equal(want.Boot) {
		return nil, nil
	}
	return nil, events.Errorf(events.CodeImageExists,
		"image %s is registered as %s, %d bytes, from %q; register the new one under another name",
		cmd.Name, img.Format, img.SizeBytes, img.Source)
}
