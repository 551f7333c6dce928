package handlers

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"
	"golang.org/x/sync/singleflight"

	"github.com/loomctl/loom/events"
)

// Defaults of Config.
const (
	// DefaultConcurrency is how many requests are handled at once.
	DefaultConcurrency = 64
	// DefaultRequestTimeout bounds the handling of one request.
	DefaultRequestTimeout = 5 * time.Second
	// DefaultMaxAttempts bounds the decide-and-append attempts of one step
	// when other writers keep changing its aggregate.
	DefaultMaxAttempts = 8
	// DefaultReconcileInterval is how often the scheduler looks for
	// interrupted creates and orphaned allocations.
	DefaultReconcileInterval = 5 * time.Second
	// DefaultCacheSize bounds the VMs the write-through cache keeps.
	DefaultCacheSize = 1 << 16
)

// AnonymousActor is the actor of a command that names none, on an open bus.
const AnonymousActor = "anonymous"

// MaxActorLen bounds the actor a command names.
const MaxActorLen = 256

// hostListAge is how long a listing of the hosts' names is used before the
// Reader is asked again; hosts registered here are known at once.
const hostListAge = time.Second

// Keys of log attributes.
const (
	keyCommand = "command"
	keyErr     = "err"
	keyHost    = "host"
	keyReason  = "reason"
	keySubject = "subject"
	keyVM      = "vm"
)

// Config configures a Service. JS, Conn and Reader are required; the zero
// value of every other field means its default.
type Config struct {
	// JS appends events to LOOM_EVENTS.
	JS jetstream.JetStream
	// Conn answers requests and reads subjects through the stream leader.
	Conn *nats.Conn
	// Reader is the read side: aggregates, command results, its position.
	Reader Reader
	// Now is the clock stamped on events; nil means time.Now.
	Now func() time.Time
	// Logger receives the service's logs; nil discards them.
	Logger *slog.Logger
	// Concurrency bounds the requests handled at once; zero means
	// DefaultConcurrency. Requests beyond it wait in the subscription.
	Concurrency int
	// RequestTimeout bounds one request; zero means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// MaxAttempts bounds the attempts of one step; zero means
	// DefaultMaxAttempts.
	MaxAttempts int
	// ReconcileInterval is the scheduler's period; zero means
	// DefaultReconcileInterval.
	ReconcileInterval time.Duration
	// CacheSize bounds the cached VMs; zero means DefaultCacheSize.
	CacheSize int
	// Actors says who sent each command; nil means ClaimedActors, the
	// sender's own word, which is all an open bus knows.
	Actors Actors
	// Unsafe switches protections off, for the tests that show what each
	// guards: never set it in production.
	Unsafe Unsafe
	// DetectorMargin is m_d, how long past a renewal's TTL the failure
	// detector waits before it claims a host lost; zero means
	// DefaultDetectorMargin.
	DetectorMargin time.Duration
	// DetectInterval is the failure detector's period; zero means
	// DefaultDetectInterval.
	DetectInterval time.Duration
}

// Validate checks that the required fields are set and the others are not
// negative.
func (c *Config) Validate() error {
	switch {
	case c.JS == nil:
		return errors.New("handlers: JS is required")
	case c.Conn == nil:
		return errors.New("handlers: Conn is required")
	case c.Reader == nil:
		return errors.New("handlers: Reader is required")
	case c.Concurrency < 0 || c.RequestTimeout < 0 || c.MaxAttempts < 0 || c.ReconcileInterval < 0 || c.CacheSize < 0 ||
		c.DetectorMargin < 0 || c.DetectInterval < 0:
		return errors.New("handlers: negative limit")
	}
	return nil
}

func (c *Config) setDefaults() {
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Actors == nil {
		c.Actors = ClaimedActors{}
	}
	c.Concurrency = cmp.Or(c.Concurrency, DefaultConcurrency)
	c.RequestTimeout = cmp.Or(c.RequestTimeout, DefaultRequestTimeout)
	c.MaxAttempts = cmp.Or(c.MaxAttempts, DefaultMaxAttempts)
	c.ReconcileInterval = cmp.Or(c.ReconcileInterval, DefaultReconcileInterval)
	c.CacheSize = cmp.Or(c.CacheSize, DefaultCacheSize)
	c.DetectorMargin = cmp.Or(c.DetectorMargin, DefaultDetectorMargin)
	c.DetectInterval = cmp.Or(c.DetectInterval, DefaultDetectInterval)
}

// Unsafe switches protections of the handlers off, one by one.
type Unsafe struct {
	// NarrowExclusiveCheck makes an exclusive grant check only its own
	// subject instead of the whole resource.
	NarrowExclusiveCheck bool
}

// Service serves Loom's commands: it decides each against current state and
// appends the events with optimistic concurrency. Add its endpoints to a
// micro service with AddEndpoints, run its scheduler with RunScheduler, and
// Close it after the micro service has stopped.
type Service struct {
	cfg Config
	log *slog.Logger

	// publisher appends events; it is cfg.JS, which tests wrap.
	publisher jetstream.Publisher
	// stepHook, when set by a test, runs before each step and fails the
	// step if it returns an error: a crash between steps.
	stepHook func(c *command, index int) error
	// markerHook, when set by a test, runs just before the failure
	// detector publishes a lost marker; unfencedMarkers switches off the
	// marker's check against the renewal it supersedes, to show what that
	// check protects.
	markerHook      func(host string)
	unfencedMarkers bool

	// detectorPasses counts the failure detector's passes, for tests.
	detectorPasses atomic.Int64

	vms    *table[events.VMState]
	hosts  *table[hostView]
	images *table[events.ImageState]
	nets   *table[events.NetState]
	locks  locker
	holds  holds
	names  hostNames

	// nudge wakes the scheduler.
	nudge   chan struct{}
	metrics *metrics

	// slots holds one token per request in flight.
	slots chan struct{}
	// base is the parent of request contexts; cancel ends them.
	base   context.Context
	cancel context.CancelFunc
	// inflight counts requests being handled.
	inflight sync.WaitGroup
	mu       sync.Mutex // guards closed
	closed   bool
}

// hostNames are the names of the hosts the Reader knows, listed at most
// every hostListAge.
type hostNames struct {
	// listing lets concurrent callers share one listing.
	listing singleflight.Group

	mu     sync.Mutex // guards names, listed and refreshed
	names  []string
	listed time.Time // when names were listed (this process's clock)
	// refreshed is when every host was last reloaded after no host had room.
	refreshed time.Time
}

// New makes a Service. It starts nothing: requests are served once its
// endpoints are added, and the scheduler runs in RunScheduler.
func New(cfg Config) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.setDefaults()
	s := &Service{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "handlers"),
		publisher: cfg.JS,
		holds:     holds{byUID: map[string]hold{}},
		nudge:     make(chan struct{}, 1),
		metrics:   newMetrics(),
		slots:     make(chan struct{}, cfg.Concurrency),
	}
	s.base, s.cancel = context.WithCancel(context.Background())
	s.vms = newTable(events.KindVM, cfg.CacheSize, s.loadVM, (*events.VMState).Apply,
		// A deleting VM becomes gone by its host's observation, on a subject
		// this cache does not follow: read it fresh each time.
		func(vm *events.VMState) bool { return vm.Phase != events.PhaseDeleting })
	s.hosts = newTable(events.KindHost, 0, s.loadHost, (*hostView).apply, nil)
	s.images = newTable(events.KindImage, 0, s.loadImage, (*events.ImageState).Apply, nil)
	s.nets = newTable(events.KindNet, 0, s.loadNet, (*events.NetState).Apply, nil)
	return s, nil
}

func (s *Service) loadVM(ctx context.Context, name string) (events.VMState, events.Head, error) {
	vm, head, err := s.cfg.Reader.VM(ctx, name)
	if vm.Name == "" {
		vm.Name = name
	}
	return vm, head, err
}

func (s *Service) loadHost(ctx context.Context, name string) (hostView, events.Head, error) {
	h, head, err := s.cfg.Reader.Host(ctx, name)
	if h.Name == "" {
		h.Name = name
	}
	return newHostView(h), head, err
}

func (s *Service) loadImage(ctx context.Context, name string) (events.ImageState, events.Head, error) {
	img, head, err := s.cfg.Reader.Image(ctx, name)
	if img.Name == "" {
		img.Name = name
	}
	return img, head, err
}

func (s *Service) loadNet(ctx context.Context, name string) (events.NetState, events.Head, error) {
	n, head, err := s.cfg.Reader.Net(ctx, name)
	if n.Name == "" {
		n.Name = name
	}
	return n, head, err
}

// serveFunc handles one decoded request and says what to reply.
type serveFunc func(ctx context.Context, req *request) *events.Reply

// AddEndpoints adds an endpoint for every command to svc, each on its
// loom.cmd.<kind>.<verb> subject, in svc's queue group.
func (s *Service) AddEndpoints(svc micro.Service) error {
	endpoints := []struct {
		kind  events.Kind
		verb  string
		serve serveFunc
	}{
		{events.KindHost, events.VerbRegister, s.serveRegisterHost},
		{events.KindHost, events.VerbCordon, s.serveCordon(false)},
		{events.KindHost, events.VerbUncordon, s.serveCordon(true)},
		{events.KindImage, events.VerbRegister, s.serveRegisterImage},
		{events.KindVM, events.VerbCreate, s.serveCreate},
		{events.KindVM, events.VerbStart, s.serveStart(events.VerbStart)},
		{events.KindVM, events.VerbStop, s.serveGoal(events.VerbStop)},
		{events.KindVM, events.VerbPause, s.serveGoal(events.VerbPause)},
		{events.KindVM, events.VerbResume, s.serveStart(events.VerbResume)},
		{events.KindVM, events.VerbDelete, s.serveDelete},
		{events.KindVM, events.VerbCheckpoint, s.serveCheckpoint},
		{events.KindVM, events.VerbRestore, s.serveRestore},
		{events.KindVM, events.VerbDeleteCheckpoint, s.serveDeleteCheckpoint},
		{events.KindVM, events.VerbSchedule, s.serveSchedule},
		{events.KindVM, events.VerbMigrate, s.serveMigrate},
		{events.KindNet, events.VerbCreate, s.serveCreateNet},
		{events.KindNet, events.VerbAttach, s.serveAttachNet},
		{events.KindLease, events.VerbAcquire, s.serveAcquire},
		{events.KindLease, events.VerbRelease, s.serveRelease},
		{events.KindLease, events.VerbBreak, s.serveBreak},
	}
	for _, ep := range endpoints {
		subject := events.CommandSubject(ep.kind, ep.verb)
		name := string(ep.kind) + "_" + ep.verb
		if err := svc.AddEndpoint(name, s.handler(ep.serve), micro.WithEndpointSubject(subject)); err != nil {
			return fmt.Errorf("add endpoint %s: %w", subject, err)
		}
	}
	return nil
}

// handler hands each request to a worker goroutine, at most Concurrency at
// once: micro calls an endpoint's handler on one goroutine, and a command
// waits on the bus for most of its time. When every worker is busy, the
// handler blocks and requests queue in the subscription.
func (s *Service) handler(serve serveFunc) micro.Handler {
	return micro.HandlerFunc(func(r micro.Request) {
		req := &request{subject: r.Subject(), reply: r.Reply(), data: r.Data(), header: nats.Header(r.Headers())}
		req.format = events.SniffFormat(req.data)
		if !s.begin() {
			s.respond(req, req.format, failed(events.Errorf(events.CodeUnavailable, "the service is shutting down; retrying is safe"), nil))
			return
		}
		go func() {
			defer s.end()
			start := time.Now()
			ctx, cancel := context.WithTimeout(s.base, s.cfg.RequestTimeout)
			defer cancel()
			reply := serve(ctx, req)
			s.respond(req, req.format, reply)
			s.metrics.commands.WithLabelValues(req.subject, outcome(reply)).Inc()
			s.metrics.latency.WithLabelValues(req.subject).Observe(time.Since(start).Seconds())
			if f := reply.Error; f != nil && (f.Code == events.CodeInternal || f.Code == events.CodeUnavailable) {
				s.log.Warn("command failed", keySubject, req.subject, keyErr, f)
			}
		}()
	})
}

// begin takes a worker slot, waiting for one; false once the service closes.
func (s *Service) begin() bool {
	select {
	case s.slots <- struct{}{}:
	case <-s.base.Done():
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		<-s.slots
		return false
	}
	s.inflight.Add(1)
	s.metrics.inflight.Inc()
	return true
}

func (s *Service) end() {
	s.metrics.inflight.Dec()
	<-s.slots
	s.inflight.Done()
}

// Close stops taking requests and waits for those in flight to finish; when
// ctx ends first, it cancels them, waits, and returns ctx's error. A create
// cut short is completed by a scheduler later. Stop the micro service first.
func (s *Service) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.inflight.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.cancel()
		<-done
		return ctx.Err()
	}
}
