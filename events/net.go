package events

import (
	"crypto/sha256"
	"fmt"
	"net"
	"net/netip"
	"slices"
)

// KindNet is the aggregate kind of a virtual network: one subject per net,
// where its addresses are handed out, so that no address is given twice.
const KindNet Kind = "net"

// Net event types.
const (
	TypeNetCreated         Type = "net.created"
	TypeNetAddressBound    Type = "net.address_bound"
	TypeNetAddressReleased Type = "net.address_released"
)

// NetCreated records a virtual network: an IPv4 prefix whose addresses go
// to VMs, carried between hosts in VXLAN segment VNI.
type NetCreated struct {
	CIDR string `msgpack:"cidr" json:"cidr"`
	VNI  uint32 `msgpack:"vni" json:"vni"`
}

// NetAddressBound gives a VM incarnation an address, or moves the one it
// has, to Host, reached through Endpoint (the host's tunnel endpoint).
// The first binding of a UID allocates Addr; later ones name the same.
type NetAddressBound struct {
	Addr     string `msgpack:"addr" json:"addr"`
	MAC      string `msgpack:"mac" json:"mac"`
	VM       string `msgpack:"vm" json:"vm"`
	UID      string `msgpack:"uid" json:"uid"`
	Host     string `msgpack:"host" json:"host"`
	Endpoint string `msgpack:"endpoint,omitempty" json:"endpoint,omitempty"`
}

// NetAddressReleased gives an address back: its VM is gone.
type NetAddressReleased struct {
	Addr   string `msgpack:"addr" json:"addr"`
	UID    string `msgpack:"uid" json:"uid"`
	Reason string `msgpack:"reason" json:"reason"`
}

func (NetCreated) EventType() Type         { return TypeNetCreated }
func (NetAddressBound) EventType() Type    { return TypeNetAddressBound }
func (NetAddressReleased) EventType() Type { return TypeNetAddressReleased }

// Binding is where an address is: the VM holding it, its host and the
// host's tunnel endpoint.
type Binding struct {
	Addr     string `msgpack:"addr" json:"addr"`
	MAC      string `msgpack:"mac" json:"mac"`
	VM       string `msgpack:"vm" json:"vm"`
	UID      string `msgpack:"uid" json:"uid"`
	Host     string `msgpack:"host" json:"host"`
	Endpoint string `msgpack:"endpoint,omitempty" json:"endpoint,omitempty"`
	// Seq is the stream sequence of the binding's last event.
	Seq uint64 `msgpack:"seq" json:"seq"`
}

// NetState is a net folded from its events: the map from each address to
// its host's tunnel endpoint.
type NetState struct {
	Name    string `msgpack:"name" json:"name"`
	Created bool   `msgpack:"created" json:"created"`
	CIDR    string `msgpack:"cidr,omitempty" json:"cidr,omitempty"`
	VNI     uint32 `msgpack:"vni,omitempty" json:"vni,omitempty"`
	// Bindings in address order: a slice, not a map, so that a state
	// always encodes to the same bytes (the rebuild test compares them).
	Bindings []Binding `msgpack:"bindings,omitempty" json:"bindings,omitempty"`
}

// Apply folds one event of the net's subject into the state. The map is
// replaced, never changed in place: a state handed out stays as it was.
func (n *NetState) Apply(rec *Record) error {
	if rec.Envelope.Kind != KindNet {
		return fmt.Errorf("net %s: event %s of kind %s", n.Name, rec.Envelope.Type, rec.Envelope.Kind)
	}
	n.Name = rec.Envelope.AggregateID
	switch ev := rec.Event.(type) {
	case NetCreated:
		n.Created, n.CIDR, n.VNI = true, ev.CIDR, ev.VNI
	case NetAddressBound:
		addr, err := netip.ParseAddr(ev.Addr)
		if err != nil {
			return fmt.Errorf("net %s: address %q: %w", n.Name, ev.Addr, err)
		}
		i, found := n.find(addr)
		if found && n.Bindings[i].UID != ev.UID {
			return fmt.Errorf("net %s: %s bound to %s, held by %s", n.Name, ev.Addr, ev.UID, n.Bindings[i].UID)
		}
		b := Binding{Addr: ev.Addr, MAC: ev.MAC, VM: ev.VM, UID: ev.UID, Host: ev.Host, Endpoint: ev.Endpoint, Seq: rec.Seq}
		n.Bindings = slices.Clone(n.Bindings)
		if found {
			n.Bindings[i] = b
		} else {
			n.Bindings = slices.Insert(n.Bindings, i, b)
		}
	case NetAddressReleased:
		addr, err := netip.ParseAddr(ev.Addr)
		if err != nil {
			return fmt.Errorf("net %s: address %q: %w", n.Name, ev.Addr, err)
		}
		if i, found := n.find(addr); found && n.Bindings[i].UID == ev.UID {
			n.Bindings = slices.Delete(slices.Clone(n.Bindings), i, i+1)
			if len(n.Bindings) == 0 {
				n.Bindings = nil
			}
		}
	default:
		return fmt.Errorf("net %s: %w %s", n.Name, errNotForAggregate, rec.Envelope.Type)
	}
	return nil
}

// BindingOf is the binding of VM incarnation uid, if it has one.
func (n *NetState) BindingOf(uid string) (Binding, bool) {
	for _, b := range n.Bindings {
		if b.UID == uid {
			return b, true
		}
	}
	return Binding{}, false
}

// find is where addr is in the bindings, or would go.
func (n *NetState) find(addr netip.Addr) (int, bool) {
	return slices.BinarySearchFunc(n.Bindings, addr, func(b Binding, a netip.Addr) int {
		have, err := netip.ParseAddr(b.Addr)
		if err != nil {
			return -1
		}
		return have.Compare(a)
	})
}

// Holds tells whether addr is bound to a VM.
func (n *NetState) Holds(addr netip.Addr) bool {
	_, found := n.find(addr)
	return found
}

// FreeAddr is the lowest address of the net no VM holds, leaving out the
// network's own, its first (for a gateway) and its broadcast address.
func (n *NetState) FreeAddr() (netip.Addr, bool) {
	prefix, err := netip.ParsePrefix(n.CIDR)
	if err != nil || !prefix.Addr().Is4() {
		return netip.Addr{}, false
	}
	prefix = prefix.Masked()
	first := prefix.Addr().Next().Next()
	for a := first; prefix.Contains(a); a = a.Next() {
		if !prefix.Contains(a.Next()) {
			break // the broadcast address
		}
		if !n.Holds(a) {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// MACOf derives a VM incarnation's MAC on a net: locally administered,
// unicast, the same on every host and after every move.
func MACOf(uid string) string {
	sum := sha256.Sum256([]byte("mac\x00" + uid))
	mac := net.HardwareAddr{0x02, sum[0], sum[1], sum[2], sum[3], sum[4]}
	return mac.String()
}

// CreateNet creates a virtual network.
type CreateNet struct {
	CommandMeta `msgpack:",inline"`
	Name        string `msgpack:"name" json:"name"`
	CIDR        string `msgpack:"cidr" json:"cidr"`
	// VNI is its VXLAN segment; zero derives one from the name.
	VNI uint32 `msgpack:"vni,omitempty" json:"vni,omitempty"`
}

// MaxVNI is the largest VXLAN segment id.
const MaxVNI = 1<<24 - 1

// Validate checks a CreateNet's arguments.
func (c *CreateNet) Validate() error {
	if err := ValidateName("net", c.Name); err != nil {
		return err
	}
	prefix, err := netip.ParsePrefix(c.CIDR)
	if err != nil || !prefix.Addr().Is4() || prefix.Bits() > 29 || prefix.Bits() < 8 {
		return fmt.Errorf("cidr %q: want an IPv4 prefix from /8 to /29, e.g. 10.77.0.0/24", c.CIDR)
	}
	if c.VNI > MaxVNI {
		return fmt.Errorf("vni %d out of range 1..%d", c.VNI, MaxVNI)
	}
	return c.CommandMeta.Validate()
}

// VNIOf derives a net's VXLAN segment from its name.
func VNIOf(name string) uint32 {
	sum := sha256.Sum256([]byte("vni\x00" + name))
	return 1 + (uint32(sum[0])<<16|uint32(sum[1])<<8|uint32(sum[2]))%(MaxVNI-1)
}

// A host port is a host's own address on a net: its bridge answers on it,
// so that the host can reach the net's VMs (a gateway, a probe). Its
// binding's UID is PortUID(host) and its VM empty; it stays until the
// host detaches it.
const portPrefix = "port:"

// PortUID is the binding UID of host's port on a net.
func PortUID(host string) string { return portPrefix + host }

// IsPort tells whether a binding UID is a host port's.
func IsPort(uid string) bool {
	return len(uid) > len(portPrefix) && uid[:len(portPrefix)] == portPrefix
}

// AttachNet gives a host a port on a net: an address of its own there.
type AttachNet struct {
	CommandMeta `msgpack:",inline"`
	Net         string `msgpack:"net" json:"net"`
	Host        string `msgpack:"host" json:"host"`
}

// VerbAttach gives a host a port on a net.
const VerbAttach = "attach"

// Validate checks an AttachNet's arguments.
func (c *AttachNet) Validate() error {
	if err := ValidateName("net", c.Net); err != nil {
		return err
	}
	if err := ValidateName("host", c.Host); err != nil {
		return err
	}
	return c.CommandMeta.Validate()
}
