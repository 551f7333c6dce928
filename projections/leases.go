package projections

import (
	"cmp"
	"context"
	"fmt"
	"reflect"
	"slices"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// The leases read model: one events.LeaseState per resource, folded from
// the decisions on all the resource's lease subjects (events/lease.go).
//
// The resource row holds the exclusive grant and the counters; each shared
// grant is a key of its own, so that one more VM reading an image writes
// one small key rather than the list of every reader. Two indexes list the
// grants by the holder's host and by holder, for the list queries and for
// the agents that must hear of a change to what their VMs use:
//
//	v1/lease/<resource>                          head-less rowValue of LeaseState without Shared
//	v1/lease-shared/<part resource><holder>      events.LeaseGrant
//	v1/lease-host/<part host><part resource><part holder><part mode>  empty
//	v1/lease-holder/<part holder><part resource><part mode>  empty

var (
	prefixLease       = []byte(version + "lease/")
	prefixLeaseShared = []byte(version + "lease-shared/")
	prefixLeaseHost   = []byte(version + "lease-host/")
	prefixLeaseHolder = []byte(version + "lease-holder/")
)

// leaseEntry names one grant slot of a resource: its exclusive grant
// (holder empty) or one shared holder's.
type leaseEntry struct {
	resource, holder string
}

func newLeaseTable(limit int) *table[events.LeaseState] {
	t := newTable(prefixLease, limit, blankLease, isBlankLease)
	t.inRow = func(l events.LeaseState) events.LeaseState {
		l.Shared = nil
		return l
	}
	t.loadRest = loadSharedGrants
	return t
}

func blankLease(resource string) events.LeaseState { return events.LeaseState{Resource: resource} }

func isBlankLease(l *events.LeaseState) bool {
	if len(l.Shared) > 0 {
		return false
	}
	rest := *l
	rest.Resource, rest.Shared = "", nil
	return reflect.ValueOf(rest).IsZero()
}

func (b *batch) foldLease(rec *events.Record, addr events.Address) error {
	if _, err := events.ParseResource(addr.ID); err != nil {
		return rejectf("%v", err)
	}
	r, err := b.r.leases.load(b.s.db, addr.ID)
	if err != nil {
		return err
	}
	entry := leaseEntry{resource: addr.ID, holder: addr.Holder}
	if _, ok := b.leaseBefore[entry]; !ok {
		before, _ := slot(&r.state, entry)
		b.leaseBefore[entry] = before
	}
	return applyTo(r, rec, func(l *events.LeaseState, rec *events.Record) error {
		return l.Apply(rec, addr.Holder)
	})
}

// slot is the grant standing in entry's slot of l.
func slot(l *events.LeaseState, e leaseEntry) (events.LeaseGrant, bool) {
	if e.holder == "" {
		return l.Exclusive, l.Exclusive.Epoch != 0
	}
	g, ok := l.Shared[e.holder]
	return g, ok
}

// writeLeaseEntries writes the shared grants and the index keys of every
// slot the batch touched, as the resource's state now has them.
func (b *batch) writeLeaseEntries(pb *pebble.Batch, enc *encoder) error {
	entries := make([]leaseEntry, 0, len(b.leaseBefore))
	for e := range b.leaseBefore {
		entries = append(entries, e)
	}
	slices.SortFunc(entries, func(x, y leaseEntry) int {
		return cmp.Or(cmp.Compare(x.resource, y.resource), cmp.Compare(x.holder, y.holder))
	})
	for _, e := range entries {
		before := b.leaseBefore[e]
		after, ok := slot(&b.r.leases.touched[e.resource].state, e)
		if before.Epoch != 0 && (!ok || before.Host != after.Host || before.ID != after.ID || before.Mode != after.Mode) {
			if err := deleteLeaseIndex(pb, before); err != nil {
				return err
			}
		}
		if ok {
			if err := pb.Set(leaseHostKey(after), nil, nil); err != nil {
				return err
			}
			if err := pb.Set(leaseHolderKey(after), nil, nil); err != nil {
				return err
			}
		}
		if e.holder == "" {
			continue // the exclusive grant lives in the resource's row
		}
		key := sharedGrantKey(e.resource, e.holder)
		if !ok {
			if err := pb.Delete(key, nil); err != nil {
				return err
			}
			continue
		}
		data, err := enc.encode(&after)
		if err != nil {
			return fmt.Errorf("encode %q: %w", key, err)
		}
		if err := pb.Set(key, data, nil); err != nil {
			return err
		}
	}
	return nil
}

func deleteLeaseIndex(pb *pebble.Batch, g events.LeaseGrant) error {
	if err := pb.Delete(leaseHostKey(g), nil); err != nil {
		return err
	}
	return pb.Delete(leaseHolderKey(g), nil)
}

func sharedGrantPrefix(resource string) []byte {
	return appendPart(append([]byte(nil), prefixLeaseShared...), resource)
}

func sharedGrantKey(resource, holder string) []byte {
	return append(sharedGrantPrefix(resource), holder...)
}

func leaseHostPrefix(host string) []byte {
	return appendPart(append([]byte(nil), prefixLeaseHost...), host)
}

// leaseHostKey names the grant's slot, mode included: a holder can stand
// in both of a resource's slots at once (an exclusive grant, and a void
// shared one), and the two must not share an index key.
func leaseHostKey(g events.LeaseGrant) []byte {
	return appendPart(appendPart(appendPart(leaseHostPrefix(g.Host), g.Resource), g.ID), string(g.Mode))
}

func leaseHolderPrefix(holder string) []byte {
	return appendPart(append([]byte(nil), prefixLeaseHolder...), holder)
}

func leaseHolderKey(g events.LeaseGrant) []byte {
	return appendPart(appendPart(leaseHolderPrefix(g.ID), g.Resource), string(g.Mode))
}

// loadSharedGrants reads a resource's shared grants into state.
func loadSharedGrants(db *pebble.DB, resource string, state *events.LeaseState) error {
	prefix := sharedGrantPrefix(resource)
	iter, err := db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: prefixEnd(prefix)})
	if err != nil {
		return fmt.Errorf("load %q: %w", prefix, err)
	}
	defer func() { _ = iter.Close() }()
	for valid := iter.First(); valid; valid = iter.Next() {
		var g events.LeaseGrant
		value, err := iter.ValueAndErr()
		if err == nil {
			err = events.Unmarshal(value, &g)
		}
		if err != nil {
			return fmt.Errorf("load %q: %w", iter.Key(), err)
		}
		if state.Shared == nil {
			state.Shared = map[string]events.LeaseGrant{}
		}
		state.Shared[g.ID] = g
	}
	return iter.Error()
}

// Lease is the lease state of a resource, with every shared grant; the
// zero state (Grants zero) when no grant was ever made on it.
func (s *Store) Lease(ctx context.Context, resource string) (events.LeaseState, error) {
	var state events.LeaseState
	err := s.read(ctx, func(v *view) error {
		var err error
		state, err = v.lease(resource)
		return err
	})
	return state, err
}

// LeaseOf is the lease state of a resource with, of its shared grants,
// only holder's: what a shared grant or the end of one decides on, read
// with two point lookups however many hold the resource.
func (s *Store) LeaseOf(ctx context.Context, resource, holder string) (events.LeaseState, error) {
	var state events.LeaseState
	err := s.read(ctx, func(v *view) error {
		var err error
		state, err = v.leaseOf(resource, holder)
		return err
	})
	return state, err
}

func (v *view) leaseOf(resource, holder string) (events.LeaseState, error) {
	state, found, err := v.leaseRow(resource)
	if err != nil || !found {
		return state, err
	}
	value, ok, err := v.get(sharedGrantKey(resource, holder))
	if err != nil || !ok {
		return state, err
	}
	var g events.LeaseGrant
	if err := events.Unmarshal(value, &g); err != nil {
		return state, fmt.Errorf("lease %s holder %s: %w", resource, holder, err)
	}
	state.Shared = map[string]events.LeaseGrant{holder: g}
	return state, nil
}

// LeaseFilter selects grants; empty fields select everything.
type LeaseFilter struct {
	Resource, Host, Holder string
}

// Leases lists the standing grants that filter selects, void ones
// included (they say so), sorted by resource, then exclusive first, then
// holder.
func (s *Store) Leases(ctx context.Context, filter LeaseFilter) ([]events.LeaseGrant, error) {
	var grants []events.LeaseGrant
	err := s.read(ctx, func(v *view) error {
		var err error
		grants, err = v.leases(filter)
		return err
	})
	return grants, err
}

// leaseRow is a resource's row: its state without the shared grants.
func (v *view) leaseRow(resource string) (state events.LeaseState, found bool, err error) {
	state = events.LeaseState{Resource: resource}
	value, ok, err := v.get(nameKey(prefixLease, resource))
	if err != nil || !ok {
		return state, false, err
	}
	if state, _, err = decodeRow[events.LeaseState](value); err != nil {
		return state, false, fmt.Errorf("lease %s: %w", resource, err)
	}
	return state, true, nil
}

func (v *view) lease(resource string) (events.LeaseState, error) {
	state, found, err := v.leaseRow(resource)
	if err != nil || !found {
		return state, err
	}
	prefix := sharedGrantPrefix(resource)
	err = v.scan(prefix, func(_, value []byte) error {
		var g events.LeaseGrant
		if err := events.Unmarshal(value, &g); err != nil {
			return fmt.Errorf("lease %s: %w", resource, err)
		}
		if state.Shared == nil {
			state.Shared = map[string]events.LeaseGrant{}
		}
		state.Shared[g.ID] = g
		return nil
	})
	return state, err
}

func (v *view) leases(f LeaseFilter) ([]events.LeaseGrant, error) {
	var resources []string
	switch {
	case f.Resource != "":
		resources = []string{f.Resource}
	case f.Host != "" || f.Holder != "":
		prefix, skip := leaseHostPrefix(f.Host), 0
		if f.Host == "" {
			prefix = leaseHolderPrefix(f.Holder)
		}
		skip = len(prefix)
		err := v.scan(prefix, func(key, _ []byte) error {
			resource, _, err := readPart(key[skip:])
			if err != nil {
				return fmt.Errorf("lease index %q: %w", key, err)
			}
			if len(resources) == 0 || resources[len(resources)-1] != resource {
				resources = append(resources, resource)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	default:
		err := v.scan(prefixLease, func(key, _ []byte) error {
			resources = append(resources, string(key[len(prefixLease):]))
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	var grants []events.LeaseGrant
	for _, resource := range resources {
		l, err := v.lease(resource)
		if err != nil {
			return nil, err
		}
		for _, g := range l.Standing() {
			if (f.Host == "" || g.Host == f.Host) && (f.Holder == "" || g.ID == f.Holder) {
				grants = append(grants, g)
			}
		}
	}
	return grants, nil
}
