// Package leakcheck fails a test binary whose own goroutines outlive its
// tests. Only goroutines running code of the package under test count:
// an embedded NATS server or Pebble may finish shutting down a moment
// later, and that is theirs to test.
package leakcheck

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"
)

// Timeout is how long goroutines get to end after the last test.
const Timeout = 10 * time.Second

// Main runs m's tests; if they pass, it waits up to Timeout for every
// goroutine whose stack names code under the import path prefix to end,
// and fails the binary, printing their stacks, if some do not. Call it
// from TestMain.
func Main(m *testing.M, prefix string) {
	code := m.Run()
	if code == 0 {
		if err := wait(prefix, Timeout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

func wait(prefix string, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		leaked := running(prefix)
		if len(leaked) == 0 {
			return nil
		}
		select {
		case <-deadline.C:
			return fmt.Errorf("%d goroutines leaked:\n\n%s", len(leaked), bytes.Join(leaked, []byte("\n\n")))
		case <-tick.C:
		}
	}
}

// running lists the stacks of goroutines in code under prefix, except the
// one running Main.
func running(prefix string) [][]byte {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out [][]byte
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte(prefix)) && !bytes.Contains(g, []byte("leakcheck.Main")) {
			out = append(out, g)
		}
	}
	return out
}
