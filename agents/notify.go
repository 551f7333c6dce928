package agents

import (
	"context"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
)

// Lease notifications. Shared storage tells a computer that what it cached
// changed because another holder took it; here every event on a lease
// reaches, as it is stored, the agent of each host whose VMs use that
// resource: the agent subscribes to the lease subjects of every resource
// its goals name (plain NATS, no consumer: a message stored on
// LOOM_EVENTS is delivered to subscribers at once). On each one it
// refreshes: it marks the VMs that use the resource, and reconciling them
// checks their grants through the leader again. A running domain whose
// exclusive grant is no longer current (broken by an operator, expired)
// is destroyed at once: it must stop writing. The refresh is counted
// (loom_agent_lease_refreshes_total) and logged.

// leaseWatch holds the agent's subscriptions, one per resource in use.
type leaseWatch struct {
	mu   sync.Mutex
	subs map[string]*nats.Subscription // by resource
}

// watchLeases subscribes to the resources goal runs under that are not
// watched yet.
func (a *Agent) watchLeases(goal events.Goal) {
	if a.cfg.Unsafe.NoLeaseWatch {
		return
	}
	a.leases.mu.Lock()
	defer a.leases.mu.Unlock()
	if a.leases.subs == nil {
		a.leases.subs = map[string]*nats.Subscription{}
	}
	for _, l := range goal.Leases {
		if _, ok := a.leases.subs[l.Resource]; ok {
			continue
		}
		r, err := events.ParseResource(l.Resource)
		if err != nil {
			continue // checkLeases reports it
		}
		resource := l.Resource
		sub, err := a.cfg.Conn.Subscribe(events.LeaseWildcard(r), func(msg *nats.Msg) {
			a.onLeaseEvent(resource, msg)
		})
		if err != nil {
			a.log.Warn("subscribe to lease changes; the next goal or resync tries again", "resource", resource, logErr, err)
			continue
		}
		a.leases.subs[resource] = sub
	}
}

// pruneLeaseWatch drops the subscriptions of resources no goal names.
func (a *Agent) pruneLeaseWatch() {
	used := map[string]bool{}
	a.mu.Lock()
	for _, v := range a.vms {
		if v.hasGoal {
			for _, l := range v.goal.Leases {
				used[l.Resource] = true
			}
		}
	}
	a.mu.Unlock()
	a.unwatchExcept(used)
}

// stopLeaseWatch drops every subscription.
func (a *Agent) stopLeaseWatch() { a.unwatchExcept(nil) }

// unwatchExcept drops the subscriptions of the resources not in keep.
func (a *Agent) unwatchExcept(keep map[string]bool) {
	a.leases.mu.Lock()
	defer a.leases.mu.Unlock()
	for resource, sub := range a.leases.subs {
		if !keep[resource] {
			_ = sub.Unsubscribe()
			delete(a.leases.subs, resource)
		}
	}
}

// onLeaseEvent refreshes the VMs that use resource after an event on its
// lease.
func (a *Agent) onLeaseEvent(resource string, msg *nats.Msg) {
	typ := msg.Header.Get(events.HeaderType)
	a.metrics.leaseRefreshes.WithLabelValues(typ).Inc()
	var names []string
	a.mu.Lock()
	for name, v := range a.vms {
		if !v.hasGoal {
			continue
		}
		for _, l := range v.goal.Leases {
			if l.Resource == resource {
				v.leaseChanged = true
				names = append(names, name)
				break
			}
		}
	}
	a.mu.Unlock()
	a.log.Info("lease changed: refreshing the VMs that use it", "resource", resource, "event", typ, "subject", msg.Subject, "vms", len(names))
	for _, name := range names {
		a.queue.add(name, time.Time{})
	}
}

// leaseStillHeld runs when a lease the VM uses changed: for a domain that
// may be writing (running or paused), it checks the VM's grants through
// the leader. It returns the fault if one is no longer current; the
// caller then stops the domain.
func (a *Agent) leaseStillHeld(ctx context.Context, goal events.Goal) *events.Fault {
	if len(goal.Leases) == 0 {
		return nil // such a goal never ran: checkLeases refused it
	}
	f := a.checkLeases(ctx, goal)
	if f == nil || f.Code == events.CodeUnavailable {
		return nil // current, or unknown: the next change or resync looks again
	}
	return f
}
