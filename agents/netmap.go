package agents

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/agents/overlay"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// Virtual networks on this host. An agent with a tunnel endpoint follows
// the nets' events (every binding of an address to a VM, its host and the
// host's endpoint) and keeps, for each net, a bridge and a VXLAN device
// here, with a forwarding entry per address of the VMs (and host ports) on
// other hosts, and the host's own port, if it has one, on the bridge.
// When a VM moves, its address's binding moves in the append that records
// the move, and every host's entries follow.

// OverlayConfig is how the agent programs this host's networking: the
// device its TunnelEndpoint is on, and a command prefix for another
// network namespace (tests run each host in its own).
type OverlayConfig struct {
	Underlay string
	Prefix   []string
}

// overlayOf is the overlay config of net n on this host, and whether this
// host takes part in overlays at all.
func (a *Agent) overlayOf(vni uint32) (overlay.Config, bool) {
	local, err := netip.ParseAddr(a.cfg.TunnelEndpoint)
	if a.cfg.Overlay == nil || err != nil {
		return overlay.Config{}, false
	}
	return overlay.Config{Prefix: a.cfg.Overlay.Prefix, VNI: vni, Local: local, Underlay: a.cfg.Overlay.Underlay}, true
}

// followNets follows loom.evt.net.> from the start until ctx ends, folding
// each net and programming its overlay here after every change.
func (a *Agent) followNets(ctx context.Context) error {
	if _, ok := a.overlayOf(1); !ok {
		return nil
	}
	log := throttle{period: time.Minute}
	for failures := 1; ; failures++ {
		err := a.consumeNets(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if ok, skipped := log.allow(); ok {
			a.log.Warn("follow nets; restarting", logErr, err, logSkipped, skipped)
		}
		if !sleepCtx(ctx, a.backoff(failures)) {
			return nil
		}
	}
}

func (a *Agent) consumeNets(ctx context.Context) error {
	filter := events.EventSubject(events.KindNet, "*")
	stream, err := a.cfg.JS.Stream(ctx, events.StreamEvents)
	if err != nil {
		return err
	}
	cons, err := bus.OrderedConsumer(ctx, a.cfg.JS, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		return fmt.Errorf("follow %s: %w", filter, err)
	}
	defer bus.Forget(a.cfg.JS, events.StreamEvents, cons)
	msgs, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("follow %s: %w", filter, err)
	}
	defer msgs.Stop()
	nets := map[string]*events.NetState{}
	a.mu.Lock()
	a.nets = nets
	a.mu.Unlock()
	for {
		msg, err := msgs.Next(jetstream.NextContext(ctx))
		if err != nil {
			return fmt.Errorf("follow %s: %w", filter, err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return err
		}
		rec, err := events.DecodeRecord(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data())
		if err != nil {
			a.log.Warn("undecodable net event ignored", logSubject, msg.Subject(), logSeq, meta.Sequence.Stream, logErr, err)
			continue
		}
		a.mu.Lock()
		n := nets[rec.Envelope.AggregateID]
		if n == nil {
			n = &events.NetState{}
			nets[rec.Envelope.AggregateID] = n
		}
		err = n.Apply(&rec)
		a.mu.Unlock()
		if err != nil {
			a.log.Warn("net event refused", logSubject, msg.Subject(), logSeq, rec.Seq, logErr, err)
			continue
		}
		if meta.NumPending == 0 || rec.Envelope.Type == events.TypeNetCreated {
			for _, n := range nets {
				if err := a.programNet(ctx, n); err != nil {
					return err
				}
			}
		}
	}
}

// programNet makes this host's side of net n what its bindings say: the
// bridge and VXLAN device, the host's port on the bridge, and an entry
// for each address on another host.
func (a *Agent) programNet(ctx context.Context, n *events.NetState) error {
	if !n.Created {
		return nil
	}
	cfg, _ := a.overlayOf(n.VNI)
	if err := overlay.Ensure(ctx, cfg); err != nil {
		return fmt.Errorf("net %s: %w", n.Name, err)
	}
	if err := a.programPort(ctx, cfg, n); err != nil {
		return fmt.Errorf("net %s: %w", n.Name, err)
	}
	var entries []overlay.Entry
	for _, b := range n.Bindings {
		if b.Host == a.cfg.Host || b.Endpoint == "" {
			continue
		}
		addr, err1 := netip.ParseAddr(b.Addr)
		mac, err2 := net.ParseMAC(b.MAC)
		endpoint, err3 := netip.ParseAddr(b.Endpoint)
		if err1 != nil || err2 != nil || err3 != nil {
			a.log.Warn("unusable binding ignored", "net", n.Name, "addr", b.Addr, "mac", b.MAC, "endpoint", b.Endpoint)
			continue
		}
		entries = append(entries, overlay.Entry{Addr: addr, MAC: mac, Endpoint: endpoint})
	}
	if err := overlay.SetPeers(ctx, cfg, entries); err != nil {
		return fmt.Errorf("net %s: %w", n.Name, err)
	}
	a.log.Debug("net programmed", "net", n.Name, "vni", n.VNI, "peers", len(entries))
	return nil
}

// programPort gives this host's bridge for net n the address and MAC of
// the host's port on n, or takes the port away when it has none. Other
// hosts' ports are peers like VMs.
func (a *Agent) programPort(ctx context.Context, cfg overlay.Config, n *events.NetState) error {
	b, ok := n.BindingOf(events.PortUID(a.cfg.Host))
	if !ok {
		return overlay.ClearPort(ctx, cfg)
	}
	addr, err1 := netip.ParseAddr(b.Addr)
	prefix, err2 := netip.ParsePrefix(n.CIDR)
	mac, err3 := net.ParseMAC(b.MAC)
	if err1 != nil || err2 != nil || err3 != nil {
		a.log.Warn("unusable port ignored", "net", n.Name, "addr", b.Addr, "cidr", n.CIDR, "mac", b.MAC)
		return overlay.ClearPort(ctx, cfg)
	}
	return overlay.SetPort(ctx, cfg, netip.PrefixFrom(addr, prefix.Bits()), mac)
}

// netInterface is the network card of goal's VM: on its net's bridge, with
// its MAC; the bridge is made if it is not there yet. Nil when the VM is
// on no net, or this host takes part in none.
func (a *Agent) netInterface(ctx context.Context, goal events.Goal) (*netCard, error) {
	addr := goal.Spec.Net
	if addr == nil {
		return nil, nil
	}
	cfg, ok := a.overlayOf(addr.VNI)
	if !ok {
		return nil, nil
	}
	if err := overlay.Ensure(ctx, cfg); err != nil {
		return nil, fmt.Errorf("net %s: %w", addr.Net, err)
	}
	return &netCard{bridge: cfg.BridgeName(), mac: addr.MAC, cmdline: fmt.Sprintf("loom.ip=%s/%d", addr.Addr, addr.Prefix)}, nil
}

// netCard is what a VM's domain needs of its net.
type netCard struct {
	bridge, mac, cmdline string
}

// portOn is this host's port address on net, if it has one.
func (a *Agent) portOn(net string) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := a.nets[net]
	if n == nil {
		return "", false
	}
	b, ok := n.BindingOf(events.PortUID(a.cfg.Host))
	return b.Addr, ok
}
