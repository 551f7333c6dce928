package agents

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events"
)

// Hypervisor is what the agent needs of one connection to libvirtd.
// *libvirt.Client satisfies it. Verbs must be idempotent in the way the
// libvirt adapter's are: a domain already where a verb leads is a success.
type Hypervisor interface {
	// List returns every domain, defined or running, sorted by name.
	List(ctx context.Context) ([]libvirt.Domain, error)
	// Lookup returns the named domain, or an error matching libvirt.ErrNotFound.
	Lookup(ctx context.Context, name string) (libvirt.Domain, error)
	// Define creates or updates a domain's persistent definition.
	Define(ctx context.Context, spec libvirt.DomainSpec) error
	// Start boots a defined domain.
	Start(ctx context.Context, name string) error
	// Shutdown asks the guest to power off and returns without waiting.
	Shutdown(ctx context.Context, name string) error
	// Destroy powers a domain off at once, keeping its definition.
	Destroy(ctx context.Context, name string) error
	// Suspend pauses a running domain.
	Suspend(ctx context.Context, name string) error
	// Resume continues a paused domain.
	Resume(ctx context.Context, name string) error
	// Undefine removes a domain's definition; an absent domain is no error.
	Undefine(ctx context.Context, name string) error
	// Events streams lifecycle events of all domains until ctx ends or the
	// connection drops.
	Events(ctx context.Context) (<-chan libvirt.Event, error)
	// Disconnected closes when the connection to libvirtd is lost.
	Disconnected() <-chan struct{}
	// Close ends the connection and waits for what it started.
	Close() error
}

// runHypervisor owns the connection to libvirtd: it connects (Config.Hypervisor
// first, then Config.Dial with backoff), forwards lifecycle events, and on a
// lost connection marks libvirt unavailable and connects again. Every
// (re)connection queues all VMs and an orphan scan, so the agent converges
// on whatever libvirtd holds now.
func (a *Agent) runHypervisor(ctx context.Context) error {
	hv := a.cfg.Hypervisor
	failures := 0
	for {
		if hv == nil {
			if a.cfg.Dial == nil {
				return errors.New("libvirt connection lost and no Config.Dial to reconnect with")
			}
			var err error
			hv, err = a.cfg.Dial(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				failures++
				a.setHypervisor(nil, true)
				if ok, skipped := a.dialLog.allow(); ok {
					a.log.Warn("dial libvirtd; retrying", logErr, err, logSkipped, skipped)
				}
				if !sleepCtx(ctx, a.backoff(failures)) {
					return nil
				}
				continue
			}
		}
		lost, err := a.serveConnection(ctx, hv)
		if cerr := hv.Close(); cerr != nil {
			a.log.Debug("close libvirt connection", logErr, cerr)
		}
		hv = nil
		if ctx.Err() != nil {
			return nil
		}
		if lost {
			failures = 0
			a.log.Warn("libvirtd connection lost; reconnecting")
		} else {
			failures++
			a.markLost()
			a.log.Warn("libvirtd connection unusable; reconnecting", logErr, err)
			if !sleepCtx(ctx, a.backoff(failures)) {
				return nil
			}
		}
	}
}

// serveConnection subscribes to hv's events, makes hv the agent's
// hypervisor and forwards events until ctx ends or the connection is lost.
// lost is true when libvirtd went away, false when hv could not be used.
func (a *Agent) serveConnection(ctx context.Context, hv Hypervisor) (lost bool, err error) {
	connCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Subscribe before looking at anything, so no change falls between the
	// first look and the event stream.
	stream, err := hv.Events(connCtx)
	if err != nil {
		return false, fmt.Errorf("subscribe to libvirt events: %w", err)
	}
	a.ensurePool(ctx, hv)
	a.setHypervisor(hv, false)
	a.log.Info("libvirtd connected")
	a.enqueueAll()
	for {
		select {
		case <-ctx.Done():
			a.setHypervisor(nil, false)
			return false, nil
		case <-hv.Disconnected():
			a.markLost()
			return true, nil
		case ev, ok := <-stream:
			if ok {
				a.onDomainEvent(ev)
				continue
			}
			select {
			case <-hv.Disconnected():
				a.markLost()
				return true, nil
			default:
				return false, errors.New("libvirt event stream ended")
			}
		}
	}
}

// markLost drops the connection and queues every VM, so that those with
// work pending report that libvirtd is unavailable.
func (a *Agent) markLost() {
	a.setHypervisor(nil, true)
	a.enqueueAll()
}

// setHypervisor makes hv the connection workers use; nil while there is
// none. down says whether libvirtd is known to be unreachable (as opposed
// to the first connection still being made), which is when workers report
// VMs they cannot act on.
func (a *Agent) setHypervisor(hv Hypervisor, down bool) {
	a.mu.Lock()
	a.hv = hv
	a.hvDown = down && hv == nil
	a.mu.Unlock()
	if hv != nil {
		a.metrics.connected.Set(1)
	} else {
		a.metrics.connected.Set(0)
	}
}

// hypervisor returns the current connection, or nil and whether libvirtd
// is known to be down.
func (a *Agent) hypervisor() (hv Hypervisor, down bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hv, a.hvDown
}

// onDomainEvent queues whatever a lifecycle event may have changed: the VM
// whose domain it is, and the orphan scan when no goal names the domain or
// the domain came or went.
func (a *Agent) onDomainEvent(ev libvirt.Event) {
	a.mu.Lock()
	v, ok := a.vms[ev.Name]
	hasGoal := ok && v.hasGoal
	_, orphan := a.orphans[ev.Name]
	a.mu.Unlock()
	a.log.Debug("libvirt event", logVM, ev.Name, "kind", ev.Kind, "detail", ev.Detail)
	if hasGoal {
		a.queue.add(ev.Name, time.Time{})
	}
	if !hasGoal || orphan || ev.Kind == "defined" || ev.Kind == "undefined" {
		a.queue.add(orphanScanKey, time.Time{})
	}
}

// observedState is how a domain looks in an observation.
func observedState(dom libvirt.Domain, found bool) events.ObservedState {
	if !found {
		return events.ObservedAbsent
	}
	switch dom.State {
	case libvirt.StateShutoff:
		return events.ObservedStopped
	case libvirt.StatePaused, libvirt.StatePMSuspended:
		return events.ObservedPaused
	case libvirt.StateCrashed:
		return events.ObservedCrashed
	default: // running, blocked, shutting down, no state
		return events.ObservedRunning
	}
}

// lookup finds the named domain; found is false when it does not exist.
func lookup(ctx context.Context, hv Hypervisor, name string) (dom libvirt.Domain, found bool, err error) {
	dom, err = hv.Lookup(ctx, name)
	if errors.Is(err, libvirt.ErrNotFound) {
		return libvirt.Domain{}, false, nil
	}
	if err != nil {
		return libvirt.Domain{}, false, err
	}
	return dom, true, nil
}

// unavailable tells whether err means libvirtd could not be reached, as
// opposed to libvirtd refusing the operation.
func unavailable(err error) bool {
	return errors.Is(err, libvirt.ErrDisconnected) || errors.Is(err, libvirt.ErrClosed) ||
		errors.Is(err, context.DeadlineExceeded)
}

// unavailableFault is reported for VMs the agent cannot act on while
// libvirtd is unreachable. Its message is fixed so that repeated attempts
// compare equal and are reported once.
func unavailableFault() *events.Fault {
	return events.Errorf(events.CodeLibvirtUnavailable, "libvirtd is not reachable; the agent keeps reconnecting")
}

// faultOf turns a hypervisor error into the Fault to report.
func faultOf(err error) *events.Fault {
	var fault *events.Fault
	if errors.As(err, &fault) {
		return fault
	}
	if unavailable(err) {
		return unavailableFault()
	}
	// A *libvirt.Error reads "libvirt error <code>: <libvirt's message>",
	// after the step that failed.
	return events.Errorf(events.CodeLibvirtError, "%s", err.Error())
}

// parseUUID parses a UUID in its canonical 8-4-4-4-12 hex form.
func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("uuid %q: not in 8-4-4-4-12 form", s)
	}
	compact := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
	if _, err := hex.Decode(u[:], []byte(compact)); err != nil {
		return u, fmt.Errorf("uuid %q: %w", s, err)
	}
	return u, nil
}

// formatUUID formats u in its canonical lowercase 8-4-4-4-12 form.
func formatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// domainMetadata is Loom's metadata on the domain of goal.
func domainMetadata(goal events.Goal) map[string]string {
	return map[string]string{
		"uid":         goal.UID,
		"incarnation": strconv.FormatUint(goal.Incarnation, 10),
		"vm":          goal.VM,
	}
}

// metadataCurrent tells whether dom carries goal's metadata.
func metadataCurrent(dom libvirt.Domain, goal events.Goal) bool {
	for k, v := range domainMetadata(goal) {
		if dom.Metadata[k] != v {
			return false
		}
	}
	return true
}

// domainSpecOn is the libvirt definition of goal's domain, writing to
// disk (its top layer; empty on a host without disks).
func (a *Agent) domainSpecOn(goal events.Goal, uuid [16]byte, disk string) libvirt.DomainSpec {
	spec := libvirt.DomainSpec{
		Name:      goal.VM,
		UUID:      uuid,
		VCPUs:     goal.Spec.CPU,
		MemoryMiB: goal.Spec.MemoryMiB,
		Metadata:  domainMetadata(goal),
		DiskPath:  disk,
	}
	_, spec.SerialPath = a.vmFiles(goal)
	if spec.DiskPath != "" && goal.Spec.Disk.Boot != nil {
		b := goal.Spec.Disk.Boot
		spec.Kernel, spec.Initrd, spec.Cmdline = b.Kernel, b.Initrd, b.Cmdline
	}
	return spec
}

// storagePool is the name of the storage pool on a host's StorageDir.
const storagePool = "loom"

// ensurePool makes the host's StorageDir a storage pool on a host that
// receives migrations: the target's libvirtd creates an incoming VM's disk
// only inside one. A failure is logged: the host still runs its VMs, and a
// migration to it fails with libvirt's own message.
func (a *Agent) ensurePool(ctx context.Context, hv Hypervisor) {
	mig, ok := hv.(Migrator)
	if !ok || a.cfg.StorageDir == "" || a.cfg.MigrateURI == "" {
		return
	}
	if err := mig.EnsureDirPool(ctx, storagePool, a.cfg.StorageDir); err != nil {
		a.log.Warn("storage pool for incoming migrations", "dir", a.cfg.StorageDir, logErr, err)
	}
}
