package overlay

import (
	"fmt"
	"net/netip"
	"strconv"
)

// Defaults applied to zero Config fields.
const (
	// DefaultPort is the IANA VXLAN port.
	DefaultPort = 4789
	// DefaultBridgePrefix followed by the VNI names the bridge.
	DefaultBridgePrefix = "loombr"
)

// DevicePrefix followed by the VNI names the VXLAN device. The device
// belongs to this package: SetPeers owns every entry on it.
const DevicePrefix = "loomvx"

// MaxVNI is the largest VXLAN network identifier (24 bits).
const MaxVNI = 1<<24 - 1

// Config is one host's side of one overlay network.
type Config struct {
	// Prefix, if set, runs every command through it, such as
	// []string{"nsenter", "-t", pid, "-n"} to act in another network
	// namespace. Empty runs ip and bridge directly.
	Prefix []string
	// Bridge is the bridge the VMs' taps and the VXLAN device join;
	// empty means DefaultBridgePrefix followed by VNI ("loombr42").
	Bridge string
	// VNI identifies the overlay network on the wire (1..MaxVNI).
	VNI uint32
	// Local is this host's tunnel endpoint: the underlay address the
	// other hosts send this overlay's packets to.
	Local netip.Addr
	// Underlay, if set, is the device Local is on; the tunnel's packets
	// then leave through it whatever the routes say.
	Underlay string
	// Port is the UDP port of the tunnel on every host; 0 means DefaultPort.
	Port uint16
}

// Validate reports whether c can be used, with the reason.
func (c Config) Validate() error {
	if c.VNI == 0 || c.VNI > MaxVNI {
		return fmt.Errorf("%w: VNI %d is not in 1..%d", ErrInvalidConfig, c.VNI, MaxVNI)
	}
	if !c.Local.IsValid() || c.Local.IsUnspecified() || c.Local.IsMulticast() || c.Local.Zone() != "" {
		return fmt.Errorf("%w: local endpoint %q is not a unicast address", ErrInvalidConfig, c.Local)
	}
	if c.Bridge != "" {
		if err := checkLinkName("bridge", c.Bridge); err != nil {
			return err
		}
	}
	if c.Underlay != "" {
		if err := checkLinkName("underlay", c.Underlay); err != nil {
			return err
		}
	}
	if c.Bridge == c.DeviceName() {
		return fmt.Errorf("%w: bridge %q has the VXLAN device's name", ErrInvalidConfig, c.Bridge)
	}
	if len(c.Prefix) > 0 && c.Prefix[0] == "" {
		return fmt.Errorf("%w: prefix %q starts with an empty program name", ErrInvalidConfig, c.Prefix)
	}
	return nil
}

// BridgeName is the bridge's name, the default applied.
func (c Config) BridgeName() string {
	if c.Bridge != "" {
		return c.Bridge
	}
	return DefaultBridgePrefix + strconv.FormatUint(uint64(c.VNI), 10)
}

// DeviceName is the name of the VXLAN device: DevicePrefix followed by VNI.
func (c Config) DeviceName() string {
	return DevicePrefix + strconv.FormatUint(uint64(c.VNI), 10)
}

// withDefaults validates c and fills in its zero fields.
func (c Config) withDefaults() (Config, error) {
	if err := c.Validate(); err != nil {
		return c, err
	}
	c.Bridge = c.BridgeName()
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	return c, nil
}

// checkLinkName checks a Linux network device name: 1-15 bytes (IFNAMSIZ
// less its NUL) of [A-Za-z0-9._-], not "." or "..".
func checkLinkName(what, name string) error {
	if name == "" || len(name) > 15 || name == "." || name == ".." {
		return fmt.Errorf("%w: %s %q must be a device name of 1-15 bytes", ErrInvalidConfig, what, name)
	}
	for i := 0; i < len(name); i++ {
		if !linkNameByte(name[i]) {
			return fmt.Errorf("%w: %s %q: byte %d is %q; allowed are A-Z a-z 0-9 . _ -", ErrInvalidConfig, what, name, i, name[i])
		}
	}
	return nil
}

// linkNameByte reports whether b may appear in a device name.
func linkNameByte(b byte) bool {
	return 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' ||
		b == '.' || b == '_' || b == '-'
}
