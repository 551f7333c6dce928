package events

// KindAudit is the aggregate of the history's own seals. It has one
// subject, AuditSealSubject.
const KindAudit Kind = "audit"

// AuditSealID is the id of the one audit aggregate: the chain of seals.
const AuditSealID = "seal"

// AuditSealSubject is where seals are appended, each expecting the one
// before it, so there is one chain of seals and at most one sealer
// appends to it at a time.
var AuditSealSubject = EventSubject(KindAudit, AuditSealID)

// TypeAuditSealed is the seal event type.
const TypeAuditSealed Type = "audit.sealed"

// AuditSealed seals the stream's messages From..To, both included: Root
// is the running root of every message from the stream's first sequence
// up to To (events/audit says how it is computed), signed with the
// control plane's ed25519 key. Seals follow each other without gaps: a
// seal's From is the To of the seal before it plus one, and the seal
// itself, stored after To, is covered by the next seal.
type AuditSealed struct {
	From uint64 `msgpack:"from" json:"from"`
	To   uint64 `msgpack:"to" json:"to"`
	// Root is the SHA-256 running root after To.
	Root []byte `msgpack:"root" json:"root"`
	// PrevSeal is the stream sequence of the seal before this one; zero
	// for the first. The envelope's PrevHash is that seal's hash.
	PrevSeal uint64 `msgpack:"prev_seal,omitempty" json:"prev_seal,omitempty"`
	// KeyID names the key that signed: the first 8 bytes of the SHA-256
	// of its public key, in hex.
	KeyID string `msgpack:"key" json:"key"`
	// Sig is the ed25519 signature of the seal's fields and the
	// envelope's PrevHash (events/audit.SealMessage).
	Sig []byte `msgpack:"sig" json:"sig"`
}

func (AuditSealed) EventType() Type { return TypeAuditSealed }
