//go:build integration

package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// waitMigrationEnded waits until vm's migration is over and returns vm.
func waitMigrationEnded(t *testing.T, f *fleet, vm string, reply *events.Reply) events.VMView {
	t.Helper()
	var view events.VMView
	waitFor(t, 120*time.Second, vm+" migration ended", func() error {
		var err error
		if view, err = f.vm(vm, reply.LastSeq()); err != nil {
			return err
		}
		if view.Migration != nil || view.LastMigration == nil || !view.Converged {
			return fmt.Errorf("%s: migration %+v, last %+v, %s@%d on %s", vm, view.Migration, view.LastMigration, view.Observed.State, view.Observed.Incarnation, view.Host)
		}
		return nil
	})
	return view
}

// A VM booted through Loom on real QEMU moves between two hosts while its
// heartbeat keeps counting: a migration whose target cannot listen fails
// and leaves it running on its source under the same grants; then it moves,
// its grants are handed to the target in the append that records the
// move, its disk on the source goes (it had no checkpoint there), and its
// history tells the story in order.
func TestMigrate_QEMULiveMigration(t *testing.T) {
	f := newQEMUFleet(t, 34, 35)
	f.mustCommand(events.KindNet, events.VerbCreate, &events.CreateNet{Name: "blue", CIDR: "10.77.0.0/24", VNI: 77})
	vm, serial := bootGuest(t, f, "blue")
	source := vm.Host
	target := map[string]string{"host-1": "host-2", "host-2": "host-1"}[source]
	// The guest took its address, and the other host sends it there.
	if data, _ := os.ReadFile(serial); !strings.Contains(string(data), "loom-net eth0 10.77.0.2") {
		t.Fatalf("the guest did not configure its address:\n%s", data)
	}
	mac := events.MACOf(vm.UID)
	waitFor(t, 30*time.Second, "the address's entry on "+target, func() error {
		return overlayEntry(t, f.hosts[target], 77, "10.77.0.2", mac, f.hosts[source].endpoint)
	})
	// Each host gets a port on the net; the target's reaches the VM only
	// through the tunnel.
	ports := attachPorts(t, f, "blue", 77, netip.MustParseAddr("10.77.0.2"), source, target)
	got := ports[target].Count(10, 30*time.Millisecond)
	t.Logf("from %s's port, through the tunnel: %d/%d replies, rtt %s", target, got.Replies, got.Sent, got.RTT())
	if got.Replies < got.Sent-1 {
		t.Fatalf("from %s's port to web on %s: %d replies to %d pings", target, source, got.Replies, got.Sent)
	}

	// The target's QEMU cannot listen where its agent says: the migration
	// fails, and the VM runs on where it was.
	f.hosts[target].agent.stop(t)
	f.hosts[target].migrateListen = "unix:/nonexistent-loom-dir"
	f.startAgent(target)
	waitFor(t, 30*time.Second, target+"'s agent reported itself", func() error {
		h, err := f.host(target)
		if err != nil || h.Agent == nil || h.Agent.MigrateListen != "unix:/nonexistent-loom-dir" {
			return fmt.Errorf("agent %+v (%v)", h.Agent, err)
		}
		return nil
	})
	reply := f.mustCommand(events.KindVM, events.VerbMigrate, &events.MigrateVM{Name: "web", To: target})
	failed := waitMigrationEnded(t, f, "web", reply)
	if l := failed.LastMigration; l.Moved || failed.Host != source || l.Fault == nil || !slices.Equal(failed.Leases, vm.Leases) {
		t.Fatalf("a failed migration: host %s, last %+v, leases %v (were %v)", failed.Host, l, failed.Leases, vm.Leases)
	}
	t.Logf("failed migration, as it should: %s", failed.LastMigration.Fault.Error())
	if got := f.domainState(source, "web"); got != "running" {
		t.Fatalf("after a failed migration QEMU on %s says web is %s", source, got)
	}

	f.hosts[target].agent.stop(t)
	f.hosts[target].migrateListen = ""
	f.startAgent(target)
	waitFor(t, 30*time.Second, target+"'s agent reported itself", func() error {
		h, err := f.host(target)
		if err != nil || h.Agent == nil || h.Agent.MigrateListen != "unix:"+f.hosts[target].sockets {
			return fmt.Errorf("agent %+v (%v)", h.Agent, err)
		}
		return nil
	})
	// The source's port pings the VM every 20 ms while it moves: the
	// longest gap between replies is how long its address was unreachable
	// from the host it left.
	watch := watchPort(t, ports[source])
	before := slices.Max(heartbeats(t, serial))
	started := time.Now()
	reply = f.mustCommand(events.KindVM, events.VerbMigrate, &events.MigrateVM{Name: "web", To: target})
	moved := waitMigrationEnded(t, f, "web", reply)
	ended := time.Now()
	l := moved.LastMigration
	t.Logf("migrated %s -> %s through Loom in %s; libvirt: total %d ms, downtime %d ms", l.From, l.To, ended.Sub(started).Round(time.Millisecond), l.TotalMillis, l.DowntimeMillis)
	waitFor(t, 15*time.Second, "replies to "+source+"'s port for 500 ms after the move", func() error {
		if first := ports[source].FirstReplySince(ended); first.IsZero() || time.Since(first) < 500*time.Millisecond {
			return fmt.Errorf("first reply since the migration ended: %v", first)
		}
		return nil
	})
	watched := watch()
	gap, from := watched.LongestGap()
	t.Logf("address unreachable from %s for %s during the move", source, gap.Round(time.Millisecond))
	if after, _ := f.vm("web", 0); after.LastMigration == nil || after.LastMigration.UnreachableMillis <= 0 {
		t.Errorf("the source's agent reported no unreachable window: %+v", after.LastMigration)
	} else {
		t.Logf("  the source's agent probed it unanswered for %d ms (what loom vm migrate prints)", after.LastMigration.UnreachableMillis)
	}
	t.Logf("  %d pings, %d replies; the gap from %s to %s after the migrate command, which ended at %s", watched.Sent, len(watched.Replies),
		from.Sub(started).Round(time.Millisecond), from.Add(gap).Sub(started).Round(time.Millisecond), ended.Sub(started).Round(time.Millisecond))
	if !l.Moved || moved.Host != target || moved.Observed.State != events.ObservedRunning {
		t.Fatalf("after the migration: host %s, %s, last %+v", moved.Host, moved.Observed.State, l)
	}
	if got := f.domainState(target, "web"); got != "running" {
		t.Fatalf("QEMU on %s says web is %s", target, got)
	}
	if got := f.domainState(source, "web"); got != "absent" {
		t.Fatalf("QEMU on %s still has web: %s", source, got)
	}
	// The guest goes on counting on the target, in its own serial log there.
	targetSerial := filepath.Join(f.hosts[target].storage, "web-"+vm.UID+".serial")
	waitFor(t, 30*time.Second, "the heartbeat to go on after the move", func() error {
		beats := heartbeats(t, targetSerial)
		if len(beats) < 3 {
			return fmt.Errorf("%d heartbeats on %s", len(beats), target)
		}
		if beats[0] < before || beats[0] > before+20 {
			return fmt.Errorf("the guest printed %d first on %s, %d last on %s: it restarted or lost time", beats[0], target, before, source)
		}
		for i := 1; i < len(beats); i++ {
			if beats[i] != beats[i-1]+1 {
				return fmt.Errorf("the counter went %d -> %d", beats[i-1], beats[i])
			}
		}
		return nil
	})
	// The address moved with it: the host it left sends to the target
	// now, and the target, where it is local, holds no entry for it.
	waitFor(t, 30*time.Second, "the address's entry on "+source, func() error {
		return overlayEntry(t, f.hosts[source], 77, "10.77.0.2", mac, f.hosts[target].endpoint)
	})
	got = ports[source].Count(10, 30*time.Millisecond)
	t.Logf("from %s's port, through the tunnel now: %d/%d replies, rtt %s", source, got.Replies, got.Sent, got.RTT())
	if got.Replies < got.Sent-1 {
		t.Fatalf("from %s's port to web on %s: %d replies to %d pings", source, target, got.Replies, got.Sent)
	}
	if err := overlayEntry(t, f.hosts[target], 77, "10.77.0.2", mac, ""); err == nil || !strings.Contains(err.Error(), "no forwarding entry") {
		t.Fatalf("%s, where the vm now runs, still tunnels its address: %v", target, err)
	}
	for _, l := range moved.Leases {
		if l.Epoch <= vm.Incarnation {
			t.Errorf("lease %+v was not granted again for the target", l)
		}
	}
	checkExclusiveHistory(t, f, "disk/web", 2)
	waitFor(t, 30*time.Second, "the source's files removed", func() error {
		left, err := filepath.Glob(filepath.Join(f.hosts[source].storage, "web-"+vm.UID+".*"))
		if err != nil {
			return err
		}
		if len(left) > 0 {
			return fmt.Errorf("left on %s: %v", source, left)
		}
		return nil
	})
	if _, err := os.Stat(filepath.Join(f.hosts[target].storage, "web-"+vm.UID+"."+l.ID+".qcow2")); err != nil {
		t.Fatalf("the disk on %s: %v", target, err)
	}

	var story []events.Type
	for seq := uint64(1); ; {
		m, err := bus.NextOnSubject(context.Background(), f.conn.Conn, events.StreamEvents, "loom.*.>", seq)
		if err != nil {
			break
		}
		seq = m.Seq + 1
		typ := events.Type(m.Header.Get(events.HeaderType))
		switch typ {
		case events.TypeVMMigrationStarted, events.TypeVMMigrationAborted, events.TypeVMMigrationFailed,
			events.TypeVMMigrationReceived, events.TypeVMMigrationSent, events.TypeVMMigrated:
			story = append(story, typ)
		}
	}
	want := []events.Type{events.TypeVMMigrationStarted, events.TypeVMMigrationAborted, events.TypeVMMigrationFailed,
		events.TypeVMMigrationStarted, events.TypeVMMigrationReceived, events.TypeVMMigrationSent, events.TypeVMMigrated}
	if !slices.Equal(story, want) {
		t.Fatalf("the migrations of web:\n got %v\nwant %v", story, want)
	}
}

// overlayEntry checks that host sends addr (of mac) through the VXLAN
// device of vni to endpoint: a permanent neighbour entry and a forwarding
// entry, read from the kernel in the host's network namespace.
func overlayEntry(t *testing.T, h *host, vni int, addr, mac, endpoint string) error {
	t.Helper()
	dev := fmt.Sprintf("loomvx%d", vni)
	run := func(args ...string) string {
		out, err := exec.Command(h.netns[0], append(slices.Clone(h.netns[1:]), args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	neigh := run("ip", "neigh", "show", "dev", dev)
	fdb := run("bridge", "fdb", "show", "dev", dev)
	if !strings.Contains(fdb, mac+" dst "+endpoint) || endpoint == "" {
		return fmt.Errorf("no forwarding entry %s dst %s on %s's %s:\n%s", mac, endpoint, h.name, dev, fdb)
	}
	if !strings.Contains(neigh, addr+" lladdr "+mac) {
		return fmt.Errorf("no neighbour entry %s -> %s on %s's %s:\n%s", addr, mac, h.name, dev, neigh)
	}
	return nil
}

// attachPorts gives each of hosts a port on netName (VXLAN segment vni) and
// returns, per host, a pinger from its port to vm, once every host's
// agent has programmed every port: its own on its bridge, with the MAC
// of its binding, and the others' entries on its VXLAN device, towards
// their hosts' endpoints; and each port has a reply from vm.
func attachPorts(t *testing.T, f *fleet, netName string, vni int, vm netip.Addr, hosts ...string) map[string]*libvirttest.Pinger {
	t.Helper()
	var last uint64
	for _, name := range hosts {
		reply := f.mustCommand(events.KindNet, events.VerbAttach, &events.AttachNet{
			Net: netName, Host: name})
		last = max(last, reply.LastSeq())
	}
	reply, err := f.query(events.KindNet, events.Query{Name: netName, MinSeq: last})
	if err != nil || len(reply.Nets) != 1 {
		t.Fatalf("get net %s: %+v, %v", netName, reply.Nets, err)
	}
	ports := map[string]events.Binding{}
	pingers := map[string]*libvirttest.Pinger{}
	for _, name := range hosts {
		port, ok := reply.Nets[0].BindingOf(events.PortUID(name))
		if !ok {
			t.Fatalf("net %s has no port of %s: %+v", netName, name, reply.Nets[0].Bindings)
		}
		ports[name] = port
		pingers[name] = libvirttest.NewPinger(t, libvirttest.DaemonPID(t, f.hosts[name].socket), netip.MustParseAddr(port.Addr), vm)
	}
	waitFor(t, 30*time.Second, "the ports programmed", func() error {
		for _, name := range hosts {
			h, port := f.hosts[name], ports[name]
			if err := portOn(t, h, vni, port.Addr, port.MAC); err != nil {
				return err
			}
			for _, other := range hosts {
				if other != name {
					if err := overlayEntry(t, h, vni, ports[other].Addr, ports[other].MAC, f.hosts[other].endpoint); err != nil {
						return err
					}
				}
			}
			if err := pingers[name].Reachable(); err != nil {
				return fmt.Errorf("from %s's port %s: %w", name, port.Addr, err)
			}
		}
		return nil
	})
	return pingers
}

// portOn checks that host's bridge of vni has addr and MAC mac.
func portOn(t *testing.T, h *host, vni int, addr, mac string) error {
	t.Helper()
	bridge := fmt.Sprintf("loombr%d", vni)
	argv := append(slices.Clone(h.netns), "ip", "-o", "addr", "show", "dev", bridge)
	addrs, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, addrs)
	}
	argv = append(slices.Clone(h.netns), "ip", "-o", "link", "show", "dev", bridge)
	link, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, link)
	}
	if !strings.Contains(string(addrs), " inet "+addr+"/") || !strings.Contains(string(link), " link/ether "+mac+" ") {
		return fmt.Errorf("no port %s (%s) on %s's %s:\n%s%s", addr, mac, h.name, bridge, link, addrs)
	}
	return nil
}

// watchPort has p ping every 20 ms (Watch) until stop, which returns what
// it saw; t.Cleanup stops it too.
func watchPort(t *testing.T, p *libvirttest.Pinger) (stop func() libvirttest.WatchResult) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var watched libvirttest.WatchResult
	go func() {
		defer close(done)
		watched = p.Watch(ctx, 20*time.Millisecond)
	}()
	stop = func() libvirttest.WatchResult {
		cancel()
		<-done
		return watched
	}
	t.Cleanup(func() { stop() })
	return stop
}
