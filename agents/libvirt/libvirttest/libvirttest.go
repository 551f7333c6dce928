// Package libvirttest starts real, private libvirtd instances for tests, using
// ops/libvirt/host.sh, and links their network namespaces (Underlay). It
// needs root and ops/libvirt/install.sh.
package libvirttest

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// idleExitSeconds makes a daemon leaked by a killed test binary exit by itself
// once no client is connected.
const idleExitSeconds = "300"

// StartDaemon starts an independent libvirtd (own mount and network
// namespace) for index (0-255; distinct indexes get distinct host UUIDs) and
// returns its socket path. The daemon is stopped and its directory removed in
// t.Cleanup. A missing libvirtd fails the test: it never skips.
//
// With test:///default the simulated host resets whenever its last connection
// closes, so hold one connection open for as long as the test needs its state.
func StartDaemon(t testing.TB, index int) (socket string) {
	t.Helper()
	script := filepath.Join(repoRoot(t), "ops", "libvirt", "host.sh")
	if _, err := exec.LookPath("libvirtd"); err != nil {
		t.Fatalf("libvirtd not found in PATH (%v); run ops/libvirt/install.sh as root first", err)
	}
	// Not t.TempDir: unix socket paths must fit in 107 bytes, and test
	// names can be long.
	dir, err := os.MkdirTemp("/tmp", "loom-libvirtd-")
	if err != nil {
		t.Fatalf("create libvirtd dir: %v", err)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(script, "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("stop libvirtd in %s: %v\n%s", dir, err, out)
			return // keep the dir for inspection
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove libvirtd dir: %v", err)
		}
	})

	cmd := exec.Command(script, "start", dir, fmt.Sprint(index))
	cmd.Env = append(os.Environ(), "LOOM_LIBVIRTD_IDLE_EXIT="+idleExitSeconds)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("start libvirtd %d in %s: %v\n%s%s", index, dir, err, stdout.String(), stderr.String())
	}
	socket = strings.TrimSpace(stdout.String())
	if socket == "" {
		t.Fatalf("start libvirtd %d in %s: host.sh printed no socket path\n%s", index, dir, stderr.String())
	}
	return socket
}

// repoRoot walks up from the working directory to the directory holding go.mod.
func repoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("find repo root: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		} else if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("find repo root: %v", err)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("find repo root: no go.mod above the working directory")
		}
		dir = parent
	}
}

// Kill kills the libvirtd serving socket with SIGKILL, as a crash would:
// the domains of its test driver die with it. StartDaemon's cleanup then
// finds it gone.
func Kill(t testing.TB, socket string) {
	t.Helper()
	pid, err := daemonPID(socket)
	if err != nil {
		t.Fatalf("kill libvirtd of %s: %v", socket, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill libvirtd %d: %v", pid, err)
	}
}

// daemonPID reads the pid file of the libvirtd serving socket
// (DIR/run/libvirt-sock, pid in DIR/libvirtd.pid).
func daemonPID(socket string) (int, error) {
	data, err := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(socket)), "libvirtd.pid"))
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		return 0, fmt.Errorf("pid file: %w", err)
	}
	return pid, nil
}

// GuestDir is where Guest keeps the tiny guest between runs.
const GuestDir = "/var/cache/loom/guest"

// Guest is the tiny guest Loom's QEMU tests boot (ops/qemu/guest.sh): a
// directory holding vmlinuz, initrd.gz (a busybox init that prints
// "loom-heartbeat N" on ttyS0 every second, powers off on ACPI, and with
// loom.ip=ADDR/PREFIX on the kernel command line brings eth0 up with that
// address) and base.qcow2. It is built on first use, and rebuilt when
// guest.sh's version changes; a failure fails the test.
func Guest(t testing.TB) (dir string) {
	t.Helper()
	script := filepath.Join(repoRoot(t), "ops", "qemu", "guest.sh")
	if out, err := exec.Command(script, GuestDir).CombinedOutput(); err != nil {
		t.Fatalf("build the tiny guest: %v\n%s", err, out)
	}
	return GuestDir
}

// VMDir makes a directory for a QEMU guest's files (its overlay, its serial
// log) that the QEMU process, which runs as libvirt-qemu, can reach; it is
// removed in t.Cleanup.
func VMDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "loom-vm-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// SocketDir makes a directory QEMU (user libvirt-qemu) can create sockets
// in, such as a migration's incoming memory and disk streams; it is
// removed in t.Cleanup.
func SocketDir(t testing.TB) string {
	t.Helper()
	dir := VMDir(t)
	qemu, err := user.Lookup("libvirt-qemu")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(qemu.Uid)
	gid, _ := strconv.Atoi(qemu.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The underlay network Underlay builds.
const (
	// UnderlayBridge is the root network namespace's bridge all daemons'
	// underlay links join. It is created on first use and left in place.
	UnderlayBridge = "loomul0"
	// UnderlayGateway is UnderlayBridge's own address: the root namespace
	// reaches the daemons' endpoints through it.
	UnderlayGateway = "10.250.0.1/16"
	// UnderlayDevice is the underlay link inside a daemon's namespace.
	UnderlayDevice = "ul0"
	// UnderlayMTU leaves room for a VXLAN header (50 bytes) on top of
	// 1500-byte frames.
	UnderlayMTU = 1550
)

// Underlay links the network namespace of the libvirtd serving socket
// (started by StartDaemon, whose namespace has only lo) to the other
// daemons' namespaces and to the root namespace, as hosts are linked by
// their network: a veth pair with the root end (loomul0-INDEX) on
// UnderlayBridge and the other end in the daemon's namespace, named
// UnderlayDevice, up, with address 10.250.1.INDEX/16 (INDEX is the
// daemon's index). It returns that address, the device's name, and the
// command prefix (nsenter) that runs a command in the daemon's network
// namespace. Both ends are removed in t.Cleanup; UnderlayBridge stays.
// Call it once per daemon.
func Underlay(t testing.TB, socket string) (endpoint netip.Addr, dev string, prefix []string) {
	t.Helper()
	pid, err := daemonPID(socket)
	if err != nil {
		t.Fatalf("underlay for %s: %v", socket, err)
	}
	index, err := daemonIndex(socket)
	if err != nil {
		t.Fatalf("underlay for %s: %v", socket, err)
	}
	endpoint = netip.AddrFrom4([4]byte{10, 250, 1, byte(index)})
	prefix = []string{"nsenter", "-t", strconv.Itoa(pid), "-n"}
	port := fmt.Sprintf("%s-%d", UnderlayBridge, index)
	mtu := strconv.Itoa(UnderlayMTU)

	ensureUnderlayBridge(t)
	if exec.Command("ip", "link", "show", "dev", port).Run() == nil {
		// Left by a test binary that died; its daemon has the same index.
		runIP(t, nil, "link", "del", port)
	}
	runIP(t, nil, "link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", UnderlayDevice, "mtu", mtu,
		"netns", strconv.Itoa(pid))
	t.Cleanup(func() {
		// Deleting one end deletes both; the namespace may be gone already.
		if exec.Command("ip", "link", "show", "dev", port).Run() == nil {
			if out, err := exec.Command("ip", "link", "del", port).CombinedOutput(); err != nil {
				t.Errorf("remove underlay link %s: %v: %s", port, err, out)
			}
		}
	})
	runIP(t, nil, "link", "set", port, "master", UnderlayBridge, "up")
	runIP(t, prefix, "addr", "add", endpoint.String()+"/16", "dev", UnderlayDevice)
	runIP(t, prefix, "link", "set", UnderlayDevice, "up")
	return endpoint, UnderlayDevice, prefix
}

// ensureUnderlayBridge creates UnderlayBridge with its address, or finds
// it; test binaries of other packages may do the same at the same time.
func ensureUnderlayBridge(t testing.TB) {
	t.Helper()
	if exec.Command("ip", "link", "show", "dev", UnderlayBridge).Run() != nil {
		out, err := exec.Command("ip", "link", "add", UnderlayBridge, "mtu", strconv.Itoa(UnderlayMTU), "type", "bridge").CombinedOutput()
		if err != nil && exec.Command("ip", "link", "show", "dev", UnderlayBridge).Run() != nil {
			t.Fatalf("create %s: %v: %s", UnderlayBridge, err, out)
		}
	}
	runIP(t, nil, "addr", "replace", UnderlayGateway, "dev", UnderlayBridge)
	runIP(t, nil, "link", "set", UnderlayBridge, "up")
}

// runIP runs ip with args behind prefix, failing the test on an error.
func runIP(t testing.TB, prefix []string, args ...string) {
	t.Helper()
	argv := append(append(append([]string(nil), prefix...), "ip"), args...)
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
	}
}

// hostUUIDIndex finds the index host.sh wrote into a daemon's host_uuid
// (%08x-0000-4000-8000-%012x, the index twice).
var hostUUIDIndex = regexp.MustCompile(`(?m)^host_uuid = "([0-9a-f]{8})-0000-4000-8000-`)

// daemonIndex reads back the index the daemon serving socket was started
// with, from its libvirtd.conf.
func daemonIndex(socket string) (int, error) {
	conf := filepath.Join(filepath.Dir(filepath.Dir(socket)), "libvirtd.conf")
	data, err := os.ReadFile(conf)
	if err != nil {
		return 0, err
	}
	m := hostUUIDIndex.FindSubmatch(data)
	if m == nil {
		return 0, fmt.Errorf("%s: no host_uuid written by host.sh", conf)
	}
	index, err := strconv.ParseUint(string(m[1]), 16, 8)
	if err != nil {
		return 0, fmt.Errorf("%s: host_uuid: %w", conf, err)
	}
	return int(index), nil
}
