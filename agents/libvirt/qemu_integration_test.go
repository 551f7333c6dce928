//go:build integration

package libvirt_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
)

// heartbeat is the last counter the tiny guest printed on its serial
// console, 0 before the first.
func heartbeat(t *testing.T, serial string) int {
	t.Helper()
	data, err := os.ReadFile(serial)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`loom-heartbeat (\d+)`).FindAllSubmatch(data, -1)
	if len(m) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(string(m[len(m)-1][1]))
	return n
}

// A real guest under QEMU (software emulation): booted from the tiny
// guest's kernel and initramfs on a qcow2 overlay of its image, it prints
// its heartbeat on the serial console; paused, the heartbeat stops, and
// resumed it goes on from where it was; an ACPI shutdown powers it off.
func TestQEMU_TinyGuestLifecycle(t *testing.T) {
	guest := libvirttest.Guest(t)
	socket := libvirttest.StartDaemon(t, 200)
	ctx := context.Background()
	c, err := libvirt.Dial(ctx, libvirt.Config{Socket: socket, URI: "qemu:///system", RPCTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })

	dir := libvirttest.VMDir(t)
	overlay := filepath.Join(dir, "tiny.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(guest, "base.qcow2"), overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
	serial := filepath.Join(dir, "tiny.serial")
	spec := libvirt.DomainSpec{Name: "tiny", MemoryMiB: 128, DiskPath: overlay, SerialPath: serial,
		Kernel: filepath.Join(guest, "vmlinuz"), Initrd: filepath.Join(guest, "initrd.gz"), Cmdline: "console=ttyS0 quiet"}
	if err := c.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Destroy(ctx, "tiny")
		_ = c.Undefine(ctx, "tiny")
	})
	started := time.Now()
	if err := c.Start(ctx, "tiny"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 90*time.Second, func() error {
		if n := heartbeat(t, serial); n < 2 {
			return fmt.Errorf("heartbeat %d", n)
		}
		return nil
	})
	t.Logf("guest alive (heartbeat on its serial console) %s after start", time.Since(started).Round(100*time.Millisecond))

	if err := c.Suspend(ctx, "tiny"); err != nil {
		t.Fatal(err)
	}
	paused := heartbeat(t, serial)
	time.Sleep(2500 * time.Millisecond) // watching the heartbeat hold while paused: no condition to wait for
	if n := heartbeat(t, serial); n > paused+1 {
		t.Fatalf("the heartbeat went on while paused: %d -> %d", paused, n)
	}
	if err := c.Resume(ctx, "tiny"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, func() error {
		if n := heartbeat(t, serial); n < paused+2 {
			return fmt.Errorf("heartbeat %d, paused at %d", n, paused)
		}
		return nil
	})

	if err := c.Shutdown(ctx, "tiny"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, func() error {
		d, err := c.Lookup(ctx, "tiny")
		if err != nil {
			return err
		}
		if d.State != libvirt.StateShutoff {
			return fmt.Errorf("state %v after an ACPI shutdown", d.State)
		}
		return nil
	})
}
