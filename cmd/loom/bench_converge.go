package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// convergeHosts is how many simulated hosts share the converge bench's VMs.
const convergeHosts = 4

// convergeLimit bounds how long the converge bench waits for every VM.
const convergeLimit = 5 * time.Minute

// benchConverge measures, with cfg.vms VMs on simulated hosts (libvirtd on
// the test driver), the time from a vm.create's reply (accepted) to its
// agent's report of the domain running under that goal (converged). The
// baseline is what libvirt alone takes: define and start a domain on the
// same kind of daemon, directly, at the same concurrency.
func benchConverge(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	log := quietLogger()
	if cfg.verbose {
		log = newLogger(false)
	}
	dirs := make([]string, convergeHosts+1)
	for i := range dirs {
		dirs[i] = filepath.Join(dir, "hosts", strconv.Itoa(i))
	}
	hosts, err := startSimHosts(ctx, dirs, 230, log)
	if err != nil {
		return err
	}
	defer hosts.stop()
	sockets := hosts.sockets
	baseline, err := rawLibvirtLatencies(ctx, sockets[convergeHosts], cfg)
	if err != nil {
		return fmt.Errorf("libvirt baseline: %w", err)
	}
	lat, wall, err := convergeLatencies(ctx, cfg, dir, sockets[:convergeHosts], log)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "  %d VMs on %d simulated hosts, %d clients creating, all converged in %s\n", cfg.vms, convergeHosts, cfg.clients, wall.Round(time.Millisecond))
	fmt.Fprintf(w, "  %-36s p50 %8s  p99 %8s\n", "accepted -> converged (Loom)", percentile(lat, 0.5).Round(time.Microsecond), percentile(lat, 0.99).Round(time.Microsecond))
	fmt.Fprintf(w, "  %-36s p50 %8s  p99 %8s\n", "define+start (libvirt alone)", percentile(baseline, 0.5).Round(time.Microsecond), percentile(baseline, 0.99).Round(time.Microsecond))
	fmt.Fprintf(w, "  p50 ratio libvirt/Loom %.2f\n", float64(percentile(baseline, 0.5))/float64(percentile(lat, 0.5)))
	return nil
}

// rawLibvirtLatencies defines and starts cfg.vms domains on one daemon with
// cfg.clients goroutines and returns each one's latency, sorted.
func rawLibvirtLatencies(ctx context.Context, socket string, cfg benchConfig) ([]time.Duration, error) {
	lv := libvirt.Config{Socket: socket, URI: "test:///default"}
	hold, err := libvirt.Dial(ctx, lv)
	if err != nil {
		return nil, err
	}
	defer func() { _ = hold.Close() }()
	var (
		mu   sync.Mutex
		lats []time.Duration
	)
	g, gctx := errgroup.WithContext(ctx)
	for c := range cfg.clients {
		g.Go(func() error {
			conn, err := libvirt.Dial(gctx, lv)
			if err != nil {
				return err
			}
			defer func() { _ = conn.Close() }()
			for i := c; i < cfg.vms; i += cfg.clients {
				name := "raw-" + strconv.Itoa(i)
				start := time.Now()
				if err := conn.Define(gctx, libvirt.DomainSpec{Name: name, VCPUs: 1, MemoryMiB: 64}); err != nil {
					return err
				}
				if err := conn.Start(gctx, name); err != nil {
					return err
				}
				mu.Lock()
				lats = append(lats, time.Since(start))
				mu.Unlock()
			}
			return nil
		})
	}
	err = g.Wait()
	slices.Sort(lats)
	return lats, err
}

// convergeLatencies runs the control plane and one agent per socket,
// creates cfg.vms running VMs and returns accepted->converged per VM,
// sorted, and how long the whole run took.
func convergeLatencies(ctx context.Context, cfg benchConfig, dir string, sockets []string, log *slog.Logger) ([]time.Duration, time.Duration, error) {
	conn, err := plane.Connect(ctx, plane.NATSConfig{Listen: "127.0.0.1:0", Sync: cfg.sync}, dir, "loom-bench", log)
	if err != nil {
		return nil, 0, err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(ctx)
	defer func() { cancel(); _ = g.Wait() }()
	g.Go(func() error { return plane.RunControlPlane(gctx, conn, plane.ControlPlaneConfig{DataDir: dir}, log) })
	for i, socket := range sockets {
		g.Go(func() error {
			return plane.RunAgent(gctx, conn, plane.AgentConfig{Host: hostName(i), Socket: socket, URI: "test:///default", Simulated: true}, log)
		})
	}
	admin := &client{flags: &clientFlags{actor: "bench", timeout: 15 * time.Second}, nc: conn.Conn}
	perHost := (cfg.vms + len(sockets) - 1) / len(sockets)
	for i := range sockets {
		reg := events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: "bench-" + hostName(i)},
			Name: hostName(i), CPU: min(perHost, events.MaxCPU), MemoryMiB: perHost * 64}
		if err := retryUnavailable(ctx, func() error { _, err := admin.command(ctx, events.KindHost, events.VerbRegister, &reg); return err }); err != nil {
			return nil, 0, err
		}
	}
	img := events.RegisterImage{CommandMeta: events.CommandMeta{CommandID: "bench-image"}, Name: "bench", Format: "raw"}
	if _, err := admin.command(ctx, events.KindImage, events.VerbRegister, &img); err != nil {
		return nil, 0, err
	}

	track := newConvergeTracker(cfg.vms)
	sub, err := conn.Conn.Subscribe("loom.obs.*.vm.*", track.observe)
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	begin := time.Now()
	creators, cctx := errgroup.WithContext(ctx)
	for c := range cfg.clients {
		creators.Go(func() error {
			nc, err := nats.Connect(conn.URL)
			if err != nil {
				return err
			}
			defer nc.Close()
			cl := &client{flags: &clientFlags{actor: "bench-" + strconv.Itoa(c), timeout: 30 * time.Second}, nc: nc}
			for i := c; i < cfg.vms; i += cfg.clients {
				name := "c" + strconv.Itoa(i)
				create := events.CreateVM{CommandMeta: events.CommandMeta{CommandID: name}, Name: name, Image: "bench", CPU: 1, MemoryMiB: 64}
				reply, err := cl.command(cctx, events.KindVM, events.VerbCreate, &create)
				if err != nil {
					return fmt.Errorf("create %s: %w", name, err)
				}
				track.accept(name, reply.LastSeq())
			}
			return nil
		})
	}
	if err := creators.Wait(); err != nil {
		return nil, 0, err
	}
	lats, err := track.wait(ctx, convergeLimit)
	return lats, time.Since(begin), err
}

// convergeTracker pairs each VM's acceptance with its first report of
// running under that goal, in whichever order they arrive.
type convergeTracker struct {
	mu       sync.Mutex
	accepted map[string]accepted
	running  map[string]observedAt
	done     int
	want     int
	all      chan struct{}
	lats     []time.Duration
}

type accepted struct {
	at          time.Time
	incarnation uint64
}

type observedAt struct {
	at          time.Time
	incarnation uint64
}

func newConvergeTracker(want int) *convergeTracker {
	return &convergeTracker{accepted: map[string]accepted{}, running: map[string]observedAt{}, want: want, all: make(chan struct{})}
}

func (t *convergeTracker) observe(msg *nats.Msg) {
	now := time.Now()
	rec, err := events.DecodeRecord(0, msg.Subject, now, msg.Data)
	if err != nil {
		return
	}
	obs, ok := rec.Event.(events.VMObserved)
	if !ok || obs.State != events.ObservedRunning {
		return
	}
	name := rec.Envelope.AggregateID
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, seen := t.running[name]; !seen {
		t.running[name] = observedAt{at: now, incarnation: obs.Incarnation}
		t.pair(name)
	}
}

func (t *convergeTracker) accept(name string, incarnation uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.accepted[name] = accepted{at: time.Now(), incarnation: incarnation}
	t.pair(name)
}

// pair records name's latency once both halves are in. Called with mu held.
func (t *convergeTracker) pair(name string) {
	a, okA := t.accepted[name]
	r, okR := t.running[name]
	if !okA || !okR {
		return
	}
	if r.incarnation < a.incarnation {
		delete(t.running, name) // running under an older goal: wait for this one
		return
	}
	// A report that beat the reply converged before the client heard back:
	// its latency is zero, not negative.
	t.lats = append(t.lats, max(0, r.at.Sub(a.at)))
	t.done++
	if t.done == t.want {
		close(t.all)
	}
}

func (t *convergeTracker) wait(ctx context.Context, limit time.Duration) ([]time.Duration, error) {
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case <-t.all:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-timer.C:
		t.mu.Lock()
		defer t.mu.Unlock()
		return nil, fmt.Errorf("only %d of %d VMs converged in %s (%d accepted, %d reported running)", t.done, t.want, limit, len(t.accepted), len(t.running))
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	slices.Sort(t.lats)
	return t.lats, nil
}
