package projections

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// Defaults of Options.
const (
	// DefaultMaxBatch is the most events applied in one Pebble batch.
	DefaultMaxBatch = 1000
	// DefaultMaxBatchWait is how long a batch keeps collecting events
	// that are known to be on their way.
	DefaultMaxBatchWait = 5 * time.Millisecond
	// DefaultCachedRows is how many decoded rows of each table the runner
	// keeps between batches.
	DefaultCachedRows = 1 << 16
	// DefaultQueryWait bounds how long a query waits for its MinSeq.
	DefaultQueryWait = 5 * time.Second
	// DefaultQueryConcurrency bounds the queries waiting for MinSeq at once.
	DefaultQueryConcurrency = 64
)

// Options configures a Store. The zero value works.
type Options struct {
	// Logger receives what the runner reports; nil discards it.
	Logger *slog.Logger
	// OnCommit, if set, is called after each committed batch with the
	// last applied sequence and the names of the VMs whose rows changed,
	// sorted. It runs on the runner's goroutine before the next batch is
	// applied, so it must not block for long: hand the work on.
	OnCommit func(seq uint64, changedVMs []string)
	// MaxBatch bounds the events applied in one Pebble batch; zero means
	// DefaultMaxBatch.
	MaxBatch int
	// MaxBatchWait bounds how long a batch waits for events that the
	// stream says are pending; zero means DefaultMaxBatchWait. A batch
	// never waits once the runner has caught up with the stream.
	MaxBatchWait time.Duration
	// CachedRows is how many decoded rows of each table the runner keeps
	// between batches; zero means DefaultCachedRows, negative none.
	CachedRows int
	// QueryWait bounds how long a query waits for its MinSeq; zero means
	// DefaultQueryWait.
	QueryWait time.Duration
	// QueryConcurrency bounds the queries waiting for their MinSeq at
	// once; zero means DefaultQueryConcurrency.
	QueryConcurrency int
	// Unsafe switches protections off, for the tests that show what each
	// guards: never set it in production.
	Unsafe Unsafe
}

// Validate checks the options.
func (o *Options) Validate() error {
	switch {
	case o.MaxBatch < 0:
		return fmt.Errorf("max batch %d is negative", o.MaxBatch)
	case o.MaxBatchWait < 0:
		return fmt.Errorf("max batch wait %s is negative", o.MaxBatchWait)
	case o.QueryWait < 0:
		return fmt.Errorf("query wait %s is negative", o.QueryWait)
	case o.QueryConcurrency < 0:
		return fmt.Errorf("query concurrency %d is negative", o.QueryConcurrency)
	}
	return nil
}

func (o *Options) setDefaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	o.MaxBatch = cmp.Or(o.MaxBatch, DefaultMaxBatch)
	o.MaxBatchWait = cmp.Or(o.MaxBatchWait, DefaultMaxBatchWait)
	o.CachedRows = cmp.Or(o.CachedRows, DefaultCachedRows)
	o.QueryWait = cmp.Or(o.QueryWait, DefaultQueryWait)
	o.QueryConcurrency = cmp.Or(o.QueryConcurrency, DefaultQueryConcurrency)
}

// Errors of the store.
var (
	// ErrClosed means the store was closed.
	ErrClosed = errors.New("projections store closed")
	// ErrRunning means Run was called while another Run was running.
	ErrRunning = errors.New("projections runner already running")
)

// Store holds Loom's read models in Pebble and keeps them up to date with
// LOOM_EVENTS. Open it, Run it, read it from any goroutine, Close it after
// Run has returned.
type Store struct {
	opts    Options
	log     *slog.Logger
	db      *pebble.DB
	metrics *metrics

	// applied is the last applied stream sequence, as committed.
	applied atomic.Uint64
	// running is set while Run runs.
	running atomic.Bool

	// closeMu orders Close after the reads and commits in flight: they
	// hold it for reading, Close holds it for writing.
	closeMu sync.RWMutex
	closed  bool          // guarded by closeMu
	done    chan struct{} // closed by Close

	mu sync.Mutex // guards advanced
	// advanced is closed, and replaced, each time applied grows.
	advanced chan struct{}

	// runner is the state only the Run goroutine touches.
	runner *runner

	// queries are the query workers waiting for a MinSeq; Close cancels
	// and waits for them.
	queries queryWorkers
}

// Open opens the read models under dir, creating them if needed. It starts
// nothing: Run applies events, Close releases the directory.
func Open(dir string, opts Options) (*Store, error) {
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("projections options: %w", err)
	}
	opts.setDefaults()
	db, err := pebble.Open(dir, pebbleOptions(opts.Logger))
	if err != nil {
		return nil, fmt.Errorf("open projections %s: %w", dir, err)
	}
	s := &Store{
		opts:     opts,
		log:      opts.Logger,
		db:       db,
		metrics:  newMetrics(),
		done:     make(chan struct{}),
		advanced: make(chan struct{}),
	}
	rebuilt, err := checkLayout(db)
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open projections %s: %w", dir, err)
	}
	if rebuilt {
		s.log.Info("read models start from sequence 1: the directory held none, or rows of another layout", "dir", dir)
	}
	applied, err := s.loadApplied()
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open projections %s: %w", dir, err)
	}
	s.applied.Store(applied)
	s.metrics.appliedSeq.Set(float64(applied))
	s.runner = newRunner(s)
	s.queries.init(opts.QueryConcurrency)
	return s, nil
}

// pebbleOptions tunes Pebble for the runner: big batches of small rows,
// many of them rewritten batch after batch. A large memtable absorbs the
// rewrites, and letting L0 and the base level grow before compacting
// (Pebble's defaults: 4 files, 64 MiB) cut the CPU of a rebuild by about
// 10 % (BenchmarkRebuild, 1,000,000 events).
func pebbleOptions(log *slog.Logger) *pebble.Options {
	return &pebble.Options{
		FormatMajorVersion:    pebble.FormatNewest,
		MemTableSize:          64 << 20,
		L0CompactionThreshold: 8,
		L0StopWritesThreshold: 32,
		LBaseMaxBytes:         256 << 20,
		Logger:                pebbleLogger{log.With("component", "pebble")},
	}
}

func (s *Store) loadApplied() (uint64, error) {
	value, closer, err := s.db.Get(keyApplied)
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read applied sequence: %w", err)
	}
	defer func() { _ = closer.Close() }()
	return decodeSeq(value)
}

// Close cancels the queries waiting for a MinSeq, waits for them, and
// closes Pebble. Afterwards reads fail with ErrClosed and WaitFor with an
// events.CodeUnavailable fault; a Run still running stops with ErrClosed
// at its next commit.
func (s *Store) Close() error {
	s.queries.stop()
	s.closeMu.Lock()
	defer s.closeMu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	close(s.done)
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close projections: %w", err)
	}
	return nil
}

// Applied is the last stream sequence the read models reflect: every
// event at or below it is applied (or flagged), none above it.
func (s *Store) Applied() uint64 { return s.applied.Load() }

// WaitFor returns once the read models have applied stream sequence seq.
// If ctx ends first it returns a *events.Fault with events.CodeTimeout; if
// the store closes first, one with events.CodeUnavailable.
func (s *Store) WaitFor(ctx context.Context, seq uint64) error {
	for {
		s.mu.Lock()
		advanced := s.advanced
		s.mu.Unlock()
		applied := s.Applied()
		if applied >= seq {
			return nil
		}
		select {
		case <-advanced:
		case <-s.done:
			return events.Errorf(events.CodeUnavailable, "read models closed at sequence %d, before %d", applied, seq)
		case <-ctx.Done():
			return events.Errorf(events.CodeTimeout, "read models at sequence %d did not reach %d in time (%v); retrying is safe",
				s.Applied(), seq, ctx.Err())
		}
	}
}

// advance publishes a committed sequence to Applied and WaitFor.
func (s *Store) advance(seq uint64) {
	s.applied.Store(seq)
	s.mu.Lock()
	close(s.advanced)
	s.advanced = make(chan struct{})
	s.mu.Unlock()
}

// pebbleLogger sends Pebble's messages to slog.
type pebbleLogger struct{ log *slog.Logger }

func (l pebbleLogger) Infof(format string, args ...any) { l.log.Debug(fmt.Sprintf(format, args...)) }

func (l pebbleLogger) Errorf(format string, args ...any) { l.log.Error(fmt.Sprintf(format, args...)) }

// Fatalf reports an error Pebble cannot go on from; Pebble expects it not
// to return.
func (l pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	l.log.Error(msg)
	panic("pebble: " + msg)
}
