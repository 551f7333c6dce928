package agents

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the agent's Prometheus collectors. They are registered by
// whoever calls Collectors, never globally.
type metrics struct {
	// actions counts libvirt steps by kind (define, start, ...) and result.
	actions *prometheus.CounterVec
	// observations counts events published, by type.
	observations *prometheus.CounterVec
	// reconcileSeconds times reconciles that reached libvirtd, by result.
	reconcileSeconds *prometheus.HistogramVec
	// renewals counts liveness renewals by result (ok, rejected, lost, error).
	renewals *prometheus.CounterVec
	// fenced counts starts and resumes refused past the fencing deadline.
	fenced prometheus.Counter
	// fencedDomains counts domains paused or destroyed at the deadline.
	fencedDomains prometheus.Counter
	// leaseRefreshes counts lease events heard for resources in use.
	leaseRefreshes *prometheus.CounterVec
	// leaseRefusals counts defines, starts and resumes refused because a
	// grant the goal names was not current.
	leaseRefusals prometheus.Counter
	// conflicts counts appends rejected because someone else wrote an
	// agent-owned subject.
	conflicts prometheus.Counter
	// connected is 1 while the agent holds a connection to libvirtd.
	connected prometheus.Gauge
}

func newMetrics(host string) *metrics {
	labels := prometheus.Labels{"host": host}
	return &metrics{
		actions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "actions_total", ConstLabels: labels,
			Help: "Libvirt steps the agent took, by kind and result.",
		}, []string{"kind", "result"}),
		observations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "observations_published_total", ConstLabels: labels,
			Help: "Observation events the agent published, by event type.",
		}, []string{"type"}),
		reconcileSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "loom", Subsystem: "agent", Name: "reconcile_duration_seconds", ConstLabels: labels,
			Help:    "Time to reconcile one VM with its goal, by result (ok, error, requeued).",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"result"}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "fenced_steps_total", ConstLabels: labels,
			Help: "Starts and resumes refused because the fencing deadline had passed.",
		}),
		fencedDomains: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "fenced_domains_total", ConstLabels: labels,
			Help: "Running domains holding an exclusive lease that the agent paused or destroyed when its fencing deadline passed.",
		}),
		leaseRefreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "lease_refreshes_total", ConstLabels: labels,
			Help: "Lease events heard on resources this host's VMs use, each refreshing those VMs, by event type.",
		}, []string{"type"}),
		leaseRefusals: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "lease_refusals_total", ConstLabels: labels,
			Help: "Defines, starts and resumes refused because a lease grant the goal names was not current.",
		}),
		renewals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "liveness_renewals_total", ConstLabels: labels,
			Help: "Liveness renewals, by result (ok, rejected, lost: a lost marker stood, error).",
		}, []string{"result"}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "loom", Subsystem: "agent", Name: "subject_conflicts_total", ConstLabels: labels,
			Help: "Appends rejected because someone else wrote a subject only this agent should write.",
		}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "loom", Subsystem: "agent", Name: "libvirt_connected", ConstLabels: labels,
			Help: "1 while the agent holds a connection to libvirtd.",
		}),
	}
}

// action counts one libvirt step.
func (m *metrics) action(s step, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.actions.WithLabelValues(string(s), result).Inc()
}

// Collectors returns the agent's Prometheus collectors, for the caller to
// register; the agent registers nothing itself. Every collector carries a
// constant "host" label.
func (a *Agent) Collectors() []prometheus.Collector {
	m := a.metrics
	return []prometheus.Collector{m.actions, m.observations, m.reconcileSeconds, m.renewals, m.fenced, m.fencedDomains, m.leaseRefreshes, m.leaseRefusals, m.conflicts, m.connected}
}
