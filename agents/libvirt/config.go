package libvirt

import (
	"fmt"
	"net/url"
	"strings"
	"time"
)

// Defaults applied to zero Config fields.
const (
	DefaultSocket      = "/run/libvirt/libvirt-sock"
	DefaultURI         = "qemu:///system"
	DefaultDialTimeout = 5 * time.Second
	DefaultRPCTimeout  = 30 * time.Second
)

// Config says which libvirtd to talk to and how long to wait for it. The zero
// value dials the system QEMU driver on the default socket.
type Config struct {
	// Socket is the path of libvirtd's read-write unix socket.
	Socket string
	// URI selects the driver inside libvirtd, e.g. "test:///default" or
	// "qemu:///system". Its scheme also picks the domain type in defined XML.
	URI string
	// DialTimeout bounds connecting plus the connect-open handshake.
	DialTimeout time.Duration
	// RPCTimeout bounds each RPC. QEMU verbs such as Destroy take 1-2 s on a
	// loaded TCG host, so keep it well above that.
	RPCTimeout time.Duration
}

// withDefaults returns cfg with zero fields set to their defaults.
func (cfg Config) withDefaults() Config {
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.URI == "" {
		cfg.URI = DefaultURI
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.RPCTimeout == 0 {
		cfg.RPCTimeout = DefaultRPCTimeout
	}
	return cfg
}

// Validate reports whether cfg, after defaults, can be used to dial.
func (cfg Config) Validate() error {
	cfg = cfg.withDefaults()
	if cfg.DialTimeout < 0 || cfg.RPCTimeout < 0 {
		return fmt.Errorf("%w: timeouts must not be negative", ErrInvalidConfig)
	}
	if _, err := domainType(cfg.URI); err != nil {
		return err
	}
	return nil
}

// domainType maps a connection URI to the <domain type=...> the driver
// accepts: "test" for test:///, "qemu" (TCG) for qemu:///.
// TODO(libvirt): choose "kvm" when the host has /dev/kvm.
func domainType(uri string) (string, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", fmt.Errorf("%w: uri %q: %w", ErrInvalidConfig, uri, err)
	}
	// "qemu+unix" and friends name a transport after the driver.
	driver, _, _ := strings.Cut(u.Scheme, "+")
	switch driver {
	case "test":
		return "test", nil
	case "qemu":
		return "qemu", nil
	default:
		return "", fmt.Errorf("%w: uri %q: unsupported driver %q (want test or qemu)", ErrInvalidConfig, uri, driver)
	}
}
