//go:build integration

package integration

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/agents"
	lv "github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/internal/eventually"
)

// fleet is Loom on one machine, for a test: NATS, the control plane, and
// hosts with their agents, each restartable.
type fleet struct {
	t     *testing.T
	dir   string
	conn  *plane.Connection
	plane *part
	hosts map[string]*host
	actor string
	// log collects the logs of the control plane and agents.
	log     *slog.Logger
	counter atomic.Int64
	// qemu runs the hosts on QEMU with the tiny guest, registered as
	// image "tiny", instead of on the test driver with image "demo".
	qemu bool
}

// host is one simulated host: its libvirtd, a connection the harness holds
// open (test:///default lives as long as some connection does), and its agent.
type host struct {
	name   string
	socket string
	virt   *lv.Client
	agent  *part
	// storage keeps the host's VM disks, and sockets is where its QEMU
	// listens for incoming migrations (QEMU hosts only).
	storage, sockets string
	// migrateListen overrides where the agent says its QEMU listens, to
	// make migrations to the host fail.
	migrateListen string
	// endpoint is the host's underlay address, and netns the command
	// prefix that runs a command in its network namespace (QEMU hosts).
	endpoint, underlay string
	netns              []string
}

// part is something the harness runs and can stop and start again.
type part struct {
	cancel context.CancelFunc
	done   chan error
}

func (p *part) stop(t *testing.T) {
	t.Helper()
	if p == nil || p.cancel == nil {
		return
	}
	p.cancel()
	select {
	case err := <-p.done:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("part stopped with: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("part did not stop within 20s")
	}
	p.cancel = nil
}

func run(f func(ctx context.Context) error) *part {
	ctx, cancel := context.WithCancel(context.Background())
	p := &part{cancel: cancel, done: make(chan error, 1)}
	go func() { p.done <- f(ctx) }()
	return p
}

func logger(t *testing.T) *slog.Logger {
	if os.Getenv("LOOM_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	// Kept in memory and shown only when the test fails: CI then says what
	// the control plane and the agents were doing.
	buf := &logTail{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs of the control plane and agents (the last %d KiB):\n%s", logTailSize>>10, buf.String())
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// logTailSize bounds the logs a failing test shows.
const logTailSize = 256 << 10

// logTail keeps the last logTailSize bytes written to it.
type logTail struct {
	mu  sync.Mutex
	buf []byte
}

func (l *logTail) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	if over := len(l.buf) - logTailSize; over > 0 {
		l.buf = append(l.buf[:0], l.buf[over:]...)
	}
	return len(p), nil
}

func (l *logTail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.buf)
}

// newFleet starts NATS, the control plane and hosts on libvirtd daemons
// with the given indexes (distinct per test so tests run in parallel).
func newFleet(t *testing.T, daemonIndexes ...int) *fleet {
	t.Helper()
	return startFleet(t, false, daemonIndexes...)
}

// newQEMUFleet is newFleet with real guests: QEMU hosts, each VM a qcow2
// overlay on the tiny guest's image "tiny".
func newQEMUFleet(t *testing.T, daemonIndexes ...int) *fleet {
	t.Helper()
	return startFleet(t, true, daemonIndexes...)
}

func startFleet(t *testing.T, qemu bool, daemonIndexes ...int) *fleet {
	t.Helper()
	f := &fleet{t: t, dir: t.TempDir(), hosts: map[string]*host{}, actor: "it-" + t.Name(), qemu: qemu}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	f.log = logger(t)
	f.conn, err = plane.Connect(ctx, plane.NATSConfig{Listen: "127.0.0.1:0", Sync: "1s"}, f.dir, "it", f.log)
	if err != nil {
		t.Fatalf("nats: %v", err)
	}
	t.Cleanup(f.conn.Close)
	f.startPlane()
	for i, idx := range daemonIndexes {
		name := "host-" + strconv.Itoa(i+1)
		socket := libvirttest.StartDaemon(t, idx)
		virt, err := lv.Dial(ctx, lv.Config{Socket: socket, URI: f.uri(), RPCTimeout: time.Minute})
		if err != nil {
			t.Fatalf("dial %s: %v", name, err)
		}
		t.Cleanup(func() { virt.Close() })
		h := &host{name: name, socket: socket, virt: virt}
		if qemu {
			h.storage, h.sockets = libvirttest.VMDir(t), libvirttest.SocketDir(t)
			endpoint, dev, prefix := libvirttest.Underlay(t, socket)
			h.endpoint, h.netns, h.underlay = endpoint.String(), prefix, dev
		}
		f.hosts[name] = h
		f.startAgent(name)
		f.mustCommand(events.KindHost, events.VerbRegister, &events.RegisterHost{Name: name, CPU: 4, MemoryMiB: 4096})
	}
	if qemu {
		guest := libvirttest.Guest(t)
		f.mustCommand(events.KindImage, events.VerbRegister, &events.RegisterImage{Name: "tiny", Format: "qcow2", SizeBytes: 1 << 26,
			Source: filepath.Join(guest, "base.qcow2"), Boot: &events.ImageBoot{Kernel: filepath.Join(guest, "vmlinuz"),
				Initrd: filepath.Join(guest, "initrd.gz"), Cmdline: "console=ttyS0 quiet"}})
	} else {
		f.mustCommand(events.KindImage, events.VerbRegister, &events.RegisterImage{Name: "demo", Format: "qcow2", SizeBytes: 1 << 26})
	}
	t.Cleanup(func() {
		for _, h := range f.hosts {
			h.agent.stop(t)
		}
		f.plane.stop(t)
		f.checkNoConsumersLeft()
	})
	return f
}

// checkNoConsumersLeft fails the test if a stream still has a consumer
// once the control plane and the agents have stopped: each reader deletes
// its own, or a restart loop would leave them to pile up on the server
// for minutes, up to a stream's limit.
func (f *fleet) checkNoConsumersLeft() {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, name := range []string{events.StreamEvents, events.StreamGoals, events.StreamLiveness} {
		stream, err := f.conn.JS.Stream(ctx, name)
		if err != nil {
			f.t.Errorf("stream %s: %v", name, err)
			continue
		}
		var left []string
		list := stream.ListConsumers(ctx)
		for info := range list.Info() {
			left = append(left, fmt.Sprintf("%s (filter %q%q)", info.Name, info.Config.FilterSubject, info.Config.FilterSubjects))
		}
		if err := list.Err(); err != nil {
			f.t.Errorf("list the consumers of %s: %v", name, err)
		}
		if len(left) > 0 {
			f.t.Errorf("stream %s keeps %d consumers after everything stopped: %v", name, len(left), left)
		}
	}
}

func (f *fleet) startPlane() {
	ready := make(chan struct{})
	f.plane = run(func(ctx context.Context) error {
		return plane.RunControlPlane(ctx, f.conn, plane.ControlPlaneConfig{DataDir: f.dir, Ready: ready}, f.log)
	})
	select {
	case <-ready:
	case err := <-f.plane.done:
		f.t.Fatalf("control plane: %v", err)
	case <-time.After(30 * time.Second):
		f.t.Fatal("control plane not ready in 30s")
	}
}

func (f *fleet) startAgent(name string) {
	h := f.hosts[name]
	cfg := plane.AgentConfig{Host: name, Socket: h.socket, URI: f.uri(), TTL: agentTTL(), StopGrace: time.Second}
	if f.qemu {
		cfg.StorageDir, cfg.AliveMarker = h.storage, "loom-heartbeat"
		cfg.MigrateURI, cfg.MigrateListen = "qemu+unix:///system?socket="+h.socket, "unix:"+h.sockets
		if h.migrateListen != "" {
			cfg.MigrateListen = h.migrateListen
		}
		cfg.TunnelEndpoint, cfg.Overlay = h.endpoint, &agents.OverlayConfig{Underlay: h.underlay, Prefix: h.netns}
	}
	h.agent = run(func(ctx context.Context) error {
		return plane.RunAgent(ctx, f.conn, cfg, f.log.With("agent", name))
	})
}

// uri is the libvirt driver the fleet's hosts run.
func (f *fleet) uri() string {
	if f.qemu {
		return "qemu:///system"
	}
	return "test:///default"
}

// command sends a command with a fresh command id (unless the body has one)
// and returns the reply or its fault.
func (f *fleet) command(kind events.Kind, verb string, body any) (*events.Reply, error) {
	f.t.Helper()
	setCommandID(body, fmt.Sprintf("%s-%d", f.t.Name(), f.counter.Add(1)))
	data, err := events.Marshal(body)
	if err != nil {
		f.t.Fatal(err)
	}
	msg := nats.NewMsg(events.CommandSubject(kind, verb))
	msg.Data = data
	msg.Header.Set(events.HeaderActor, f.actor)
	resp, err := f.conn.Conn.RequestMsg(msg, 20*time.Second)
	if err != nil {
		return nil, err
	}
	var reply events.Reply
	if err := events.Unmarshal(resp.Data, &reply); err != nil {
		f.t.Fatalf("undecodable reply: %v", err)
	}
	if reply.Error != nil {
		return &reply, reply.Error
	}
	return &reply, nil
}

func (f *fleet) mustCommand(kind events.Kind, verb string, body any) *events.Reply {
	f.t.Helper()
	reply, err := f.command(kind, verb, body)
	if err != nil {
		f.t.Fatalf("%s.%s: %v", kind, verb, err)
	}
	return reply
}

func setCommandID(body any, id string) {
	switch c := body.(type) {
	case *events.RegisterHost:
		c.CommandID = or(c.CommandID, id)
	case *events.CordonHost:
		c.CommandID = or(c.CommandID, id)
	case *events.RegisterImage:
		c.CommandID = or(c.CommandID, id)
	case *events.CreateVM:
		c.CommandID = or(c.CommandID, id)
	case *events.VMCommand:
		c.CommandID = or(c.CommandID, id)
	case *events.CheckpointVM:
		c.CommandID = or(c.CommandID, id)
	case *events.RestoreVM:
		c.CommandID = or(c.CommandID, id)
	case *events.DeleteCheckpoint:
		c.CommandID = or(c.CommandID, id)
	case *events.ScheduleCheckpoints:
		c.CommandID = or(c.CommandID, id)
	case *events.MigrateVM:
		c.CommandID = or(c.CommandID, id)
	case *events.CreateNet:
		c.CommandID = or(c.CommandID, id)
	case *events.AttachNet:
		c.CommandID = or(c.CommandID, id)
	}
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// query asks a read model: the get verb of kind, reflecting at least
// q.MinSeq.
func (f *fleet) query(kind events.Kind, q events.Query) (events.QueryReply, error) {
	return f.ask(kind, events.VerbGet, q)
}

// ask sends query verb on kind.
func (f *fleet) ask(kind events.Kind, verb string, q events.Query) (events.QueryReply, error) {
	f.t.Helper()
	data, _ := events.Marshal(q)
	resp, err := f.conn.Conn.Request(events.QuerySubject(kind, verb), data, 10*time.Second)
	if err != nil {
		return events.QueryReply{}, err
	}
	var reply events.QueryReply
	if err := events.Unmarshal(resp.Data, &reply); err != nil {
		return events.QueryReply{}, err
	}
	if reply.Error != nil {
		return events.QueryReply{}, reply.Error
	}
	return reply, nil
}

// vm asks the VM read model, reflecting at least minSeq.
func (f *fleet) vm(name string, minSeq uint64) (events.VMView, error) {
	reply, err := f.query(events.KindVM, events.Query{Name: name, MinSeq: minSeq, IncludeGone: true})
	if err != nil {
		return events.VMView{}, err
	}
	if len(reply.VMs) != 1 {
		return events.VMView{}, fmt.Errorf("get %s: %d VMs", name, len(reply.VMs))
	}
	return reply.VMs[0], nil
}

// host asks the host read model.
func (f *fleet) host(name string) (events.HostView, error) {
	reply, err := f.query(events.KindHost, events.Query{Name: name})
	if err != nil {
		return events.HostView{}, err
	}
	if len(reply.Hosts) != 1 {
		return events.HostView{}, fmt.Errorf("get %s: %d hosts", name, len(reply.Hosts))
	}
	return reply.Hosts[0], nil
}

// converged waits until the VM converged on its goal, and returns it.
func (f *fleet) converged(name string, minSeq uint64) events.VMView {
	f.t.Helper()
	var vm events.VMView
	limit := 20 * time.Second
	if f.qemu {
		limit = 2 * time.Minute // a QEMU guest converges once it is alive: slow on a loaded machine
	}
	waitFor(f.t, limit, name+" converged", func() error {
		var err error
		if vm, err = f.vm(name, minSeq); err != nil {
			return err
		}
		if !vm.Converged {
			return fmt.Errorf("goal %s@%d, observed %s@%d (fault %v)", vm.Desired, vm.Incarnation, vm.Observed.State, vm.Observed.Incarnation, vm.Observed.Fault)
		}
		return nil
	})
	return vm
}

// domainState is what libvirt itself says of the VM's domain on its host.
func (f *fleet) domainState(hostName, vm string) string {
	f.t.Helper()
	d, err := f.hosts[hostName].virt.Lookup(context.Background(), vm)
	if errors.Is(err, lv.ErrNotFound) {
		return "absent"
	}
	if err != nil {
		f.t.Fatalf("lookup %s on %s: %v", vm, hostName, err)
	}
	return d.State.String()
}

// agentTTL is the agents' liveness TTL: 2 s, or $LOOM_IT_TTL (to measure
// at the default, 10 s).
func agentTTL() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("LOOM_IT_TTL")); err == nil && d > 0 {
		return d
	}
	return 2 * time.Second
}

// waitFor polls cond until it returns nil, failing the test after timeout.
var waitFor = eventually.WaitFor

func pebbleDir(f *fleet) string { return filepath.Join(f.dir, "projections") }
