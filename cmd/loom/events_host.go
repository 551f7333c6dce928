package main

import (
	"github.com/loomctl/loom/events"
)

// hostFilter keeps, of the events a tail reads, those that concern one
// host: its own subject and its agent's observations (the consumer reads
// only those and the VM and lease subjects), the decisions about a VM from
// its placement on the host until it is placed elsewhere, and the events
// of grants whose holder runs on the host. It learns placements and grants
// from the events it reads, so a tail that starts late misses the VMs
// placed before it began.
type hostFilter struct {
	host string
	// vms are the VMs placed on host, by name.
	vms map[string]bool
	// grants are the epochs of the grants held on host.
	grants map[uint64]bool
}

func newHostFilter(host string) *hostFilter {
	return &hostFilter{host: host, vms: map[string]bool{}, grants: map[uint64]bool{}}
}

// keeps tells whether rec concerns the host; a nil filter keeps all.
func (f *hostFilter) keeps(rec *events.Record, decodeErr error) bool {
	if f == nil {
		return true
	}
	if decodeErr != nil {
		return true // whose it is cannot be told: never dropped silently
	}
	addr, err := events.ParseEventSubject(rec.Subject)
	if err != nil {
		return true
	}
	switch {
	case addr.Observed || addr.Kind == events.KindHost:
		return true
	case addr.Kind == events.KindVM:
		if placed, ok := rec.Event.(events.VMPlaced); ok {
			was := f.vms[addr.ID]
			f.vms[addr.ID] = placed.Host == f.host
			return was || placed.Host == f.host || placed.From == f.host
		}
		return f.vms[addr.ID]
	case addr.Kind == events.KindLease:
		switch ev := rec.Event.(type) {
		case events.LeaseGranted:
			f.grants[rec.Seq] = ev.Host == f.host
			return ev.Host == f.host
		case events.LeaseReleased:
			return f.grants[ev.Epoch]
		case events.LeaseExpired:
			return ev.Host == f.host || f.grants[ev.Epoch]
		case events.LeaseBreaking:
			return f.grants[ev.Epoch]
		case events.LeaseBroken:
			return f.grants[ev.Epoch]
		}
	}
	return false
}
