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
	js, stop, err := readBenchBus(ctx, cfg, dir)
	if err != nil {
		return err
	}
	defer stop()
	start := time.Now()
	if _, err := projections.PublishHistory(ctx, js, cfg.events, 1, false); err != nil {
		return fmt.Errorf("fill the stream: %w", err)
	}
	fmt.Fprintf(w, "  filled %d events in %s (fsync every minute)\n", cfg.events, time.Since(start).Round(time.Millisecond))
	result, err := projections.RebuildBench(ctx, js, filepath.Join(dir, "pebble"))
	if err != nil {
		return err
	}
	ratio(w, "rebuild into Pebble", result.Rebuild, "decode-only replay", result.Raw, 0.5)
	return nil
}

// readBenchBus starts the in-process server of a part that only reads
// what it fills the stream with. Filling a million events one fsync at a
// time takes minutes and measures nothing: it fsyncs lazily.
func readBenchBus(ctx context.Context, cfg benchConfig, dir string) (jetstream.JetStream, func(), error) {
	scfg, err := benchServerConfig(cfg, filepath.Join(dir, "bus"))
	if err != nil {
		return nil, nil, err
	}
	scfg.SyncAlways, scfg.SyncInterval = false, time.Minute
	return inProcessBus(ctx, scfg)
}
