// Package libvirttest starts real, private libvirtd instances for tests, using
// ops/libvirt/host.sh. It needs root and ops/libvirt/install.sh.
package libvirttest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
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
	dir := filepath.Dir(filepath.Dir(socket))
	data, err := os.ReadFile(filepath.Join(dir, "libvirtd.pid"))
	if err != nil {
		t.Fatalf("kill libvirtd of %s: %v", socket, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("kill libvirtd of %s: pid file: %v", socket, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill libvirtd %d: %v", pid, err)
	}
}

// GuestDir is where Guest keeps the tiny guest between runs.
const GuestDir = "/var/cache/loom/guest"

// Guest is the tiny guest Loom's QEMU tests boot (ops/qemu/guest.sh): a
// directory holding vmlinuz, initrd.gz (a busybox init that prints
// "loom-heartbeat N" on ttyS0 every second and powers off on ACPI) and
// base.qcow2. It is built on first use; a failure fails the test.
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
