// Package dispatch turns the VM read model into goal states: one document
// per VM on loom.goal.<host>.<vm>, whose incarnation is the stream sequence
// of the decision that produced it.
//
// A goal subject's incarnation never goes backwards. The dispatcher keeps
// what it last saw on each goal subject (incarnation and stream sequence),
// publishes only a higher incarnation, and publishes it with the goal
// subject's sequence as the expected last subject sequence: a lagging or
// rebuilding dispatcher, or several at once, can lose a race but never
// overwrite a newer goal. Onto an empty goal subject (a new VM, or one whose
// goal was removed) it publishes only if no later decision stands on the
// VM's own subject, read through the stream leader, so a dispatcher whose
// read model lags cannot resurrect a deleted VM's goal.
//
// Once the agent has reported a deleted VM absent, the goal subject is
// purged, up to and including the absent goal only.
package dispatch

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// DefaultResync is how often the dispatcher compares every VM with its goal
// even when nothing was notified.
const DefaultResync = 30 * time.Second

// Reader is what the dispatcher needs of the VM read model.
type Reader interface {
	// VM is the named VM's state; the zero state when it does not exist.
	VM(ctx context.Context, name string) (events.VMState, events.Head, error)
	// AllVMs lists every VM the read model knows, gone ones included.
	AllVMs(ctx context.Context) ([]events.VMState, error)
	// Image is the named image: where its bytes are on the hosts, and
	// how it boots, for the goal's domain spec.
	Image(ctx context.Context, name string) (events.ImageState, events.Head, error)
	// Net is the named virtual network, with each address's binding: the
	// goal names the VM's address, its MAC and its segment.
	Net(ctx context.Context, name string) (events.NetState, events.Head, error)
}

// Config configures a Dispatcher.
type Config struct {
	Conn   *nats.Conn
	JS     jetstream.JetStream
	Reader Reader
	// Resync is the period of full comparisons; zero means DefaultResync.
	Resync time.Duration
	Logger *slog.Logger
}

// Dispatcher publishes goal states. Run it; Notify it of changed VMs.
type Dispatcher struct {
	cfg Config
	log *slog.Logger

	wake chan struct{}

	mu sync.Mutex // guards the fields below
	// dirty names VMs to look at on the next pass.
	dirty map[string]struct{}
	// goals is what stands on each goal subject, by subject.
	goals map[string]standing
	// published counts goals published, for metrics and tests.
	published uint64
	// passes counts completed passes over dirty or all VMs.
	passes uint64
}

// standing is what a goal subject holds.
type standing struct {
	incarnation uint64
	seq         uint64
}

// New makes a Dispatcher; it does nothing until Run.
func New(cfg Config) *Dispatcher {
	if cfg.Resync == 0 {
		cfg.Resync = DefaultResync
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Dispatcher{cfg: cfg, log: log.With("component", "dispatcher"), wake: make(chan struct{}, 1),
		dirty: map[string]struct{}{}, goals: map[string]standing{}}
}

// Notify tells the dispatcher these VMs changed. It never blocks, so the
// projection runner can call it after every commit.
func (d *Dispatcher) Notify(vms []string) {
	if len(vms) == 0 {
		return
	}
	d.mu.Lock()
	for _, vm := range vms {
		d.dirty[vm] = struct{}{}
	}
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Published is how many goals this dispatcher has published.
func (d *Dispatcher) Published() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.published
}

// Passes is how many passes over the VMs this dispatcher has completed.
func (d *Dispatcher) Passes() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.passes
}

// Run loads the goals that stand, brings every VM's goal up to date, then
// follows notifications until ctx ends.
func (d *Dispatcher) Run(ctx context.Context) error {
	for {
		err := d.loadGoals(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		d.log.Warn("load goals; retrying", "err", err)
		if !sleep(ctx, time.Second) {
			return nil
		}
	}
	resync := time.NewTicker(d.cfg.Resync)
	defer resync.Stop()
	full := true
	for {
		if err := d.pass(ctx, full); err != nil && ctx.Err() == nil {
			d.log.Warn("dispatch pass", "err", err)
			full = true // something failed: look at everything next time
			if !sleep(ctx, 500*time.Millisecond) {
				return nil
			}
			continue
		}
		full = false
		select {
		case <-ctx.Done():
			return nil
		case <-d.wake:
		case <-resync.C:
			full = true
		}
	}
}

func (d *Dispatcher) loadGoals(ctx context.Context) error {
	msgs, err := bus.LastPerSubject(ctx, d.cfg.JS, events.StreamGoals, events.GoalsWildcard)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, m := range msgs {
		inc, err := strconv.ParseUint(m.Header.Get(events.HeaderIncarnation), 10, 64)
		if err != nil {
			var g events.Goal
			if derr := events.Unmarshal(m.Data, &g); derr != nil {
				d.log.Warn("unreadable goal; it will be replaced", "subject", m.Subject, "err", derr)
			}
			inc = g.Incarnation
		}
		d.goals[m.Subject] = standing{incarnation: inc, seq: m.Seq}
	}
	return nil
}

// pass looks at the dirty VMs, or at all of them.
func (d *Dispatcher) pass(ctx context.Context, full bool) error {
	d.mu.Lock()
	dirty := d.dirty
	d.dirty = map[string]struct{}{}
	d.mu.Unlock()

	var states []events.VMState
	if full {
		all, err := d.cfg.Reader.AllVMs(ctx)
		if err != nil {
			d.requeue(dirty)
			return fmt.Errorf("list vms: %w", err)
		}
		states = all
	} else {
		for name := range dirty {
			s, _, err := d.cfg.Reader.VM(ctx, name)
			if err != nil {
				d.requeue(dirty)
				return fmt.Errorf("read vm %s: %w", name, err)
			}
			if s.Name == "" {
				s.Name = name
			}
			states = append(states, s)
		}
	}
	var firstErr error
	for i := range states {
		if err := d.dispatch(ctx, &states[i]); err != nil {
			d.requeue(map[string]struct{}{states[i].Name: {}})
			firstErr = errors.Join(firstErr, err)
		}
	}
	d.mu.Lock()
	d.passes++
	d.mu.Unlock()
	return firstErr
}

func (d *Dispatcher) requeue(names map[string]struct{}) {
	d.mu.Lock()
	for n := range names {
		d.dirty[n] = struct{}{}
	}
	d.mu.Unlock()
}

// dispatch brings one VM's goal subject in line with its state.
func (d *Dispatcher) dispatch(ctx context.Context, s *events.VMState) error {
	if s.Phase == events.PhaseGone && s.Host != "" {
		return d.removeGoal(ctx, s)
	}
	goal, ok := events.GoalOf(s)
	if !ok {
		return nil
	}
	if goal.Desired != events.DesiredAbsent {
		img, _, err := d.cfg.Reader.Image(ctx, s.Image)
		if err != nil {
			return fmt.Errorf("read image %s: %w", s.Image, err)
		}
		if img.Registered && img.Source != "" {
			goal.Spec.Disk = &events.ImageDisk{Source: img.Source, Format: img.Format, Boot: img.Boot}
		}
		if s.Net != "" {
			addr, err := d.addressOf(ctx, s)
			if err != nil {
				return err
			}
			goal.Spec.Net = addr
		}
	}
	if in, ok := events.IncomingGoalOf(s); ok {
		in.Spec = goal.Spec
		if err := d.publish(ctx, in); err != nil {
			return err
		}
	}
	migratingTo := ""
	if s.Migration != nil {
		migratingTo = s.Migration.To // its goal there expects the VM now
	}
	if left, ok := leftGoal(s); ok && s.Left == migratingTo {
		// The VM comes back to the host it left: the incoming goal stands there.
	} else if ok && !s.LeftGone {
		if err := d.publish(ctx, left); err != nil {
			return err
		}
	} else if ok {
		if err := d.purge(ctx, events.GoalSubject(s.Left, s.Name), s.Incarnation); err != nil {
			return err
		}
	}
	return d.publish(ctx, goal)
}

// addressOf is the VM's address on its net, nil while it has none.
func (d *Dispatcher) addressOf(ctx context.Context, s *events.VMState) (*events.NetAddress, error) {
	n, _, err := d.cfg.Reader.Net(ctx, s.Net)
	if err != nil {
		return nil, fmt.Errorf("read net %s: %w", s.Net, err)
	}
	b, ok := n.BindingOf(s.UID)
	if !ok {
		return nil, nil
	}
	prefix, err := netip.ParsePrefix(n.CIDR)
	if err != nil {
		return nil, fmt.Errorf("net %s: %w", s.Net, err)
	}
	return &events.NetAddress{Net: s.Net, VNI: n.VNI, Addr: b.Addr, Prefix: prefix.Bits(), MAC: b.MAC}, nil
}

// leftGoal is the goal of a VM on the host it was moved off: absent, so
// that the host, if it ever comes back, destroys the domain rather than
// resuming it, keeping only the files of the VM's checkpoints there.
func leftGoal(s *events.VMState) (events.Goal, bool) {
	if s.Left == "" || s.Left == s.Host || s.Phase != events.PhasePlaced {
		return events.Goal{}, false
	}
	return events.Goal{VM: s.Name, UID: s.UID, Host: s.Left, Desired: events.DesiredAbsent, AbsentReason: s.LeftReason,
		Incarnation: s.Incarnation, Spec: events.DomainSpec{Image: s.Image, CPU: s.CPU, MemoryMiB: s.MemoryMiB},
		Keep: s.CheckpointsOn(s.Left)}, true
}

// publish puts goal on its subject unless a goal of the same or a higher
// incarnation stands there.
func (d *Dispatcher) publish(ctx context.Context, goal events.Goal) error {
	subject := events.GoalSubject(goal.Host, goal.VM)
	d.mu.Lock()
	have := d.goals[subject]
	d.mu.Unlock()
	if goal.Incarnation <= have.incarnation {
		return nil
	}
	if have.seq == 0 {
		stale, err := d.staleForEmptySubject(ctx, goal)
		if err != nil || stale {
			return err
		}
	}
	data, err := events.Marshal(&goal)
	if err != nil {
		return err
	}
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	msg.Header.Set(events.HeaderType, "goal")
	msg.Header.Set(events.HeaderIncarnation, strconv.FormatUint(goal.Incarnation, 10))
	msg.Header.Set(jetstream.MsgIDHeader, subject+"@"+strconv.FormatUint(goal.Incarnation, 10))
	ack, err := bus.PublishExpecting(ctx, d.cfg.JS, msg, bus.Expect{Seq: have.seq})
	if errors.Is(err, bus.ErrWrongLastSeq) {
		// Another dispatcher moved the goal: learn what stands, and look at
		// this VM again.
		return d.refresh(ctx, subject)
	}
	if err != nil {
		return fmt.Errorf("publish goal %s@%d: %w", subject, goal.Incarnation, err)
	}
	d.mu.Lock()
	d.goals[subject] = standing{incarnation: goal.Incarnation, seq: ack.Seq}
	d.published++
	d.mu.Unlock()
	d.log.Debug("goal published", "vm", goal.VM, "host", goal.Host, "desired", goal.Desired, "incarnation", goal.Incarnation)
	return nil
}

// staleForEmptySubject tells whether a later decision on the VM's own
// subject supersedes goal, reading through the stream leader.
func (d *Dispatcher) staleForEmptySubject(ctx context.Context, goal events.Goal) (bool, error) {
	last, err := bus.LastOnSubject(ctx, d.cfg.Conn, events.StreamEvents, events.EventSubject(events.KindVM, goal.VM))
	if err != nil {
		return false, err
	}
	return last.Seq > goal.Incarnation, nil
}

// refresh re-reads what stands on a goal subject and marks it for another look.
func (d *Dispatcher) refresh(ctx context.Context, subject string) error {
	m, err := bus.LastOnSubject(ctx, d.cfg.Conn, events.StreamGoals, subject)
	var st standing
	switch {
	case errors.Is(err, bus.ErrNoMessage):
	case err != nil:
		return err
	default:
		inc, _ := strconv.ParseUint(m.Header.Get(events.HeaderIncarnation), 10, 64)
		st = standing{incarnation: inc, seq: m.Seq}
	}
	d.mu.Lock()
	d.goals[subject] = st
	d.mu.Unlock()
	_, vm, _ := events.ParseGoalSubject(subject)
	return fmt.Errorf("goal %s moved under us; will look again at %s", subject, vm)
}

// removeGoal purges a gone VM's goal subject, but only up to the goal that
// sent it away, so a newer incarnation's goal on the same subject survives.
func (d *Dispatcher) removeGoal(ctx context.Context, s *events.VMState) error {
	return d.purge(ctx, events.GoalSubject(s.Host, s.Name), s.Incarnation)
}

// purge removes the goal on subject if the one standing is not newer than
// incarnation.
func (d *Dispatcher) purge(ctx context.Context, subject string, incarnation uint64) error {
	d.mu.Lock()
	have, ok := d.goals[subject]
	d.mu.Unlock()
	if !ok || have.incarnation > incarnation {
		return nil
	}
	stream, err := d.cfg.JS.Stream(ctx, events.StreamGoals)
	if err != nil {
		return err
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject(subject), jetstream.WithPurgeSequence(have.seq+1)); err != nil {
		return fmt.Errorf("remove goal %s: %w", subject, err)
	}
	d.mu.Lock()
	if d.goals[subject] == have {
		delete(d.goals, subject)
	}
	d.mu.Unlock()
	d.log.Debug("goal removed", "subject", subject)
	return nil
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
