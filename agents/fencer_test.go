package agents

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// With the agent gone (killed, frozen: it sends no more deadlines), the
// fencer pauses the running domain once the last deadline it heard
// passes. Without a fencer the domain runs on past the deadline, while
// the control plane may be about to give its disk to another host.
func TestFencer_FencesWhenTheAgentIsGone(t *testing.T) {
	for _, withFencer := range []bool{true, false} {
		t.Run(fmt.Sprintf("fencer=%v", withFencer), func(t *testing.T) {
			s := newFakeSetup(t, "h1")
			s.cfg.FenceSocket = filepath.Join(t.TempDir(), "fence.sock")
			var f *Fencer
			if withFencer {
				var err error
				f, err = NewFencer(FencerConfig{Host: "h1", Socket: s.cfg.FenceSocket, Dial: s.host.dial})
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- f.Run(ctx) }()
				t.Cleanup(func() {
					cancel()
					if err := <-done; err != nil {
						t.Error(err)
					}
				})
				// The agent's first renewal must find the fencer listening.
				waitFor(t, 5*time.Second, func() error {
					_, err := os.Stat(s.cfg.FenceSocket)
					return err
				})
			}
			a := startAgent(t, s.cfg)
			publishGoal(t, s.bus.JS, goalOf("h1", "vm1", events.DeriveUID("t", "vm1"), events.DesiredRunning, 10))
			waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
			if withFencer {
				// A fencer that never heard a deadline has none to keep.
				waitFor(t, 5*time.Second, func() error {
					f.mu.Lock()
					defer f.mu.Unlock()
					if f.deadline == 0 {
						return errors.New("the fencer has heard no deadline yet")
					}
					return nil
				})
			}
			a.stop(t) // no agent from here on: only the fencer can act

			// The last deadline lies at most TTL - margin ahead.
			end := time.Now().Add(s.cfg.TTL + time.Second)
			if !withFencer {
				for time.Now().Before(end) {
					if d, _ := s.host.domain("vm1"); d.state != libvirt.StateRunning {
						t.Fatalf("domain %v with no fencer and no agent", d.state)
					}
					time.Sleep(50 * time.Millisecond) // watching a state hold for a span: no condition to wait for
				}
				return
			}
			waitFor(t, s.cfg.TTL+5*time.Second, func() error {
				if d, _ := s.host.domain("vm1"); d.state != libvirt.StatePaused {
					return fmt.Errorf("domain %v, want paused by the fencer", d.state)
				}
				return nil
			})
			if f.Fenced() != 1 {
				t.Fatalf("fencer fenced %d domains, want 1", f.Fenced())
			}
		})
	}
}

func TestFencer_BadConfig(t *testing.T) {
	dial := func(context.Context) (Hypervisor, error) { return nil, nil }
	for name, cfg := range map[string]FencerConfig{
		"no host":    {Socket: "/tmp/x", Dial: dial},
		"no socket":  {Host: "h1", Dial: dial},
		"no dial":    {Host: "h1", Socket: "/tmp/x"},
		"bad policy": {Host: "h1", Socket: "/tmp/x", Dial: dial, Policy: "reboot"},
	} {
		if _, err := NewFencer(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
