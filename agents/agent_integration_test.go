//go:build integration

package agents

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

// Daemon indexes of these tests: distinct per test, and apart from the
// ones agents/libvirt's tests take (from 1 up), so packages can run at once.
const (
	indexLifecycle = 201 + iota
	indexRestart
	indexBehindBack
	indexOrphan
	indexMismatch
	indexDaemonRestart
	indexQEMU
)

// libvirtSetup is a bus, a real libvirtd on the test driver, a connection
// of the test's own to it, and an agent config on both.
type libvirtSetup struct {
	bus    *bustest.Bus
	socket string
	index  int
	// keeper is the test's own connection. It keeps test:///default alive
	// between agents, and acts behind the agent's back.
	keeper *libvirt.Client
	cfg    Config
}

func newLibvirtSetup(t *testing.T, index int, host string) *libvirtSetup {
	t.Helper()
	b := bustest.Start(t)
	s := &libvirtSetup{bus: b, socket: libvirttest.StartDaemon(t, index), index: index}
	s.keeper = s.dial(t)
	s.cfg = testConfig(t, b, host)
	s.cfg.Dial = func(ctx context.Context) (Hypervisor, error) {
		c, err := libvirt.Dial(ctx, libvirt.Config{Socket: s.socket, URI: "test:///default", DialTimeout: time.Second})
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	return s
}

// dial opens a connection of the test's own, closed when the test ends.
func (s *libvirtSetup) dial(t *testing.T) *libvirt.Client {
	t.Helper()
	c, err := libvirt.Dial(context.Background(), libvirt.Config{Socket: s.socket, URI: "test:///default"})
	if err != nil {
		t.Fatalf("dial libvirtd: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// domainState waits until the named domain exists in state want.
func (s *libvirtSetup) waitDomain(t *testing.T, name string, want libvirt.State) libvirt.Domain {
	t.Helper()
	var d libvirt.Domain
	waitFor(t, 10*time.Second, func() error {
		var err error
		if d, err = s.keeper.Lookup(context.Background(), name); err != nil {
			return err
		}
		if d.State != want {
			return fmt.Errorf("domain %s is %s, want %s", name, d.State, want)
		}
		return nil
	})
	return d
}

// waitGone waits until the named domain does not exist.
func (s *libvirtSetup) waitGone(t *testing.T, name string) {
	t.Helper()
	waitFor(t, 10*time.Second, func() error {
		_, err := s.keeper.Lookup(context.Background(), name)
		if errors.Is(err, libvirt.ErrNotFound) {
			return nil
		}
		return fmt.Errorf("domain %s still there (lookup: %v)", name, err)
	})
}

func TestAgent_Lifecycle(t *testing.T) {
	t.Parallel()
	s := newLibvirtSetup(t, indexLifecycle, "h1")
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	steps := []struct {
		desired events.Desired
		state   events.ObservedState
		domain  libvirt.State // for all but absent
	}{
		{events.DesiredRunning, events.ObservedRunning, libvirt.StateRunning},
		{events.DesiredPaused, events.ObservedPaused, libvirt.StatePaused},
		{events.DesiredRunning, events.ObservedRunning, libvirt.StateRunning},
		{events.DesiredStopped, events.ObservedStopped, libvirt.StateShutoff},
		{events.DesiredRunning, events.ObservedRunning, libvirt.StateRunning},
		{events.DesiredAbsent, events.ObservedAbsent, 0},
	}
	for i, step := range steps {
		incarnation := uint64(10 * (i + 1))
		publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, step.desired, incarnation))
		obs := waitObserved(t, s.bus.JS, "h1", "vm1", incarnation, step.state)
		if obs.UID != uid || obs.Fault != nil || obs.Unrequested {
			t.Fatalf("step %d: observation %+v", i, obs)
		}
		if step.desired == events.DesiredAbsent {
			s.waitGone(t, "vm1")
			continue
		}
		d := s.waitDomain(t, "vm1", step.domain)
		if formatUUID(d.UUID) != uid || d.Metadata["uid"] != uid || d.Metadata["vm"] != "vm1" ||
			d.Metadata["incarnation"] != strconv.FormatUint(incarnation, 10) {
			t.Fatalf("step %d: domain %+v, want the goal's uuid and metadata", i, d)
		}

		if step.desired == events.DesiredStopped {
			// An old incarnation republished does nothing. A probe VM's goal,
			// published after it, shows when the agent has read past it.
			before := len(records(t, s.bus.JS, vmSubject("h1", "vm1")))
			publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, incarnation-10))
			publishGoal(t, s.bus.JS, goalOf("h1", "probe", events.DeriveUID("t", "probe"), events.DesiredStopped, 1))
			waitObserved(t, s.bus.JS, "h1", "probe", 1, events.ObservedStopped)
			if after := len(records(t, s.bus.JS, vmSubject("h1", "vm1"))); after != before {
				t.Fatalf("old incarnation: %d new events on vm1", after-before)
			}
			s.waitDomain(t, "vm1", libvirt.StateShutoff)
		}
	}
	if obs := observations(t, s.bus.JS, "h1", "vm1"); len(obs) != len(steps) {
		t.Fatalf("observations = %+v, want one per step", obs)
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_RestartMidway(t *testing.T) {
	t.Parallel()
	s := newLibvirtSetup(t, indexRestart, "h1")
	uid := events.DeriveUID("t", "vm1")
	a := startAgent(t, s.cfg)
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	// Kill the agent while it takes in a new goal; a new one finishes the job.
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredPaused, 20))
	a.stop(t)
	b := startAgent(t, s.cfg)
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedPaused)
	s.waitDomain(t, "vm1", libvirt.StatePaused)
	b.stop(t)

	// Started again on a converged host, an agent neither acts nor reports.
	before := len(records(t, s.bus.JS, vmSubject("h1", "vm1")))
	option, reconciles := countReconciles("vm1")
	c := startAgent(t, s.cfg, option)
	waitFor(t, 10*time.Second, func() error {
		if reconciles.Load() == 0 {
			return errors.New("vm1 not reconciled yet")
		}
		return nil
	})
	if n := metricValue(t, c.Agent, "loom_agent_actions_total", nil); n != 0 {
		t.Fatalf("restarted agent took %v actions on a converged host", n)
	}
	if after := len(records(t, s.bus.JS, vmSubject("h1", "vm1"))); after != before {
		t.Fatalf("restarted agent published %d events on a converged host", after-before)
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_DomainStoppedBehindItsBack(t *testing.T) {
	t.Parallel()
	s := newLibvirtSetup(t, indexBehindBack, "h1")
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	if err := s.keeper.Destroy(context.Background(), "vm1"); err != nil {
		t.Fatalf("destroy behind the agent's back: %v", err)
	}
	waitFor(t, 10*time.Second, func() error {
		obs := observations(t, s.bus.JS, "h1", "vm1")
		if len(obs) != 3 {
			return fmt.Errorf("observations = %+v, want running, stopped (unrequested), running", obs)
		}
		if o := obs[1]; o.State != events.ObservedStopped || !o.Unrequested || o.Incarnation != 10 {
			return fmt.Errorf("second observation = %+v, want unrequested stopped at 10", o)
		}
		if o := obs[2]; o.State != events.ObservedRunning || o.Unrequested || o.Incarnation != 10 {
			return fmt.Errorf("third observation = %+v, want running at 10", o)
		}
		return nil
	})
	s.waitDomain(t, "vm1", libvirt.StateRunning)
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

func TestAgent_OrphanDomain(t *testing.T) {
	t.Parallel()
	s := newLibvirtSetup(t, indexOrphan, "h1")
	ctx := context.Background()
	strayUID := events.DeriveUID("t", "stray")
	strayUUID, _ := parseUUID(strayUID)
	if err := s.keeper.Define(ctx, libvirt.DomainSpec{Name: "stray", UUID: strayUUID}); err != nil {
		t.Fatal(err)
	}
	if err := s.keeper.Start(ctx, "stray"); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, s.cfg)
	hostSubject := events.ObservationSubject("h1", events.KindHost, "h1")
	// orphans folds the host subject: domain → found event, while not cleared.
	orphans := func() (map[string]events.HostOrphanFound, []string) {
		found := map[string]events.HostOrphanFound{}
		var cleared []string
		for _, rec := range records(t, s.bus.JS, hostSubject) {
			switch ev := rec.Event.(type) {
			case events.HostOrphanFound:
				found[ev.Domain] = ev
			case events.HostOrphanCleared:
				delete(found, ev.Domain)
				cleared = append(cleared, ev.Domain)
			}
		}
		return found, cleared
	}
	waitFor(t, 10*time.Second, func() error {
		found, _ := orphans()
		stray, ok := found["stray"]
		if !ok || stray.UUID != strayUID || stray.State != events.ObservedRunning {
			return fmt.Errorf("orphans = %+v, want stray running", found)
		}
		if _, ok := found["test"]; !ok {
			return fmt.Errorf("orphans = %+v, want the test driver's own domain too", found)
		}
		return nil
	})
	// Reported, never touched: a full resync later it still runs.
	a.enqueueAll()
	s.waitDomain(t, "stray", libvirt.StateRunning)
	if n := metricValue(t, a.Agent, "loom_agent_actions_total", nil); n != 0 {
		t.Fatalf("agent took %v actions on orphans", n)
	}

	// An orphan that gets a goal is cleared and managed; one that goes away
	// is cleared.
	publishGoal(t, s.bus.JS, goalOf("h1", "stray", strayUID, events.DesiredPaused, 10))
	waitObserved(t, s.bus.JS, "h1", "stray", 10, events.ObservedPaused)
	if err := s.keeper.Destroy(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	if err := s.keeper.Undefine(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		found, cleared := orphans()
		if len(found) != 0 || strings.Join(cleared, ",") != "stray,test" {
			return fmt.Errorf("orphans %+v, cleared %v; want none left, stray then test cleared", found, cleared)
		}
		return nil
	})
	checkSubject(t, s.bus.JS, hostSubject)
}

func TestAgent_DomainMismatch(t *testing.T) {
	t.Parallel()
	s := newLibvirtSetup(t, indexMismatch, "h1")
	ctx := context.Background()
	other, _ := parseUUID(events.DeriveUID("t", "someone else's vm1"))
	if err := s.keeper.Define(ctx, libvirt.DomainSpec{Name: "vm1", UUID: other, Metadata: map[string]string{"owner": "else"}}); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	obs := waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedFailed)
	if obs.Fault == nil || obs.Fault.Code != events.CodeDomainMismatch {
		t.Fatalf("fault = %+v, want domain_mismatch", obs.Fault)
	}
	d := s.waitDomain(t, "vm1", libvirt.StateShutoff)
	if d.UUID != other || d.Metadata["owner"] != "else" {
		t.Fatalf("domain = %+v, want it untouched", d)
	}
	if n := metricValue(t, a.Agent, "loom_agent_actions_total", nil); n != 0 {
		t.Fatalf("agent took %v actions on a mismatched domain", n)
	}
}

func TestAgent_LibvirtdRestarted(t *testing.T) {
	t.Parallel()
	s := newLibvirtSetup(t, indexDaemonRestart, "h1")
	a := startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredRunning, 10))
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	dir := filepath.Dir(filepath.Dir(s.socket))
	killDaemon(t, dir)
	select {
	case <-s.keeper.Disconnected():
	case <-time.After(5 * time.Second):
		t.Fatalf("connection still up 5s after libvirtd was killed")
	}
	waitFor(t, 5*time.Second, func() error {
		if metricValue(t, a.Agent, "loom_agent_libvirt_connected", nil) != 0 {
			return errors.New("agent still connected")
		}
		return nil
	})
	publishGoal(t, s.bus.JS, goalOf("h1", "vm1", uid, events.DesiredPaused, 20))
	down := waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedFailed)
	if down.Fault == nil || down.Fault.Code != events.CodeLibvirtUnavailable {
		t.Fatalf("fault = %+v, want libvirt_unavailable", down.Fault)
	}

	// The restarted test driver starts from scratch: the agent defines the
	// domain again and brings it to its goal.
	restartDaemon(t, dir, s.index)
	s.keeper = s.dial(t)
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedPaused)
	d := s.waitDomain(t, "vm1", libvirt.StatePaused)
	if formatUUID(d.UUID) != uid {
		t.Fatalf("domain uuid = %s, want %s", formatUUID(d.UUID), uid)
	}
	checkSubject(t, s.bus.JS, vmSubject("h1", "vm1"))
}

// killDaemon kills the libvirtd of dir at once (SIGKILL).
func killDaemon(t *testing.T, dir string) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "libvirtd.pid"))
	if err != nil {
		t.Fatalf("read pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatalf("pid file: %v", err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill libvirtd %d: %v", pid, err)
	}
}

// restartDaemon starts libvirtd again in dir; libvirttest's cleanup stops it.
func restartDaemon(t *testing.T, dir string, index int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot(t), "ops", "libvirt", "host.sh"), "start", dir, strconv.Itoa(index))
	cmd.Env = append(os.Environ(), "LOOM_LIBVIRTD_IDLE_EXIT=300")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("restart libvirtd in %s: %v\n%s", dir, err, out)
	}
}

// repoRoot is the directory holding go.mod, above the working directory.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("no go.mod above %s", dir)
		}
		dir = parent
	}
}
