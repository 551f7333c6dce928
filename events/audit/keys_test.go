package audit

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestEnsureKey_MakesOnceAndLoadsAfter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "seal.key")
	key, created, err := EnsureKey(path)
	if err != nil || !created {
		t.Fatalf("first EnsureKey: created %v, %v", created, err)
	}
	again, created, err := EnsureKey(path)
	if err != nil || created || !again.Equal(key) {
		t.Fatalf("second EnsureKey: created %v, same key %v, %v", created, again.Equal(key), err)
	}
	public, err := LoadPublicKey(PublicPath(path))
	if err != nil || !public.Equal(key.Public()) {
		t.Fatalf("public key beside it: %v, %v", public, err)
	}
	if _, err := LoadPublicKey(path); err == nil || !strings.Contains(err.Error(), "private key") {
		t.Fatalf("a private key given as public: %v; want a refusal", err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := EnsureKey(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a key others may read: %v; want a refusal", err)
	}
}

func TestLoadPublicKey_BadInput(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"empty":    "",
		"not pem":  "hello",
		"two":      "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
		"bad body": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
		"cert":     "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
	} {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadPublicKey(path); err == nil {
			t.Errorf("%s: loaded", name)
		}
	}
}

func TestPin_SaveLoadAndBadFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pin.json")
	p := &Pin{Version: pinVersion, Keys: []string{"k"}, First: SealRef{Seq: 3, Hash: make([]byte, 32)}, Last: SealRef{Seq: 9, Hash: make([]byte, 32)}}
	if err := p.Save(path); err != nil {
		t.Fatal(err)
	}
	got, err := LoadPin(path)
	if err != nil || got.Last.Seq != 9 || got.Keys[0] != "k" {
		t.Fatalf("LoadPin = %+v, %v", got, err)
	}
	for name, content := range map[string]string{
		"not json":    "{",
		"old version": `{"version": 0}`,
		"no key":      `{"version": 1, "keys": []}`,
		"no seals":    `{"version": 1, "keys": ["k"]}`,
	} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadPin(path); err == nil {
			t.Errorf("%s: loaded", name)
		}
	}
}
