package agents

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/loomctl/loom/events"
)

// A VM's disk layers on a host with disks. Its first layer is
// <vm>-<uid>.qcow2, an overlay on its image. Taking checkpoint C freezes
// the layer the VM writes to (its top) and makes <vm>-<uid>.<C>.qcow2 the
// new top, on it; a full checkpoint also writes <vm>-<uid>.<C>.mem.
// Restoring C makes <vm>-<uid>.<R>.qcow2 on C's frozen layer, R being the
// restore's id. The file <vm>-<uid>.top names the top, so that a domain
// defined again (after an undefine, or on a new libvirtd) writes where
// the VM wrote last.

// layerPath is the layer a checkpoint or restore id makes the top.
func (a *Agent) layerPath(goal events.Goal, id string) string {
	return a.vmBase(goal) + "." + id + ".qcow2"
}

// memoryPath is the memory and device state file of checkpoint id.
func (a *Agent) memoryPath(goal events.Goal, id string) string {
	return a.vmBase(goal) + "." + id + ".mem"
}

// vmBase is the path every file of goal's VM on this host starts with.
func (a *Agent) vmBase(goal events.Goal) string {
	return filepath.Join(a.cfg.StorageDir, goal.VM+"-"+goal.UID)
}

// ownFile tells whether path is one of goal's VM's files on this host: a
// step from the bus that names another path is refused, never acted on.
func (a *Agent) ownFile(goal events.Goal, path string) bool {
	return a.cfg.StorageDir != "" && filepath.IsAbs(path) && filepath.Clean(path) == path &&
		strings.HasPrefix(path, a.vmBase(goal)+".") && !strings.Contains(path[len(a.vmBase(goal)):], "/")
}

// top is the layer goal's VM writes to: the one the top file names if it
// exists, else the one that was top before it (a crash came between
// naming the new top and making it), else the first layer.
func (a *Agent) top(goal events.Goal) (string, error) {
	disk, _ := a.vmFiles(goal)
	if disk == "" {
		return "", nil
	}
	next, prev, err := a.topRecord(goal)
	if err != nil {
		return "", err
	}
	for _, candidate := range []string{next, prev} {
		if candidate == "" {
			continue
		}
		if _, err := os.Stat(candidate); err == nil {
			return candidate, nil
		}
	}
	return disk, nil
}

// topRecord reads the top file: the layer named top, and the one that was
// top before it; both empty when there is no file.
func (a *Agent) topRecord(goal events.Goal) (next, prev string, err error) {
	data, err := os.ReadFile(a.vmBase(goal) + ".top")
	if errors.Is(err, os.ErrNotExist) {
		return "", "", nil
	}
	if err != nil {
		return "", "", fmt.Errorf("read the top layer of %s: %w", goal.VM, err)
	}
	fields := strings.Fields(string(data))
	if len(fields) != 2 {
		return "", "", fmt.Errorf("top file of %s: %d names, want 2", goal.VM, len(fields))
	}
	for _, f := range fields {
		if !a.ownFile(goal, f) {
			return "", "", fmt.Errorf("top file of %s names %q, not one of its layers", goal.VM, f)
		}
	}
	return fields[0], fields[1], nil
}

// setTop records next as the VM's top, and prev as the top to fall back
// on while next does not exist yet. The file is replaced atomically and
// synced, with its directory.
func (a *Agent) setTop(goal events.Goal, next, prev string) error {
	path := a.vmBase(goal) + ".top"
	tmp := path + ".partial"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("record the top layer of %s: %w", goal.VM, err)
	}
	_, werr := f.WriteString(next + "\n" + prev + "\n")
	serr := f.Sync()
	if err := errors.Join(werr, serr, f.Close()); err != nil {
		return fmt.Errorf("record the top layer of %s: %w", goal.VM, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("record the top layer of %s: %w", goal.VM, err)
	}
	return syncDir(a.cfg.StorageDir)
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// makeLayer creates path, an empty qcow2 layer on backing, atomically.
func makeLayer(ctx context.Context, path, backing, format string) error {
	tmp := path + ".partial"
	cmd := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", format, "-b", backing, tmp)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		_ = os.Remove(tmp)
		return events.Errorf(events.CodeLibvirtError, "make layer %s on %s: qemu-img: %v: %s", filepath.Base(path), backing, err, bytes.TrimSpace(stderr.Bytes()))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("make layer %s: %w", filepath.Base(path), err)
	}
	return nil
}

// qcow2Magic starts every qcow2 file.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// maxBackingName bounds the backing file name a header may name (QEMU's
// own limit is 1023 bytes).
const maxBackingName = 1023

// backingOf reads the backing file a qcow2 file names in its header; ""
// when it has none.
func backingOf(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer func() { _ = f.Close() }()
	var hdr [20]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return "", fmt.Errorf("%s: qcow2 header: %w", path, err)
	}
	if !bytes.Equal(hdr[:4], qcow2Magic) {
		return "", fmt.Errorf("%s is not a qcow2 file", path)
	}
	offset, size := binary.BigEndian.Uint64(hdr[8:16]), binary.BigEndian.Uint32(hdr[16:20])
	if offset == 0 || size == 0 {
		return "", nil
	}
	if size > maxBackingName {
		return "", fmt.Errorf("%s: backing file name of %d bytes", path, size)
	}
	name := make([]byte, size)
	if _, err := f.ReadAt(name, int64(offset)); err != nil {
		return "", fmt.Errorf("%s: backing file name: %w", path, err)
	}
	backing := string(name)
	if !filepath.IsAbs(backing) {
		backing = filepath.Join(filepath.Dir(path), backing)
	}
	return backing, nil
}

// layersOn lists goal's VM's layers that name layer as their backing file.
func (a *Agent) layersOn(goal events.Goal, layer string) ([]string, error) {
	all, err := filepath.Glob(a.vmBase(goal) + ".*.qcow2")
	if err != nil {
		return nil, err
	}
	var on []string
	for _, l := range all {
		if l == layer {
			continue
		}
		b, err := backingOf(l)
		if err != nil {
			return nil, err
		}
		if b == layer {
			on = append(on, l)
		}
	}
	return on, nil
}

// allocated is the bytes a file takes on disk (not its apparent size: a
// qcow2 layer is sparse); 0 if it is not there.
func allocated(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return allocatedOf(fi)
}

func allocatedOf(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
