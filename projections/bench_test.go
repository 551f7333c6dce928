package projections

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/loomctl/loom/events/bus/bustest"
)

var benchEvents = flag.Int("bench-events", 0,
	"events for BenchmarkRebuild; default $LOOM_BENCH_EVENTS, else 1,000,000 (50,000 with -short)")

func benchEventCount(b *testing.B) int {
	if *benchEvents > 0 {
		return *benchEvents
	}
	if env := os.Getenv("LOOM_BENCH_EVENTS"); env != "" {
		n, err := strconv.Atoi(env)
		if err != nil || n < 1 {
			b.Fatalf("LOOM_BENCH_EVENTS=%q: want a positive count", env)
		}
		return n
	}
	if testing.Short() {
		return 50_000
	}
	return 1_000_000
}

// BenchmarkRebuild fills LOOM_EVENTS with a fleet's history, then measures
// a replay that only decodes against a full rebuild of the read models,
// and reports both rates and their ratio (the goal is at least 0.5).
func BenchmarkRebuild(b *testing.B) {
	n := benchEventCount(b)
	bus := bustest.Start(b)
	ctx := context.Background()
	if _, err := PublishHistory(ctx, bus.JS, n, 1, false); err != nil {
		b.Fatalf("fill stream: %v", err)
	}
	dir := b.TempDir()
	var result BenchResult
	b.ResetTimer()
	for i := range b.N {
		var err error
		result, err = RebuildBench(ctx, bus.JS, filepath.Join(dir, fmt.Sprint(i)))
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(result.Raw, "raw-events/s")
	b.ReportMetric(result.Rebuild, "rebuild-events/s")
	b.ReportMetric(result.Ratio(), "rebuild/raw")
	b.Logf("%d events: raw replay %.0f/s, rebuild %.0f/s, ratio %.2f", result.Events, result.Raw, result.Rebuild, result.Ratio())
}
