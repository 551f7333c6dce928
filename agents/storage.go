package agents

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/loomctl/loom/events"
)

// Disks from images. On a host with Config.StorageDir (a QEMU host), each
// VM whose goal names its image's disk gets a copy-on-write qcow2 overlay
// on that image, <StorageDir>/<vm>-<uid>.qcow2, made before the domain is
// first defined; the image itself is only ever read (the VM holds a shared
// lease on it, and an exclusive one on its disk). The VM's serial console
// goes to <StorageDir>/<vm>-<uid>.serial. Both are removed once the domain
// is undefined for good. A simulated host (no StorageDir) has no disks.

// vmFiles are the overlay and serial log of goal's VM on this host; empty
// when the host keeps no disks or the goal names none.
func (a *Agent) vmFiles(goal events.Goal) (disk, serial string) {
	if goal.Spec.Disk == nil {
		return "", ""
	}
	return a.vmPaths(goal)
}

// vmPaths are where goal's VM keeps its files on this host, whether its
// goal names a disk or not (an absent goal does not); empty on a host that
// keeps no disks.
func (a *Agent) vmPaths(goal events.Goal) (disk, serial string) {
	if a.cfg.StorageDir == "" {
		return "", ""
	}
	base := filepath.Join(a.cfg.StorageDir, goal.VM+"-"+goal.UID)
	return base + ".qcow2", base + ".serial"
}

// provision makes goal's overlay if it is not there yet.
func (a *Agent) provision(ctx context.Context, goal events.Goal) error {
	disk, _ := a.vmFiles(goal)
	if disk == "" {
		return nil
	}
	if _, err := os.Stat(disk); err == nil {
		return nil
	}
	src := goal.Spec.Disk
	if src.Source == "" || !filepath.IsAbs(src.Source) {
		return events.Errorf(events.CodeInvalidArgument, "image %s has no source path on the hosts (%q)", goal.Spec.Image, src.Source)
	}
	format := src.Format
	if format == "" {
		format = "qcow2"
	}
	tmp := disk + ".partial"
	cmd := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", format, "-b", src.Source, tmp)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		_ = os.Remove(tmp)
		return events.Errorf(events.CodeLibvirtError, "make the disk of %s on image %s: qemu-img: %v: %s", goal.VM, src.Source, err, bytes.TrimSpace(stderr.Bytes()))
	}
	if err := os.Rename(tmp, disk); err != nil {
		return fmt.Errorf("make the disk of %s: %w", goal.VM, err)
	}
	a.log.Info("disk made from image", logVM, goal.VM, "disk", disk, "image", src.Source)
	return nil
}

// unprovision removes every file of goal's VM on this host (its layers,
// checkpoint memory, top file and serial log) but those of the checkpoints
// goal.Keep names (a host the VM moved off keeps them for its catalog):
// each one's memory, its disk layer and the layers under it.
func (a *Agent) unprovision(goal events.Goal) error {
	if a.cfg.StorageDir == "" {
		return nil
	}
	files, err := filepath.Glob(a.vmBase(goal) + ".*")
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, k := range goal.Keep {
		if k.Memory != "" {
			keep[k.Memory] = true
		}
		for layer := k.Disk; a.ownFile(goal, layer) && !keep[layer]; {
			keep[layer] = true
			if layer, err = backingOf(layer); err != nil {
				break // what is left of the chain stays as it is
			}
		}
	}
	var errs []error
	for _, f := range files {
		if keep[f] {
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// awaitAlive watches a started guest's serial console for
// Config.AliveMarker, reporting boot progress once a second and the guest
// alive once the marker shows, for at most Config.BootTimeout. A guest
// that does not show it in time is logged, not failed: the domain runs.
func (a *Agent) awaitAlive(ctx context.Context, goal events.Goal) {
	_, serial := a.vmFiles(goal)
	if serial == "" || a.cfg.AliveMarker == "" {
		return
	}
	marker := []byte(a.cfg.AliveMarker)
	started := time.Now()
	for {
		data, err := os.ReadFile(serial)
		if err == nil && bytes.Contains(data, marker) {
			a.mu.Lock()
			a.vmLocked(goal.VM).lastProgress = time.Time{} // this one is never dropped
			a.mu.Unlock()
			a.progress(ctx, goal.VM, events.VMProgress{UID: goal.UID, Incarnation: goal.Incarnation, Step: StepGuestAlive,
				Done: time.Since(started).Milliseconds(), Total: time.Since(started).Milliseconds()})
			a.log.Info("guest alive", logVM, goal.VM, "after", time.Since(started).Round(100*time.Millisecond))
			return
		}
		elapsed := time.Since(started)
		if elapsed >= a.cfg.BootTimeout {
			a.log.Warn("guest not alive in time (no marker on its serial console); it runs on", logVM, goal.VM, "timeout", a.cfg.BootTimeout)
			return
		}
		a.progress(ctx, goal.VM, events.VMProgress{UID: goal.UID, Incarnation: goal.Incarnation, Step: StepBoot,
			Done: elapsed.Milliseconds(), Total: a.cfg.BootTimeout.Milliseconds()})
		if a.goalMoved(goal.VM, goal.Incarnation) || !sleepCtx(ctx, 100*time.Millisecond) {
			return
		}
	}
}

// Progress steps of a booting guest.
const (
	StepBoot       = "boot"
	StepGuestAlive = "guest-alive"
)
