//go:build integration

package overlay

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/internal/eventually"
)

// netns starts a process in a new network namespace and returns the
// prefix that runs a command there; the process (and with it the
// namespace) is killed in t.Cleanup.
func netns(t *testing.T) (prefix []string) {
	t.Helper()
	cmd := exec.Command("unshare", "-n", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Until unshare has run, the process is still in this namespace, and
	// commands meant for the new one would change this one.
	own, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	pid := strconv.Itoa(cmd.Process.Pid)
	eventually.Wait(t, 5*time.Second, func() error {
		ns, err := os.Readlink("/proc/" + pid + "/ns/net")
		if err != nil || ns == own {
			return fmt.Errorf("process %s in namespace %q (%v), want a new one", pid, ns, err)
		}
		return nil
	})
	return []string{"nsenter", "-t", pid, "-n"}
}

// recorder runs commands for real and remembers those that change
// something.
type recorder struct{ changed []string }

func (r *recorder) run(ctx context.Context, args []string) ([]byte, error) {
	if !slices.Contains(args, "show") {
		r.changed = append(r.changed, strings.Join(args, " "))
	}
	return execRun(ctx, args)
}

func mustRun(t *testing.T, prefix []string, args ...string) string {
	t.Helper()
	argv := append(slices.Clone(prefix), args...)
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

// Against the kernel's real devices (in a private network namespace):
// Ensure builds the bridge and the device and then changes nothing;
// SetPeers reconciles what `bridge fdb` and `ip neigh` show to exactly its
// list, changing only what differs; SetPort and ClearPort set and clear
// the bridge's address and MAC; a device of the wrong endpoint is
// rebuilt; Remove removes, twice.
func TestOverlay_KernelState(t *testing.T) {
	ctx := context.Background()
	prefix := netns(t)
	mustRun(t, prefix, "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
	mustRun(t, prefix, "ip", "addr", "add", "10.251.0.1/24", "dev", "ul0")
	mustRun(t, prefix, "ip", "link", "set", "ul0", "up")
	cfg := Config{Prefix: prefix, VNI: 42, Local: netip.MustParseAddr("10.251.0.1"), Underlay: "ul0"}

	var rec recorder
	if err := ensure(ctx, rec.run, cfg); err != nil {
		t.Fatal(err)
	}
	if len(rec.changed) != 5 {
		t.Fatalf("first Ensure ran %q, want 5 changes", rec.changed)
	}
	links, err := (host{cfg: cfg, run: execRun}).links(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vx := links["loomvx42"]
	if vx.Master != "loombr42" || !vx.up() || !links["loombr42"].up() || vx.Info.Data.Learning || !vx.Info.Data.Proxy {
		t.Fatalf("after Ensure: %+v, bridge %+v", vx, links["loombr42"])
	}
	rec.changed = nil
	if err := ensure(ctx, rec.run, cfg); err != nil || len(rec.changed) != 0 {
		t.Fatalf("second Ensure: %v, ran %q; want nothing changed", err, rec.changed)
	}

	mac := func(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }
	addr := netip.MustParseAddr
	entries := []Entry{
		{Addr: addr("10.77.0.5"), MAC: mac("52:54:00:4d:00:05"), Endpoint: addr("10.251.0.2")},
		{Addr: addr("fd77::5"), MAC: mac("52:54:00:4d:00:05"), Endpoint: addr("10.251.0.2")},
		{Addr: addr("10.77.0.6"), MAC: mac("52:54:00:4d:00:06"), Endpoint: addr("10.251.0.3")},
		{Addr: addr("10.77.0.7"), MAC: mac("52:54:00:4d:00:07"), Endpoint: cfg.Local},
	}
	// A stray default destination, as flooding would use, goes.
	mustRun(t, prefix, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "loomvx42", "dst", "10.251.0.9", "self", "permanent")
	checkPeers := func(wantFDB, wantNeigh string) {
		t.Helper()
		got, err := (host{cfg: cfg, run: execRun}).peers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var fdb, neigh []string
		for _, m := range sortedKeys(got.endpoints) {
			fdb = append(fdb, m+">"+strings.Join(got.endpoints[m], ","))
		}
		for _, a := range sortedKeys(got.neighbors) {
			neigh = append(neigh, fmt.Sprintf("%s>%s,%t", a, got.neighbors[a].mac, got.neighbors[a].permanent))
		}
		if strings.Join(fdb, " ") != wantFDB || strings.Join(neigh, " ") != wantNeigh {
			t.Fatalf("on the device:\n fdb   %s\n neigh %s\nwant:\n fdb   %s\n neigh %s", fdb, neigh, wantFDB, wantNeigh)
		}
	}
	rec.changed = nil
	if err := setPeers(ctx, rec.run, cfg, entries); err != nil {
		t.Fatal(err)
	}
	checkPeers("52:54:00:4d:00:05>10.251.0.2 52:54:00:4d:00:06>10.251.0.3",
		"10.77.0.5>52:54:00:4d:00:05,true 10.77.0.6>52:54:00:4d:00:06,true fd77::5>52:54:00:4d:00:05,true")
	if len(rec.changed) != 6 {
		t.Fatalf("SetPeers ran %q, want 2 forwarding and 3 neighbour entries added, 1 removed", rec.changed)
	}
	rec.changed = nil
	if err := setPeers(ctx, rec.run, cfg, entries); err != nil || len(rec.changed) != 0 {
		t.Fatalf("second SetPeers: %v, ran %q; want nothing changed", err, rec.changed)
	}

	// .5 moves to this host, .6 to another; .7 leaves for .3's host.
	entries[0].Endpoint, entries[1].Endpoint = cfg.Local, cfg.Local
	entries[2].Endpoint = addr("10.251.0.4")
	entries[3].Endpoint = addr("10.251.0.3")
	rec.changed = nil
	if err := setPeers(ctx, rec.run, cfg, entries); err != nil {
		t.Fatal(err)
	}
	checkPeers("52:54:00:4d:00:06>10.251.0.4 52:54:00:4d:00:07>10.251.0.3",
		"10.77.0.6>52:54:00:4d:00:06,true 10.77.0.7>52:54:00:4d:00:07,true")
	t.Logf("the move: %s", strings.Join(rec.changed, "; "))

	// The host's port: the bridge's MAC and address, kept when a port
	// with a lower MAC joins; once in place nothing changes; a new
	// address replaces it, and strays go; ClearPort leaves none.
	checkPort := func(wantMAC string, want ...netip.Prefix) {
		t.Helper()
		full, _ := cfg.withDefaults()
		br, ok, err := (host{cfg: full, run: execRun}).bridgeAddrs(ctx)
		if err != nil || !ok || br.MAC != wantMAC || !slices.Equal(br.ours(), want) {
			t.Fatalf("bridge (%t, %v): MAC %s, addresses %v; want %s, %v", ok, err, br.MAC, br.ours(), wantMAC, want)
		}
	}
	port := netip.MustParsePrefix("10.77.0.3/24")
	if err := SetPort(ctx, cfg, port, mac("02:4c:00:00:00:03")); err != nil {
		t.Fatal(err)
	}
	mustRun(t, prefix, "ip", "link", "add", "tp0", "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", "tp1")
	mustRun(t, prefix, "ip", "link", "set", "tp0", "master", "loombr42", "up")
	checkPort("02:4c:00:00:00:03", port)
	rec.changed = nil
	if err := setPort(ctx, rec.run, cfg, port, mac("02:4c:00:00:00:03")); err != nil || len(rec.changed) != 0 {
		t.Fatalf("second SetPort: %v, ran %q; want nothing changed", err, rec.changed)
	}
	// A stray secondary address of the port's subnet goes too.
	mustRun(t, prefix, "ip", "addr", "add", "10.77.0.9/24", "dev", "loombr42")
	port = netip.MustParsePrefix("10.77.0.4/24")
	if err := SetPort(ctx, cfg, port, mac("02:4c:00:00:00:03")); err != nil {
		t.Fatal(err)
	}
	checkPort("02:4c:00:00:00:03", port)
	// The port's address behind a stray primary, which takes it along.
	if err := ClearPort(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	mustRun(t, prefix, "ip", "addr", "add", "10.77.0.9/24", "dev", "loombr42")
	mustRun(t, prefix, "ip", "addr", "add", port.String(), "dev", "loombr42")
	if err := SetPort(ctx, cfg, port, mac("02:4c:00:00:00:03")); err != nil {
		t.Fatal(err)
	}
	checkPort("02:4c:00:00:00:03", port)
	mustRun(t, prefix, "ip", "addr", "add", "10.77.0.9/24", "dev", "loombr42")
	for range 2 {
		if err := ClearPort(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	checkPort("02:4c:00:00:00:03")

	// The host's endpoint changes: the device is rebuilt, empty.
	mustRun(t, prefix, "ip", "addr", "add", "10.251.0.11/24", "dev", "ul0")
	moved := cfg
	moved.Local = addr("10.251.0.11")
	if err := Ensure(ctx, moved); err != nil {
		t.Fatal(err)
	}
	if got := mustRun(t, prefix, "ip", "-d", "link", "show", "loomvx42"); !strings.Contains(got, "local 10.251.0.11") || !strings.Contains(got, "master loombr42") {
		t.Fatalf("after Ensure with a new endpoint:\n%s", got)
	}
	cfg = moved
	checkPeers("", "")
	if err := SetPeers(ctx, cfg, entries); err != nil {
		t.Fatal(err)
	}

	// Someone else's device where the bridge should be.
	other := Config{Prefix: prefix, VNI: 43, Local: cfg.Local, Bridge: "ul1"}
	if err := Ensure(ctx, other); err == nil || !strings.Contains(err.Error(), "veth") {
		t.Fatalf("Ensure onto a veth: %v, want ErrForeignDevice", err)
	}

	for range 2 {
		if err := Remove(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	if got := mustRun(t, prefix, "ip", "-br", "link"); strings.Contains(got, "loom") {
		t.Fatalf("after Remove:\n%s", got)
	}
	if err := SetPeers(ctx, cfg, entries); err == nil || !strings.Contains(err.Error(), "loomvx42") {
		t.Fatalf("SetPeers without the device: %v, want the failed command", err)
	}
}
