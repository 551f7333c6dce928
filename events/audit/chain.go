// Package audit makes Loom's history tamper-evident and checks it.
//
// Every message of LOOM_EVENTS is a leaf: the SHA-256 of its stream
// sequence, subject, headers and stored bytes (Leaf). The running root
// folds the leaves in stream order, root(s) = SHA-256(root(s-1) ‖
// leaf(s)), from a zero root before the stream's first sequence. A seal
// (events.AuditSealed) signs the running root at its To with the control
// plane's ed25519 key, and names the seal before it; seals cover the
// stream without gaps. An auditor who pinned one seal's root holds a
// commitment to every message up to it: any change, removal or reordering
// before it changes every root after it.
//
// The Verifier also checks what seals cannot: that each observation of a
// host registered with a key was signed by that host's agent for its place
// in its subject (verify_obs.go), so that a message someone else published
// on a host's subjects is named even though it was sealed like any other.
//
// A hash chain, not a Merkle tree: an auditor here reads every message
// anyway (each event's PrevHash and every seal are checked), so the
// logarithmic inclusion and consistency proofs of a Certificate
// Transparency tree would buy nothing, and a chain costs two hashes per
// message and no state but the last root.
package audit

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"slices"
)

// Hash is a SHA-256 digest.
type Hash = [sha256.Size]byte

// leafDomain separates leaves from any other SHA-256 input.
const leafDomain = "loom-leaf-v1\x00"

// Message is one stored message of the stream, as a reader gets it back.
type Message struct {
	Seq     uint64
	Subject string
	// Header is the message's stored headers (nats.Header's shape).
	Header map[string][]string
	Data   []byte
	// pre is what Ahead worked out of it, if it did.
	pre precheck
}

// Hasher computes leaves and roots without allocating per message. It is
// not safe for concurrent use.
type Hasher struct {
	h    hash.Hash
	buf  []byte
	keys []string
}

// NewHasher returns a Hasher.
func NewHasher() *Hasher { return &Hasher{h: sha256.New()} }

// Leaf is the hash of one message: its sequence, subject, headers (by
// name, in byte order, each value in stored order) and data, each
// length-prefixed so no two messages hash alike by moving bytes between
// fields.
func (x *Hasher) Leaf(m *Message) Hash {
	b := append(x.buf[:0], leafDomain...)
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	b = appendField(b, m.Subject)
	x.keys = x.keys[:0]
	for k := range m.Header {
		x.keys = append(x.keys, k)
	}
	slices.Sort(x.keys)
	b = binary.BigEndian.AppendUint32(b, uint32(len(x.keys)))
	for _, k := range x.keys {
		b = appendField(b, k)
		values := m.Header[k]
		b = binary.BigEndian.AppendUint32(b, uint32(len(values)))
		for _, v := range values {
			b = appendField(b, v)
		}
	}
	b = binary.BigEndian.AppendUint64(b, uint64(len(m.Data)))
	x.buf = b
	x.h.Reset()
	x.h.Write(b)
	x.h.Write(m.Data)
	var out Hash
	x.h.Sum(out[:0])
	return out
}

// Next is the running root after a message whose leaf is leaf.
func (x *Hasher) Next(root, leaf Hash) Hash {
	x.h.Reset()
	x.h.Write(root[:])
	x.h.Write(leaf[:])
	var out Hash
	x.h.Sum(out[:0])
	return out
}

func appendField(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// Chain is the running root of a stream read in order.
type Chain struct {
	// Seq is the last sequence folded in; Root the root after it.
	Seq  uint64
	Root Hash
	x    *Hasher
}

// NewChain starts a chain at root after sequence seq: zero and the zero
// root for a stream read from its start, a seal's To and Root to go on
// from a seal.
func NewChain(seq uint64, root Hash) *Chain {
	return &Chain{Seq: seq, Root: root, x: NewHasher()}
}

// Add folds m into the chain. It does not check that m.Seq follows Seq:
// a reader that can see gaps reports them itself.
func (c *Chain) Add(m *Message) {
	c.Root = c.x.Next(c.Root, c.x.Leaf(m))
	c.Seq = m.Seq
}
