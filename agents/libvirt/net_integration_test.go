//go:build integration

package libvirt_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/agents/overlay"
)

// The test driver takes a bridged virtio card as the QEMU driver does,
// and keeps a tap name that is not libvirt's own.
func TestClient_Interface(t *testing.T) {
	t.Parallel()
	c, _ := startClient(t, libvirt.Config{})
	ctx := context.Background()
	spec := libvirt.DomainSpec{Name: "nic", UUID: uuidFor("nic"),
		Interface: &libvirt.Interface{Bridge: "loombr42", MAC: "52:54:00:AA:00:01", Target: "loomtap1"}}
	if err := c.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	_, persistent, _, err := c.DomainXML(ctx, "nic")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"<interface type='bridge'>", "<source bridge='loombr42'/>",
		"<mac address='52:54:00:aa:00:01'/>", "<model type='virtio'/>", "<target dev='loomtap1'/>"} {
		if !strings.Contains(persistent, want) {
			t.Errorf("definition lacks %s:\n%s", want, persistent)
		}
	}
	spec.Interface.Target = "vnet1"
	if err := c.Define(ctx, spec); err == nil {
		t.Fatal("Define took a tap name libvirt keeps for itself")
	}
}

// The overlay network follows a VM across a live migration, with real
// packets: two hosts (libvirtd daemons in their own network namespaces)
// share an underlay; each has the overlay's bridge and VXLAN device, and
// an observer address on its bridge. The tiny guest boots on host 1 with
// 10.77.0.5 and answers ping from host 2 only through the tunnel: with
// host 2's entry pointing at the wrong endpoint nothing comes back. It
// live-migrates to host 2; when Migrate returns, the mapping moves it
// there on both hosts, and host 1 reaches it through the tunnel again,
// and only through it. It migrates back with the mapping moved as soon as
// host 1's daemon reports it resumed. Observers on both hosts ping every
// 20 ms during each move; the test logs how long each went without a
// reply.
func TestQEMU_OverlayFollowsMigration(t *testing.T) {
	guest := libvirttest.Guest(t)
	socket1 := libvirttest.StartDaemon(t, 220)
	socket2 := libvirttest.StartDaemon(t, 221)
	ctx := context.Background()
	host1, host2 := dialQEMU(t, socket1), dialQEMU(t, socket2)

	// Each host: an underlay link, the overlay's bridge and VXLAN device,
	// and an observer address on the bridge (as a VM there would have).
	var nets [2]overlay.Config
	var observers [2]overlay.Entry
	var pingers [2]*libvirttest.Pinger
	vm := overlay.Entry{Addr: netip.MustParseAddr("10.77.0.5"), MAC: mustMAC(t, "52:54:00:77:00:05")}
	for i, socket := range []string{socket1, socket2} {
		endpoint, dev, prefix := libvirttest.Underlay(t, socket)
		nets[i] = overlay.Config{Prefix: prefix, VNI: 42, Local: endpoint, Underlay: dev}
		step := time.Now()
		if err := overlay.Ensure(ctx, nets[i]); err != nil {
			t.Fatal(err)
		}
		t.Logf("host %d: endpoint %s on %s; Ensure: %s", i+1, endpoint, dev, since(step))
		observers[i] = addObserver(t, nets[i], fmt.Sprintf("10.77.0.%d", 253+i), fmt.Sprintf("52:54:00:77:00:%x", 0xfd+i))
		pingers[i] = libvirttest.NewPinger(t, daemonPID(t, socket), observers[i].Addr, vm.Addr)
	}
	endpoint1, endpoint2 := nets[0].Local, nets[1].Local
	// mapping is the projection's view: the VM behind vmAt, each observer
	// on its own host. Every host gets all of it; SetPeers skips its own.
	mapping := func(vmAt netip.Addr) []overlay.Entry {
		located := vm
		located.Endpoint = vmAt
		return []overlay.Entry{located, observers[0], observers[1]}
	}
	setPeers := func(host int, entries []overlay.Entry) {
		t.Helper()
		if err := overlay.SetPeers(ctx, nets[host-1], entries); err != nil {
			t.Fatal(err)
		}
	}
	// remapTo is the mapping's update when the VM has moved behind vmAt:
	// every host's agent calls SetPeers.
	remapTo := func(vmAt netip.Addr) func() error {
		return func() error {
			for i := range nets {
				if err := overlay.SetPeers(ctx, nets[i], mapping(vmAt)); err != nil {
					return err
				}
			}
			return nil
		}
	}

	// The VM boots on host 1, its card on the bridge.
	const name = "ovl"
	srcDir, dstDir := libvirttest.VMDir(t), libvirttest.VMDir(t)
	sockets := libvirttest.SocketDir(t)
	disk := filepath.Join(srcDir, "disk.qcow2")
	qemuImgOverlay(t, filepath.Join(guest, "base.qcow2"), disk)
	serial := filepath.Join(srcDir, "serial")
	spec := libvirt.DomainSpec{Name: name, MemoryMiB: 128, DiskPath: disk, SerialPath: serial,
		Kernel: filepath.Join(guest, "vmlinuz"), Initrd: filepath.Join(guest, "initrd.gz"),
		Cmdline:   "console=ttyS0 quiet loom.ip=" + vm.Addr.String() + "/24",
		Interface: &libvirt.Interface{Bridge: nets[0].BridgeName(), MAC: vm.MAC.String()}}
	if err := host1.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*libvirt.Client{host1, host2} {
		t.Cleanup(func() {
			_ = c.Destroy(ctx, name)
			_ = c.Undefine(ctx, name)
		})
	}
	step := time.Now()
	if err := host1.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	started := since(step)
	warmCapabilities(t, socket2) // as in TestQEMU_LiveMigration
	waitFor(t, 90*time.Second, func() error { return serialHas(t, serial, "loom-net eth0 "+vm.Addr.String()+"/24") })
	netUp := since(step)
	waitFor(t, 30*time.Second, func() error {
		if n := heartbeat(t, serial); n < 2 {
			return fmt.Errorf("heartbeat %d", n)
		}
		return nil
	})
	t.Logf("boot: Start %s, guest network up %s, heartbeat 2 %s", started, netUp, since(step))
	if strings.Contains(readFile(t, serial), "loom-net failed") {
		t.Fatalf("guest network set-up failed:\n%s", readFile(t, serial))
	}

	// The tunnel proves itself: host 2 believes the VM is behind an
	// endpoint with no VXLAN device (the root namespace's bridge): its
	// packets go into the tunnel and nothing comes back.
	wrong := netip.MustParseAddr(strings.Split(libvirttest.UnderlayGateway, "/")[0])
	setPeers(1, mapping(endpoint1))
	setPeers(2, mapping(wrong))
	before := tunnelPackets(t, nets[1])
	if got := pingers[1].Count(30, 30*time.Millisecond); got.Replies != 0 {
		t.Fatalf("host 2 got %d replies through a tunnel pointing at %s", got.Replies, wrong)
	}
	after := tunnelPackets(t, nets[1])
	t.Logf("host 2, VM mapped to %s: 0 replies to 30 pings; tunnel sent %d, received %d packets", wrong, after.tx-before.tx, after.rx-before.rx)
	if after.tx-before.tx < 30 {
		t.Fatalf("host 2's tunnel sent %d packets for 30 pings", after.tx-before.tx)
	}

	// The right endpoint: replies, all through the tunnel.
	step = time.Now()
	setPeers(2, mapping(endpoint1))
	waitFor(t, 10*time.Second, func() error { return pingers[1].Reachable() })
	t.Logf("host 2, VM mapped to host 1: first reply %s after SetPeers", since(step))
	checkThroughTunnel(t, pingers[1], nets[1], "host 2 -> VM on host 1")
	if got := pingers[0].Count(20, 30*time.Millisecond); got.Replies < 18 {
		t.Fatalf("host 1 (local to the VM): %d replies to 20 pings", got.Replies)
	}

	// The move. Both observers ping every 20 ms; when Migrate returns,
	// the mapping says host 2 on both hosts.
	if err := host2.EnsureDirPool(ctx, "loom", dstDir); err != nil {
		t.Fatal(err)
	}
	toHost2 := libvirt.Migration{
		DestURI:  "qemu+unix:///system?socket=" + socket2,
		DataURI:  "unix://" + filepath.Join(sockets, "memory-1.sock"),
		DisksURI: "unix://" + filepath.Join(sockets, "disk-1.sock"),
		DestDisk: filepath.Join(dstDir, name+".qcow2"),
	}
	beats := heartbeat(t, serial)
	moved := moveObserved(t, host1, host2, name, toHost2, pingers, 0, false, remapTo(endpoint2))
	moved.log(t, "to host 2, mapping updated when Migrate returned")
	if d, err := host2.Lookup(ctx, name); err != nil || d.State != libvirt.StateRunning {
		t.Fatalf("on host 2 after the migration: %+v, %v; want running", d, err)
	}

	// Now host 1 reaches the VM only through the tunnel: all replies come
	// through it, and without the VM's entry there are none.
	checkThroughTunnel(t, pingers[0], nets[0], "host 1 -> VM on host 2")
	if got := pingers[1].Count(20, 30*time.Millisecond); got.Replies < 18 {
		t.Fatalf("host 2 (local to the VM now): %d replies to 20 pings", got.Replies)
	}
	setPeers(1, mapping(endpoint2)[1:])
	if got := pingers[0].Count(30, 30*time.Millisecond); got.Replies != 0 {
		t.Fatalf("host 1 got %d replies with the VM's entry removed", got.Replies)
	}
	setPeers(1, mapping(endpoint2))
	waitFor(t, 10*time.Second, func() error { return pingers[0].Reachable() })
	t.Logf("host 1, VM's entry removed: 0 replies to 30 pings; restored: replies again")

	// And back to host 1, the mapping updated this time as soon as host
	// 1's daemon reports the VM resumed there, as an agent watching its
	// own daemon's events could.
	if err := host1.EnsureDirPool(ctx, "loom", srcDir); err != nil {
		t.Fatal(err)
	}
	toHost1 := libvirt.Migration{
		DestURI:  "qemu+unix:///system?socket=" + socket1,
		DataURI:  "unix://" + filepath.Join(sockets, "memory-2.sock"),
		DisksURI: "unix://" + filepath.Join(sockets, "disk-2.sock"),
		DestDisk: filepath.Join(srcDir, name+"-back.qcow2"),
	}
	moved = moveObserved(t, host2, host1, name, toHost1, pingers, 1, true, remapTo(endpoint1))
	moved.log(t, "back to host 1, mapping updated on host 1's resumed event")
	checkThroughTunnel(t, pingers[1], nets[1], "host 2 -> VM back on host 1")

	// The guest did not restart.
	waitFor(t, 30*time.Second, func() error {
		if n := heartbeat(t, serial); n < beats+3 {
			return fmt.Errorf("heartbeat %d, %d before the migration", n, beats)
		}
		return nil
	})
	checkCounting(t, serial)
}

// moveReport is what moveObserved saw, its times counted from the start
// of the migration.
type moveReport struct {
	start                     time.Time
	resumed, returned, mapped time.Duration // on the target's event; Migrate; the mapping updated
	downtime                  time.Duration // libvirt's figure
	watched                   [2]libvirttest.WatchResult
}

func (m moveReport) log(t *testing.T, what string) {
	t.Helper()
	t.Logf("%s: target reported resumed %s, Migrate returned %s, mapping updated %s after Migrate began; libvirt downtime %s",
		what, m.resumed, m.returned, m.mapped, m.downtime)
	for i, w := range m.watched {
		gap, from := w.LongestGap()
		t.Logf("  host %d observer: %d pings, %d replies; longest gap %s, from %s to %s", i+1, w.Sent, len(w.Replies),
			gap.Round(time.Millisecond), from.Sub(m.start).Round(time.Millisecond), from.Add(gap).Sub(m.start).Round(time.Millisecond))
	}
}

// moveObserved live-migrates the named domain from source to target while
// every pinger pings every 20 ms, and calls remap, which updates the
// mapping, when Migrate returns or, with onResumed, as soon as the target
// reports the domain resumed. It returns once the observer on the
// source host (pingers[oldHost]) has had replies for a second after that.
func moveObserved(t *testing.T, source, target *libvirt.Client, name string, m libvirt.Migration, pingers [2]*libvirttest.Pinger,
	oldHost int, onResumed bool, remap func() error) moveReport {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := target.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg                  sync.WaitGroup
		mv                  moveReport
		resumedAt, remapped time.Time
		remapErr            error
		resumedDone         = make(chan struct{})
	)
	wg.Add(1)
	go func() { // until the event, or ctx ends
		defer wg.Done()
		defer close(resumedDone)
		for ev := range events {
			if ev.Name == name && ev.Kind == "resumed" {
				resumedAt = time.Now()
				if onResumed {
					remapErr = remap()
					remapped = time.Now()
				}
				return
			}
		}
	}()
	watchCtx, stopWatching := context.WithCancel(ctx)
	var watchers sync.WaitGroup
	for i := range pingers {
		watchers.Add(1)
		go func() {
			defer watchers.Done()
			mv.watched[i] = pingers[i].Watch(watchCtx, 20*time.Millisecond)
		}()
	}
	stop := func() { // ends the watchers and the event reader, and waits for them
		stopWatching()
		watchers.Wait()
		cancel()
		wg.Wait()
	}

	mv.start = time.Now()
	if err := source.Migrate(context.Background(), name, m); err != nil {
		stop()
		t.Fatalf("Migrate: %v", err)
	}
	returned := time.Now()
	if !onResumed {
		remapErr = remap()
		remapped = time.Now()
	}
	select {
	case <-resumedDone:
	case <-time.After(10 * time.Second):
		stop()
		t.Fatalf("the target reported no resumed event within 10 s of Migrate's return")
	}
	if remapErr != nil {
		stop()
		t.Fatalf("update the mapping: %v", remapErr)
	}
	deadline := time.After(15 * time.Second)
	for {
		if first := pingers[oldHost].FirstReplySince(remapped); !first.IsZero() && time.Since(first) >= time.Second {
			break
		}
		select {
		case <-deadline:
			stop()
			t.Fatalf("host %d got no reply from the VM within 15 s of the mapping's update: %s", oldHost+1,
				mv.watched[oldHost].Describe(mv.start))
		case <-time.After(50 * time.Millisecond):
		}
	}
	stop()
	rel := func(at time.Time) time.Duration { return at.Sub(mv.start).Round(time.Millisecond) }
	mv.resumed, mv.returned, mv.mapped = rel(resumedAt), rel(returned), rel(remapped)
	if stats, err := target.CompletedMigration(context.Background(), name); err == nil {
		mv.downtime = stats.Downtime
	}
	for i, w := range mv.watched {
		if gap, _ := w.LongestGap(); gap > 10*time.Second {
			t.Errorf("host %d observer went %s without a reply", i+1, gap)
		}
	}
	return mv
}

// addObserver gives the overlay's bridge on cfg's host an address and a
// fixed MAC (a bridge otherwise takes one of its ports') and returns its
// mapping entry.
func addObserver(t *testing.T, cfg overlay.Config, addr, mac string) overlay.Entry {
	t.Helper()
	runIn(t, cfg.Prefix, "ip", "link", "set", cfg.BridgeName(), "address", mac)
	runIn(t, cfg.Prefix, "ip", "addr", "add", addr+"/24", "dev", cfg.BridgeName())
	return overlay.Entry{Addr: netip.MustParseAddr(addr), MAC: mustMAC(t, mac), Endpoint: cfg.Local}
}

// checkThroughTunnel pings and checks that the tunnel device of cfg's
// host carried at least every request and every reply.
func checkThroughTunnel(t *testing.T, p *libvirttest.Pinger, cfg overlay.Config, what string) {
	t.Helper()
	before := tunnelPackets(t, cfg)
	got := p.Count(25, 40*time.Millisecond)
	after := tunnelPackets(t, cfg)
	tx, rx := after.tx-before.tx, after.rx-before.rx
	t.Logf("%s: %d/%d replies, rtt %s; tunnel sent %d, received %d packets", what, got.Replies, got.Sent, got.RTT(), tx, rx)
	if got.Replies < got.Sent-2 || tx < uint64(got.Sent) || rx < uint64(got.Replies) {
		t.Fatalf("%s: %d replies to %d pings; the tunnel sent %d and received %d packets", what, got.Replies, got.Sent, tx, rx)
	}
}

// tunnelCounters are a VXLAN device's packet counters.
type tunnelCounters struct{ tx, rx uint64 }

func tunnelPackets(t *testing.T, cfg overlay.Config) tunnelCounters {
	t.Helper()
	var links []struct {
		Stats struct {
			RX struct{ Packets uint64 } `json:"rx"`
			TX struct{ Packets uint64 } `json:"tx"`
		} `json:"stats64"`
	}
	out := runIn(t, cfg.Prefix, "ip", "-j", "-s", "link", "show", "dev", cfg.DeviceName())
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -s link show %s: %v:\n%s", cfg.DeviceName(), err, out)
	}
	return tunnelCounters{tx: links[0].Stats.TX.Packets, rx: links[0].Stats.RX.Packets}
}

func runIn(t *testing.T, prefix []string, args ...string) string {
	t.Helper()
	argv := append(slices.Clone(prefix), args...)
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

func mustMAC(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	mac, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(data)
}

func serialHas(t *testing.T, serial, line string) error {
	if !strings.Contains(readFile(t, serial), line) {
		return fmt.Errorf("no %q on the serial console yet", line)
	}
	return nil
}
