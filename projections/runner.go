package projections

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
)

// Retry bounds of the runner when the stream is missing or NATS is down.
const (
	retryMin = 100 * time.Millisecond
	retryMax = 5 * time.Second
)

// logEvery is the least time between two log lines of one kind.
const logEvery = time.Second

// Log keys.
const (
	keyCode       = "code"
	keyErr        = "err"
	keyReason     = "reason"
	keySeq        = "seq"
	keySubject    = "subject"
	keySuppressed = "suppressed"
)

// errConsumerStopped means the ordered consumer stopped delivering (its
// connection closed); the runner starts another.
var errConsumerStopped = errors.New("ordered consumer stopped")

// runner is the state only the Run goroutine touches.
type runner struct {
	hosts  *table[events.HostState]
	images *table[events.ImageState]
	nets   *table[events.NetState]
	vms    *table[events.VMState]
	leases *table[events.LeaseState]
	enc    *encoder
	// keys checks the signatures of observations the consumer's goroutine
	// could not check ahead (signatures.go).
	keys *hostkey.Verifier
	// batch is reused from one batch to the next.
	batch *batch
	// flagLog rate-limits the logs of flagged messages.
	flagLog limiter
}

func newRunner(s *Store) *runner {
	limit := s.opts.CachedRows
	r := &runner{
		hosts:   newHostTable(limit),
		images:  newTable(prefixImage, limit, blankImage, isBlankImage),
		nets:    newTable(prefixNet, limit, blankNet, isBlankNet),
		vms:     newTable(prefixVM, limit, blankVM, isBlankVM),
		leases:  newLeaseTable(limit),
		enc:     newEncoder(),
		keys:    hostkey.NewVerifier(),
		flagLog: limiter{every: logEvery},
	}
	r.batch = newBatch(s, r)
	return r
}

// storeError is a failure to write the read models: Run stops on it.
type storeError struct{ err error }

func (e *storeError) Error() string { return e.err.Error() }
func (e *storeError) Unwrap() error { return e.err }

// Run applies LOOM_EVENTS to the read models until ctx ends, then returns
// nil. It reads the stream with an ordered consumer from the sequence
// after Applied, and applies events in stream order, in batches, skipping
// any it has already applied. While the stream does not exist or NATS is
// down it retries with backoff. It returns an error only when the store
// cannot be written: ErrClosed after Close, or a Pebble failure. One Run at
// a time (ErrRunning).
func (s *Store) Run(ctx context.Context, js jetstream.JetStream) error {
	if !s.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer s.running.Store(false)
	retries := limiter{every: logEvery}
	wait := retryMin
	for {
		progressed, err := s.follow(ctx, js)
		if ctx.Err() != nil {
			return nil
		}
		var failed *storeError
		if errors.As(err, &failed) {
			return failed.err
		}
		if progressed {
			wait = retryMin
		}
		if ok, suppressed := retries.allow(time.Now()); ok {
			s.log.Warn("follow "+events.StreamEvents+"; retrying", keyErr, err, "in", wait, keySuppressed, suppressed)
		}
		if !sleep(ctx, wait) {
			return nil
		}
		wait = min(2*wait, retryMax)
	}
}

// follow applies the stream from the sequence after Applied until ctx
// ends or the consumer fails. progressed tells whether it applied anything.
func (s *Store) follow(ctx context.Context, js jetstream.JetStream) (progressed bool, err error) {
	feed, err := s.subscribe(ctx, js, s.Applied()+1)
	if err != nil {
		return false, err
	}
	defer feed.stop()
	deliveries := make([]delivery, 0, s.opts.MaxBatch)
	for {
		deliveries, err = s.collect(ctx, feed, deliveries[:0])
		if err != nil {
			return progressed, err
		}
		if err := s.applyDeliveries(deliveries); err != nil {
			return progressed, &storeError{err: err}
		}
		progressed = true
	}
}

// collect waits for a delivery, then takes what else is available, up to
// MaxBatch. While the stream says more is pending it waits up to
// MaxBatchWait for it; once the runner has caught up it returns at once, so
// a lone event is applied without delay.
func (s *Store) collect(ctx context.Context, feed *feed, batch []delivery) ([]delivery, error) {
	select {
	case d := <-feed.deliveries:
		batch = append(batch, d)
	case <-feed.failed:
		return nil, feed.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	var deadline <-chan time.Time
	for len(batch) < s.opts.MaxBatch {
		select {
		case d := <-feed.deliveries:
			batch = append(batch, d)
			continue
		default:
		}
		if batch[len(batch)-1].pending == 0 {
			return batch, nil
		}
		if deadline == nil {
			timer := time.NewTimer(s.opts.MaxBatchWait)
			defer timer.Stop()
			deadline = timer.C
		}
		select {
		case d := <-feed.deliveries:
			batch = append(batch, d)
		case <-deadline:
			return batch, nil
		case <-ctx.Done():
			return batch, nil // apply what arrived; the next collect sees ctx
		}
	}
	return batch, nil
}

// applyDeliveries applies deliveries as one batch and commits it, then
// tells Applied, WaitFor, the metrics and OnCommit.
func (s *Store) applyDeliveries(deliveries []delivery) error {
	start := time.Now()
	s.closeMu.RLock()
	if s.closed {
		s.closeMu.RUnlock()
		return ErrClosed
	}
	b := s.runner.batch
	b.reset(s.Applied())
	changedVMs, err := b.applyAll(deliveries)
	if err != nil {
		b.abandon()
		s.closeMu.RUnlock()
		return err
	}
	committed := b.last != s.Applied()
	if committed {
		b.committed()
		// Metrics before advance: whoever WaitFor wakes must find them
		// counting this batch already.
		s.metrics.observeBatch(b, time.Since(start))
		s.advance(b.last)
	}
	s.closeMu.RUnlock()
	if !committed {
		return nil
	}
	s.logFlagged(b.flagged)
	if s.opts.OnCommit != nil {
		s.opts.OnCommit(b.last, changedVMs)
	}
	return nil
}

// applyAll applies deliveries and commits them, if any was new.
func (b *batch) applyAll(deliveries []delivery) (changedVMs []string, err error) {
	for i := range deliveries {
		if err := b.apply(&deliveries[i]); err != nil {
			return nil, err
		}
	}
	if b.last == b.s.Applied() {
		return nil, nil // all redeliveries
	}
	return b.commit()
}

func (s *Store) logFlagged(flagged []Flagged) {
	for _, f := range flagged {
		if ok, suppressed := s.runner.flagLog.allow(time.Now()); ok {
			s.log.Warn("event flagged and skipped", keySeq, f.Seq, keySubject, f.Subject,
				keyCode, f.Code.Name(), keyReason, f.Reason, keySuppressed, suppressed)
		}
	}
}

// feed is an ordered consumer delivering decoded messages.
type feed struct {
	deliveries chan delivery
	// failed is closed when the consumer stops; err then says why.
	failed chan struct{}
	err    error
	// quit ends the callback's wait to hand a delivery over.
	quit     chan struct{}
	consumer jetstream.ConsumeContext
	// forget deletes the server's consumer once the feed has stopped.
	forget func()
}

// subscribe starts an ordered consumer on LOOM_EVENTS from seq on. It
// decodes each message on the consumer's goroutine, so decoding overlaps
// applying.
func (s *Store) subscribe(ctx context.Context, js jetstream.JetStream, from uint64) (*feed, error) {
	stream, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return nil, fmt.Errorf("look up stream %s: %w", events.StreamEvents, err)
	}
	consumer, err := bus.OrderedConsumer(ctx, js, stream, orderedConfig(from))
	if err != nil {
		return nil, fmt.Errorf("ordered consumer on %s from %d: %w", events.StreamEvents, from, err)
	}
	f := &feed{deliveries: make(chan delivery, 2*s.opts.MaxBatch), failed: make(chan struct{}), quit: make(chan struct{}),
		forget: func() { bus.Forget(js, events.StreamEvents, consumer) }}
	var once sync.Once
	fail := func(err error) {
		once.Do(func() {
			f.err = err
			close(f.failed)
		})
	}
	consumeErrors := limiter{every: logEvery}
	keys := hostkey.NewVerifier() // the callback's own: it runs on one goroutine
	f.consumer, err = consumer.Consume(func(msg jetstream.Msg) {
		meta, err := msg.Metadata()
		if err != nil {
			fail(fmt.Errorf("message on %s: %w", msg.Subject(), err))
			return
		}
		d := decodeDelivery(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data(), msg.Headers(), meta.NumPending, keys)
		select {
		case f.deliveries <- d:
		case <-f.quit:
		}
	}, pullMaxMessages(s.opts.MaxBatch), jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		if ok, suppressed := consumeErrors.allow(time.Now()); ok {
			s.log.Warn("consume "+events.StreamEvents, keyErr, err, keySuppressed, suppressed)
		}
	}))
	if err != nil {
		f.forget()
		return nil, fmt.Errorf("consume %s from %d: %w", events.StreamEvents, from, err)
	}
	go func() {
		select {
		case <-f.consumer.Closed():
			fail(errConsumerStopped)
		case <-f.quit:
		}
	}()
	return f, nil
}

// stop stops the consumer and waits until it has stopped.
func (f *feed) stop() {
	close(f.quit)
	f.consumer.Stop()
	<-f.consumer.Closed()
	f.forget()
}

// orderedConfig is the consumer of both the runner and the replay
// benchmark: the whole of LOOM_EVENTS, from seq on.
//
// It has no subject filter. The stream holds only loom.evt.> and
// loom.obs.> (bus.StreamConfigs), and a consumer filtered on those two
// wildcards was measured 100 times slower than an unfiltered one
// (nats-server 2.15.2, 20,000 messages: 8.9 s against 80 ms). A message
// on any other subject would be flagged, not applied.
func orderedConfig(from uint64) jetstream.OrderedConsumerConfig {
	return jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:   from,
	}
}

// pullMaxMessages sizes the consumer's pull requests to a batch.
func pullMaxMessages(maxBatch int) jetstream.PullConsumeOpt {
	return jetstream.PullMaxMessages(max(2*maxBatch, 500))
}

// limiter lets one log line of a kind through per period and counts the
// ones it held back.
type limiter struct {
	every time.Duration

	mu         sync.Mutex // guards the fields below
	last       time.Time
	suppressed int
}

// allow tells whether to log now, and how many lines were held back since
// the last one.
func (l *limiter) allow(now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		return false, 0
	}
	l.last, suppressed, l.suppressed = now, l.suppressed, 0
	return true, suppressed
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
