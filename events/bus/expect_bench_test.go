package bus_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// BenchmarkSharedGrants measures the contention of two layouts for shared
// leases on one image, with 16 writers: each grant on the holder's own
// subject, checked against the resource's exclusive subject (what leases
// use), against every grant on the resource's one subject, where a writer
// must read the subject's last sequence and retry when another got there
// first. It reports grants/s of each and their ratio.
func BenchmarkSharedGrants(b *testing.B) {
	const writers = 16
	perHolder := grantRate(b, writers, func(w int) (string, bus.Expect, bool) {
		return fmt.Sprintf("loom.evt.lease.image.bench.s.h%d", w), bus.Expect{Subject: "loom.evt.lease.image.bench.x"}, false
	})
	oneSubject := grantRate(b, writers, func(int) (string, bus.Expect, bool) {
		return "loom.evt.lease.image.one.x", bus.Expect{}, true
	})
	b.ReportMetric(perHolder, "per-holder-grants/s")
	b.ReportMetric(oneSubject, "one-subject-grants/s")
	b.ReportMetric(perHolder/oneSubject, "ratio")
}

// grantRate runs writers for a second and counts grants/s. Each writer
// appends to the subject target gives it; with readLast it first reads
// the subject's last sequence and expects it, retrying on conflict.
func grantRate(b *testing.B, writers int, target func(w int) (string, bus.Expect, bool)) float64 {
	bb := bustest.Start(b)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var grants atomic.Int64
	var wg sync.WaitGroup
	for w := range writers {
		subject, expect, readLast := target(w)
		nc := bustest.Connect(b, bb.URL)
		env, data := seal(b, fmt.Sprint("g", w), 0, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				if readLast {
					m, err := bus.LastOnSubject(ctx, nc, events.StreamEvents, subject)
					if err != nil && !errors.Is(err, bus.ErrNoMessage) {
						return
					}
					expect.Seq = m.Seq
				}
				_, err := bus.AppendExpecting(ctx, bb.JS, subject, &env, data, expect, "")
				switch {
				case err == nil:
					grants.Add(1)
				case errors.Is(err, bus.ErrWrongLastSeq):
				default:
					return
				}
			}
		}()
	}
	wg.Wait()
	return float64(grants.Load())
}
