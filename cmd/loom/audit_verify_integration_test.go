//go:build integration

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/internal/eventually"
)

// TestCLI_AuditVerify_CatchesDoctoredCopies is issue 5's tamper evidence
// on a real history: loom up seals as it runs; an auditor pins the
// original with loom audit verify; copies of its export, doctored each way
// the issue lists, fail and name the first bad event; the untouched
// original passes with the same pin; a wrong key fails loudly.
func TestCLI_AuditVerify_CatchesDoctoredCopies(t *testing.T) {
	fleet := startFleet(t)
	dir, loom, must := fleet.dir, fleet.loom, fleet.must
	pub := filepath.Join(dir, "seal.pub")
	pin := filepath.Join(dir, "auditor", "pin.json")
	if err := os.MkdirAll(filepath.Dir(pin), 0o700); err != nil {
		t.Fatal(err)
	}
	sealed := func() {
		t.Helper()
		eventually.WaitFor(t, 30*time.Second, "the history sealed", func() error {
			out, err := loom("audit", "verify", "--key", pub, "-o", "json")
			var r audit.Report
			if jerr := json.Unmarshal([]byte(out), &r); jerr != nil {
				return errors.Join(err, jerr)
			}
			if !r.OK() {
				t.Fatalf("the live history does not verify: %v", r.Problems)
			}
			if r.Unsealed > 1 { // the last seal itself waits for the next one
				return errors.New("unsealed: " + out)
			}
			return nil
		})
	}

	must("vm", "create", "web-1", "--image", "demo", "--cpu", "1", "--mem", "256", "--wait", "30s")
	must("vm", "create", "web-2", "--image", "demo", "--cpu", "1", "--mem", "256", "--wait", "30s")
	sealed()
	older := filepath.Join(dir, "older.jsonl")
	must("audit", "export", "--out", older)
	must("vm", "stop", "web-1", "--wait", "30s")
	must("vm", "delete", "web-2", "--wait", "30s")
	sealed()
	if out := must("audit", "verify", "--key", pub, "--pin", pin); !strings.Contains(out, "pinned") {
		t.Fatalf("first verify did not pin:\n%s", out)
	}
	original := filepath.Join(dir, "original.jsonl")
	must("audit", "export", "--out", original)
	if out := must("audit", "verify", "--key", pub, "--pin", pin, "--file", original); !strings.Contains(out, "verified against") {
		t.Fatalf("the original export does not verify against the pin:\n%s", out)
	}

	lines := readLines(t, original)
	webCreated := findLine(t, lines, "vm.created", "web-1")
	tests := []struct {
		name   string
		doctor func([]exportLine) []exportLine
		// firstBad is the sequence verify must name; 0 accepts any.
		firstBad uint64
	}{
		{"one event changed", func(l []exportLine) []exportLine {
			l[webCreated].Raw = withActor(t, l[webCreated].Raw, "mallory")
			return l
		}, l0(lines, webCreated)},
		{"one event removed", func(l []exportLine) []exportLine {
			return slices.Delete(l, webCreated, webCreated+1)
		}, l0(lines, webCreated)},
		{"two events swapped", func(l []exportLine) []exportLine {
			a, b := webCreated, webCreated+1
			l[a].Subject, l[b].Subject = l[b].Subject, l[a].Subject
			l[a].Header, l[b].Header = l[b].Header, l[a].Header
			l[a].Raw, l[b].Raw = l[b].Raw, l[a].Raw
			return l
		}, 0},
		{"a subject dropped", func(l []exportLine) []exportLine {
			return slices.DeleteFunc(l, func(x exportLine) bool { return x.Subject == "loom.evt.vm.web-2" })
		}, firstOn(lines, "loom.evt.vm.web-2")},
		{"the tail cut", func(l []exportLine) []exportLine {
			return l[:len(l)-3]
		}, 0},
		{"an older copy restored", func([]exportLine) []exportLine {
			return readLines(t, older)
		}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			copied := filepath.Join(t.TempDir(), "doctored.jsonl")
			writeLines(t, copied, tt.doctor(slices.Clone(lines)))
			out, err := loom("audit", "verify", "--key", pub, "--pin", pin, "--file", copied, "-o", "json")
			var fault *events.Fault
			if !errors.As(err, &fault) {
				t.Fatalf("verify passed a doctored copy (%v):\n%s", err, out)
			}
			var r audit.Report
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatal(err)
			}
			bad, _ := r.FirstBad()
			if tt.firstBad != 0 && bad.Seq != tt.firstBad {
				t.Fatalf("first bad = %v, want sequence %d\n%v", bad, tt.firstBad, r.Problems)
			}
			t.Logf("caught: %v", bad)
		})
	}
	if out := must("audit", "verify", "--key", pub, "--pin", pin, "--file", original); !strings.Contains(out, "verified against") {
		t.Fatalf("the original export no longer verifies:\n%s", out)
	}

	// A verify with another public key than the control plane's fails,
	// naming both keys.
	other := filepath.Join(dir, "other", "seal.key")
	if _, _, err := audit.EnsureKey(other); err != nil {
		t.Fatal(err)
	}
	out, err := loom("audit", "verify", "--key", audit.PublicPath(other))
	var fault *events.Fault
	if !errors.As(err, &fault) || fault.Code != events.CodeUnknownKey {
		t.Fatalf("verify with the wrong key: %v\n%s", err, out)
	}
}

// fleet is a loom up of two simulated hosts that seals every 100 ms, and
// the verbs against it with its credentials.
type fleet struct {
	t        *testing.T
	dir, url string
}

func startFleet(t *testing.T) *fleet {
	t.Helper()
	dir, err := shortTempDir(t)
	if err != nil {
		t.Fatal(err)
	}
	return &fleet{t: t, dir: dir, url: startUp(t, dir, "--seal-every", "100ms")}
}

// loom runs a verb and returns what it printed.
func (f *fleet) loom(args ...string) (string, error) {
	var out lockedBuffer
	err := execute(f.t.Context(), &out, append([]string{"--nats", f.url, "--creds", filepath.Join(f.dir, "creds")}, args...)...)
	return out.String(), err
}

// must runs a verb that must succeed.
func (f *fleet) must(args ...string) string {
	f.t.Helper()
	out, err := f.loom(args...)
	if err != nil {
		f.t.Fatalf("loom %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// startUp runs loom up with two simulated hosts in dir until the test
// ends, and returns its NATS URL.
func startUp(t *testing.T, dir string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var out lockedBuffer
	done := make(chan error, 1)
	go func() {
		done <- execute(ctx, &out, append([]string{"up", "--data-dir", dir, "--listen", "127.0.0.1:0", "--http", "", "--hosts", "2"}, args...)...)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("loom up ended with %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("loom up did not stop in 60s")
		}
	})
	return waitForURL(t, &out, done)
}

func readLines(t *testing.T, path string) []exportLine {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines []exportLine
	scanner := bufio.NewScanner(f)
	scanner.Buffer(nil, 16<<20)
	for scanner.Scan() {
		var l exportLine
		if err := json.Unmarshal(scanner.Bytes(), &l); err != nil {
			t.Fatal(err)
		}
		lines = append(lines, l)
	}
	if err := scanner.Err(); err != nil {
		t.Fatal(err)
	}
	return lines
}

func writeLines(t *testing.T, path string, lines []exportLine) {
	t.Helper()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	for _, l := range lines {
		if err := enc.Encode(l); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// findLine is the index of the first line of type typ about id.
func findLine(t *testing.T, lines []exportLine, typ events.Type, id string) int {
	t.Helper()
	for i, l := range lines {
		if l.Envelope.Type == typ && l.Envelope.AggregateID == id {
			return i
		}
	}
	t.Fatalf("no %s of %s in the export", typ, id)
	return 0
}

func l0(lines []exportLine, i int) uint64 { return lines[i].Seq }

func firstOn(lines []exportLine, subject string) uint64 {
	for _, l := range lines {
		if l.Subject == subject {
			return l.Seq
		}
	}
	return 0
}

// withActor re-encodes an event with another actor: a change that still
// decodes.
func withActor(t *testing.T, raw []byte, actor string) []byte {
	t.Helper()
	var env events.Envelope
	if err := events.Unmarshal(raw, &env); err != nil {
		t.Fatal(err)
	}
	env.Actor = actor
	out, err := events.Marshal(&env)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
