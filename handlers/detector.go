package handlers

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/oklog/ulid/v2"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// The failure detector (DESIGN "Liveness and time").
//
// It follows LOOM_LIVENESS and notes, on its own clock, when it received
// each host's last renewal (its own start time for the renewals it finds
// when it starts). Once TTL + margin have passed on that clock with nothing
// newer, it publishes a lost marker on loom.live.<host> expecting the
// subject sequence of that renewal. The marker races the host's next
// renewal on the same subject and exactly one of them lands: only a marker
// that landed permits host.lost, appended to the host's subject in the
// name of the marker (so every replica derives the same event id). A
// renewal after a marker is the host rejoining under a new epoch:
// host.rejoined. No two machines' clocks are ever compared: the detector
// measures intervals on its own monotonic clock, the agent on its own.
//
// Every replica of loom serve may run one: the markers are checked against
// the renewal they supersede, and the decisions are idempotent.

// Defaults of the failure detector.
const (
	// DefaultDetectorMargin is m_d: how long past a renewal's TTL the
	// detector waits before it claims the host lost.
	DefaultDetectorMargin = 2 * time.Second
	// DefaultDetectInterval is how often the detector looks for hosts past
	// their deadline.
	DefaultDetectInterval = 250 * time.Millisecond
	// defaultRenewalTTL stands in for a renewal that names no TTL.
	defaultRenewalTTL = 10 * time.Second
)

// detectorActor is the actor of the detector's decisions.
const detectorActor = "loom:detector"

// watched is a host whose last liveness message is a renewal.
type watched struct {
	renewalSeq uint64
	// received is when this detector received the renewal (or started),
	// on its own clock.
	received time.Time
	ttl      time.Duration
	// refused says a marker for this renewal lost its race: a newer
	// message is on its way, wait for it.
	refused bool
}

// detector is the state of one RunDetector. It outlives restarts of the
// consumer: a renewal seen again after a restart keeps the time it was
// first received, so a flapping consumer cannot postpone a deadline.
type detector struct {
	s     *Service
	id    string
	hosts map[string]*watched
	// undeclared are landed markers whose host.lost is not recorded yet,
	// by host: retried each pass until it is.
	undeclared map[string]marker
}

// marker is a lost marker that landed.
type marker struct{ seq, renewalSeq uint64 }

// RunDetector runs the failure detector until ctx ends; it returns nil then.
func (s *Service) RunDetector(ctx context.Context) error {
	d := &detector{s: s, id: ulid.MustNew(ulid.Now(), rand.Reader).String(),
		hosts: map[string]*watched{}, undeclared: map[string]marker{}}
	for attempt := 1; ctx.Err() == nil; attempt++ {
		started := time.Now()
		err := d.follow(ctx)
		if ctx.Err() != nil {
			break
		}
		if time.Since(started) > time.Minute {
			attempt = 1
		}
		s.log.Warn("failure detector: following liveness failed; starting over", keyErr, err, "attempt", attempt)
		if err := backoff(ctx, attempt); err != nil {
			break
		}
	}
	return nil
}

// follow reads the last liveness message of every host, then each new one,
// and every DetectInterval looks for hosts past their deadline.
func (d *detector) follow(ctx context.Context) error {
	stream, err := d.s.cfg.JS.Stream(ctx, events.StreamLiveness)
	if err != nil {
		return err
	}
	cons, err := bus.OrderedConsumer(ctx, d.s.cfg.JS, stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{events.LivenessWildcard},
		DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return err
	}
	defer bus.Forget(d.s.cfg.JS, events.StreamLiveness, cons)
	// One long-lived subscription (a Next with a timeout on an ordered
	// consumer makes a new server-side consumer each call), read by a
	// goroutine, so that this one alone touches the detector's state.
	iter, err := cons.Messages()
	if err != nil {
		return err
	}
	defer iter.Stop()
	msgs := make(chan jetstream.Msg)
	failed := make(chan error, 1)
	go func() {
		for {
			msg, err := iter.Next()
			if err != nil {
				failed <- err
				return
			}
			select {
			case msgs <- msg:
			case <-ctx.Done():
				return
			}
		}
	}()
	ticker := time.NewTicker(d.s.cfg.DetectInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case msg := <-msgs:
			d.observe(ctx, msg)
		case err := <-failed:
			return err
		case <-ticker.C:
			d.check(ctx)
		}
	}
}

// observe takes one liveness message.
func (d *detector) observe(ctx context.Context, msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		return
	}
	host, ok := strings.CutPrefix(msg.Subject(), events.LivenessSubject(""))
	if !ok || events.ValidateName("host", host) != nil {
		d.s.log.Warn("failure detector: liveness message on a subject that names no host", keySubject, msg.Subject())
		return
	}
	seq := meta.Sequence.Stream
	decoded, err := events.DecodeLiveness(msg.Headers().Get(events.HeaderType), msg.Data())
	if err != nil {
		// Not a renewal: it renews nothing, and the host's deadline stands.
		d.s.log.Warn("failure detector: undecodable liveness message", keySubject, msg.Subject(), "seq", seq, keyErr, err)
		return
	}
	switch m := decoded.(type) {
	case *events.Renewal:
		ttl := time.Duration(m.TTLMillis) * time.Millisecond
		if ttl <= 0 {
			ttl = defaultRenewalTTL
		}
		if w, ok := d.hosts[host]; ok && w.renewalSeq == seq {
			return // seen before a restart of the consumer: its deadline stands
		}
		d.hosts[host] = &watched{renewalSeq: seq, received: d.s.cfg.Now(), ttl: ttl}
		delete(d.undeclared, host)
		d.rejoin(ctx, host, seq)
	case *events.LostMarker:
		delete(d.hosts, host)
		d.undeclared[host] = marker{seq: seq, renewalSeq: m.RenewalSeq}
		d.declareUndeclared(ctx)
	}
}

// check claims lost every host past its deadline, and records host.lost
// for every landed marker not recorded yet.
func (d *detector) check(ctx context.Context) {
	defer d.s.detectorPasses.Add(1)
	defer d.declareUndeclared(ctx)
	now := d.s.cfg.Now()
	for host, w := range d.hosts {
		if w.refused || now.Sub(w.received) < w.ttl+d.s.cfg.DetectorMargin {
			continue
		}
		seq, err := d.mark(ctx, host, w.renewalSeq)
		switch {
		case err == nil:
			delete(d.hosts, host)
			d.undeclared[host] = marker{seq: seq, renewalSeq: w.renewalSeq}
			d.s.log.Warn("host went silent: lost marker landed", keyHost, host, "renewal_seq", w.renewalSeq, "marker_seq", seq,
				"silent_for", now.Sub(w.received).Round(time.Millisecond))
		case errors.Is(err, bus.ErrWrongLastSeq):
			w.refused = true // the host renewed, or another detector marked it: the consumer brings which
		default:
			d.s.log.Warn("failure detector: publish lost marker; retrying", keyHost, host, keyErr, err)
		}
	}
}

// mark publishes a lost marker superseding the renewal at renewalSeq.
func (d *detector) mark(ctx context.Context, host string, renewalSeq uint64) (uint64, error) {
	if d.s.markerHook != nil {
		d.s.markerHook(host)
	}
	data, err := events.Marshal(&events.LostMarker{Host: host, RenewalSeq: renewalSeq, Detector: d.id})
	if err != nil {
		return 0, err
	}
	msg := &nats.Msg{Subject: events.LivenessSubject(host), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, events.LivenessLostMarker)
	if d.s.unfencedMarkers {
		ack, err := d.s.publisher.PublishMsg(ctx, msg)
		if err != nil {
			return 0, err
		}
		return ack.Sequence, nil
	}
	a, err := bus.PublishExpecting(ctx, d.s.publisher, msg, bus.Expect{Seq: renewalSeq})
	if err != nil {
		return 0, fmt.Errorf("lost marker for %s: %w", host, err)
	}
	return a.Seq, nil
}

// declareUndeclared records host.lost for each landed marker not recorded
// yet; those that fail stay for the next pass.
func (d *detector) declareUndeclared(ctx context.Context) {
	for host, m := range d.undeclared {
		if d.declare(ctx, host, m.seq, m.renewalSeq) {
			delete(d.undeclared, host)
		}
	}
}

// declare appends host.lost for the marker at markerSeq, unless the host's
// subject already records it (another replica, or an earlier pass) or a
// rejoin after it. False means it failed and should be tried again.
func (d *detector) declare(ctx context.Context, host string, markerSeq, renewalSeq uint64) bool {
	c := newCommand(detectorActor, "lost-"+strconv.FormatUint(markerSeq, 10), "", events.Origin{Time: d.s.cfg.Now()})
	res, fault := appendStep(ctx, d.s, d.s.hosts, c, host, 0, events.TypeHostLost, func(h *hostView) (events.Event, *events.Fault) {
		return decideLost(&h.state, markerSeq, renewalSeq), nil
	})
	switch {
	case fault != nil:
		d.s.log.Warn("failure detector: record host.lost; will retry", keyHost, host, "marker_seq", markerSeq, keyErr, fault)
		return false
	case res.appended != nil && !res.replayed:
		d.s.metrics.hostsLost.Inc()
		d.s.Nudge() // expire its leases and move its VMs
		d.s.log.Warn("host declared lost", keyHost, host, "marker_seq", markerSeq, "seq", res.appended.Seq)
	}
	return true
}

// rejoin appends host.rejoined when a renewal at seq follows the lost
// marker of a host recorded lost. The Reader says whether to try: it may
// lag, and then the next renewal tries again.
func (d *detector) rejoin(ctx context.Context, host string, seq uint64) {
	h, _, err := d.s.cfg.Reader.Host(ctx, host)
	if err != nil || !h.Lost || h.LostMarker >= seq {
		return
	}
	c := newCommand(detectorActor, "rejoin-"+strconv.FormatUint(seq, 10), "", events.Origin{Time: d.s.cfg.Now()})
	res, fault := appendStep(ctx, d.s, d.s.hosts, c, host, 0, events.TypeHostRejoined, func(h *hostView) (events.Event, *events.Fault) {
		return decideRejoin(&h.state, seq), nil
	})
	switch {
	case fault != nil:
		d.s.log.Warn("failure detector: record host.rejoined", keyHost, host, "renewal_seq", seq, keyErr, fault)
	case res.appended != nil && !res.replayed:
		d.s.log.Info("host rejoined after it was declared lost", keyHost, host, "epoch", seq)
	}
}

// decideLost is host.lost for the marker at markerSeq, or nothing if the
// host is unknown, already recorded lost at that marker or later, or
// rejoined after it.
func decideLost(h *events.HostState, markerSeq, renewalSeq uint64) events.Event {
	if !h.Registered || (h.Lost && h.LostMarker >= markerSeq) || h.Epoch > markerSeq {
		return nil
	}
	return events.HostLost{MarkerSeq: markerSeq, RenewalSeq: renewalSeq}
}

// decideRejoin is host.rejoined at the renewal seq, or nothing if the host
// is not lost or its marker came after that renewal.
func decideRejoin(h *events.HostState, seq uint64) events.Event {
	if !h.Registered || !h.Lost || h.LostMarker >= seq {
		return nil
	}
	return events.HostRejoined{RenewalSeq: seq}
}
