package projections

import (
	"context"
	"fmt"
	"reflect"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// The VMs read model: one events.VMState per VM name, folded from the
// decisions on loom.evt.vm.<name> and from the observations of the VM's
// host on loom.obs.<host>.vm.<name> (events.VMState.Apply ignores those of
// another incarnation, of another host and of an older goal). An index
// lists the VMs of each host.

// VMFilter selects the VMs a list returns. The zero filter lists every VM
// that exists.
type VMFilter struct {
	// Host keeps only the VMs placed on that host; empty keeps all.
	Host string
	// IncludeGone lists VMs that were deleted (and are gone) too.
	IncludeGone bool
}

func (f VMFilter) keeps(vm *events.VMState) bool {
	return (f.Host == "" || vm.Host == f.Host) && (vm.Exists() || f.IncludeGone && vm.Phase == events.PhaseGone)
}

func blankVM(name string) events.VMState { return events.VMState{Name: name} }

func isBlankVM(vm *events.VMState) bool {
	if len(vm.Leases) > 0 {
		return false
	}
	rest := *vm
	rest.Name, rest.Leases = "", nil
	return reflect.ValueOf(rest).IsZero()
}

func (b *batch) foldVM(rec *events.Record) error {
	r, err := b.loadVM(rec.Envelope.AggregateID)
	if err != nil {
		return err
	}
	return applyTo(r, rec, (*events.VMState).Apply)
}

// loadVM is the row of a VM for the batch; it notes the host the VM was
// on before the batch, for the index.
func (b *batch) loadVM(name string) (*row[events.VMState], error) {
	r, err := b.r.vms.load(b.s.db, name)
	if err != nil {
		return nil, err
	}
	if _, seen := b.vmHosts[name]; !seen {
		b.vmHosts[name] = r.state.Host
	}
	return r, nil
}

// vmMove is a VM whose Host changed in a batch.
type vmMove struct{ vm, from, to string }

// writeVMIndex moves the index entries of VMs from the host each was on
// before the batch to the one it is on after.
func writeVMIndex(pb *pebble.Batch, moved []vmMove) error {
	for _, m := range moved {
		if m.from != "" {
			if err := pb.Delete(vmByHostKey(m.from, m.vm), nil); err != nil {
				return err
			}
		}
		if m.to != "" {
			if err := pb.Set(vmByHostKey(m.to, m.vm), nil, nil); err != nil {
				return err
			}
		}
	}
	return nil
}

// VM is the named VM and the head of loom.evt.vm.<name>; the zero state
// when no event made the VM, and the zero Head when its subject is empty.
// A deleted VM is returned as it was left (phase deleting or gone).
func (s *Store) VM(ctx context.Context, name string) (events.VMState, events.Head, error) {
	var state events.VMState
	var head events.Head
	err := s.read(ctx, func(v *view) error {
		var err error
		state, head, _, err = v.vm(name)
		return err
	})
	return state, head, err
}

// VMs lists the VMs filter keeps, sorted by name.
func (s *Store) VMs(ctx context.Context, filter VMFilter) ([]events.VMState, error) {
	var vms []events.VMState
	err := s.read(ctx, func(v *view) error {
		var err error
		vms, err = v.vms(filter)
		return err
	})
	return vms, err
}

// vm reads a VM's row; found is false, and the state zero, when no event
// made the VM.
func (v *view) vm(name string) (state events.VMState, head events.Head, found bool, err error) {
	value, ok, err := v.get(nameKey(prefixVM, name))
	if err != nil || !ok {
		return events.VMState{}, events.Head{}, false, err
	}
	if state, head, err = decodeRow[events.VMState](value); err != nil {
		return events.VMState{}, events.Head{}, false, fmt.Errorf("vm %s: %w", name, err)
	}
	if isBlankVM(&state) {
		return events.VMState{}, head, false, nil
	}
	return state, head, true, nil
}

func (v *view) vms(filter VMFilter) ([]events.VMState, error) {
	var vms []events.VMState
	if filter.Host == "" {
		err := v.scan(prefixVM, func(key, value []byte) error {
			state, _, err := decodeRow[events.VMState](value)
			if err != nil {
				return fmt.Errorf("vm %s: %w", key[len(prefixVM):], err)
			}
			if filter.keeps(&state) {
				vms = append(vms, state)
			}
			return nil
		})
		return vms, err
	}
	prefix := vmByHostPrefix(filter.Host)
	var names []string
	err := v.scan(prefix, func(key, _ []byte) error {
		names = append(names, string(key[len(prefix):]))
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		state, _, found, err := v.vm(name)
		if err != nil {
			return nil, err
		}
		if found && filter.keeps(&state) {
			vms = append(vms, state)
		}
	}
	return vms, nil
}
