//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/handlers"
)

// A VM goes through every goal; after each, libvirt's own view of the
// domain and the read model agree.
func TestSpine_VMThroughEveryGoal(t *testing.T) {
	t.Parallel()
	f := newFleet(t, 11, 12)
	reply := f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web-1", Image: "demo", CPU: 1, MemoryMiB: 256})
	vm := f.converged("web-1", reply.LastSeq())
	if vm.Host == "" || f.domainState(vm.Host, "web-1") != "running" {
		t.Fatalf("after create: on %q, libvirt says %s", vm.Host, f.domainState(vm.Host, "web-1"))
	}
	steps := []struct {
		verb    string
		libvirt string
	}{
		{events.VerbPause, "paused"},
		{events.VerbResume, "running"},
		{events.VerbStop, "shutoff"},
		{events.VerbStart, "running"},
		{events.VerbStop, "shutoff"},
		{events.VerbStart, "running"},
	}
	for _, step := range steps {
		reply := f.mustCommand(events.KindVM, step.verb, &events.VMCommand{Name: "web-1"})
		got := f.converged("web-1", reply.LastSeq())
		if state := f.domainState(vm.Host, "web-1"); state != step.libvirt {
			t.Fatalf("after %s: libvirt says %s, want %s (read model: %+v)", step.verb, state, step.libvirt, got.Observed)
		}
	}
	reply = f.mustCommand(events.KindVM, events.VerbDelete, &events.VMCommand{Name: "web-1"})
	waitFor(t, 20*time.Second, "web-1 gone", func() error {
		got, err := f.vm("web-1", reply.LastSeq())
		if err != nil {
			return err
		}
		if got.Phase != events.PhaseGone {
			return fmt.Errorf("phase %s, observed %s", got.Phase, got.Observed.State)
		}
		return nil
	})
	if state := f.domainState(vm.Host, "web-1"); state != "absent" {
		t.Fatalf("after delete libvirt says %s", state)
	}
	// The name is free again, and the capacity came back.
	f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web-1", Image: "demo", CPU: 4, MemoryMiB: 4096})
}

// Killing the agent and the control plane midway loses nothing: after
// restarts everything converges, and libvirt matches the read model.
func TestSpine_RestartsConverge(t *testing.T) {
	t.Parallel()
	f := newFleet(t, 13, 14)
	names := []string{"a", "b", "c", "d"}
	var last uint64
	for _, n := range names {
		last = f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: n, Image: "demo", CPU: 1, MemoryMiB: 128}).LastSeq()
	}
	for _, n := range names {
		f.converged(n, last)
	}

	// Agents down: goals change meanwhile.
	for _, h := range f.hosts {
		h.agent.stop(t)
	}
	f.mustCommand(events.KindVM, events.VerbPause, &events.VMCommand{Name: "a"})
	f.mustCommand(events.KindVM, events.VerbStop, &events.VMCommand{Name: "b"})
	last = f.mustCommand(events.KindVM, events.VerbDelete, &events.VMCommand{Name: "c"}).LastSeq()

	// The control plane goes down too, and its read models are thrown away:
	// they rebuild from the stream.
	f.plane.stop(t)
	if err := os.RemoveAll(pebbleDir(f)); err != nil {
		t.Fatal(err)
	}
	f.startPlane()
	for name := range f.hosts {
		f.startAgent(name)
	}
	want := map[string]string{"a": "paused", "b": "shutoff", "d": "running"}
	for n, state := range want {
		vm := f.converged(n, last)
		if got := f.domainState(vm.Host, n); got != state {
			t.Fatalf("%s: libvirt says %s, want %s", n, got, state)
		}
	}
	waitFor(t, 20*time.Second, "c gone", func() error {
		vm, err := f.vm("c", last)
		if err != nil {
			return err
		}
		if vm.Phase != events.PhaseGone {
			return fmt.Errorf("phase %s", vm.Phase)
		}
		return nil
	})
	for name := range f.hosts {
		if got := f.domainState(name, "c"); got != "absent" {
			t.Fatalf("c still on %s: %s", name, got)
		}
	}
}

// Bad input gets a coded error and changes nothing stored.
func TestSpine_BadInput(t *testing.T) {
	t.Parallel()
	f := newFleet(t, 15)
	before := f.decisions()
	tests := []struct {
		name string
		kind events.Kind
		verb string
		body any
		want events.Code
	}{
		{"fits no host", events.KindVM, events.VerbCreate, &events.CreateVM{Name: "big", Image: "demo", CPU: 64, MemoryMiB: 128}, events.CodeNoCapacity},
		{"unknown image", events.KindVM, events.VerbCreate, &events.CreateVM{Name: "x", Image: "nope", CPU: 1, MemoryMiB: 128}, events.CodeImageNotFound},
		{"bad name", events.KindVM, events.VerbCreate, &events.CreateVM{Name: "a.b", Image: "demo", CPU: 1, MemoryMiB: 128}, events.CodeInvalidArgument},
		{"unknown vm", events.KindVM, events.VerbStart, &events.VMCommand{Name: "ghost"}, events.CodeVMNotFound},
		{"unknown host", events.KindHost, events.VerbCordon, &events.CordonHost{Name: "ghost"}, events.CodeHostNotFound},
	}
	for _, tc := range tests {
		_, err := f.command(tc.kind, tc.verb, tc.body)
		var fault *events.Fault
		if !errors.As(err, &fault) || fault.Code != tc.want {
			t.Errorf("%s: err = %v, want code %d %s", tc.name, err, tc.want, tc.want.Name())
		}
	}
	bodies := []struct {
		body []byte
		want events.Code
	}{
		{[]byte("{not json"), events.CodeBadRequest},
		{[]byte{0xc1}, events.CodeBadRequest},
		{[]byte(`{"command_id":"x","name":"a","bogus":1}`), events.CodeBadRequest},
		{[]byte(`{"name":"a"}`), events.CodeInvalidArgument},
	}
	for _, tc := range bodies {
		body := tc.body
		resp, err := f.conn.Conn.Request(events.CommandSubject(events.KindVM, events.VerbCreate), body, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		// The reply comes in the request's encoding: JSON for JSON.
		var reply events.Reply
		if events.SniffFormat(body) == events.FormatJSON {
			err = json.Unmarshal(resp.Data, &reply)
		} else {
			err = events.Unmarshal(resp.Data, &reply)
		}
		if err != nil || reply.Error == nil || reply.Error.Code != tc.want {
			t.Errorf("body %q: reply %+v (%v), want %s", body, reply, err, tc.want.Name())
		}
	}
	if _, err := f.conn.Conn.Request("loom.cmd.vm.teleport", []byte(`{}`), time.Second); !errors.Is(err, nats.ErrNoResponders) {
		t.Errorf("unknown command: err = %v, want no responders", err)
	}
	if after := f.decisions(); after != before {
		t.Fatalf("bad input appended decisions: %d before, %d after", before, after)
	}
}

// A retried command, with the same command id, gets its original answer and
// never makes a second VM.
func TestSpine_RetryIsIdempotent(t *testing.T) {
	t.Parallel()
	f := newFleet(t, 16)
	create := &events.CreateVM{CommandMeta: events.CommandMeta{CommandID: "once"}, Name: "r", Image: "demo", CPU: 1, MemoryMiB: 128}
	first := f.mustCommand(events.KindVM, events.VerbCreate, create)
	// Restart the control plane (its caches go) and retry.
	f.plane.stop(t)
	f.startPlane()
	again := f.mustCommand(events.KindVM, events.VerbCreate, create)
	if !again.Replayed || len(again.Events) != len(first.Events) || again.Events[0].Seq != first.Events[0].Seq {
		t.Fatalf("retry = %+v, want the original %+v", again, first)
	}
	if n := f.decisionsOn(events.EventSubject(events.KindVM, "r")); n != 2 {
		t.Fatalf("the VM's subject holds %d decisions, want 2 (created, placed)", n)
	}
}

// decisions counts the events on loom.evt.>: what commands append. (Agents
// report on loom.obs.> whenever they observe something, so the stream's
// last sequence is no measure of what commands did.)
func (f *fleet) decisions() uint64 { return f.decisionsOn(events.EventsWildcard) }

func (f *fleet) decisionsOn(filter string) uint64 {
	f.t.Helper()
	s, err := f.conn.JS.Stream(f.t.Context(), events.StreamEvents)
	if err != nil {
		f.t.Fatal(err)
	}
	info, err := s.Info(f.t.Context(), jetstream.WithSubjectFilter(filter))
	if err != nil {
		f.t.Fatal(err)
	}
	var n uint64
	for _, count := range info.State.Subjects {
		n += count
	}
	return n
}

// An agent that dies leaves its host silent: after TTL plus the detector's
// margin the host is declared lost and takes no new VMs; the agent started
// again learns it was declared lost, rejoins under a new epoch, and the
// host takes VMs again.
func TestSpine_SilentHostLostThenRejoins(t *testing.T) {
	t.Parallel()
	f := newFleet(t, 17)
	name := "host-1"
	if _, ok := f.hosts[name]; !ok {
		t.Fatalf("fleet hosts %v, want %s", f.hosts, name)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		m, err := bus.LastOnSubject(context.Background(), f.conn.Conn, events.StreamLiveness, events.LivenessSubject(name))
		t.Logf("on %s: seq %d, %s (err %v)", events.LivenessSubject(name), m.Seq, m.Header.Get(events.HeaderType), err)
		h, err := f.host(name)
		t.Logf("host %s: %+v (err %v)", name, h, err)
	})
	f.hosts[name].agent.stop(t)
	stopped := time.Now()
	waitFor(t, 30*time.Second, name+" declared lost", func() error {
		h, err := f.host(name)
		if err != nil {
			return err
		}
		if !h.Lost {
			return fmt.Errorf("%s not lost yet", name)
		}
		return nil
	})
	t.Logf("%s declared lost %s after its agent stopped (TTL 2s + margin %s)", name, time.Since(stopped).Round(100*time.Millisecond), handlers.DefaultDetectorMargin)
	if _, err := f.command(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web", Image: "demo", CPU: 1, MemoryMiB: 128}); !isCode(err, events.CodeNoCapacity) {
		t.Fatalf("create on a fleet whose only host is lost: %v, want no_capacity", err)
	}

	f.startAgent(name)
	waitFor(t, 30*time.Second, name+" rejoined", func() error {
		h, err := f.host(name)
		if err != nil {
			return err
		}
		if h.Lost || h.Epoch <= h.LostMarker {
			return fmt.Errorf("%s lost=%v epoch %d marker %d", name, h.Lost, h.Epoch, h.LostMarker)
		}
		return nil
	})
	reply := f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web", Image: "demo", CPU: 1, MemoryMiB: 128})
	f.converged("web", reply.LastSeq())
}

func isCode(err error, code events.Code) bool {
	var fault *events.Fault
	return errors.As(err, &fault) && fault.Code == code
}
