package agents

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// qcow2 makes a qcow2 file at path, on backing if not empty.
func qcow2(t *testing.T, path, backing string) {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if backing != "" {
		args = append(args, "-F", "qcow2", "-b", backing)
	}
	if out, err := exec.Command("qemu-img", append(args, path, "16M")...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
}

// stepReports are the checkpoint reports on vm's subject, oldest first.
func stepReports(t *testing.T, s *fakeSetup, vm string) []events.Event {
	t.Helper()
	var out []events.Event
	for _, rec := range records(t, s.bus.JS, vmSubject("h1", vm)) {
		switch rec.Event.(type) {
		case events.VMCheckpointTaken, events.VMRestored, events.VMCheckpointFailed, events.VMCheckpointRemoved:
			out = append(out, rec.Event)
		}
	}
	return out
}

// A host that keeps no disks says a checkpoint is unsupported, once, and
// the VM goes on to its goal.
func TestAgent_CheckpointUnsupportedWithoutDisks(t *testing.T) {
	s := newFakeSetup(t, "h1")
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	goal := goalOf("h1", "vm1", uid, events.DesiredRunning, 10)
	goal.Step = &events.GoalStep{Op: events.CheckpointOpTake, Checkpoint: "ck-1", Kind: events.CheckpointFull}
	publishGoal(t, s.bus.JS, goal)
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
	reports := stepReports(t, s, "vm1")
	if len(reports) != 1 {
		t.Fatalf("reports: %+v, want one failure", reports)
	}
	f, ok := reports[0].(events.VMCheckpointFailed)
	if !ok || f.Fault == nil || f.Fault.Code != events.CodeCheckpointUnsupported || f.Incarnation != 10 || f.Op != events.CheckpointOpTake {
		t.Fatalf("report: %+v", reports[0])
	}
}

// The layers of a VM: the top file names the layer it writes to, falling
// back to the one before while the new one is not made; a top file or a
// step naming a file that is not the VM's own is refused.
func TestLayers_TopAndOwnFiles(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{cfg: Config{StorageDir: dir}}
	goal := goalOf("h1", "vm1", "u1", events.DesiredRunning, 10)
	goal.Spec.Disk = &events.ImageDisk{Source: filepath.Join(dir, "image.qcow2"), Format: "qcow2"}
	base := a.vmBase(goal)
	first := base + ".qcow2"
	if top, err := a.top(goal); err != nil || top != first {
		t.Fatalf("top with no top file: %q %v", top, err)
	}
	qcow2(t, first, "")
	layer := a.layerPath(goal, "ck-1")
	if err := a.setTop(goal, layer, first); err != nil {
		t.Fatal(err)
	}
	if top, err := a.top(goal); err != nil || top != first {
		t.Fatalf("top before the new layer is made: %q %v, want %q", top, err, first)
	}
	qcow2(t, layer, first)
	if top, err := a.top(goal); err != nil || top != layer {
		t.Fatalf("top once made: %q %v, want %q", top, err, layer)
	}
	if b, err := backingOf(layer); err != nil || b != first {
		t.Fatalf("backing of %s: %q %v", layer, b, err)
	}
	if b, err := backingOf(first); err != nil || b != "" {
		t.Fatalf("backing of the first layer: %q %v", b, err)
	}
	if _, err := backingOf(base + ".top"); err == nil {
		t.Fatal("a text file read as qcow2")
	}
	for path, own := range map[string]bool{
		layer: true, a.memoryPath(goal, "ck-1"): true,
		filepath.Join(dir, "vm2-u2.ck-1.qcow2"): false, base + "./../x.qcow2": false,
		base + ".x/y.qcow2": false, "/etc/passwd": false, "relative.qcow2": false,
	} {
		if a.ownFile(goal, path) != own {
			t.Errorf("ownFile(%q) = %v, want %v", path, !own, own)
		}
	}
	if err := os.WriteFile(base+".top", []byte("/etc/passwd\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := a.top(goal); err == nil {
		t.Fatal("a top file naming another file was believed")
	}
}

// Deleted checkpoints on a host with disks: the memory goes, a disk layer
// goes unless a later layer builds on it, and a drop naming a file that
// is not the VM's is refused and reported, with nothing removed.
func TestAgent_DropCheckpoints(t *testing.T) {
	s := newFakeSetup(t, "h1")
	dir := t.TempDir()
	s.cfg.StorageDir = dir
	image := filepath.Join(dir, "image.qcow2")
	qcow2(t, image, "")
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	goal := goalOf("h1", "vm1", uid, events.DesiredRunning, 10)
	goal.Spec.Disk = &events.ImageDisk{Source: image, Format: "qcow2"}
	publishGoal(t, s.bus.JS, goal)
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)

	// As after two checkpoints and a restore to the first: first <- ck-1
	// (the second's frozen layer, now a leaf) and first <- rs-1 (the top).
	a := &Agent{cfg: s.cfg}
	first := a.vmBase(goal) + ".qcow2"
	ck1, top := a.layerPath(goal, "ck-1"), a.layerPath(goal, "rs-1")
	qcow2(t, ck1, first)
	qcow2(t, top, first)
	if err := a.setTop(goal, top, first); err != nil {
		t.Fatal(err)
	}
	mem := a.memoryPath(goal, "ck-0")
	if err := os.WriteFile(mem, []byte("state"), 0o600); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(dir, "keep-me")
	if err := os.WriteFile(foreign, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	bad := goal
	bad.Incarnation = 20
	bad.Drop = []events.CheckpointFiles{{Checkpoint: "ck-x", Memory: foreign}}
	publishGoal(t, s.bus.JS, bad)
	waitObserved(t, s.bus.JS, "h1", "vm1", 20, events.ObservedRunning)
	if _, err := os.Stat(foreign); err != nil {
		t.Fatalf("a drop removed a file that is not the VM's: %v", err)
	}

	good := goal
	good.Incarnation = 30
	good.Drop = []events.CheckpointFiles{{Checkpoint: "ck-0", Disk: first, Memory: mem}, {Checkpoint: "ck-2", Disk: ck1}}
	publishGoal(t, s.bus.JS, good)
	waitObserved(t, s.bus.JS, "h1", "vm1", 30, events.ObservedRunning)

	reports := stepReports(t, s, "vm1")
	if len(reports) != 2 {
		t.Fatalf("reports: %+v", reports)
	}
	if f, ok := reports[0].(events.VMCheckpointFailed); !ok || f.Fault.Code != events.CodeInvalidArgument || f.Op != events.CheckpointOpRemove {
		t.Fatalf("report of the bad drop: %+v", reports[0])
	}
	r, ok := reports[1].(events.VMCheckpointRemoved)
	if !ok || len(r.Checkpoints) != 2 || len(r.KeptDisk) != 1 || r.KeptDisk[0] != "ck-0" {
		t.Fatalf("report of the drop: %+v", reports[1])
	}
	for path, kept := range map[string]bool{mem: false, ck1: false, first: true, top: true} {
		_, err := os.Stat(path)
		if kept != (err == nil) {
			t.Errorf("%s: kept %v, want %v (%v)", filepath.Base(path), err == nil, kept, err)
		}
	}
}

// Faults you cannot time on a real libvirtd, on the fake: a snapshot that
// libvirt refused is reported failed and leaves no file; one whose reply
// was lost (the daemon went away) is looked at again and reported taken
// once; one libvirt answered with an error although it happened is
// reported taken, never failed, and its files are kept.
func TestAgent_CheckpointAmbiguousFailures(t *testing.T) {
	s := newFakeSetup(t, "h1")
	dir := t.TempDir()
	s.cfg.StorageDir = dir
	image := filepath.Join(dir, "image.qcow2")
	qcow2(t, image, "")
	var fault atomic.Pointer[injected]
	s.host.setFail(func(op, name string) error {
		if f := fault.Load(); f != nil && f.op == op && fault.CompareAndSwap(f, nil) {
			return f.err
		}
		return nil
	})
	startAgent(t, s.cfg)
	uid := events.DeriveUID("t", "vm1")
	goal := goalOf("h1", "vm1", uid, events.DesiredRunning, 10)
	goal.Spec.Disk = &events.ImageDisk{Source: image, Format: "qcow2"}
	publishGoal(t, s.bus.JS, goal)
	waitObserved(t, s.bus.JS, "h1", "vm1", 10, events.ObservedRunning)
	a := &Agent{cfg: s.cfg}
	first := a.vmBase(goal) + ".qcow2"

	take := func(incarnation uint64, id string, op string, err error) {
		t.Helper()
		fault.Store(&injected{op, err})
		g := goal
		g.Incarnation = incarnation
		g.Step = &events.GoalStep{Op: events.CheckpointOpTake, Checkpoint: id, Kind: events.CheckpointFull}
		publishGoal(t, s.bus.JS, g)
		waitObserved(t, s.bus.JS, "h1", "vm1", incarnation, events.ObservedRunning)
	}
	refused := &libvirt.Error{Code: codeInternal, Message: "internal error: unable to execute QEMU command"}
	take(20, "ck-1", "snapshot", refused)
	take(30, "ck-2", "snapshot-done", libvirt.ErrDisconnected)
	take(40, "ck-3", "snapshot-done", refused)

	reports := stepReports(t, s, "vm1")
	var got []string
	for _, r := range reports {
		switch r := r.(type) {
		case events.VMCheckpointTaken:
			got = append(got, "taken "+r.Checkpoint)
		case events.VMCheckpointFailed:
			got = append(got, "failed "+r.Checkpoint)
		}
	}
	if want := []string{"failed ck-1", "taken ck-2", "taken ck-3"}; !slices.Equal(got, want) {
		t.Fatalf("reports %v, want %v", got, want)
	}
	ck2, ck3 := a.layerPath(goal, "ck-2"), a.layerPath(goal, "ck-3")
	if taken := reports[1].(events.VMCheckpointTaken); taken.Disk != first || taken.Top != ck2 {
		t.Fatalf("ck-2: %+v", taken)
	}
	if taken := reports[2].(events.VMCheckpointTaken); taken.Disk != ck2 || taken.Top != ck3 {
		t.Fatalf("ck-3: %+v", taken)
	}
	for path, exists := range map[string]bool{a.layerPath(goal, "ck-1"): false, a.memoryPath(goal, "ck-1"): false,
		ck2: true, ck3: true, a.memoryPath(goal, "ck-3"): true} {
		if _, err := os.Stat(path); (err == nil) != exists {
			t.Errorf("%s: exists %v, want %v", filepath.Base(path), err == nil, exists)
		}
	}
	if top, err := a.top(goal); err != nil || top != ck3 {
		t.Fatalf("top %q %v, want %s", top, err, ck3)
	}
}

// injected is one fault to inject: err, at op.
type injected struct {
	op  string
	err error
}
