package projections

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// publishWindow is how many messages PublishHistory has in flight.
const publishWindow = 1024

// PublishHistory appends n messages of a generated fleet's history to
// LOOM_EVENTS, for benchmarks: 100 hosts, 8 images, up to 5,000 VMs at
// once whose names get new incarnations, each VM created, allocated,
// placed, started, stopped, paused, deleted and released, the agents'
// reports of each goal, progress reports and orphans. With signed, every
// host is registered with a key and its agent signs every report; the
// history is otherwise the one the same seed gives unsigned. The same seed
// gives the same history. Each message expects the stream's last sequence
// to be the one before it, so nothing else may append meanwhile. It
// returns the last sequence.
func PublishHistory(ctx context.Context, js jetstream.JetStream, n int, seed uint64, signed bool) (uint64, error) {
	info, err := streamInfo(ctx, js)
	if err != nil {
		return 0, err
	}
	cfg := benchFleet
	if signed {
		cfg.keys = keysAll
	}
	h := newHistory(cfg, seed, info.State.LastSeq+1)
	return publishHistory(ctx, js, h, n)
}

// publishHistory publishes the next n messages of h, each checked to land
// on the sequence h gave it.
func publishHistory(ctx context.Context, js jetstream.JetStream, h *history, n int) (uint64, error) {
	var last uint64
	futures := make([]jetstream.PubAckFuture, 0, publishWindow)
	for published := 0; published < n; {
		futures = futures[:0]
		for ; published < n && len(futures) < publishWindow; published++ {
			m := h.next()
			msg := &nats.Msg{Subject: m.subject, Data: m.data, Header: cloneHeader(m.header)}
			if m.typ != "" {
				msg.Header.Set(events.HeaderType, string(m.typ))
				msg.Header.Set(events.HeaderVersion, fmt.Sprint(m.version))
			}
			future, err := js.PublishMsgAsync(msg, jetstream.WithExpectLastSequence(m.seq-1))
			if err != nil {
				return 0, fmt.Errorf("publish %d: %w", m.seq, err)
			}
			futures = append(futures, future)
		}
		for _, future := range futures {
			select {
			case ack := <-future.Ok():
				last = ack.Sequence
			case err := <-future.Err():
				return 0, fmt.Errorf("publish %s: %w", future.Msg().Subject, err)
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		}
	}
	return last, nil
}

// BenchResult is what RebuildBench measured.
type BenchResult struct {
	// Events is how many messages LOOM_EVENTS holds.
	Events uint64
	// Raw is the rate of an ordered-consumer replay that only decodes
	// (events.DecodeRecord), in events/s: the better of two runs, one
	// before and one after the rebuild.
	Raw float64
	// Rebuild is the rate of a full rebuild of the read models into a
	// fresh Pebble, in events/s.
	Rebuild float64
}

// Ratio is Rebuild over Raw: the share of the decode-only replay speed
// that a rebuild keeps.
func (r BenchResult) Ratio() float64 { return r.Rebuild / r.Raw }

// RebuildBench measures how fast the read models rebuild from LOOM_EVENTS
// against a replay that only decodes: the raw replay, a rebuild into a
// fresh store in dir (which must be empty or absent), the raw replay
// again. Fill the stream first, for instance with PublishHistory.
func RebuildBench(ctx context.Context, js jetstream.JetStream, dir string) (BenchResult, error) {
	info, err := streamInfo(ctx, js)
	if err != nil {
		return BenchResult{}, err
	}
	result := BenchResult{Events: info.State.Msgs}
	if result.Events == 0 {
		return BenchResult{}, errors.New("rebuild bench: " + events.StreamEvents + " is empty")
	}
	first, err := replayDecoding(ctx, js, info.State.LastSeq)
	if err != nil {
		return BenchResult{}, err
	}
	rebuild, err := rebuild(ctx, js, dir, info.State.LastSeq)
	if err != nil {
		return BenchResult{}, err
	}
	second, err := replayDecoding(ctx, js, info.State.LastSeq)
	if err != nil {
		return BenchResult{}, err
	}
	n := float64(result.Events)
	result.Raw = n / min(first, second).Seconds()
	result.Rebuild = n / rebuild.Seconds()
	return result, nil
}

// replayDecoding reads the stream up to last with the runner's ordered
// consumer settings, decoding every message and doing nothing else.
func replayDecoding(ctx context.Context, js jetstream.JetStream, last uint64) (time.Duration, error) {
	stream, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return 0, fmt.Errorf("replay: %w", err)
	}
	start := time.Now()
	consumer, err := bus.OrderedConsumer(ctx, js, stream, orderedConfig(1))
	if err != nil {
		return 0, fmt.Errorf("replay: %w", err)
	}
	defer bus.Forget(js, events.StreamEvents, consumer)
	done := make(chan struct{})
	var once sync.Once
	consume, err := consumer.Consume(func(msg jetstream.Msg) {
		meta, err := msg.Metadata()
		if err != nil {
			return
		}
		_, _ = events.DecodeRecord(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data())
		if meta.Sequence.Stream >= last {
			once.Do(func() { close(done) })
		}
	}, pullMaxMessages(DefaultMaxBatch))
	if err != nil {
		return 0, fmt.Errorf("replay: %w", err)
	}
	defer func() {
		consume.Stop()
		<-consume.Closed()
	}()
	select {
	case <-done:
		return time.Since(start), nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// rebuild builds the read models from sequence 1 in dir and times it.
func rebuild(ctx context.Context, js jetstream.JetStream, dir string, last uint64) (took time.Duration, err error) {
	store, err := Open(dir, Options{})
	if err != nil {
		return 0, err
	}
	defer func() { err = errors.Join(err, store.Close()) }()
	if store.Applied() != 0 {
		return 0, fmt.Errorf("rebuild bench: %s already holds read models up to %d", dir, store.Applied())
	}
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	start := time.Now()
	go func() { ran <- store.Run(runCtx, js) }()
	err = store.WaitFor(ctx, last)
	took = time.Since(start)
	stop()
	return took, errors.Join(err, <-ran)
}

func streamInfo(ctx context.Context, js jetstream.JetStream) (*jetstream.StreamInfo, error) {
	stream, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", events.StreamEvents, err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %s info: %w", events.StreamEvents, err)
	}
	return info, nil
}
