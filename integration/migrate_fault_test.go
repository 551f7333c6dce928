//go:build integration

package integration

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/loomctl/loom/agents/libvirt/libvirttest"
	"github.com/loomctl/loom/events"
)

// The target's libvirtd dies in the middle of a live migration (once the
// incoming domain exists there): the source reports the migration
// aborted with libvirt's reason, the control plane ends it, and the VM
// runs on where it was, under the grants it had, its guest counting on.
func TestMigrate_QEMUTargetDiesMidway(t *testing.T) {
	f := newQEMUFleet(t, 36, 37)
	vm, serial := bootGuest(t, f, "")
	source := vm.Host
	target := map[string]string{"host-1": "host-2", "host-2": "host-1"}[source]
	// The incoming QEMU outlives its daemon: stop it with the test.
	t.Cleanup(func() { _ = exec.Command("pkill", "-KILL", "-f", f.hosts[target].storage).Run() })

	reply := f.mustCommand(events.KindVM, events.VerbMigrate, &events.MigrateVM{Name: "web", To: target})
	waitFor(t, 60*time.Second, "the incoming domain on "+target, func() error {
		if _, err := f.hosts[target].virt.Lookup(context.Background(), "web"); err != nil {
			return err
		}
		return nil
	})
	libvirttest.Kill(t, f.hosts[target].socket)
	killed := time.Now()

	failed := waitMigrationEnded(t, f, "web", reply)
	l := failed.LastMigration
	t.Logf("migration ended %s after the kill: %s (%v)", time.Since(killed).Round(100*time.Millisecond), l.Reason, l.Fault)
	if l.Moved || failed.Host != source || l.Fault == nil || !slices.Equal(failed.Leases, vm.Leases) || failed.Observed.State != events.ObservedRunning {
		t.Fatalf("after the target died: host %s, %s, last %+v, leases %v (were %v)", failed.Host, failed.Observed.State, l, failed.Leases, vm.Leases)
	}
	if got := f.domainState(source, "web"); got != "running" {
		t.Fatalf("QEMU on %s says web is %s", source, got)
	}
	before := slices.Max(heartbeats(t, serial))
	waitFor(t, 30*time.Second, "the heartbeat to go on", func() error {
		if n := slices.Max(heartbeats(t, serial)); n < before+2 {
			return fmt.Errorf("heartbeat %d, %d when the migration ended", n, before)
		}
		return nil
	})
}
