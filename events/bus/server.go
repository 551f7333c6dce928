package bus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// DefaultPort is the standard NATS client port, where `loom up` listens.
const DefaultPort = 4222

// ServerConfig configures the embedded NATS server.
type ServerConfig struct {
	// DataDir holds JetStream's files. Required.
	DataDir string
	// Host is the listen address; empty means 127.0.0.1.
	Host string
	// Port is the client port; 0 means DefaultPort, -1 a random free port.
	Port int
	// SyncAlways fsyncs every write before it is acknowledged, so an
	// acknowledged event survives a machine crash. When false, the server
	// fsyncs every SyncInterval and a machine crash can lose that much.
	SyncAlways bool
	// SyncInterval is the fsync period when SyncAlways is false; zero means
	// the server's default (2 minutes).
	SyncInterval time.Duration
	// ServerName names the server; empty means "loom".
	ServerName string
	// NoListen serves in-process connections only (no TCP port).
	NoListen bool
	// Identities, if any, are the only users the server accepts, each
	// with its role's permissions; none means no authentication at all.
	Identities []Identity
	// TLS, if set, is required of every client connection over the
	// network (in-process connections have no network to cross).
	TLS *tls.Config
	// Cluster, if set, routes the server to its peers: a cluster of Loom
	// servers, each with its own ServerName.
	Cluster *Cluster
}

// Cluster is how a server reaches the other servers of its cluster.
type Cluster struct {
	// Name is the cluster's name, the same on every server of it.
	Name string
	// Host and Port are where it takes routes; Port -1 picks a free one.
	Host string
	Port int
	// Routes are peers' route URLs (nats-route://host:port); a server
	// learns of the others from those it reaches.
	Routes []string
	// TLS, if set, is required of every route, both ways: each side shows
	// a certificate the other verifies. Nil is plain text: an open bus.
	TLS *tls.Config
}

// Server is a running embedded NATS server.
type Server struct {
	*server.Server
	// opts are the options it runs with: SetIdentities changes a copy.
	opts *server.Options
	// accounts are opts' accounts by name: users point at them.
	accounts map[string]*server.Account
}

// SetIdentities replaces the users of a server started with identities,
// without a restart: connections of identities that remain are kept, those
// of removed ones are closed.
func (s *Server) SetIdentities(ids []Identity) error {
	if len(s.opts.Nkeys) == 0 {
		return errors.New("nats server: started without identities (auth off); restart it to turn auth on")
	}
	users, err := nkeyUsers(ids, s.accounts)
	if err != nil {
		return err
	}
	next := s.opts.Clone()
	next.Nkeys = users
	if err := s.ReloadOptions(next); err != nil {
		return fmt.Errorf("nats server: reload identities: %w", err)
	}
	s.opts = next
	return nil
}

// StartServer starts an embedded NATS server with JetStream and file
// storage and waits until it accepts connections.
func StartServer(ctx context.Context, cfg ServerConfig) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("nats server: data dir is required")
	}
	opts := &server.Options{
		ServerName:         cfg.ServerName,
		Host:               cfg.Host,
		Port:               cfg.Port,
		JetStream:          true,
		StoreDir:           cfg.DataDir,
		SyncAlways:         cfg.SyncAlways,
		SyncInterval:       cfg.SyncInterval,
		NoSigs:             true,
		NoLog:              true,
		DontListen:         cfg.NoListen,
		MaxPayload:         8 << 20,
		JetStreamMaxMemory: 1 << 30,
	}
	if cfg.TLS != nil {
		opts.TLS, opts.TLSConfig, opts.TLSTimeout = true, cfg.TLS, 2
	}
	if c := cfg.Cluster; c != nil {
		if c.Name == "" || cfg.ServerName == "" {
			return nil, errors.New("nats server: a cluster needs its name and a name for each server")
		}
		if len(c.Routes) == 0 {
			// JetStream's meta group forms over them: it refuses to start.
			return nil, errors.New("nats server: a server of a cluster needs routes to the others (list them all; its own is skipped)")
		}
		opts.Cluster.Name, opts.Cluster.Host, opts.Cluster.Port = c.Name, c.Host, c.Port
		if c.TLS != nil {
			opts.Cluster.TLSConfig, opts.Cluster.TLSTimeout = c.TLS, 2
		}
		for _, r := range c.Routes {
			u, err := url.Parse(r)
			if err != nil || u.Scheme != "nats-route" || u.Port() == "" {
				return nil, fmt.Errorf("nats server: route %q: want nats-route://HOST:PORT", r)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	accounts, err := configureAccounts(opts)
	if err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	door := &openDoor{}
	if len(cfg.Identities) > 0 {
		users, err := nkeyUsers(cfg.Identities, accounts)
		if err != nil {
			return nil, fmt.Errorf("nats server: %w", err)
		}
		opts.Nkeys = users
	} else {
		// A nonce lets a client that brings an nkey in as well.
		opts.CustomClientAuthentication, opts.AlwaysEnableNonce = door, true
	}
	if err := adoptLegacyStreams(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	if opts.ServerName == "" {
		opts.ServerName = "loom"
	}
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	if opts.Port == 0 {
		opts.Port = DefaultPort
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	if door.loom, err = ns.LookupAccount(LoomAccount); err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	go ns.Start()
	deadline := time.Now().Add(15 * time.Second)
	for !ns.ReadyForConnections(100 * time.Millisecond) {
		if ctx.Err() != nil || time.Now().After(deadline) {
			ns.Shutdown()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("nats server on %s:%d not ready in 15s (port in use?)", opts.Host, opts.Port)
		}
	}
	return &Server{Server: ns, opts: opts, accounts: accounts}, nil
}

// Stop shuts the server down and waits until it has.
func (s *Server) Stop() {
	s.Shutdown()
	s.WaitForShutdown()
}

// WaitForJetStream waits until a server of a cluster knows its cluster's
// JetStream leader, which takes the other servers: until then JetStream's
// API goes unanswered. A server alone returns at once.
func (s *Server) WaitForJetStream(ctx context.Context) error {
	if !s.JetStreamIsClustered() {
		return nil
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !s.JetStreamIsCurrent() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats server: no JetStream leader in the cluster yet (are a majority of its servers up, their routes reachable?): %w", ctx.Err())
		case <-tick.C:
		}
	}
	return nil
}
