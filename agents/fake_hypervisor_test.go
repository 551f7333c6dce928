package agents

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/loomctl/loom/agents/libvirt"
)

// Libvirt error numbers the fake answers with, as libvirtd would.
const (
	codeInternal         = 1
	codeOperationInvalid = 55
	codeNoDomain         = 42
)

// fakeHost is an in-memory libvirtd: domains and their lifecycle events,
// shared by every connection dialed to it. Verbs behave like the libvirt
// adapter's (idempotent, libvirt's error codes); Fail makes one step fail.
type fakeHost struct {
	mu sync.Mutex // guards everything below
	// fail, when set, is asked before each verb with the verb's name
	// ("define", "start", ...) and the domain; an error fails the verb.
	fail func(op, name string) error
	// ignoreShutdown makes guests ignore power-off requests.
	ignoreShutdown bool
	domains        map[string]*fakeDomain
	conns          map[*fakeConn]struct{}
	down           bool
	// calls counts verbs by name.
	calls map[string]int
}

type fakeDomain struct {
	uuid      [16]byte
	state     libvirt.State
	metadata  map[string]string
	transient bool // undefined while running: goes away when it stops
	disk      string
}

func newFakeHost() *fakeHost {
	return &fakeHost{domains: map[string]*fakeDomain{}, conns: map[*fakeConn]struct{}{}, calls: map[string]int{}}
}

// setFail installs f as the fault injector; nil removes it.
func (h *fakeHost) setFail(f func(op, name string) error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fail = f
}

// setIgnoreShutdown makes guests ignore (or heed) power-off requests.
func (h *fakeHost) setIgnoreShutdown(ignore bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ignoreShutdown = ignore
}

// dial connects to the host; it fails while the host is down.
func (h *fakeHost) dial(ctx context.Context) (Hypervisor, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.down {
		return nil, fmt.Errorf("dial fake libvirtd: connection refused")
	}
	c := &fakeConn{host: h, gone: make(chan struct{}), subs: map[chan libvirt.Event]struct{}{}}
	h.conns[c] = struct{}{}
	return c, nil
}

// kill takes libvirtd away: every connection drops and dials fail.
func (h *fakeHost) kill() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.down = true
	for c := range h.conns {
		c.dropLocked()
	}
}

// revive lets dials succeed again; domains are as they were.
func (h *fakeHost) revive() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.down = false
}

// domain returns a copy of the named domain.
func (h *fakeHost) domain(name string) (fakeDomain, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[name]
	if !ok {
		return fakeDomain{}, false
	}
	return *d, true
}

// count is how often the verb op ran.
func (h *fakeHost) count(op string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls[op]
}

// setState changes a domain's state behind the agent's back.
func (h *fakeHost) setState(name string, state libvirt.State, kind string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[name]
	d.state = state
	h.emitLocked(name, d.uuid, kind)
}

// defineDirect defines a domain behind the agent's back.
func (h *fakeHost) defineDirect(name string, uuid [16]byte, state libvirt.State) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.domains[name] = &fakeDomain{uuid: uuid, state: state}
	h.emitLocked(name, uuid, "defined")
}

// removeDirect undefines a domain behind the agent's back.
func (h *fakeHost) removeDirect(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d := h.domains[name]
	delete(h.domains, name)
	h.emitLocked(name, d.uuid, "undefined")
}

func (h *fakeHost) emitLocked(name string, uuid [16]byte, kind string) {
	ev := libvirt.Event{Name: name, UUID: uuid, Kind: kind}
	for c := range h.conns {
		for ch := range c.subs {
			select {
			case ch <- ev:
			default: // a subscriber this far behind loses events, as a test would notice
			}
		}
	}
}

// fakeConn is one connection to a fakeHost.
type fakeConn struct {
	host *fakeHost
	gone chan struct{}
	// subs are the open event streams; guarded by host.mu.
	subs map[chan libvirt.Event]struct{}
}

var _ Hypervisor = (*fakeConn)(nil)

// dropLocked ends the connection.
func (c *fakeConn) dropLocked() {
	select {
	case <-c.gone:
		return
	default:
	}
	close(c.gone)
	for ch := range c.subs {
		close(ch)
	}
	clear(c.subs)
	delete(c.host.conns, c)
}

// verb runs f under the host's lock after the checks every verb makes.
func (c *fakeConn) verb(ctx context.Context, op, name string, f func(h *fakeHost) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	h := c.host
	h.mu.Lock()
	fail := h.fail
	h.mu.Unlock()
	if fail != nil {
		if err := fail(op, name); err != nil {
			return fmt.Errorf("%s domain %s: %w", op, name, err)
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	select {
	case <-c.gone:
		return fmt.Errorf("%s domain %s: %w", op, name, libvirt.ErrDisconnected)
	default:
	}
	h.calls[op]++
	if err := f(h); err != nil {
		return fmt.Errorf("%s domain %s: %w", op, name, err)
	}
	return nil
}

func noDomain(name string) error {
	return &libvirt.Error{Code: codeNoDomain, Message: "Domain not found: no domain with matching name '" + name + "'"}
}

func (c *fakeConn) List(ctx context.Context) ([]libvirt.Domain, error) {
	var out []libvirt.Domain
	err := c.verb(ctx, "list", "*", func(h *fakeHost) error {
		for name, d := range h.domains {
			out = append(out, d.describe(name))
		}
		return nil
	})
	slices.SortFunc(out, func(a, b libvirt.Domain) int { return strings.Compare(a.Name, b.Name) })
	return out, err
}

func (c *fakeConn) Lookup(ctx context.Context, name string) (libvirt.Domain, error) {
	var out libvirt.Domain
	err := c.verb(ctx, "lookup", name, func(h *fakeHost) error {
		d, ok := h.domains[name]
		if !ok {
			return noDomain(name)
		}
		out = d.describe(name)
		return nil
	})
	return out, err
}

func (d *fakeDomain) describe(name string) libvirt.Domain {
	var kv map[string]string
	if d.metadata != nil {
		kv = maps.Clone(d.metadata)
	}
	return libvirt.Domain{Name: name, UUID: d.uuid, State: d.state, Metadata: kv}
}

func (c *fakeConn) Define(ctx context.Context, spec libvirt.DomainSpec) error {
	return c.verb(ctx, "define", spec.Name, func(h *fakeHost) error {
		if err := libvirt.ValidateName(spec.Name); err != nil {
			return err
		}
		d, ok := h.domains[spec.Name]
		if ok && d.uuid != spec.UUID {
			return &libvirt.Error{Code: codeOperationInvalid, Message: "domain '" + spec.Name + "' already exists with another uuid"}
		}
		if !ok {
			d = &fakeDomain{uuid: spec.UUID, state: libvirt.StateShutoff}
			h.domains[spec.Name] = d
		}
		d.metadata, d.transient, d.disk = maps.Clone(spec.Metadata), false, spec.DiskPath
		h.emitLocked(spec.Name, d.uuid, "defined")
		return nil
	})
}

// transition moves an existing domain from one of from to to, emitting
// kind; a domain already in to is left alone.
func (c *fakeConn) transition(ctx context.Context, op, name string, to libvirt.State, kind string, from ...libvirt.State) error {
	return c.verb(ctx, op, name, func(h *fakeHost) error {
		d, ok := h.domains[name]
		switch {
		case !ok:
			return noDomain(name)
		case d.state == to:
			return nil
		case !slices.Contains(from, d.state):
			return &libvirt.Error{Code: codeOperationInvalid, Message: fmt.Sprintf("Requested operation is not valid: domain is %s", d.state)}
		}
		if op == "shutdown" && h.ignoreShutdown {
			return nil
		}
		d.state = to
		if to == libvirt.StateShutoff && d.transient {
			delete(h.domains, name)
		}
		h.emitLocked(name, d.uuid, kind)
		return nil
	})
}

func (c *fakeConn) Start(ctx context.Context, name string) error {
	return c.transition(ctx, "start", name, libvirt.StateRunning, "started", libvirt.StateShutoff)
}

func (c *fakeConn) Shutdown(ctx context.Context, name string) error {
	return c.transition(ctx, "shutdown", name, libvirt.StateShutoff, "stopped", libvirt.StateRunning, libvirt.StatePaused)
}

func (c *fakeConn) Destroy(ctx context.Context, name string) error {
	return c.transition(ctx, "destroy", name, libvirt.StateShutoff, "stopped",
		libvirt.StateRunning, libvirt.StatePaused, libvirt.StateCrashed, libvirt.StateShutdown)
}

func (c *fakeConn) Suspend(ctx context.Context, name string) error {
	return c.transition(ctx, "suspend", name, libvirt.StatePaused, "suspended", libvirt.StateRunning)
}

func (c *fakeConn) Resume(ctx context.Context, name string) error {
	return c.transition(ctx, "resume", name, libvirt.StateRunning, "resumed", libvirt.StatePaused)
}

func (c *fakeConn) Undefine(ctx context.Context, name string) error {
	return c.verb(ctx, "undefine", name, func(h *fakeHost) error {
		d, ok := h.domains[name]
		switch {
		case !ok:
			return nil
		case d.state != libvirt.StateShutoff:
			d.transient = true
		default:
			delete(h.domains, name)
		}
		h.emitLocked(name, d.uuid, "undefined")
		return nil
	})
}

func (c *fakeConn) Events(ctx context.Context) (<-chan libvirt.Event, error) {
	ch := make(chan libvirt.Event, 1024)
	err := c.verb(ctx, "events", "*", func(h *fakeHost) error {
		c.subs[ch] = struct{}{}
		return nil
	})
	if err != nil {
		return nil, err
	}
	context.AfterFunc(ctx, func() {
		c.host.mu.Lock()
		defer c.host.mu.Unlock()
		if _, ok := c.subs[ch]; ok {
			delete(c.subs, ch)
			close(ch)
		}
	})
	return ch, nil
}

func (c *fakeConn) Disconnected() <-chan struct{} { return c.gone }

func (c *fakeConn) Close() error {
	c.host.mu.Lock()
	defer c.host.mu.Unlock()
	c.dropLocked()
	return nil
}
