package handlers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
)

// fakeClock is the detectors' clock in these tests: time moves only when
// the test says so.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

const (
	testTTL    = time.Second
	testMargin = 500 * time.Millisecond
)

// detectorFixture is a registered host h1 and replicas running the failure
// detector on clock.
func detectorFixture(t *testing.T, replicas int, opts ...func(*Service)) (*bustest.Bus, *fakeClock, []*replica) {
	b := bustest.Start(t)
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	var rs []*replica
	for range replicas {
		r := startReplica(t, b, append([]func(*Service){func(s *Service) {
			s.cfg.Now, s.cfg.DetectorMargin, s.cfg.DetectInterval = clock.Now, testMargin, 5*time.Millisecond
		}}, opts...)...)
		rs = append(rs, r)
	}
	registerHost(t, rs[0].nc, "h1", 4, 4096)
	registerImage(t, rs[0].nc, "debian")
	return b, clock, rs
}

// runDetector runs r's failure detector until the test ends.
func runDetector(t *testing.T, r *replica) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.svc.RunDetector(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("detector: %v", err)
		}
	})
}

// passes waits until each replica's detector made n more passes.
func passes(t *testing.T, n int64, rs ...*replica) {
	t.Helper()
	for _, r := range rs {
		target := r.svc.detectorPasses.Load() + n
		waitFor(t, 5*time.Second, func() error {
			if got := r.svc.detectorPasses.Load(); got < target {
				return fmt.Errorf("%d detector passes, waiting for %d", got, target)
			}
			return nil
		})
	}
}

// renew publishes h1's renewal expecting the liveness subject at prev.
func renew(t *testing.T, b *bustest.Bus, prev uint64) uint64 {
	t.Helper()
	return publishLiveness(t, b, prev, events.LivenessRenewal, &events.Renewal{Host: "h1", TTLMillis: testTTL.Milliseconds(), Agent: "test"})
}

// publishLiveness publishes a liveness message of type typ on h1's subject,
// expecting it at prev.
func publishLiveness(t *testing.T, b *bustest.Bus, prev uint64, typ string, payload any) uint64 {
	t.Helper()
	data, err := events.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	msg := &nats.Msg{Subject: events.LivenessSubject("h1"), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, typ)
	a, err := bus.PublishExpecting(context.Background(), b.JS, msg, bus.Expect{Seq: prev})
	if err != nil {
		t.Fatalf("publish %s: %v", typ, err)
	}
	return a.Seq
}

// standing is what stands on h1's liveness subject.
func standing(t *testing.T, b *bustest.Bus) (uint64, any) {
	t.Helper()
	m, err := bus.LastOnSubject(context.Background(), b.Conn, events.StreamLiveness, events.LivenessSubject("h1"))
	if err != nil {
		t.Fatal(err)
	}
	decoded, err := events.DecodeLiveness(m.Header.Get(events.HeaderType), m.Data)
	if err != nil {
		t.Fatal(err)
	}
	return m.Seq, decoded
}

// hostEvents are the events on h1's subject of type typ, in order.
func hostEvents(t *testing.T, b *bustest.Bus, typ events.Type) []events.Event {
	t.Helper()
	ctx := context.Background()
	cons, err := b.JS.OrderedConsumer(ctx, events.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{events.EventSubject(events.KindHost, "h1")}})
	if err != nil {
		t.Fatal(err)
	}
	var out []events.Event
	for {
		msg, err := cons.Next(jetstream.FetchMaxWait(200 * time.Millisecond))
		if errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		meta, _ := msg.Metadata()
		rec, err := events.DecodeRecord(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data())
		if err != nil {
			t.Fatal(err)
		}
		if rec.Envelope.Type == typ {
			out = append(out, rec.Event)
		}
	}
}

// waitEvents waits until h1's subject holds n events of type typ.
func waitEvents(t *testing.T, b *bustest.Bus, typ events.Type, n int) []events.Event {
	t.Helper()
	var got []events.Event
	waitFor(t, 10*time.Second, func() error {
		if got = hostEvents(t, b, typ); len(got) < n {
			return fmt.Errorf("%d %s events, waiting for %d", len(got), typ, n)
		}
		return nil
	})
	return got
}

// A host that stops renewing is declared lost once TTL + margin have
// passed on the detector's clock, and not a moment before.
func TestDetector_SilentHostDeclaredLost(t *testing.T) {
	b, clock, rs := detectorFixture(t, 1)
	renewal := renew(t, b, 0)
	runDetector(t, rs[0])
	passes(t, 3, rs...)

	clock.Advance(testTTL + testMargin - time.Millisecond)
	passes(t, 3, rs...)
	if seq, msg := standing(t, b); seq != renewal {
		t.Fatalf("before TTL + margin, %T at %d stands on the liveness subject, want the renewal at %d", msg, seq, renewal)
	}
	if lost := hostEvents(t, b, events.TypeHostLost); len(lost) != 0 {
		t.Fatalf("before TTL + margin: %v", lost)
	}

	clock.Advance(2 * time.Millisecond)
	lost := waitEvents(t, b, events.TypeHostLost, 1)
	markerSeq, msg := standing(t, b)
	marker, ok := msg.(*events.LostMarker)
	if !ok || marker.RenewalSeq != renewal {
		t.Fatalf("liveness subject holds %#v, want a lost marker superseding %d", msg, renewal)
	}
	if want := (events.HostLost{MarkerSeq: markerSeq, RenewalSeq: renewal}); lost[0] != want {
		t.Fatalf("host.lost = %#v, want %#v", lost[0], want)
	}
	waitFor(t, 5*time.Second, func() error {
		if h, _, _ := rs[0].reader.Host(context.Background(), "h1"); !h.Lost {
			return errors.New("the read model does not show h1 lost")
		}
		return nil
	})
	// Nothing is placed on a lost host.
	reply := call(t, rs[0].nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 128))
	if code(reply.Error) != events.CodeNoCapacity {
		t.Fatalf("create with the only host lost: %+v, want no_capacity", reply)
	}
}

// A renewal that lands between the detector's decision and its marker wins:
// the marker is refused and the host is not declared lost. Without the
// marker's check against the renewal it supersedes, the same race declares
// a live host lost: the check is what prevents it.
func TestDetector_RenewalBeatsMarker(t *testing.T) {
	for _, fenced := range []bool{true, false} {
		t.Run(fmt.Sprintf("fenced=%v", fenced), func(t *testing.T) {
			var b *bustest.Bus
			var once sync.Once
			var renewal uint64
			b, clock, rs := detectorFixture(t, 1, func(s *Service) {
				s.unfencedMarkers = !fenced
				s.markerHook = func(string) { once.Do(func() { renew(t, b, renewal) }) }
			})
			renewal = renew(t, b, 0)
			runDetector(t, rs[0])
			passes(t, 3, rs...)
			clock.Advance(testTTL + testMargin)
			passes(t, 5, rs...)

			lost := hostEvents(t, b, events.TypeHostLost)
			if fenced && len(lost) != 0 {
				t.Fatalf("a host that renewed in time was declared lost: %v", lost)
			}
			if !fenced && len(lost) == 0 {
				t.Fatal("without the check the marker should have overwritten the fresh renewal; the test proves nothing")
			}
		})
	}
}

// Two replicas' detectors agree: one marker lands, and host.lost is
// recorded once.
func TestDetector_TwoReplicasOneDecision(t *testing.T) {
	b, clock, rs := detectorFixture(t, 2)
	renew(t, b, 0)
	runDetector(t, rs[0])
	runDetector(t, rs[1])
	passes(t, 3, rs...)
	clock.Advance(testTTL + testMargin)
	waitEvents(t, b, events.TypeHostLost, 1)
	passes(t, 5, rs...)
	if lost := hostEvents(t, b, events.TypeHostLost); len(lost) != 1 {
		t.Fatalf("host.lost recorded %d times: %v", len(lost), lost)
	}
}

// A detector that died between its marker and host.lost is finished by
// the next one; a renewal after the marker rejoins the host, and it takes
// VMs again.
func TestDetector_FinishesCutShortThenRejoin(t *testing.T) {
	b, _, rs := detectorFixture(t, 1)
	renewal := renew(t, b, 0)
	markerSeq := publishLiveness(t, b, renewal, events.LivenessLostMarker, &events.LostMarker{Host: "h1", RenewalSeq: renewal, Detector: "crashed"})

	runDetector(t, rs[0])
	lost := waitEvents(t, b, events.TypeHostLost, 1)
	if want := (events.HostLost{MarkerSeq: markerSeq, RenewalSeq: renewal}); lost[0] != want {
		t.Fatalf("host.lost = %#v, want %#v", lost[0], want)
	}
	waitFor(t, 5*time.Second, func() error {
		if h, _, _ := rs[0].reader.Host(context.Background(), "h1"); !h.Lost {
			return errors.New("the read model does not show h1 lost yet")
		}
		return nil
	})

	epoch := renew(t, b, markerSeq)
	rejoined := waitEvents(t, b, events.TypeHostRejoined, 1)
	if want := (events.HostRejoined{RenewalSeq: epoch}); rejoined[0] != want {
		t.Fatalf("host.rejoined = %#v, want %#v", rejoined[0], want)
	}
	waitFor(t, 5*time.Second, func() error {
		reply, err := tryCall(rs[0].nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 128))
		if err != nil || reply.Error != nil {
			return fmt.Errorf("create after rejoin: %+v %v", reply.Error, err)
		}
		return nil
	})
}
