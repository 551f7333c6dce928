package hostkey

import (
	"crypto/ed25519"
	"encoding/hex"
	"math/rand/v2"
	"testing"
)

// TestVerifier_TheStandardLibrarysVerdict: the Verifier (curve25519-voi,
// keys decompressed once) says what crypto/ed25519 says, on good
// signatures, on each of them with one bit flipped, and on the encodings
// where verifiers are known to part: small-order and non-canonical keys
// and R, and S not reduced.
func TestVerifier_TheStandardLibrarysVerdict(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	v := NewVerifier()
	digest := digestOf("stored bytes")
	check := func(name string, key ed25519.PublicKey, sig *[SignatureSize]byte) {
		t.Helper()
		msg := Message(nil, "loom.obs.h1.vm.web", 7, digest)
		if want, got := ed25519.Verify(key, msg, sig[:]), v.Verify(key, "loom.obs.h1.vm.web", 7, digest, sig); got != want {
			t.Errorf("%s: the Verifier says %v, crypto/ed25519 says %v (key %x, sig %x)", name, got, want, []byte(key), sig[:])
		}
	}

	for range 8 {
		k, err := Generate()
		if err != nil {
			t.Fatal(err)
		}
		pub, err := ParsePublic(k.Public())
		if err != nil {
			t.Fatal(err)
		}
		var sig [SignatureSize]byte
		copy(sig[:], ed25519.Sign(k.private, Message(nil, "loom.obs.h1.vm.web", 7, digest)))
		check("good", pub, &sig)
		for range 16 {
			bad := sig
			bit := rng.IntN(SignatureSize * 8)
			bad[bit/8] ^= 1 << (bit % 8)
			check("a flipped bit", pub, &bad)
		}
		// S + L, the same scalar not reduced: the standard library refuses it.
		unreduced := sig
		addL(unreduced[32:])
		check("S not reduced", pub, &unreduced)
	}

	// Points where verifiers part: the identity (canonical and not), the
	// point of order 2, y = 0 (order 4), and y = p (not canonical).
	odd := []string{
		"0100000000000000000000000000000000000000000000000000000000000000",
		"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"0000000000000000000000000000000000000000000000000000000000000000",
		"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
	}
	for _, a := range odd {
		key, _ := hex.DecodeString(a)
		for _, r := range odd {
			var sig [SignatureSize]byte // S = 0
			raw, _ := hex.DecodeString(r)
			copy(sig[:32], raw)
			check("key "+a[:4]+", R "+r[:4]+", S 0", key, &sig)
		}
	}
}

// addL adds the group order L to the little-endian scalar s, in place.
func addL(s []byte) {
	l := [32]byte{0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10}
	var carry uint16
	for i := range 32 {
		sum := uint16(s[i]) + uint16(l[i]) + carry
		s[i], carry = byte(sum), sum>>8
	}
}
