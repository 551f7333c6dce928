package handlers

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
)

// memReader is the read side in memory, with the behaviour of the real one:
// it folds LOOM_EVENTS in stream order as an ordered consumer delivers it,
// and answers from what it has applied so far.
type memReader struct {
	mu      sync.Mutex // guards the fields below
	applied uint64
	// changed is closed and replaced whenever applied grows.
	changed chan struct{}
	vms     map[string]row[events.VMState]
	hosts   map[string]row[events.HostState]
	images  map[string]row[events.ImageState]
	nets    map[string]row[events.NetState]
	leases  map[string]events.LeaseState
	heads   map[string]events.Head
	results map[[2]string][]events.Appended
	// lenient drops fold errors instead of failing the test, for tests
	// that switch a protection off and expect the stream to break rules.
	lenient bool
	// forgetful makes CommandResult find nothing, as if the read model had
	// lost its command results.
	forgetful bool
	errs      []error
}

// row is an aggregate's state and head.
type row[S any] struct {
	state S
	head  events.Head
}

var _ Reader = (*memReader)(nil)

func newMemReader() *memReader {
	return &memReader{changed: make(chan struct{}), vms: map[string]row[events.VMState]{},
		hosts: map[string]row[events.HostState]{}, images: map[string]row[events.ImageState]{}, nets: map[string]row[events.NetState]{},
		leases: map[string]events.LeaseState{}, heads: map[string]events.Head{},
		results: map[[2]string][]events.Appended{}}
}

// startMemReader follows the stream from its first event until the test ends.
func startMemReader(t testing.TB, js jetstream.JetStream) *memReader {
	t.Helper()
	r := newMemReader()
	ctx := context.Background()
	cons, err := js.OrderedConsumer(ctx, events.StreamEvents, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatalf("reader consumer: %v", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		meta, err := msg.Metadata()
		if err != nil {
			r.fail(err)
			return
		}
		r.apply(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data())
	})
	if err != nil {
		t.Fatalf("reader consume: %v", err)
	}
	t.Cleanup(func() {
		cc.Stop()
		<-cc.Closed()
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, err := range r.errs {
			t.Errorf("reader: %v", err)
		}
	})
	return r
}

func (r *memReader) fail(err error) {
	r.mu.Lock()
	r.errs = append(r.errs, err)
	r.mu.Unlock()
}

// apply folds the event at seq.
func (r *memReader) apply(seq uint64, subject string, stored time.Time, data []byte) {
	rec, err := events.DecodeRecord(seq, subject, stored, data)
	addr, aerr := events.ParseEventSubject(subject)
	r.mu.Lock()
	defer r.mu.Unlock()
	if seq <= r.applied {
		return
	}
	switch {
	case err != nil:
		r.errs = append(r.errs, err)
	case aerr != nil:
		r.errs = append(r.errs, aerr)
	default:
		if err := r.foldLocked(addr, &rec); err != nil && !r.lenient {
			r.errs = append(r.errs, fmt.Errorf("seq %d %s: %w", seq, subject, err))
		}
	}
	r.applied = seq
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *memReader) foldLocked(addr events.Address, rec *events.Record) error {
	head := events.Head{Seq: rec.Seq, Hash: events.Hash(rec.Data)}
	if !addr.Observed {
		r.heads[rec.Subject] = head
	}
	var err error
	switch addr.Kind {
	case events.KindLease:
		l := r.leases[addr.ID]
		l.Shared = maps.Clone(l.Shared)
		if err = l.Apply(rec, addr.Holder); err == nil {
			r.leases[addr.ID] = l
		}
	case events.KindVM:
		err = fold(r.vms, addr, rec, head)
	case events.KindHost:
		err = fold(r.hosts, addr, rec, head)
	case events.KindImage:
		err = fold(r.images, addr, rec, head)
	case events.KindNet:
		err = fold(r.nets, addr, rec, head)
	}
	if err == nil && !addr.Observed && rec.Envelope.CommandID != "" {
		key := [2]string{rec.Envelope.Actor, rec.Envelope.CommandID}
		r.results[key] = append(r.results[key], events.Appended{Seq: rec.Seq, Subject: rec.Subject, Type: rec.Envelope.Type, ID: rec.Envelope.ID})
	}
	return err
}

// fold applies rec to its aggregate; decisions move the head, observations
// do not.
func fold[S any, P interface {
	*S
	Apply(*events.Record) error
}](rows map[string]row[S], addr events.Address, rec *events.Record, head events.Head) error {
	rw := rows[addr.ID]
	if err := P(&rw.state).Apply(rec); err != nil {
		return err
	}
	if !addr.Observed {
		rw.head = head
	}
	rows[addr.ID] = rw
	return nil
}

func cloneHost(h events.HostState) events.HostState {
	h.Allocations = maps.Clone(h.Allocations)
	h.Labels = maps.Clone(h.Labels)
	h.Orphans = maps.Clone(h.Orphans)
	return h
}

func (r *memReader) VM(_ context.Context, name string) (events.VMState, events.Head, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rw := r.vms[name]
	return rw.state, rw.head, nil
}

func (r *memReader) Host(_ context.Context, name string) (events.HostState, events.Head, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rw := r.hosts[name]
	return cloneHost(rw.state), rw.head, nil
}

func (r *memReader) Net(_ context.Context, name string) (events.NetState, events.Head, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rw := r.nets[name]
	return rw.state, rw.head, nil
}

func (r *memReader) Nets(context.Context) ([]events.NetState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]events.NetState, 0, len(r.nets))
	for _, rw := range r.nets {
		out = append(out, rw.state)
	}
	return out, nil
}

func (r *memReader) Image(_ context.Context, name string) (events.ImageState, events.Head, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rw := r.images[name]
	return rw.state, rw.head, nil
}

func (r *memReader) Lease(_ context.Context, resource string) (events.LeaseState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.leases[resource]
	l.Shared = maps.Clone(l.Shared)
	return l, nil
}

func (r *memReader) LeaseOf(ctx context.Context, resource, holder string) (events.LeaseState, error) {
	l, err := r.Lease(ctx, resource)
	if g, ok := l.Shared[holder]; ok {
		l.Shared = map[string]events.LeaseGrant{holder: g}
	} else {
		l.Shared = nil
	}
	return l, err
}

func (r *memReader) AllLeases(context.Context) ([]events.LeaseGrant, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []events.LeaseGrant
	for _, resource := range slices.Sorted(maps.Keys(r.leases)) {
		l := r.leases[resource]
		out = append(out, l.Holding()...)
	}
	return out, nil
}

func (r *memReader) Head(_ context.Context, subject string) (events.Head, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.heads[subject], nil
}

func (r *memReader) Hosts(context.Context) ([]events.HostState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []events.HostState
	for _, name := range slices.Sorted(maps.Keys(r.hosts)) {
		out = append(out, cloneHost(r.hosts[name].state))
	}
	return out, nil
}

func (r *memReader) AllVMs(context.Context) ([]events.VMState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []events.VMState
	for _, name := range slices.Sorted(maps.Keys(r.vms)) {
		out = append(out, r.vms[name].state)
	}
	return out, nil
}

func (r *memReader) CommandResult(_ context.Context, actor, commandID string) ([]events.Appended, bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.forgetful {
		return nil, false, nil
	}
	result, ok := r.results[[2]string{actor, commandID}]
	return slices.Clone(result), ok, nil
}

func (r *memReader) WaitFor(ctx context.Context, seq uint64) error {
	for {
		r.mu.Lock()
		applied, changed := r.applied, r.changed
		r.mu.Unlock()
		if applied >= seq {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("read model at %d, waiting for %d: %w", applied, seq, ctx.Err())
		}
	}
}

// Applied is the last sequence folded.
func (r *memReader) Applied() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.applied
}

func (r *memReader) setLenient() {
	r.mu.Lock()
	r.lenient = true
	r.mu.Unlock()
}
