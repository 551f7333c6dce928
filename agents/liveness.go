package agents

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// renewLoop renews the host's liveness every Config.RenewInterval until ctx
// ends. Each renewal expects the subject sequence of the previous one, so
// renewals form a chain that anyone else's write (a lost marker) breaks.
func (a *Agent) renewLoop(ctx context.Context) error {
	log := throttle{period: time.Minute}
	ticker := time.NewTicker(a.cfg.RenewInterval)
	defer ticker.Stop()
	var last uint64 // sequence of the previous renewal on the subject
	known := false  // whether last was read
	for {
		if !known {
			standing, err := a.lastLiveness(ctx)
			if err == nil {
				last, known = standing.Seq, true
				if marker, ok := standing.Message.(*events.LostMarker); ok {
					a.metrics.renewals.WithLabelValues("lost").Inc()
					a.log.Error("this host was declared lost while its agent was away; rejoining",
						logSeq, standing.Seq, "renewal_seq", marker.RenewalSeq, "detector", marker.Detector)
					a.noteLost(ctx)
				}
			} else if ok, skipped := log.allow(); ok && ctx.Err() == nil {
				a.log.Warn("read liveness subject; retrying", logErr, err, logSkipped, skipped)
			}
		}
		if known {
			seq, err := a.renew(ctx, last)
			switch {
			case err == nil:
				last = seq
				a.metrics.renewals.WithLabelValues("ok").Inc()
			case errors.Is(err, bus.ErrWrongLastSeq):
				known = false
				standing, err := a.lastLiveness(ctx)
				if err != nil {
					a.log.Warn("liveness renewal rejected; re-reading failed", logErr, err)
					break
				}
				last, known = standing.Seq, true
				if marker, ok := standing.Message.(*events.LostMarker); ok {
					// Declared lost: the fencing deadline passed long ago
					// (fenceLoop paused what held exclusive leases), and the
					// grants made before now are never used again. The next
					// renewal rejoins under a new host epoch.
					a.metrics.renewals.WithLabelValues("lost").Inc()
					a.log.Error("this host was declared lost: a lost marker superseded our renewal; rejoining",
						logSeq, standing.Seq, "renewal_seq", marker.RenewalSeq, "detector", marker.Detector)
					a.noteLost(ctx)
					break
				}
				a.metrics.renewals.WithLabelValues("rejected").Inc()
				a.log.Warn("liveness renewal rejected: someone else wrote the liveness subject", logSeq, standing.Seq)
			case ctx.Err() == nil:
				a.metrics.renewals.WithLabelValues("error").Inc()
				if ok, skipped := log.allow(); ok {
					a.log.Warn("liveness renewal failed; retrying", logErr, err, logSkipped, skipped)
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
		}
	}
}

// livenessMessage is what stands on the host's liveness subject.
type livenessMessage struct {
	Seq uint64
	// Message is a *events.Renewal or a *events.LostMarker; nil when the
	// subject is empty or the message undecodable.
	Message any
}

// lastLiveness reads the last message on the host's liveness subject
// through the stream leader.
func (a *Agent) lastLiveness(ctx context.Context) (livenessMessage, error) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RenewInterval)
	defer cancel()
	m, err := bus.LastOnSubject(ctx, a.cfg.Conn, events.StreamLiveness, events.LivenessSubject(a.cfg.Host))
	if errors.Is(err, bus.ErrNoMessage) {
		return livenessMessage{}, nil
	}
	if err != nil {
		return livenessMessage{}, err
	}
	decoded, err := events.DecodeLiveness(m.Header.Get(events.HeaderType), m.Data)
	if err != nil {
		a.log.Warn("undecodable message on the liveness subject", logSeq, m.Seq, logErr, err)
	}
	return livenessMessage{Seq: m.Seq, Message: decoded}, nil
}

// renew publishes one renewal expecting the subject to stand at previous,
// and returns the renewal's sequence. A renewal that another write beat
// fails with bus.ErrWrongLastSeq.
func (a *Agent) renew(ctx context.Context, previous uint64) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RenewInterval)
	defer cancel()
	data, err := events.Marshal(&events.Renewal{Host: a.cfg.Host, TTLMillis: a.cfg.TTL.Milliseconds(), Agent: a.id})
	if err != nil {
		return 0, err
	}
	msg := &nats.Msg{Subject: events.LivenessSubject(a.cfg.Host), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, events.LivenessRenewal)
	// The fencing deadline counts from before the renewal left: whatever
	// the round trip took is already spent.
	sent := BootNanos()
	ack, err := bus.PublishExpecting(ctx, a.cfg.JS, msg, bus.Expect{Seq: previous})
	if err != nil {
		return 0, fmt.Errorf("renew: %w", err)
	}
	deadline := sent + int64(float64(a.cfg.TTL-a.cfg.FenceMargin)*a.cfg.ClockRate)
	a.fence.extend(deadline)
	a.tellFencer(deadline, ack.Seq)
	return ack.Seq, nil
}
