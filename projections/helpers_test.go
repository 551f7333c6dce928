package projections

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/internal/eventually"
)

// waitFor polls cond until it returns nil, failing the test after timeout.
var waitFor = eventually.Wait

// openStore opens a store in dir, closed when the test ends.
func openStore(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatalf("open store: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// running is a store's Run in progress.
type running struct {
	t    testing.TB
	stop context.CancelFunc
	done chan error
}

// run starts s.Run; the returned stop (also called at cleanup) ends it and
// fails the test if Run failed.
func run(t testing.TB, s *Store, js jetstream.JetStream) *running {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	r := &running{t: t, stop: stop, done: make(chan error, 1)}
	go func() { r.done <- s.Run(ctx, js) }()
	t.Cleanup(r.halt)
	return r
}

// halt stops the run and waits for it; it may be called more than once.
func (r *running) halt() {
	r.t.Helper()
	r.stop()
	if err, ok := <-r.done; ok {
		close(r.done)
		if err != nil {
			r.t.Errorf("run: %v", err)
		}
	}
}

// catchUp waits until s has applied seq.
func catchUp(t testing.TB, s *Store, seq uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.WaitFor(ctx, seq); err != nil {
		t.Fatalf("wait for %d: %v", seq, err)
	}
}

// publisher appends sealed events to a test bus, chaining each subject's
// hashes, and returns their sequences.
type publisher struct {
	t    testing.TB
	js   jetstream.JetStream
	prev map[string][]byte
	// last is the sequence of the last message on each subject.
	last map[string]uint64
	tick int64
}

func newPublisher(t testing.TB, b *bustest.Bus) *publisher {
	return &publisher{t: t, js: b.JS, prev: map[string][]byte{}, last: map[string]uint64{}}
}

// event publishes ev on subject as the first event of commandID.
func (p *publisher) event(subject string, ev events.Event, commandID string) uint64 {
	p.t.Helper()
	return p.eventAt(subject, ev, "test", commandID, 0)
}

func (p *publisher) eventAt(subject string, ev events.Event, actor, commandID string, index int) uint64 {
	p.t.Helper()
	addr, err := events.ParseEventSubject(subject)
	if err != nil {
		p.t.Fatal(err)
	}
	p.tick++
	origin := events.Origin{Actor: actor, CommandID: commandID, Time: time.Unix(1_800_000_000+p.tick, 0)}
	env, data, err := events.Seal(ev, addr.Kind, addr.ID, origin, index, p.prev[subject])
	if err != nil {
		p.t.Fatal(err)
	}
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(env.Type))
	msg.Header.Set(events.HeaderVersion, fmt.Sprint(env.Version))
	return p.publish(msg)
}

// raw publishes bytes as they are.
func (p *publisher) raw(subject string, data []byte) uint64 {
	p.t.Helper()
	return p.publish(&nats.Msg{Subject: subject, Data: data})
}

func (p *publisher) publish(msg *nats.Msg) uint64 {
	p.t.Helper()
	ack, err := p.js.PublishMsg(context.Background(), msg)
	if err != nil {
		p.t.Fatalf("publish %s: %v", msg.Subject, err)
	}
	p.prev[msg.Subject] = events.Hash(msg.Data)
	p.last[msg.Subject] = ack.Sequence
	return ack.Sequence
}

// keyValue is one entry of a Pebble database.
type keyValue struct{ key, value []byte }

// dump lists every key and value of s's database in key order.
func dump(t testing.TB, s *Store) []keyValue {
	t.Helper()
	iter, err := s.db.NewIter(&pebble.IterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer iter.Close()
	var out []keyValue
	for valid := iter.First(); valid; valid = iter.Next() {
		out = append(out, keyValue{bytes.Clone(iter.Key()), bytes.Clone(iter.Value())})
	}
	return out
}

// diff describes how two dumps differ, at most a few differences; empty
// when they are equal.
func diff(a, b []keyValue) []string {
	var out []string
	i, j := 0, 0
	for (i < len(a) || j < len(b)) && len(out) < 5 {
		switch {
		case j == len(b) || (i < len(a) && bytes.Compare(a[i].key, b[j].key) < 0):
			out = append(out, fmt.Sprintf("only in first: %q", a[i].key))
			i++
		case i == len(a) || bytes.Compare(a[i].key, b[j].key) > 0:
			out = append(out, fmt.Sprintf("only in second: %q", b[j].key))
			j++
		default:
			if !bytes.Equal(a[i].value, b[j].value) {
				out = append(out, fmt.Sprintf("%q: %x != %x", a[i].key, a[i].value, b[j].value))
			}
			i, j = i+1, j+1
		}
	}
	return out
}
