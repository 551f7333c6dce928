package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// benchCreate measures vm.create commands/s with cfg.clients concurrent
// clients over TCP loopback against the whole control plane, and, as the
// baseline, raw JetStream publishes with expected-last-subject-sequence at
// the same concurrency over TCP, each on a fresh embedded server of the
// same durability.
func benchCreate(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	raw, err := rawPublishRate(ctx, cfg, filepath.Join(dir, "raw"), rawSingle)
	if err != nil {
		return fmt.Errorf("raw baseline: %w", err)
	}
	ceiling, err := rawPublishRate(ctx, cfg, filepath.Join(dir, "chain"), rawCreateChain)
	if err != nil {
		return fmt.Errorf("raw chain: %w", err)
	}
	creates, lat, err := createRate(ctx, cfg, filepath.Join(dir, "loom"), false)
	if err != nil {
		return fmt.Errorf("vm.create: %w", err)
	}
	// Locked down, between two open runs, against the better of them: the
	// runs drift over time on a shared machine more than TLS costs.
	secure, _, err := createRate(ctx, cfg, filepath.Join(dir, "secure"), true)
	if err != nil {
		return fmt.Errorf("vm.create, locked down: %w", err)
	}
	again, _, err := createRate(ctx, cfg, filepath.Join(dir, "again"), false)
	if err != nil {
		return fmt.Errorf("vm.create: %w", err)
	}
	fmt.Fprintf(w, "  %d clients over TCP loopback, %s each run\n", cfg.clients, cfg.duration)
	ratio(w, "vm.create commands", creates, "raw publish+expected-seq", raw, 0.5)
	fmt.Fprintf(w, "  design ceiling: a raw chain of a create's %d checked publishes (vm, host, 2 leases, vm, goal) %.0f/s = %.2f of raw;\n", len(rawCreateChain), ceiling, ceiling/raw)
	fmt.Fprintf(w, "  vm.create reaches %.2f of that ceiling\n", creates/ceiling)
	fmt.Fprintf(w, "  vm.create latency p50 %s p99 %s (5 appends each: vm.created, host.allocated, 2 lease.granted, vm.placed)\n",
		percentile(lat, 0.5).Round(time.Microsecond), percentile(lat, 0.99).Round(time.Microsecond))
	ratio(w, "vm.create, nkeys + TLS", secure, "vm.create, open bus (best of 2)", max(creates, again), 0)
	return nil
}

// Raw operations: the subjects each operation publishes to, in turn, as
// formats of (client, subject index).
var (
	// rawSingle is the baseline: one publish.
	rawSingle = []string{"loom.evt.vm.raw-%d-%d"}
	// rawCreateChain is what a vm.create stores, without anything else a
	// create does: vm.created, host.allocated, the image's and the disk's
	// grants, vm.placed, and the goal.
	rawCreateChain = []string{"loom.evt.vm.c-%d-%d", "loom.evt.host.c-%d-%d", "loom.evt.lease.image.c-%d-%d.s.h",
		"loom.evt.lease.disk.c-%d-%d.x", "loom.evt.vm.c-%d-%d", "loom.goal.h%d.c-%d"}
)

// rawPublishRate measures operations/s: each client publishes to its own
// subjects, each publish carrying the subject's last sequence, one
// operation being a publish to each of steps in turn.
func rawPublishRate(ctx context.Context, cfg benchConfig, dir string, steps []string) (float64, error) {
	srv, err := startBenchBus(ctx, cfg, dir)
	if err != nil {
		return 0, err
	}
	defer srv.Stop()
	var total atomic.Int64
	err = runClients(ctx, cfg, srv.ClientURL(), func(ctx context.Context, nc *nats.Conn, client int) error {
		cjs, err := jetstream.New(nc)
		if err != nil {
			return err
		}
		const subjects = 1000
		payload := make([]byte, 300)
		last := map[string]uint64{}
		for i := 0; ctx.Err() == nil; i++ {
			for _, step := range steps {
				subject := fmt.Sprintf(step, client, i%subjects)
				ack, err := cjs.Publish(ctx, subject, payload, jetstream.WithExpectLastSequencePerSubject(last[subject]))
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return err
				}
				last[subject] = ack.Sequence
			}
			total.Add(1)
		}
		return nil
	})
	return float64(total.Load()) / cfg.duration.Seconds(), err
}

// createRate runs the control plane on a fresh embedded server and measures
// vm.create requests from clients over TCP; secure locks the bus down as
// loom up does (identities and TLS), the clients connecting as the client
// identity.
func createRate(ctx context.Context, cfg benchConfig, dir string, secure bool) (float64, []time.Duration, error) {
	conn, stop, access, err := startBenchPlane(ctx, cfg, dir, quietLogger(), secure)
	if err != nil {
		return 0, nil, err
	}
	defer stop()
	cfg.access = access
	hosts := make([]string, 64)
	for i := range hosts {
		hosts[i] = "bench-" + strconv.Itoa(i)
	}
	admin, err := plane.Join(conn.URL, "bench-register", access)
	if err != nil {
		return 0, nil, err
	}
	defer admin.Close()
	if err := registerBench(ctx, admin.Conn, hosts, []string{"bench"}); err != nil {
		return 0, nil, err
	}

	var (
		total atomic.Int64
		mu    sync.Mutex
		lats  []time.Duration
	)
	err = runClients(ctx, cfg, conn.URL, func(ctx context.Context, nc *nats.Conn, id int) error {
		c := &client{flags: &clientFlags{actor: "bench-" + strconv.Itoa(id), timeout: 30 * time.Second}, nc: nc}
		var mine []time.Duration
		for i := 0; ctx.Err() == nil; i++ {
			name := fmt.Sprintf("b%d-%d", id, i)
			create := events.CreateVM{CommandMeta: events.CommandMeta{CommandID: name}, Name: name, Image: "bench", CPU: 1, MemoryMiB: 1, Stopped: true}
			start := time.Now()
			if _, err := c.command(context.WithoutCancel(ctx), events.KindVM, events.VerbCreate, &create); err != nil {
				return fmt.Errorf("create %s: %w", name, err)
			}
			mine = append(mine, time.Since(start))
			total.Add(1)
		}
		mu.Lock()
		lats = append(lats, mine...)
		mu.Unlock()
		return nil
	})
	slices.Sort(lats)
	return float64(total.Load()) / cfg.duration.Seconds(), lats, err
}

// runClients runs cfg.clients workers, each on its own TCP connection,
// for cfg.duration.
func runClients(ctx context.Context, cfg benchConfig, url string, work func(ctx context.Context, nc *nats.Conn, client int) error) error {
	opts, err := cfg.access.Options()
	if err != nil {
		return err
	}
	conns := make([]*nats.Conn, cfg.clients)
	for i := range conns {
		nc, err := nats.Connect(url, opts...)
		if err != nil {
			return err
		}
		defer nc.Close()
		conns[i] = nc
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	errs := make(chan error, len(conns))
	for i, nc := range conns {
		go func() { errs <- work(ctx, nc, i) }()
	}
	var first error
	for range conns {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}
