package libvirt

import (
	"context"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// Event is one domain lifecycle change reported by libvirtd.
type Event struct {
	Name string
	UUID [16]byte
	// Kind is one of "defined", "undefined", "started", "suspended",
	// "resumed", "stopped", "shutdown", "pmsuspended", "crashed", or
	// "unknown" for event types newer than this package.
	Kind string
	// Detail is libvirt's kind-specific detail code (for "stopped":
	// 0 = shut down, 1 = destroyed, 2 = crashed, 3 = migrated, ...).
	Detail int32
}

// eventKinds is indexed by virDomainEventType.
var eventKinds = [...]string{"defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown", "pmsuspended", "crashed"}

func eventKind(typ int32) string {
	if typ >= 0 && int(typ) < len(eventKinds) {
		return eventKinds[typ]
	}
	return "unknown"
}

// Events subscribes to lifecycle events of all domains. The channel closes
// when ctx ends, the Client closes or the connection drops. Events not yet
// received queue without bound, so receive promptly or cancel ctx.
func (c *Client) Events(ctx context.Context) (<-chan Event, error) {
	if err := c.usable(ctx); err != nil {
		return nil, fmt.Errorf("subscribe events: %w", err)
	}
	streamCtx, cancel := context.WithCancel(ctx)
	stopOnClose := context.AfterFunc(c.lifetime, cancel)

	out := make(chan Event)
	registered := make(chan error, 1)
	// Registration and forwarding share one goroutine, so a registration the
	// caller gave up on still gets its stream drained and closed.
	started := c.goTracked(func() {
		defer close(out)
		defer stopOnClose()
		defer cancel()
		msgs, err := c.rpc.LifecycleEvents(streamCtx)
		registered <- err
		if err != nil {
			return
		}
		forwardEvents(streamCtx, msgs, out)
	})
	if !started {
		cancel()
		return nil, fmt.Errorf("subscribe events: %w", ErrClosed)
	}

	timeout, cancelTimeout := context.WithTimeout(ctx, c.cfg.RPCTimeout)
	defer cancelTimeout()
	select {
	case err := <-registered:
		if err != nil {
			return nil, fmt.Errorf("subscribe events: %w", translate(err, c.isGone()))
		}
		return out, nil
	case <-timeout.Done():
		cancel()
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("subscribe events: %w", err)
		}
		return nil, fmt.Errorf("subscribe events: rpc timed out after %s: %w", c.cfg.RPCTimeout, timeout.Err())
	case <-c.lifetime.Done():
		return nil, fmt.Errorf("subscribe events: %w", ErrClosed)
	}
}

// forwardEvents copies msgs to out until ctx ends or msgs closes. go-libvirt
// sends on msgs without watching ctx, so on the way out msgs is drained until
// go-libvirt closes it.
func forwardEvents(ctx context.Context, msgs <-chan golibvirt.DomainEventLifecycleMsg, out chan<- Event) {
	defer func() {
		for range msgs {
		}
	}()
	for {
		select {
		case msg, ok := <-msgs:
			if !ok {
				return
			}
			ev := Event{Name: msg.Dom.Name, UUID: msg.Dom.UUID, Kind: eventKind(msg.Event), Detail: msg.Detail}
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			}
		case <-ctx.Done():
			return
		}
	}
}
