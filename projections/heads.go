package projections

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// The heads read model: for every subject of LOOM_EVENTS, the sequence and
// hash of its last message, what a writer appends after. The rows of hosts,
// images, nets and VMs carry the head of their own decision subject
// (rowValue), so a decision writes one key, not two; the heads table holds
// the subjects of the other kinds and every observation subject, whose
// heads the signature checks read (signatures.go). A message that is
// flagged still moves its subject's head: it is the subject's last message
// all the same.

// setHead records the new head of a subject.
func (b *batch) setHead(subject string, addr events.Address, head events.Head) error {
	if addr.Observed {
		b.heads[subject] = head
		return nil
	}
	switch addr.Kind {
	case events.KindVM:
		r, err := b.loadVM(addr.ID)
		if err != nil {
			return err
		}
		r.head = head
	case events.KindHost:
		r, err := b.r.hosts.load(b.s.db, addr.ID)
		if err != nil {
			return err
		}
		r.head = head
	case events.KindImage:
		r, err := b.r.images.load(b.s.db, addr.ID)
		if err != nil {
			return err
		}
		r.head = head
	case events.KindNet:
		r, err := b.r.nets.load(b.s.db, addr.ID)
		if err != nil {
			return err
		}
		r.head = head
	default:
		b.heads[subject] = head
	}
	return nil
}

func (b *batch) writeHeads(pb *pebble.Batch) error {
	for _, subject := range sortedKeys(b.heads) {
		if err := pb.Set(nameKey(prefixHead, subject), encodeHead(b.heads[subject]), nil); err != nil {
			return err
		}
	}
	return nil
}

// Head is where a subject of LOOM_EVENTS stands; the zero Head when it is
// empty (or not a subject of the stream).
func (s *Store) Head(ctx context.Context, subject string) (events.Head, error) {
	var head events.Head
	err := s.read(ctx, func(v *view) error {
		var err error
		head, err = v.head(subject)
		return err
	})
	return head, err
}

func (v *view) head(subject string) (events.Head, error) {
	addr, err := events.ParseEventSubject(subject)
	if err != nil {
		return events.Head{}, nil
	}
	switch {
	case addr.Observed:
	case addr.Kind == events.KindVM:
		_, head, _, err := v.vm(addr.ID)
		return head, err
	case addr.Kind == events.KindHost:
		row, _, err := v.hostRow(addr.ID)
		return row.Head, err
	case addr.Kind == events.KindNet:
		_, head, _, err := v.net(addr.ID)
		return head, err
	case addr.Kind == events.KindImage:
		_, head, _, err := v.image(addr.ID)
		return head, err
	}
	value, found, err := v.get(nameKey(prefixHead, subject))
	if err != nil || !found {
		return events.Head{}, err
	}
	head, err := decodeHead(value)
	if err != nil {
		return events.Head{}, fmt.Errorf("head of %s: %w", subject, err)
	}
	return head, nil
}

// encodeHead is the sequence, 8 bytes big-endian, then the hash.
func encodeHead(h events.Head) []byte {
	return append(binary.BigEndian.AppendUint64(make([]byte, 0, 8+len(h.Hash)), h.Seq), h.Hash...)
}

func decodeHead(value []byte) (events.Head, error) {
	if len(value) < 8 {
		return events.Head{}, errors.New("head value shorter than a sequence")
	}
	head := events.Head{Seq: binary.BigEndian.Uint64(value)}
	if len(value) > 8 {
		head.Hash = value[8:]
	}
	return head, nil
}
