//go:build integration

package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	lv "github.com/loomctl/loom/agents/libvirt"
)

// The pieces of the safety test: the loom binary, built once; agents and
// fencers as processes of their own (so they can be killed and frozen);
// a TCP proxy between each agent and NATS that can cut or slow the
// connection; and a watcher with its own libvirt connection per host that
// records when each domain ran.

var (
	buildOnce sync.Once
	builtLoom string
	buildErr  error
)

// loomBinary builds cmd/loom once per test binary.
func loomBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "loom-safety-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtLoom = filepath.Join(dir, "loom")
		cmd := exec.Command("go", "build", "-o", builtLoom, "./cmd/loom")
		cmd.Dir = filepath.Join("..")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtLoom
}

// proc is a process of the test's, which it can kill, freeze and thaw.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *bytes.Buffer
	done chan struct{}
}

// lockedWriter serializes writes of a process's output.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func startProc(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), out: &bytes.Buffer{}, done: make(chan struct{})}
	w := &lockedWriter{w: p.out}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	return p
}

func (p *proc) signal(sig syscall.Signal) {
	if p != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(sig)
	}
}

// kill kills the process and waits for it.
func (p *proc) kill() {
	if p == nil {
		return
	}
	p.signal(syscall.SIGCONT) // a frozen process dies only once thawed
	p.signal(syscall.SIGKILL)
	<-p.done
}

// proxy forwards TCP connections to target; cut drops them all and refuses
// new ones until heal; delay slows every chunk forwarded.
type proxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	cut   bool
	delay time.Duration
	conns map[net.Conn]struct{}
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	go p.serve()
	t.Cleanup(func() {
		_ = ln.Close()
		p.setCut(true)
	})
	return p
}

func (p *proxy) url() string { return "nats://" + p.ln.Addr().String() }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		refused := p.cut
		p.mu.Unlock()
		if refused {
			_ = c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.track(c, up)
		go p.pipe(c, up)
		go p.pipe(up, c)
	}
}

func (p *proxy) track(cs ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
}

func (p *proxy) pipe(from, to net.Conn) {
	defer func() {
		_ = from.Close()
		_ = to.Close()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 {
			p.mu.Lock()
			d := p.delay
			p.mu.Unlock()
			if d > 0 {
				time.Sleep(d) // the fault injected: latency on the link
			}
			if _, werr := to.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// setCut drops every connection and refuses new ones (true), or lets
// them through again (false).
func (p *proxy) setCut(cut bool) {
	p.mu.Lock()
	p.cut = cut
	var open []net.Conn
	if cut {
		for c := range p.conns {
			open = append(open, c)
		}
		clear(p.conns)
	}
	p.mu.Unlock()
	for _, c := range open {
		_ = c.Close()
	}
}

func (p *proxy) setDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

// interval is a span during which a domain ran on a host.
type interval struct {
	host, domain string
	from, to     time.Time // to is zero while it still runs
}

// watcher records, from libvirt's own lifecycle events on a connection of
// its own per host, when each domain ran.
type watcher struct {
	mu      sync.Mutex
	start   time.Time
	running map[[2]string]time.Time // (host, domain) -> since
	done    []interval
	errs    []error
}

func newWatcher() *watcher {
	return &watcher{start: time.Now(), running: map[[2]string]time.Time{}}
}

// watch follows host's libvirtd from now on, holding its connection open
// (which also keeps test:///default's state alive).
func (w *watcher) watch(t *testing.T, ctx context.Context, host, socket string) {
	t.Helper()
	c, err := lv.Dial(ctx, lv.Config{Socket: socket, URI: "test:///default"})
	if err != nil {
		t.Fatalf("watch %s: %v", host, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	evs, err := c.Events(ctx)
	if err != nil {
		t.Fatalf("watch %s: %v", host, err)
	}
	domains, err := c.List(ctx)
	if err != nil {
		t.Fatalf("watch %s: %v", host, err)
	}
	for _, d := range domains {
		if d.State == lv.StateRunning {
			w.set(host, d.Name, true)
		}
	}
	go func() {
		for ev := range evs {
			switch ev.Kind {
			case "started", "resumed":
				w.set(host, ev.Name, true)
			case "suspended", "stopped", "shutdown", "crashed", "pmsuspended", "undefined":
				w.set(host, ev.Name, false)
			}
		}
		if ctx.Err() == nil {
			w.mu.Lock()
			w.errs = append(w.errs, fmt.Errorf("lifecycle events of %s ended early", host))
			w.mu.Unlock()
		}
	}()
}

func (w *watcher) set(host, domain string, running bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	key := [2]string{host, domain}
	since, was := w.running[key]
	switch {
	case running && !was:
		w.running[key] = time.Now()
	case !running && was:
		delete(w.running, key)
		w.done = append(w.done, interval{host: host, domain: domain, from: since, to: time.Now()})
	}
}

// overlaps names the first moment two hosts ran one domain (one VM's disk,
// held exclusively) at the same time.
func (w *watcher) overlaps() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.errs) > 0 {
		return errors.Join(w.errs...)
	}
	all := append([]interval(nil), w.done...)
	for key, since := range w.running {
		all = append(all, interval{host: key[0], domain: key[1], from: since})
	}
	for i, a := range all {
		for _, b := range all[i+1:] {
			if a.domain != b.domain || a.host == b.host {
				continue
			}
			aEnd, bEnd := a.to, b.to
			if aEnd.IsZero() {
				aEnd = time.Now()
			}
			if bEnd.IsZero() {
				bEnd = time.Now()
			}
			if a.from.Before(bEnd) && b.from.Before(aEnd) {
				return fmt.Errorf("%s ran on %s (%s..%s) and on %s (%s..%s) at once: two writers on disk/%s",
					a.domain, a.host, a.from.Sub(w.start).Round(time.Millisecond), aEnd.Sub(w.start).Round(time.Millisecond),
					b.host, b.from.Sub(w.start).Round(time.Millisecond), bEnd.Sub(w.start).Round(time.Millisecond), a.domain)
			}
		}
	}
	return nil
}

// intervals counts the intervals recorded, running ones included.
func (w *watcher) intervals() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.done) + len(w.running)
}
