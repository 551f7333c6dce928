package agents

import (
	"fmt"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// An event on a lease the host's VMs use reaches the agent as it is
// stored, and the agent refreshes: another reader joining the image
// changes nothing, while an operator's forced break of the VM's disk
// lease stops the domain within a second. Unsubscribed, the agent never
// hears of the break and the domain writes on.
func TestAgent_LeaseChangesReachTheAgent(t *testing.T) {
	for _, watched := range []bool{true, false} {
		t.Run(fmt.Sprintf("watched=%v", watched), func(t *testing.T) {
			s := newFakeSetup(t, "h1")
			a := startAgent(t, s.cfg, func(a *Agent) { a.cfg.Unsafe.NoLeaseWatch = !watched })
			goal := goalOf("h1", "vm1", events.DeriveUID("t", "vm1"), events.DesiredRunning, 10)
			goal.Leases = grantLeases(t, s.bus.JS, goal)
			publishGoal(t, s.bus.JS, goal)
			waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
			image, _ := events.ParseResource(goal.Leases[0].Resource)
			disk, _ := events.ParseResource(goal.Leases[1].Resource)

			// Another VM reads the same image: a refresh, and nothing to do.
			appendLeaseEvent(t, s.bus.JS, image, events.LeaseShared, "other",
				events.LeaseGranted{Mode: events.LeaseShared, LeaseHolder: events.LeaseHolder{ID: "other", Host: "h2"}})
			refreshes := func() float64 {
				return metricValue(t, a.Agent, "loom_agent_lease_refreshes_total", map[string]string{"type": string(events.TypeLeaseGranted)})
			}
			if watched {
				waitFor(t, time.Second, func() error {
					if refreshes() < 1 {
						return fmt.Errorf("no refresh yet")
					}
					return nil
				})
			}

			broke := time.Now()
			appendLeaseEvent(t, s.bus.JS, disk, events.LeaseExclusive, goal.UID,
				events.LeaseBreaking{Holder: goal.UID, Epoch: goal.Leases[1].Epoch, Reason: "forced"})
			if !watched {
				time.Sleep(2 * time.Second) // watching a state hold for a span: no condition to wait for
				if d, _ := s.host.domain("vm1"); d.state != libvirt.StateRunning {
					t.Fatalf("an unwatched agent stopped the domain (%v): the test cannot tell", d.state)
				}
				return
			}
			waitFor(t, 5*time.Second, func() error {
				if d, _ := s.host.domain("vm1"); d.state != libvirt.StateShutoff {
					return fmt.Errorf("domain %v, want stopped after the break", d.state)
				}
				return nil
			})
			t.Logf("the break stopped the domain %s after it was stored", time.Since(broke))
			// Reported stopped under the broken grant, and from then on
			// refused: it is never started under it again.
			waitFor(t, 5*time.Second, func() error {
				for _, obs := range observations(t, s.bus.JS, "h1", "vm1") {
					if obs.State == events.ObservedStopped && obs.Fault != nil && obs.Fault.Code == events.CodeLeaseNotCurrent {
						return nil
					}
				}
				return fmt.Errorf("no report of the domain stopped for its lease")
			})
			if n := s.host.count("start"); n != 1 {
				t.Fatalf("%d starts, want only the first", n)
			}
		})
	}
}
