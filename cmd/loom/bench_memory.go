package main

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
)

// benchMemory measures the NATS server's memory per 10,000 aggregates: the
// per-subject state JetStream keeps in memory for LOOM_EVENTS, which grows
// with every aggregate ever created because history is never purged. The
// server runs in this process, so its memory is this process's heap; the
// baseline is the heap with the streams created and empty.
func benchMemory(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	scfg, err := benchServerConfig(cfg, dir)
	if err != nil {
		return err
	}
	js, stop, err := inProcessBus(ctx, scfg)
	if err != nil {
		return err
	}
	defer stop()
	base := heapInUse()
	const step = 10_000
	fmt.Fprintf(w, "  %-10s %-10s %-16s %-16s\n", "aggregates", "heap MiB", "average per 10k", "the last 10k")
	prev := base
	var published int
	for round := 1; round <= 5; round++ {
		for i := 0; i < step; i++ {
			id := "vm-" + strconv.Itoa(published)
			msg := &nats.Msg{Subject: events.EventSubject(events.KindVM, id), Data: make([]byte, 200), Header: nats.Header{}}
			msg.Header.Set(jetstream.MsgIDHeader, events.MsgID("bench", id, 0))
			if _, err := js.PublishMsgAsync(msg); err != nil {
				return err
			}
			published++
			if published%asyncWindow == 0 {
				if err := asyncDone(ctx, js); err != nil {
					return err
				}
			}
		}
		if err := asyncDone(ctx, js); err != nil {
			return err
		}
		heap := heapInUse()
		fmt.Fprintf(w, "  %-10d %-10.1f %-16.2f %-16.2f\n", published, float64(heap)/(1<<20),
			(float64(heap)-float64(base))/float64(round)/(1<<20), (float64(heap)-float64(prev))/(1<<20))
		prev = heap
	}
	fmt.Fprintf(w, "  (each aggregate: one 200-byte event on its own subject with a Nats-Msg-Id; the ids stay in memory for the 2-minute duplicate window)\n")
	return nil
}

// asyncWindow is how many publishes are in flight at most: the client
// stalls beyond its own limit of outstanding async publishes.
const asyncWindow = 1000

// asyncDone waits for every async publish to be acknowledged.
func asyncDone(ctx context.Context, js jetstream.JetStream) error {
	select {
	case <-js.PublishAsyncComplete():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

func numCPU() int { return runtime.NumCPU() }
