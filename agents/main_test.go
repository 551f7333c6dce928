package agents

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := checkLeaks(10 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			code = 1
		}
	}
	os.Exit(code)
}

// checkLeaks waits up to timeout for every goroutine running code of the
// agent or its libvirt adapter to end, and describes those that do not.
func checkLeaks(timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		leaked := leakedGoroutines()
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

func leakedGoroutines() [][]byte {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out [][]byte
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		ours := bytes.Contains(g, []byte("github.com/loomctl/loom/agents"))
		checker := bytes.Contains(g, []byte("agents.TestMain")) || bytes.Contains(g, []byte("agents.leakedGoroutines"))
		if ours && !checker {
			out = append(out, g)
		}
	}
	return out
}
