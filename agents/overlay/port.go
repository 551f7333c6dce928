package overlay

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// SetPort makes addr the host's own address on the overlay, its port: the
// bridge answers on addr with mac, which the other hosts' entries for the
// port name. The bridge gets mac as its hardware address (set, it stays:
// a bridge otherwise takes one of its ports' MACs, which changes as taps
// come and go) and addr as its only address of addr's family. The bridge
// is this package's, and so are its addresses: any other of that family
// is removed, except the link-local ones the kernel adds, and before addr
// is added (deleting a subnet's primary IPv4 address would take addr, a
// secondary one, with it). It needs the bridge (Ensure), does nothing
// when all is in place and is idempotent.
func SetPort(ctx context.Context, cfg Config, addr netip.Prefix, mac net.HardwareAddr) error {
	return setPort(ctx, execRun, cfg, addr, mac)
}

// ClearPort takes the host's port off the overlay: it removes every
// address of the bridge but the link-local ones. The bridge keeps its MAC.
// Without a bridge there is no port, and ClearPort succeeds.
func ClearPort(ctx context.Context, cfg Config) error {
	return clearPort(ctx, execRun, cfg)
}

func setPort(ctx context.Context, run runner, cfg Config, addr netip.Prefix, mac net.HardwareAddr) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if err := checkPort(addr, mac); err != nil {
		return err
	}
	if err := (host{cfg: cfg, run: run}).setPort(ctx, addr, mac); err != nil {
		return fmt.Errorf("set overlay %d port: %w", cfg.VNI, err)
	}
	return nil
}

func clearPort(ctx context.Context, run runner, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if err := (host{cfg: cfg, run: run}).clearPort(ctx); err != nil {
		return fmt.Errorf("clear overlay %d port: %w", cfg.VNI, err)
	}
	return nil
}

// checkPort checks SetPort's arguments.
func checkPort(addr netip.Prefix, mac net.HardwareAddr) error {
	a := addr.Addr()
	switch {
	case !addr.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsLoopback() ||
		a.Zone() != "" || a.Is4In6():
		return fmt.Errorf("%w: address %q is not a unicast address with a prefix length", ErrInvalidPort, addr)
	case !unicastMAC(mac):
		return fmt.Errorf("%w: %s: MAC %q is not a unicast 48-bit MAC", ErrInvalidPort, addr, mac)
	}
	return nil
}

// unicastMAC reports whether mac is a 48-bit unicast MAC other than zero.
func unicastMAC(mac net.HardwareAddr) bool {
	return len(mac) == 6 && mac[0]&1 == 0 && !slices.Equal(mac, make(net.HardwareAddr, 6))
}

func (h host) setPort(ctx context.Context, addr netip.Prefix, mac net.HardwareAddr) error {
	bridge := h.cfg.Bridge
	br, ok, err := h.bridgeAddrs(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("bridge %s does not exist: call Ensure first", bridge)
	}
	if have, err := net.ParseMAC(br.MAC); err != nil || !slices.Equal(have, mac) {
		if _, err := h.ip(ctx, "link", "set", bridge, "address", mac.String()); err != nil {
			return err
		}
	}
	var stale []netip.Prefix
	in := false
	for _, p := range br.ours() {
		switch {
		case p == addr:
			in = true
		case p.Addr().Is4() == addr.Addr().Is4():
			stale = append(stale, p)
		}
	}
	if err := h.delAddrs(ctx, stale); err != nil {
		return err
	}
	// Even when addr was there: as a secondary address it went with its
	// primary, unless the kernel promoted it.
	if !in || len(stale) > 0 {
		if _, err := h.ip(ctx, "addr", "replace", addr.String(), "dev", bridge); err != nil {
			return err
		}
	}
	return nil
}

func (h host) clearPort(ctx context.Context) error {
	br, ok, err := h.bridgeAddrs(ctx)
	if err != nil || !ok {
		return err
	}
	return h.delAddrs(ctx, br.ours())
}

// delAddrs removes addrs, listed as `ip addr show` lists them, from the
// bridge, last first. Deleting an IPv4 primary address takes the
// secondary ones of its subnet with it, and the kernel lists them after
// their primary: last first never deletes one that is gone already.
func (h host) delAddrs(ctx context.Context, addrs []netip.Prefix) error {
	for _, p := range slices.Backward(addrs) {
		if _, err := h.ip(ctx, "addr", "del", p.String(), "dev", h.cfg.Bridge); err != nil {
			return err
		}
	}
	return nil
}

// addrLink is what SetPort reads of a device in `ip -j -d addr show`.
type addrLink struct {
	Name string `json:"ifname"`
	MAC  string `json:"address"`
	Info struct {
		Kind string `json:"info_kind"`
	} `json:"linkinfo"`
	Addrs []struct {
		Local     string `json:"local"`
		PrefixLen int    `json:"prefixlen"`
	} `json:"addr_info"`
}

// ours is the device's addresses that make the port: all but link-local
// ones, in the order listed.
func (l addrLink) ours() []netip.Prefix {
	var prefixes []netip.Prefix
	for _, a := range l.Addrs {
		addr, err := netip.ParseAddr(a.Local)
		if err != nil || addr.IsLinkLocalUnicast() {
			continue
		}
		if p := netip.PrefixFrom(addr, a.PrefixLen); p.IsValid() {
			prefixes = append(prefixes, p)
		}
	}
	return prefixes
}

// bridgeAddrs reads the bridge with its addresses, and whether it is
// there. All devices are listed, so that a missing bridge is no error.
func (h host) bridgeAddrs(ctx context.Context) (addrLink, bool, error) {
	out, err := h.ip(ctx, "-j", "-d", "addr", "show")
	if err != nil {
		return addrLink{}, false, err
	}
	links, err := parseAddrLinks(out)
	if err != nil {
		return addrLink{}, false, err
	}
	i := slices.IndexFunc(links, func(l addrLink) bool { return l.Name == h.cfg.Bridge })
	if i < 0 {
		return addrLink{}, false, nil
	}
	if kind := links[i].Info.Kind; kind != "bridge" {
		return addrLink{}, false, fmt.Errorf("bridge %s: %w: %q", h.cfg.Bridge, ErrForeignDevice, kind)
	}
	return links[i], true, nil
}

func parseAddrLinks(out []byte) ([]addrLink, error) {
	var links []addrLink
	if err := json.Unmarshal(out, &links); err != nil {
		return nil, fmt.Errorf("parse ip -j -d addr show: %w", err)
	}
	return links, nil
}
