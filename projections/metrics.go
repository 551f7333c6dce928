package projections

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the runner's figures, per Store: nothing is registered
// globally.
type metrics struct {
	appliedSeq   prometheus.Gauge
	applied      prometheus.Counter
	flagged      prometheus.Counter
	batchSeconds prometheus.Histogram
	batchEvents  prometheus.Histogram
}

func newMetrics() *metrics {
	const namespace, subsystem = "loom", "projections"
	return &metrics{
		appliedSeq: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Subsystem: subsystem,
			Name: "applied_seq", Help: "Last LOOM_EVENTS sequence the read models reflect."}),
		applied: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Subsystem: subsystem,
			Name: "events_applied_total", Help: "Events folded into the read models."}),
		flagged: prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Subsystem: subsystem,
			Name: "events_flagged_total", Help: "Messages skipped because they could not be applied (corrupt, unknown type or version, misplaced)."}),
		batchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Subsystem: subsystem,
			Name: "batch_apply_seconds", Help: "Time to apply and commit one batch of events.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16)}),
		batchEvents: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Subsystem: subsystem,
			Name: "batch_events", Help: "Messages in one committed batch.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11)}),
	}
}

func (m *metrics) observeBatch(b *batch, took time.Duration) {
	m.appliedSeq.Set(float64(b.last))
	m.applied.Add(float64(b.applied))
	m.flagged.Add(float64(len(b.flagged)))
	m.batchSeconds.Observe(took.Seconds())
	m.batchEvents.Observe(float64(b.applied + len(b.flagged)))
}

// Collectors are the store's metrics, for the caller to register: the last
// applied sequence, events applied and flagged, and the time and size of
// each batch.
func (s *Store) Collectors() []prometheus.Collector {
	m := s.metrics
	return []prometheus.Collector{m.appliedSeq, m.applied, m.flagged, m.batchSeconds, m.batchEvents}
}
