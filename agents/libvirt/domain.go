package libvirt

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// Domain is one domain as libvirtd reports it.
type Domain struct {
	Name string
	UUID [16]byte
	// State and Reason are virDomainState and its state-specific reason code
	// (for shutoff: 1 = shut down, 2 = destroyed, 5 = saved, ...).
	State  State
	Reason int32
	// Metadata is Loom's key/values from Define, nil when the domain has none.
	Metadata map[string]string
}

// State is a domain's virDomainState.
type State int

// States, numbered as libvirt numbers them.
const (
	StateNoState State = iota
	StateRunning
	StateBlocked
	StatePaused
	StateShutdown // shutting down
	StateShutoff
	StateCrashed
	StatePMSuspended
)

var stateNames = [...]string{"nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended"}

// String returns libvirt's lowercase name for s, e.g. "running" or "shutoff".
func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "state(" + strconv.Itoa(int(s)) + ")"
}

// List returns every domain, defined or running, sorted by name.
func (c *Client) List(ctx context.Context) ([]Domain, error) {
	// Flags 0 lists active and inactive domains alike.
	doms, err := call(ctx, c, func() ([]golibvirt.Domain, error) {
		doms, _, err := c.rpc.ConnectListAllDomains(1, 0)
		return doms, err
	})
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	out := make([]Domain, 0, len(doms))
	for _, dom := range doms {
		d, err := c.describe(ctx, dom)
		if errors.Is(err, ErrNotFound) {
			continue // undefined between the list and the describe
		}
		if err != nil {
			return nil, fmt.Errorf("list domains: %w", err)
		}
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b Domain) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Lookup returns the named domain, or an error matching ErrNotFound.
func (c *Client) Lookup(ctx context.Context, name string) (Domain, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return Domain{}, fmt.Errorf("lookup domain %s: %w", name, err)
	}
	d, err := c.describe(ctx, dom)
	if err != nil {
		return Domain{}, fmt.Errorf("lookup domain %s: %w", name, err)
	}
	return d, nil
}

// Metadata returns the named domain's Loom key/values, nil if it has none.
func (c *Client) Metadata(ctx context.Context, name string) (map[string]string, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("domain metadata %s: %w", name, err)
	}
	kv, err := c.metadata(ctx, dom)
	if err != nil {
		return nil, fmt.Errorf("domain metadata %s: %w", name, err)
	}
	return kv, nil
}

// lookup validates name and resolves it to a domain handle.
func (c *Client) lookup(ctx context.Context, name string) (golibvirt.Domain, error) {
	if err := ValidateName(name); err != nil {
		return golibvirt.Domain{}, err
	}
	return call(ctx, c, func() (golibvirt.Domain, error) { return c.rpc.DomainLookupByName(name) })
}

// describe reads a domain's state and metadata.
func (c *Client) describe(ctx context.Context, dom golibvirt.Domain) (Domain, error) {
	state, reason, err := c.state(ctx, dom)
	if err != nil {
		return Domain{}, err
	}
	kv, err := c.metadata(ctx, dom)
	if err != nil {
		return Domain{}, err
	}
	return Domain{Name: dom.Name, UUID: dom.UUID, State: state, Reason: reason, Metadata: kv}, nil
}

// state reads a domain's current state and reason.
func (c *Client) state(ctx context.Context, dom golibvirt.Domain) (State, int32, error) {
	type stateReason struct{ state, reason int32 }
	sr, err := call(ctx, c, func() (stateReason, error) {
		state, reason, err := c.rpc.DomainGetState(dom, 0)
		return stateReason{state, reason}, err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("get state: %w", err)
	}
	return State(sr.state), sr.reason, nil
}

// metadata reads Loom's element from the domain's current definition (live
// if running, persistent otherwise).
func (c *Client) metadata(ctx context.Context, dom golibvirt.Domain) (map[string]string, error) {
	element, err := call(ctx, c, func() (string, error) {
		return c.rpc.DomainGetMetadata(dom, int32(golibvirt.DomainMetadataElement),
			golibvirt.OptString{MetadataNamespace}, golibvirt.DomainAffectCurrent)
	})
	if hasCode(err, codeNoDomainMetadata) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get metadata: %w", err)
	}
	return parseMetadata(element)
}
