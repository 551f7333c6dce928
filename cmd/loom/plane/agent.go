package plane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/loomctl/loom/agents"
	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/events/hostkey"
)

// AgentConfig configures one host agent.
type AgentConfig struct {
	// Host is the name the agent acts for.
	Host string
	// HostKey is the file of the host's key, which signs every observation
	// the agent publishes; it is made (mode 0600, its public half beside
	// it) if missing. Empty signs nothing: the legacy mode.
	HostKey string
	// Socket is libvirtd's read-write unix socket; URI picks its driver.
	Socket, URI string
	// Simulated says the host is libvirt's test driver, as loom up and the
	// benchmarks run it. The driver forgets every domain when its last
	// connection closes, so a second connection is held open for the whole
	// run (or the host would lose its guests each time the agent
	// reconnects), and the driver's built-in domain "test" is removed
	// first, so the host starts empty instead of with an orphan.
	Simulated bool
	// TTL of each liveness renewal, FenceMargin (m_a) and StopGrace for
	// guest shutdowns; zero takes the agent's defaults.
	TTL, FenceMargin, StopGrace time.Duration
	// HTTPAddr serves the agent's /metrics; empty serves none.
	HTTPAddr string
	// FenceSocket is where `loom fence` listens (empty: no fencer);
	// FencePolicy is pause or destroy.
	FenceSocket string
	FencePolicy agents.FencePolicy
	// ClockOffset shifts the agent's wall clock (the times on its events)
	// and ClockRate scales the spans it measures: injected clock faults,
	// for the safety tests. Unsafe switches protections off, for the tests
	// that show what each guards.
	ClockOffset time.Duration
	ClockRate   float64
	Unsafe      agents.Unsafe
	// StorageDir keeps the host's VM disks (overlays on their images) and
	// serial logs; AliveMarker is what a guest prints once it is up.
	StorageDir, AliveMarker string
	// MigrateURI is this host's libvirtd as other hosts' daemons dial it,
	// MigrateListen where its QEMU listens for incoming migrations
	// ("unix:DIR" or "tcp:ADDRESS"); without MigrateURI the host receives
	// no migration.
	MigrateURI, MigrateListen string
	// TunnelEndpoint is the host's underlay address for VXLAN; with
	// Overlay the agent programs the host's side of every net.
	TunnelEndpoint string
	Overlay        *agents.OverlayConfig
}

// RunAgent runs a host agent until ctx ends. It dials libvirtd again
// whenever the connection is lost.
func RunAgent(ctx context.Context, conn *Connection, cfg AgentConfig, log *slog.Logger) error {
	key, err := loadHostKey(cfg, log)
	if err != nil {
		return err
	}
	lv := libvirt.Config{Socket: cfg.Socket, URI: cfg.URI}
	if cfg.Simulated {
		held, err := libvirt.Dial(ctx, lv)
		if err != nil {
			return fmt.Errorf("agent %s: hold libvirt open: %w", cfg.Host, err)
		}
		defer func() {
			if err := held.Close(); err != nil {
				log.Debug("close the held libvirt connection", "host", cfg.Host, "err", err)
			}
		}()
		if err := clearTestDomain(ctx, held); err != nil {
			return fmt.Errorf("agent %s: %w", cfg.Host, err)
		}
	}
	agent, err := agents.New(agents.Config{
		Host: cfg.Host, HostKey: key, Conn: conn.Conn, JS: conn.JS,
		Dial: func(ctx context.Context) (agents.Hypervisor, error) {
			c, err := libvirt.Dial(ctx, lv)
			if err != nil {
				return nil, err // a nil *Client must not become a non-nil interface
			}
			return c, nil
		},
		TTL: cfg.TTL, FenceMargin: cfg.FenceMargin, StopGrace: cfg.StopGrace,
		FenceSocket: cfg.FenceSocket, FencePolicy: cfg.FencePolicy,
		ClockRate: cfg.ClockRate, Unsafe: cfg.Unsafe,
		StorageDir: cfg.StorageDir, AliveMarker: cfg.AliveMarker,
		MigrateURI: cfg.MigrateURI, MigrateListen: cfg.MigrateListen, TunnelEndpoint: cfg.TunnelEndpoint, Overlay: cfg.Overlay,
		Now:    func() time.Time { return time.Now().Add(cfg.ClockOffset) },
		Logger: log,
	})
	if err != nil {
		return err
	}
	if cfg.HTTPAddr != "" {
		registry := newRegistry(agent.Collectors()...)
		go func() {
			if err := serveMetrics(ctx, cfg.HTTPAddr, registry, log); err != nil {
				log.Error("agent metrics", "err", err)
			}
		}()
	}
	err = agent.Run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// loadHostKey loads the host's key, making it if missing, and says which
// public key the host must be registered with. Nil without a key file.
func loadHostKey(cfg AgentConfig, log *slog.Logger) (*hostkey.Key, error) {
	if cfg.HostKey == "" {
		log.Warn("no host key (neither --host-key nor the agent's NATS identity): this agent's observations are not signed, and are flagged once the host is registered with a key",
			"host", cfg.Host)
		return nil, nil
	}
	key, created, err := hostkey.Ensure(cfg.HostKey)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", cfg.Host, err)
	}
	log.Info("signing observations with the host key", "host", cfg.Host, "file", cfg.HostKey, "public", key.Public(), "created", created,
		"register", "loom host register "+cfg.Host+" --key "+key.Public())
	return key, nil
}

// testDomain is the domain libvirt's test:///default driver starts with.
const testDomain = "test"

// clearTestDomain removes the test driver's built-in domain, if present.
func clearTestDomain(ctx context.Context, c *libvirt.Client) error {
	if err := c.Destroy(ctx, testDomain); err != nil && !errors.Is(err, libvirt.ErrNotFound) {
		return fmt.Errorf("clear the test driver's domain: %w", err)
	}
	if err := c.Undefine(ctx, testDomain); err != nil && !errors.Is(err, libvirt.ErrNotFound) {
		return fmt.Errorf("clear the test driver's domain: %w", err)
	}
	return nil
}

// FencerConfig configures `loom fence` for one host.
type FencerConfig struct {
	Host string
	// Socket is libvirtd's read-write unix socket; URI picks its driver.
	Socket, URI string
	// Listen is the unixgram socket the agent sends its deadlines to.
	Listen string
	Policy agents.FencePolicy
}

// RunFencer runs the fencer of one host until ctx ends.
func RunFencer(ctx context.Context, cfg FencerConfig, log *slog.Logger) error {
	lv := libvirt.Config{Socket: cfg.Socket, URI: cfg.URI}
	f, err := agents.NewFencer(agents.FencerConfig{
		Host: cfg.Host, Socket: cfg.Listen, Policy: cfg.Policy, Logger: log,
		Dial: func(ctx context.Context) (agents.Hypervisor, error) {
			c, err := libvirt.Dial(ctx, lv)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
	})
	if err != nil {
		return err
	}
	return f.Run(ctx)
}
