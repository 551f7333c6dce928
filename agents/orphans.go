package agents

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// hostSubject is where the agent reports on its host as a whole: orphans.
func (a *Agent) hostSubject() string {
	return events.ObservationSubject(a.cfg.Host, events.KindHost, a.cfg.Host)
}

// loadOrphans folds the history of the host's observation subject into the
// set of orphans reported and not cleared, so that a restarted agent
// reports neither twice.
func (a *Agent) loadOrphans(ctx context.Context) error {
	// TODO(loom): this reads the subject's whole history; a periodic
	// snapshot event of the orphan set would bound it.
	subject := a.hostSubject()
	msgs, err := bus.ReadSubject(ctx, a.cfg.JS, events.StreamEvents, subject)
	if err != nil {
		return fmt.Errorf("read own host observations: %w", err)
	}
	orphans := map[string]events.HostOrphanFound{}
	var head events.Head
	notMine := 0
	for _, m := range msgs {
		prev := head.Seq
		head = events.Head{Seq: m.Seq, Hash: events.Hash(m.Data)}
		if !a.mine(m, prev, true) {
			notMine++
			continue
		}
		rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
		if err != nil {
			a.log.Warn("unreadable host observation skipped", logSubject, subject, logSeq, m.Seq, logErr, err)
			continue
		}
		switch ev := rec.Event.(type) {
		case events.HostOrphanFound:
			orphans[ev.Domain] = ev
		case events.HostOrphanCleared:
			delete(orphans, ev.Domain)
		}
	}
	if notMine > 0 {
		a.log.Warn("host observations not signed by this host's key (stored before the key, or by someone else) skipped",
			logSubject, subject, logSkipped, notMine)
	}
	a.mu.Lock()
	a.orphans, a.hostHead = orphans, head
	a.mu.Unlock()
	return nil
}

// scanOrphans compares libvirt's domains with the goals: a domain no goal
// names is reported found (once), and a reported orphan that went away or
// got a goal is reported cleared. Orphans are never touched. The scan waits
// for the start-up snapshot of goals, lest a VM whose goal is not read yet
// look like an orphan.
func (a *Agent) scanOrphans(ctx context.Context) {
	err := a.scanOrphansOnce(ctx)
	if ctx.Err() != nil {
		return
	}
	a.mu.Lock()
	if err == nil {
		a.orphanFailures = 0
	} else {
		a.orphanFailures++
	}
	failures := a.orphanFailures
	a.mu.Unlock()
	if err != nil {
		retry := a.backoff(failures)
		a.queue.add(orphanScanKey, time.Now().Add(retry))
		if failures&(failures-1) == 0 {
			a.log.Warn("orphan scan; will retry", logErr, err, logFailures, failures, logRetryIn, retry)
		}
	}
}

func (a *Agent) scanOrphansOnce(ctx context.Context) error {
	a.mu.Lock()
	ready, hv := a.snapshotDone, a.hv
	a.mu.Unlock()
	if !ready || hv == nil {
		return nil // completing the snapshot or connecting queues a scan
	}
	if err := a.reportAgentStarted(ctx); err != nil {
		return err
	}
	doms, err := hv.List(ctx)
	if err != nil {
		return fmt.Errorf("list domains: %w", err)
	}

	a.mu.Lock()
	var found []events.HostOrphanFound
	present := map[string]bool{}
	for _, d := range doms {
		if v, ok := a.vms[d.Name]; ok && v.hasGoal {
			continue
		}
		present[d.Name] = true
		orphan := events.HostOrphanFound{Domain: d.Name, UUID: formatUUID(d.UUID), State: observedState(d, true)}
		if have, ok := a.orphans[d.Name]; ok && have.UUID == orphan.UUID {
			continue
		}
		found = append(found, orphan)
	}
	var cleared []string
	for name := range a.orphans {
		if !present[name] {
			cleared = append(cleared, name)
		}
	}
	a.mu.Unlock()
	slices.Sort(cleared)

	for _, name := range cleared {
		if err := a.reportHost(ctx, events.HostOrphanCleared{Domain: name}); err != nil {
			return err
		}
		a.mu.Lock()
		delete(a.orphans, name)
		a.mu.Unlock()
		a.log.Info("orphan domain cleared", logDomain, name)
	}
	for _, orphan := range found { // List is sorted by name
		if err := a.reportHost(ctx, orphan); err != nil {
			return err
		}
		a.mu.Lock()
		a.orphans[orphan.Domain] = orphan
		a.mu.Unlock()
		a.log.Warn("orphan domain: no goal names it; leaving it alone", logDomain, orphan.Domain, "uuid", orphan.UUID, logState, orphan.State)
	}
	// A goal that came in during the scan may name a domain just reported.
	a.mu.Lock()
	stale := false
	for name := range a.orphans {
		if v, ok := a.vms[name]; ok && v.hasGoal {
			stale = true
		}
	}
	a.mu.Unlock()
	if stale {
		a.queue.add(orphanScanKey, time.Time{})
	}
	return nil
}

// reportHost appends ev on the host's observation subject. Only the orphan
// scan calls it, and the queue runs one scan at a time.
func (a *Agent) reportHost(ctx context.Context, ev events.Event) error {
	a.mu.Lock()
	head := a.hostHead
	a.mu.Unlock()
	subject := a.hostSubject()
	next, err := a.appendChained(ctx, subject, events.KindHost, a.cfg.Host, ev, head)
	if errors.Is(err, bus.ErrWrongLastSeq) {
		a.log.Error("host observation subject written by someone else; is a second agent running for this host?",
			logSubject, subject, logErr, err)
		a.metrics.conflicts.Inc()
		if rerr := a.loadOrphans(ctx); rerr != nil {
			return fmt.Errorf("report %s: %w; re-read: %w", ev.EventType(), errConflict, rerr)
		}
		return fmt.Errorf("report %s: %w", ev.EventType(), errConflict)
	}
	if err != nil {
		return fmt.Errorf("report %s: %w", ev.EventType(), err)
	}
	a.mu.Lock()
	a.hostHead = next
	a.mu.Unlock()
	a.metrics.observations.WithLabelValues(string(ev.EventType())).Inc()
	return nil
}

// reportAgentStarted says, once per process, what the control plane needs
// to know of this host's agent: where it keeps disks and how other hosts
// migrate VMs to it.
func (a *Agent) reportAgentStarted(ctx context.Context) error {
	a.mu.Lock()
	done := a.agentReported
	a.mu.Unlock()
	if done {
		return nil
	}
	ev := events.HostAgentStarted{Agent: a.id, StorageDir: a.cfg.StorageDir, MigrateURI: a.cfg.MigrateURI, MigrateListen: a.cfg.MigrateListen, TunnelEndpoint: a.cfg.TunnelEndpoint}
	if err := a.reportHost(ctx, ev); err != nil {
		return err
	}
	a.mu.Lock()
	a.agentReported = true
	a.mu.Unlock()
	return nil
}
