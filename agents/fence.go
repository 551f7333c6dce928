package agents

import (
	"sync"
	"time"

	"github.com/loomctl/loom/events"
)

// fence is the agent's fencing deadline (DESIGN "Liveness and time"): after
// each acknowledged renewal it is s + TTL - m_a, where s is this machine's
// CLOCK_BOOTTIME just before the renewal was sent and m_a is
// Config.FenceMargin. Past it, the control plane may be about to declare the
// host lost, so the agent starts and resumes no domain, and pauses those
// running, until a renewal is acknowledged again. Only this machine's clock
// is read, never compared with another's.
type fence struct {
	mu sync.Mutex
	// deadline is a CLOCK_BOOTTIME reading (BootNanos); zero before the
	// first acknowledged renewal.
	deadline int64
	// first closes at the first acknowledged renewal.
	first chan struct{}
	once  sync.Once
	// extended receives a token whenever the deadline moves.
	extended chan struct{}
	// off switches the fence off (Unsafe.NoFence), for the tests that show
	// what it guards.
	off bool
}

func newFence() *fence {
	return &fence{first: make(chan struct{}), extended: make(chan struct{}, 1)}
}

// extend moves the deadline to d, never back.
func (f *fence) extend(d int64) {
	f.mu.Lock()
	moved := d > f.deadline
	if moved {
		f.deadline = d
	}
	f.mu.Unlock()
	f.once.Do(func() { close(f.first) })
	if moved {
		select {
		case f.extended <- struct{}{}:
		default:
		}
	}
}

// current is the deadline.
func (f *fence) current() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.deadline
}

// check returns nil while the deadline lies ahead of now (a BootNanos
// reading), and a fenced fault once it has passed (or before the first
// renewal was acknowledged).
func (f *fence) check(now int64) *events.Fault {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.off || now < f.deadline {
		return nil
	}
	if f.deadline == 0 {
		return events.Errorf(events.CodeFenced, "no liveness renewal acknowledged yet: starting nothing")
	}
	// The same words each time: an agent reports on change only, and a
	// fenced VM is retried until the fence lifts.
	return events.Errorf(events.CodeFenced, "fencing deadline passed with no liveness renewal acknowledged since: starting and resuming nothing")
}

// wait blocks until the deadline passes (true) or ctx ends (false). A
// deadline extended meanwhile is waited for in turn.
func (f *fence) wait(stop <-chan struct{}) bool {
	for {
		d := f.current()
		left := untilBoot(d, BootNanos)
		if left <= 0 {
			return true
		}
		t := time.NewTimer(left)
		select {
		case <-stop:
			t.Stop()
			return false
		case <-f.extended:
			t.Stop()
		case <-t.C:
		}
	}
}

// waitExtended blocks until the deadline lies ahead again (true) or stop
// closes (false).
func (f *fence) waitExtended(stop <-chan struct{}) bool {
	for untilBoot(f.current(), BootNanos) <= 0 {
		select {
		case <-stop:
			return false
		case <-f.extended:
		}
	}
	return true
}
