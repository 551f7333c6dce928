package agents

import (
	"sync"
	"time"

	"github.com/loomctl/loom/events"
)

// fence is the agent's fencing deadline (DESIGN "Liveness and time"): after
// each acknowledged renewal it is s + TTL - m_a, where s is this process's
// monotonic time just before the renewal was sent and m_a is
// Config.FenceMargin. Past it, the control plane may be about to declare the
// host lost, so the agent starts and resumes no domain until a renewal is
// acknowledged again. Only this process's clock is read: time.Now carries a
// monotonic reading, which is what comparisons use.
type fence struct {
	mu       sync.Mutex
	deadline time.Time
	// first closes at the first acknowledged renewal.
	first chan struct{}
	once  sync.Once
	// off switches the fence off, for the test that shows what it guards.
	off bool
}

func newFence() *fence { return &fence{first: make(chan struct{})} }

// extend moves the deadline to d, never back.
func (f *fence) extend(d time.Time) {
	f.mu.Lock()
	if d.After(f.deadline) {
		f.deadline = d
	}
	f.mu.Unlock()
	f.once.Do(func() { close(f.first) })
}

// check returns nil while the deadline lies ahead of now, and a fenced
// fault once it has passed (or before the first renewal was acknowledged).
func (f *fence) check(now time.Time) *events.Fault {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.off || now.Before(f.deadline) {
		return nil
	}
	if f.deadline.IsZero() {
		return events.Errorf(events.CodeFenced, "no liveness renewal acknowledged yet: starting nothing")
	}
	// The same words each time: an agent reports on change only, and a
	// fenced VM is retried until the fence lifts.
	return events.Errorf(events.CodeFenced, "fencing deadline passed with no liveness renewal acknowledged since: starting and resuming nothing")
}
