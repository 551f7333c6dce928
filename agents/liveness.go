package agents

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// typeRenewal is the Loom-Type header of a liveness renewal.
// TODO(loom): move to events beside the lost marker's type.
const typeRenewal = "host.renewal"

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
			seq, err := a.lastLivenessSeq(ctx)
			if err == nil {
				last, known = seq, true
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
				// TODO(loom): the lost-marker protocol (DESIGN "Liveness and
				// time"): when what stands is a lost marker, fence and rejoin
				// under a new host epoch instead of renewing over it.
				a.metrics.renewals.WithLabelValues("rejected").Inc()
				a.log.Warn("liveness renewal rejected: someone else wrote the liveness subject; re-reading", logErr, err)
				known = false
				if seq, err := a.lastLivenessSeq(ctx); err == nil {
					last, known = seq, true
				}
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

// lastLivenessSeq reads the sequence of the last message on the host's
// liveness subject through the stream leader; 0 when there is none.
func (a *Agent) lastLivenessSeq(ctx context.Context) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.RenewInterval)
	defer cancel()
	m, err := bus.LastOnSubject(ctx, a.cfg.Conn, events.StreamLiveness, events.LivenessSubject(a.cfg.Host))
	if errors.Is(err, bus.ErrNoMessage) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return m.Seq, nil
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
	msg.Header.Set(events.HeaderType, typeRenewal)
	msg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(previous, 10))
	// TODO(loom): note the monotonic time before publishing and, on the ack,
	// hand the fencing deadline (sent + TTL - margin) to `loom fence`.
	ack, err := a.cfg.JS.PublishMsg(ctx, msg)
	if err != nil {
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
			return 0, fmt.Errorf("renew %s: %w: %w", msg.Subject, bus.ErrWrongLastSeq, err)
		}
		return 0, fmt.Errorf("renew %s: %w", msg.Subject, err)
	}
	return ack.Sequence, nil
}
