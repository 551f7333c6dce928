package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/projections"
)

// benchRebuild fills LOOM_EVENTS with cfg.events events of a generated
// fleet's history, then rebuilds the read models from sequence 1 and
// compares that with an ordered-consumer replay that only decodes, both
// over the same in-process connection to the same server.
func benchRebuild(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	js, stop, _, err := historyBus(ctx, cfg, dir, false, w)
	if err != nil {
		return err
	}
	defer stop()
	result, err := projections.RebuildBench(ctx, js, filepath.Join(dir, "pebble"))
	if err != nil {
		return err
	}
	ratio(w, "rebuild into Pebble", result.Rebuild, "decode-only replay", result.Raw, 0.5)
	return nil
}

// historyBus starts the in-process server of a part that only reads, and
// fills LOOM_EVENTS with cfg.events events of a generated fleet's history,
// signed by its hosts if sign; it returns the last sequence. Filling a
// million events one fsync at a time takes minutes and measures nothing:
// the server fsyncs lazily.
func historyBus(ctx context.Context, cfg benchConfig, dir string, sign bool, w io.Writer) (js jetstream.JetStream, stop func(), last uint64, err error) {
	scfg, err := benchServerConfig(cfg, filepath.Join(dir, "bus"))
	if err != nil {
		return nil, nil, 0, err
	}
	scfg.SyncAlways, scfg.SyncInterval = false, time.Minute
	if js, stop, err = inProcessBus(ctx, scfg); err != nil {
		return nil, nil, 0, err
	}
	start := time.Now()
	if last, err = projections.PublishHistory(ctx, js, cfg.events, 1, sign); err != nil {
		stop()
		return nil, nil, 0, fmt.Errorf("fill the stream: %w", err)
	}
	fmt.Fprintf(w, "  filled %d events in %s (fsync every minute)\n", cfg.events, time.Since(start).Round(time.Millisecond))
	return js, stop, last, nil
}
