package agents

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/bus/bustest"
	"github.com/loomctl/loom/internal/eventually"
)

// The libvirt adapter is a Hypervisor.
var _ Hypervisor = (*libvirt.Client)(nil)

// waitFor polls cond until it returns nil, failing the test after timeout.
var waitFor = eventually.Wait

// testLogger logs to the test's output.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testConfig is a Config for host on b with fast timings.
func testConfig(t testing.TB, b *bustest.Bus, host string) Config {
	return Config{
		Host:            host,
		Conn:            b.Conn,
		JS:              b.JS,
		StopGrace:       2 * time.Second,
		TTL:             600 * time.Millisecond,
		RetryBackoff:    20 * time.Millisecond,
		MaxRetryBackoff: 200 * time.Millisecond,
		Logger:          testLogger(t),
	}
}

// runningAgent is an agent running in the background of a test.
type runningAgent struct {
	*Agent
	cancel context.CancelFunc
	exited chan struct{} // closed when Run has returned
	err    error         // what Run returned; read after exited
}

// startAgent runs an agent made from cfg until stop or the end of the test.
// Run must return nil.
func startAgent(t testing.TB, cfg Config, configure ...func(*Agent)) *runningAgent {
	t.Helper()
	return startAgentIn(t, context.Background(), cfg, configure...)
}

// startAgentIn is startAgent with the agent's context derived from parent.
func startAgentIn(t testing.TB, parent context.Context, cfg Config, configure ...func(*Agent)) *runningAgent {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	for _, f := range configure {
		f(a)
	}
	ctx, cancel := context.WithCancel(parent)
	r := &runningAgent{Agent: a, cancel: cancel, exited: make(chan struct{})}
	go func() {
		defer close(r.exited)
		r.err = a.Run(ctx)
	}()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the agent and waits for Run to return; safe to call twice.
func (r *runningAgent) stop(t testing.TB) {
	t.Helper()
	r.cancel()
	select {
	case <-r.exited:
		if r.err != nil {
			t.Errorf("Run: %v", r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not return 10s after cancel")
	}
}

// exitedNow tells whether Run has returned.
func (r *runningAgent) exitedNow() bool {
	select {
	case <-r.exited:
		return true
	default:
		return false
	}
}

// countReconciles is an option for startAgent that counts reconciles of
// vm that reached libvirtd.
func countReconciles(vm string) (func(*Agent), *atomic.Int64) {
	var n atomic.Int64
	return func(a *Agent) {
		a.onReconciled = func(name string) {
			if name == vm {
				n.Add(1)
			}
		}
	}, &n
}

// publishGoal publishes goal as the dispatcher does. A goal that names no
// leases gets fresh grants, as the control plane's create would take them:
// shared on its image, exclusive on its disk.
func publishGoal(t testing.TB, js jetstream.JetStream, goal events.Goal) {
	t.Helper()
	if goal.Leases == nil && goal.Desired != events.DesiredAbsent {
		// The server's id, not the JetStream value's address: a test's
		// bus may be freed and another's allocated at the same address.
		key := fmt.Sprintf("%s/%s/%s/%s", js.Conn().ConnectedServerId(), goal.Host, goal.VM, goal.UID)
		if held, ok := grantsHeld.Load(key); ok {
			goal.Leases = held.([]events.LeaseEpoch)
		} else {
			goal.Leases = grantLeases(t, js, goal)
			grantsHeld.Store(key, goal.Leases)
		}
	}
	publishGoalAsIs(t, js, goal)
}

// grantsHeld are the grants publishGoal took for each VM incarnation on
// each host of each stream: its later goals run under the same ones, as
// the control plane's would.
var grantsHeld sync.Map

// publishGoalAsIs publishes goal as it is.
func publishGoalAsIs(t testing.TB, js jetstream.JetStream, goal events.Goal) {
	t.Helper()
	data, err := events.Marshal(&goal)
	if err != nil {
		t.Fatalf("marshal goal: %v", err)
	}
	msg := &nats.Msg{Subject: events.GoalSubject(goal.Host, goal.VM), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, "goal")
	msg.Header.Set(events.HeaderIncarnation, strconv.FormatUint(goal.Incarnation, 10))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := js.PublishMsg(ctx, msg); err != nil {
		t.Fatalf("publish goal: %v", err)
	}
}

// goalOf is a goal for vm on host.
func goalOf(host, vm, uid string, desired events.Desired, incarnation uint64) events.Goal {
	return events.Goal{VM: vm, UID: uid, Host: host, Desired: desired, Incarnation: incarnation,
		Spec: events.DomainSpec{Image: "tiny", CPU: 1, MemoryMiB: 64}}
}

// records reads every event on subject, decoded.
func records(t testing.TB, js jetstream.JetStream, subject string) []events.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	msgs, err := bus.ReadSubject(ctx, js, events.StreamEvents, subject)
	if err != nil {
		t.Fatalf("read %s: %v", subject, err)
	}
	out := make([]events.Record, 0, len(msgs))
	for _, m := range msgs {
		rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
		if err != nil {
			t.Fatalf("decode %s seq %d: %v", subject, m.Seq, err)
		}
		out = append(out, rec)
	}
	return out
}

// vmSubject is the observation subject of vm on host.
func vmSubject(host, vm string) string { return events.ObservationSubject(host, events.KindVM, vm) }

// observations returns the vm.observed events on vm's subject, oldest first.
func observations(t testing.TB, js jetstream.JetStream, host, vm string) []events.VMObserved {
	t.Helper()
	var out []events.VMObserved
	for _, rec := range records(t, js, vmSubject(host, vm)) {
		if obs, ok := rec.Event.(events.VMObserved); ok {
			out = append(out, obs)
		}
	}
	return out
}

// lastObserved is the last vm.observed of vm, if any. It asks the leader
// for the subject's last event first: polling it creates no consumer.
func lastObserved(t testing.TB, js jetstream.JetStream, host, vm string) (events.VMObserved, bool) {
	t.Helper()
	if nc := js.Conn(); nc != nil {
		m, err := bus.LastOnSubject(context.Background(), nc, events.StreamEvents, vmSubject(host, vm))
		if errors.Is(err, bus.ErrNoMessage) {
			return events.VMObserved{}, false
		}
		if err == nil {
			if rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data); err == nil {
				if obs, ok := rec.Event.(events.VMObserved); ok {
					return obs, true
				}
			}
		}
	}
	obs := observations(t, js, host, vm)
	if len(obs) == 0 {
		return events.VMObserved{}, false
	}
	return obs[len(obs)-1], true
}

// waitObserved waits until the last observation of vm has incarnation and
// state, and returns it.
func waitObserved(t testing.TB, js jetstream.JetStream, host, vm string, incarnation uint64, state events.ObservedState) events.VMObserved {
	t.Helper()
	return waitObservedWithin(t, 15*time.Second, js, host, vm, incarnation, state)
}

// waitObservedWithin is waitObserved with its own time limit: a QEMU
// guest reports running once it is alive, which under a loaded CI takes
// far longer than a test-driver domain.
func waitObservedWithin(t testing.TB, limit time.Duration, js jetstream.JetStream, host, vm string, incarnation uint64, state events.ObservedState) events.VMObserved {
	t.Helper()
	var last events.VMObserved
	waitFor(t, limit, func() error {
		var ok bool
		last, ok = lastObserved(t, js, host, vm)
		if !ok {
			return fmt.Errorf("no observation of %s yet", vm)
		}
		if last.Incarnation != incarnation || last.State != state {
			return fmt.Errorf("last observation of %s = %+v, want incarnation %d state %s", vm, last, incarnation, state)
		}
		return nil
	})
	return last
}

// checkSubject checks the history of an agent-written subject: each event
// chains to the one before, and no observation repeats the one before it.
func checkSubject(t testing.TB, js jetstream.JetStream, subject string) {
	t.Helper()
	var prev *events.Record
	var prevObs *events.VMObserved
	for _, rec := range records(t, js, subject) {
		if prev == nil && len(rec.Envelope.PrevHash) != 0 {
			t.Errorf("%s seq %d: first event has a prev hash", subject, rec.Seq)
		}
		if prev != nil && string(rec.Envelope.PrevHash) != string(events.Hash(prev.Data)) {
			t.Errorf("%s seq %d: prev hash does not match seq %d", subject, rec.Seq, prev.Seq)
		}
		switch ev := rec.Event.(type) {
		case events.VMObserved:
			if prevObs != nil && sameReport(*prevObs, ev) {
				t.Errorf("%s seq %d: observation %+v repeats the one before", subject, rec.Seq, ev)
			}
			prevObs = &ev
		case events.VMProgress:
			prevObs = nil // the observation after progress is always published
		}
		prev = &rec
	}
}

// metricValue reads a counter or gauge of a, summed over series that carry
// every label in labels.
func metricValue(t testing.TB, a *Agent, name string, labels map[string]string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	for _, c := range a.Collectors() {
		reg.MustRegister(c)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather metrics: %v", err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if hasLabels(m, labels) {
				switch {
				case m.Counter != nil:
					sum += m.Counter.GetValue()
				case m.Gauge != nil:
					sum += m.Gauge.GetValue()
				case m.Histogram != nil:
					sum += float64(m.Histogram.GetSampleCount())
				}
			}
		}
	}
	return sum
}

func hasLabels(m *dto.Metric, want map[string]string) bool {
	found := 0
	for _, l := range m.GetLabel() {
		if v, ok := want[l.GetName()]; ok && v == l.GetValue() {
			found++
		}
	}
	return found == len(want)
}

// lastLiveness reads the message standing on host's liveness subject.
func lastLiveness(t testing.TB, nc *nats.Conn, host string) (bus.Message, events.Renewal, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := bus.LastOnSubject(ctx, nc, events.StreamLiveness, events.LivenessSubject(host))
	if err != nil {
		return m, events.Renewal{}, err
	}
	var r events.Renewal
	if err := events.Unmarshal(m.Data, &r); err != nil {
		return m, r, errors.New("liveness message is not a renewal")
	}
	return m, r, nil
}

// grantLeases appends the grants a VM's goal runs under, straight onto the
// stream, and returns their epochs. The resources are named after the
// host too, since tests run many hosts with the same VMs on one stream.
func grantLeases(t testing.TB, js jetstream.JetStream, goal events.Goal) []events.LeaseEpoch {
	t.Helper()
	holder := events.LeaseHolder{ID: goal.UID, VM: goal.VM, Host: goal.Host}
	name := func(s string) string {
		return strings.Trim((goal.Host + "-" + s)[:min(len(goal.Host)+1+len(s), events.MaxNameLen)], "-_")
	}
	var out []events.LeaseEpoch
	for _, l := range []struct {
		r    events.Resource
		mode events.LeaseMode
	}{
		{events.Resource{Kind: events.ResourceImage, Name: name(goal.Spec.Image)}, events.LeaseShared},
		{events.Resource{Kind: events.ResourceDisk, Name: name(goal.VM)}, events.LeaseExclusive},
	} {
		seq := appendLeaseEvent(t, js, l.r, l.mode, goal.UID, events.LeaseGranted{Mode: l.mode, LeaseHolder: holder})
		out = append(out, events.LeaseEpoch{Resource: l.r.String(), Mode: l.mode, Epoch: seq})
	}
	return out
}

// appendLeaseEvent appends ev on the lease subject of holder in mode, with
// no check, and returns its sequence.
func appendLeaseEvent(t testing.TB, js jetstream.JetStream, r events.Resource, mode events.LeaseMode, holder string, ev events.Event) uint64 {
	t.Helper()
	env, data, err := events.Seal(ev, events.KindLease, r.String(), events.Origin{Actor: "test", CommandID: "lease", Time: time.Now()}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	msg := &nats.Msg{Subject: events.LeaseSubject(r, mode, holder), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, string(env.Type))
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		t.Fatalf("append %s: %v", env.Type, err)
	}
	return ack.Sequence
}
