//go:build integration

package libvirt_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
)

// A running guest live-migrates between two libvirtd daemons (own network
// namespaces, one file system) with its local disk copied: it runs on the
// target from a disk the target's libvirt created in its pool, persistent
// there, gone from the source, and its heartbeat on the serial console
// (the same file on both) goes on counting across the move. The target
// keeps libvirt's downtime figure. A migration to a daemon that does not
// answer, and one cancelled mid-way, leave it running where it was on the
// disk it had; a retry onto the file the cancelled one left behind works.
func TestQEMU_LiveMigration(t *testing.T) {
	guest := libvirttest.Guest(t)
	socket1 := libvirttest.StartDaemon(t, 210)
	socket2 := libvirttest.StartDaemon(t, 211)
	ctx := context.Background()
	host1, host2 := dialQEMU(t, socket1), dialQEMU(t, socket2)

	const name = "mig"
	srcDir, dstDir, backDir := libvirttest.VMDir(t), libvirttest.VMDir(t), libvirttest.VMDir(t)
	sockets := libvirttest.SocketDir(t) // the target QEMU creates its listening sockets here
	overlay := filepath.Join(srcDir, "disk.qcow2")
	qemuImgOverlay(t, filepath.Join(guest, "base.qcow2"), overlay)
	serial := filepath.Join(srcDir, "serial")
	spec := libvirt.DomainSpec{Name: name, MemoryMiB: 128, DiskPath: overlay, SerialPath: serial,
		Kernel: filepath.Join(guest, "vmlinuz"), Initrd: filepath.Join(guest, "initrd.gz"), Cmdline: "console=ttyS0 quiet"}
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
	// While the guest boots: the target's first QEMU call probes QEMU's
	// capabilities (about 3 s here), which a host's daemon has done long
	// before a migration arrives.
	warmCapabilities(t, socket2)
	waitFor(t, 90*time.Second, func() error {
		if n := heartbeat(t, serial); n < 3 {
			return fmt.Errorf("heartbeat %d", n)
		}
		return nil
	})
	t.Logf("boot to heartbeat 3: %s", since(step))

	// The target's agent makes its storage directory a pool, so that its
	// libvirt creates the missing destination disk.
	step = time.Now()
	for range 2 { // idempotent
		if err := host2.EnsureDirPool(ctx, "loom", dstDir); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("EnsureDirPool twice: %s", since(step))
	if err := host2.EnsureDirPool(ctx, "loom", backDir); err == nil {
		t.Fatal("EnsureDirPool accepted the pool loom on another directory")
	}

	destDisk := filepath.Join(dstDir, "mig.qcow2")
	toHost2 := libvirt.Migration{
		DestURI:  "qemu+unix:///system?socket=" + socket2,
		DataURI:  "unix://" + filepath.Join(sockets, "memory-1.sock"),
		DisksURI: "unix://" + filepath.Join(sockets, "disk-1.sock"),
		DestDisk: destDisk,
	}
	before := heartbeat(t, serial)
	step = time.Now()
	samples, err := migrateWatched(ctx, t, host1, name, toHost2, nil)
	took := since(step)
	if err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	t.Logf("Migrate: %s (heartbeat %d before), %d progress samples", took, before, len(samples))
	logSamples(t, samples)
	if !slices.ContainsFunc(samples, func(p libvirt.MigrationProgress) bool { return p.DataTotal > 0 && p.MemoryTotal > 0 }) {
		t.Errorf("no progress sample reported memory and data totals: %+v", samples)
	}

	// On the target: running, persistent, on the new disk in both
	// definitions; gone from the source.
	if d, err := host2.Lookup(ctx, name); err != nil || d.State != libvirt.StateRunning {
		t.Fatalf("on the target: %+v, %v; want running", d, err)
	} else {
		t.Logf("on the target: %s, reason %d", d.State, d.Reason)
	}
	if _, err := host1.Lookup(ctx, name); !errors.Is(err, libvirt.ErrNotFound) {
		t.Fatalf("on the source after the migration: %v; want ErrNotFound", err)
	}
	live, persistent, isPersistent, err := host2.DomainXML(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if !isPersistent {
		t.Error("the domain is transient on the target")
	}
	for what, domXML := range map[string]string{"live": live, "persistent": persistent} {
		if got, err := libvirt.DiskFileOf(domXML); err != nil || got != destDisk {
			t.Errorf("target's %s definition: vda on %q (%v), want %s", what, got, err, destDisk)
		}
		if got := serialPath(domXML); got != serial {
			t.Errorf("target's %s definition: serial on %q, want %s", what, got, serial)
		}
	}
	t.Logf("target disk as libvirt created it: %s", imageInfo(t, destDisk))

	// The guest did not restart: its counter goes on in the same file.
	waitFor(t, 30*time.Second, func() error {
		if n := heartbeat(t, serial); n < before+4 {
			return fmt.Errorf("heartbeat %d, %d before the migration", n, before)
		}
		return nil
	})
	checkCounting(t, serial)

	// Libvirt's figures stay on the target; reading them keeps them.
	for range 2 {
		stats, err := host2.CompletedMigration(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("CompletedMigration: total %s, downtime %s (%s without network), setup %s, memory %d of %d MiB sent in %d passes at %d MiB/s",
			stats.Total, stats.Downtime, stats.DowntimeNet, stats.Setup, stats.MemoryProcessed>>20, stats.MemoryTotal>>20,
			stats.MemoryPasses, stats.MemoryBytesPerSecond>>20)
		if stats.Downtime <= 0 || stats.Total <= stats.Downtime {
			t.Fatalf("CompletedMigration: downtime %s of total %s", stats.Downtime, stats.Total)
		}
	}
	if _, err := host1.CompletedMigration(ctx, name); !errors.Is(err, libvirt.ErrNotFound) {
		t.Fatalf("CompletedMigration on the source: %v; want ErrNotFound", err)
	}

	// A target that does not answer: the domain stays where it is.
	step = time.Now()
	err = host2.Migrate(ctx, name, libvirt.Migration{
		DestURI:  "qemu+unix:///system?socket=" + filepath.Join(sockets, "nobody-sock"),
		DestDisk: filepath.Join(backDir, "mig.qcow2"),
	})
	t.Logf("Migrate to nobody: %s: %v", since(step), err)
	if err == nil {
		t.Fatal("Migrate to a socket nobody listens on succeeded")
	}
	checkStayed(t, host2, host1, name, destDisk)

	// Cancelled mid-way (slowed down so that there is a mid-way): the job
	// is aborted and the domain stays where it is.
	if err := host1.EnsureDirPool(ctx, "loom", backDir); err != nil {
		t.Fatal(err)
	}
	backDisk := filepath.Join(backDir, "mig.qcow2")
	toHost1 := libvirt.Migration{
		DestURI:  "qemu+unix:///system?socket=" + socket1,
		DataURI:  "unix://" + filepath.Join(sockets, "memory-2.sock"),
		DisksURI: "unix://" + filepath.Join(sockets, "disk-2.sock"),
		DestDisk: backDisk,
	}
	slow := toHost1
	slow.Bandwidth = 1 // MiB/s
	cancelCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var cancelled time.Time
	step = time.Now()
	samples, err = migrateWatched(cancelCtx, t, host2, name, slow, func(p libvirt.MigrationProgress) {
		if p.DataProcessed > 0 && cancelled.IsZero() {
			cancelled = time.Now()
			cancel()
		}
	})
	t.Logf("Migrate cancelled: %s, %s after the cancel: %v", since(step), since(cancelled), err)
	logSamples(t, samples)
	if !slices.ContainsFunc(samples, func(p libvirt.MigrationProgress) bool { return p.Failing }) {
		t.Errorf("no progress sample showed the aborted migration winding down")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Migrate: %v; want context.Canceled", err)
	}
	checkStayed(t, host2, host1, name, destDisk)
	left, statErr := os.Stat(backDisk)
	t.Logf("left on the target by the cancelled migration: %s (%v)", backDisk, statErr)

	// A retry onto the file the cancelled migration left behind.
	if statErr == nil {
		t.Logf("its size: %d bytes; %s", left.Size(), imageInfo(t, backDisk))
	}
	if err := host1.EnsureDirPool(ctx, "loom", backDir); err != nil {
		t.Fatal(err)
	}
	toHost1.DataURI = "unix://" + filepath.Join(sockets, "memory-3.sock")
	toHost1.DisksURI = "unix://" + filepath.Join(sockets, "disk-3.sock")
	before = heartbeat(t, serial)
	step = time.Now()
	if err := host1.Migrate(ctx, name, libvirt.Migration{}); !errors.Is(err, libvirt.ErrInvalidMigration) {
		t.Fatalf("Migrate with no destination: %v; want ErrInvalidMigration", err)
	}
	if err := host2.Migrate(ctx, name, toHost1); err != nil {
		t.Fatalf("Migrate back: %v", err)
	}
	t.Logf("Migrate back onto the leftover file: %s", since(step))
	if got, err := host1.DiskSource(ctx, name); err != nil || got != backDisk {
		t.Fatalf("back on host 1: vda on %q (%v), want %s", got, err, backDisk)
	}
	waitFor(t, 30*time.Second, func() error {
		if n := heartbeat(t, serial); n < before+3 {
			return fmt.Errorf("heartbeat %d, %d before the migration back", n, before)
		}
		return nil
	})
	checkCounting(t, serial)
}

// dialQEMU connects to the QEMU driver of the daemon at socket.
func dialQEMU(t *testing.T, socket string) *libvirt.Client {
	t.Helper()
	c, err := libvirt.Dial(context.Background(), libvirt.Config{Socket: socket, URI: "qemu:///system", RPCTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// warmCapabilities has the daemon at socket probe QEMU's capabilities.
func warmCapabilities(t *testing.T, socket string) {
	t.Helper()
	if out, err := exec.Command("virsh", "-q", "-c", "qemu+unix:///system?socket="+socket, "capabilities").CombinedOutput(); err != nil {
		t.Fatalf("virsh capabilities: %v\n%s", err, out)
	}
}

// migrateWatched runs Migrate while another goroutine samples its
// progress every 100 ms, handing each sample of an active or failing
// migration to watch (if set).
func migrateWatched(ctx context.Context, t *testing.T, c *libvirt.Client, name string, m libvirt.Migration,
	watch func(libvirt.MigrationProgress)) ([]libvirt.MigrationProgress, error) {
	t.Helper()
	pollCtx, stop := context.WithCancel(context.Background())
	var (
		wg      sync.WaitGroup
		samples []libvirt.MigrationProgress
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			p, err := c.MigrationProgress(pollCtx, name)
			if err == nil && (p.Active || p.Failing) {
				samples = append(samples, p)
				if watch != nil {
					watch(p)
				}
			}
			select {
			case <-pollCtx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	err := c.Migrate(ctx, name, m)
	stop()
	wg.Wait()
	return samples, err
}

// logSamples logs the first and the last progress sample, and those
// where the copy moved on or the migration began to fail.
func logSamples(t *testing.T, samples []libvirt.MigrationProgress) {
	t.Helper()
	for i, p := range samples {
		if i > 0 && i < len(samples)-1 && p.DataProcessed == samples[i-1].DataProcessed && p.Failing == samples[i-1].Failing {
			continue
		}
		if !p.Active {
			t.Logf("  progress: failing=%t", p.Failing)
			continue
		}
		t.Logf("  progress %5.1f%% at %s: data %d/%d KiB left, memory %d/%d KiB left (pass %d, %d KiB/s, dirty %d KiB/s), disk %d/%d KiB left",
			100*p.Fraction(), p.Elapsed, p.DataRemaining>>10, p.DataTotal>>10, p.MemoryRemaining>>10, p.MemoryTotal>>10,
			p.MemoryPasses, p.MemoryBytesPerSecond>>10, p.DirtyBytesPerSecond>>10, p.DiskRemaining>>10, p.DiskTotal>>10)
	}
}

// checkStayed checks that the named domain still runs on source from disk,
// its guest still counting, and that target has no such domain.
func checkStayed(t *testing.T, source, target *libvirt.Client, name, disk string) {
	t.Helper()
	ctx := context.Background()
	if d, err := source.Lookup(ctx, name); err != nil || d.State != libvirt.StateRunning {
		t.Fatalf("on the source after a failed migration: %+v, %v; want running", d, err)
	}
	if got, err := source.DiskSource(ctx, name); err != nil || got != disk {
		t.Fatalf("on the source after a failed migration: vda on %q (%v), want %s", got, err, disk)
	}
	if _, err := target.Lookup(ctx, name); !errors.Is(err, libvirt.ErrNotFound) {
		t.Fatalf("on the target after a failed migration: %v; want ErrNotFound", err)
	}
}

// checkCounting checks that every heartbeat in the serial log is one more
// than the one before: the guest never restarted and none was lost.
func checkCounting(t *testing.T, serial string) {
	t.Helper()
	counts := heartbeatsSince(t, serial, 0)
	for i := 1; i < len(counts); i++ {
		if counts[i] != counts[i-1]+1 {
			t.Fatalf("heartbeat %d follows %d in %v", counts[i], counts[i-1], counts)
		}
	}
	t.Logf("heartbeats 1..%d in order in %s", counts[len(counts)-1], serial)
}

// serialPath returns the file the first serial port of domain XML writes to.
func serialPath(domXML string) string {
	m := regexp.MustCompile(`<serial type='file'>\s*<source path='([^']*)'`).FindStringSubmatch(domXML)
	if m == nil {
		return ""
	}
	return m[1]
}

// imageInfo describes a disk image as qemu-img sees it.
func imageInfo(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	var info struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual-size"`
		ActualSize  int64  `json:"actual-size"`
		Backing     string `json:"backing-filename"`
		Specific    struct {
			Data struct {
				Compat string `json:"compat"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	return fmt.Sprintf("format %s (compat %s), virtual %d MiB, allocated %d MiB, backing file %q",
		info.Format, info.Specific.Data.Compat, info.VirtualSize>>20, info.ActualSize>>20, info.Backing)
}
