package projections

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// view is one consistent read of the store. It reads from a Pebble
// snapshot, and the runner writes each batch (rows and applied sequence
// together) in one atomic Pebble batch, so everything a view reads
// reflects the same applied sequence: seq.
type view struct {
	ctx  context.Context
	snap *pebble.Snapshot
	seq  uint64
}

// read runs fn on a view of the store.
func (s *Store) read(ctx context.Context, fn func(v *view) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return ErrClosed
	}
	snap := s.db.NewSnapshot()
	defer func() { _ = snap.Close() }()
	v := &view{ctx: ctx, snap: snap}
	value, found, err := v.get(keyApplied)
	if err != nil {
		return err
	}
	if found {
		if v.seq, err = decodeSeq(value); err != nil {
			return fmt.Errorf("read applied sequence: %w", err)
		}
	}
	return fn(v)
}

// get reads one value; found is false when the key is absent. The value
// is the caller's to keep.
func (v *view) get(key []byte) (value []byte, found bool, err error) {
	value, closer, err := v.snap.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("get %q: %w", key, err)
	}
	defer func() { _ = closer.Close() }()
	return bytes.Clone(value), true, nil
}

// scan calls fn for every key under prefix, in key order. key and value
// are valid only during the call.
func (v *view) scan(prefix []byte, fn func(key, value []byte) error) error {
	iter, err := v.snap.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return fmt.Errorf("scan %q: %w", prefix, err)
	}
	for valid := iter.First(); valid; valid = iter.Next() {
		if err := v.ctx.Err(); err != nil {
			_ = iter.Close()
			return err
		}
		value, err := iter.ValueAndErr()
		if err == nil {
			err = fn(iter.Key(), value)
		}
		if err != nil {
			_ = iter.Close()
			return err
		}
	}
	if err := iter.Close(); err != nil {
		return fmt.Errorf("scan %q: %w", prefix, err)
	}
	return nil
}
