package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/secretfile"
)

// sealDomain separates what a seal signs from any other signed bytes.
const sealDomain = "loom-seal-v1\x00"

// PEM block types of the key files: PKCS #8 and PKIX, so that openssl
// and other tools read them too.
const (
	pemPrivate = "PRIVATE KEY"
	pemPublic  = "PUBLIC KEY"
)

// KeyID names a public key: the first 8 bytes of its SHA-256, in hex.
func KeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:8])
}

// SealMessage is what a seal's signature covers: its range, root, the
// seal before it (by sequence, and by hash: the envelope's PrevHash) and
// the key id.
func SealMessage(s *events.AuditSealed, prevHash []byte) []byte {
	b := append([]byte(nil), sealDomain...)
	b = binary.BigEndian.AppendUint64(b, s.From)
	b = binary.BigEndian.AppendUint64(b, s.To)
	b = appendField(b, string(s.Root))
	b = binary.BigEndian.AppendUint64(b, s.PrevSeal)
	b = appendField(b, string(prevHash))
	return appendField(b, s.KeyID)
}

// Sign sets s's KeyID and signs it with key, chained to prevHash.
func Sign(key ed25519.PrivateKey, s *events.AuditSealed, prevHash []byte) {
	s.KeyID = KeyID(key.Public().(ed25519.PublicKey))
	s.Sig = ed25519.Sign(key, SealMessage(s, prevHash))
}

// VerifySeal tells whether s is signed by pub, chained to prevHash.
func VerifySeal(pub ed25519.PublicKey, s *events.AuditSealed, prevHash []byte) bool {
	return len(s.Sig) == ed25519.SignatureSize && ed25519.Verify(pub, SealMessage(s, prevHash), s.Sig)
}

// PublicPath is where the public key of the private key at path is kept:
// beside it, with the extension .pub.
func PublicPath(path string) string {
	return path[:len(path)-len(filepath.Ext(path))] + ".pub"
}

// EnsureKey loads the private key at path, or, if there is no file there,
// makes one and writes it (mode 0600) with its public key beside it
// (PublicPath). created tells which.
func EnsureKey(path string) (key ed25519.PrivateKey, created bool, err error) {
	key, err = LoadPrivateKey(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, false, err
	}
	_, key, err = ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, false, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, false, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return nil, false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, err
	}
	if err := secretfile.WriteNew(path, pem.EncodeToMemory(&pem.Block{Type: pemPrivate, Bytes: der}), 0o600); err != nil {
		return nil, false, err
	}
	pub := pem.EncodeToMemory(&pem.Block{Type: pemPublic, Bytes: pubDER})
	if err := os.WriteFile(PublicPath(path), pub, 0o644); err != nil {
		return nil, false, err
	}
	return key, true, nil
}

// LoadPrivateKey reads an ed25519 private key in PKCS #8 PEM. It refuses a
// file that others than its owner may read.
func LoadPrivateKey(path string) (ed25519.PrivateKey, error) {
	data, err := secretfile.Read(path, "seal key")
	if err != nil {
		return nil, err
	}
	block, err := decodePEM(path, data)
	if err != nil {
		return nil, err
	}
	if block.Type != pemPrivate {
		return nil, fmt.Errorf("seal key %s: a %q block, want %q", path, block.Type, pemPrivate)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("seal key %s: %w", path, err)
	}
	ed, ok := key.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("seal key %s: a %T, want an ed25519 key", path, key)
	}
	return ed, nil
}

// LoadPublicKey reads an ed25519 public key in PKIX PEM. It refuses a
// private key: an auditor is given the public key only.
func LoadPublicKey(path string) (ed25519.PublicKey, error) {
	block, err := readPEM(path)
	if err != nil {
		return nil, err
	}
	if block.Type == pemPrivate {
		return nil, fmt.Errorf("%s is a private key: give the public key (%s) instead, and keep this one secret", path, PublicPath(path))
	}
	if block.Type != pemPublic {
		return nil, fmt.Errorf("public key %s: a %q block, want %q", path, block.Type, pemPublic)
	}
	key, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("public key %s: %w", path, err)
	}
	ed, ok := key.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("public key %s: a %T, want an ed25519 key", path, key)
	}
	return ed, nil
}

func readPEM(path string) (*pem.Block, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return decodePEM(path, data)
}

func decodePEM(path string, data []byte) (*pem.Block, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%s: more than one PEM block", path)
	}
	return block, nil
}
