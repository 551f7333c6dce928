package hostkey

import (
	"crypto/sha256"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

func digestOf(s string) []byte {
	sum := sha256.Sum256([]byte(s))
	return sum[:]
}

// TestSign_BindsSubjectPlaceBytesAndKey: a signature verifies for exactly
// what was signed, and fails if any of subject, previous sequence, stored
// bytes or key differs.
func TestSign_BindsSubjectPlaceBytesAndKey(t *testing.T) {
	key, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	other, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	const subject = "loom.obs.h1.vm.web-1"
	digest := digestOf("stored bytes")
	header := key.Sign(subject, 41, digest)
	if len(header) != EncodedSize {
		t.Fatalf("header value is %d characters, want %d", len(header), EncodedSize)
	}
	v := NewVerifier()
	var sig [SignatureSize]byte
	if !v.Decode(&sig, header) {
		t.Fatalf("Decode(%q) failed", header)
	}
	pub, err := v.Key(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	otherPub, err := v.Key(other.Public())
	if err != nil {
		t.Fatal(err)
	}
	if !v.Verify(pub, subject, 41, digest, &sig) {
		t.Fatal("the signature does not verify for what was signed")
	}
	for _, tc := range []struct {
		name    string
		pub     []byte
		subject string
		prev    uint64
		digest  []byte
	}{
		{"another host's subject", pub, "loom.obs.h2.vm.web-1", 41, digest},
		{"another aggregate", pub, "loom.obs.h1.vm.web-2", 41, digest},
		{"another place in the subject", pub, subject, 40, digest},
		{"other bytes", pub, subject, 41, digestOf("changed bytes")},
		{"another key", otherPub, subject, 41, digest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if v.Verify(tc.pub, tc.subject, tc.prev, tc.digest, &sig) {
				t.Fatal("verifies, want it to fail")
			}
		})
	}
	if !key.Signed(subject, 41, digest, header) || key.Signed(subject, 42, digest, header) || other.Signed(subject, 41, digest, header) {
		t.Fatal("Key.Signed does not tell the key's own signature at its place from the rest")
	}
	for _, bad := range []string{"", "short", header[:EncodedSize-1] + "*", header + "A"} {
		if v.Decode(&sig, bad) {
			t.Errorf("Decode(%q) succeeded", bad)
		}
	}
}

// TestDomain_NeverANonce: what a host key signs for Loom is never valid
// UTF-8, so it can never be a NATS connect nonce (a JSON string), the one
// other thing the key signs as the host's NATS identity.
func TestDomain_NeverANonce(t *testing.T) {
	msg := Message(nil, "loom.obs.h1.vm.web-1", 7, digestOf("x"))
	if utf8.Valid(msg) || utf8.ValidString(Domain) {
		t.Fatal("a signed observation message is valid UTF-8: it could be a NATS nonce")
	}
}

// TestEnsure_MakesAPrivateFileAndItsPublicHalf: the first Ensure makes the
// key, mode 0600, with its public half beside it; the next one loads the
// same key; a key file others can read is refused.
func TestEnsure_MakesAPrivateFileAndItsPublicHalf(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "host.nk")
	key, created, err := Ensure(path)
	if err != nil || !created {
		t.Fatalf("Ensure: created %v, %v", created, err)
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, want 0600", info.Mode().Perm())
	}
	pub, err := os.ReadFile(PublicPath(path))
	if err != nil || strings.TrimSpace(string(pub)) != key.Public() {
		t.Fatalf("public half %q (%v), want %s", pub, err, key.Public())
	}
	if !nkeys.IsValidPublicUserKey(key.Public()) {
		t.Fatalf("public key %s is not an nkey user key", key.Public())
	}
	again, created, err := Ensure(path)
	if err != nil || created || again.Public() != key.Public() {
		t.Fatalf("second Ensure: %v created %v %v, want the same key", again.Public(), created, err)
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Ensure(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("Ensure of a group-readable key: %v, want a refusal", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "none.nk")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing file: %v", err)
	}
}

// TestFromSeed_OnlyUserKeys: an account or operator seed is refused, and
// so is a public key given as the private one.
func TestFromSeed_OnlyUserKeys(t *testing.T) {
	account, err := nkeys.CreateAccount()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := account.Seed()
	if _, err := FromSeed(seed); err == nil {
		t.Fatal("an account seed was taken as a host key")
	}
	key, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromSeed([]byte(key.Public())); err == nil {
		t.Fatal("a public key was taken as a host key")
	}
	typo := []byte(key.Public())
	typo[10] = map[bool]byte{true: 'B', false: 'A'}[typo[10] == 'A']
	if _, err := ParsePublic(string(typo)); err == nil {
		t.Fatalf("a mistyped public key %s parsed", typo)
	}
	accountPub, _ := account.PublicKey()
	if _, err := ParsePublic(accountPub); err == nil {
		t.Fatal("an account public key parsed as a host key")
	}
}

// TestKeyFile_IsTheHostsNATSIdentity: the key file Ensure writes is, as it
// is, an nkey a NATS server authenticates the host with: one key per host
// for both.
func TestKeyFile_IsTheHostsNATSIdentity(t *testing.T) {
	path := filepath.Join(t.TempDir(), "host.nk")
	key, _, err := Ensure(path)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		Nkeys: []*server.NkeyUser{{Nkey: key.Public()}}})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	if _, err := nats.Connect(srv.ClientURL(), nats.MaxReconnects(0)); err == nil {
		t.Fatal("the server let a client without the key in")
	}
	opt, err := nats.NkeyOptionFromSeed(path)
	if err != nil {
		t.Fatalf("nats reads the host key file: %v", err)
	}
	nc, err := nats.Connect(srv.ClientURL(), opt)
	if err != nil {
		t.Fatalf("connect with the host key: %v", err)
	}
	nc.Close()
}
