//go:build integration

package libvirt_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
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

// A checkpoint with memory of a running guest, then a disk-only one; the
// guest runs on, is destroyed, and is restored from the first checkpoint's
// memory onto a new overlay of the layer that checkpoint froze: its
// heartbeat goes back to the checkpoint's count and goes on from there.
// Libvirt keeps no snapshot metadata, and the restored domain stays
// persistent with its definition on the new overlay.
func TestQEMU_CheckpointRestore(t *testing.T) {
	guest := libvirttest.Guest(t)
	socket := libvirttest.StartDaemon(t, 201)
	ctx := context.Background()
	c, err := libvirt.Dial(ctx, libvirt.Config{Socket: socket, URI: "qemu:///system", RPCTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })

	const name = "ckpt"
	dir := libvirttest.VMDir(t)
	base := filepath.Join(guest, "base.qcow2")
	file := func(leaf string) string { return filepath.Join(dir, leaf) }
	overlay := file("top1.qcow2")
	qemuImgOverlay(t, base, overlay)
	serial := file("serial")
	spec := libvirt.DomainSpec{Name: name, MemoryMiB: 128, DiskPath: overlay, SerialPath: serial,
		Kernel: filepath.Join(guest, "vmlinuz"), Initrd: filepath.Join(guest, "initrd.gz"), Cmdline: "console=ttyS0 quiet"}
	if err := c.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Destroy(ctx, name)
		_ = c.Undefine(ctx, name)
	})
	step := time.Now()
	if err := c.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 90*time.Second, func() error {
		if n := heartbeat(t, serial); n < 3 {
			return fmt.Errorf("heartbeat %d", n)
		}
		return nil
	})
	t.Logf("boot to heartbeat 3: %s", since(step))

	// A checkpoint with memory: top1 freezes, the guest goes on on top2.
	top2, memory := file("top2.qcow2"), file("ck1.mem")
	step = time.Now()
	if err := c.TakeSnapshot(ctx, name, libvirt.Snapshot{Name: "ck1", Overlay: top2, Memory: memory}); err != nil {
		t.Fatal(err)
	}
	took := since(step)
	checkpoint := heartbeat(t, serial)
	t.Logf("TakeSnapshot with memory: %s, at heartbeat %d, memory file %d MiB", took, checkpoint, fileSize(t, memory)>>20)
	checkTop(t, c, name, top2, overlay, base)
	if got, err := c.SaveImageDisk(ctx, memory); err != nil || got != overlay {
		t.Fatalf("the memory file's domain XML names %q (%v), want the frozen layer %s", got, err, overlay)
	}

	// A disk-only checkpoint while running: top2 freezes, the guest goes on on top3.
	top3 := file("top3.qcow2")
	step = time.Now()
	if err := c.TakeSnapshot(ctx, name, libvirt.Snapshot{Name: "ck2", Overlay: top3}); err != nil {
		t.Fatal(err)
	}
	t.Logf("TakeSnapshot disk-only: %s", since(step))
	checkTop(t, c, name, top3, top2, overlay, base)

	waitFor(t, 30*time.Second, func() error {
		if n := heartbeat(t, serial); n < checkpoint+3 {
			return fmt.Errorf("heartbeat %d, checkpoint at %d", n, checkpoint)
		}
		return nil
	})
	step = time.Now()
	if err := c.Destroy(ctx, name); err != nil {
		t.Fatal(err)
	}
	t.Logf("Destroy: %s", since(step))
	before := heartbeat(t, serial)
	restoredFrom := fileSize(t, serial)

	// Restore ck1 onto a new overlay of the layer it froze.
	restored := file("restored1.qcow2")
	step = time.Now()
	qemuImgOverlay(t, overlay, restored)
	t.Logf("qemu-img create on the frozen layer: %s", since(step))
	step = time.Now()
	if err := c.RestoreMemory(ctx, memory, restored, false); err != nil {
		t.Fatal(err)
	}
	t.Logf("RestoreMemory: %s", since(step))
	if d, err := c.Lookup(ctx, name); err != nil || d.State != libvirt.StateRunning {
		t.Fatalf("after RestoreMemory: %+v, %v; want running", d, err)
	}
	var counts []int
	waitFor(t, 30*time.Second, func() error {
		if counts = heartbeatsSince(t, serial, restoredFrom); len(counts) < 2 {
			return fmt.Errorf("heartbeats since the restore: %v", counts)
		}
		return nil
	})
	t.Logf("heartbeat %d at the checkpoint, %d before the restore, %v after it (%s after RestoreMemory)",
		checkpoint, before, counts, since(step))
	if first := counts[0]; first > checkpoint+2 || first >= before {
		t.Fatalf("first heartbeat after the restore is %d; want <= %d (checkpoint + 2) and < %d (before the restore)",
			first, checkpoint+2, before)
	}
	checkTop(t, c, name, restored, overlay, base)

	// The persistent definition is on the new overlay, too.
	if err := c.Destroy(ctx, name); err != nil {
		t.Fatal(err)
	}
	if got, err := c.DiskSource(ctx, name); err != nil || got != restored {
		t.Fatalf("persistent disk after the restore = %q, %v; want %s", got, err, restored)
	}

	// Restored paused, it stays paused.
	restored2 := file("restored2.qcow2")
	qemuImgOverlay(t, overlay, restored2)
	step = time.Now()
	if err := c.RestoreMemory(ctx, memory, restored2, true); err != nil {
		t.Fatal(err)
	}
	t.Logf("RestoreMemory paused: %s", since(step))
	if d, err := c.Lookup(ctx, name); err != nil || d.State != libvirt.StatePaused {
		t.Fatalf("after RestoreMemory paused: %+v, %v; want paused", d, err)
	}
	checkTop(t, c, name, restored2, overlay, base)
}

// checkTop checks that the named domain writes to chain[0], that the
// image's backing chain is chain, and that libvirt keeps no snapshot
// metadata for the domain.
func checkTop(t *testing.T, c *libvirt.Client, name string, chain ...string) {
	t.Helper()
	ctx := context.Background()
	if got, err := c.DiskSource(ctx, name); err != nil || got != chain[0] {
		t.Fatalf("DiskSource=%q, %v; want %s", got, err, chain[0])
	}
	out, err := exec.Command("qemu-img", "info", "-U", "--backing-chain", "--output=json", chain[0]).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", chain[0], err)
	}
	var images []struct {
		Filename string `json:"filename"`
	}
	if err := json.Unmarshal(out, &images); err != nil {
		t.Fatalf("qemu-img info %s: %v", chain[0], err)
	}
	got := make([]string, len(images))
	for i, image := range images {
		got[i] = image.Filename
	}
	if !slices.Equal(got, chain) {
		t.Fatalf("backing chain %v, want %v", got, chain)
	}
	if n, err := c.SnapshotCount(ctx, name); err != nil || n != 0 {
		t.Fatalf("libvirt keeps %d snapshots (%v), want 0", n, err)
	}
}

// heartbeatsSince returns the counters the tiny guest printed on its
// serial console after the first offset bytes.
func heartbeatsSince(t *testing.T, serial string, offset int64) []int {
	t.Helper()
	data, err := os.ReadFile(serial)
	if err != nil {
		t.Fatal(err)
	}
	var counts []int
	for _, m := range regexp.MustCompile(`loom-heartbeat (\d+)\r?\n`).FindAllSubmatch(data[offset:], -1) {
		n, _ := strconv.Atoi(string(m[1]))
		counts = append(counts, n)
	}
	return counts
}

// qemuImgOverlay creates a qcow2 overlay on backing.
func qemuImgOverlay(t *testing.T, backing, overlay string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create %s: %v\n%s", overlay, err, out)
	}
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return info.Size()
}

func since(start time.Time) time.Duration {
	return time.Since(start).Round(time.Millisecond)
}
