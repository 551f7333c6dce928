package projections

import (
	"bytes"
	"errors"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/loomctl/loom/events"
)

// table is one kind of aggregate row (hosts, images or VMs) as the runner
// holds it: the rows the current batch touched, and the rows it keeps
// decoded between batches so that a busy aggregate is not decoded again for
// every batch. Only the runner goroutine uses a table.
type table[T any] struct {
	prefix []byte
	// blank is the state of an aggregate no event has changed yet.
	blank func(name string) T
	// isBlank tells whether a state is blank: a row exists exactly when
	// its state is not, whatever the batches that led there.
	isBlank func(*T) bool
	// limit bounds cache; negative keeps nothing between batches.
	limit int
	// inRow, if set, is the part of a state its row holds; the rest lives
	// under keys of its own (a host's allocations), written by the batch.
	inRow func(T) T
	// loadRest, if set, reads the rest of a state after its row.
	loadRest func(db *pebble.DB, name string, state *T) error
	// cache holds rows as committed; a failed commit drops it.
	cache map[string]*row[T]
	// touched are the rows the current batch has loaded.
	touched map[string]*row[T]
}

// row is one aggregate's state while the runner holds it.
type row[T any] struct {
	state T
	// head is where the aggregate's decision subject stands.
	head events.Head
	// stored is the row's value in Pebble; nil while the row is absent.
	stored []byte
}

// rowValue is what an aggregate's row stores: the head of its decision
// subject, loom.evt.<kind>.<name>, beside its state, so that one write
// records both. A row whose subject holds only flagged messages has a head
// and a blank state.
type rowValue[T any] struct {
	Head  events.Head
	State T
}

// decodeRow decodes a row's value.
func decodeRow[T any](value []byte) (state T, head events.Head, err error) {
	var v rowValue[T]
	if err := events.Unmarshal(value, &v); err != nil {
		return state, head, err
	}
	return v.State, v.Head, nil
}

func newTable[T any](prefix []byte, limit int, blank func(name string) T, isBlank func(*T) bool) *table[T] {
	return &table[T]{prefix: prefix, blank: blank, isBlank: isBlank, limit: limit,
		cache: map[string]*row[T]{}, touched: map[string]*row[T]{}}
}

// load is the row of name for the current batch, read from the cache or
// from Pebble on first touch.
func (t *table[T]) load(db *pebble.DB, name string) (*row[T], error) {
	if r, ok := t.touched[name]; ok {
		return r, nil
	}
	r, ok := t.cache[name]
	if !ok {
		r = &row[T]{state: t.blank(name)}
		value, closer, err := db.Get(nameKey(t.prefix, name))
		switch {
		case errors.Is(err, pebble.ErrNotFound):
		case err != nil:
			return nil, fmt.Errorf("load %q: %w", nameKey(t.prefix, name), err)
		default:
			r.stored = bytes.Clone(value)
			_ = closer.Close()
			if r.state, r.head, err = decodeRow[T](r.stored); err != nil {
				return nil, fmt.Errorf("load %q: %w", nameKey(t.prefix, name), err)
			}
		}
		if t.loadRest != nil {
			if err := t.loadRest(db, name, &r.state); err != nil {
				return nil, err
			}
		}
	}
	t.touched[name] = r
	return r, nil
}

// write puts every touched row whose encoding changed into b, in name
// order, and calls changed for each. A row with a blank state and no head
// is not written, and deleted if it was: whether a row exists depends on
// its state alone, never on where batches began. If b is then not
// committed, the table must be abandoned.
func (t *table[T]) write(b *pebble.Batch, enc *encoder, changed func(name string, r *row[T]) error) error {
	for _, name := range sortedKeys(t.touched) {
		r := t.touched[name]
		var value []byte
		if r.head.Seq != 0 || !t.isBlank(&r.state) {
			v := rowValue[T]{Head: r.head, State: r.state}
			if t.inRow != nil {
				v.State = t.inRow(v.State)
			}
			var err error
			if value, err = enc.encode(&v); err != nil {
				return fmt.Errorf("encode %q: %w", nameKey(t.prefix, name), err)
			}
		}
		switch {
		case bytes.Equal(value, r.stored):
			continue // unchanged (or still blank): nothing to write
		case value == nil:
			if err := b.Delete(nameKey(t.prefix, name), nil); err != nil {
				return err
			}
			r.stored = nil
		default:
			if err := b.Set(nameKey(t.prefix, name), value, nil); err != nil {
				return err
			}
			r.stored = bytes.Clone(value)
		}
		if changed != nil {
			if err := changed(name, r); err != nil {
				return err
			}
		}
	}
	return nil
}

// committed keeps the batch's rows for the next batches, within limit.
func (t *table[T]) committed() {
	if len(t.cache)+len(t.touched) > t.limit {
		clear(t.cache) // simpler than an LRU, and correct: the cache is only a shortcut
	}
	if t.limit > 0 {
		for name, r := range t.touched {
			t.cache[name] = r
		}
	}
	clear(t.touched)
}

// abandon forgets everything held: a batch mutated rows in place and was
// not committed, so neither they nor the cache match Pebble any more.
func (t *table[T]) abandon() {
	clear(t.cache)
	clear(t.touched)
}

// encoder encodes rows deterministically, as events.Marshal does (compact
// numbers, sorted keys of map[string]string), but with structs as arrays
// (see layout.go), reusing one buffer. msgpack does not sort the keys of
// other maps, so rows hold no other maps (see hosts.go).
type encoder struct {
	buf bytes.Buffer
	enc *msgpack.Encoder
}

func newEncoder() *encoder {
	e := &encoder{}
	e.enc = msgpack.NewEncoder(&e.buf)
	e.enc.SetSortMapKeys(true)
	e.enc.UseCompactInts(true)
	e.enc.UseCompactFloats(true)
	e.enc.UseArrayEncodedStructs(true)
	return e
}

// encode encodes v; the bytes are valid until the next call.
func (e *encoder) encode(v any) ([]byte, error) {
	e.buf.Reset()
	if err := e.enc.Encode(v); err != nil {
		return nil, err
	}
	return e.buf.Bytes(), nil
}

// sortedKeys lists a map's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
