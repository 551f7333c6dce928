package agents

import (
	"context"
	"sync"
	"time"
)

// orphanScanKey is the queue key of the orphan scan. '#' never appears in a
// VM name, so it cannot collide with one.
const orphanScanKey = "#orphans"

// queue hands keys (VM names, and orphanScanKey) to workers so that no key
// is worked on by two workers at once, while different keys proceed in
// parallel. A key added while a worker holds it runs again after the worker
// is done; a key added several times before it runs runs once.
type queue struct {
	mu sync.Mutex // guards the fields below
	// waiting holds keys to run and the earliest time each may run.
	waiting map[string]time.Time
	// busy holds the keys workers are running.
	busy map[string]bool
	// changed is closed (and replaced) whenever waiting or busy changes.
	changed chan struct{}
}

func newQueue() *queue {
	return &queue{waiting: map[string]time.Time{}, busy: map[string]bool{}, changed: make(chan struct{})}
}

// add queues key to run at at (the zero time: now). A key already waiting
// keeps the earlier of its two times.
func (q *queue) add(key string, at time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if have, ok := q.waiting[key]; ok && !have.After(at) {
		return
	}
	q.waiting[key] = at
	q.notifyLocked()
}

// next blocks until a key is due and no other worker holds it, and hands it
// out; the caller must call done with it. It returns false when ctx ends.
func (q *queue) next(ctx context.Context) (string, bool) {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		q.mu.Lock()
		key, wait, found := q.pickLocked(time.Now())
		if found && wait <= 0 {
			delete(q.waiting, key)
			q.busy[key] = true
			q.mu.Unlock()
			return key, true
		}
		changed := q.changed
		q.mu.Unlock()

		var due <-chan time.Time
		if found {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			due = timer.C
		}
		select {
		case <-ctx.Done():
			return "", false
		case <-changed:
		case <-due:
		}
	}
}

// pickLocked finds the runnable key due first (ties by name, so the order is
// deterministic) and how long until it is due.
func (q *queue) pickLocked(now time.Time) (key string, wait time.Duration, found bool) {
	var best time.Time
	for k, at := range q.waiting {
		if q.busy[k] {
			continue
		}
		if !found || at.Before(best) || (at.Equal(best) && k < key) {
			key, best, found = k, at, true
		}
	}
	if !found {
		return "", 0, false
	}
	return key, best.Sub(now), true
}

// done releases a key handed out by next.
func (q *queue) done(key string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.busy, key)
	q.notifyLocked()
}

// notifyLocked wakes every worker waiting in next.
func (q *queue) notifyLocked() {
	close(q.changed)
	q.changed = make(chan struct{})
}
