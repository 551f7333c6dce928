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
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/oklog/ulid/v2"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// benchLease measures lease acquire+release pairs/s with cfg.clients
// concurrent clients over TCP loopback against the whole control plane:
// shared grants of one image (a holder per client) and exclusive grants
// (an image per client). The baseline is the same two appends per pair as
// raw JetStream publishes with expected-last-subject-sequence at the same
// concurrency, each client on its own subject. It measures at cfg.sync and,
// unless that already is "always", again with every write synced. Last it
// measures what group-committing concurrent commands could gain under
// sync always: atomic batches of cfg.clients checked messages against as
// many single synced publishes. Every run has a fresh embedded server.
func benchLease(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	if cfg.clients < 1 || cfg.clients > bus.MaxBatch {
		return fmt.Errorf("--clients %d: lease wants 1 to %d (an atomic batch holds at most %d messages)", cfg.clients, bus.MaxBatch, bus.MaxBatch)
	}
	log := quietLogger()
	if cfg.verbose {
		log = newLogger(false)
	}
	fmt.Fprintf(w, "  %d clients over TCP loopback, %s each run; a pair = acquire + release (two appends)\n", cfg.clients, cfg.duration)
	always := cfg.sync == "" || cfg.sync == "always"
	figures, err := leaseFiguresAt(ctx, cfg, filepath.Join(dir, "configured"), log)
	if err != nil {
		return err
	}
	label := "sync=" + cfg.sync + " (this run's --sync)"
	if always {
		label = "sync=always (this run's --sync: every write fsynced before its ack)"
	}
	printLeaseFigures(w, label, cfg.clients, figures)

	synced := cfg
	synced.sync = "always"
	if always {
		fmt.Fprintf(w, "\n  --sync is already always: the figures above are the synced ones\n")
	} else {
		if figures, err = leaseFiguresAt(ctx, synced, filepath.Join(dir, "always"), log); err != nil {
			return err
		}
		printLeaseFigures(w, "sync=always (every write fsynced before its ack)", cfg.clients, figures)
	}

	batch, err := batchRate(ctx, synced, filepath.Join(dir, "batch"), log)
	if err != nil {
		return fmt.Errorf("atomic batches: %w", err)
	}
	k := cfg.clients
	fmt.Fprintf(w, "\n  -- group commit under sync=always: %d messages, each on its own subject with a subject check\n", k)
	fmt.Fprintf(w, "  %-40s %10.0f msgs/s (the raw run above)\n", fmt.Sprintf("%d clients, single synced publishes", k), figures.rawPublishes)
	fmt.Fprintf(w, "  %-40s %10.0f msgs/s (%.0f batches/s, p50 %s p99 %s a batch)\n", fmt.Sprintf("1 publisher, atomic batches of %d", k),
		batch.msgs, batch.batches, percentile(batch.lat, 0.5).Round(time.Microsecond), percentile(batch.lat, 0.99).Round(time.Microsecond))
	fmt.Fprintf(w, "  ratio batched/single %.2f\n", batch.msgs/figures.rawPublishes)
	return nil
}

// leaseFigures are one durability's measurements.
type leaseFigures struct {
	rawPairs, rawPublishes float64
	shared, exclusive      leaseRun
}

// leaseRun is one run of lease pairs against the control plane.
type leaseRun struct {
	pairs            float64
	acquire, release []time.Duration
	// stale counts acquires answered with a grant already released.
	stale *atomic.Int64
}

func leaseFiguresAt(ctx context.Context, cfg benchConfig, dir string, log *slog.Logger) (leaseFigures, error) {
	var f leaseFigures
	var err error
	if f.rawPairs, f.rawPublishes, err = rawPairRate(ctx, cfg, filepath.Join(dir, "raw")); err != nil {
		return f, fmt.Errorf("raw baseline (sync=%s): %w", cfg.sync, err)
	}
	log.Info("raw pairs measured", "sync", cfg.sync, "pairs_per_s", f.rawPairs)
	if f.shared, err = leaseRate(ctx, cfg, filepath.Join(dir, "shared"), events.LeaseShared, log); err != nil {
		return f, fmt.Errorf("shared leases (sync=%s): %w", cfg.sync, err)
	}
	log.Info("shared lease pairs measured", "sync", cfg.sync, "pairs_per_s", f.shared.pairs)
	if f.exclusive, err = leaseRate(ctx, cfg, filepath.Join(dir, "exclusive"), events.LeaseExclusive, log); err != nil {
		return f, fmt.Errorf("exclusive leases (sync=%s): %w", cfg.sync, err)
	}
	log.Info("exclusive lease pairs measured", "sync", cfg.sync, "pairs_per_s", f.exclusive.pairs)
	return f, nil
}

func printLeaseFigures(w io.Writer, label string, clients int, f leaseFigures) {
	fmt.Fprintf(w, "\n  -- %s\n", label)
	fmt.Fprintf(w, "  %-40s %10.0f/s (= %.0f single publishes/s)\n", "raw publish+expected-seq pairs", f.rawPairs, f.rawPublishes)
	for _, run := range []struct {
		what string
		leaseRun
	}{
		{fmt.Sprintf("shared lease pairs, %d holders, 1 image", clients), f.shared},
		{"exclusive lease pairs, an image each", f.exclusive},
	} {
		r := run.pairs / f.rawPairs
		verdict := "meets"
		if r < 0.5 {
			verdict = "BELOW"
		}
		fmt.Fprintf(w, "  %-40s %10.0f/s ratio %.2f (goal >= 0.50: %s)\n", run.what, run.pairs, r, verdict)
		fmt.Fprintf(w, "      acquire p50 %s p99 %s, release p50 %s p99 %s\n",
			percentile(run.acquire, 0.5).Round(time.Microsecond), percentile(run.acquire, 0.99).Round(time.Microsecond),
			percentile(run.release, 0.5).Round(time.Microsecond), percentile(run.release, 0.99).Round(time.Microsecond))
		if n := run.stale.Load(); n > 0 {
			fmt.Fprintf(w, "      WARNING: %d acquires were answered with a grant the holder had already released\n", n)
			fmt.Fprintf(w, "      (decided on a read model behind the release); each was sent again, timed in the acquire\n")
		}
	}
}

// benchLeaseHost is the host every benchmark holder runs on.
const benchLeaseHost = "bench-0"

func benchHolder(client int) string { return "holder-" + strconv.Itoa(client) }

// leaseRate runs the control plane on a fresh embedded server and measures
// acquire+release pairs from cfg.clients clients over TCP: shared grants
// on image/bench, a holder per client, or exclusive grants on
// image/bench-<client>. A pair counts if it completed within the run.
func leaseRate(ctx context.Context, cfg benchConfig, dir string, mode events.LeaseMode, log *slog.Logger) (leaseRun, error) {
	run := leaseRun{stale: new(atomic.Int64)}
	conn, stop, _, err := startBenchPlane(ctx, cfg, dir, log, false)
	if err != nil {
		return run, err
	}
	defer stop()

	resource := func(int) string { return "image/bench" }
	images := []string{"bench"}
	if mode == events.LeaseExclusive {
		resource = func(client int) string { return "image/bench-" + strconv.Itoa(client) }
		images = images[:0]
		for i := range cfg.clients {
			images = append(images, "bench-"+strconv.Itoa(i))
		}
	}
	if err := registerBench(ctx, conn.Conn, []string{benchLeaseHost}, images); err != nil {
		return run, err
	}

	var (
		total atomic.Int64
		mu    sync.Mutex
	)
	err = runClients(ctx, cfg, conn.URL, func(timed context.Context, nc *nats.Conn, id int) error {
		c := &client{flags: &clientFlags{actor: "bench-" + strconv.Itoa(id), timeout: 30 * time.Second}, nc: nc}
		holder := events.LeaseHolder{ID: benchHolder(id), Host: benchLeaseHost}
		var acquire, release []time.Duration
		var released uint64 // the sequence of this holder's last release
		for timed.Err() == nil {
			// A pair started in time is finished even past the deadline
			// (ctx, not timed), but only counted if it ended in time.
			start := time.Now()
			acq := events.AcquireLease{Resource: resource(id), Mode: mode, LeaseHolder: holder}
			epoch, stale, err := acquireFresh(ctx, c, acq, released)
			run.stale.Add(int64(stale))
			if err != nil {
				return err
			}
			granted := time.Now()
			rel := events.ReleaseLease{CommandMeta: events.CommandMeta{CommandID: ulid.Make().String()},
				Resource: acq.Resource, Holder: holder.ID, Epoch: epoch}
			reply, err := c.command(ctx, events.KindLease, events.VerbRelease, &rel)
			if err != nil {
				return fmt.Errorf("release %s by %s (epoch %d): %w", rel.Resource, holder.ID, rel.Epoch, err)
			}
			if len(reply.Events) != 1 {
				return fmt.Errorf("release %s by %s: %d events in the reply, want 1", rel.Resource, holder.ID, len(reply.Events))
			}
			released = reply.Events[0].Seq
			if timed.Err() == nil {
				acquire = append(acquire, granted.Sub(start))
				release = append(release, time.Since(granted))
				total.Add(1)
			}
		}
		mu.Lock()
		run.acquire = append(run.acquire, acquire...)
		run.release = append(run.release, release...)
		mu.Unlock()
		return nil
	})
	slices.Sort(run.acquire)
	slices.Sort(run.release)
	run.pairs = float64(total.Load()) / cfg.duration.Seconds()
	return run, err
}

// maxStale bounds how many acquires in a row may answer with a grant the
// holder already released before the bench gives up.
const maxStale = 100

// acquireFresh sends acq, each time with a new command id, until it is
// answered with a grant made after released (the sequence of the holder's
// last release), and returns that grant's epoch and how many answers named
// a grant that was released already: the handler decided those on a read
// model that had not applied the release yet.
func acquireFresh(ctx context.Context, c *client, acq events.AcquireLease, released uint64) (uint64, int, error) {
	for stale := 0; ; stale++ {
		acq.CommandID = ulid.Make().String()
		reply, err := c.command(ctx, events.KindLease, events.VerbAcquire, &acq)
		if err != nil {
			return 0, stale, fmt.Errorf("acquire %s for %s: %w", acq.Resource, acq.ID, err)
		}
		if len(reply.Events) != 1 {
			return 0, stale, fmt.Errorf("acquire %s for %s: %d events in the reply, want 1", acq.Resource, acq.ID, len(reply.Events))
		}
		if epoch := reply.Events[0].Seq; epoch > released {
			return epoch, stale, nil
		}
		if stale+1 >= maxStale {
			return 0, stale + 1, fmt.Errorf("acquire %s for %s: %d answers in a row named a grant released at or before %d",
				acq.Resource, acq.ID, stale+1, released)
		}
	}
}

// sealedEvent is an event ready to store.
type sealedEvent struct {
	env  events.Envelope
	data []byte
}

// sealedLeasePair seals what one pair of client's stores: its shared
// grant on resource and the grant's release.
func sealedLeasePair(resource string, client int) ([2]sealedEvent, error) {
	holder := benchHolder(client)
	origin := events.Origin{Actor: "bench-" + strconv.Itoa(client), CommandID: "raw", Time: time.Now()}
	var pair [2]sealedEvent
	for i, ev := range []events.Event{
		events.LeaseGranted{Mode: events.LeaseShared, LeaseHolder: events.LeaseHolder{ID: holder, Host: benchLeaseHost}},
		events.LeaseReleased{Holder: holder, Epoch: 1},
	} {
		env, data, err := events.Seal(ev, events.KindLease, resource, origin, 0, nil)
		if err != nil {
			return pair, err
		}
		pair[i] = sealedEvent{env, data}
	}
	return pair, nil
}

// rawPairRate is the baseline: each client appends the sealed events of a
// shared grant and its release to its own holder subject, in turn, with
// bus.AppendExpecting (the headers, Nats-Msg-Id and subject check a lease
// append carries), and nothing else. It returns pairs/s and publishes/s.
func rawPairRate(ctx context.Context, cfg benchConfig, dir string) (float64, float64, error) {
	srv, err := startBenchBus(ctx, cfg, dir)
	if err != nil {
		return 0, 0, err
	}
	defer srv.Stop()
	resource := events.Resource{Kind: events.ResourceImage, Name: "raw"}
	var pairs, publishes atomic.Int64
	err = runClients(ctx, cfg, srv.ClientURL(), func(timed context.Context, nc *nats.Conn, id int) error {
		js, err := jetstream.New(nc)
		if err != nil {
			return err
		}
		pair, err := sealedLeasePair(resource.String(), id)
		if err != nil {
			return err
		}
		subject := events.LeaseSubject(resource, events.LeaseShared, benchHolder(id))
		var last uint64
		for i := 0; timed.Err() == nil; i++ {
			for step, ev := range pair {
				msgID := "raw-" + strconv.Itoa(id) + "-" + strconv.Itoa(i) + "-" + strconv.Itoa(step)
				a, err := bus.AppendExpecting(timed, js, subject, &ev.env, ev.data, bus.Expect{Seq: last}, msgID)
				if err != nil {
					if timed.Err() != nil {
						return nil
					}
					return err
				}
				last = a.Seq
				publishes.Add(1)
			}
			pairs.Add(1)
		}
		return nil
	})
	secs := cfg.duration.Seconds()
	return float64(pairs.Load()) / secs, float64(publishes.Load()) / secs, err
}

// batchFigures are the group-commit experiment's measurements.
type batchFigures struct {
	msgs, batches float64
	lat           []time.Duration
}

// batchRate measures one publisher storing atomic batches of cfg.clients
// messages on a fresh server of cfg's durability: message j of every
// batch is a shared grant on holder j's own subject, with the headers and
// Nats-Msg-Id a lease append carries and a check of that subject's last
// sequence (its first and only write in the batch), as a group commit of
// cfg.clients concurrent commands would store them.
func batchRate(ctx context.Context, cfg benchConfig, dir string, log *slog.Logger) (batchFigures, error) {
	var f batchFigures
	srv, err := startBenchBus(ctx, cfg, dir)
	if err != nil {
		return f, err
	}
	defer srv.Stop()
	k := cfg.clients
	resource := events.Resource{Kind: events.ResourceImage, Name: "batch"}
	subjects := make([]string, k)
	grants := make([]sealedEvent, k)
	for j := range k {
		pair, err := sealedLeasePair(resource.String(), j)
		if err != nil {
			return f, err
		}
		subjects[j], grants[j] = events.LeaseSubject(resource, events.LeaseShared, benchHolder(j)), pair[0]
	}
	one := cfg
	one.clients = 1
	var batches int
	err = runClients(ctx, one, srv.ClientURL(), func(timed context.Context, nc *nats.Conn, _ int) error {
		last := make([]uint64, k)
		for i := 0; timed.Err() == nil; i++ {
			msgs := make([]*nats.Msg, k)
			for j := range msgs {
				m := &nats.Msg{Subject: subjects[j], Data: grants[j].data, Header: nats.Header{}}
				m.Header.Set(events.HeaderType, string(grants[j].env.Type))
				m.Header.Set(events.HeaderVersion, strconv.Itoa(grants[j].env.Version))
				m.Header.Set(jetstream.MsgIDHeader, "batch-"+strconv.Itoa(i)+"-"+strconv.Itoa(j))
				m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(last[j], 10))
				msgs[j] = m
			}
			start := time.Now()
			seq, err := bus.PublishBatch(timed, nc, msgs)
			if err != nil {
				if timed.Err() != nil {
					return nil
				}
				return err
			}
			f.lat = append(f.lat, time.Since(start))
			// A batch's messages are stored contiguously, the commit last.
			for j := range last {
				last[j] = seq - uint64(k-1-j)
			}
			batches++
		}
		return nil
	})
	slices.Sort(f.lat)
	f.batches = float64(batches) / cfg.duration.Seconds()
	f.msgs = f.batches * float64(k)
	log.Info("atomic batches measured", "size", k, "batches_per_s", f.batches)
	return f, err
}
