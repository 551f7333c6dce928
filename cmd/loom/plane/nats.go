package plane

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events/bus"
)

// NATSConfig says which NATS to use: an embedded server, or a cluster.
type NATSConfig struct {
	// URL names an external NATS; empty means embed one.
	URL string
	// Listen is the embedded server's client address; port 0 picks a free one.
	Listen string
	// Sync is "always" (fsync before every ack) or an fsync interval.
	Sync string
	// Replicas of Loom's streams.
	Replicas int
	// Identities, if any, are the embedded server's only users (auth on);
	// none means no auth at all.
	Identities []bus.Identity
	// Creds is the seed file this connection authenticates with; empty
	// means none.
	Creds string
	// TLS, if set, is the embedded server's: TLS on every client
	// connection.
	TLS *tls.Config
	// CA, if set, is the CA certificate (PEM) this connection trusts: TLS
	// to the server.
	CA string
	// ServerName names the embedded server; empty means "loom", or this
	// machine's name in a cluster, where each needs its own.
	ServerName string
	// ClusterListen, if set, is where the embedded server takes routes
	// from the other servers of its cluster (port 0: a free one).
	ClusterListen string
	// ClusterName names the cluster; empty means "loom".
	ClusterName string
	// Routes are the other servers' route URLs (nats-route://HOST:PORT).
	Routes []string
	// RouteTLS, if set, is required of every route, both ways.
	RouteTLS *tls.Config
	// AdminCreds, if set, is the admin identity's seed file: Connect uses
	// it to create or update the streams, and nothing else. Without it,
	// an authenticated Connect only checks that the streams are as Loom
	// expects, and refuses to go on if they are not.
	AdminCreds string
}

// DefaultListen is where an embedded server listens unless told otherwise.
const DefaultListen = "127.0.0.1:4222"

// ServerConfig turns the config into the embedded server's settings, with
// its files under dataDir/nats.
func (c NATSConfig) ServerConfig(dataDir string) (bus.ServerConfig, error) {
	listen := c.Listen
	if listen == "" {
		listen = DefaultListen
	}
	host, port, err := hostPort(listen)
	if err != nil {
		return bus.ServerConfig{}, fmt.Errorf("listen %q: %w", listen, err)
	}
	cfg := bus.ServerConfig{DataDir: filepath.Join(dataDir, "nats"), Host: host, Port: port, Identities: c.Identities, TLS: c.TLS,
		ServerName: c.ServerName}
	if c.ClusterListen != "" {
		if cfg.Cluster, err = c.cluster(); err != nil {
			return bus.ServerConfig{}, err
		}
		if cfg.ServerName == "" {
			cfg.ServerName, _ = os.Hostname()
		}
	}
	switch c.Sync {
	case "", "always":
		cfg.SyncAlways = true
	default:
		d, err := time.ParseDuration(c.Sync)
		if err != nil || d <= 0 {
			return bus.ServerConfig{}, fmt.Errorf("sync %q: want always or a positive duration", c.Sync)
		}
		cfg.SyncInterval = d
	}
	return cfg, nil
}

// cluster is the embedded server's cluster.
func (c NATSConfig) cluster() (*bus.Cluster, error) {
	host, port, err := hostPort(c.ClusterListen)
	if err != nil {
		return nil, fmt.Errorf("cluster listen %q: %w", c.ClusterListen, err)
	}
	name := c.ClusterName
	if name == "" {
		name = "loom"
	}
	return &bus.Cluster{Name: name, Host: host, Port: port, Routes: c.Routes, TLS: c.RouteTLS}, nil
}

// hostPort splits a listen address; port 0 becomes the server's "any free
// port", -1.
func hostPort(listen string) (string, int, error) {
	host, portText, err := net.SplitHostPort(listen)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, errors.New("bad port")
	}
	if port == 0 {
		port = -1
	}
	return host, port, nil
}

// Connection is a NATS connection, and the embedded server behind it if any.
type Connection struct {
	Server *bus.Server
	Conn   *nats.Conn
	JS     jetstream.JetStream
	// URL reaches the server: clients connect here.
	URL string
}

// Close drains the connection and stops the embedded server.
func (c *Connection) Close() {
	if c.Conn != nil {
		_ = c.Conn.Drain()
		c.Conn.Close()
	}
	if c.Server != nil {
		c.Server.Stop()
	}
}

// Connect starts the embedded server unless cfg names a cluster, connects,
// and makes sure Loom's streams exist with the required settings.
func Connect(ctx context.Context, cfg NATSConfig, dataDir, name string, log *slog.Logger) (*Connection, error) {
	conn := &Connection{URL: cfg.URL}
	if cfg.URL == "" {
		scfg, err := cfg.ServerConfig(dataDir)
		if err != nil {
			return nil, err
		}
		conn.Server, err = bus.StartServer(ctx, scfg)
		if err != nil {
			return nil, err
		}
		conn.URL = conn.Server.ClientURL()
		log.Info("embedded NATS started", "url", conn.URL, "store", scfg.DataDir, "sync_always", scfg.SyncAlways, "sync_interval", scfg.SyncInterval)
		if scfg.Cluster != nil {
			log.Info("waiting for the cluster's JetStream leader", "routes", scfg.Cluster.Routes)
			if err := conn.Server.WaitForJetStream(ctx); err != nil {
				conn.Close()
				return nil, err
			}
		}
	}
	if err := conn.setUpStreams(ctx, cfg, name, log); err != nil {
		conn.Close()
		return nil, err
	}
	if err := conn.dial(name, Access{Creds: cfg.Creds, CA: cfg.CA}); err != nil {
		conn.Close()
		return nil, err
	}
	if cfg.AdminCreds == "" && cfg.Creds != "" {
		if err := bus.CheckStreams(ctx, conn.JS, bus.StreamsConfig{Replicas: cfg.Replicas}); err != nil {
			conn.Close()
			return nil, err
		}
	}
	return conn, nil
}

// setUpStreams creates or updates Loom's streams, as the admin identity
// when there are credentials, on a connection of its own.
func (c *Connection) setUpStreams(ctx context.Context, cfg NATSConfig, name string, log *slog.Logger) error {
	if cfg.Creds != "" && cfg.AdminCreds == "" {
		return nil // not allowed to: Connect checks them instead
	}
	admin := &Connection{URL: c.URL}
	if err := admin.dial(name+"-admin", Access{Creds: cfg.AdminCreds, CA: cfg.CA}); err != nil {
		return err
	}
	defer admin.Close()
	streams := bus.StreamsConfig{Replicas: cfg.Replicas}
	if cfg.Replicas <= 1 && cfg.ClusterListen == "" {
		return bus.EnsureStreams(ctx, admin.JS, streams)
	}
	// In a cluster, a JetStream request that meets a leader election (the
	// servers start together, and each server's control plane sets the
	// streams up at once) is dropped, not refused: each try gets a while.
	for {
		try, cancel := context.WithTimeout(ctx, clusterTry)
		err := bus.EnsureStreams(try, admin.JS, streams)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		log.Warn("the cluster did not answer in time; trying again", "err", err)
	}
}

// clusterTry bounds one try at the streams in a cluster.
const clusterTry = 5 * time.Second

// Join connects to a running Loom's NATS at url without touching its
// streams: what a host agent does. Only the control plane creates streams.
func Join(url, name string, as Access) (*Connection, error) {
	conn := &Connection{URL: url}
	if err := conn.dial(name, as); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// Access is how a connection gets in: the seed file of its identity and
// the CA it trusts for TLS; empty fields mean none.
type Access struct {
	Creds string
	CA    string
}

// Options are the connect options of a.
func (a Access) Options() ([]nats.Option, error) {
	var opts []nats.Option
	if a.Creds != "" {
		more, err := CredsOptions(a.Creds)
		if err != nil {
			return nil, err
		}
		opts = append(opts, more...)
	}
	if a.CA != "" {
		opts = append(opts, nats.RootCAs(a.CA))
	}
	return opts, nil
}

// dial connects to c.URL as a says, reconnecting forever once connected.
func (c *Connection) dial(name string, a Access) error {
	creds := a.Creds
	opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				refusals.Add(1)
			}
			slog.Error("the NATS server refused a request", "connection", name, "identity", identityLabel(creds), "err", err)
		})}
	more, err := a.Options()
	if err != nil {
		return err
	}
	opts = append(opts, more...)
	c.Conn, err = nats.Connect(c.URL, opts...)
	if err != nil {
		return fmt.Errorf("connect %s as %s: %w", c.URL, identityLabel(creds), err)
	}
	if c.JS, err = jetstream.New(c.Conn); err != nil {
		return fmt.Errorf("jetstream on %s: %w", c.URL, err)
	}
	return nil
}

// refusals counts the permission violations any connection of this
// process was told of.
var refusals atomic.Int64

// Refusals is how many times the server refused this process's
// connections a publish or a subscription: zero when every identity has
// the rights its job needs.
func Refusals() int64 { return refusals.Load() }

// identityLabel names the identity of a seed file for an error message.
func identityLabel(creds string) string {
	if creds == "" {
		return "nobody (no credentials)"
	}
	return filepath.Base(creds)
}
