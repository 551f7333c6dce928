package agents

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// step is one libvirt verb the agent takes on a domain.
type step string

// The steps. stepShutdown asks the guest to power off, waits up to
// Config.StopGrace and then destroys the domain if it is still up.
const (
	stepDefine   step = "define"
	stepStart    step = "start"
	stepResume   step = "resume"
	stepSuspend  step = "suspend"
	stepShutdown step = "shutdown"
	stepDestroy  step = "destroy"
	stepUndefine step = "undefine"
)

// Outcomes of a reconcile that are not failures.
var (
	// errNotConverged means the steps ran but the domain is not there yet
	// (it is changing state on its own): look again after a backoff.
	errNotConverged = errors.New("domain not in the desired state yet")
	// errGoalChanged means a newer goal arrived mid-step: start over with it.
	errGoalChanged = errors.New("goal changed")
	// errHeld means the VM was requeued for later on purpose.
	errHeld = errors.New("held back")
)

// plan lists the steps that take a domain to desired. found says whether the
// domain exists, state is its state and current whether its metadata names
// the goal. No steps means the domain is there, or is changing state on its
// own and must be looked at again later.
func plan(desired events.Desired, found bool, state libvirt.State, current bool) []step {
	if desired == events.DesiredAbsent {
		switch {
		case !found:
			return nil
		case state == libvirt.StateShutoff:
			return []step{stepUndefine}
		default:
			return []step{stepDestroy, stepUndefine}
		}
	}
	var steps []step
	if !found || !current {
		steps = append(steps, stepDefine)
	}
	if !found {
		state = libvirt.StateShutoff
	}
	switch desired {
	case events.DesiredRunning:
		switch state {
		case libvirt.StateShutoff:
			steps = append(steps, stepStart)
		case libvirt.StatePaused, libvirt.StatePMSuspended:
			steps = append(steps, stepResume)
		case libvirt.StateCrashed:
			steps = append(steps, stepDestroy, stepStart)
		}
	case events.DesiredPaused:
		switch state {
		case libvirt.StateShutoff:
			steps = append(steps, stepStart, stepSuspend)
		case libvirt.StateRunning, libvirt.StateBlocked, libvirt.StateNoState:
			steps = append(steps, stepSuspend)
		case libvirt.StateCrashed:
			steps = append(steps, stepDestroy, stepStart, stepSuspend)
		}
	case events.DesiredStopped:
		switch state {
		case libvirt.StateRunning, libvirt.StateBlocked, libvirt.StateShutdown, libvirt.StateNoState:
			steps = append(steps, stepShutdown)
		case libvirt.StatePaused, libvirt.StatePMSuspended, libvirt.StateCrashed:
			// A paused guest cannot act on a power-off request: no grace.
			steps = append(steps, stepDestroy)
		}
	}
	return steps
}

// reconcile brings one VM's domain to its goal and reports the outcome.
// The queue guarantees that no other worker holds the VM meanwhile.
func (a *Agent) reconcile(ctx context.Context, name string) {
	a.mu.Lock()
	v, ok := a.vms[name]
	if !ok || !v.hasGoal {
		a.mu.Unlock()
		return
	}
	rec := *v
	v.leaseChanged = false // this reconcile looks at it
	a.mu.Unlock()
	if time.Now().Before(rec.holdUntil) && !rec.leaseChanged {
		a.queue.add(name, rec.holdUntil)
		return
	}

	started := time.Now()
	connected, err := a.reconcileGoal(ctx, name, rec)
	if ctx.Err() != nil {
		return
	}
	result := "ok"
	var retryAt time.Time
	a.mu.Lock()
	switch {
	case v.goal.Incarnation != rec.goal.Incarnation:
		result = "requeued" // a newer goal came in meanwhile and is queued
	case err == nil:
		v.failures, v.holdUntil = 0, time.Time{}
	case errors.Is(err, errHeld), errors.Is(err, errGoalChanged):
		result = "requeued"
	default:
		result = "error"
		v.failures++
		v.holdUntil = time.Now().Add(a.backoff(v.failures))
		retryAt = v.holdUntil
	}
	failures := v.failures
	a.mu.Unlock()

	if !retryAt.IsZero() {
		a.queue.add(name, retryAt)
		if failures&(failures-1) == 0 { // 1, 2, 4, 8, ...: fewer lines as it keeps failing
			a.log.Warn("reconcile; will retry", logVM, name, logErr, err, logFailures, failures, logRetryIn, time.Until(retryAt).Round(time.Millisecond))
		}
	}
	if connected {
		a.metrics.reconcileSeconds.WithLabelValues(result).Observe(time.Since(started).Seconds())
		if a.onReconciled != nil {
			a.onReconciled(name)
		}
	}
}

// reconcileGoal does the work of reconcile on a copy of the VM's record.
// connected says whether libvirtd was reachable to look.
func (a *Agent) reconcileGoal(ctx context.Context, name string, v vmRecord) (connected bool, err error) {
	goal := v.goal
	uuid, err := parseUUID(goal.UID)
	if err != nil {
		return false, a.observe(ctx, name, failed(goal, events.Errorf(events.CodeInvalidArgument, "goal uid: %v", err)))
	}
	hv, down := a.hypervisor()
	if hv == nil {
		if down && !converged(v) {
			return false, a.observe(ctx, name, failed(goal, unavailableFault()))
		}
		return false, nil // connecting: the connection queues every VM
	}

	dom, found, err := lookup(ctx, hv, name)
	if err != nil && unavailable(err) && converged(v) {
		// The connection went while looking: as when it is already
		// gone, a converged VM has nothing new to report; the retry or
		// the reconnection looks again.
		return false, err
	}
	if err != nil {
		return true, a.fail(ctx, name, goal, err)
	}
	if found && dom.UUID != uuid {
		return true, a.observe(ctx, name, failed(goal, events.Errorf(events.CodeDomainMismatch,
			"domain %s has UUID %s, not the VM's %s; the agent leaves it alone", name, formatUUID(dom.UUID), goal.UID)))
	}
	switch {
	case goal.Migrate != nil && v.migrationReported == goal.Migrate.Migration,
		goal.Incoming != nil && v.migrationReported == goal.Incoming.Migration:
		return true, nil // reported: the control plane moves the goal on
	case goal.Migrate != nil:
		a.markActed(name)
		if err := a.sendVM(ctx, hv, goal, found); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
		return true, nil
	case goal.Incoming != nil:
		if err := a.receiveVM(ctx, hv, goal, dom, found); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
		return true, nil
	}
	seen := observedState(dom, found)
	if v.leaseChanged && found && (dom.State == libvirt.StateRunning || dom.State == libvirt.StatePaused) {
		if fault := a.leaseStillHeld(ctx, goal); fault != nil {
			// Its grant was revoked under it (broken, expired): stop
			// writing at once, and say why.
			a.log.Warn("lease revoked under a running domain: destroying it", logVM, name, logErr, fault)
			err := hv.Destroy(ctx, name)
			a.metrics.action(stepDestroy, err)
			if err != nil {
				return true, a.fail(ctx, name, goal, err)
			}
			// Stopped, under the grants it ran under: what lets the
			// control plane complete a forced break.
			return true, a.observe(ctx, name, events.VMObserved{UID: goal.UID, Incarnation: goal.Incarnation,
				State: events.ObservedStopped, Fault: fault, Leases: goal.Leases})
		}
	}
	if drifted(v, seen) {
		// The domain changed by itself: say so, then put it back.
		unrequested := events.VMObserved{UID: goal.UID, Incarnation: goal.Incarnation, State: seen, Unrequested: true, Leases: goal.Leases}
		if err := a.observe(ctx, name, unrequested); err != nil {
			return true, err
		}
		if hold := a.noteDrift(name); hold > 0 {
			a.log.Warn("domain keeps changing by itself; backing off", logVM, name, logState, seen, logRetryIn, hold)
			a.queue.add(name, time.Now().Add(hold))
			return true, errHeld
		}
	}

	if st := goal.Step; st != nil && st.Op == events.CheckpointOpRestore && v.stepReported != goal.Incarnation {
		a.markActed(name)
		active := found && dom.State != libvirt.StateShutoff
		if err := a.restoreCheckpoint(ctx, hv, goal, uuid, found, active); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
		if dom, found, err = lookup(ctx, hv, name); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
		seen = observedState(dom, found)
	}
	if steps := plan(goal.Desired, found, dom.State, found && metadataCurrent(dom, goal)); len(steps) > 0 {
		a.markActed(name)
		if err := a.execute(ctx, hv, goal, uuid, steps); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
		if dom, found, err = lookup(ctx, hv, name); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
		seen = observedState(dom, found)
	}
	if st := goal.Step; st != nil && st.Op == events.CheckpointOpTake && v.stepReported != goal.Incarnation && seen.Satisfies(goal.Desired) {
		if err := a.takeCheckpoint(ctx, hv, goal); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
	}
	if len(goal.Drop) > 0 && v.dropReported != goal.Incarnation {
		if err := a.dropCheckpoints(ctx, goal); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
	}
	if goal.Desired == events.DesiredAbsent && !found {
		// Gone, by this agent or before it (a host the VM left): so go
		// its files, but for the checkpoints this host keeps.
		if err := a.unprovision(goal); err != nil {
			return true, a.fail(ctx, name, goal, err)
		}
	}
	if err := a.observe(ctx, name, events.VMObserved{UID: goal.UID, Incarnation: goal.Incarnation, State: seen, Leases: goal.Leases}); err != nil {
		return true, err
	}
	if !seen.Satisfies(goal.Desired) {
		return true, errNotConverged
	}
	return true, nil
}

// execute runs steps on goal's domain in order, stopping at the first error.
func (a *Agent) execute(ctx context.Context, hv Hypervisor, goal events.Goal, uuid [16]byte, steps []step) error {
	for _, s := range steps {
		var err error
		switch s {
		case stepDefine:
			if fault := a.checkLeases(ctx, goal); fault != nil {
				return fault
			}
			if err := a.provision(ctx, goal); err != nil {
				return err
			}
			disk, err := a.top(goal)
			if err != nil {
				return err
			}
			spec := a.domainSpecOn(goal, uuid, disk)
			card, err := a.netInterface(ctx, goal)
			if err != nil {
				return err
			}
			if card != nil {
				spec.Interface = &libvirt.Interface{Bridge: card.bridge, MAC: card.mac}
				spec.Cmdline = strings.TrimSpace(spec.Cmdline + " " + card.cmdline)
			}
			err = hv.Define(ctx, spec)
			a.metrics.action(s, err)
			if err != nil {
				return err
			}
			continue
		case stepStart, stepResume:
			if fault := a.fence.check(BootNanos()); fault != nil {
				a.metrics.fenced.Inc()
				return fault
			}
			if fault := a.checkLeases(ctx, goal); fault != nil {
				return fault
			}
			if s == stepStart {
				if err = hv.Start(ctx, goal.VM); err == nil && goal.Desired == events.DesiredRunning {
					defer a.awaitAlive(ctx, goal) // once the steps are done
				}
			} else {
				err = hv.Resume(ctx, goal.VM)
			}
		case stepSuspend:
			err = hv.Suspend(ctx, goal.VM)
		case stepDestroy:
			err = hv.Destroy(ctx, goal.VM)
		case stepUndefine:
			err = hv.Undefine(ctx, goal.VM) // its files go once it is reported absent
		case stepShutdown:
			if err := a.stop(ctx, hv, goal); err != nil {
				return err
			}
			continue // stop counts its own actions
		}
		a.metrics.action(s, err)
		if err != nil {
			return err
		}
		a.log.Debug("action", logVM, goal.VM, "step", s, logIncarnation, goal.Incarnation)
	}
	return nil
}

// stop asks the guest to power off, gives it Config.StopGrace, and destroys
// the domain if it is still up then.
func (a *Agent) stop(ctx context.Context, hv Hypervisor, goal events.Goal) error {
	err := hv.Shutdown(ctx, goal.VM)
	a.metrics.action(stepShutdown, err)
	switch {
	case err != nil && (ctx.Err() != nil || unavailable(err)):
		return err
	case err != nil:
		a.log.Warn("shutdown refused; destroying", logVM, goal.VM, logErr, err)
	default:
		off, err := a.awaitShutoff(ctx, hv, goal)
		if err != nil || off {
			return err
		}
		a.log.Info("guest did not power off in time; destroying", logVM, goal.VM, "grace", a.cfg.StopGrace)
	}
	err = hv.Destroy(ctx, goal.VM)
	a.metrics.action(stepDestroy, err)
	return err
}

// awaitShutoff waits up to Config.StopGrace for goal's domain to be shut
// off, reporting progress once a second. off is false when the grace ran out.
func (a *Agent) awaitShutoff(ctx context.Context, hv Hypervisor, goal events.Goal) (off bool, err error) {
	grace := a.cfg.StopGrace
	poll := min(max(grace/20, 10*time.Millisecond), 250*time.Millisecond)
	started := time.Now()
	for {
		dom, found, err := lookup(ctx, hv, goal.VM)
		if err != nil {
			return false, err
		}
		if !found || dom.State == libvirt.StateShutoff {
			return true, nil
		}
		elapsed := time.Since(started)
		if elapsed >= grace {
			return false, nil
		}
		if a.goalMoved(goal.VM, goal.Incarnation) {
			return false, errGoalChanged
		}
		if elapsed >= progressEvery {
			a.progress(ctx, goal.VM, events.VMProgress{UID: goal.UID, Incarnation: goal.Incarnation,
				Step: string(stepShutdown), Done: elapsed.Milliseconds(), Total: grace.Milliseconds()})
		}
		if !sleepCtx(ctx, min(poll, grace-elapsed)) {
			return false, ctx.Err()
		}
	}
}

// fail reports err against goal and returns it, so the VM is retried.
func (a *Agent) fail(ctx context.Context, name string, goal events.Goal, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, errGoalChanged) {
		return err
	}
	if rerr := a.observe(ctx, name, failed(goal, faultOf(err))); rerr != nil {
		return errors.Join(err, rerr)
	}
	return err
}

// noteDrift counts an unrequested change of the VM's domain and returns how
// long to wait before putting it back: nothing the first time, then a
// growing backoff while it keeps happening.
func (a *Agent) noteDrift(name string) time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	v := a.vms[name]
	now := time.Now()
	if now.Sub(v.lastDrift) > 2*a.cfg.MaxRetryBackoff {
		v.drifts = 0 // it stayed put for a good while: forgive earlier drifts
	}
	v.drifts++
	v.lastDrift = now
	if v.drifts == 1 {
		return 0
	}
	hold := a.backoff(v.drifts - 1)
	v.holdUntil = now.Add(hold)
	return hold
}

// goalMoved tells whether the VM's goal is no longer incarnation.
func (a *Agent) goalMoved(name string, incarnation uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.vms[name].goal.Incarnation != incarnation
}

// drifted tells whether seen contradicts what was last reported for the
// goal's incarnation without the agent having acted since.
func drifted(v vmRecord, seen events.ObservedState) bool {
	r := v.reported
	return !v.acted && r.Incarnation == v.goal.Incarnation && r.UID == v.goal.UID &&
		r.State != "" && r.State != events.ObservedFailed && r.State != seen
}

// converged tells whether the last report says the goal is met.
func converged(v vmRecord) bool {
	r := v.reported
	return r.Incarnation == v.goal.Incarnation && r.Fault == nil && r.State.Satisfies(v.goal.Desired)
}

// failed is the report of a goal the agent could not carry out.
func failed(goal events.Goal, fault *events.Fault) events.VMObserved {
	return events.VMObserved{UID: goal.UID, Incarnation: goal.Incarnation, State: events.ObservedFailed, Fault: fault, Leases: goal.Leases}
}

// markActed notes that the agent changed the VM's domain since its last
// report, so the next difference is not taken for a drift.
func (a *Agent) markActed(name string) {
	a.mu.Lock()
	a.vms[name].acted = true
	a.mu.Unlock()
}
