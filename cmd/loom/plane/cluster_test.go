package plane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/internal/eventually"
)

// copyCA gives dir the CA of from, as an operator does for a new server of
// a cluster before running loom init there.
func copyCA(t *testing.T, from, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{caCertFile, caKeyFile} {
		data, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCluster_RoutesOnlyOverTLSFromTheCA: three embedded servers, each
// with its own certificate from one CA, form a cluster over TLS routes and
// keep a stream on all three; a route with no certificate, or one from
// another CA, is refused at the handshake, and plain text gets nowhere.
func TestCluster_RoutesOnlyOverTLSFromTheCA(t *testing.T) {
	base := t.TempDir()
	first := CredsDir(filepath.Join(base, "n1"))
	if _, err := InitCreds(first, nil, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()

	// Every server lists every route, its own included, as in production.
	var routes []string
	for range 3 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		routes = append(routes, "nats-route://"+l.Addr().String())
		_ = l.Close()
	}
	var servers []*bus.Server
	for i := range 3 {
		dataDir := filepath.Join(base, fmt.Sprintf("n%d", i+1))
		creds := CredsDir(dataDir)
		if i > 0 {
			copyCA(t, first, creds)
			for _, f := range []string{identitiesFile, "admin.nk"} {
				data, err := os.ReadFile(filepath.Join(first, f))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(creds, f), data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
		cfg := NATSConfig{Listen: "127.0.0.1:0", ClusterListen: strings.TrimPrefix(routes[i], "nats-route://"),
			ServerName: fmt.Sprintf("n%d", i+1), Routes: routes}
		if _, err := SecureEmbedded(&cfg, dataDir, nil, slog.New(slog.DiscardHandler)); err != nil {
			t.Fatal(err)
		}
		scfg, err := cfg.ServerConfig(dataDir)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := bus.StartServer(ctx, scfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Stop)
		servers = append(servers, srv)
	}
	eventually.WaitFor(t, 30*time.Second, "a full mesh of routes", func() error {
		for i, s := range servers {
			if n := s.NumRoutes(); n < 2 {
				return fmt.Errorf("n%d has %d routes", i+1, n)
			}
		}
		return nil
	})

	// The cluster keeps a stream on all three: written on n1, read on n3.
	admin := func(i int) *Connection {
		conn, err := Join(servers[i].ClientURL(), "admin", AccessIn(first, string(bus.RoleAdmin)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(conn.Close)
		return conn
	}
	a1, a3 := admin(0), admin(2)
	// Until the cluster has a JetStream leader, API requests go unanswered.
	if err := servers[0].WaitForJetStream(ctx); err != nil {
		t.Fatal(err)
	}
	if err := bus.EnsureStreams(ctx, a1.JS, bus.StreamsConfig{Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := a1.JS.Publish(ctx, events.EventSubject(events.KindVM, "web"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	eventually.WaitFor(t, 30*time.Second, "the event, read on n3", func() error {
		_, err := bus.LastOnSubject(ctx, a3.Conn, events.StreamEvents, events.EventSubject(events.KindVM, "web"))
		return err
	})

	// Strangers at n1's route port.
	addr := servers[0].ClusterAddr().String()
	other := filepath.Join(base, "other")
	if _, err := InitTLS(other, nil); err != nil {
		t.Fatal(err)
	}
	stranger, err := tls.LoadX509KeyPair(filepath.Join(other, serverCertFile), filepath.Join(other, serverKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(CAFile(first))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	for name, certs := range map[string][]tls.Certificate{"no certificate": nil, "another CA's certificate": {stranger}} {
		err := routeHandshake(addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: certs, MinVersion: tls.VersionTLS12})
		if err == nil {
			t.Errorf("a route with %s was taken", name)
		}
	}
	own, err := tls.LoadX509KeyPair(filepath.Join(first, serverCertFile), filepath.Join(first, serverKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := routeHandshake(addr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{own}, MinVersion: tls.VersionTLS12}); err != nil {
		t.Errorf("a route with a certificate from the CA (the check's control): %v", err)
	}
	if reply := plainRoute(t, addr); strings.Contains(reply, "INFO") {
		t.Errorf("a plain-text route was answered: %q", reply)
	}

	// The control of that probe: a server whose routes take no TLS (an
	// open bus) answers it.
	open, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: t.TempDir(), Port: -1, ServerName: "open",
		Cluster: &bus.Cluster{Name: "loom", Host: "127.0.0.1", Port: -1, Routes: []string{"nats-route://127.0.0.1:1"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer open.Stop()
	if reply := plainRoute(t, open.ClusterAddr().String()); !strings.Contains(reply, "INFO") {
		t.Errorf("a route port without TLS did not answer plain text: %q", reply)
	}
}

// plainRoute speaks plain text to a route port and returns what it said
// before it closed the connection, or in 3 seconds.
func plainRoute(t *testing.T, addr string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	_, _ = conn.Write([]byte("CONNECT {}\r\nPING\r\n"))
	reply, _ := io.ReadAll(conn)
	return string(reply)
}

// routeHandshake opens a TLS route to addr with cfg and reads the
// server's first words: a refused certificate shows as an error here
// (under TLS 1.3 the server's verdict comes after the client's handshake).
func routeHandshake(addr string, cfg *tls.Config) error {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	buf := make([]byte, 1)
	_, err = conn.Read(buf)
	return err
}
