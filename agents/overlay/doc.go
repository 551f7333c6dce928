// Package overlay programs one host's side of a VXLAN overlay network, so
// that a VM keeps its address wherever it runs: every host has a bridge
// (the VMs' taps join it) and a VXLAN device on that bridge, and a mapping
// kept elsewhere says, for each address on the overlay, its MAC and the
// tunnel endpoint of the host it is on. The package only runs iproute2's
// ip and bridge; it keeps no state of its own.
//
// # Protocol
//
//  1. Ensure creates the bridge and the VXLAN device (or fixes them) and
//     brings them up. Call it at start-up and before a VM's tap must join
//     the bridge: before a domain starts here, and before one migrates in.
//  2. SetPeers programs the mapping: hand it every entry of the overlay
//     (those whose Endpoint is this host's are skipped), at start-up and
//     whenever an entry changes. It reconciles: what is on the VXLAN
//     device afterwards is exactly the given entries for other hosts.
//  3. SetPort gives the host its own address on the overlay, its port,
//     on the bridge, with the MAC the other hosts' entries for it name;
//     ClearPort takes it away. The port is an entry like a VM's: every
//     host's SetPeers gets it, with this host's endpoint.
//  4. Remove takes both devices away when the host leaves the overlay.
//
// All are idempotent and safe to repeat after a failure. Calls for
// one Config must not overlap; the caller serializes them. Cfg.Prefix runs
// the commands elsewhere, such as in another network namespace.
//
// # Forwarding and ARP
//
// The VXLAN device learns nothing (nolearning) and has no default
// destination: a frame leaves for another host only when SetPeers put a
// forwarding entry (MAC -> that host's endpoint) on the device. Address
// resolution never crosses the tunnel either: the device answers ARP (and
// IPv6 neighbour solicitations) itself, from the permanent neighbour
// entries (address -> MAC) SetPeers puts on it (its proxy flag), and drops
// a request for an address it has no entry for. The bridge floods a
// request from a local VM, or from the host's own address on the bridge,
// to all its ports, so it reaches the local VMs, which answer for
// themselves, and the VXLAN device, which answers for the remote ones.
//
// Why not flood broadcasts to every host instead (forwarding entries for
// 00:00:00:00:00:00 towards each endpoint): a migrating VM announces
// itself with a broadcast (QEMU's RARP, the guest's gratuitous ARP) that
// would then reach every host; but the mapping has to move anyway for
// unicast frames to follow, and with proxied ARP an address the mapping
// does not know is unreachable rather than flooded to all hosts, the cost
// of a request stays on the host that makes it, and the neighbour caches
// of the VMs can never learn a MAC the control plane did not publish.
// Broadcasts other than ARP (DHCP, for example) stay on the host.
//
// The underlay carries 50 bytes more per frame than the overlay (VXLAN
// over IPv4): with a 1500-byte underlay the VXLAN device gets an MTU of
// 1450, and the guests must use that or the underlay must be larger.
package overlay
