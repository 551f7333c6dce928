package plane

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/loomctl/loom/events/bus"
)

func TestInitCreds_MakesOnceKeepsSeedsAndListsThem(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "creds")
	made, err := InitCreds(dir, []string{"h1"})
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
	made, err = InitCreds(dir, []string{"h1", "h2"})
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
	if _, err := InitCreds(dir, nil); err != nil {
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
