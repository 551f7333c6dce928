package agents

import (
	"context"
	"os"
	"os/exec"

	"github.com/loomctl/loom/agents/libvirt"
)

// The fake's checkpoints: its domains write to the disk Define gave them,
// a snapshot makes the overlay with qemu-img (as libvirt would) and
// switches the domain to it, and a restore starts a shut-off domain from
// a memory file. The fault injector sees "snapshot" before anything
// happens and "snapshot-done" after the switch: an error then is libvirt
// answering an error for a snapshot that happened (a daemon that died
// before it replied).

func (c *fakeConn) TakeSnapshot(ctx context.Context, domain string, s libvirt.Snapshot) error {
	var disk string
	err := c.verb(ctx, "snapshot", domain, func(h *fakeHost) error {
		d, ok := h.domains[domain]
		if !ok {
			return noDomain(domain)
		}
		if d.state != libvirt.StateRunning && d.state != libvirt.StatePaused {
			return &libvirt.Error{Code: codeOperationInvalid, Message: "domain is not running"}
		}
		disk = d.disk
		return nil
	})
	if err != nil {
		return err
	}
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk, s.Overlay).CombinedOutput(); err != nil {
		return &libvirt.Error{Code: codeInternal, Message: "qemu-img: " + err.Error() + ": " + string(out)}
	}
	if s.Memory != "" {
		if err := os.WriteFile(s.Memory, []byte("memory of "+domain), 0o600); err != nil {
			return err
		}
	}
	if err := c.verb(ctx, "snapshot-switch", domain, func(h *fakeHost) error {
		h.domains[domain].disk = s.Overlay
		return nil
	}); err != nil {
		return err
	}
	return c.verb(ctx, "snapshot-done", domain, func(*fakeHost) error { return nil })
}

func (c *fakeConn) DiskSource(ctx context.Context, domain string) (string, error) {
	var disk string
	err := c.verb(ctx, "disk-source", domain, func(h *fakeHost) error {
		d, ok := h.domains[domain]
		if !ok {
			return noDomain(domain)
		}
		disk = d.disk
		return nil
	})
	return disk, err
}

func (c *fakeConn) RestoreMemory(ctx context.Context, memory, disk string, paused bool) error {
	if _, err := os.Stat(memory); err != nil {
		return &libvirt.Error{Code: codeInternal, Message: err.Error()}
	}
	return c.verb(ctx, "restore", memory, func(h *fakeHost) error {
		for name, d := range h.domains {
			if d.disk != disk {
				continue
			}
			if d.state != libvirt.StateShutoff {
				return &libvirt.Error{Code: codeOperationInvalid, Message: "domain is already active"}
			}
			d.state = libvirt.StateRunning
			if paused {
				d.state = libvirt.StatePaused
			}
			h.emitLocked(name, d.uuid, "started")
			return nil
		}
		return &libvirt.Error{Code: codeInternal, Message: "no domain writes to " + disk}
	})
}
