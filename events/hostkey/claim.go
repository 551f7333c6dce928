package hostkey

import "crypto/ed25519"

// Claim is an observation's signature as its stored headers give it, and
// whether it holds for the key and the place they name. Anyone who may
// publish writes those headers: a checker takes Valid only where Signer is
// the host's registered key and PrevSeq the subject's previous message as
// it read them itself, and verifies again otherwise. Verifying ahead this
// way lets the costly ed25519 check run off the checker's own path (the
// read models' consumer goroutine, the auditor's workers).
type Claim struct {
	// Present: the message has a Loom-Sig header; Decoded: it holds a
	// signature, Sig.
	Present, Decoded bool
	Sig              [SignatureSize]byte
	// Signer is the Loom-Sig-Key header; PrevSeq the sequence the message
	// was appended expecting on its own subject.
	Signer  string
	PrevSeq uint64
	// Checked: Sig was verified with Signer's key after PrevSeq, for the
	// stored bytes; Valid is the answer.
	Checked, Valid bool
}

// HoldsFor tells whether the signature holds for the host's registered
// key (public, its U… form, and pub) after prev, the subject's previous
// message as the checker read them: the answer worked out ahead when it
// was for that very key and place, a verification with v otherwise.
func (c *Claim) HoldsFor(v *Verifier, public string, pub ed25519.PublicKey, subject string, prev uint64, digest []byte) bool {
	switch {
	case !c.Decoded:
		return false
	case c.Checked && c.Signer == public && c.PrevSeq == prev:
		return c.Valid
	}
	return v.Verify(pub, subject, prev, digest, &c.Sig)
}
