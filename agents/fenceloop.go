package agents

import (
	"context"
	"encoding/json"
	"net"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// fenceLoop acts when the fencing deadline passes with no renewal
// acknowledged since: it pauses (or, by Config.FencePolicy, destroys)
// every running domain whose goal holds an exclusive lease, before the
// control plane could consider those leases expired. When renewals are
// acknowledged again it queues every VM: the reconcile loop resumes each
// under a grant that is still current, and none under a grant that is not.
// `loom fence` does the same from a process of its own, in case this one
// is frozen.
func (a *Agent) fenceLoop(ctx context.Context) error {
	select {
	case <-a.fence.first:
	case <-ctx.Done():
		return nil
	}
	for {
		if !a.fence.wait(ctx.Done()) {
			return nil
		}
		if !a.fence.off {
			a.fenceAll(ctx)
		}
		if !a.fence.waitExtended(ctx.Done()) {
			return nil
		}
		a.log.Info("liveness renewals acknowledged again: resuming what is still leased")
		a.clearBackoffs() // what failed while fenced failed for the fence, not for itself
		a.enqueueAll()
	}
}

// clearBackoffs forgets every VM's failures, so the next reconcile of each
// comes at once.
func (a *Agent) clearBackoffs() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, v := range a.vms {
		v.failures, v.holdUntil = 0, time.Time{}
	}
}

// fenceAll fences every running domain that holds an exclusive lease,
// retrying until it has or the deadline lies ahead again.
func (a *Agent) fenceAll(ctx context.Context) {
	log := throttle{period: time.Minute}
	for attempt := 1; ; attempt++ {
		hv, _ := a.hypervisor()
		if hv != nil {
			n, err := fenceDomains(ctx, hv, a.cfg.FencePolicy, a.holdsExclusive, a.log)
			a.metrics.fencedDomains.Add(float64(n))
			if err == nil {
				return
			}
			if ok, skipped := log.allow(); ok {
				a.log.Error("fence domains; retrying", logErr, err, logSkipped, skipped)
			}
		}
		if untilBoot(a.fence.current(), BootNanos) > 0 || !sleepCtx(ctx, a.backoff(attempt)) {
			return
		}
	}
}

// holdsExclusive tells whether d is the domain of a VM whose goal holds an
// exclusive lease.
func (a *Agent) holdsExclusive(d libvirt.Domain) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	v, ok := a.vms[d.Name]
	if !ok || !v.hasGoal {
		return false
	}
	for _, l := range v.goal.Leases {
		if l.Mode == events.LeaseExclusive {
			return true
		}
	}
	return false
}

// FenceMessage is what the agent tells `loom fence` after each
// acknowledged renewal, as one JSON datagram on Config.FenceSocket.
type FenceMessage struct {
	Host string `json:"host"`
	// Deadline is a CLOCK_BOOTTIME reading (BootNanos) on this machine.
	Deadline int64 `json:"deadline_boot_ns"`
	// RenewalSeq is the LOOM_LIVENESS sequence of the renewal.
	RenewalSeq uint64 `json:"renewal_seq"`
}

// tellFencer sends the new deadline to `loom fence`, if one listens. It
// never blocks the renewal: a fencer that is not there is logged, at most
// once a minute.
func (a *Agent) tellFencer(deadline int64, seq uint64) {
	if a.cfg.FenceSocket == "" || a.cfg.Unsafe.NoFence {
		return
	}
	data, _ := json.Marshal(FenceMessage{Host: a.cfg.Host, Deadline: deadline, RenewalSeq: seq})
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: a.cfg.FenceSocket, Net: "unixgram"})
	if err == nil {
		_ = conn.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		_, err = conn.Write(data)
		_ = conn.Close()
	}
	if err != nil {
		if ok, skipped := a.fencerLog.allow(); ok {
			a.log.Warn("tell loom fence the fencing deadline", "socket", a.cfg.FenceSocket, logErr, err, logSkipped, skipped)
		}
	}
}

// noteLost records that this host was declared lost: every grant made
// before now (the stream's last sequence, read once the loss is known)
// predates the loss and is refused from here on, whatever the leader says
// of it until the control plane expires it.
func (a *Agent) noteLost(ctx context.Context) {
	for attempt := 1; ; attempt++ {
		last, err := bus.LastSeq(ctx, a.cfg.JS, events.StreamEvents)
		if err == nil {
			for {
				old := a.lostWatermark.Load()
				if last <= old || a.lostWatermark.CompareAndSwap(old, last) {
					break
				}
			}
			a.log.Warn("declared lost: grants up to this sequence are never used again", logSeq, last)
			return
		}
		if !sleepCtx(ctx, a.backoff(attempt)) {
			return
		}
	}
}
