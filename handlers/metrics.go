package handlers

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loomctl/loom/events"
)

// metrics are the service's Prometheus metrics. micro's own endpoint stats
// count requests but not their time or errors, since requests are answered
// after micro's handler returns.
type metrics struct {
	commands  *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	conflicts *prometheus.CounterVec
	repeats   prometheus.Counter
	inflight  prometheus.Gauge
	scheduled *prometheus.CounterVec
	hostsLost prometheus.Counter
	// voidGrants counts shared grants an exclusive grant beat to the
	// resource: appended, void, and answered lease_held.
	voidGrants prometheus.Counter
}

func newMetrics() *metrics {
	return &metrics{
		commands: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loom_handlers_commands_total", Help: "Commands answered, by subject and outcome (ok or the fault's name).",
		}, []string{"subject", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "loom_handlers_command_seconds", Help: "Time from taking a command to sending its reply, by subject.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}, []string{"subject"}),
		conflicts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loom_handlers_append_conflicts_total", Help: "Appends refused because another writer moved the subject, by aggregate kind.",
		}, []string{"kind"}),
		repeats: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "loom_handlers_append_duplicates_total", Help: "Appends the stream dropped as repeats of a step already appended.",
		}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "loom_handlers_commands_in_flight", Help: "Commands being handled.",
		}),
		scheduled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loom_handlers_scheduler_steps_total", Help: "Steps the scheduler took: placed (an interrupted create completed) or released.",
		}, []string{"step"}),
		hostsLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "loom_handlers_hosts_declared_lost_total", Help: "Hosts this replica's failure detector declared lost (host.lost appended).",
		}),
		voidGrants: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "loom_handlers_lease_void_grants_total", Help: "Shared grants that landed after an exclusive grant and are void.",
		}),
	}
}

// Collectors are the service's metrics, for cmd to register.
func (s *Service) Collectors() []prometheus.Collector {
	m := s.metrics
	return []prometheus.Collector{m.commands, m.latency, m.conflicts, m.repeats, m.inflight, m.scheduled, m.hostsLost, m.voidGrants}
}

func outcome(reply *events.Reply) string {
	if reply.Error == nil {
		return "ok"
	}
	return reply.Error.Code.Name()
}
