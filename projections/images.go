package projections

import (
	"context"
	"fmt"

	"github.com/loomctl/loom/events"
)

// The images read model: one events.ImageState per image, folded from the
// decisions on loom.evt.image.<name>.

func blankImage(name string) events.ImageState { return events.ImageState{Name: name} }

func isBlankImage(image *events.ImageState) bool {
	return *image == events.ImageState{Name: image.Name}
}

func (b *batch) foldImage(rec *events.Record) error {
	r, err := b.r.images.load(b.s.db, rec.Envelope.AggregateID)
	if err != nil {
		return err
	}
	return applyTo(r, rec, (*events.ImageState).Apply)
}

// Image is the named image and the head of loom.evt.image.<name>; the zero
// state when no event made the image, and the zero Head when its subject
// is empty.
func (s *Store) Image(ctx context.Context, name string) (events.ImageState, events.Head, error) {
	var state events.ImageState
	var head events.Head
	err := s.read(ctx, func(v *view) error {
		var err error
		state, head, _, err = v.image(name)
		return err
	})
	return state, head, err
}

// Images lists every image that an event made, sorted by name.
func (s *Store) Images(ctx context.Context) ([]events.ImageState, error) {
	var images []events.ImageState
	err := s.read(ctx, func(v *view) error {
		var err error
		images, err = v.images()
		return err
	})
	return images, err
}

// image reads an image's row; found is false, and the state zero, when no
// event made the image.
func (v *view) image(name string) (state events.ImageState, head events.Head, found bool, err error) {
	value, ok, err := v.get(nameKey(prefixImage, name))
	if err != nil || !ok {
		return events.ImageState{}, events.Head{}, false, err
	}
	if state, head, err = decodeRow[events.ImageState](value); err != nil {
		return events.ImageState{}, events.Head{}, false, fmt.Errorf("image %s: %w", name, err)
	}
	if isBlankImage(&state) {
		return events.ImageState{}, head, false, nil
	}
	return state, head, true, nil
}

func (v *view) images() ([]events.ImageState, error) {
	var images []events.ImageState
	err := v.scan(prefixImage, func(key, value []byte) error {
		state, _, err := decodeRow[events.ImageState](value)
		if err != nil {
			return fmt.Errorf("image %s: %w", key[len(prefixImage):], err)
		}
		if !isBlankImage(&state) {
			images = append(images, state)
		}
		return nil
	})
	return images, err
}
