//go:build integration

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// TestCLI_UpCreateGetTail is issue 2's "done when", through the binary's own
// verbs: loom up (embedded NATS, control plane, simulated hosts on real
// libvirtd), then vm create --wait, vm get and events tail as a person runs
// them.
func TestCLI_UpCreateGetTail(t *testing.T) {
	dir, err := shortTempDir(t)
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := freeAddr(t)
	// Alice has an identity of her own; loom up keeps it.
	var initOut lockedBuffer
	if err := execute(t.Context(), &initOut, "init", "--data-dir", dir, "--client", "alice"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	var upOut lockedBuffer
	upDone := make(chan error, 1)
	go func() {
		upDone <- execute(ctx, &upOut, "up", "--data-dir", dir, "--listen", "127.0.0.1:0", "--http", httpAddr, "--hosts", "2")
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-upDone:
			if err != nil {
				t.Errorf("loom up ended with %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("loom up did not stop in 60s")
		}
	})
	url := waitForURL(t, &upOut, upDone)

	loom := func(args ...string) string {
		t.Helper()
		var out lockedBuffer
		if err := execute(t.Context(), &out, append([]string{"--nats", url, "--creds", filepath.Join(dir, "creds")}, args...)...); err != nil {
			t.Fatalf("loom %s: %v\n%s", strings.Join(args, " "), err, out.String())
		}
		return out.String()
	}
	// The actor recorded is the identity the server attests: hers, whatever
	// she says (--actor), and the shared client's, with what it says
	// after it.
	alice := filepath.Join(dir, "creds", "client-alice.nk")
	created := loom("--creds", alice, "vm", "create", "web-1", "--actor", "", "--image", "demo", "--cpu", "1", "--mem", "256", "--wait", "30s")
	if !strings.Contains(created, "web-1 converged: running on host-") {
		t.Fatalf("vm create --wait printed:\n%s", created)
	}

	var vm events.VMView
	if err := json.Unmarshal([]byte(loom("vm", "get", "web-1", "-o", "json")), &vm); err != nil {
		t.Fatal(err)
	}
	if !vm.Converged || vm.Observed.State != events.ObservedRunning || vm.Desired != events.DesiredRunning || vm.CreatedBy != "client-alice" {
		t.Fatalf("vm get = %+v, want running, converged, created by client-alice", vm)
	}
	loom("--creds", alice, "image", "register", "claimed", "--source", "/nonexistent.qcow2", "--actor", "bob")
	loom("image", "register", "shared", "--source", "/nonexistent.qcow2", "--actor", "bob")
	claims := loom("events", "tail", "--no-follow", "--type", "image.registered")
	if !strings.Contains(claims, "by client-alice/bob") || !strings.Contains(claims, "by client/bob") {
		t.Errorf("events of alice and of the shared client, each saying bob:\n%s", claims)
	}
	table := loom("vm", "get", "web-1")
	for _, want := range []string{"converged             true", "observed              running", "leases                image/demo shared@"} {
		if !strings.Contains(table, want) {
			t.Errorf("vm get table lacks %q:\n%s", want, table)
		}
	}

	// The VM runs under its leases: shared on the image, exclusive on
	// its disk, both on its host; another holder is refused the disk.
	leases := loom("lease", "list", "--host", vm.Host)
	for _, l := range vm.Leases {
		row := regexp.MustCompile(regexp.QuoteMeta(l.Resource) + `\s+` + string(l.Mode) + `\s+` + strconv.FormatUint(l.Epoch, 10) + `\s+web-1\s+` + vm.UID + `\s+` + vm.Host + `\s+held`)
		if !row.MatchString(leases) {
			t.Errorf("lease list lacks %s %s %d on %s:\n%s", l.Resource, l.Mode, l.Epoch, vm.Host, leases)
		}
	}
	if len(vm.Leases) != 2 {
		t.Errorf("vm get shows leases %+v, want two", vm.Leases)
	}
	var discard lockedBuffer
	err = execute(t.Context(), &discard, "--nats", url, "--creds", filepath.Join(dir, "creds"), "lease", "acquire", "disk/web-1", "--holder", "web-2", "--host", vm.Host)
	if err == nil || !strings.Contains(err.Error(), "lease_held") || !strings.Contains(err.Error(), "VM web-1") {
		t.Errorf("a second holder asking for web-1's disk: %v", err)
	}

	// The story, in stream order: decided, placed, observed.
	story := loom("events", "tail", "--no-follow", "--type", "vm.created,host.allocated,vm.placed,vm.observed")
	if mine := loom("events", "tail", "--no-follow", "--actor", "client-alice"); strings.Count(mine, "by client-alice") != 6 || strings.Contains(mine, "agent:") {
		t.Errorf("events tail --actor client-alice:\n%s", mine)
	}
	order := regexp.MustCompile(`(?s)vm\.created .*by client-alice.*host\.allocated .*vm\.placed .*host-\d.*vm\.observed .*by agent:host-\d.*"state":"running"`)
	onHost := loom("events", "tail", "--no-follow", "--host", vm.Host)
	for _, want := range []string{"host.registered", "host.allocated", "vm.observed", "vm.placed", "lease.granted"} {
		if !strings.Contains(onHost, want) || strings.Contains(onHost, "vm.created") {
			t.Errorf("events tail --host %s lacks %s or shows another subject's events:\n%s", vm.Host, want, onHost)
		}
	}
	for i, line := range strings.Split(strings.TrimSpace(loom("events", "tail", "--no-follow", "--json")), "\n") {
		var ev struct {
			Seq      uint64          `json:"seq"`
			Envelope events.Envelope `json:"envelope"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil || ev.Seq != uint64(i+1) || ev.Envelope.Type == "" {
			t.Fatalf("events tail --json line %d = %q (%v), want event %d", i, line, err, i+1)
		}
	}
	if !order.MatchString(story) {
		t.Fatalf("events tail does not tell the story:\n%s\nall of it:\n%s", story, loom("events", "tail", "--no-follow"))
	}
	// One VM's whole history: its decisions and its host's reports, and
	// nothing of any other subject.
	history := loom("events", "history", "vm/web-1")
	if !regexp.MustCompile(`(?s)vm\.created .*vm\.placed .*vm\.observed`).MatchString(history) ||
		strings.Contains(history, "host.allocated") || strings.Contains(history, "lease.granted") {
		t.Fatalf("events history vm/web-1:\n%s", history)
	}

	// An auditor's copy: every message, once, in order, resumed after a
	// crash that cut its last line short.
	exported := filepath.Join(t.TempDir(), "history.jsonl")
	loom("audit", "export", "--out", exported)
	loom("vm", "stop", "web-1", "--wait", "30s")
	f, err := os.OpenFile(exported, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(`{"seq":99999,"subj`); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	loom("audit", "export", "--out", exported)
	data, err := os.ReadFile(exported)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	for i, line := range lines {
		var ev struct {
			Seq uint64 `json:"seq"`
			Raw []byte `json:"raw"`
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil || ev.Seq != uint64(i+1) {
			t.Fatalf("exported line %d = %q (%v), want sequence %d", i, line, err, i+1)
		}
		if _, err := events.DecodeRecord(ev.Seq, "loom.evt.x.y", time.Now(), ev.Raw); err != nil {
			t.Fatalf("exported line %d: its stored bytes do not decode: %v", i, err)
		}
	}
	if !strings.Contains(lines[len(lines)-1], "vm.observed") && !strings.Contains(string(data), `"type":"vm.goal_changed"`) {
		t.Fatalf("the second export did not bring the stop: %s", lines[len(lines)-1])
	}

	// What an operator's probes see.
	if body := httpGet(t, "http://"+httpAddr+"/readyz"); !strings.HasPrefix(body, "ready: read models at ") {
		t.Errorf("/readyz = %q", body)
	}
	metrics := httpGet(t, "http://"+httpAddr+"/metrics")
	for _, want := range []string{`loom_handlers_commands_total{outcome="ok",subject="loom.cmd.vm.create"} 1`, "loom_projections_"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	// loom up is locked down: each of its parts ran as its own identity and
	// was refused nothing, and a connection without credentials gets in
	// nowhere, told what to give.
	if n := plane.Refusals(); n != 0 {
		t.Errorf("the server refused loom up's own identities %d times: a role lacks a right its job needs", n)
	}
	var out lockedBuffer
	err = execute(t.Context(), &out, "--nats", url, "--creds", "", "vm", "list")
	if err == nil || !strings.Contains(err.Error(), "--tls-ca") {
		t.Errorf("vm list without the CA: %v", err)
	}
	err = execute(t.Context(), &out, "--nats", url, "--creds", "", "--tls-ca", filepath.Join(dir, "creds", "ca.pem"), "vm", "list")
	if err == nil || !strings.Contains(err.Error(), "Authorization") || !strings.Contains(err.Error(), "--creds") {
		t.Errorf("vm list without credentials: %v", err)
	}
	// Another Loom's credentials: the message names the identity, says the
	// server does not know its key, and prints no secret.
	strangerDir := filepath.Join(t.TempDir(), "creds")
	if _, err := plane.InitCreds(strangerDir, nil, nil); err != nil {
		t.Fatal(err)
	}
	stranger := plane.CredsFile(strangerDir, "client")
	err = execute(t.Context(), &out, "--nats", url, "--creds", stranger, "--tls-ca", filepath.Join(dir, "creds", "ca.pem"), "vm", "list")
	seed, _ := os.ReadFile(stranger)
	if err == nil || !strings.Contains(err.Error(), "identity client ("+stranger+")") || !strings.Contains(err.Error(), "does not know this identity's key") ||
		strings.Contains(err.Error()+out.String(), strings.TrimSpace(string(seed))) {
		t.Errorf("vm list with another Loom's credentials: %v", err)
	}
	// A client's credentials do not read the event stream.
	err = execute(t.Context(), &out, "--nats", url, "--creds", filepath.Join(dir, "creds", "client.nk"), "--timeout", "2s", "events", "tail", "--no-follow")
	if err == nil {
		t.Errorf("events tail as a client read the stream:\n%s", out.String())
	}
}

// freeAddr is a loopback address with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// httpGet returns the body of a 200 answer to GET url.
func httpGet(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %v\n%s", url, resp.StatusCode, err, body)
	}
	return string(body)
}

// execute runs the loom binary's root command in-process.
func execute(ctx context.Context, out *lockedBuffer, args ...string) error {
	root := newRoot()
	root.SetArgs(args)
	root.SetOut(out)
	root.SetErr(out)
	return root.ExecuteContext(ctx)
}

// waitForURL waits for loom up to say where NATS is.
func waitForURL(t *testing.T, out *lockedBuffer, done <-chan error) string {
	t.Helper()
	re := regexp.MustCompile(`NATS\s+((?:nats|tls)://\S+)`)
	deadline := time.After(60 * time.Second)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if m := re.FindStringSubmatch(out.String()); m != nil {
			return m[1]
		}
		select {
		case err := <-done:
			t.Fatalf("loom up ended before it was up: %v\n%s", err, out.String())
		case <-deadline:
			t.Fatalf("loom up not up in 60s:\n%s", out.String())
		case <-tick.C:
		}
	}
}

// shortTempDir is a temporary directory under /tmp: libvirtd's socket path
// inside it must fit in 107 bytes, which t.TempDir's long names may not.
func shortTempDir(t *testing.T) (string, error) {
	dir, err := os.MkdirTemp("/tmp", "loom-cli-")
	if err != nil {
		return "", err
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir, nil
}

// lockedBuffer is a bytes.Buffer safe for a writer and a reader at once.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
