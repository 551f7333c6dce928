package projections

import (
	"context"
	"fmt"

	"github.com/loomctl/loom/events"
)

// The nets read model: one events.NetState per virtual network, folded
// from the decisions on loom.evt.net.<name>: its prefix and segment, and
// for each address the VM holding it, its host and the host's tunnel
// endpoint.

func blankNet(name string) events.NetState { return events.NetState{Name: name} }

func isBlankNet(n *events.NetState) bool {
	return !n.Created && n.CIDR == "" && n.VNI == 0 && len(n.Bindings) == 0
}

func (b *batch) foldNet(rec *events.Record) error {
	r, err := b.r.nets.load(b.s.db, rec.Envelope.AggregateID)
	if err != nil {
		return err
	}
	return applyTo(r, rec, (*events.NetState).Apply)
}

// Net is the named net and the head of loom.evt.net.<name>; the zero state
// when no event made it.
func (s *Store) Net(ctx context.Context, name string) (events.NetState, events.Head, error) {
	var state events.NetState
	var head events.Head
	err := s.read(ctx, func(v *view) error {
		var err error
		state, head, _, err = v.net(name)
		return err
	})
	return state, head, err
}

// Nets lists every net an event made, sorted by name.
func (s *Store) Nets(ctx context.Context) ([]events.NetState, error) {
	var nets []events.NetState
	err := s.read(ctx, func(v *view) error {
		var err error
		nets, err = v.nets()
		return err
	})
	return nets, err
}

func (v *view) net(name string) (state events.NetState, head events.Head, found bool, err error) {
	value, ok, err := v.get(nameKey(prefixNet, name))
	if err != nil || !ok {
		return events.NetState{}, events.Head{}, false, err
	}
	if state, head, err = decodeRow[events.NetState](value); err != nil {
		return events.NetState{}, events.Head{}, false, fmt.Errorf("net %s: %w", name, err)
	}
	if isBlankNet(&state) {
		return events.NetState{}, head, false, nil
	}
	return state, head, true, nil
}

func (v *view) nets() ([]events.NetState, error) {
	var nets []events.NetState
	err := v.scan(prefixNet, func(key, value []byte) error {
		state, _, err := decodeRow[events.NetState](value)
		if err != nil {
			return fmt.Errorf("net %s: %w", key[len(prefixNet):], err)
		}
		if !isBlankNet(&state) {
			nets = append(nets, state)
		}
		return nil
	})
	return nets, err
}

func answerNet(v *view, q *events.Query) *events.QueryReply {
	state, _, found, err := v.net(q.Name)
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "read net %s: %v", q.Name, err))
	}
	if !found || !state.Created {
		return faulted(v, events.Errorf(events.CodeNetNotFound, "no net %q", q.Name))
	}
	return &events.QueryReply{Seq: v.seq, Nets: []events.NetState{state}}
}

func answerNets(v *view, _ *events.Query) *events.QueryReply {
	nets, err := v.nets()
	if err != nil {
		return faulted(v, events.Errorf(events.CodeInternal, "list nets: %v", err))
	}
	return &events.QueryReply{Seq: v.seq, Nets: nets}
}
