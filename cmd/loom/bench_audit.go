package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/handlers"
	"github.com/loomctl/loom/projections"
)

// benchSealSpan is the most messages one seal covers in the audit bench:
// a sealer catching up on the filled stream seals it in spans this long.
const benchSealSpan = 10_000

// benchAudit fills LOOM_EVENTS with cfg.events events of a generated
// fleet's history, seals it with the control plane's sealer, then times,
// over the same in-process connection: loom audit verify's reading and
// checking, loom audit replay's rebuild into a scratch Pebble, and an
// ordered-consumer replay that only decodes (the better of one run before
// and one after).
func benchAudit(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	js, stop, _, err := historyBus(ctx, cfg, dir, false, w)
	if err != nil {
		return err
	}
	defer stop()
	start := time.Now()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	last, err := sealAll(ctx, js, key)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "  sealed %d messages in %s\n", last, time.Since(start).Round(time.Millisecond))

	raw1, err := timeRead(ctx, js, last, func(m *audit.Message) {
		_, _ = events.DecodeRecord(m.Seq, m.Subject, time.Time{}, m.Data)
	})
	if err != nil {
		return err
	}
	verify, r, err := timeVerify(ctx, js, last, []ed25519.PublicKey{key.Public().(ed25519.PublicKey)})
	if err != nil {
		return err
	}
	if !r.OK() || r.Seals == 0 {
		return fmt.Errorf("the bench history does not verify (%d seals): %v", r.Seals, r.Problems)
	}
	replay, err := timeReplay(ctx, js, filepath.Join(dir, "replay"), last)
	if err != nil {
		return err
	}
	raw2, err := timeRead(ctx, js, last, func(m *audit.Message) {
		_, _ = events.DecodeRecord(m.Seq, m.Subject, time.Time{}, m.Data)
	})
	if err != nil {
		return err
	}
	n := float64(last)
	raw := n / min(raw1, raw2).Seconds()
	ratio(w, "audit verify", n/verify.Seconds(), "decode-only replay", raw, 0.5)
	ratio(w, "audit replay", n/replay.Seconds(), "decode-only replay", raw, 0.5)
	return nil
}

// sealAll runs a sealer until a seal covers every message but the seals
// after it, and returns the stream's last sequence.
func sealAll(ctx context.Context, js jetstream.JetStream, key ed25519.PrivateKey) (uint64, error) {
	sealer, err := handlers.NewSealer(handlers.SealerConfig{JS: js, Conn: js.Conn(), Key: key, Every: 50 * time.Millisecond, Span: benchSealSpan})
	if err != nil {
		return 0, err
	}
	filled, err := bus.LastSeq(ctx, js, events.StreamEvents)
	if err != nil {
		return 0, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- sealer.Run(runCtx) }()
	stop := sync.OnceFunc(func() { cancel(); <-done })
	defer stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-tick.C:
		}
		_, _, sealed, err := handlers.LastSeal(ctx, js.Conn())
		if errors.Is(err, bus.ErrNoMessage) {
			continue
		}
		if err != nil {
			return 0, err
		}
		if sealed.To >= filled {
			stop() // no seal lands while the bench reads
			return bus.LastSeq(ctx, js, events.StreamEvents)
		}
	}
}

// timeRead times readStream over the whole stream.
func timeRead(ctx context.Context, js jetstream.JetStream, last uint64, add func(*audit.Message)) (time.Duration, error) {
	start := time.Now()
	n, err := readStream(ctx, js, last, add)
	if err != nil {
		return 0, err
	}
	if n != last {
		return 0, fmt.Errorf("read %d messages, the stream holds %d", n, last)
	}
	return time.Since(start), nil
}

// timeVerify times loom audit verify's check of the stream up to last, as
// the verb runs it: checked ahead on every CPU, read in order.
func timeVerify(ctx context.Context, js jetstream.JetStream, last uint64, keys []ed25519.PublicKey) (time.Duration, *audit.Report, error) {
	start := time.Now()
	v := audit.NewAhead(audit.NewVerifier(keys, nil), runtime.GOMAXPROCS(0))
	_, err := timeRead(ctx, js, last, v.Add)
	r := v.Finish()
	return time.Since(start), r, err
}

// timeReplay times loom audit replay's rebuild up to last into dir.
func timeReplay(ctx context.Context, js jetstream.JetStream, dir string, last uint64) (took time.Duration, err error) {
	store, err := projections.Open(dir, projections.Options{MaxBatch: replayMaxBatch})
	if err != nil {
		return 0, err
	}
	defer func() { err = errors.Join(err, store.Close()) }()
	start := time.Now()
	if _, err := store.ReplayTo(ctx, js, last, projections.ReplayOptions{SkipCorrupt: true}); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}
