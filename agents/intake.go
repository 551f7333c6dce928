package agents

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// loadObservations reads the last report on each of the host's VM
// observation subjects: the incarnation and state last reported, and the
// subject's head to chain the next report to.
func (a *Agent) loadObservations(ctx context.Context) error {
	filter := events.ObservationSubject(a.cfg.Host, events.KindVM, "*")
	msgs, err := bus.LastPerSubject(ctx, a.cfg.JS, events.StreamEvents, filter)
	if err != nil {
		return fmt.Errorf("read own vm observations: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range msgs {
		name := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
		v := a.vmLocked(name)
		v.head = events.Head{Seq: m.Seq, Hash: events.Hash(m.Data)}
		if !a.mine(m, 0, false) {
			a.log.Warn("last message not signed by this host's key (stored before the key, or by someone else); the next report will be published",
				logSubject, m.Subject, logSeq, m.Seq)
			continue
		}
		v.reported = reportOf(m)
		v.migrationReported = migrationOf(m)
		if v.reported.State == "" {
			a.log.Warn("last report unknown; the next one will be published", logSubject, m.Subject, logSeq, m.Seq)
		}
	}
	a.log.Info("read own observations", "vms", len(msgs))
	return nil
}

// reportOf is the report a stored message on a VM subject stands for: an
// observation as is; after a progress report, its incarnation with an
// unknown state; for anything unreadable, nothing known.
func reportOf(m bus.Message) events.VMObserved {
	rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
	if err != nil {
		return events.VMObserved{}
	}
	switch ev := rec.Event.(type) {
	case events.VMObserved:
		return ev
	case events.VMProgress:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	case events.VMCheckpointTaken:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	case events.VMRestored:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	case events.VMCheckpointFailed:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	case events.VMMigrationSent:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	case events.VMMigrationAborted:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	case events.VMMigrationReceived:
		return events.VMObserved{UID: ev.UID, Incarnation: ev.Incarnation}
	}
	return events.VMObserved{}
}

// migrationOf is the migration a stored report on a VM subject ended, if
// it is such a report.
func migrationOf(m bus.Message) string {
	rec, err := events.DecodeRecord(m.Seq, m.Subject, m.Time, m.Data)
	if err != nil {
		return ""
	}
	switch ev := rec.Event.(type) {
	case events.VMMigrationSent:
		return ev.Migration
	case events.VMMigrationAborted:
		return ev.Migration
	case events.VMMigrationReceived:
		return ev.Migration
	}
	return ""
}

// followGoals follows the host's goal subjects until ctx ends: first the
// goal standing on each (the start-up snapshot), then every new one.
func (a *Agent) followGoals(ctx context.Context) error {
	log := throttle{period: time.Minute}
	failures := 0
	for {
		started := time.Now()
		err := a.consumeGoals(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(started) > a.cfg.MaxRetryBackoff {
			failures = 0 // it worked for a while: start backing off afresh
		}
		failures++
		if ok, skipped := log.allow(); ok {
			a.log.Warn("follow goals; restarting", logErr, err, logSkipped, skipped)
		}
		if !sleepCtx(ctx, a.backoff(failures)) {
			return nil
		}
	}
}

// consumeGoals reads goals with an ordered consumer that delivers the last
// message of each goal subject and then every new one. The start-up
// snapshot is complete when the consumer has nothing pending.
func (a *Agent) consumeGoals(ctx context.Context) error {
	filter := events.HostGoals(a.cfg.Host)
	stream, err := a.cfg.JS.Stream(ctx, events.StreamGoals)
	if err != nil {
		return fmt.Errorf("stream %s: %w", events.StreamGoals, err)
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return fmt.Errorf("stream %s info: %w", events.StreamGoals, err)
	}
	if len(info.State.Subjects) == 0 {
		a.completeSnapshot()
	}
	cons, err := bus.OrderedConsumer(ctx, a.cfg.JS, stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
		DeliverPolicy:  jetstream.DeliverLastPerSubjectPolicy,
	})
	if err != nil {
		return fmt.Errorf("follow %s: %w", filter, err)
	}
	defer bus.Forget(a.cfg.JS, events.StreamGoals, cons)
	msgs, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("follow %s: %w", filter, err)
	}
	defer msgs.Stop()
	for {
		msg, err := msgs.Next(jetstream.NextContext(ctx))
		if err != nil {
			return fmt.Errorf("follow %s: %w", filter, err)
		}
		a.onGoal(msg.Subject(), msg.Headers().Get(events.HeaderIncarnation), msg.Data())
		meta, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("follow %s: metadata: %w", filter, err)
		}
		if meta.NumPending == 0 {
			a.completeSnapshot()
		}
	}
}

// onGoal takes in one goal message. A goal whose incarnation is not above
// the one held, or below the one last reported, is stale and ignored.
func (a *Agent) onGoal(subject, incarnationHeader string, data []byte) {
	goal, err := a.decodeGoal(subject, incarnationHeader, data)
	if err != nil {
		a.log.Error("unusable goal ignored", logSubject, subject, logErr, err)
		return
	}
	a.mu.Lock()
	v := a.vmLocked(goal.VM)
	stale := (v.hasGoal && goal.Incarnation <= v.goal.Incarnation) || goal.Incarnation < v.reported.Incarnation
	if !stale {
		v.goal, v.hasGoal = goal, true
		v.failures, v.holdUntil, v.drifts = 0, time.Time{}, 0
		a.cancelMigratingLocked(v, goal)
	}
	_, orphan := a.orphans[goal.VM]
	a.mu.Unlock()
	if stale {
		a.log.Debug("stale goal ignored", logVM, goal.VM, logIncarnation, goal.Incarnation)
		return
	}
	a.log.Debug("goal", logVM, goal.VM, logIncarnation, goal.Incarnation, "desired", goal.Desired)
	a.watchLeases(goal)
	a.queue.add(goal.VM, time.Time{})
	if orphan {
		a.queue.add(orphanScanKey, time.Time{}) // it has a goal now: clear it
	}
}

// decodeGoal decodes and checks a goal message.
func (a *Agent) decodeGoal(subject, incarnationHeader string, data []byte) (events.Goal, error) {
	host, vm, err := events.ParseGoalSubject(subject)
	if err != nil {
		return events.Goal{}, err
	}
	var goal events.Goal
	if err := events.Unmarshal(data, &goal); err != nil {
		return events.Goal{}, err
	}
	if goal.Incarnation == 0 && incarnationHeader != "" {
		if goal.Incarnation, err = strconv.ParseUint(incarnationHeader, 10, 64); err != nil {
			return events.Goal{}, fmt.Errorf("%s header: %w", events.HeaderIncarnation, err)
		}
	}
	switch {
	case host != a.cfg.Host || (goal.Host != "" && goal.Host != a.cfg.Host):
		return events.Goal{}, fmt.Errorf("goal for host %q on %s", goal.Host, subject)
	case goal.VM != vm:
		return events.Goal{}, fmt.Errorf("goal names vm %q on %s", goal.VM, subject)
	case !goal.Desired.Valid():
		return events.Goal{}, fmt.Errorf("desired state %q", goal.Desired)
	case goal.Incarnation == 0:
		return events.Goal{}, errors.New("no incarnation")
	}
	if err := events.ValidateName("vm", vm); err != nil {
		return events.Goal{}, err
	}
	goal.Host = a.cfg.Host
	return goal, nil
}

// completeSnapshot records that every goal standing at start was read;
// from now on a domain no goal names is an orphan.
func (a *Agent) completeSnapshot() {
	a.mu.Lock()
	first := !a.snapshotDone
	a.snapshotDone = true
	goals := 0
	for _, v := range a.vms {
		if v.hasGoal {
			goals++
		}
	}
	a.mu.Unlock()
	if first {
		a.log.Info("goal snapshot complete", "goals", goals)
		a.queue.add(orphanScanKey, time.Time{})
	}
}
