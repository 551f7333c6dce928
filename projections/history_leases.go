package projections

import (
	"fmt"
	"slices"

	"github.com/loomctl/loom/events"
)

// genLease is what the history generator knows of one resource's lease.
type genLease struct {
	exclusive *genGrant
	shared    map[string]*genGrant
}

type genGrant struct {
	holder, host string
	epoch        uint64
	breaking     bool
}

// lease acts on a lease as handlers would: grants that respect the modes
// (and, with anomalies, a shared grant that lands void under an exclusive
// one, or an end of a grant that does not stand), releases, forced breaks
// and their end, expiries.
func (h *history) lease() {
	r := events.Resource{Kind: events.ResourceDisk, Name: fmt.Sprintf("d-%d", h.rng.IntN(20))}
	if h.rng.IntN(3) == 0 {
		r = events.Resource{Kind: events.ResourceImage, Name: h.images[h.rng.IntN(len(h.images))]}
	}
	l := h.leases[r]
	if l == nil {
		l = &genLease{shared: map[string]*genGrant{}}
		h.leases[r] = l
	}
	holder := fmt.Sprintf("u-%d", h.rng.IntN(30))
	host := h.hosts[h.rng.IntN(len(h.hosts))].name
	subject := func(mode events.LeaseMode, holder string) string { return events.LeaseSubject(r, mode, holder) }
	grant := func(mode events.LeaseMode) uint64 {
		return h.emit(subject(mode, holder), events.LeaseGranted{Mode: mode,
			LeaseHolder: events.LeaseHolder{ID: holder, VM: "vm-" + holder, Host: host}}, h.command(), 0)
	}
	switch n := h.rng.IntN(10); {
	case n < 3 && l.exclusive == nil && len(l.shared) == 0:
		l.exclusive = &genGrant{holder: holder, host: host, epoch: grant(events.LeaseExclusive)}
	case n < 5 && l.exclusive == nil && l.shared[holder] == nil:
		l.shared[holder] = &genGrant{holder: holder, host: host, epoch: grant(events.LeaseShared)}
	case n < 5 && h.cfg.anomalies && l.exclusive != nil && l.shared[holder] == nil:
		grant(events.LeaseShared) // void: it is not held
	case n < 8:
		h.endLease(l, subject)
	case n < 9 && l.exclusive != nil && !l.exclusive.breaking:
		g := l.exclusive
		g.breaking = true
		h.emit(subject(events.LeaseExclusive, ""), events.LeaseBreaking{Holder: g.holder, Epoch: g.epoch, Reason: "forced"}, h.command(), 0)
	case h.cfg.anomalies:
		h.emit(subject(events.LeaseShared, holder), events.LeaseReleased{Holder: holder, Epoch: 1, Reason: "not held"}, h.command(), 0)
	}
}

// endLease ends a standing grant: released, expired or broken.
func (h *history) endLease(l *genLease, subject func(events.LeaseMode, string) string) {
	mode, g := events.LeaseExclusive, l.exclusive
	if holders := sortedKeys(l.shared); len(holders) > 0 && (g == nil || h.rng.IntN(2) == 0) {
		mode, g = events.LeaseShared, l.shared[holders[h.rng.IntN(len(holders))]]
	}
	if g == nil {
		return
	}
	on := subject(mode, "")
	if mode == events.LeaseShared {
		on = subject(mode, g.holder)
		delete(l.shared, g.holder)
	} else {
		l.exclusive = nil
	}
	switch {
	case g.breaking:
		h.emit(on, events.LeaseBroken{Holder: g.holder, Epoch: g.epoch, Reason: "stopped"}, h.command(), 0)
	case slices.ContainsFunc(h.hosts, func(x *genHost) bool { return x.name == g.host && x.lost != 0 }):
		h.emit(on, events.LeaseExpired{Holder: g.holder, Epoch: g.epoch, Host: g.host, MarkerSeq: 1}, "expire", 0)
	default:
		h.emit(on, events.LeaseReleased{Holder: g.holder, Epoch: g.epoch}, h.command(), 0)
	}
}
