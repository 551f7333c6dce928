package overlay

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
)

// Entry places one address of the overlay: the VM (or host port) with
// address Addr and MAC is on the host whose tunnel endpoint is Endpoint.
type Entry struct {
	// Addr is the overlay address, IPv4 or IPv6.
	Addr netip.Addr
	// MAC is the address's unicast 48-bit MAC.
	MAC net.HardwareAddr
	// Endpoint is the tunnel endpoint of the host the address is on, of
	// the same family as Config.Local.
	Endpoint netip.Addr
}

// SetPeers makes the VXLAN device's entries those of entries for other
// hosts (Endpoint other than cfg.Local), and nothing else: per MAC, a
// forwarding entry to its Endpoint, and per address, a permanent
// neighbour entry to its MAC, which the device answers ARP and neighbour
// solicitations from. Entries on the device that are not in the list are
// removed, whoever made them. Changes are made before removals, so an
// address that moves is never missing. Entries must agree: one MAC per
// address and one Endpoint per MAC. It needs the device (Ensure), does
// nothing when all is in place and is idempotent.
func SetPeers(ctx context.Context, cfg Config, entries []Entry) error {
	return setPeers(ctx, execRun, cfg, entries)
}

func setPeers(ctx context.Context, run runner, cfg Config, entries []Entry) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	want, err := planPeers(cfg.Local, entries)
	if err != nil {
		return err
	}
	if err := (host{cfg: cfg, run: run}).setPeers(ctx, want); err != nil {
		return fmt.Errorf("set overlay %d peers: %w", cfg.VNI, err)
	}
	return nil
}

// peers is the content of a VXLAN device, keyed by canonical strings.
type peers struct {
	endpoints map[string][]string // MAC -> endpoints (several only for 00:00:00:00:00:00, which is never ours)
	neighbors map[string]neighbor // address -> MAC
}

type neighbor struct {
	mac       string
	permanent bool
}

// planPeers checks entries and returns the peers a host at local must have.
func planPeers(local netip.Addr, entries []Entry) (peers, error) {
	want := peers{endpoints: map[string][]string{}, neighbors: map[string]neighbor{}}
	endpointOf := map[string]netip.Addr{} // MAC -> Endpoint, local ones too
	macOf := map[netip.Addr]string{}      // Addr -> MAC
	for _, e := range entries {
		addr, endpoint := e.Addr.Unmap(), e.Endpoint.Unmap()
		switch {
		case !addr.IsValid() || addr.IsUnspecified() || addr.IsMulticast() || addr.Zone() != "":
			return want, fmt.Errorf("%w: address %q is not a unicast address", ErrInvalidEntry, e.Addr)
		case !unicastMAC(e.MAC):
			return want, fmt.Errorf("%w: %s: MAC %q is not a unicast 48-bit MAC", ErrInvalidEntry, addr, e.MAC)
		case !endpoint.IsValid() || endpoint.IsUnspecified() || endpoint.IsMulticast() || endpoint.Is4() != local.Unmap().Is4():
			return want, fmt.Errorf("%w: %s: endpoint %q is not a unicast address of the local endpoint's family", ErrInvalidEntry, addr, e.Endpoint)
		}
		mac := e.MAC.String()
		if other, ok := macOf[addr]; ok && other != mac {
			return want, fmt.Errorf("%w: address %s has MACs %s and %s", ErrInvalidEntry, addr, other, mac)
		}
		if other, ok := endpointOf[mac]; ok && other != endpoint {
			return want, fmt.Errorf("%w: MAC %s is behind endpoints %s and %s", ErrInvalidEntry, mac, other, endpoint)
		}
		macOf[addr], endpointOf[mac] = mac, endpoint
		if endpoint == local.Unmap() {
			continue // on this host: its VM answers for itself
		}
		want.endpoints[mac] = []string{endpoint.String()}
		want.neighbors[addr.String()] = neighbor{mac: mac, permanent: true}
	}
	return want, nil
}

func (h host) setPeers(ctx context.Context, want peers) error {
	device := h.cfg.DeviceName()
	have, err := h.peers(ctx)
	if err != nil {
		return err
	}
	for _, mac := range sortedKeys(want.endpoints) {
		endpoint := want.endpoints[mac][0]
		if slices.Equal(have.endpoints[mac], want.endpoints[mac]) {
			continue
		}
		if _, err := h.bridge(ctx, "fdb", "replace", mac, "dev", device, "dst", endpoint, "self", "permanent"); err != nil {
			return err
		}
	}
	for _, addr := range sortedKeys(want.neighbors) {
		n := want.neighbors[addr]
		if have.neighbors[addr] == n {
			continue
		}
		if _, err := h.ip(ctx, "neigh", "replace", addr, "lladdr", n.mac, "dev", device, "nud", "permanent"); err != nil {
			return err
		}
	}
	for _, addr := range sortedKeys(have.neighbors) {
		if _, ok := want.neighbors[addr]; !ok {
			if _, err := h.ip(ctx, "neigh", "del", addr, "dev", device); err != nil {
				return err
			}
		}
	}
	for _, mac := range sortedKeys(have.endpoints) {
		if _, ok := want.endpoints[mac]; !ok {
			if _, err := h.bridge(ctx, "fdb", "del", mac, "dev", device, "self"); err != nil {
				return err
			}
		}
	}
	return nil
}

// peers reads the VXLAN device's forwarding and neighbour entries.
func (h host) peers(ctx context.Context) (peers, error) {
	device := h.cfg.DeviceName()
	fdb, err := h.bridge(ctx, "-j", "fdb", "show", "dev", device)
	if err != nil {
		return peers{}, err
	}
	endpoints, err := parseFDB(fdb)
	if err != nil {
		return peers{}, err
	}
	neigh, err := h.ip(ctx, "-j", "neigh", "show", "dev", device)
	if err != nil {
		return peers{}, err
	}
	neighbors, err := parseNeighbors(neigh)
	if err != nil {
		return peers{}, err
	}
	return peers{endpoints: endpoints, neighbors: neighbors}, nil
}

// parseFDB reads `bridge -j fdb show dev DEVICE` of a VXLAN device: the
// device's own entries with a destination, by MAC. The bridge's entries
// for the port (flag master: its address, what it learned) are not the
// device's.
func parseFDB(out []byte) (map[string][]string, error) {
	var list []struct {
		MAC   string   `json:"mac"`
		Dst   string   `json:"dst"`
		Flags []string `json:"flags"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("parse bridge -j fdb show: %w", err)
	}
	endpoints := map[string][]string{}
	for _, e := range list {
		if e.Dst == "" || !slices.Contains(e.Flags, "self") {
			continue
		}
		mac, err := net.ParseMAC(e.MAC)
		if err != nil {
			return nil, fmt.Errorf("parse bridge -j fdb show: %w", err)
		}
		dst, err := netip.ParseAddr(e.Dst)
		if err != nil {
			return nil, fmt.Errorf("parse bridge -j fdb show: %w", err)
		}
		endpoints[mac.String()] = append(endpoints[mac.String()], dst.String())
	}
	return endpoints, nil
}

// parseNeighbors reads `ip -j neigh show dev DEVICE`, by address. An
// entry without a MAC (failed, incomplete) has an empty one.
func parseNeighbors(out []byte) (map[string]neighbor, error) {
	var list []struct {
		Dst    string   `json:"dst"`
		LLAddr string   `json:"lladdr"`
		State  []string `json:"state"`
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("parse ip -j neigh show: %w", err)
	}
	neighbors := make(map[string]neighbor, len(list))
	for _, e := range list {
		addr, err := netip.ParseAddr(e.Dst)
		if err != nil {
			return nil, fmt.Errorf("parse ip -j neigh show: %w", err)
		}
		var n neighbor
		if e.LLAddr != "" {
			mac, err := net.ParseMAC(e.LLAddr)
			if err != nil {
				return nil, fmt.Errorf("parse ip -j neigh show: %w", err)
			}
			n.mac = mac.String()
		}
		n.permanent = slices.Contains(e.State, "PERMANENT")
		neighbors[addr.String()] = n
	}
	return neighbors, nil
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
