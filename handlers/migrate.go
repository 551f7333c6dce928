package handlers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// serveMigrate starts a live migration, or with Cancel asks the source to
// abort the one under way.
func (s *Service) serveMigrate(ctx context.Context, req *request) *events.Reply {
	var cmd events.MigrateVM
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	// A migration's start is one batch on two subjects: read the result
	// once the reader has the VM's subject, or it may have half of it.
	if _, fault := s.catchUp(ctx, events.EventSubject(events.KindVM, cmd.Name)); fault != nil {
		return failed(fault, nil)
	}
	result, found, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return failed(unavailable("read command result", err), nil)
	}
	if found {
		return &events.Reply{Events: result, Replayed: true}
	}
	if fault := s.reportsSeen(ctx, cmd.Name); fault != nil {
		return failed(fault, nil)
	}
	if cmd.Cancel {
		res, fault := appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMMigrationCancelling, func(vm *events.VMState) (events.Event, *events.Fault) {
			return decideCancelMigration(*vm, cmd.Name)
		})
		reply := &events.Reply{Error: fault, Replayed: res.replayed}
		if res.appended != nil {
			reply.Events = []events.Appended{*res.appended}
		}
		return reply
	}
	appended, replayed, fault := s.startMigration(ctx, c, &cmd)
	return &events.Reply{Events: appended, Error: fault, Replayed: replayed}
}

// startMigration appends the target's allocation and vm.migration_started
// as one atomic batch, each checked against its subject's head: the
// target's capacity is reserved in the append that starts the migration,
// or neither happens. It decides again when another writer moved either
// subject.
func (s *Service) startMigration(ctx context.Context, c *command, cmd *events.MigrateVM) (appended []events.Appended, replayed bool, fault *events.Fault) {
	id := events.DeriveStepID(prefixMigration, c.actor, c.id)
	for attempt := 1; ; attempt++ {
		vm, vmHead, err := s.cfg.Reader.VM(ctx, cmd.Name)
		if err != nil {
			return nil, false, unavailable("read vm "+cmd.Name, err)
		}
		if vm.Migration != nil && vm.Migration.ID == id {
			out, fault := s.storedMigration(ctx, c, cmd.Name, nil) // this command's own, from an earlier attempt
			return out, fault == nil, fault
		}
		if fault := migratable(vm, cmd.Name); fault != nil {
			return nil, false, fault
		}
		to, toHead, fault := s.migrationTarget(ctx, vm, cmd.To)
		if fault != nil {
			return nil, false, fault
		}
		evs, fault := decideMigrationStart(vm, to, id)
		if fault != nil {
			return nil, false, fault
		}
		targets := [2]struct {
			kind events.Kind
			id   string
			head events.Head
		}{{events.KindHost, to.Name, toHead}, {events.KindVM, cmd.Name, vmHead}}
		msgs := make([]*nats.Msg, len(evs))
		envs := make([]events.Envelope, len(evs))
		for i, ev := range evs {
			t := targets[i]
			env, data, err := events.Seal(ev, t.kind, t.id, c.origin, i, t.head.Hash)
			if err != nil {
				return nil, false, events.Errorf(events.CodeInternal, "%v", err)
			}
			envs[i], msgs[i] = env, checkedMsg(events.EventSubject(t.kind, t.id), &env, data, t.head.Seq, events.MsgID(c.actor, c.id, i))
		}
		last, err := bus.PublishBatch(ctx, s.cfg.Conn, msgs)
		s.hosts.drop(to.Name)
		s.vms.drop(cmd.Name)
		switch {
		case err == nil:
			s.log.Info("migration started", keyVM, cmd.Name, "from", vm.Host, "to", to.Name, "migration", id)
			out := make([]events.Appended, len(msgs))
			for i := range msgs {
				out[i] = events.Appended{Seq: last - uint64(len(msgs)-1-i), Subject: msgs[i].Subject, Type: envs[i].Type, ID: envs[i].ID}
			}
			return out, false, nil
		case errors.Is(err, bus.ErrDuplicateInBatch):
			out, fault := s.storedMigration(ctx, c, cmd.Name, err) // an earlier attempt stored it
			return out, fault == nil, fault
		case errors.Is(err, bus.ErrWrongLastSeq) || errors.Is(err, bus.ErrTryAgain):
			if attempt >= s.cfg.MaxAttempts {
				return nil, false, events.Errorf(events.CodeConflict, "vm %s or host %s kept changing: %d attempts; the migration did not start, retrying is safe", cmd.Name, to.Name, attempt)
			}
			// Both subjects: whichever moved, the reader catches up with it.
			for _, subject := range []string{events.EventSubject(events.KindVM, cmd.Name), events.EventSubject(events.KindHost, to.Name)} {
				if _, fault := s.catchUp(ctx, subject); fault != nil {
					return nil, false, fault
				}
			}
			if err := backoff(ctx, attempt); err != nil {
				return nil, false, unavailable("retry migrate", err)
			}
		default:
			return nil, false, unavailable("append the start of the migration", err)
		}
	}
}

// storedMigration answers a migrate that an earlier attempt of the same
// command stored, with what it stored.
func (s *Service) storedMigration(ctx context.Context, c *command, vm string, cause error) ([]events.Appended, *events.Fault) {
	if _, fault := s.catchUp(ctx, events.EventSubject(events.KindVM, vm)); fault != nil {
		return nil, fault
	}
	result, found, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil || !found {
		return nil, unavailable("read what an earlier attempt of the migration stored", errors.Join(cause, err))
	}
	return result, nil
}

// migrationTarget is the host vm moves to: the one named, or the one the
// scheduler picks; with its subject's head, read after catching up with
// what its agent reported of itself.
func (s *Service) migrationTarget(ctx context.Context, vm events.VMState, named string) (events.HostState, events.Head, *events.Fault) {
	if named == "" {
		// What every host's agent said of itself counts: catch up with it.
		if _, fault := s.catchUp(ctx, events.ObservationSubject("*", events.KindHost, "*")); fault != nil {
			return events.HostState{}, events.Head{}, fault
		}
		hosts, err := s.cfg.Reader.Hosts(ctx)
		if err != nil {
			return events.HostState{}, events.Head{}, unavailable("list hosts", err)
		}
		best, fault := chooseTarget(vm, hosts)
		if fault != nil {
			return events.HostState{}, events.Head{}, fault
		}
		named = best.Name
	}
	if _, fault := s.catchUp(ctx, events.ObservationSubject(named, events.KindHost, named)); fault != nil {
		return events.HostState{}, events.Head{}, fault
	}
	h, head, err := s.cfg.Reader.Host(ctx, named)
	if err != nil {
		return events.HostState{}, events.Head{}, unavailable("read host "+named, err)
	}
	if h.Name == "" {
		h.Name = named
	}
	cpu, mem := h.Used()
	if fault := targetFault(vm, h, capacity{vm.CPU, vm.MemoryMiB}, capacity{cpu, mem}); fault != nil {
		return events.HostState{}, events.Head{}, fault
	}
	return h, head, nil
}

// checkedMsg is a sealed event on subject, to be stored only if the
// subject's last sequence is still expect.
func checkedMsg(subject string, env *events.Envelope, data []byte, expect uint64, msgID string) *nats.Msg {
	m := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	m.Header.Set(events.HeaderType, string(env.Type))
	m.Header.Set(events.HeaderVersion, strconv.Itoa(env.Version))
	m.Header.Set(jetstream.MsgIDHeader, msgID)
	m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(expect, 10))
	return m
}

// advanceMigrations moves every migration under way on by what its hosts
// reported.
func (s *Service) advanceMigrations(ctx context.Context, vms []events.VMState) error {
	var errs []error
	for _, vm := range vms {
		if vm.Migration != nil {
			errs = append(errs, s.advanceMigration(ctx, vm.Name))
		}
	}
	return errors.Join(errs...)
}

// advanceMigration ends vm's migration once its hosts said how it went:
// the handoff when the target runs the domain and the source sent it, a
// failure when the source aborted it.
func (s *Service) advanceMigration(ctx context.Context, name string) error {
	if fault := s.reportsSeen(ctx, name); fault != nil {
		return fault
	}
	vm, head, err := s.cfg.Reader.VM(ctx, name)
	if err != nil {
		return err
	}
	m := vm.Migration
	switch {
	case m == nil:
		return nil
	case m.Aborted != nil:
		reason := MigrationAborted
		if m.Cancelling {
			reason = MigrationCancelled
		}
		return s.endMigration(ctx, vm, reason, m.Aborted)
	case m.Sent && m.Received:
		return s.handoff(ctx, vm, head)
	case m.Received && vm.Net != "":
		// The guest runs on the target from now on: its address leads
		// there at once, not when the source's call returns (seconds
		// later; measured: the old host lost the VM for ~3 s, ~0.5 s
		// this way). The handoff then finds it bound there already.
		c := newCommand(schedulerActor, "migration-"+m.ID+"-address", "", events.Origin{Time: s.cfg.Now()})
		_, fault := s.bindAddress(ctx, c, vm.Name, vm.UID, vm.Net, m.To)
		if fault != nil {
			return fault
		}
	}
	return nil
}

// endMigration appends vm.migration_failed: the VM stays on its source.
func (s *Service) endMigration(ctx context.Context, vm events.VMState, reason string, fault *events.Fault) error {
	m := vm.Migration
	c := newCommand(schedulerActor, "migration-"+m.ID+"-end", "", events.Origin{Time: s.cfg.Now()})
	res, f := appendStep(ctx, s, s.vms, c, vm.Name, stepOnly, events.TypeVMMigrationFailed, func(state *events.VMState) (events.Event, *events.Fault) {
		return decideMigrationFailed(*state, vm.UID, m.ID, reason, fault), nil
	})
	if f != nil {
		return f
	}
	if res.appended != nil && !res.replayed {
		s.log.Warn("migration failed; the vm stays on its source", keyVM, vm.Name, "from", m.From, "to", m.To, keyReason, reason, keyErr, fault)
		s.Nudge() // the target's allocation goes back
	}
	return nil
}

// handoff records the move in one atomic append: for each of the VM's
// grants, its release and a new grant to the same holder on the target,
// each lease subject checked against the grant it ends; then vm.migrated,
// checked against the VM's head, naming the new grants by how far back in
// the batch they are. A grant that no longer stands (expired, broken)
// means the VM may not run on the target: the migration fails instead,
// and the target's goal says absent.
func (s *Service) handoff(ctx context.Context, vm events.VMState, head events.Head) error {
	m := vm.Migration
	c := newCommand(schedulerActor, "migration-"+m.ID+"-handoff", "", events.Origin{Time: s.cfg.Now()})
	var msgs []*nats.Msg
	var grants []events.MovedGrant
	for _, l := range vm.Leases {
		r, err := events.ParseResource(l.Resource)
		if err != nil {
			return err
		}
		subject := events.LeaseSubject(r, l.Mode, vm.UID)
		last, err := bus.LastOnSubject(ctx, s.cfg.Conn, events.StreamEvents, subject)
		if err != nil && !errors.Is(err, bus.ErrNoMessage) {
			return fmt.Errorf("read %s: %w", subject, err)
		}
		state, err := s.cfg.Reader.LeaseOf(ctx, l.Resource, vm.UID)
		if err != nil {
			return err
		}
		if g, ok := state.Grant(l.Mode, vm.UID); !ok || g.Epoch != l.Epoch || g.Void || g.Breaking {
			return s.endMigration(ctx, vm, MigrationLapsed, events.Errorf(events.CodeLeaseNotCurrent,
				"%s %s grant %d of vm %s no longer stands: it may not run on %s", l.Resource, l.Mode, l.Epoch, vm.Name, m.To))
		}
		released := events.LeaseReleased{Holder: vm.UID, Epoch: l.Epoch, Reason: "migrated"}
		granted := events.LeaseGranted{Mode: l.Mode, LeaseHolder: events.LeaseHolder{ID: vm.UID, VM: vm.Name, Host: m.To}}
		prev := events.Hash(last.Data)
		for j, ev := range []events.Event{released, granted} {
			i := len(msgs)
			env, data, err := events.Seal(ev, events.KindLease, l.Resource, c.origin, i, prev)
			if err != nil {
				return err
			}
			msg := checkedMsg(subject, &env, data, last.Seq, events.MsgID(c.actor, c.id, i))
			if j > 0 {
				msg.Header.Del(jetstream.ExpectedLastSubjSeqHeader) // checked on its first write in the batch
			}
			msgs, prev = append(msgs, msg), events.Hash(data)
		}
		grants = append(grants, events.MovedGrant{Resource: l.Resource, Mode: l.Mode, Back: uint64(len(msgs) - 1)})
	}
	// The VM's address leads to the target's tunnel endpoint: bound there
	// when the target reported the guest running, or else in this append,
	// checked against the net's head.
	if vm.Net != "" {
		msg, fault := s.boundMsg(ctx, c, vm, m.To, len(msgs))
		if fault != nil {
			return fault
		}
		if msg != nil {
			msgs = append(msgs, msg)
		}
	}
	for i := range grants {
		grants[i].Back = uint64(len(msgs)) - grants[i].Back // counted back from vm.migrated, stored last
	}
	migrated := events.VMMigrated{UID: vm.UID, Migration: m.ID, From: m.From, To: m.To, AllocSeq: m.AllocSeq, Grants: grants}
	env, data, err := events.Seal(migrated, events.KindVM, vm.Name, c.origin, len(msgs), head.Hash)
	if err != nil {
		return err
	}
	msgs = append(msgs, checkedMsg(events.EventSubject(events.KindVM, vm.Name), &env, data, head.Seq, events.MsgID(c.actor, c.id, len(msgs))))
	seq, err := bus.PublishBatch(ctx, s.cfg.Conn, msgs)
	s.vms.drop(vm.Name)
	if errors.Is(err, bus.ErrWrongLastSeq) {
		return nil // another replica went first, or a subject moved: the next look decides again
	}
	if err != nil {
		return fmt.Errorf("append the move of vm %s: %w", vm.Name, err)
	}
	s.log.Info("vm migrated", keyVM, vm.Name, "from", m.From, "to", m.To, "migration", m.ID, "seq", seq,
		"downtime_ms", m.DowntimeMillis, "total_ms", m.TotalMillis)
	s.Nudge() // the source's allocation goes back
	return nil
}

// watchMigrations runs advanceMigration for each VM whose host reports on
// its migration, as the reports come (core NATS sees every message the
// stream stores), so a move is recorded as soon as both hosts said so,
// not at the next scheduler pass. It returns when ctx ends.
func (s *Service) watchMigrations(ctx context.Context) error {
	names := make(chan string, 64)
	sub, err := s.cfg.Conn.Subscribe(events.ObservationSubject("*", events.KindVM, "*"), func(m *nats.Msg) {
		switch events.Type(m.Header.Get(events.HeaderType)) {
		case events.TypeVMMigrationReceived, events.TypeVMMigrationSent, events.TypeVMMigrationAborted:
			addr, err := events.ParseEventSubject(m.Subject)
			if err != nil {
				return
			}
			select {
			case names <- addr.ID:
			default: // the scheduler's pass picks it up
			}
		}
	})
	if err != nil {
		return fmt.Errorf("watch migration reports: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	// A core subscriber may see a report before the stream stored it, and
	// then the read model cannot have it yet: look again a little later.
	type retry struct {
		name string
		at   time.Time
		left int
	}
	var retries []retry
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if len(retries) > 0 {
			slices.SortFunc(retries, func(a, b retry) int { return a.at.Compare(b.at) })
			timer.Reset(time.Until(retries[0].at))
		}
		select {
		case <-ctx.Done():
			return nil
		case name := <-names:
			s.advanceOnce(ctx, name)
			retries = append(retries, retry{name, time.Now().Add(reportRetry), 2})
		case <-timer.C:
			if len(retries) == 0 {
				continue
			}
			r := retries[0]
			retries = retries[1:]
			s.advanceOnce(ctx, r.name)
			if r.left > 1 {
				retries = append(retries, retry{r.name, time.Now().Add(4 * reportRetry), r.left - 1})
			}
		}
	}
}

// reportRetry is when a migration is looked at again after a report.
const reportRetry = 100 * time.Millisecond

// advanceOnce runs advanceMigration, logging a failure.
func (s *Service) advanceOnce(ctx context.Context, name string) {
	pass, cancel := context.WithTimeout(ctx, minPassTimeout)
	defer cancel()
	if err := s.advanceMigration(pass, name); err != nil && ctx.Err() == nil {
		s.log.Warn("advance migration; the scheduler will retry", keyVM, name, keyErr, err)
	}
}

// boundMsg is the sealed net.address_bound that moves vm's address to
// host, as message index of command c, checked against the net's head;
// nil when the address is bound there already.
func (s *Service) boundMsg(ctx context.Context, c *command, vm events.VMState, host string, index int) (*nats.Msg, *events.Fault) {
	endpoint, fault := s.endpointOf(ctx, host)
	if fault != nil {
		return nil, fault
	}
	n, head, err := s.cfg.Reader.Net(ctx, vm.Net)
	if err != nil {
		return nil, unavailable("read net "+vm.Net, err)
	}
	ev, fault := decideBind(n, vm.Name, vm.UID, host, endpoint)
	if fault != nil || ev == nil {
		return nil, fault
	}
	env, data, err := events.Seal(ev, events.KindNet, vm.Net, c.origin, index, head.Hash)
	if err != nil {
		return nil, events.Errorf(events.CodeInternal, "%v", err)
	}
	s.nets.drop(vm.Net)
	return checkedMsg(events.EventSubject(events.KindNet, vm.Net), &env, data, head.Seq, events.MsgID(c.actor, c.id, index)), nil
}
