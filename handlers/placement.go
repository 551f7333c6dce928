package handlers

import (
	"sync"

	"github.com/loomctl/loom/events"
)

// capacity is an amount of CPU and memory.
type capacity struct {
	cpu       int
	memoryMiB int
}

func (c capacity) plus(o capacity) capacity {
	return capacity{c.cpu + o.cpu, c.memoryMiB + o.memoryMiB}
}

func (c capacity) minus(o capacity) capacity {
	return capacity{c.cpu - o.cpu, c.memoryMiB - o.memoryMiB}
}

// covers tells whether o fits in c.
func (c capacity) covers(o capacity) bool {
	return o.cpu <= c.cpu && o.memoryMiB <= c.memoryMiB
}

func allocationSize(a events.Allocation) capacity { return capacity{a.CPU, a.MemoryMiB} }

// hostView is a host as the handlers cache it: its state and what its
// allocations add up to, kept up to date as events are folded in, so that
// admission never sums a host's allocations.
type hostView struct {
	state events.HostState
	used  capacity
}

func newHostView(state events.HostState) hostView {
	cpu, memoryMiB := state.Used()
	return hostView{state: state, used: capacity{cpu, memoryMiB}}
}

// free is the capacity not allocated.
func (h *hostView) free() capacity {
	return capacity{h.state.CPU, h.state.MemoryMiB}.minus(h.used)
}

// schedulable tells whether new VMs may be placed on the host.
func (h *hostView) schedulable() bool {
	return h.state.Registered && !h.state.Cordoned && !h.state.Lost
}

// apply folds one event in place and adjusts the usage by the one
// allocation it can change.
func (h *hostView) apply(rec *events.Record) error {
	var vm string
	switch ev := rec.Event.(type) {
	case events.HostAllocated:
		vm = ev.VM
	case events.HostReleased:
		vm = ev.VM
	}
	before, hadBefore := h.state.Allocations[vm]
	if err := h.state.Apply(rec); err != nil {
		return err
	}
	after, hasAfter := h.state.Allocations[vm]
	if hadBefore {
		h.used = h.used.minus(allocationSize(before))
	}
	if hasAfter {
		h.used = h.used.plus(allocationSize(after))
	}
	return nil
}

// candidate is a host as admission sees it: its free capacity net of the
// holds on it.
type candidate struct {
	name        string
	schedulable bool
	free        capacity
}

// chooseHost picks, among the schedulable hosts with room for need, the one
// with the most free memory; ties go to the smallest name, so the choice
// depends only on the hosts, not on the order they come in.
func chooseHost(hosts []candidate, need capacity) (string, bool) {
	c := chooser{need: need}
	for _, h := range hosts {
		c.consider(h)
	}
	return c.best.name, c.found
}

// chooser is chooseHost one candidate at a time.
type chooser struct {
	need  capacity
	best  candidate
	found bool
}

func (c *chooser) consider(h candidate) {
	if !h.schedulable || !h.free.covers(c.need) {
		return
	}
	if !c.found || h.free.memoryMiB > c.best.free.memoryMiB ||
		(h.free.memoryMiB == c.best.free.memoryMiB && h.name < c.best.name) {
		c.best, c.found = h, true
	}
}

// hold is capacity that a create in flight in this process has set aside on
// a host, from admission until its allocation is appended (or abandoned).
type hold struct {
	host string
	vm   string
	need capacity
}

// holds are this process's admissions in flight, by VM UID. Admission
// counts them against a host's free capacity, so concurrent creates in one
// process never admit more than fits and a create that is admitted almost
// always finds its room at allocation. A hold whose allocation already shows
// in a host's state is not counted twice.
//
// Lock order: holds.mu before any table's lock.
type holds struct {
	mu    sync.Mutex // guards byUID
	byUID map[string]hold
}

// reserved sums the holds on a host that its state does not show
// allocated yet.
func reserved(state *events.HostState, holdsOnHost map[string]hold) capacity {
	var sum capacity
	for uid, h := range holdsOnHost {
		if !allocatedTo(state, h.vm, uid) {
			sum = sum.plus(h.need)
		}
	}
	return sum
}

// allocatedTo tells whether the host's allocation for vm is uid's.
func allocatedTo(state *events.HostState, vm, uid string) bool {
	a, ok := state.Allocations[vm]
	return ok && a.UID == uid
}

// on copies the holds on host other than except's.
func (hs *holds) on(host, except string) map[string]hold {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	out := map[string]hold{}
	for uid, h := range hs.byUID {
		if h.host == host && uid != except {
			out[uid] = h
		}
	}
	return out
}

// release forgets uid's hold.
func (hs *holds) release(uid string) {
	hs.mu.Lock()
	delete(hs.byUID, uid)
	hs.mu.Unlock()
}

// has tells whether a create of uid is in flight in this process.
func (hs *holds) has(uid string) bool {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	_, ok := hs.byUID[uid]
	return ok
}
