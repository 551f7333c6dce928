//go:build integration

package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// heartbeats are the counters the tiny guest printed on its serial log,
// in order; a restored guest prints on from where its checkpoint was.
func heartbeats(t *testing.T, serial string) []int {
	t.Helper()
	data, err := os.ReadFile(serial)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []int
	for _, m := range regexp.MustCompile(`loom-heartbeat (\d+)`).FindAllSubmatch(data, -1) {
		n, _ := strconv.Atoi(string(m[1]))
		out = append(out, n)
	}
	return out
}

// bootGuest creates web from the tiny image (on net, if not empty) and
// waits until its guest prints its heartbeat; it returns the VM and its
// serial log.
func bootGuest(t *testing.T, f *fleet, net string) (events.VMView, string) {
	t.Helper()
	reply := f.mustCommand(events.KindVM, events.VerbCreate, &events.CreateVM{Name: "web", Image: "tiny", CPU: 1, MemoryMiB: 128, Net: net})
	vm := f.converged("web", reply.LastSeq())
	serial := filepath.Join(f.hosts[vm.Host].storage, "web-"+vm.UID+".serial")
	waitFor(t, 90*time.Second, "the guest's heartbeat", func() error {
		if n := len(heartbeats(t, serial)); n < 3 {
			return fmt.Errorf("%d heartbeats", n)
		}
		return nil
	})
	return vm, serial
}

// waitStep waits until the host reported on vm's checkpoint step and vm
// converged, and returns vm.
func waitStep(t *testing.T, f *fleet, vm string, reply *events.Reply) events.VMView {
	t.Helper()
	var view events.VMView
	waitFor(t, 120*time.Second, vm+" step reported", func() error {
		var err error
		if view, err = f.vm(vm, reply.LastSeq()); err != nil {
			return err
		}
		if view.Step != nil || !view.Converged {
			return fmt.Errorf("%s: step %+v, %s@%d, goal @%d", vm, view.Step, view.Observed.State, view.Observed.Incarnation, view.Incarnation)
		}
		return nil
	})
	return view
}

// A VM booted through Loom on real QEMU is checkpointed with its memory;
// its heartbeat goes on; restored, the guest is back at the checkpoint's
// moment (its counter goes back) and runs on from there. A disk-only
// checkpoint is taken too; deleting the checkpoints removes their files;
// and the VM's history tells it all, in order.
func TestCheckpoint_QEMUCheckpointRestore(t *testing.T) {
	f := newQEMUFleet(t, 32)
	_, serial := bootGuest(t, f, "")

	before := slices.Max(heartbeats(t, serial))
	started := time.Now()
	reply := f.mustCommand(events.KindVM, events.VerbCheckpoint, &events.CheckpointVM{Name: "web", Kind: events.CheckpointFull})
	vm := waitStep(t, f, "web", reply)
	after := slices.Max(heartbeats(t, serial))
	if len(vm.Checkpoints) != 1 || vm.Checkpoints[0].State != events.CheckpointTaken {
		t.Fatalf("catalog after the checkpoint: %+v", vm.Checkpoints)
	}
	full := vm.Checkpoints[0]
	t.Logf("full checkpoint %s through Loom: %s end to end, %d ms in libvirt; disk %d KiB, memory %d MiB; heartbeat %d..%d",
		full.ID, time.Since(started).Round(time.Millisecond), full.Millis, full.DiskBytes>>10, full.MemoryBytes>>20, before, after)
	if full.Host != vm.Host || full.MemoryBytes == 0 {
		t.Fatalf("checkpoint entry: %+v", full)
	}
	for _, file := range []string{full.Disk, full.Memory} {
		if _, err := os.Stat(file); err != nil {
			t.Fatalf("checkpoint file: %v", err)
		}
	}

	waitFor(t, 60*time.Second, "the heartbeat to go on", func() error {
		if n := slices.Max(heartbeats(t, serial)); n < after+4 {
			return fmt.Errorf("heartbeat %d, checkpoint at %d", n, after)
		}
		return nil
	})
	printed := len(heartbeats(t, serial))
	last := slices.Max(heartbeats(t, serial))
	reply = f.mustCommand(events.KindVM, events.VerbRestore, &events.RestoreVM{Name: "web", Checkpoint: full.ID})
	vm = waitStep(t, f, "web", reply)
	var resumed []int
	waitFor(t, 60*time.Second, "heartbeats after the restore", func() error {
		if resumed = heartbeats(t, serial)[printed:]; len(resumed) < 3 {
			return fmt.Errorf("%d heartbeats since the restore", len(resumed))
		}
		return nil
	})
	t.Logf("restored: heartbeat was %d, the checkpoint was taken at %d..%d, the guest now prints %v", last, before, after, resumed)
	if resumed[0] > after+1 || resumed[0] < before || resumed[0] >= last {
		t.Fatalf("after the restore the guest printed %v: want it back at the checkpoint (%d..%d), below %d", resumed, before, after, last)
	}
	if c, _ := vm.CheckpointOf(full.ID); c.Restores != 1 {
		t.Fatalf("restores of %s: %d", full.ID, c.Restores)
	}

	reply = f.mustCommand(events.KindVM, events.VerbCheckpoint, &events.CheckpointVM{Name: "web", Kind: events.CheckpointDisk})
	vm = waitStep(t, f, "web", reply)
	disk := vm.Checkpoints[len(vm.Checkpoints)-1]
	if disk.State != events.CheckpointTaken || disk.Memory != "" {
		t.Fatalf("disk checkpoint: %+v", disk)
	}
	t.Logf("disk checkpoint %s: %d ms in libvirt", disk.ID, disk.Millis)

	for _, id := range []string{full.ID, disk.ID} {
		reply = f.mustCommand(events.KindVM, events.VerbDeleteCheckpoint, &events.DeleteCheckpoint{Name: "web", Checkpoint: id})
	}
	waitFor(t, 60*time.Second, "checkpoints removed", func() error {
		vm, err := f.vm("web", reply.LastSeq())
		if err != nil {
			return err
		}
		if len(vm.Checkpoints) != 0 {
			return fmt.Errorf("catalog: %+v", vm.Checkpoints)
		}
		return nil
	})
	if _, err := os.Stat(full.Memory); !os.IsNotExist(err) {
		t.Fatalf("the memory of a deleted checkpoint stayed: %v", err)
	}
	if got := f.domainState(vm.Host, "web"); got != "running" {
		t.Fatalf("QEMU says web is %s after it all", got)
	}

	// The history, in stream order: every decision and report of the story.
	var story []events.Type
	ctx := context.Background()
	for seq := uint64(1); ; {
		m, err := bus.NextOnSubject(ctx, f.conn.Conn, events.StreamEvents, "loom.*.>", seq)
		if err != nil {
			break
		}
		seq = m.Seq + 1
		rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
		if err != nil {
			t.Fatal(err)
		}
		if rec.Envelope.Kind == events.KindVM && rec.Envelope.AggregateID == "web" && rec.Envelope.Type != events.TypeVMObserved && rec.Envelope.Type != events.TypeVMProgress {
			story = append(story, rec.Envelope.Type)
		}
	}
	want := []events.Type{events.TypeVMCreated, events.TypeVMPlaced,
		events.TypeVMCheckpointRequested, events.TypeVMCheckpointTaken,
		events.TypeVMRestoreRequested, events.TypeVMRestored,
		events.TypeVMCheckpointRequested, events.TypeVMCheckpointTaken,
		events.TypeVMCheckpointDeleted, events.TypeVMCheckpointDeleted, events.TypeVMCheckpointRemoved}
	if !slices.Equal(story[:min(len(story), len(want)-1)], want[:len(want)-1]) || !slices.Contains(story[len(want)-2:], events.TypeVMCheckpointRemoved) {
		t.Fatalf("the history of web:\n got %v\nwant %v", story, want)
	}
}
