package handlers

import (
	"context"
	"fmt"
	"sync"

	"github.com/loomctl/loom/events"
)

// entry is one cached aggregate: its state and where its subject stands.
type entry[S any] struct {
	state S
	head  events.Head
}

// table is a write-through cache of one kind of aggregate. It is filled from
// the Reader and advanced by this process's own appends, so back-to-back
// commands on one aggregate do not wait for the read model. It may be stale
// with respect to other writers; appends are checked against the subject's
// last sequence, and a conflict drops the entry.
//
// States are folded in place (a host's allocation map grows with every
// create; copying it on each append would cost more than the append), so a
// cached state is only read inside view, under mu.
type table[S any] struct {
	kind events.Kind
	// load reads an aggregate from the Reader.
	load func(ctx context.Context, id string) (S, events.Head, error)
	// apply folds one event into a state in place.
	apply func(state *S, rec *events.Record) error
	// keep tells whether a state may stay cached; nil keeps every state.
	keep func(state *S) bool
	// max bounds the entries; 0 is unbounded.
	max int

	mu      sync.Mutex // guards entries and the states in them
	entries map[string]*entry[S]
}

func newTable[S any](kind events.Kind, max int, load func(context.Context, string) (S, events.Head, error),
	apply func(*S, *events.Record) error, keep func(*S) bool) *table[S] {
	return &table[S]{kind: kind, max: max, load: load, apply: apply, keep: keep, entries: map[string]*entry[S]{}}
}

// view runs f on the entry of id, loading it from the Reader first when it is
// not cached. f runs under the table's lock: it must be quick and must not
// keep references into the state.
func (t *table[S]) view(ctx context.Context, id string, f func(state *S, head events.Head)) error {
	t.mu.Lock()
	if e, ok := t.entries[id]; ok {
		f(&e.state, e.head)
		t.mu.Unlock()
		return nil
	}
	t.mu.Unlock()
	state, head, err := t.load(ctx, id)
	if err != nil {
		return fmt.Errorf("read %s %s: %w", t.kind, id, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.storeLocked(id, state, head)
	f(&e.state, e.head)
	return nil
}

// refresh reloads id from the Reader and keeps it if it is newer than what
// is cached: it picks up other writers' events without waiting for a
// conflict.
func (t *table[S]) refresh(ctx context.Context, id string) error {
	state, head, err := t.load(ctx, id)
	if err != nil {
		return fmt.Errorf("read %s %s: %w", t.kind, id, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.storeLocked(id, state, head)
	return nil
}

// storeLocked keeps the fresher of the cached and the loaded entry and
// returns it.
func (t *table[S]) storeLocked(id string, state S, head events.Head) *entry[S] {
	if e, ok := t.entries[id]; ok && e.head.Seq >= head.Seq {
		return e
	}
	e := &entry[S]{state: state, head: head}
	if t.keep != nil && !t.keep(&e.state) {
		delete(t.entries, id)
		return e
	}
	t.entries[id] = e
	if t.max > 0 && len(t.entries) > t.max {
		for other := range t.entries { // an arbitrary victim: a reload is always safe
			if other != id {
				delete(t.entries, other)
				break
			}
		}
	}
	return e
}

// advance folds an event this process appended with expected head into the
// cached entry. If the entry is gone or stands elsewhere, it is dropped: the
// next read loads it.
func (t *table[S]) advance(id string, expected events.Head, rec *events.Record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.entries[id]
	if !ok {
		return
	}
	if e.head.Seq != expected.Seq || t.apply(&e.state, rec) != nil {
		delete(t.entries, id)
		return
	}
	e.head = events.Head{Seq: rec.Seq, Hash: events.Hash(rec.Data)}
	if t.keep != nil && !t.keep(&e.state) {
		delete(t.entries, id)
	}
}

// drop forgets id.
func (t *table[S]) drop(id string) {
	t.mu.Lock()
	delete(t.entries, id)
	t.mu.Unlock()
}

// each runs f on every cached entry, under the table's lock.
func (t *table[S]) each(f func(id string, state *S)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id, e := range t.entries {
		f(id, &e.state)
	}
}

// missing are the ids not cached.
func (t *table[S]) missing(ids []string) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for _, id := range ids {
		if _, ok := t.entries[id]; !ok {
			out = append(out, id)
		}
	}
	return out
}

// locker serializes decisions per aggregate within the process, so that
// concurrent commands on one aggregate queue up here instead of storming the
// stream with appends that lose the sequence check. Other replicas are kept
// out by that check, not by this lock.
type locker struct {
	mu   sync.Mutex // guards held
	held map[string]*keyLock
}

// keyLock is one aggregate's lock: a token in a channel, so that a waiter can
// give up when its context ends.
type keyLock struct {
	token chan struct{}
	refs  int // goroutines holding or waiting; guarded by locker.mu
}

// lock takes the lock of key, or returns ctx's error.
func (l *locker) lock(ctx context.Context, key string) (unlock func(), err error) {
	l.mu.Lock()
	if l.held == nil {
		l.held = map[string]*keyLock{}
	}
	k := l.held[key]
	if k == nil {
		k = &keyLock{token: make(chan struct{}, 1)}
		l.held[key] = k
	}
	k.refs++
	l.mu.Unlock()
	release := func() {
		l.mu.Lock()
		k.refs--
		if k.refs == 0 {
			delete(l.held, key)
		}
		l.mu.Unlock()
	}
	select {
	case k.token <- struct{}{}:
		return func() { <-k.token; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}
