package agents

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/loomctl/loom/events"
)

// AppendBench measures how fast an agent made from cfg reports: workers
// goroutines, each reporting on a VM of its own (named prefix-<n>) a new
// incarnation after another, through the agent's own path (observe: seal,
// sign with cfg.HostKey if set, append with the subject check, wait for
// the ack), for d. It returns reports/s. It runs no agent (cfg's
// hypervisor is never used) and writes only those VMs' subjects, so two
// runs on one stream need different prefixes. For loom bench.
func AppendBench(ctx context.Context, cfg Config, prefix string, workers int, d time.Duration) (float64, error) {
	a, err := New(cfg)
	if err != nil {
		return 0, err
	}
	var appended atomic.Int64
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	began := time.Now()
	for w := range workers {
		name := fmt.Sprintf("%s-%d", prefix, w)
		uid := events.DeriveUID("bench", name)
		g.Go(func() error {
			for incarnation := uint64(1); ; incarnation++ {
				obs := events.VMObserved{UID: uid, Incarnation: incarnation, State: events.ObservedRunning}
				if err := a.observe(ctx, name, obs); err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return err
				}
				appended.Add(1)
			}
		})
	}
	if err := g.Wait(); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return 0, err
	}
	return float64(appended.Load()) / time.Since(began).Seconds(), nil
}
