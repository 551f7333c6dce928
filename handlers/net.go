package handlers

import (
	"context"
	"errors"

	"github.com/loomctl/loom/events"
)

// Reasons an address is given back.
const ReleaseVMGone = "vm-gone"

func (s *Service) serveCreateNet(ctx context.Context, req *request) *events.Reply {
	var cmd events.CreateNet
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		return appendStep(ctx, s, s.nets, c, cmd.Name, stepOnly, events.TypeNetCreated, func(n *events.NetState) (events.Event, *events.Fault) {
			return decideCreateNet(*n, &cmd)
		})
	})
}

// serveAttachNet gives a host a port on a net: an address of its own,
// answered by its bridge, through which it reaches the net's VMs.
func (s *Service) serveAttachNet(ctx context.Context, req *request) *events.Reply {
	var cmd events.AttachNet
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		h, _, err := s.cfg.Reader.Host(ctx, cmd.Host)
		if err != nil {
			return stepResult{}, unavailable("read host "+cmd.Host, err)
		}
		if !h.Registered {
			return stepResult{}, events.Errorf(events.CodeHostNotFound, "no host %s", cmd.Host)
		}
		return s.bindAddressAt(ctx, c, stepOnly, "", events.PortUID(cmd.Host), cmd.Net, cmd.Host)
	})
}

// decideCreateNet creates a net; creating the same one again changes
// nothing, another one of the same name is refused.
func decideCreateNet(n events.NetState, cmd *events.CreateNet) (events.Event, *events.Fault) {
	vni := cmd.VNI
	if vni == 0 {
		vni = events.VNIOf(cmd.Name)
	}
	switch {
	case n.Created && n.CIDR == cmd.CIDR && n.VNI == vni:
		return nil, nil
	case n.Created:
		return nil, events.Errorf(events.CodeNetExists, "net %s exists as %s, vni %d", cmd.Name, n.CIDR, n.VNI)
	}
	return events.NetCreated{CIDR: cmd.CIDR, VNI: vni}, nil
}

// decideBind binds VM incarnation uid's address to host, reached through
// endpoint: the first binding allocates the lowest free address, later
// ones move it. A binding already there changes nothing.
func decideBind(n events.NetState, vm, uid, host, endpoint string) (events.Event, *events.Fault) {
	if !n.Created {
		return nil, events.Errorf(events.CodeNetNotFound, "no net %s", n.Name)
	}
	b, ok := n.BindingOf(uid)
	if ok && b.Host == host && b.Endpoint == endpoint {
		return nil, nil
	}
	if !ok {
		addr, free := n.FreeAddr()
		if !free {
			return nil, events.Errorf(events.CodeNetFull, "net %s (%s) has no free address for vm %s", n.Name, n.CIDR, vm)
		}
		b = events.Binding{Addr: addr.String(), MAC: events.MACOf(uid)}
	}
	return events.NetAddressBound{Addr: b.Addr, MAC: b.MAC, VM: vm, UID: uid, Host: host, Endpoint: endpoint}, nil
}

// endpointOf is a host's tunnel endpoint, as its agent last said; empty
// when it said none (its VMs' addresses are then not reachable from
// other hosts, and the mapping says so).
func (s *Service) endpointOf(ctx context.Context, host string) (string, *events.Fault) {
	if _, fault := s.catchUp(ctx, events.ObservationSubject(host, events.KindHost, host)); fault != nil {
		return "", fault
	}
	h, _, err := s.cfg.Reader.Host(ctx, host)
	if err != nil {
		return "", unavailable("read host "+host, err)
	}
	if h.Agent == nil {
		return "", nil
	}
	return h.Agent.TunnelEndpoint, nil
}

// bindAddress binds vm's address on its net to host, as the address step
// of command c; a VM on no net has none.
func (s *Service) bindAddress(ctx context.Context, c *command, vm, uid, net, host string) (stepResult, *events.Fault) {
	if net == "" {
		return stepResult{}, nil
	}
	return s.bindAddressAt(ctx, c, createStepAddress, vm, uid, net, host)
}

// bindAddressAt binds uid's address on net to host as step index of c.
func (s *Service) bindAddressAt(ctx context.Context, c *command, index int, vm, uid, net, host string) (stepResult, *events.Fault) {
	endpoint, fault := s.endpointOf(ctx, host)
	if fault != nil {
		return stepResult{}, fault
	}
	return appendStep(ctx, s, s.nets, c, net, index, events.TypeNetAddressBound, func(n *events.NetState) (events.Event, *events.Fault) {
		return decideBind(*n, vm, uid, host, endpoint)
	})
}

// releaseOrphanAddresses gives back the addresses whose VM incarnation is
// gone (deleted and reported absent, or replaced by a new incarnation of
// its name): only then can no domain still answer on them.
func (s *Service) releaseOrphanAddresses(ctx context.Context, vms []events.VMState) error {
	nets, err := s.cfg.Reader.Nets(ctx)
	if err != nil {
		return err
	}
	live := make(map[string]bool, len(vms))
	for _, vm := range vms {
		if vm.Phase != events.PhaseGone && vm.Phase != events.PhaseNone {
			live[vm.UID] = true
		}
	}
	var errs []error
	for _, n := range nets {
		for _, b := range n.Bindings {
			if live[b.UID] || events.IsPort(b.UID) {
				continue
			}
			c := newCommand(schedulerActor, "release-address-"+b.UID, "", events.Origin{Time: s.cfg.Now()})
			res, fault := appendStep(ctx, s, s.nets, c, n.Name, stepOnly, events.TypeNetAddressReleased, func(state *events.NetState) (events.Event, *events.Fault) {
				if have, ok := state.BindingOf(b.UID); !ok || have.Addr != b.Addr {
					return nil, nil
				}
				return events.NetAddressReleased{Addr: b.Addr, UID: b.UID, Reason: ReleaseVMGone}, nil
			})
			if fault != nil {
				errs = append(errs, fault)
			} else if res.appended != nil && !res.replayed {
				s.log.Info("address released", "net", n.Name, "addr", b.Addr, keyVM, b.VM)
			}
		}
	}
	return errors.Join(errs...)
}

// rebindMovedEndpoints binds again every address whose host's agent now
// gives another tunnel endpoint than the binding names (the agent came
// back on another address): every host's entries then lead to the new one.
// The hosts' reports are read as the pass's snapshot had them.
func (s *Service) rebindMovedEndpoints(ctx context.Context, hosts []events.HostState) error {
	endpoints := make(map[string]string, len(hosts))
	for _, h := range hosts {
		if h.Agent != nil && h.Agent.TunnelEndpoint != "" {
			endpoints[h.Name] = h.Agent.TunnelEndpoint
		}
	}
	nets, err := s.cfg.Reader.Nets(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range nets {
		for _, b := range n.Bindings {
			now, known := endpoints[b.Host]
			if !known || now == b.Endpoint {
				continue
			}
			c := newCommand(schedulerActor, "rebind-"+b.UID+"-"+now, "", events.Origin{Time: s.cfg.Now()})
			res, fault := appendStep(ctx, s, s.nets, c, n.Name, stepOnly, events.TypeNetAddressBound, func(state *events.NetState) (events.Event, *events.Fault) {
				if have, ok := state.BindingOf(b.UID); !ok || have.Host != b.Host {
					return nil, nil // released, or moved meanwhile
				}
				return decideBind(*state, b.VM, b.UID, b.Host, now)
			})
			if fault != nil {
				errs = append(errs, fault)
			} else if res.appended != nil && !res.replayed {
				s.log.Info("address bound to its host's new tunnel endpoint", "net", n.Name, "addr", b.Addr, keyHost, b.Host, "endpoint", now)
			}
		}
	}
	return errors.Join(errs...)
}
