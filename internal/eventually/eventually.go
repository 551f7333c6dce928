// Package eventually waits, in tests, for a condition to come true: the
// wait-for-condition every package's tests use instead of a sleep.
package eventually

import (
	"fmt"
	"testing"
	"time"
)

// poll is how often a condition is looked at.
const poll = 5 * time.Millisecond

// Wait polls cond until it returns nil, and fails the test with cond's last
// error once timeout has passed.
func Wait(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("still not true after %s: %v", timeout, err)
		case <-tick.C:
		}
	}
}

// WaitFor is Wait, with what is awaited named in the failure.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	Wait(t, timeout, func() error {
		if err := cond(); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	})
}
