package agents

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// Migrator is what live migration needs of libvirt; *libvirt.Client has
// it. A host without it reports every migration aborted.
type Migrator interface {
	// Migrate moves the running domain to another host's libvirtd, peer
	// to peer, copying its disk; it returns once the move ended.
	Migrate(ctx context.Context, domain string, m libvirt.Migration) error
	// MigrationProgress reads the domain's running job on the source.
	MigrationProgress(ctx context.Context, domain string) (libvirt.MigrationProgress, error)
	// CompletedMigration reads libvirt's figures for the domain's last
	// incoming migration, on the target.
	CompletedMigration(ctx context.Context, domain string) (libvirt.MigrationStats, error)
	// EnsureDirPool makes dir a storage pool, so that an incoming
	// migration's disk can be created in it.
	EnsureDirPool(ctx context.Context, name, dir string) error
}

// StepMigrate is the progress step of a migration under way on its source:
// Done and Total are bytes of disk and memory copied and to copy.
const StepMigrate = "migrate"

// migratePollEvery is how often the source reads its migration's progress.
const migratePollEvery = 250 * time.Millisecond

// sendVM carries out the source's side of a migration: move the domain,
// report progress while it copies, and say how it ended. It is the whole
// reconcile of such a goal: the domain is left alone otherwise. A domain
// not here any more has left (after a restart, or a lost report).
func (a *Agent) sendVM(ctx context.Context, hv Hypervisor, goal events.Goal, found bool) error {
	m := goal.Migrate
	report := func(ev events.Event) error {
		err := a.reportStep(ctx, goal, ev)
		if err == nil {
			a.mu.Lock()
			a.vms[goal.VM].migrationReported = m.Migration
			a.mu.Unlock()
		}
		return err
	}
	aborted := func(fault *events.Fault) error {
		a.log.Warn("migration did not happen; the domain runs here", logVM, goal.VM, "to", m.To, logErr, fault)
		return report(events.VMMigrationAborted{UID: goal.UID, Incarnation: goal.Incarnation, Migration: m.Migration, Fault: fault, Leases: goal.Leases})
	}
	sent := func(took time.Duration, p libvirt.MigrationProgress, unreachable time.Duration) error {
		a.log.Info("domain migrated away", logVM, goal.VM, "to", m.To, "took", took.Round(time.Millisecond), "unreachable", unreachable)
		return report(events.VMMigrationSent{UID: goal.UID, Incarnation: goal.Incarnation, Migration: m.Migration,
			Millis: took.Milliseconds(), MemoryBytes: int64(p.MemoryProcessed), DiskBytes: int64(p.DiskProcessed), Leases: goal.Leases,
			UnreachableMillis: unreachable.Milliseconds()})
	}
	if !found {
		return sent(0, libvirt.MigrationProgress{}, 0)
	}
	if m.Cancel {
		return aborted(events.Errorf(events.CodeLibvirtError, "migration %s cancelled before it began", m.Migration))
	}
	mig, ok := hv.(Migrator)
	if !ok {
		return aborted(events.Errorf(events.CodeLibvirtError, "this host's hypervisor connection cannot migrate"))
	}
	mctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.mu.Lock()
	a.vms[goal.VM].cancelMigration = cancel
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.vms[goal.VM].cancelMigration = nil
		a.mu.Unlock()
	}()

	last := make(chan libvirt.MigrationProgress, 1)
	polling := make(chan struct{})
	go func() {
		defer close(polling)
		a.pollMigration(mctx, mig, goal, last)
	}()
	probe := a.startProbe(ctx, goal)
	started := time.Now()
	// The serial log goes next to the disk on the target, as this host
	// keeps it next to its own.
	serial := ""
	if _, own := a.vmFiles(goal); own != "" && m.DestDisk != "" {
		serial = filepath.Join(filepath.Dir(m.DestDisk), filepath.Base(own))
	}
	err := mig.Migrate(mctx, goal.VM, libvirt.Migration{DestURI: m.DestURI, DataURI: m.DataURI, DisksURI: m.DisksURI,
		DestDisk: m.DestDisk, DestSerial: serial})
	took := time.Since(started)
	cancelled := mctx.Err() != nil // before the cancel that stops the polling
	cancel()
	<-polling
	var unreachable time.Duration
	if err == nil {
		unreachable = probe.stop(ctx, time.Now())
	} else {
		probe.abort()
	}
	var p libvirt.MigrationProgress
	select {
	case p = <-last:
	default:
	}
	switch {
	case err == nil:
		return sent(took, p, unreachable)
	case ctx.Err() != nil:
		return err // the agent stops: the next one looks at where the domain is
	case cancelled:
		return aborted(events.Errorf(events.CodeLibvirtError, "migration %s cancelled: %v", m.Migration, err))
	case unavailable(err):
		// Whether it moved is unknown: the domain says, once libvirtd is back.
		return err
	}
	if _, still, lerr := lookup(ctx, hv, goal.VM); lerr == nil && !still {
		return sent(took, p, 0) // libvirt answered an error, but the domain left
	}
	return aborted(faultOf(err))
}

// pollMigration reports the progress of goal's migration until ctx ends,
// keeping the last reading in last.
func (a *Agent) pollMigration(ctx context.Context, mig Migrator, goal events.Goal, last chan libvirt.MigrationProgress) {
	for sleepCtx(ctx, migratePollEvery) {
		p, err := mig.MigrationProgress(ctx, goal.VM)
		if err != nil || !p.Active {
			continue
		}
		select {
		case <-last:
		default:
		}
		last <- p
		a.progress(ctx, goal.VM, events.VMProgress{UID: goal.UID, Incarnation: goal.Incarnation, Step: StepMigrate,
			Done: int64(p.DataTotal - min(p.DataRemaining, p.DataTotal)), Total: int64(p.DataTotal)})
	}
}

// receiveVM is the target's side: once the migrated domain runs here, it
// records the layer the domain writes to as the VM's top and reports it
// received, with libvirt's own figures. Until then there is nothing to do:
// libvirt's events bring the VM back to the queue.
func (a *Agent) receiveVM(ctx context.Context, hv Hypervisor, goal events.Goal, dom libvirt.Domain, found bool) error {
	in := goal.Incoming
	if !found || dom.State != libvirt.StateRunning {
		return nil
	}
	received := events.VMMigrationReceived{UID: goal.UID, Incarnation: goal.Incarnation, Migration: in.Migration}
	if cp, ok := hv.(Checkpointer); ok && a.cfg.StorageDir != "" {
		disk, err := cp.DiskSource(ctx, goal.VM)
		if err != nil {
			return err
		}
		if !a.ownFile(goal, disk) {
			return fmt.Errorf("migrated domain %s writes to %s, not one of its files here", goal.VM, disk)
		}
		if err := a.setTop(goal, disk, disk); err != nil {
			return err
		}
		received.Disk = disk
	}
	if mig, ok := hv.(Migrator); ok {
		stats, err := a.completedMigration(ctx, mig, goal.VM)
		if err != nil {
			return err
		}
		received.TotalMillis, received.DowntimeMillis = stats.Total.Milliseconds(), stats.Downtime.Milliseconds()
	}
	if err := a.reportStep(ctx, goal, received); err != nil {
		return err
	}
	a.mu.Lock()
	a.vms[goal.VM].migrationReported = in.Migration
	a.mu.Unlock()
	a.log.Info("migrated domain arrived", logVM, goal.VM, "from", in.From, "downtime_ms", received.DowntimeMillis, "total_ms", received.TotalMillis)
	return nil
}

// cancelMigrating cancels goal's VM's migration under way in this process,
// if the goal asks to.
func (a *Agent) cancelMigratingLocked(v *vmRecord, goal events.Goal) {
	if goal.Migrate != nil && goal.Migrate.Cancel && v.cancelMigration != nil {
		a.log.Info("cancelling the migration under way", logVM, goal.VM, "migration", goal.Migrate.Migration)
		v.cancelMigration()
	}
}

// statsWait bounds how long the target waits for libvirt's figures of an
// incoming migration once the domain runs: libvirt records them when the
// source has confirmed the end, a moment after the guest resumed here.
const statsWait = 10 * time.Second

// completedMigration reads libvirt's figures for domain's incoming
// migration, waiting for them up to statsWait; zero figures if they never
// come (a libvirtd restarted since).
func (a *Agent) completedMigration(ctx context.Context, mig Migrator, domain string) (libvirt.MigrationStats, error) {
	deadline := time.Now().Add(statsWait)
	for {
		stats, err := mig.CompletedMigration(ctx, domain)
		switch {
		case err == nil:
			return stats, nil
		case !errors.Is(err, libvirt.ErrNoMigrationStats):
			return stats, err
		case time.Now().After(deadline):
			a.log.Warn("libvirt kept no figures of the incoming migration", logVM, domain, logErr, err)
			return libvirt.MigrationStats{}, nil
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return libvirt.MigrationStats{}, ctx.Err()
		}
	}
}
