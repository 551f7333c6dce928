package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/loomctl/loom/cmd/loom/plane"
)

// TestHostKeyPath_OneKeyPerHost: loom up signs with the agent's identity,
// unless the data dir already holds a key of the host's own (its host is
// registered with it) or there are no identities (--insecure).
func TestHostKeyPath_OneKeyPerHost(t *testing.T) {
	dataDir := t.TempDir()
	creds := plane.CredsDir(dataDir)
	own := filepath.Join(dataDir, "host-keys", "h1.nk")
	if got, want := hostKeyPath(dataDir, creds, "h1"), plane.CredsFile(creds, "agent-h1"); got != want {
		t.Errorf("with identities: %s, want the agent's identity %s", got, want)
	}
	if got := hostKeyPath(dataDir, "", "h1"); got != own {
		t.Errorf("--insecure: %s, want %s", got, own)
	}
	if err := os.MkdirAll(filepath.Dir(own), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(own, []byte("seed"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := hostKeyPath(dataDir, creds, "h1"); got != own {
		t.Errorf("an older data dir's key: %s, want it kept, %s", got, own)
	}
}
