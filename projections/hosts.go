package projections

import (
	"bytes"
	"context"
	"fmt"
	"reflect"
	"slices"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// The hosts read model: one events.HostState per host, folded from the
// decisions on loom.evt.host.<h> (registration, cordons, allocations) and
// from the orphan reports of the host's own agent on loom.obs.<h>.host.<h>.
//
// A host's two maps, its allocations and its orphans, are kept one entry
// per key. An allocation or a release then writes one small key instead of
// rewriting the whole host, and no map with struct values is ever encoded:
// msgpack sorts the keys of map[string]string, but not of those, and a row
// must encode to the same bytes however the map was built. The host row
// holds the rest of the state.
//
// A host row can exist unregistered: its agent reported orphans before
// anyone registered it.

// HostRow is a host with the head of its decision subject.
type HostRow struct {
	State events.HostState
	Head  events.Head
}

// hostMap is one of a host's maps, kept one entry per key under prefix.
type hostMap struct {
	prefix []byte
	// get is the entry of key in h, if there is one.
	get func(h *events.HostState, key string) (any, bool)
	// put decodes an entry into h.
	put func(h *events.HostState, key string, value []byte) error
}

// The host maps, by index.
const (
	allocationsMap = iota
	orphansMap
)

var hostMaps = [...]hostMap{
	allocationsMap: {
		prefix: prefixHostAlloc,
		get: func(h *events.HostState, vm string) (any, bool) {
			a, ok := h.Allocations[vm]
			return &a, ok
		},
		put: func(h *events.HostState, vm string, value []byte) error {
			var a events.Allocation
			if err := events.Unmarshal(value, &a); err != nil {
				return err
			}
			if h.Allocations == nil {
				h.Allocations = map[string]events.Allocation{}
			}
			h.Allocations[vm] = a
			return nil
		},
	},
	orphansMap: {
		prefix: prefixHostOrphan,
		get: func(h *events.HostState, domain string) (any, bool) {
			o, ok := h.Orphans[domain]
			return &o, ok
		},
		put: func(h *events.HostState, domain string, value []byte) error {
			var o events.HostOrphanFound
			if err := events.Unmarshal(value, &o); err != nil {
				return err
			}
			if h.Orphans == nil {
				h.Orphans = map[string]events.HostOrphanFound{}
			}
			h.Orphans[domain] = o
			return nil
		},
	},
}

// hostEntry names one entry of one of a host's maps.
type hostEntry struct {
	m         int
	host, key string
}

func (e hostEntry) dbKey() []byte {
	return append(hostMapPrefix(hostMaps[e.m].prefix, e.host), e.key...)
}

func newHostTable(limit int) *table[events.HostState] {
	t := newTable(prefixHost, limit, blankHost, isBlankHost)
	t.inRow = func(h events.HostState) events.HostState {
		h.Allocations, h.Orphans = nil, nil
		return h
	}
	t.loadRest = loadHostMaps
	return t
}

func blankHost(name string) events.HostState { return events.HostState{Name: name} }

// isBlankHost tells whether h holds nothing but its name.
func isBlankHost(h *events.HostState) bool {
	if len(h.Labels) > 0 || len(h.Allocations) > 0 || len(h.Orphans) > 0 {
		return false
	}
	rest := *h
	rest.Name, rest.Labels, rest.Allocations, rest.Orphans = "", nil, nil, nil
	return reflect.ValueOf(rest).IsZero()
}

func (b *batch) foldHost(rec *events.Record, addr events.Address) error {
	if addr.Observed && addr.Host != addr.ID {
		return rejectf("the agent of %s reported on host %s: an agent reports only on its own host", addr.Host, addr.ID)
	}
	r, err := b.r.hosts.load(b.s.db, addr.ID)
	if err != nil {
		return err
	}
	if err := applyTo(r, rec, (*events.HostState).Apply); err != nil {
		return err
	}
	switch ev := rec.Event.(type) {
	case events.HostAllocated:
		b.hostEntries[hostEntry{allocationsMap, addr.ID, ev.VM}] = struct{}{}
	case events.HostReleased:
		b.hostEntries[hostEntry{allocationsMap, addr.ID, ev.VM}] = struct{}{}
	case events.HostOrphanFound:
		b.hostEntries[hostEntry{orphansMap, addr.ID, ev.Domain}] = struct{}{}
	case events.HostOrphanCleared:
		b.hostEntries[hostEntry{orphansMap, addr.ID, ev.Domain}] = struct{}{}
	}
	return nil
}

// writeHostEntries writes, or deletes, every map entry the batch touched,
// as the host's state now has it, in key order.
func (b *batch) writeHostEntries(pb *pebble.Batch, enc *encoder) error {
	type keyed struct {
		key   []byte
		entry hostEntry
	}
	entries := make([]keyed, 0, len(b.hostEntries))
	for e := range b.hostEntries {
		entries = append(entries, keyed{e.dbKey(), e})
	}
	slices.SortFunc(entries, func(x, y keyed) int { return bytes.Compare(x.key, y.key) })
	for _, e := range entries {
		value, ok := hostMaps[e.entry.m].get(&b.r.hosts.touched[e.entry.host].state, e.entry.key)
		if !ok {
			if err := pb.Delete(e.key, nil); err != nil {
				return err
			}
			continue
		}
		data, err := enc.encode(value)
		if err != nil {
			return fmt.Errorf("encode %q: %w", e.key, err)
		}
		if err := pb.Set(e.key, data, nil); err != nil {
			return err
		}
	}
	return nil
}

// loadHostMaps reads a host's map entries into state, for the runner.
func loadHostMaps(db *pebble.DB, host string, state *events.HostState) error {
	for _, m := range hostMaps {
		prefix := hostMapPrefix(m.prefix, host)
		iter, err := db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
		if err != nil {
			return fmt.Errorf("load %q: %w", prefix, err)
		}
		for valid := iter.First(); valid; valid = iter.Next() {
			value, err := iter.ValueAndErr()
			if err == nil {
				err = m.put(state, string(iter.Key()[len(prefix):]), value)
			}
			if err != nil {
				_ = iter.Close()
				return fmt.Errorf("load %q: %w", iter.Key(), err)
			}
		}
		if err := iter.Close(); err != nil {
			return err
		}
	}
	return nil
}

// Host is the named host and the head of loom.evt.host.<name>; the zero
// state when no event made the host, and the zero Head when its subject is
// empty.
func (s *Store) Host(ctx context.Context, name string) (events.HostState, events.Head, error) {
	var row HostRow
	err := s.read(ctx, func(v *view) error {
		var err error
		row, _, err = v.hostRow(name)
		return err
	})
	return row.State, row.Head, err
}

// Hosts lists every host an event made, registered or not, sorted by name.
func (s *Store) Hosts(ctx context.Context) ([]HostRow, error) {
	var rows []HostRow
	err := s.read(ctx, func(v *view) error {
		var err error
		rows, err = v.hosts()
		return err
	})
	return rows, err
}

// hostRow reads a host's row and maps; found is false, and the state zero,
// when no event made the host.
func (v *view) hostRow(name string) (row HostRow, found bool, err error) {
	value, ok, err := v.get(nameKey(prefixHost, name))
	if err != nil || !ok {
		return HostRow{}, false, err
	}
	if row.State, row.Head, err = decodeRow[events.HostState](value); err != nil {
		return HostRow{}, false, fmt.Errorf("host %s: %w", name, err)
	}
	if err := v.hostMaps(name, &row.State); err != nil {
		return HostRow{}, false, err
	}
	if isBlankHost(&row.State) {
		return HostRow{Head: row.Head}, false, nil
	}
	return row, true, nil
}

func (v *view) hosts() ([]HostRow, error) {
	var names []string
	err := v.scan(prefixHost, func(key, _ []byte) error {
		names = append(names, string(key[len(prefixHost):]))
		return nil
	})
	if err != nil {
		return nil, err
	}
	rows := make([]HostRow, 0, len(names))
	for _, name := range names {
		row, found, err := v.hostRow(name)
		if err != nil {
			return nil, err
		}
		if found {
			rows = append(rows, row)
		}
	}
	return rows, nil
}

// hostMaps reads a host's map entries into state.
func (v *view) hostMaps(host string, state *events.HostState) error {
	for _, m := range hostMaps {
		prefix := hostMapPrefix(m.prefix, host)
		err := v.scan(prefix, func(key, value []byte) error {
			if err := m.put(state, string(key[len(prefix):]), value); err != nil {
				return fmt.Errorf("%q: %w", key, err)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}
