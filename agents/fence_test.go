package agents

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

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
				if f := a.fence.check(time.Now()); f == nil && fenced {
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
