package agents

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// When renewals stop being acknowledged (here LOOM_LIVENESS is gone, so
// every renewal fails for real), the fencing deadline passes and a guest
// that stops by itself is not started again: the agent reports it fenced.
// Once renewals land again it starts the guest. With the fence switched
// off the same guest is restarted at once, while the control plane may
// already be handing its disk to another host: the fence is what prevents
// it.
func TestAgent_FencedPastDeadline(t *testing.T) {
	for _, fenced := range []bool{true, false} {
		t.Run(fmt.Sprintf("fence=%v", fenced), func(t *testing.T) {
			s := newFakeSetup(t, "h1")
			a := startAgent(t, s.cfg, func(a *Agent) { a.fence.off = !fenced })
			uid := events.DeriveUID("t", "vm1")
			publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
			waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

			ctx := context.Background()
			if err := s.bus.JS.DeleteStream(ctx, events.StreamLiveness); err != nil {
				t.Fatal(err)
			}
			// Past TTL - margin from the last renewal that landed: renewals
			// fail every TTL/3, so three failures are a whole TTL.
			waitFor(t, 10*time.Second, func() error {
				if n := metricValue(t, a.Agent, "loom_agent_liveness_renewals_total", map[string]string{"result": "error"}); n < 3 {
					return fmt.Errorf("%v failed renewals", n)
				}
				if f := a.fence.check(BootNanos()); f == nil && fenced {
					return errors.New("not fenced yet")
				}
				return nil
			})
			starts := s.host.count("start")
			s.host.setState("vm1", libvirt.StateShutoff, "stopped")

			if !fenced {
				waitFor(t, 10*time.Second, func() error {
					if s.host.count("start") == starts {
						return errors.New("not restarted yet")
					}
					return nil
				})
				return
			}
			waitFor(t, 10*time.Second, func() error {
				obs, _ := lastObserved(t, s.bus.JS, "h1", "vm1")
				if obs.State != events.ObservedFailed || obs.Fault == nil || obs.Fault.Code != events.CodeFenced {
					return fmt.Errorf("last report %+v, want failed: fenced", obs)
				}
				return nil
			})
			if n := s.host.count("start"); n != starts {
				t.Fatalf("the agent started the guest %d times past its fencing deadline", n-starts)
			}

			// Liveness comes back: the guest runs again.
			if err := bus.EnsureStreams(ctx, s.bus.JS, bus.StreamsConfig{}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 10*time.Second, func() error {
				if obs, _ := lastObserved(t, s.bus.JS, "h1", "vm1"); obs.State != events.ObservedRunning {
					return fmt.Errorf("last report %+v, want running again", obs)
				}
				return nil
			})
		})
	}
}

// When the deadline passes, the agent itself pauses the running domain
// that holds an exclusive lease: nobody has to stop it first. When renewals
// land again it resumes it, under grants still current. With the fence
// off it keeps running through the outage.
func TestAgent_PausesAtTheDeadlineAndResumesAfter(t *testing.T) {
	for _, fenced := range []bool{true, false} {
		t.Run(fmt.Sprintf("fence=%v", fenced), func(t *testing.T) {
			s := newFakeSetup(t, "h1")
			a := startAgent(t, s.cfg, func(a *Agent) { a.fence.off = !fenced })
			publishGoal(t, s.bus.JS, goalOf("h1", "vm1", events.DeriveUID("t", "vm1"), events.DesiredRunning, 10))
			waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

			ctx := context.Background()
			if err := s.bus.JS.DeleteStream(ctx, events.StreamLiveness); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 30*time.Second, func() error {
				if n := metricValue(t, a.Agent, "loom_agent_liveness_renewals_total", map[string]string{"result": "error"}); n < 4 {
					return fmt.Errorf("%v failed renewals", n)
				}
				return nil
			})
			d, _ := s.host.domain("vm1")
			if !fenced {
				if d.state != libvirt.StateRunning {
					t.Fatalf("with the fence off the domain is %v, want running", d.state)
				}
				return
			}
			waitFor(t, 30*time.Second, func() error {
				if d, _ := s.host.domain("vm1"); d.state != libvirt.StatePaused {
					return fmt.Errorf("domain %v, want paused past the deadline", d.state)
				}
				return nil
			})
			if n := metricValue(t, a.Agent, "loom_agent_fenced_domains_total", nil); n < 1 {
				t.Fatalf("fenced_domains_total = %v", n)
			}
			if err := bus.EnsureStreams(ctx, s.bus.JS, bus.StreamsConfig{}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, 30*time.Second, func() error {
				if d, _ := s.host.domain("vm1"); d.state != libvirt.StateRunning {
					return fmt.Errorf("domain %v, want running again", d.state)
				}
				return nil
			})
		})
	}
}

// An agent that comes back to find its host declared lost never uses a
// grant made before it learned so, even one the leader still says is
// current (the control plane has not expired it yet).
func TestAgent_DeclaredLostUsesNoOldGrant(t *testing.T) {
	s := newFakeSetup(t, "h1")
	a := startAgent(t, s.cfg)
	goal := goalOf("h1", "vm1", events.DeriveUID("t", "vm1"), events.DesiredRunning, 10)
	goal.Leases = grantLeases(t, s.bus.JS, goal)
	publishGoal(t, s.bus.JS, goal)
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
	a.stop(t)

	// Away, the host is declared lost; the guest dies with it.
	ctx := context.Background()
	last, err := bus.LastOnSubject(ctx, s.bus.Conn, events.StreamLiveness, events.LivenessSubject("h1"))
	if err != nil {
		t.Fatal(err)
	}
	data, _ := events.Marshal(&events.LostMarker{Host: "h1", RenewalSeq: last.Seq, Detector: "test"})
	msg := &nats.Msg{Subject: events.LivenessSubject("h1"), Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, events.LivenessLostMarker)
	if _, err := bus.PublishExpecting(ctx, s.bus.JS, msg, bus.Expect{Seq: last.Seq}); err != nil {
		t.Fatal(err)
	}
	s.host.setState("vm1", libvirt.StateShutoff, "stopped")

	b := startAgent(t, s.cfg)
	waitFor(t, 10*time.Second, func() error {
		obs, _ := lastObserved(t, s.bus.JS, "h1", "vm1")
		if obs.State != events.ObservedFailed || obs.Fault == nil || obs.Fault.Code != events.CodeLeaseNotCurrent {
			return fmt.Errorf("last report %+v, want failed: lease_not_current", obs)
		}
		return nil
	})
	if d, _ := s.host.domain("vm1"); d.state != libvirt.StateShutoff {
		t.Fatalf("the rejoined agent brought the guest back under an old grant: %v", d.state)
	}
	if n := metricValue(t, b.Agent, "loom_agent_liveness_renewals_total", map[string]string{"result": "lost"}); n < 1 {
		t.Fatalf("the agent did not learn it was lost")
	}
}
