package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/internal/eventually"
)

// waitFor polls cond until it returns nil, failing the test after timeout.
var waitFor = eventually.Wait

// replica is one running Service: its own connection, read model and
// micro service, as one `loom serve` would have.
type replica struct {
	svc    *Service
	reader *memReader
	nc     *nats.Conn
	js     jetstream.JetStream
}

// startReplica starts a Service on b, its endpoints served by micro in
// queue group "loom"; opts adjust it before it serves. It stops when the
// test ends.
func startReplica(t testing.TB, b *bustest.Bus, opts ...func(*Service)) *replica {
	t.Helper()
	return startReplicaOn(t, bustest.Connect(t, b.URL), opts...)
}

// startReplicaOn is startReplica on the connection nc.
func startReplicaOn(t testing.TB, nc *nats.Conn, opts ...func(*Service)) *replica {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	r := &replica{reader: startMemReader(t, js), nc: nc, js: js}
	r.svc, err = New(Config{JS: js, Conn: nc, Reader: r.reader, Logger: slog.New(slog.DiscardHandler), RequestTimeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for _, opt := range opts {
		opt(r.svc)
	}
	ms, err := micro.AddService(nc, micro.Config{Name: "loom", Version: "0.0.1", QueueGroup: "loom"})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.svc.AddEndpoints(ms); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil { // the server knows the endpoints before anyone calls
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ms.Stop()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := r.svc.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return r
}

// call sends a command in format as actor ("" for none) and returns the
// reply, checking that micro's error headers agree with its body.
func call(t testing.TB, nc *nats.Conn, kind events.Kind, verb string, format events.Format, actor string, body any) events.Reply {
	t.Helper()
	reply, err := tryCall(nc, kind, verb, format, actor, body)
	if err != nil {
		t.Fatal(err)
	}
	return reply
}

// tryCall is call for goroutines other than the test's.
func tryCall(nc *nats.Conn, kind events.Kind, verb string, format events.Format, actor string, body any) (events.Reply, error) {
	msg := nats.NewMsg(events.CommandSubject(kind, verb))
	if raw, ok := body.([]byte); ok {
		msg.Data = raw
	} else {
		var err error
		if msg.Data, err = events.EncodeAs(format, body); err != nil {
			return events.Reply{}, err
		}
	}
	if actor != "" {
		msg.Header.Set(events.HeaderActor, actor)
	}
	resp, err := nc.RequestMsg(msg, 30*time.Second)
	if err != nil {
		return events.Reply{}, fmt.Errorf("%s: %w", msg.Subject, err)
	}
	var reply events.Reply
	if format == events.FormatJSON {
		err = json.Unmarshal(resp.Data, &reply)
	} else {
		err = events.Unmarshal(resp.Data, &reply)
	}
	if err != nil {
		return events.Reply{}, fmt.Errorf("%s: reply %q: %w", msg.Subject, resp.Data, err)
	}
	code := resp.Header.Get(micro.ErrorCodeHeader)
	if reply.Error != nil && code != strconv.Itoa(int(reply.Error.Code)) || reply.Error == nil && code != "" {
		return events.Reply{}, fmt.Errorf("%s: error header %q, body error %v", msg.Subject, code, reply.Error)
	}
	return reply, nil
}

// must is call for a command that must succeed.
func must(t testing.TB, nc *nats.Conn, kind events.Kind, verb string, body any) events.Reply {
	t.Helper()
	reply := call(t, nc, kind, verb, events.FormatMsgpack, "", body)
	if reply.Error != nil {
		t.Fatalf("%s.%s: %v", kind, verb, reply.Error)
	}
	return reply
}

func registerHost(t testing.TB, nc *nats.Conn, name string, cpu, memoryMiB int) {
	t.Helper()
	must(t, nc, events.KindHost, events.VerbRegister, &events.RegisterHost{
		CommandMeta: events.CommandMeta{CommandID: "register-" + name}, Name: name, CPU: cpu, MemoryMiB: memoryMiB})
}

func registerImage(t testing.TB, nc *nats.Conn, name string) {
	t.Helper()
	must(t, nc, events.KindImage, events.VerbRegister, &events.RegisterImage{
		CommandMeta: events.CommandMeta{CommandID: "register-" + name}, Name: name, Format: "qcow2", SizeBytes: 1 << 30})
}

func createCmd(name, commandID string, cpu, memoryMiB int) *events.CreateVM {
	return &events.CreateVM{CommandMeta: events.CommandMeta{CommandID: commandID}, Name: name, Image: "debian", CPU: cpu, MemoryMiB: memoryMiB}
}

func vmCmd(name, commandID string) *events.VMCommand {
	return &events.VMCommand{CommandMeta: events.CommandMeta{CommandID: commandID}, Name: name}
}

// lastSeq is the stream's last sequence.
func lastSeq(t testing.TB, b *bustest.Bus) uint64 {
	t.Helper()
	seq, err := bus.LastSeq(context.Background(), b.JS, events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	return seq
}

// types lists the types of appended events.
func types(appended []events.Appended) []events.Type {
	out := make([]events.Type, 0, len(appended))
	for _, a := range appended {
		out = append(out, a.Type)
	}
	return out
}

// replayHosts folds every host event on the stream in order, failing the
// test if any host's allocations ever exceed its capacity, and returns the
// hosts as they end up.
func replayHosts(t testing.TB, js jetstream.JetStream) map[string]*events.HostState {
	t.Helper()
	hosts, overcommits := foldHosts(t, js)
	for _, o := range overcommits {
		t.Error(o)
	}
	return hosts
}

// foldHosts folds every host event on the stream in order and describes
// each moment a host's allocations exceeded its capacity.
func foldHosts(t testing.TB, js jetstream.JetStream) (map[string]*events.HostState, []string) {
	t.Helper()
	ctx := context.Background()
	cons, err := js.OrderedConsumer(ctx, events.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{events.EventSubject(events.KindHost, "*")}})
	if err != nil {
		t.Fatal(err)
	}
	hosts := map[string]*events.HostState{}
	var overcommits []string
	for {
		batch, err := cons.FetchNoWait(1000)
		if err != nil {
			t.Fatal(err)
		}
		var pending uint64 = 1
		for msg := range batch.Messages() {
			meta, _ := msg.Metadata()
			pending = meta.NumPending
			rec, err := events.DecodeRecord(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data())
			if err != nil {
				t.Fatal(err)
			}
			h := hosts[rec.Envelope.AggregateID]
			if h == nil {
				h = &events.HostState{}
				hosts[rec.Envelope.AggregateID] = h
			}
			if err := h.Apply(&rec); err != nil {
				t.Fatal(err)
			}
			if cpu, mem := h.Used(); cpu > h.CPU || mem > h.MemoryMiB {
				overcommits = append(overcommits, fmt.Sprintf("host %s over-committed at seq %d: cpu %d/%d mem %d/%d",
					h.Name, rec.Seq, cpu, h.CPU, mem, h.MemoryMiB))
			}
		}
		if batch.Error() != nil {
			t.Fatal(batch.Error())
		}
		if pending == 0 {
			return hosts, overcommits
		}
	}
}

// countingPublisher counts the publishes that go through it.
type countingPublisher struct {
	jetstream.Publisher
	n atomic.Int64
}

func (p *countingPublisher) PublishMsg(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	p.n.Add(1)
	return p.Publisher.PublishMsg(ctx, msg, opts...)
}

// uncheckedPublisher strips the expected-last-subject-sequence check from
// every append: what the handlers would do without optimistic concurrency.
type uncheckedPublisher struct{ jetstream.Publisher }

func (p uncheckedPublisher) PublishMsg(ctx context.Context, msg *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	msg.Header.Del(jetstream.ExpectedLastSubjSeqHeader)
	msg.Header.Del(bus.HeaderExpectedLastSubjSeqSubject)
	return p.Publisher.PublishMsg(ctx, msg, opts...)
}

// fixture is a bus with hosts and an image registered through a replica.
func fixture(t testing.TB, hosts int, cpu, memoryMiB int) (*bustest.Bus, *replica, *nats.Conn) {
	t.Helper()
	b := bustest.Start(t)
	r := startReplica(t, b)
	client := bustest.Connect(t, b.URL)
	for i := range hosts {
		registerHost(t, client, fmt.Sprintf("h%d", i+1), cpu, memoryMiB)
	}
	registerImage(t, client, "debian")
	return b, r, client
}

// createChain is what a whole vm.create appends, in order.
var createChain = []events.Type{events.TypeVMCreated, events.TypeHostAllocated, events.TypeLeaseGranted, events.TypeLeaseGranted, events.TypeVMPlaced}
