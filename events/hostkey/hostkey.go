// Package hostkey is a host's own key: the ed25519 key its agent signs its
// observations with. It is kept as an nkey, a NATS user seed ("SU…"), so
// that one key per host serves twice: it signs what the agent publishes,
// and it is the host's NATS identity once agents authenticate with nkeys
// (nats.NkeyOptionFromSeed reads the file as it is, and a server's
// authorization block names the public half). The public half is the user
// public key, "U…" (56 characters, with a checksum, so a mistyped key is
// refused rather than recorded), which `loom host register --key` records
// in host.registered.
//
// # What is signed, and where the signature lives
//
// An agent signs each observation it appends to loom.obs.<host>.… over
//
//	Domain ‖ len(subject) ‖ subject ‖ prevSeq ‖ SHA-256(stored bytes)
//
// (Message): the subject names the host and the aggregate; prevSeq is the
// stream sequence of the subject's last message, the one the append
// expects (Nats-Expected-Last-Subject-Sequence); and the stored bytes are
// the whole envelope, its PrevHash (the hash of that last message), type,
// time and payload included. The signature thus binds the observation to
// its host, to its aggregate and to its one place in the subject's chain.
// A reader checks it at the place where it finds the message, with the
// sequence and hash of the subject's last message as it folded them: an old
// observation published again later names an older place and fails, even
// if the subject's last message was itself replaced by a copy with the same
// bytes (the sequence differs where the hash cannot).
//
// The signature and the signer's public key travel in headers (Loom-Sig and
// Loom-Sig-Key, see package events), not in the envelope: the stored bytes
// stay what they were (the envelope, its hash chain and the golden samples
// do not change), what is signed is exactly what is stored, and a reader
// routes and decodes a message without the signature. Headers are covered
// by the audit seals, which hash every stored header of every message, so
// a signature changed after the fact is caught there as any other change.
// The signer's key in a header is only a hint for a reader that verifies
// ahead of time: what counts is the key the host is registered with.
//
// This package imports nothing of Loom's but events/secretfile (which
// imports nothing), so that package events can check keys with it.
package hostkey

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nats-io/nkeys"
	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"

	"github.com/loomctl/loom/events/secretfile"
)

// Domain starts every message a host key signs for Loom. Its first byte,
// 0xff, never occurs in UTF-8. The only other thing the key signs, as a
// NATS user, is a server's connect nonce, which reaches the client as a
// JSON string and so is always valid UTF-8: no nonce that a server, or a
// man in the middle, sends can be an observation's signed bytes.
const Domain = "\xffloom-obs-v1\x00"

// SignatureSize is the size of a signature, and EncodedSize that of its
// header value (unpadded URL-safe base64).
const (
	SignatureSize = ed25519.SignatureSize
	EncodedSize   = 86
)

// encoding encodes signatures in headers.
var encoding = base64.RawURLEncoding

// Errors of keys.
var (
	// ErrNotUserKey means a key is an nkey of another role than a user's.
	ErrNotUserKey = errors.New("not an nkey user key")
)

// Message appends to b what an observation's signature covers: Domain,
// the subject with its length, the stream sequence of the subject's
// previous message (0 when there is none), and the SHA-256 of the stored
// bytes.
func Message(b []byte, subject string, prevSeq uint64, digest []byte) []byte {
	b = append(b, Domain...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(subject)))
	b = append(b, subject...)
	b = binary.BigEndian.AppendUint64(b, prevSeq)
	return append(b, digest...)
}

// Key is a host's private key. It is safe for concurrent use.
type Key struct {
	public  string
	private ed25519.PrivateKey
	seed    []byte
}

// Generate makes a new key.
func Generate() (*Key, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, err
	}
	return FromSeed(seed)
}

// Derive makes the key of a 32-byte ed25519 seed: the same seed, the same
// key. For generated histories and benchmarks; a host's key comes from
// Generate.
func Derive(seed [ed25519.SeedSize]byte) (*Key, error) {
	kp, err := nkeys.FromRawSeed(nkeys.PrefixByteUser, seed[:])
	if err != nil {
		return nil, err
	}
	encoded, err := kp.Seed()
	if err != nil {
		return nil, err
	}
	return FromSeed(encoded)
}

// FromSeed reads a key from an nkey user seed, alone or inside a NATS
// credentials file.
func FromSeed(data []byte) (*Key, error) {
	kp, err := nkeys.ParseDecoratedNKey(data)
	if err != nil {
		return nil, err
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, err
	}
	prefix, raw, err := nkeys.DecodeSeed(seed)
	if err != nil {
		return nil, err
	}
	if prefix != nkeys.PrefixByteUser {
		return nil, fmt.Errorf("%w: a %s seed", ErrNotUserKey, prefix)
	}
	public, err := kp.PublicKey()
	if err != nil {
		return nil, err
	}
	// The private key is derived once: nkeys derives it again on every
	// Sign, which would double the cost of signing.
	return &Key{public: public, private: ed25519.NewKeyFromSeed(raw), seed: bytes.Clone(seed)}, nil
}

// Public is the key's public half, "U…".
func (k *Key) Public() string { return k.public }

// SignNonce signs a NATS server's connect nonce, which proves the key's
// identity to the server (nats.Nkey). A nonce is a UTF-8 string and so can
// never pass for an observation's signed bytes, which start with Domain.
func (k *Key) SignNonce(nonce []byte) ([]byte, error) {
	return ed25519.Sign(k.private, nonce), nil
}

// Sign signs an observation appended to subject after the message at
// prevSeq (see Message), whose stored bytes hash to digest, and returns
// the signature as a header value.
func (k *Key) Sign(subject string, prevSeq uint64, digest []byte) string {
	var buf [128]byte
	sig := ed25519.Sign(k.private, Message(buf[:0], subject, prevSeq, digest))
	return encoding.EncodeToString(sig)
}

// Signed tells whether value, a header value, is this key's signature of
// an observation appended to subject after the message at prevSeq, whose
// stored bytes hash to digest. An agent uses it to tell its own reports
// from what someone else put on its subjects.
func (k *Key) Signed(subject string, prevSeq uint64, digest []byte, value string) bool {
	var sig [SignatureSize]byte
	if len(value) != EncodedSize {
		return false
	}
	if n, err := encoding.Decode(sig[:], []byte(value)); err != nil || n != SignatureSize {
		return false
	}
	var buf [128]byte
	return ed25519.Verify(k.private.Public().(ed25519.PublicKey), Message(buf[:0], subject, prevSeq, digest), sig[:])
}

// ParsePublic reads a public key, "U…".
func ParsePublic(public string) (ed25519.PublicKey, error) {
	raw, err := nkeys.Decode(nkeys.PrefixByteUser, []byte(public))
	if err != nil {
		return nil, fmt.Errorf("host key %q: %w (want a 56-character nkey user public key, U…)", public, err)
	}
	return ed25519.PublicKey(raw), nil
}

// PublicPath is where the public half of the key at path is kept: beside
// it, with the extension .pub.
func PublicPath(path string) string {
	return path[:len(path)-len(filepath.Ext(path))] + ".pub"
}

// Ensure loads the key at path, or, if there is no file there, makes one
// and writes it (mode 0600, in a directory made 0700 if missing) with its
// public half beside it (PublicPath). created tells which.
func Ensure(path string) (key *Key, created bool, err error) {
	key, err = Load(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, false, err
	}
	if key, err = Generate(); err != nil {
		return nil, false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, err
	}
	if err := secretfile.WriteNew(path, append(bytes.Clone(key.seed), '\n'), 0o600); err != nil {
		return nil, false, fmt.Errorf("host key %s: %w", path, err)
	}
	if err := os.WriteFile(PublicPath(path), []byte(key.public+"\n"), 0o644); err != nil {
		return nil, false, fmt.Errorf("host key %s: %w", PublicPath(path), err)
	}
	return key, true, nil
}

// Load reads the key at path: an nkey user seed, or a NATS credentials
// file holding one. It refuses a file that others than its owner may read
// or write.
func Load(path string) (*Key, error) {
	data, err := secretfile.Read(path, "host key")
	if err != nil {
		return nil, err
	}
	defer clear(data)
	key, err := FromSeed(data)
	if err != nil {
		return nil, fmt.Errorf("host key %s: %w", path, err)
	}
	return key, nil
}

// maxCachedKeys bounds the public keys a Verifier keeps parsed. The keys
// it is asked about come from messages, which anyone who may publish can
// fill with new ones.
const maxCachedKeys = 4096

// Verifier checks observations' signatures. Once warm it allocates
// nothing per signature. It is not safe for concurrent use.
type Verifier struct {
	keys map[string]ed25519.PublicKey
	// expanded are the keys it verified with, by their bytes, decompressed
	// once for the curve arithmetic.
	expanded map[string]*voi.ExpandedPublicKey
	msg      []byte
	src      []byte
}

// NewVerifier returns a Verifier.
func NewVerifier() *Verifier {
	return &Verifier{keys: map[string]ed25519.PublicKey{}, expanded: map[string]*voi.ExpandedPublicKey{}}
}

// stdlib makes voi's verification give crypto/ed25519's verdict on every
// input (cofactorless, the same encodings accepted), so the read models,
// the auditor and anyone checking with the standard library agree.
var stdlib = &voi.Options{Verify: voi.VerifyOptionsStdLib}

// Key parses a public key, "U…", keeping it for the next call.
func (v *Verifier) Key(public string) (ed25519.PublicKey, error) {
	if key, ok := v.keys[public]; ok {
		return key, nil
	}
	key, err := ParsePublic(public)
	if err != nil {
		return nil, err
	}
	if len(v.keys) >= maxCachedKeys {
		clear(v.keys)
	}
	v.keys[public] = key
	return key, nil
}

// Decode reads a signature from its header value into sig; false if the
// value is not one.
func (v *Verifier) Decode(sig *[SignatureSize]byte, value string) bool {
	if len(value) != EncodedSize {
		return false
	}
	v.src = append(v.src[:0], value...)
	n, err := encoding.Decode(sig[:], v.src)
	return err == nil && n == SignatureSize
}

// Verify tells whether sig is key's signature of an observation appended
// to subject after the message at prevSeq, whose stored bytes hash to
// digest.
//
// It verifies with curve25519-voi and the key decompressed once, which
// takes 60 % of the time crypto/ed25519 takes (28 µs against 46 on the
// machines of the README), with the standard library's verdict.
func (v *Verifier) Verify(key ed25519.PublicKey, subject string, prevSeq uint64, digest []byte, sig *[SignatureSize]byte) bool {
	v.msg = Message(v.msg[:0], subject, prevSeq, digest)
	expanded, ok := v.expanded[string(key)]
	if !ok {
		var err error
		if expanded, err = voi.NewExpandedPublicKey(voi.PublicKey(key)); err != nil {
			// A key voi will not decompress: the standard library says.
			return ed25519.Verify(key, v.msg, sig[:])
		}
		if len(v.expanded) >= maxCachedKeys {
			clear(v.expanded)
		}
		v.expanded[string(key)] = expanded
	}
	return voi.VerifyExpandedWithOptions(expanded, v.msg, sig[:], stdlib)
}
