package plane

import (
	"bufio"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/internal/eventually"
)

func TestInitCreds_MakesOnceKeepsSeedsAndListsThem(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	made, err := InitCreds(dir, []string{"h1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"admin", "plane", "client", "auditor", "agent-h1"}
	if !slices.Equal(made, want) {
		t.Fatalf("made %v, want %v", made, want)
	}
	seed, err := os.ReadFile(CredsFile(dir, "plane"))
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := os.Stat(CredsFile(dir, "plane")); info.Mode().Perm() != 0o600 {
		t.Fatalf("seed mode %v, want 0600", info.Mode().Perm())
	}
	made, err = InitCreds(dir, []string{"h1", "h2"}, nil)
	if err != nil || !slices.Equal(made, []string{"agent-h2"}) {
		t.Fatalf("second init made %v (%v), want only agent-h2", made, err)
	}
	if again, _ := os.ReadFile(CredsFile(dir, "plane")); string(again) != string(seed) {
		t.Fatal("a second init replaced a seed")
	}
	ids, err := LoadIdentities(dir)
	if err != nil {
		t.Fatal(err)
	}
	roles := map[string]bus.Role{}
	for _, id := range ids {
		roles[id.Name()] = id.Role
		if strings.Contains(string(seed), id.Key) {
			t.Fatal("identities.json holds a seed")
		}
	}
	if len(ids) != 6 || roles["agent-h2"] != bus.RoleAgent || roles["auditor"] != bus.RoleAuditor {
		t.Fatalf("identities = %+v", ids)
	}
	if _, err := CredsOptions(CredsFile(dir, "agent-h2")); err != nil {
		t.Fatalf("the agent's seed does not load: %v", err)
	}
}

func TestCredsOptions_BadFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := InitCreds(dir, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(CredsFile(dir, "client"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := CredsOptions(CredsFile(dir, "client")); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a seed others may read: %v", err)
	}
	garbage := filepath.Join(dir, "auditor.nk")
	if err := os.WriteFile(garbage, []byte("SUNOTASEED"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := CredsOptions(garbage)
	if err == nil || strings.Contains(err.Error(), "SUNOTASEED") {
		t.Errorf("a garbage seed: %v (and no seed may be printed)", err)
	}
	stray := filepath.Join(dir, "root.nk")
	if err := os.WriteFile(stray, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := CredsOptions(stray); err == nil || !strings.Contains(err.Error(), "no role") {
		t.Errorf("a seed whose name says no role: %v", err)
	}
}

// TestTLS_RequiredOfEveryNetworkConnection starts a server with the TLS
// InitTLS makes: a client that trusts its CA gets in; one without TLS, or
// trusting another CA, does not.
func TestTLS_RequiredOfEveryNetworkConnection(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	if made, err := InitTLS(dir, []string{"bus.example"}); err != nil || !made {
		t.Fatalf("InitTLS: %v %v", made, err)
	}
	if made, err := InitTLS(dir, nil); err != nil || made {
		t.Fatalf("a second InitTLS made new certificates (%v, %v)", made, err)
	}
	cfg, err := ServerTLS(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := bus.StartServer(t.Context(), bus.ServerConfig{DataDir: t.TempDir(), Port: -1, TLS: cfg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	opts, err := Access{CA: CAFile(dir)}.Options()
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(srv.ClientURL(), opts...)
	if err != nil {
		t.Fatalf("a client trusting the CA: %v", err)
	}
	if state, ok := nc.TLSConnectionState(); ok != nil || !state.HandshakeComplete {
		t.Errorf("the connection is not TLS: %v", ok)
	}
	nc.Close()
	// A client that speaks plain text is told TLS is required, and
	// nats.go, which then tries TLS, does not trust a CA it was not given.
	raw, err := net.Dial("tcp", strings.TrimPrefix(srv.ClientURL(), "tls://"))
	if err != nil {
		t.Fatal(err)
	}
	info, err := bufio.NewReader(raw).ReadString('\n')
	_ = raw.Close()
	if err != nil || !strings.Contains(info, `"tls_required":true`) {
		t.Errorf("the server's greeting does not require TLS: %q (%v)", info, err)
	}
	if nc, err := nats.Connect(srv.ClientURL()); err == nil {
		nc.Close()
		t.Error("a client that was given no CA got in")
	}
	other := filepath.Join(t.TempDir(), "other")
	if _, err := InitTLS(other, nil); err != nil {
		t.Fatal(err)
	}
	if nc, err := nats.Connect(srv.ClientURL(), nats.RootCAs(CAFile(other))); err == nil {
		nc.Close()
		t.Error("a client trusting another CA got in")
	}
}

// TestWatchIdentities_LetsANewHostInWithoutARestart adds a host's identity
// with InitCreds while the server runs: its agent gets in once the watcher
// has reloaded, and the identities connected before stay connected.
func TestWatchIdentities_LetsANewHostInWithoutARestart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	if _, err := InitCreds(dir, []string{"h1"}, nil); err != nil {
		t.Fatal(err)
	}
	ids, err := LoadIdentities(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := bus.StartServer(t.Context(), bus.ServerConfig{DataDir: t.TempDir(), Port: -1, Identities: ids})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	connect := func(name string) (*nats.Conn, error) {
		opts, err := CredsOptions(CredsFile(dir, name))
		if err != nil {
			return nil, err
		}
		return nats.Connect(srv.ClientURL(), opts...)
	}
	before, err := connect("agent-h1")
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- WatchIdentities(ctx, dir, srv, slog.New(slog.DiscardHandler)) }()
	defer func() { cancel(); <-done }()

	if _, err := InitCreds(dir, []string{"h1", "h2"}, nil); err != nil {
		t.Fatal(err)
	}
	eventually.WaitFor(t, 10*time.Second, "agent-h2 let in", func() error {
		nc, err := connect("agent-h2")
		if err != nil {
			return err
		}
		nc.Close()
		return nil
	})
	if !before.IsConnected() {
		t.Error("agent-h1 was disconnected by the reload")
	}
}
