//go:build integration

package integration

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/handlers"
)

// Issue 3's proof of safety. Many clients acquire, release and break
// leases while the agents and fencers of the hosts are killed, frozen
// (SIGSTOP, each in turn, for longer than the TTL), cut from NATS or
// slowed by a proxy between them and the server, and run with clocks
// offset and running slow. Then:
//
//   - the clients' history is checked by porcupine against the model of
//     safety_model_test.go, written from the lease rules, not the handlers;
//   - a watcher with its own libvirt connection per host has built each
//     domain's running intervals from libvirt's lifecycle events: no VM
//     (no disk, held exclusively) ever ran on two hosts at once.
//
// TestSafety_Partition (fencing) and TestSafety_WithoutTheGrantCheck
// switch one protection off each and show the same checks fail. CI runs one seed of
// each; -safety.seeds and -safety.duration run more.
var (
	safetySeeds    = flag.Int("safety.seeds", 1, "seeds of TestSafety to run")
	safetyDuration = flag.Duration("safety.duration", 25*time.Second, "how long faults are injected per seed")
)

// safetyTTL is the agents' liveness TTL; the detector's margin m_d is
// handlers.DefaultDetectorMargin and the agents' m_a is TTL/5.
const safetyTTL = 2 * time.Second

type safetyConfig struct {
	seed     uint64
	duration time.Duration
	// noFence runs agents with fencing off and no fencers.
	noFence bool
	// narrowGrantCheck makes exclusive grants check only their own subject.
	narrowGrantCheck bool
	// faults picks the fault schedule; nil runs the random one.
	faults func(t *testing.T, c *safetyCluster, rng *rand.Rand, until time.Time)
}

// safetyHost is one host of the safety cluster.
type safetyHost struct {
	name, socket, fenceSocket string
	proxy                     *proxy
	clockRate                 float64
	clockOffset               time.Duration

	mu     sync.Mutex
	agent  *proc
	fencer *proc
}

type safetyCluster struct {
	t     *testing.T
	cfg   safetyConfig
	bin   string
	conn  *plane.Connection
	hosts []*safetyHost
	watch *watcher
}

func TestSafety(t *testing.T) {
	for seed := 1; seed <= *safetySeeds; seed++ {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			c := startSafety(t, safetyConfig{seed: uint64(seed), duration: *safetyDuration})
			if err := c.run(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// A host cut from NATS until the end: its agent pauses the VM at its
// fencing deadline, before the control plane, rightly seeing the host
// lost, starts it elsewhere. With fencing off the agent lets it run on:
// two writers, which the watcher sees.
func TestSafety_Partition(t *testing.T) {
	for _, fenced := range []bool{true, false} {
		t.Run(fmt.Sprintf("fenced=%v", fenced), func(t *testing.T) {
			c := startSafety(t, safetyConfig{seed: 1, duration: 20 * time.Second, noFence: !fenced, faults: partitionVMHost})
			err := c.run()
			switch {
			case fenced && err != nil:
				t.Fatal(err)
			case !fenced && (err == nil || !strings.Contains(err.Error(), "two writers")):
				t.Fatalf("with fencing off the safety checks found %v, want two writers", err)
			case !fenced:
				t.Logf("as expected: %v", err)
			}
		})
	}
}

// With the exclusive grant's check narrowed to its own subject, shared
// and exclusive grants land together, and the history is not
// linearizable.
func TestSafety_WithoutTheGrantCheck(t *testing.T) {
	c := startSafety(t, safetyConfig{seed: 1, duration: 15 * time.Second, narrowGrantCheck: true, faults: noFaults})
	err := c.run()
	if err == nil || !strings.Contains(err.Error(), errNotLinearizable.Error()) {
		t.Fatalf("with the grant check narrowed the safety checks found %v, want a history that is not linearizable", err)
	}
	t.Logf("as expected: %v", err)
}

func startSafety(t *testing.T, cfg safetyConfig) *safetyCluster {
	t.Helper()
	c := &safetyCluster{t: t, cfg: cfg, bin: loomBinary(t), watch: newWatcher()}
	dir := t.TempDir()
	log := logger(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var err error
	c.conn, err = plane.Connect(ctx, plane.NATSConfig{Listen: "127.0.0.1:0", Sync: "1s"}, dir, "safety", log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.conn.Close)
	ready := make(chan struct{})
	cp := run(func(ctx context.Context) error {
		return plane.RunControlPlane(ctx, c.conn, plane.ControlPlaneConfig{DataDir: dir, Ready: ready,
			Unsafe: handlers.Unsafe{NarrowExclusiveCheck: cfg.narrowGrantCheck}}, log)
	})
	t.Cleanup(func() { cp.stop(t) })
	<-ready

	rng := rand.New(rand.NewPCG(cfg.seed, 0x5afe))
	natsAddr := strings.TrimPrefix(c.conn.URL, "nats://")
	for i := range 3 {
		h := &safetyHost{name: "host-" + strconv.Itoa(i), socket: libvirttest.StartDaemon(t, 40+i),
			// Clocks: any offset (never compared), and up to 10% slow.
			clockRate: 1 + rng.Float64()/10, clockOffset: time.Duration(rng.IntN(7200)-3600) * time.Second}
		h.fenceSocket = filepath.Join(t.TempDir(), "fence.sock")
		h.proxy = startProxy(t, natsAddr)
		c.watch.watch(t, ctx, h.name, h.socket)
		c.hosts = append(c.hosts, h)
		c.startFencer(h)
		c.startAgent(h)
		mustSend(t, c.conn.Conn, events.KindHost, events.VerbRegister, &events.RegisterHost{
			CommandMeta: events.CommandMeta{CommandID: "reg-" + h.name}, Name: h.name, CPU: 8, MemoryMiB: 8192})
	}
	t.Cleanup(func() {
		for _, h := range c.hosts {
			h.mu.Lock()
			h.agent.kill()
			h.fencer.kill()
			h.mu.Unlock()
		}
	})
	for _, img := range []string{"demo", "lin-0", "lin-1"} {
		mustSend(t, c.conn.Conn, events.KindImage, events.VerbRegister, &events.RegisterImage{
			CommandMeta: events.CommandMeta{CommandID: "img-" + img}, Name: img, Format: "qcow2", SizeBytes: 1 << 26})
	}
	return c
}

func (c *safetyCluster) startAgent(h *safetyHost) {
	args := []string{"--nats", h.proxy.url(), "agent", "--host", h.name, "--libvirt-socket", h.socket,
		"--libvirt", "test:///default", "--simulated", "--ttl", safetyTTL.String(), "--stop-grace", "1s",
		"--test-clock-rate", strconv.FormatFloat(h.clockRate, 'f', 3, 64), "--test-clock-offset", h.clockOffset.String()}
	if c.cfg.noFence {
		args = append(args, "--unsafe-no-fence")
	} else {
		args = append(args, "--fence-socket", h.fenceSocket)
	}
	h.mu.Lock()
	h.agent = startProc(c.t, "agent "+h.name, c.bin, args...)
	h.mu.Unlock()
}

func (c *safetyCluster) startFencer(h *safetyHost) {
	if c.cfg.noFence {
		return
	}
	h.mu.Lock()
	h.fencer = startProc(c.t, "fence "+h.name, c.bin, "fence", "--host", h.name, "--socket", h.fenceSocket,
		"--libvirt-socket", h.socket, "--libvirt", "test:///default")
	h.mu.Unlock()
}

// run creates VMs, runs the lease clients and the faults for the
// configured time, lets the fleet settle, and checks both properties.
func (c *safetyCluster) run() error {
	t := c.t
	for i := range 4 {
		mustSend(t, c.conn.Conn, events.KindVM, events.VerbCreate, &events.CreateVM{
			CommandMeta: events.CommandMeta{CommandID: "vm-" + strconv.Itoa(i)}, Name: "vm-" + strconv.Itoa(i), Image: "demo", CPU: 1, MemoryMiB: 128})
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.duration)
	defer cancel()
	h := &history{start: time.Now()}
	var wg sync.WaitGroup
	// The clients' holders run on host-0, which no fault touches: a lease
	// of a host declared lost expires by itself, which the model of a
	// client's history leaves out.
	for client := range 6 {
		nc, err := nats.Connect(c.conn.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			leaseClient(ctx, nc, h, client, c.cfg.seed, []string{"image/lin-0", "image/lin-1"}, c.hosts[0].name)
		}()
	}
	faults := c.cfg.faults
	if faults == nil {
		faults = randomFaults
	}
	faults(t, c, rand.New(rand.NewPCG(c.cfg.seed, 0xfa17)), time.Now().Add(c.cfg.duration))
	wg.Wait()
	c.heal()
	// Settle: every host back, a few TTLs for moves to finish.
	time.Sleep(3 * safetyTTL) // the fleet converging after the faults: the checks below read what happened, not a condition
	n, err := h.check(time.Minute)
	if err != nil && os.Getenv("LOOM_SAFETY_DEBUG") != "" {
		h.debug(os.Getenv("LOOM_SAFETY_DEBUG"))
	}
	t.Logf("%d lease operations checked; %d domain running intervals watched", n, c.watch.intervals())
	return errorsJoin(err, c.watch.overlaps())
}

func errorsJoin(errs ...error) error {
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) == 0 {
		return nil
	}
	return fmt.Errorf("%s", strings.Join(msgs, "; "))
}

// heal ends every fault: processes thawed and running, links whole.
func (c *safetyCluster) heal() {
	for _, h := range c.hosts {
		h.proxy.setCut(false)
		h.proxy.setDelay(0)
		h.mu.Lock()
		h.agent.signal(syscall.SIGCONT)
		h.fencer.signal(syscall.SIGCONT)
		h.mu.Unlock()
	}
}

// randomFaults injects, until until, one fault at a time on host-1 or
// host-2: an agent killed and restarted, an agent or a fencer frozen for
// longer than the TTL (never both), the agent cut from NATS, or its link
// slowed.
func randomFaults(t *testing.T, c *safetyCluster, rng *rand.Rand, until time.Time) {
	for time.Now().Add(2 * safetyTTL).Before(until) {
		h := c.hosts[1+rng.IntN(len(c.hosts)-1)]
		span := safetyTTL + time.Duration(rng.IntN(3000))*time.Millisecond
		switch rng.IntN(5) {
		case 0:
			t.Logf("fault: kill the agent of %s for %s", h.name, span)
			h.mu.Lock()
			h.agent.kill()
			h.mu.Unlock()
			time.Sleep(span) // the fault's length
			c.startAgent(h)
		case 1:
			t.Logf("fault: freeze the agent of %s for %s", h.name, span)
			h.agent.signal(syscall.SIGSTOP)
			time.Sleep(span) // the fault's length
			h.agent.signal(syscall.SIGCONT)
		case 2:
			t.Logf("fault: freeze the fencer of %s for %s", h.name, span)
			h.fencer.signal(syscall.SIGSTOP)
			time.Sleep(span) // the fault's length
			h.fencer.signal(syscall.SIGCONT)
		case 3:
			t.Logf("fault: cut %s from NATS for %s", h.name, span)
			h.proxy.setCut(true)
			time.Sleep(span) // the fault's length
			h.proxy.setCut(false)
		case 4:
			d := time.Duration(100+rng.IntN(500)) * time.Millisecond
			t.Logf("fault: slow %s's link by %s for %s", h.name, d, span)
			h.proxy.setDelay(d)
			time.Sleep(span) // the fault's length
			h.proxy.setDelay(0)
		}
		time.Sleep(time.Duration(500+rng.IntN(1500)) * time.Millisecond) // between faults
	}
}

// partitionVMHost cuts the host of a running VM (not host-0, the lease
// clients' host) from NATS for long enough that the host is declared lost
// and the VM restarted elsewhere.
func partitionVMHost(t *testing.T, c *safetyCluster, _ *rand.Rand, until time.Time) {
	var host, name string
	waitFor(t, 30*time.Second, "a VM running on host-1 or host-2", func() error {
		for i := range 4 {
			vm, err := queryVM(c.conn.Conn, "vm-"+strconv.Itoa(i))
			if err != nil {
				return err
			}
			if vm.Converged && vm.Host != c.hosts[0].name {
				host, name = vm.Host, vm.Name
				return nil
			}
		}
		return fmt.Errorf("no VM converged off host-0 yet")
	})
	for _, h := range c.hosts {
		if h.name == host {
			t.Logf("fault: cut %s (%s's host) from NATS until the end", h.name, name)
			h.proxy.setCut(true)
		}
	}
	time.Sleep(time.Until(until)) // the fault's length
}

func noFaults(*testing.T, *safetyCluster, *rand.Rand, time.Time) {}

func queryVM(nc *nats.Conn, name string) (events.VMView, error) {
	data, _ := events.Marshal(events.Query{Name: name})
	resp, err := nc.Request(events.QuerySubject(events.KindVM, events.VerbGet), data, 5*time.Second)
	if err != nil {
		return events.VMView{}, err
	}
	var reply events.QueryReply
	if err := events.Unmarshal(resp.Data, &reply); err != nil {
		return events.VMView{}, err
	}
	if reply.Error != nil {
		return events.VMView{}, reply.Error
	}
	return reply.VMs[0], nil
}

func mustSend(t *testing.T, nc *nats.Conn, kind events.Kind, verb string, body any) {
	t.Helper()
	data, err := events.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	for attempt := 0; ; attempt++ {
		resp, err := nc.Request(events.CommandSubject(kind, verb), data, 10*time.Second)
		if err != nil {
			t.Fatalf("%s.%s: %v", kind, verb, err)
		}
		var reply events.Reply
		if err := events.Unmarshal(resp.Data, &reply); err != nil {
			t.Fatal(err)
		}
		if reply.Error == nil {
			return
		}
		if reply.Error.Code != events.CodeUnavailable || attempt > 20 {
			t.Fatalf("%s.%s: %v", kind, verb, reply.Error)
		}
		time.Sleep(100 * time.Millisecond) // retrying an unavailable answer
	}
}
