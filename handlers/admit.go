package handlers

import (
	"context"
	"time"

	"github.com/loomctl/loom/events"
)

// minHostRefresh bounds how often admission reloads every host before it
// answers no_capacity.
const minHostRefresh = 100 * time.Millisecond

// admit sets capacity aside for the VM on the schedulable host with the
// most free memory, net of other admissions in flight, or answers
// no_capacity. A create already admitted keeps its host.
func (s *Service) admit(ctx context.Context, vm, uid string, need capacity) (string, *events.Fault) {
	if err := s.ensureHosts(ctx); err != nil {
		return "", unavailable("read hosts", err)
	}
	if host, ok := s.tryAdmit(vm, uid, need); ok {
		return host, nil
	}
	// Before refusing, look again: other writers may have freed room or
	// registered hosts that this cache has not seen.
	if err := s.refreshHosts(ctx); err != nil {
		return "", unavailable("read hosts", err)
	}
	if host, ok := s.tryAdmit(vm, uid, need); ok {
		return host, nil
	}
	return "", noCapacity(vm, need)
}

func noCapacity(vm string, need capacity) *events.Fault {
	return events.Errorf(events.CodeNoCapacity, "no schedulable host has cpu %d and mem_mib %d free for vm %s",
		need.cpu, need.memoryMiB, vm)
}

// tryAdmit chooses a host among the cached ones and holds the capacity
// there.
func (s *Service) tryAdmit(vm, uid string, need capacity) (string, bool) {
	s.holds.mu.Lock()
	defer s.holds.mu.Unlock()
	if h, ok := s.holds.byUID[uid]; ok {
		return h.host, true
	}
	c := chooser{need: need}
	s.hosts.each(func(name string, h *hostView) {
		if !h.schedulable() {
			return
		}
		free := h.free()
		for holder, hd := range s.holds.byUID { // few: at most one per request in flight
			if hd.host == name && !allocatedTo(&h.state, hd.vm, holder) {
				free = free.minus(hd.need)
			}
		}
		c.consider(candidate{name: name, schedulable: true, free: free})
	})
	if c.found {
		s.holds.byUID[uid] = hold{host: c.best.name, vm: vm, need: need}
	}
	return c.best.name, c.found
}

// findAllocation finds, among the cached hosts but except, the allocation
// that the VM incarnation uid already holds (the earliest, if a race left
// two).
func (s *Service) findAllocation(vm, uid, except string) (placement, bool) {
	var p placement
	var found bool
	s.hosts.each(func(name string, h *hostView) {
		if a, ok := h.state.Allocations[vm]; ok && a.UID == uid && name != except && (!found || a.Seq < p.allocSeq) {
			p, found = placement{host: name, allocSeq: a.Seq}, true
		}
	})
	return p, found
}

// ensureHosts makes sure every host the Reader lists is cached.
func (s *Service) ensureHosts(ctx context.Context) error {
	names, err := s.hostNames(ctx, hostListAge)
	if err != nil {
		return err
	}
	for _, name := range s.hosts.missing(names) {
		if err := s.hosts.refresh(ctx, name); err != nil {
			return err
		}
	}
	return nil
}

// refreshHosts reloads every host from the Reader, keeping what is newer
// than the cache; at most every minHostRefresh.
func (s *Service) refreshHosts(ctx context.Context) error {
	s.names.mu.Lock()
	if time.Since(s.names.refreshed) < minHostRefresh {
		s.names.mu.Unlock()
		return nil
	}
	s.names.refreshed = time.Now()
	s.names.mu.Unlock()
	names, err := s.hostNames(ctx, 0)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := s.hosts.refresh(ctx, name); err != nil {
			return err
		}
	}
	return nil
}

// hostNames lists the hosts' names, asking the Reader when the last
// listing is older than maxAge. Concurrent callers share one listing.
func (s *Service) hostNames(ctx context.Context, maxAge time.Duration) ([]string, error) {
	s.names.mu.Lock()
	names, fresh := s.names.names, !s.names.listed.IsZero() && time.Since(s.names.listed) < maxAge
	s.names.mu.Unlock()
	if fresh {
		return names, nil
	}
	listed, err, _ := s.names.listing.Do("", func() (any, error) {
		hosts, err := s.cfg.Reader.Hosts(ctx)
		if err != nil {
			return nil, err
		}
		names := make([]string, 0, len(hosts))
		for _, h := range hosts {
			names = append(names, h.Name)
		}
		s.names.mu.Lock()
		s.names.names, s.names.listed = names, time.Now()
		s.names.mu.Unlock()
		return names, nil
	})
	if err != nil {
		return nil, err
	}
	return listed.([]string), nil
}
