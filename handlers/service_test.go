package handlers

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

func TestService_HostCommandsJSON(t *testing.T) {
	b := bustest.Start(t)
	startReplica(t, b)
	nc := bustest.Connect(t, b.URL)
	body := `{"command_id": "r1", "name": "h1", "cpu": 4, "mem_mib": 8192, "labels": {"zone": "a"}}`
	reply := call(t, nc, events.KindHost, events.VerbRegister, events.FormatJSON, "ops", []byte(body))
	if reply.Error != nil || len(reply.Events) != 1 || reply.Events[0].Type != events.TypeHostRegistered || reply.Events[0].Subject != "loom.evt.host.h1" {
		t.Fatalf("register: %+v", reply)
	}

	before := lastSeq(t, b)
	again := `{"command_id": "r2", "name": "h1", "cpu": 4, "mem_mib": 8192, "labels": {"zone": "a"}}`
	if reply := call(t, nc, events.KindHost, events.VerbRegister, events.FormatJSON, "ops", []byte(again)); reply.Error != nil || len(reply.Events) != 0 {
		t.Fatalf("register same spec: %+v, want a no-op", reply)
	}
	other := `{"command_id": "r3", "name": "h1", "cpu": 8, "mem_mib": 8192}`
	if reply := call(t, nc, events.KindHost, events.VerbRegister, events.FormatJSON, "ops", []byte(other)); code(reply.Error) != events.CodeHostExists {
		t.Fatalf("register other spec: %+v, want host_exists", reply)
	}
	if got := lastSeq(t, b); got != before {
		t.Fatalf("stream at %d after no-op and refusal, want %d", got, before)
	}

	cordon := `{"command_id": "c1", "name": "h1", "reason": "disk"}`
	reply = call(t, nc, events.KindHost, events.VerbCordon, events.FormatJSON, "ops", []byte(cordon))
	if reply.Error != nil || len(reply.Events) != 1 || reply.Events[0].Type != events.TypeHostCordoned {
		t.Fatalf("cordon: %+v", reply)
	}
	cordonAgain := `{"command_id": "c2", "name": "h1"}`
	if reply := call(t, nc, events.KindHost, events.VerbCordon, events.FormatJSON, "ops", []byte(cordonAgain)); reply.Error != nil || len(reply.Events) != 0 {
		t.Fatalf("cordon again: %+v, want a no-op", reply)
	}
	uncordon := `{"command_id": "u1", "name": "h1"}`
	reply = call(t, nc, events.KindHost, events.VerbUncordon, events.FormatJSON, "ops", []byte(uncordon))
	if reply.Error != nil || len(reply.Events) != 1 || reply.Events[0].Type != events.TypeHostUncordoned {
		t.Fatalf("uncordon: %+v", reply)
	}
}

func TestService_VMLifecycleMsgpack(t *testing.T) {
	b, r, nc := fixture(t, 2, 4, 4096)
	reply := must(t, nc, events.KindVM, events.VerbCreate, createCmd("web", "create-web", 2, 1024))
	want := createChain
	if got := types(reply.Events); !reflect.DeepEqual(got, want) {
		t.Fatalf("create appended %v, want %v", got, want)
	}
	if reply.Replayed {
		t.Fatal("a first create is not replayed")
	}
	// The hosts tie on free memory: the smaller name wins.
	if got := reply.Events[1].Subject; got != "loom.evt.host.h1" {
		t.Fatalf("allocated on %s, want h1", got)
	}

	steps := []struct {
		verb    string
		want    events.Desired
		appends bool
	}{
		{events.VerbStop, events.DesiredStopped, true},
		{events.VerbStop, events.DesiredStopped, false},
		{events.VerbStart, events.DesiredRunning, true},
		{events.VerbPause, events.DesiredPaused, true},
		{events.VerbResume, events.DesiredRunning, true},
	}
	for i, step := range steps {
		reply := must(t, nc, events.KindVM, step.verb, vmCmd("web", fmt.Sprintf("goal-%d", i)))
		if got := len(reply.Events) == 1; got != step.appends {
			t.Fatalf("%s: appended %v, want appends=%v", step.verb, reply.Events, step.appends)
		}
		if err := r.reader.WaitFor(context.Background(), reply.LastSeq()); err != nil {
			t.Fatal(err)
		}
		if vm, _, _ := r.reader.VM(context.Background(), "web"); vm.Desired != step.want {
			t.Fatalf("after %s: desired %s, want %s", step.verb, vm.Desired, step.want)
		}
	}
	must(t, nc, events.KindVM, events.VerbStop, vmCmd("web", "stop-before-pause"))
	if reply := call(t, nc, events.KindVM, events.VerbPause, events.FormatMsgpack, "", vmCmd("web", "pause-stopped")); code(reply.Error) != events.CodeInvalidArgument {
		t.Fatalf("pause of a stopped vm: %+v, want invalid_argument", reply)
	}

	reply = must(t, nc, events.KindVM, events.VerbDelete, vmCmd("web", "delete-web"))
	if got, want := types(reply.Events), []events.Type{events.TypeVMDeleted, events.TypeHostReleased}; !reflect.DeepEqual(got, want) {
		t.Fatalf("delete appended %v, want %v", got, want)
	}
	if reply := must(t, nc, events.KindVM, events.VerbDelete, vmCmd("web", "delete-again")); len(reply.Events) != 0 {
		t.Fatalf("second delete: %+v, want a no-op", reply)
	}
	if reply := call(t, nc, events.KindVM, events.VerbStart, events.FormatMsgpack, "", vmCmd("web", "start-deleting")); code(reply.Error) != events.CodeVMDeleting {
		t.Fatalf("start of a deleting vm: %+v, want vm_deleting", reply)
	}
	for _, h := range replayHosts(t, b.JS) {
		if len(h.Allocations) != 0 {
			t.Fatalf("host %s keeps %v after the delete", h.Name, h.Allocations)
		}
	}
}

func TestService_BadInputsAppendNothing(t *testing.T) {
	b, _, nc := fixture(t, 1, 4, 4096)
	must(t, nc, events.KindVM, events.VerbCreate, createCmd("taken", "create-taken", 1, 512))
	tests := []struct {
		name   string
		kind   events.Kind
		verb   string
		format events.Format
		body   any
		want   events.Code
	}{
		{"malformed json", events.KindVM, events.VerbCreate, events.FormatJSON, []byte(`{"command_id": "x", "name":`), events.CodeBadRequest},
		{"malformed msgpack", events.KindVM, events.VerbCreate, events.FormatMsgpack, []byte{0xc1, 0x00}, events.CodeBadRequest},
		{"empty body", events.KindVM, events.VerbStart, events.FormatMsgpack, []byte{}, events.CodeBadRequest},
		{"unknown json field", events.KindVM, events.VerbCreate, events.FormatJSON, []byte(`{"command_id": "x", "name": "a", "image": "debian", "cpu": 1, "mem_mib": 1, "gpu": 1}`), events.CodeBadRequest},
		{"unknown msgpack field", events.KindVM, events.VerbStart, events.FormatMsgpack, map[string]any{"command_id": "x", "name": "a", "force": true}, events.CodeBadRequest},
		{"missing command id", events.KindVM, events.VerbCreate, events.FormatJSON, createCmd("new", "", 1, 1), events.CodeMissingCommandID},
		{"invalid vm name", events.KindVM, events.VerbCreate, events.FormatMsgpack, createCmd("bad.name", "x", 1, 1), events.CodeInvalidArgument},
		{"invalid host name", events.KindHost, events.VerbCordon, events.FormatJSON, &events.CordonHost{CommandMeta: events.CommandMeta{CommandID: "x"}, Name: "-h"}, events.CodeInvalidArgument},
		{"zero cpu", events.KindVM, events.VerbCreate, events.FormatMsgpack, createCmd("new", "x", 0, 1), events.CodeInvalidArgument},
		{"too much memory", events.KindHost, events.VerbRegister, events.FormatJSON, &events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: "x"}, Name: "h9", CPU: 1, MemoryMiB: events.MaxMemoryMiB + 1}, events.CodeInvalidArgument},
		{"bad image format", events.KindImage, events.VerbRegister, events.FormatJSON, &events.RegisterImage{CommandMeta: events.CommandMeta{CommandID: "x"}, Name: "i", Format: "vmdk"}, events.CodeInvalidArgument},
		{"unknown vm", events.KindVM, events.VerbStart, events.FormatMsgpack, vmCmd("nobody", "x"), events.CodeVMNotFound},
		{"delete unknown vm", events.KindVM, events.VerbDelete, events.FormatJSON, vmCmd("nobody", "x"), events.CodeVMNotFound},
		{"unknown host", events.KindHost, events.VerbCordon, events.FormatMsgpack, &events.CordonHost{CommandMeta: events.CommandMeta{CommandID: "x"}, Name: "h9"}, events.CodeHostNotFound},
		{"unknown image", events.KindVM, events.VerbCreate, events.FormatJSON, &events.CreateVM{CommandMeta: events.CommandMeta{CommandID: "x"}, Name: "new", Image: "arch", CPU: 1, MemoryMiB: 1}, events.CodeImageNotFound},
		{"fits no host", events.KindVM, events.VerbCreate, events.FormatMsgpack, createCmd("big", "x", 8, 1), events.CodeNoCapacity},
		{"name taken", events.KindVM, events.VerbCreate, events.FormatMsgpack, createCmd("taken", "x", 1, 1), events.CodeVMExists},
		{"actor too long", events.KindVM, events.VerbStart, events.FormatMsgpack, vmCmd("taken", "x"), events.CodeInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			actor := ""
			if tc.name == "actor too long" {
				actor = strings.Repeat("a", MaxActorLen+1)
			}
			before := lastSeq(t, b)
			reply := call(t, nc, tc.kind, tc.verb, tc.format, actor, tc.body)
			if code(reply.Error) != tc.want || reply.Error.Name != tc.want.Name() || reply.Error.Message == "" {
				t.Fatalf("reply %+v, want code %d (%s)", reply.Error, tc.want, tc.want.Name())
			}
			if len(reply.Events) != 0 {
				t.Fatalf("reply reports events %v", reply.Events)
			}
			if got := lastSeq(t, b); got != before {
				t.Fatalf("stream at %d, want %d: something was appended", got, before)
			}
		})
	}
}

func TestCreate_RetryGetsOriginalResult(t *testing.T) {
	b, r, nc := fixture(t, 2, 4, 4096)
	first := call(t, nc, events.KindVM, events.VerbCreate, events.FormatJSON, "alice", createCmd("web", "c1", 1, 512))
	if first.Error != nil {
		t.Fatal(first.Error)
	}
	before := lastSeq(t, b)
	for _, format := range []events.Format{events.FormatJSON, events.FormatMsgpack} {
		again := call(t, nc, events.KindVM, events.VerbCreate, format, "alice", createCmd("web", "c1", 1, 512))
		if again.Error != nil || !again.Replayed || !reflect.DeepEqual(again.Events, first.Events) {
			t.Fatalf("retry: %+v, want the original %+v, replayed", again, first)
		}
	}
	// The same command id from someone else is another command.
	if reply := call(t, nc, events.KindVM, events.VerbCreate, events.FormatJSON, "bob", createCmd("web", "c1", 1, 512)); code(reply.Error) != events.CodeVMExists {
		t.Fatalf("bob's c1: %+v, want vm_exists", reply)
	}
	if got := lastSeq(t, b); got != before {
		t.Fatalf("stream at %d after retries, want %d", got, before)
	}
	vm, _, _ := r.reader.VM(context.Background(), "web")
	if vm.UID != events.DeriveUID("alice", "c1") {
		t.Fatalf("vm uid %s, want alice's c1", vm.UID)
	}
}

func TestCreate_ConcurrentRetriesMakeOneVM(t *testing.T) {
	b, _, nc := fixture(t, 3, 4, 4096)
	replies := make(chan events.Reply, 8)
	for range cap(replies) {
		go func() {
			reply, err := tryCall(nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 512))
			if err != nil {
				reply.Error = events.Errorf(events.CodeUnavailable, "%v", err)
			}
			replies <- reply
		}()
	}
	var first *events.Reply
	for range cap(replies) {
		reply := <-replies
		if reply.Error != nil {
			t.Fatalf("retry: %v", reply.Error)
		}
		if first == nil {
			first = &reply
		}
		if !reflect.DeepEqual(reply.Events, first.Events) || len(reply.Events) != len(createChain) {
			t.Fatalf("replies differ: %+v and %+v", reply.Events, first.Events)
		}
	}
	allocations := 0
	for _, h := range replayHosts(t, b.JS) {
		allocations += len(h.Allocations)
	}
	if allocations != 1 {
		t.Fatalf("%d allocations, want 1", allocations)
	}
}

// TestCreate_RetryAfterDedupeWindow shows that a retry long after the
// stream's duplicate window is answered by the read model's command
// results: a fresh replica (nothing cached) answers it without publishing
// anything at all, so the stream's deduplication plays no part.
func TestCreate_RetryAfterDedupeWindow(t *testing.T) {
	b, _, nc := fixture(t, 2, 4, 4096)
	first := call(t, nc, events.KindVM, events.VerbCreate, events.FormatMsgpack, "alice", createCmd("web", "c1", 1, 512))
	if first.Error != nil {
		t.Fatal(first.Error)
	}
	for _, forgetful := range []bool{false, true} {
		t.Run(fmt.Sprintf("forgetful=%v", forgetful), func(t *testing.T) {
			publisher := &countingPublisher{}
			fresh := startReplica(t, b, func(s *Service) {
				publisher.Publisher = s.publisher
				s.publisher = publisher
			})
			fresh.reader.mu.Lock()
			fresh.reader.forgetful = forgetful
			fresh.reader.mu.Unlock()
			waitFor(t, 5*time.Second, func() error {
				if got, want := fresh.reader.Applied(), lastSeq(t, b); got < want {
					return fmt.Errorf("fresh read model at %d, want %d", got, want)
				}
				return nil
			})
			before := lastSeq(t, b)
			// Ask the fresh replica directly, not the queue group.
			reply := fresh.svc.create(context.Background(), newCommand("alice", "c1", "", events.Origin{Time: time.Now()}), createCmd("web", "c1", 1, 512))
			if reply.Error != nil {
				t.Fatal(reply.Error)
			}
			if !forgetful && (!reply.Replayed || !reflect.DeepEqual(reply.Events, first.Events)) {
				t.Fatalf("retry: %+v, want the original %+v, replayed", reply, first)
			}
			if n := publisher.n.Load(); n != 0 {
				t.Fatalf("the retry published %d times, want none", n)
			}
			if got := lastSeq(t, b); got != before {
				t.Fatalf("stream at %d after the retry, want %d", got, before)
			}
		})
	}
}

// downPublisher is a bus whose JetStream does not answer.
type downPublisher struct{ jetstream.Publisher }

func (downPublisher) PublishMsg(context.Context, *nats.Msg, ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	return nil, jetstream.ErrNoStreamResponse
}

func TestService_BusDownIsUnavailable(t *testing.T) {
	b := bustest.Start(t)
	r := startReplica(t, b, func(s *Service) { s.publisher = downPublisher{s.publisher} })
	before := lastSeq(t, b)
	reply := call(t, r.nc, events.KindHost, events.VerbRegister, events.FormatJSON, "", &events.RegisterHost{
		CommandMeta: events.CommandMeta{CommandID: "r1"}, Name: "h1", CPU: 1, MemoryMiB: 1})
	if code(reply.Error) != events.CodeUnavailable {
		t.Fatalf("reply %+v, want unavailable", reply)
	}
	if got := lastSeq(t, b); got != before {
		t.Fatalf("stream at %d, want %d", got, before)
	}
}
