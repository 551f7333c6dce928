package projections

import (
	"context"
	"encoding/json"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

// queryFixture is a store serving queries, with a small fleet applied.
type queryFixture struct {
	t      *testing.T
	bus    *bustest.Bus
	store  *Store
	pub    *publisher
	client *nats.Conn
	runner *running
}

func newQueryFixture(t *testing.T, opts Options) *queryFixture {
	f := &queryFixture{t: t, bus: bustest.Start(t)}
	f.client = bustest.Connect(t, f.bus.URL)
	f.pub = newPublisher(t, f.bus)
	f.store = openStore(t, t.TempDir(), opts)
	svc, err := micro.AddService(f.bus.Conn, micro.Config{Name: "loom", Version: "0.0.1", QueueGroup: "loom"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	if err := f.store.AddQueryEndpoints(svc); err != nil {
		t.Fatal(err)
	}
	f.runner = run(t, f.store, f.bus.JS)

	host := func(name string) string { return events.EventSubject(events.KindHost, name) }
	vm := func(name string) string { return events.EventSubject(events.KindVM, name) }
	p := f.pub
	p.event(host("h1"), events.HostRegistered{CPU: 8, MemoryMiB: 8192}, "reg-h1")
	p.event(host("h2"), events.HostRegistered{CPU: 4, MemoryMiB: 4096}, "reg-h2")
	p.event(events.EventSubject(events.KindImage, "demo"), events.ImageRegistered{Format: "qcow2", SizeBytes: 1 << 20}, "reg-demo")
	p.event(vm("web"), events.VMCreated{UID: "u1", Image: "demo", CPU: 2, MemoryMiB: 1024, Desired: events.DesiredRunning}, "c-web")
	alloc := p.event(host("h1"), events.HostAllocated{VM: "web", UID: "u1", CPU: 2, MemoryMiB: 1024}, "c-web")
	placed := p.event(vm("web"), events.VMPlaced{UID: "u1", Host: "h1", AllocationSeq: alloc}, "c-web")
	p.event(events.ObservationSubject("h1", events.KindVM, "web"), events.VMObserved{UID: "u1", Incarnation: placed, State: events.ObservedRunning}, "")
	p.event(vm("old"), events.VMCreated{UID: "u2", Image: "demo", CPU: 1, MemoryMiB: 512, Desired: events.DesiredRunning}, "c-old")
	last := p.event(vm("old"), events.VMDeleted{UID: "u2", Reason: events.AbsentDeleted}, "d-old")
	// An agent that reported before its host was registered.
	p.event(events.ObservationSubject("h9", events.KindHost, "h9"), events.HostOrphanFound{Domain: "x"}, "")
	catchUp(t, f.store, last+1)
	return f
}

// request sends body to loom.q.<kind>.<verb> and decodes the reply in the
// given format; code is the micro error code header, 0 when none.
func (f *queryFixture) request(kind events.Kind, verb string, body []byte, format events.Format) (events.QueryReply, int) {
	f.t.Helper()
	msg, err := f.client.Request(events.QuerySubject(kind, verb), body, 10*time.Second)
	if err != nil {
		f.t.Fatalf("request %s.%s: %v", kind, verb, err)
	}
	var reply events.QueryReply
	if format == events.FormatJSON {
		err = json.Unmarshal(msg.Data, &reply)
	} else {
		err = events.Unmarshal(msg.Data, &reply)
	}
	if err != nil {
		f.t.Fatalf("reply to %s.%s: %v: %q", kind, verb, err, msg.Data)
	}
	code := 0
	if h := msg.Header.Get(micro.ErrorCodeHeader); h != "" {
		code, _ = strconv.Atoi(h)
	}
	if reply.Error != nil && int(reply.Error.Code) != code {
		f.t.Fatalf("reply error %v but header code %d", reply.Error, code)
	}
	return reply, code
}

func jsonQuery(t *testing.T, q events.Query) []byte {
	t.Helper()
	data, err := json.Marshal(q)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func msgpackQuery(t *testing.T, q events.Query) []byte { return mustMarshal(t, &q) }

func TestQueries(t *testing.T) {
	f := newQueryFixture(t, Options{})
	applied := f.store.Applied()
	tests := []struct {
		name     string
		kind     events.Kind
		verb     string
		body     []byte
		format   events.Format
		wantCode events.Code
		check    func(t *testing.T, r events.QueryReply)
	}{
		{"vm get json", events.KindVM, events.VerbGet, jsonQuery(t, events.Query{Name: "web"}), events.FormatJSON, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.VMs) != 1 || r.VMs[0].Name != "web" || r.VMs[0].Host != "h1" || !r.VMs[0].Converged {
					t.Fatalf("vms = %+v, want web on h1, converged", r.VMs)
				}
			}},
		{"vm get msgpack", events.KindVM, events.VerbGet, msgpackQuery(t, events.Query{Name: "web"}), events.FormatMsgpack, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.VMs) != 1 || r.VMs[0].UID != "u1" || !r.VMs[0].Converged {
					t.Fatalf("vms = %+v, want web, converged", r.VMs)
				}
			}},
		{"vm list empty body", events.KindVM, events.VerbList, nil, events.FormatMsgpack, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.VMs) != 1 || r.VMs[0].Name != "web" {
					t.Fatalf("vms = %+v, want web only (old is gone)", r.VMs)
				}
			}},
		{"vm list gone too", events.KindVM, events.VerbList, jsonQuery(t, events.Query{IncludeGone: true}), events.FormatJSON, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.VMs) != 2 || r.VMs[0].Name != "old" || r.VMs[0].Phase != events.PhaseGone {
					t.Fatalf("vms = %+v, want old (gone) and web", r.VMs)
				}
			}},
		{"vm list by host", events.KindVM, events.VerbList, jsonQuery(t, events.Query{Host: "h2"}), events.FormatJSON, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.VMs) != 0 {
					t.Fatalf("vms on h2 = %+v, want none", r.VMs)
				}
			}},
		{"gone vm get", events.KindVM, events.VerbGet, jsonQuery(t, events.Query{Name: "old"}), events.FormatJSON, events.CodeVMNotFound, nil},
		{"gone vm get with gone", events.KindVM, events.VerbGet, jsonQuery(t, events.Query{Name: "old", IncludeGone: true}), events.FormatJSON, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.VMs) != 1 || r.VMs[0].Phase != events.PhaseGone {
					t.Fatalf("vms = %+v, want old, gone", r.VMs)
				}
			}},
		{"missing vm", events.KindVM, events.VerbGet, jsonQuery(t, events.Query{Name: "nope"}), events.FormatJSON, events.CodeVMNotFound, nil},
		{"host get", events.KindHost, events.VerbGet, msgpackQuery(t, events.Query{Name: "h1"}), events.FormatMsgpack, 0,
			func(t *testing.T, r events.QueryReply) {
				h := r.Hosts
				if len(h) != 1 || h[0].UsedCPU != 2 || h[0].FreeCPU != 6 || h[0].UsedMiB != 1024 || h[0].FreeMiB != 7168 || h[0].VMs != 1 {
					t.Fatalf("hosts = %+v, want h1 with 2 cpu and 1024 MiB used by one VM", h)
				}
			}},
		{"host list", events.KindHost, events.VerbList, []byte("{}"), events.FormatJSON, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.Hosts) != 2 || r.Hosts[0].Name != "h1" || r.Hosts[1].Name != "h2" {
					t.Fatalf("hosts = %+v, want the registered h1 and h2", r.Hosts)
				}
			}},
		{"unregistered host", events.KindHost, events.VerbGet, jsonQuery(t, events.Query{Name: "h9"}), events.FormatJSON, events.CodeHostNotFound, nil},
		{"missing host", events.KindHost, events.VerbGet, jsonQuery(t, events.Query{Name: "h7"}), events.FormatJSON, events.CodeHostNotFound, nil},
		{"image get", events.KindImage, events.VerbGet, jsonQuery(t, events.Query{Name: "demo"}), events.FormatJSON, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.Images) != 1 || r.Images[0].Format != "qcow2" {
					t.Fatalf("images = %+v", r.Images)
				}
			}},
		{"image list", events.KindImage, events.VerbList, nil, events.FormatMsgpack, 0,
			func(t *testing.T, r events.QueryReply) {
				if len(r.Images) != 1 {
					t.Fatalf("images = %+v", r.Images)
				}
			}},
		{"missing image", events.KindImage, events.VerbGet, msgpackQuery(t, events.Query{Name: "nope"}), events.FormatMsgpack, events.CodeImageNotFound, nil},
		{"get without name", events.KindVM, events.VerbGet, []byte(`{}`), events.FormatJSON, events.CodeInvalidArgument, nil},
		{"bad json", events.KindVM, events.VerbList, []byte(`{"name": `), events.FormatJSON, events.CodeBadRequest, nil},
		{"unknown json field", events.KindHost, events.VerbList, []byte(`{"hostname": "h1"}`), events.FormatJSON, events.CodeBadRequest, nil},
		{"bad msgpack", events.KindImage, events.VerbGet, []byte{0xc1, 0x01}, events.FormatMsgpack, events.CodeBadRequest, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reply, code := f.request(tc.kind, tc.verb, tc.body, tc.format)
			if events.Code(code) != tc.wantCode {
				t.Fatalf("code = %d (%v), want %d", code, reply.Error, tc.wantCode)
			}
			if reply.Seq != applied {
				t.Fatalf("seq = %d, want %d", reply.Seq, applied)
			}
			if tc.check != nil {
				tc.check(t, reply)
			}
		})
	}
}

// TestQueries_MinSeqReadsYourWrites asks for a sequence the read models
// have not applied yet: the answer waits for it.
func TestQueries_MinSeqReadsYourWrites(t *testing.T) {
	f := newQueryFixture(t, Options{})
	f.runner.halt()
	seq := f.pub.event(events.EventSubject(events.KindVM, "web"), events.VMGoalChanged{UID: "u1", Desired: events.DesiredStopped}, "stop-web")
	if f.store.Applied() >= seq {
		t.Fatalf("applied %d already, the test needs it behind %d", f.store.Applied(), seq)
	}
	type answer struct {
		reply events.QueryReply
		code  int
	}
	answered := make(chan answer, 1)
	go func() {
		reply, code := f.request(events.KindVM, events.VerbGet, jsonQuery(t, events.Query{Name: "web", MinSeq: seq}), events.FormatJSON)
		answered <- answer{reply, code}
	}()
	f.runner = run(t, f.store, f.bus.JS)
	a := <-answered
	if a.code != 0 || a.reply.Seq < seq || len(a.reply.VMs) != 1 || a.reply.VMs[0].Desired != events.DesiredStopped || a.reply.VMs[0].Converged {
		t.Fatalf("reply = %+v (code %d), want web stopping at sequence %d or later", a.reply, a.code, seq)
	}
}

func TestQueries_MinSeqTimesOut(t *testing.T) {
	f := newQueryFixture(t, Options{QueryWait: 50 * time.Millisecond})
	reply, code := f.request(events.KindVM, events.VerbList, msgpackQuery(t, events.Query{MinSeq: 1 << 40}), events.FormatMsgpack)
	if events.Code(code) != events.CodeTimeout || reply.Seq != f.store.Applied() {
		t.Fatalf("reply = %+v (code %d), want a timeout at %d", reply, code, f.store.Applied())
	}
}

func TestQueries_AfterCloseUnavailable(t *testing.T) {
	f := newQueryFixture(t, Options{})
	f.runner.halt()
	if err := f.store.Close(); err != nil {
		t.Fatal(err)
	}
	for _, q := range []events.Query{{}, {MinSeq: 1 << 40}} {
		_, code := f.request(events.KindVM, events.VerbList, jsonQuery(t, q), events.FormatJSON)
		if events.Code(code) != events.CodeUnavailable {
			t.Fatalf("query %+v after Close: code %d, want unavailable", q, code)
		}
	}
}

// TestAnswer_MatchesService asks every query both ways, through loom.q.*
// and through Answer: the same table answers both, so the replies agree,
// errors included.
func TestAnswer_MatchesService(t *testing.T) {
	f := newQueryFixture(t, Options{})
	queries := []events.Query{{}, {Name: "web"}, {Name: "old"}, {Name: "old", IncludeGone: true}, {Name: "h1"}, {Name: "h9"},
		{Name: "demo"}, {Host: "h1"}, {Name: "image/demo"}, {Resource: "image/demo"}, {Resource: "nonsense"}, {Name: "nope"}}
	asked := 0
	for _, ep := range queryEndpoints() {
		for _, q := range queries {
			viaService, _ := f.request(ep.kind, ep.verb, msgpackQuery(t, q), events.FormatMsgpack)
			direct := f.store.Answer(context.Background(), ep.kind, ep.verb, &q)
			// Through the codec, as the service's reply came.
			var viaAnswer events.QueryReply
			if err := events.Unmarshal(mustMarshal(t, direct), &viaAnswer); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(viaAnswer, viaService) {
				t.Fatalf("%s.%s %+v: Answer %+v, the service %+v", ep.kind, ep.verb, q, viaAnswer, viaService)
			}
			asked++
		}
	}
	reply := f.store.Answer(context.Background(), "disk", events.VerbGet, &events.Query{Name: "d1"})
	if reply.Error == nil || reply.Error.Code != events.CodeUnknownCommand {
		t.Fatalf("Answer of a query nobody serves: %+v, want unknown_command", reply)
	}
	t.Logf("%d queries answered alike", asked)
}
