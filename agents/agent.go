package agents

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/oklog/ulid/v2"
	"golang.org/x/sync/errgroup"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/hostkey"
)

// Defaults applied to zero Config fields.
const (
	DefaultStopGrace       = 30 * time.Second
	DefaultBootTimeout     = 2 * time.Minute
	DefaultTTL             = 10 * time.Second
	DefaultWorkers         = 8
	DefaultRetryBackoff    = 500 * time.Millisecond
	DefaultMaxRetryBackoff = 30 * time.Second
	DefaultResync          = time.Minute
)

// Log keys.
const (
	logVM          = "vm"
	logErr         = "err"
	logSubject     = "subject"
	logIncarnation = "incarnation"
	logDomain      = "domain"
	logSkipped     = "skipped"
	logFailures    = "failures"
	logRetryIn     = "retry_in"
	logSeq         = "seq"
	logState       = "state"
)

// Config configures an Agent. Host, Conn, JS and one of Hypervisor or Dial
// are required; every other zero field takes its default.
type Config struct {
	// Host is the name of the host this agent owns.
	Host string
	// HostKey, if set, signs every observation the agent appends (see
	// events/hostkey); its public half is what the host is registered
	// with. Nil signs nothing: the legacy mode, in which the read models
	// take the host's observations from anyone who may publish them, and
	// flag them all once the host is registered with a key.
	HostKey *hostkey.Key
	// Conn is the NATS connection; reads that must not be stale go through it.
	Conn *nats.Conn
	// JS is JetStream on Conn.
	JS jetstream.JetStream
	// Hypervisor is the first connection to libvirtd; nil means call Dial.
	// Run takes ownership: it closes it when the connection is lost or Run ends.
	Hypervisor Hypervisor
	// Dial opens a new connection to libvirtd after the last one was lost.
	// Run owns and closes what it returns. Nil means a lost connection ends Run.
	Dial func(ctx context.Context) (Hypervisor, error)
	// StopGrace is how long a guest has to power off after a shutdown request
	// before its domain is destroyed; zero means DefaultStopGrace.
	StopGrace time.Duration
	// TTL is how long each liveness renewal keeps the host alive; zero means
	// DefaultTTL.
	TTL time.Duration
	// RenewInterval is the period of liveness renewals; zero means TTL/3.
	RenewInterval time.Duration
	// Workers bounds how many VMs are reconciled at once; zero means
	// DefaultWorkers.
	Workers int
	// RetryBackoff is the first delay before retrying a failed step or
	// connection, doubled on each further failure; zero means
	// DefaultRetryBackoff.
	RetryBackoff time.Duration
	// MaxRetryBackoff caps that delay; zero means DefaultMaxRetryBackoff (or
	// RetryBackoff, if larger).
	MaxRetryBackoff time.Duration
	// Resync is the period of full comparisons of every VM with libvirt, which
	// catches what lifecycle events missed; zero means DefaultResync.
	Resync time.Duration
	// FenceMargin is m_a: the fencing deadline after an acknowledged renewal
	// is TTL - FenceMargin from just before it was sent. Zero means TTL/5.
	FenceMargin time.Duration
	// FencePolicy is what happens to a running domain holding an exclusive
	// lease when the fencing deadline passes; empty means FencePause.
	FencePolicy FencePolicy
	// FenceSocket, if set, is the unixgram socket where `loom fence` for
	// this host listens: each acknowledged renewal's deadline is sent there.
	FenceSocket string
	// ClockRate scales every span the agent measures on its own clock (its
	// fencing deadline): above 1 it models a clock running slow, which
	// believes less time passed than did. Zero means 1. For tests of the
	// margins' inequality; never set it in production.
	ClockRate float64
	// Unsafe switches protections off, for the tests that show what each
	// guards: never set it in production.
	Unsafe Unsafe
	// StorageDir, if set, is where this host keeps its VMs' disks: a qcow2
	// overlay on the VM's image each, and its serial console's log. Empty
	// (simulated hosts) keeps none.
	StorageDir string
	// MigrateURI, if set, is this host's libvirtd as other hosts' daemons
	// dial it for a live migration (qemu+tls://node-7/system); without it
	// the host receives no migration. MigrateListen is where this host's
	// QEMU listens for a migration's memory and disk: "unix:DIR" or
	// "tcp:ADDRESS" (empty: libvirt's default, TCP to the host's name).
	MigrateURI    string
	MigrateListen string
	// TunnelEndpoint is this host's address on the underlay, where the
	// VXLAN traffic of its VMs' addresses arrives; other hosts send it
	// there (the control plane maps each address to it).
	TunnelEndpoint string
	// Overlay, with TunnelEndpoint, makes the agent program this host's
	// side of every virtual network (netmap.go); nil programs none.
	Overlay *OverlayConfig
	// AliveMarker, if set, is what a guest prints on its serial console
	// once it is up: the agent reports progress until it shows, for at
	// most BootTimeout (zero means DefaultBootTimeout).
	AliveMarker string
	BootTimeout time.Duration
	// Logger receives the agent's logs; nil discards them.
	Logger *slog.Logger
	// Now stamps the events the agent writes; nil means time.Now. Delays and
	// deadlines use the monotonic clock regardless.
	Now func() time.Time
}

// withDefaults returns cfg with zero fields set to their defaults.
func (cfg Config) withDefaults() Config {
	if cfg.StopGrace == 0 {
		cfg.StopGrace = DefaultStopGrace
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.RenewInterval == 0 {
		cfg.RenewInterval = cfg.TTL / 3
	}
	if cfg.Workers == 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff = DefaultRetryBackoff
	}
	if cfg.MaxRetryBackoff == 0 {
		cfg.MaxRetryBackoff = max(DefaultMaxRetryBackoff, cfg.RetryBackoff)
	}
	if cfg.Resync == 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.FenceMargin == 0 {
		cfg.FenceMargin = cfg.TTL / 5
	}
	if cfg.FencePolicy == "" {
		cfg.FencePolicy = FencePause
	}
	if cfg.ClockRate == 0 {
		cfg.ClockRate = 1
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = DefaultBootTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return cfg
}

// Validate reports whether cfg, after defaults, can run an agent.
func (cfg Config) Validate() error {
	cfg = cfg.withDefaults()
	switch {
	case cfg.Conn == nil || cfg.JS == nil:
		return errors.New("agent config: Conn and JS are required")
	case cfg.Hypervisor == nil && cfg.Dial == nil:
		return errors.New("agent config: one of Hypervisor and Dial is required")
	case cfg.StopGrace < 0 || cfg.TTL < 0 || cfg.RenewInterval < 0 || cfg.RetryBackoff < 0 ||
		cfg.MaxRetryBackoff < 0 || cfg.Resync < 0:
		return errors.New("agent config: durations must not be negative")
	case cfg.RenewInterval >= cfg.TTL:
		return fmt.Errorf("agent config: renew interval %s must be shorter than the TTL %s", cfg.RenewInterval, cfg.TTL)
	case cfg.Workers < 0:
		return fmt.Errorf("agent config: workers %d must not be negative", cfg.Workers)
	case cfg.FenceMargin < 0 || cfg.TTL-cfg.FenceMargin <= cfg.RenewInterval:
		return fmt.Errorf("agent config: fence margin %s leaves TTL - margin no longer than the renew interval %s: the host would fence between renewals",
			cfg.FenceMargin, cfg.RenewInterval)
	case cfg.MaxRetryBackoff < cfg.RetryBackoff:
		return fmt.Errorf("agent config: max retry backoff %s is below retry backoff %s", cfg.MaxRetryBackoff, cfg.RetryBackoff)
	}
	if err := events.ValidateName("host", cfg.Host); err != nil {
		return fmt.Errorf("agent config: %w", err)
	}
	return nil
}

// Agent is the host agent of one host: it reconciles libvirt with the goal
// states of the host's VMs and reports what it observes. See the package
// documentation for the protocol it follows.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	actor   string // Origin.Actor of everything the agent writes
	id      string // this process's ULID: renewals name it, msg ids include it
	metrics *metrics
	queue   *queue
	dialLog throttle
	started atomic.Bool // Run was called
	// fence is the fencing deadline the renewals keep ahead.
	fence *fence
	// fencerLog throttles the logs of a `loom fence` not listening.
	fencerLog throttle
	// leases are the subscriptions to the leases the goals name.
	leases leaseWatch
	// lostWatermark is the LOOM_EVENTS sequence read when the agent learned
	// its host had been declared lost: grants up to it are never used.
	lostWatermark atomic.Uint64

	// onReconciled, when set (tests), is called after each reconcile of a VM
	// that had a connection to libvirtd.
	onReconciled func(vm string)

	// mu guards the fields below. It is never held while calling out
	// (NATS, libvirt) nor together with queue.mu.
	mu sync.Mutex
	// vms is what the agent knows of each VM: its goal and its last report.
	vms map[string]*vmRecord
	// hv is the current connection to libvirtd, nil while there is none.
	hv Hypervisor
	// hvDown is true while libvirtd is known to be unreachable.
	hvDown bool
	// snapshotDone is true once every goal standing at start was read.
	snapshotDone bool
	// orphans are the orphan domains reported and not cleared, by name;
	// nets are the virtual networks as the net follower folds them (under
	// mu; each state is replaced, never changed, by Apply).
	nets map[string]*events.NetState
	// agentReported says this process reported itself on the host's
	// subject (host.agent_started).
	agentReported bool
	// hostHead is where the host's observation subject stands.
	orphans  map[string]events.HostOrphanFound
	hostHead events.Head
	// orphanFailures counts orphan scans failed in a row.
	orphanFailures int
}

// vmRecord is what the agent knows of one VM.
type vmRecord struct {
	// goal is the newest goal read; hasGoal says whether there is one.
	goal    events.Goal
	hasGoal bool
	// reported is the last observation on the VM's subject; State is empty
	// when unknown (the subject ends with a progress report or is unreadable).
	reported events.VMObserved
	// head is where the VM's observation subject stands.
	head events.Head
	// acted is true when steps were taken since the last report, so a state
	// that differs from the report is the agent's own doing, not a drift.
	acted bool
	// failures counts failed reconciles in a row; holdUntil delays the next.
	failures  int
	holdUntil time.Time
	// drifts counts unrequested changes in a row, the last at lastDrift.
	drifts    int
	lastDrift time.Time
	// lastProgress is when the last progress report was published.
	lastProgress time.Time
	// leaseChanged is set when an event on a lease the goal names arrived
	// since the last reconcile (notify.go).
	leaseChanged bool
	// stepReported and dropReported are the incarnations whose checkpoint
	// step and drop list this process last reported on: they are not done
	// again.
	stepReported, dropReported uint64
	// migrationReported is the migration this process (or, after a
	// restart, the last report) said the end of; cancelMigration cancels
	// the one under way here.
	migrationReported string
	cancelMigration   context.CancelFunc
}

// New makes an Agent from cfg. It starts nothing: call Run.
func New(cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	a := &Agent{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "agent", "host", cfg.Host),
		actor:     "agent:" + cfg.Host,
		id:        ulid.MustNew(ulid.Now(), rand.Reader).String(),
		metrics:   newMetrics(cfg.Host),
		queue:     newQueue(),
		dialLog:   throttle{period: time.Minute},
		fencerLog: throttle{period: time.Minute},
		vms:       map[string]*vmRecord{},
		fence:     newFence(),
		orphans:   map[string]events.HostOrphanFound{},
	}
	a.fence.off = cfg.Unsafe.NoFence
	return a, nil
}

// Run runs the agent until ctx ends: it renews the host's liveness, reads
// what it last reported, follows the host's goals, keeps a connection to
// libvirtd and reconciles each VM with its goal. It returns nil when ctx
// ends, and an error only when it cannot go on (a lost libvirt connection
// without Config.Dial). Call Run once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.started.CompareAndSwap(false, true) {
		return errors.New("agent: Run called twice")
	}
	defer a.stopLeaseWatch()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.renewLoop(ctx) })
	g.Go(func() error {
		if !a.loadReports(ctx) {
			if a.cfg.Hypervisor != nil {
				if err := a.cfg.Hypervisor.Close(); err != nil {
					a.log.Debug("close libvirt connection", logErr, err)
				}
			}
			return nil
		}
		work, ctx := errgroup.WithContext(ctx)
		for range a.cfg.Workers {
			work.Go(func() error { return a.work(ctx) })
		}
		work.Go(func() error { return a.runHypervisor(ctx) })
		work.Go(func() error { return a.followGoals(ctx) })
		work.Go(func() error { return a.resyncLoop(ctx) })
		work.Go(func() error { return a.fenceLoop(ctx) })
		work.Go(func() error { return a.followNets(ctx) })
		return work.Wait()
	})
	return g.Wait()
}

// loadReports reads what the agent last reported, retrying until it
// succeeds; false means ctx ended first.
func (a *Agent) loadReports(ctx context.Context) bool {
	log := throttle{period: time.Minute}
	for failures := 0; ; failures++ {
		err := a.loadObservations(ctx)
		if err == nil {
			err = a.loadOrphans(ctx)
		}
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if ok, skipped := log.allow(); ok {
			a.log.Warn("read own observations; retrying", logErr, err, logSkipped, skipped)
		}
		if !sleepCtx(ctx, a.backoff(failures+1)) {
			return false
		}
	}
}

// work runs queued keys until ctx ends. It starts once the host's liveness
// is established: before the first acknowledged renewal, the agent has no
// fencing deadline and acts on nothing.
func (a *Agent) work(ctx context.Context) error {
	select {
	case <-a.fence.first:
	case <-ctx.Done():
		return nil
	}
	for {
		key, ok := a.queue.next(ctx)
		if !ok {
			return nil
		}
		if key == orphanScanKey {
			a.scanOrphans(ctx)
		} else {
			a.reconcile(ctx, key)
		}
		a.queue.done(key)
	}
}

// resyncLoop queues every VM and an orphan scan every Config.Resync.
func (a *Agent) resyncLoop(ctx context.Context) error {
	ticker := time.NewTicker(a.cfg.Resync)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			a.pruneLeaseWatch()
			a.enqueueAll()
		}
	}
}

// enqueueAll queues every VM with a goal, and an orphan scan.
func (a *Agent) enqueueAll() {
	a.mu.Lock()
	names := make([]string, 0, len(a.vms))
	for name, v := range a.vms {
		if v.hasGoal {
			names = append(names, name)
		}
	}
	a.mu.Unlock()
	for _, name := range names {
		a.queue.add(name, time.Time{})
	}
	a.queue.add(orphanScanKey, time.Time{})
}

// vmLocked returns the record of name, creating it.
func (a *Agent) vmLocked(name string) *vmRecord {
	v, ok := a.vms[name]
	if !ok {
		v = &vmRecord{}
		a.vms[name] = v
	}
	return v
}

// backoff is the delay before the n-th retry (n ≥ 1).
func (a *Agent) backoff(n int) time.Duration {
	d := a.cfg.RetryBackoff
	for i := 1; i < n && d < a.cfg.MaxRetryBackoff; i++ {
		d *= 2
	}
	return min(d, a.cfg.MaxRetryBackoff)
}

// sleepCtx waits d; false means ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// throttle rate-limits a repeated log line: the first passes, then at most
// one per period, telling how many were skipped.
type throttle struct {
	period time.Duration

	mu      sync.Mutex // guards the fields below
	last    time.Time
	skipped int
}

// allow tells whether to log now, and how many were skipped since the last.
func (t *throttle) allow() (ok bool, skipped int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if !t.last.IsZero() && now.Sub(t.last) < t.period {
		t.skipped++
		return false, 0
	}
	skipped, t.last, t.skipped = t.skipped, now, 0
	return true, skipped
}
