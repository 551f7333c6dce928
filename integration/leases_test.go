//go:build integration

package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// Issue 3's "done when": killing a host's agent and its libvirtd leads,
// after TTL plus margin, to host.lost, expired leases and the VM running
// on another host, and never to two writers: the disk's exclusive grants,
// folded from the stream, never overlap, and each ends before the next.
func TestLeases_KilledHostsVMRestartsElsewhere(t *testing.T) {
	t.Parallel()
	f := newFleet(t, 18, 19)
	reply := f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web", Image: "demo", CPU: 1, MemoryMiB: 128})
	before := f.converged("web", reply.LastSeq())
	if len(before.Leases) != 2 {
		t.Fatalf("web runs under %+v, want two leases", before.Leases)
	}
	leases, err := f.ask(events.KindLease, events.VerbList, events.Query{Host: before.Host, MinSeq: reply.LastSeq()})
	if err != nil || len(leases.Leases) != 2 {
		t.Fatalf("leases on %s: %+v (%v)", before.Host, leases.Leases, err)
	}

	victim := f.hosts[before.Host]
	victim.agent.stop(t)
	libvirttest.Kill(t, victim.socket)
	killed := time.Now()

	var after events.VMView
	waitFor(t, 60*time.Second, "web running elsewhere", func() error {
		var err error
		if after, err = f.vm("web", 0); err != nil {
			return err
		}
		if after.Host == before.Host || !after.Converged || after.Observed.State != events.ObservedRunning {
			return fmt.Errorf("web on %s, observed %s@%d (goal %d)", after.Host, after.Observed.State, after.Observed.Incarnation, after.Incarnation)
		}
		return nil
	})
	t.Logf("killed %s; web running on %s %s later (TTL %s)", before.Host, after.Host, time.Since(killed).Round(100*time.Millisecond), agentTTL())
	if h, err := f.host(before.Host); err != nil || !h.Lost {
		t.Fatalf("host %s: %+v (%v), want lost", before.Host, h, err)
	}
	if got := f.domainState(after.Host, "web"); got != "running" {
		t.Fatalf("libvirt on %s says web is %s", after.Host, got)
	}
	if after.Left != before.Host || after.UID != before.UID {
		t.Fatalf("web after the move: %+v", after.VMState)
	}
	checkExclusiveHistory(t, f, "disk/web", 2)
}

// checkExclusiveHistory folds the lease events of resource from the
// stream: no exclusive grant lands while another stands, and at least
// grants of them were made.
func checkExclusiveHistory(t *testing.T, f *fleet, resource string, grants int) {
	t.Helper()
	r, err := events.ParseResource(resource)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var standing uint64
	made := 0
	for seq := uint64(1); ; {
		m, err := bus.NextOnSubject(ctx, f.conn.Conn, events.StreamEvents, events.LeaseExclusiveSubject(r), seq)
		if err != nil {
			break
		}
		seq = m.Seq + 1
		rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
		if err != nil {
			t.Fatal(err)
		}
		switch ev := rec.Event.(type) {
		case events.LeaseGranted:
			if standing != 0 {
				t.Fatalf("seq %d: %s granted to %s while epoch %d stood: two writers", m.Seq, resource, ev.ID, standing)
			}
			standing = m.Seq
			made++
		case events.LeaseReleased, events.LeaseExpired, events.LeaseBroken:
			standing = 0
		}
	}
	if made < grants {
		t.Fatalf("%d exclusive grants on %s, want at least %d", made, resource, grants)
	}
}

// The same with real guests: the VM of a killed QEMU host is provisioned
// again from its image on the other host (its disk was local), boots, and
// runs there.
func TestLeases_KilledQEMUHostsVMBootsElsewhereFromItsImage(t *testing.T) {
	f := newQEMUFleet(t, 30, 31)
	reply := f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web", Image: "tiny", CPU: 1, MemoryMiB: 128})
	waitFor(t, 120*time.Second, "web running on QEMU", func() error {
		vm, err := f.vm("web", reply.LastSeq())
		if err != nil {
			return err
		}
		if !vm.Converged || vm.Observed.State != events.ObservedRunning {
			return fmt.Errorf("web %s@%d", vm.Observed.State, vm.Observed.Incarnation)
		}
		return nil
	})
	before, _ := f.vm("web", 0)
	victim := f.hosts[before.Host]
	victim.agent.stop(t)
	libvirttest.Kill(t, victim.socket)
	killed := time.Now()

	var after events.VMView
	waitFor(t, 120*time.Second, "web running elsewhere", func() error {
		var err error
		if after, err = f.vm("web", 0); err != nil {
			return err
		}
		if after.Host == before.Host || !after.Converged || after.Observed.State != events.ObservedRunning {
			return fmt.Errorf("web on %s, %s@%d", after.Host, after.Observed.State, after.Observed.Incarnation)
		}
		return nil
	})
	t.Logf("killed %s; web booted on %s %s later (TTL %s)", before.Host, after.Host, time.Since(killed).Round(100*time.Millisecond), agentTTL())
	overlay := filepath.Join(f.hosts[after.Host].storage, "web-"+after.UID+".qcow2")
	if _, err := os.Stat(overlay); err != nil {
		t.Fatalf("no disk provisioned again from the image on %s: %v", after.Host, err)
	}
	if got := f.domainState(after.Host, "web"); got != "running" {
		t.Fatalf("QEMU on %s says web is %s", after.Host, got)
	}
	checkExclusiveHistory(t, f, "disk/web", 2)
}
