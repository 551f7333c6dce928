package agents

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// A guest running under its grants stops by itself after one of them was
// revoked: the agent must not start it again, and reports why. With the
// lease check switched off the same guest is restarted, writing a disk
// another holder may have by now: the check is what prevents it.
func TestAgent_RefusesToStartUnderAGrantNoLongerCurrent(t *testing.T) {
	revocations := map[string]func(t *testing.T, s *fakeSetup, goal events.Goal){
		"disk released": func(t *testing.T, s *fakeSetup, goal events.Goal) {
			disk := goal.Leases[1]
			r, _ := events.ParseResource(disk.Resource)
			appendLeaseEvent(t, s.bus.JS, r, events.LeaseExclusive, goal.UID, events.LeaseReleased{Holder: goal.UID, Epoch: disk.Epoch})
		},
		"disk breaking": func(t *testing.T, s *fakeSetup, goal events.Goal) {
			disk := goal.Leases[1]
			r, _ := events.ParseResource(disk.Resource)
			appendLeaseEvent(t, s.bus.JS, r, events.LeaseExclusive, goal.UID, events.LeaseBreaking{Holder: goal.UID, Epoch: disk.Epoch})
		},
		"image taken exclusively": func(t *testing.T, s *fakeSetup, goal events.Goal) {
			r, _ := events.ParseResource(goal.Leases[0].Resource)
			appendLeaseEvent(t, s.bus.JS, r, events.LeaseExclusive, "builder",
				events.LeaseGranted{Mode: events.LeaseExclusive, LeaseHolder: events.LeaseHolder{ID: "builder", Host: "h9"}})
		},
	}
	for name, revoke := range revocations {
		for _, checked := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/checked=%v", name, checked), func(t *testing.T) {
				t.Parallel()
				s := newFakeSetup(t, "h1")
				startAgent(t, s.cfg, func(a *Agent) { a.cfg.Unsafe.NoLeaseCheck = !checked })
				goal := goalOf("h1", "vm1", events.DeriveUID("t", "vm1"), events.DesiredRunning, 10)
				goal.Leases = grantLeases(t, s.bus.JS, goal)
				publishGoal(t, s.bus.JS, goal)
				obs := waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
				if !reflect.DeepEqual(obs.Leases, goal.Leases) {
					t.Fatalf("observation carries %+v, the goal %+v", obs.Leases, goal.Leases)
				}

				revoke(t, s, goal)
				starts := s.host.count("start")
				s.host.setState("vm1", libvirt.StateShutoff, "stopped")
				if !checked {
					waitFor(t, 10*time.Second, func() error {
						if s.host.count("start") == starts {
							return fmt.Errorf("not restarted yet")
						}
						return nil
					})
					return
				}
				waitFor(t, 10*time.Second, func() error {
					obs, _ := lastObserved(t, s.bus.JS, "h1", "vm1")
					if obs.State != events.ObservedFailed || obs.Fault == nil || obs.Fault.Code != events.CodeLeaseNotCurrent {
						return fmt.Errorf("last report %+v, want failed: lease_not_current", obs)
					}
					return nil
				})
				if n := s.host.count("start"); n != starts {
					t.Fatalf("the agent started the guest %d times under a revoked grant", n-starts)
				}
			})
		}
	}
}

// A goal that names no lease (written before leases existed) is never
// started.
func TestAgent_RefusesAGoalWithoutLeases(t *testing.T) {
	s := newFakeSetup(t, "h1")
	startAgent(t, s.cfg)
	goal := goalOf("h1", "vm1", events.DeriveUID("t", "vm1"), events.DesiredRunning, 10)
	goal.Leases = []events.LeaseEpoch{} // publishGoal grants only when nil
	publishGoalAsIs(t, s.bus.JS, goal)
	waitFor(t, 10*time.Second, func() error {
		obs, _ := lastObserved(t, s.bus.JS, "h1", "vm1")
		if obs.State != events.ObservedFailed || obs.Fault == nil || obs.Fault.Code != events.CodeLeaseNotCurrent {
			return fmt.Errorf("last report %+v, want failed: lease_not_current", obs)
		}
		return nil
	})
	if n := s.host.count("define") + s.host.count("start"); n != 0 {
		t.Fatalf("%d defines and starts without a lease", n)
	}
}
