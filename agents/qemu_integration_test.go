//go:build integration

package agents

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus/bustest"
)

// A real guest through the agent: on a QEMU host, a goal naming the tiny
// guest's image gets a qcow2 overlay on that image, a domain booted from
// the image's kernel, and progress reports up to "guest alive", seen on the
// serial heartbeat; an absent goal destroys it and removes its files.
func TestAgent_QEMUGuestFromImage(t *testing.T) {
	guest := libvirttest.Guest(t)
	b := bustest.Start(t)
	socket := libvirttest.StartDaemon(t, indexQEMU)
	storage := libvirttest.VMDir(t)
	cfg := testConfig(t, b, "q1")
	cfg.TTL = 5 * time.Second
	cfg.StorageDir, cfg.AliveMarker = storage, "loom-heartbeat"
	cfg.Dial = func(ctx context.Context) (Hypervisor, error) {
		c, err := libvirt.Dial(ctx, libvirt.Config{Socket: socket, URI: "qemu:///system", RPCTimeout: time.Minute})
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	startAgent(t, cfg)

	uid := events.DeriveUID("t", "tiny")
	goal := goalOf("q1", "tiny", uid, events.DesiredRunning, 10)
	goal.Spec.MemoryMiB = 128
	goal.Spec.Disk = &events.ImageDisk{Source: filepath.Join(guest, "base.qcow2"), Format: "qcow2",
		Boot: &events.ImageBoot{Kernel: filepath.Join(guest, "vmlinuz"), Initrd: filepath.Join(guest, "initrd.gz"), Cmdline: "console=ttyS0 quiet"}}
	publishGoal(t, b.JS, goal)
	waitObservedWithin(t, 2*time.Minute, b.JS, "q1", "tiny", 10, events.ObservedRunning)

	overlay := filepath.Join(storage, "tiny-"+uid+".qcow2")
	out, err := exec.Command("qemu-img", "info", "-U", overlay).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "backing file: "+goal.Spec.Disk.Source) {
		t.Fatalf("the VM's disk is not an overlay on its image: %v\n%s", err, out)
	}
	var alive events.VMProgress
	waitFor(t, 90*time.Second, func() error {
		for _, rec := range records(t, b.JS, vmSubject("q1", "tiny")) {
			if p, ok := rec.Event.(events.VMProgress); ok && p.Step == StepGuestAlive {
				alive = p
				return nil
			}
		}
		return fmt.Errorf("no guest-alive progress yet")
	})
	t.Logf("guest alive %d ms after start", alive.Done)

	absent := goalOf("q1", "tiny", uid, events.DesiredAbsent, 20)
	absent.AbsentReason = events.AbsentDeleted
	publishGoal(t, b.JS, absent)
	waitObservedWithin(t, time.Minute, b.JS, "q1", "tiny", 20, events.ObservedAbsent)
	for _, f := range []string{overlay, filepath.Join(storage, "tiny-"+uid+".serial")} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s left behind (%v)", f, err)
		}
	}
}
