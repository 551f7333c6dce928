//go:build integration

package libvirt_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/internal/eventually"
)

// daemonIndex hands each test its own host index (host UUID, ports).
var daemonIndex atomic.Int32

// startClient starts a private libvirtd and returns a client on its
// test:///default driver, closed in t.Cleanup. The client keeps the test
// driver's state alive for the test's life.
func startClient(t *testing.T, cfg libvirt.Config) (*libvirt.Client, string) {
	t.Helper()
	socket := libvirttest.StartDaemon(t, int(daemonIndex.Add(1)))
	cfg.Socket = socket
	cfg.URI = "test:///default"
	c, err := libvirt.Dial(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return c, socket
}

// waitFor polls cond until it returns nil, failing the test after timeout.
var waitFor = eventually.Wait

// waitState waits until the named domain is in state want.
func waitState(t testing.TB, c *libvirt.Client, name string, want libvirt.State) libvirt.Domain {
	t.Helper()
	var d libvirt.Domain
	waitFor(t, 5*time.Second, func() error {
		var err error
		d, err = c.Lookup(context.Background(), name)
		if err != nil {
			return err
		}
		if d.State != want {
			return fmt.Errorf("domain %s state=%s, want %s", name, d.State, want)
		}
		return nil
	})
	return d
}

// uuidFor derives a stable UUID from name.
func uuidFor(name string) [16]byte {
	var u [16]byte
	sum := sha256.Sum256([]byte(name))
	copy(u[:], sum[:])
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	return u
}

// daemonPID reads the pid of the libvirtd serving socket (DIR/run/libvirt-sock).
func daemonPID(t testing.TB, socket string) int {
	t.Helper()
	pidFile := filepath.Join(filepath.Dir(filepath.Dir(socket)), "libvirtd.pid")
	raw, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatalf("read pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatalf("parse pid file %s: %v", pidFile, err)
	}
	return pid
}

func TestClient_RoundTrip(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()
	const name = "rt-1"
	spec := libvirt.DomainSpec{Name: name, UUID: uuidFor(name), VCPUs: 2, MemoryMiB: 64, DiskPath: "/tmp/rt-1.qcow2"}

	if err := c.Define(ctx, spec); err != nil {
		t.Fatalf("Define: %v", err)
	}
	d := waitState(t, c, name, libvirt.StateShutoff)
	if d.UUID != spec.UUID {
		t.Fatalf("UUID=%x, want %x", d.UUID, spec.UUID)
	}

	steps := []struct {
		verb string
		do   func(context.Context, string) error
		want libvirt.State
	}{
		{"start", c.Start, libvirt.StateRunning},
		{"suspend", c.Suspend, libvirt.StatePaused},
		{"resume", c.Resume, libvirt.StateRunning},
		{"shutdown", c.Shutdown, libvirt.StateShutoff},
		{"start again", c.Start, libvirt.StateRunning},
		{"destroy", c.Destroy, libvirt.StateShutoff},
	}
	for _, step := range steps {
		if err := step.do(ctx, name); err != nil {
			t.Fatalf("%s: %v", step.verb, err)
		}
		waitState(t, c, name, step.want)
	}
	// Shut-off reason 2 = destroyed.
	if d, _ := c.Lookup(ctx, name); d.Reason != 2 {
		t.Fatalf("reason after destroy=%d, want 2 (destroyed)", d.Reason)
	}

	list, err := c.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var names []string
	for _, d := range list {
		names = append(names, d.Name+"/"+d.State.String())
	}
	// test:///default always holds a running domain called "test".
	if got, want := strings.Join(names, ","), "rt-1/shutoff,test/running"; got != want {
		t.Fatalf("List=%s, want %s", got, want)
	}

	if err := c.Undefine(ctx, name); err != nil {
		t.Fatalf("Undefine: %v", err)
	}
	if _, err := c.Lookup(ctx, name); !errors.Is(err, libvirt.ErrNotFound) {
		t.Fatalf("Lookup after Undefine: %v, want ErrNotFound", err)
	}
}

func TestClient_Idempotent(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()
	const name = "idem-1"
	spec := libvirt.DomainSpec{Name: name, UUID: uuidFor(name), Metadata: map[string]string{"gen": "1"}}

	twice := func(verb string, do func() error, want libvirt.State) {
		t.Helper()
		for i := range 2 {
			if err := do(); err != nil {
				t.Fatalf("%s #%d: %v", verb, i+1, err)
			}
			waitState(t, c, name, want)
		}
	}
	twice("define", func() error { return c.Define(ctx, spec) }, libvirt.StateShutoff)
	twice("shutdown while off", func() error { return c.Shutdown(ctx, name) }, libvirt.StateShutoff)
	twice("destroy while off", func() error { return c.Destroy(ctx, name) }, libvirt.StateShutoff)
	twice("start", func() error { return c.Start(ctx, name) }, libvirt.StateRunning)
	twice("resume while running", func() error { return c.Resume(ctx, name) }, libvirt.StateRunning)
	twice("suspend", func() error { return c.Suspend(ctx, name) }, libvirt.StatePaused)
	twice("resume", func() error { return c.Resume(ctx, name) }, libvirt.StateRunning)
	twice("destroy", func() error { return c.Destroy(ctx, name) }, libvirt.StateShutoff)

	// Redefining updates; a zero UUID keeps the existing one.
	spec2 := libvirt.DomainSpec{Name: name, Metadata: map[string]string{"gen": "2"}}
	twice("redefine without uuid", func() error { return c.Define(ctx, spec2) }, libvirt.StateShutoff)
	d, err := c.Lookup(ctx, name)
	if err != nil {
		t.Fatalf("Lookup: %v", err)
	}
	if d.UUID != spec.UUID || d.Metadata["gen"] != "2" {
		t.Fatalf("after redefine uuid=%x metadata=%v, want uuid %x and gen=2", d.UUID, d.Metadata, spec.UUID)
	}

	for i := range 2 {
		if err := c.Undefine(ctx, name); err != nil {
			t.Fatalf("undefine #%d: %v", i+1, err)
		}
	}
	if _, err := c.Lookup(ctx, name); !errors.Is(err, libvirt.ErrNotFound) {
		t.Fatalf("Lookup after Undefine: %v, want ErrNotFound", err)
	}
}

func TestClient_NotFound(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()

	_, err := c.Lookup(ctx, "missing")
	if !errors.Is(err, libvirt.ErrNotFound) {
		t.Fatalf("Lookup(missing) = %v, want ErrNotFound", err)
	}
	var lerr *libvirt.Error
	if !errors.As(err, &lerr) || lerr.Code != 42 {
		t.Fatalf("Lookup(missing) = %v, want *Error with code 42", err)
	}
	if !strings.HasPrefix(err.Error(), "lookup domain missing: ") {
		t.Fatalf("error %q, want it to start with the step", err)
	}

	verbs := map[string]func(context.Context, string) error{
		"start": c.Start, "shutdown": c.Shutdown, "destroy": c.Destroy, "suspend": c.Suspend, "resume": c.Resume,
	}
	for verb, do := range verbs {
		if err := do(ctx, "missing"); !errors.Is(err, libvirt.ErrNotFound) {
			t.Errorf("%s(missing) = %v, want ErrNotFound", verb, err)
		}
	}
	if _, err := c.Metadata(ctx, "missing"); !errors.Is(err, libvirt.ErrNotFound) {
		t.Errorf("Metadata(missing) = %v, want ErrNotFound", err)
	}
	if err := c.Undefine(ctx, "missing"); err != nil {
		t.Errorf("Undefine(missing) = %v, want nil", err)
	}
}

func TestClient_Metadata(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()
	const name = "meta-1"
	kv := map[string]string{
		"loom.dev/vm-id": "01J9ZX",
		"markup":         `</loom:entry><x a="1"/>&amp;`,
		"quotes":         `'single' "double"`,
		"unicode":        "héllo, 世界 🚀",
		"spaces":         "  padded  ",
		"lines":          "one\ntwo\r\nthree\ttab",
		"empty":          "",
		"blank":          "   ",
		"newline only":   "\n",
	}
	if err := c.Define(ctx, libvirt.DomainSpec{Name: name, UUID: uuidFor(name), Metadata: kv}); err != nil {
		t.Fatalf("Define: %v", err)
	}
	got, err := c.Metadata(ctx, name)
	if err != nil {
		t.Fatalf("Metadata: %v", err)
	}
	if !maps.Equal(got, kv) {
		t.Fatalf("Metadata=%q, want %q", got, kv)
	}

	// A redefine of a running domain shows its new metadata at once.
	if err := c.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	kv2 := map[string]string{"gen": "2"}
	if err := c.Define(ctx, libvirt.DomainSpec{Name: name, UUID: uuidFor(name), Metadata: kv2}); err != nil {
		t.Fatalf("redefine running: %v", err)
	}
	d, err := c.Lookup(ctx, name)
	if err != nil {
		t.Fatalf("Lookup: %v", err)
	}
	if d.State != libvirt.StateRunning || !maps.Equal(d.Metadata, kv2) {
		t.Fatalf("running domain state=%s metadata=%q, want running %q", d.State, d.Metadata, kv2)
	}
	// And it is also what the next boot sees.
	if err := c.Destroy(ctx, name); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if got, err := c.Metadata(ctx, name); err != nil || !maps.Equal(got, kv2) {
		t.Fatalf("Metadata after destroy = %q, %v; want %q", got, err, kv2)
	}

	// Clearing metadata on a running domain removes it from the live view.
	if err := c.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := c.Define(ctx, libvirt.DomainSpec{Name: name, UUID: uuidFor(name)}); err != nil {
		t.Fatalf("redefine without metadata: %v", err)
	}

	list, err := c.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	for _, d := range list {
		if d.Metadata != nil {
			t.Errorf("List: %s metadata=%q, want nil", d.Name, d.Metadata)
		}
	}
}

func TestClient_Events(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := c.Events(ctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}

	const name = "ev-1"
	uuid := uuidFor(name)
	if err := c.Define(ctx, libvirt.DomainSpec{Name: name, UUID: uuid}); err != nil {
		t.Fatalf("Define: %v", err)
	}
	if err := c.Start(ctx, name); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := c.Destroy(ctx, name); err != nil {
		t.Fatalf("Destroy: %v", err)
	}

	want := []string{"defined/0", "started/0", "stopped/1"} // stopped detail 1 = destroyed
	var got []string
	timeout := time.After(5 * time.Second)
	for len(got) < len(want) {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("events closed early; got %v", got)
			}
			if ev.Name != name {
				continue
			}
			if ev.UUID != uuid {
				t.Fatalf("event %+v: UUID=%x, want %x", ev, ev.UUID, uuid)
			}
			got = append(got, fmt.Sprintf("%s/%d", ev.Kind, ev.Detail))
		case <-timeout:
			t.Fatalf("events=%v, want %v", got, want)
		}
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("events=%v, want %v", got, want)
	}

	// Ending ctx closes the stream.
	cancel()
	waitClosed(t, events)
}

// waitClosed drains events until it closes, failing after 5 s.
func waitClosed(t testing.TB, events <-chan libvirt.Event) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-events:
			if !ok {
				return
			}
		case <-timeout:
			t.Fatalf("events channel still open after 5s")
		}
	}
}

func TestClient_DaemonKilled(t *testing.T) {
	t.Parallel()
	c, socket := startClient(t, libvirt.Config{})
	ctx := context.Background()
	events, err := c.Events(ctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}
	if _, err := c.List(ctx); err != nil {
		t.Fatalf("List: %v", err)
	}

	if err := syscall.Kill(daemonPID(t, socket), syscall.SIGKILL); err != nil {
		t.Fatalf("kill libvirtd: %v", err)
	}
	select {
	case <-c.Disconnected():
	case <-time.After(5 * time.Second):
		t.Fatalf("Disconnected() still open 5s after libvirtd was killed")
	}
	waitClosed(t, events)

	_, err = c.Lookup(ctx, "test")
	if !errors.Is(err, libvirt.ErrDisconnected) {
		t.Fatalf("Lookup after kill = %v, want ErrDisconnected", err)
	}
	if got, want := err.Error(), "lookup domain test: libvirtd connection lost"; got != want {
		t.Fatalf("error %q, want %q", got, want)
	}
	if err := c.Start(ctx, "test"); !errors.Is(err, libvirt.ErrDisconnected) {
		t.Fatalf("Start after kill = %v, want ErrDisconnected", err)
	}
	if _, err := c.Events(ctx); !errors.Is(err, libvirt.ErrDisconnected) {
		t.Fatalf("Events after kill = %v, want ErrDisconnected", err)
	}
}

// TestClient_Cancel freezes libvirtd (SIGSTOP) so RPCs hang, and checks that
// ctx, the RPC timeout, the dial timeout and Close all still return promptly.
func TestClient_Cancel(t *testing.T) {
	t.Parallel()
	c, socket := startClient(t, libvirt.Config{RPCTimeout: time.Second})
	ctx := context.Background()
	events, err := c.Events(ctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}

	pid := daemonPID(t, socket)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("stop libvirtd: %v", err)
	}
	// Registered after startClient's, so it runs first: libvirtd resumes
	// before the client closes and the daemon is stopped.
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })

	prompt := func(what string, limit time.Duration, f func() error, want error) {
		t.Helper()
		start := time.Now()
		err := f()
		if elapsed := time.Since(start); elapsed > limit {
			t.Errorf("%s took %s, want < %s", what, elapsed, limit)
		}
		if !errors.Is(err, want) {
			t.Errorf("%s = %v, want %v", what, err, want)
		}
	}

	cancelled, cancel := context.WithCancel(ctx)
	time.AfterFunc(100*time.Millisecond, cancel)
	prompt("Lookup with cancel", time.Second, func() error {
		_, err := c.Lookup(cancelled, "test")
		return err
	}, context.Canceled)

	prompt("List with expired ctx", 100*time.Millisecond, func() error {
		_, err := c.List(cancelled)
		return err
	}, context.Canceled)

	short, cancelShort := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancelShort()
	prompt("Start with deadline", time.Second, func() error { return c.Start(short, "test") }, context.DeadlineExceeded)

	prompt("Destroy past RPCTimeout", 2*time.Second, func() error { return c.Destroy(ctx, "test") }, context.DeadlineExceeded)

	prompt("Dial frozen daemon", 2*time.Second, func() error {
		_, err := libvirt.Dial(ctx, libvirt.Config{Socket: socket, URI: "test:///default", DialTimeout: 300 * time.Millisecond})
		return err
	}, context.DeadlineExceeded)

	prompt("Close frozen daemon", 2*time.Second, c.Close, nil)
	waitClosed(t, events)
	select {
	case <-c.Disconnected():
	default:
		t.Errorf("Disconnected() open after Close")
	}
}

func TestClient_Closed(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()
	events, err := c.Events(ctx)
	if err != nil {
		t.Fatalf("Events: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitClosed(t, events)
	<-c.Disconnected()
	if _, err := c.List(ctx); !errors.Is(err, libvirt.ErrClosed) {
		t.Fatalf("List after Close = %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestClient_InvalidName(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()
	for _, name := range []string{"", "-x", ".x", "a/b", "a b", "<x>", strings.Repeat("x", 65)} {
		calls := map[string]func() error{
			"define":   func() error { return c.Define(ctx, libvirt.DomainSpec{Name: name}) },
			"start":    func() error { return c.Start(ctx, name) },
			"shutdown": func() error { return c.Shutdown(ctx, name) },
			"destroy":  func() error { return c.Destroy(ctx, name) },
			"suspend":  func() error { return c.Suspend(ctx, name) },
			"resume":   func() error { return c.Resume(ctx, name) },
			"undefine": func() error { return c.Undefine(ctx, name) },
			"lookup":   func() error { _, err := c.Lookup(ctx, name); return err },
			"metadata": func() error { _, err := c.Metadata(ctx, name); return err },
		}
		for verb, do := range calls {
			if err := do(); !errors.Is(err, libvirt.ErrInvalidName) {
				t.Errorf("%s(%q) = %v, want ErrInvalidName", verb, name, err)
			}
		}
	}
}

func TestClient_DialErrors(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, err := libvirt.Dial(ctx, libvirt.Config{Socket: "/nonexistent/libvirt-sock", URI: "test:///default"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/libvirt-sock") {
		t.Fatalf("Dial(missing socket) = %v, want an error naming the socket", err)
	}
	_, err = libvirt.Dial(ctx, libvirt.Config{Socket: "/nonexistent/libvirt-sock", URI: "xen:///system"})
	if !errors.Is(err, libvirt.ErrInvalidConfig) {
		t.Fatalf("Dial(xen) = %v, want ErrInvalidConfig", err)
	}
}
