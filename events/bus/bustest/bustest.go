// Package bustest starts an embedded NATS server with Loom's streams for
// tests: a random port, JetStream on a temporary directory, stopped when
// the test ends.
package bustest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events/bus"
)

// Bus is a running test server and a connection to it.
type Bus struct {
	Server *bus.Server
	Conn   *nats.Conn
	JS     jetstream.JetStream
	// URL reaches the server over TCP loopback.
	URL string
}

// Start starts a server on a random port with Loom's streams created, and
// registers its shutdown with t.Cleanup.
func Start(t testing.TB) *Bus {
	t.Helper()
	return StartIn(t, t.TempDir())
}

// StartIn is Start with the server's files in dir, so a test can stop the
// server and start another on the same files.
func StartIn(t testing.TB, dir string) *Bus {
	t.Helper()
	b := StartBare(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := bus.EnsureStreams(ctx, b.JS, bus.StreamsConfig{}); err != nil {
		t.Fatalf("ensure streams: %v", err)
	}
	return b
}

// StartBare is StartIn without Loom's streams, for tests that make their
// own (or none).
func StartBare(t testing.TB, dir string) *Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	srv, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: dir, Port: -1})
	if err != nil {
		t.Fatalf("start nats: %v", err)
	}
	b := &Bus{Server: srv, URL: srv.ClientURL()}
	t.Cleanup(srv.Stop)
	b.Conn = Connect(t, b.URL)
	b.JS, err = jetstream.New(b.Conn)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	return b
}

// Connect opens a connection to url, closed when the test ends.
func Connect(t testing.TB, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}
