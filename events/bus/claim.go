package bus

import (
	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/hostkey"
)

// ReadClaim reads the signature of a message stored on subject, whose
// stored bytes hash to digest, from its headers (an agent's signed append),
// and verifies it with v at the place they name when they name a key and a
// place (see hostkey.Claim for what a checker may take of it).
func ReadClaim(v *hostkey.Verifier, header nats.Header, subject string, digest []byte) hostkey.Claim {
	var c hostkey.Claim
	value := header.Get(events.HeaderSig)
	if value == "" {
		return c
	}
	c.Present = true
	if c.Decoded = v.Decode(&c.Sig, value); !c.Decoded {
		return c
	}
	c.Signer = header.Get(events.HeaderSigKey)
	prev, placed := ExpectedOnSubject(header, subject)
	if !placed {
		return c
	}
	key, err := v.Key(c.Signer)
	if err != nil {
		return c
	}
	c.PrevSeq, c.Checked = prev, true
	c.Valid = v.Verify(key, subject, prev, digest, &c.Sig)
	return c
}
