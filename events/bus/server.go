package bus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
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
}

// Server is a running embedded NATS server.
type Server struct {
	*server.Server
	// opts are the options it runs with: SetIdentities changes a copy.
	opts *server.Options
}

// SetIdentities replaces the users of a server started with identities,
// without a restart: connections of identities that remain are kept, those
// of removed ones are closed.
func (s *Server) SetIdentities(ids []Identity) error {
	if len(s.opts.Nkeys) == 0 {
		return errors.New("nats server: started without identities (auth off); restart it to turn auth on")
	}
	users, err := nkeyUsers(ids)
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
	if len(cfg.Identities) > 0 {
		users, err := nkeyUsers(cfg.Identities)
		if err != nil {
			return nil, fmt.Errorf("nats server: %w", err)
		}
		opts.Nkeys = users
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
	return &Server{Server: ns, opts: opts}, nil
}

// Stop shuts the server down and waits until it has.
func (s *Server) Stop() {
	s.Shutdown()
	s.WaitForShutdown()
}
