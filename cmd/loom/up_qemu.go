package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// qemuRoot is where `loom up --qemu` keeps the tiny guest and the hosts'
// VM disks. QEMU runs as libvirt-qemu and must reach these files, so they
// live under /var/lib (whose parents it may traverse), not under a data
// dir that may sit in root's home.
const qemuRoot = "/var/lib/loom/qemu"

// hostKind is what `loom up` runs its hosts on.
type hostKind struct {
	uri string
	// simulated says test:///default (see plane.AgentConfig.Simulated).
	simulated bool
	// storage is the host's VM disks dir; empty for simulated hosts.
	storage func(host string) string
	// aliveMarker is what the guests print once up.
	aliveMarker string
	// image is what `loom up` registers for VMs to be created from.
	image events.RegisterImage
}

func simulatedHosts() hostKind {
	return hostKind{uri: "test:///default", simulated: true,
		image: events.RegisterImage{CommandMeta: events.CommandMeta{CommandID: "up-register-demo"},
			Name: "demo", Format: "qcow2", SizeBytes: 64 << 20, Source: "builtin:demo"}}
}

// qemuHosts builds the tiny guest (ops/qemu/guest.sh) and describes hosts
// running it under QEMU: each VM a qcow2 overlay on the guest's image,
// booted from its kernel, alive once it prints its heartbeat.
func qemuHosts(ctx context.Context) (hostKind, error) {
	script, err := findOpsScript("qemu/guest.sh")
	if err != nil {
		return hostKind{}, err
	}
	guest := filepath.Join(qemuRoot, "guest")
	if out, err := exec.CommandContext(ctx, script, guest).CombinedOutput(); err != nil {
		return hostKind{}, fmt.Errorf("build the tiny guest: %w\n%s", err, out)
	}
	if err := os.Chmod(qemuRoot, 0o755); err != nil {
		return hostKind{}, err
	}
	return hostKind{uri: "qemu:///system", aliveMarker: "loom-heartbeat",
		storage: func(host string) string { return filepath.Join(qemuRoot, "hosts", host) },
		image: events.RegisterImage{CommandMeta: events.CommandMeta{CommandID: "up-register-tiny"},
			Name: "tiny", Format: "qcow2", SizeBytes: 64 << 20, Source: filepath.Join(guest, "base.qcow2"),
			Boot: &events.ImageBoot{Kernel: filepath.Join(guest, "vmlinuz"), Initrd: filepath.Join(guest, "initrd.gz"), Cmdline: "console=ttyS0 quiet"}}}, nil
}

// agentConfig is the agent of host i on socket.
func (k hostKind) agentConfig(name, socket, fence string) (plane.AgentConfig, error) {
	cfg := plane.AgentConfig{Host: name, Socket: socket, URI: k.uri, Simulated: k.simulated, FenceSocket: fence, AliveMarker: k.aliveMarker}
	if k.storage != nil {
		cfg.StorageDir = k.storage(name)
		if err := os.MkdirAll(cfg.StorageDir, 0o755); err != nil {
			return cfg, err
		}
		if err := os.Chmod(filepath.Dir(cfg.StorageDir), 0o755); err != nil {
			return cfg, err
		}
		// Every host's daemon sees the others' sockets: migrations between
		// them go over unix sockets in a directory QEMU may write.
		sockets := cfg.StorageDir + ".sockets"
		if err := qemuOwnedDir(sockets); err != nil {
			return cfg, err
		}
		cfg.MigrateURI, cfg.MigrateListen = "qemu+unix:///system?socket="+socket, "unix:"+sockets
	}
	return cfg, nil
}

// qemuOwnedDir makes dir, owned by the user QEMU runs as, so that it can
// create its listening sockets there.
func qemuOwnedDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	qemu, err := user.Lookup("libvirt-qemu")
	if err != nil {
		return err
	}
	uid, err := strconv.Atoi(qemu.Uid)
	if err != nil {
		return err
	}
	gid, err := strconv.Atoi(qemu.Gid)
	if err != nil {
		return err
	}
	return os.Chown(dir, uid, gid)
}
