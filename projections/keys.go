package projections

import (
	"encoding/binary"
	"errors"
)

// Key layout. Every key starts with the projection version, so a later
// version (a changed fold or row format) can build beside this one in the
// same Pebble directory while this one keeps serving, and be switched to
// once it has caught up:
//
//	v1/layout                          fingerprint of the row layout (see layout.go)
//	v1/applied                         last applied stream sequence (8 bytes, big-endian)
//	v1/head/<subject>                  events.Head of a subject without a row: loom.evt of other kinds, every loom.obs (seq, then hash)
//	v1/host/<name>                     head and events.HostState without its maps (msgpack rowValue)
//	v1/host-alloc/<part host><vm>      events.Allocation of vm on host (msgpack)
//	v1/host-orphan/<part host><domain> events.HostOrphanFound of an orphan on host (msgpack)
//	v1/image/<name>                    head and events.ImageState (msgpack rowValue)
//	v1/vm/<name>                       head and events.VMState (msgpack rowValue)
//	v1/vmhost/<part host><vm>          empty: the VM's Host is host (an index for VMFilter.Host)
//	v1/lease/…, v1/lease-…             the leases read model (leases.go)
//	v1/cmd/<part actor><part id><seq>  events.Appended of one event of a command (msgpack)
//	v1/flagged/<seq>                   Flagged: a message that could not be applied (msgpack)
//
// Values marked msgpack are encoded with structs as arrays (layout.go).
// <part x> is x preceded by its length as a uvarint, so that a part may
// hold any byte and one part never reads as the prefix of another; <seq>
// is 8 bytes big-endian, so keys sort in stream order.
const version = "v1/"

// Table prefixes.
var (
	keyApplied       = []byte(version + "applied")
	prefixHead       = []byte(version + "head/")
	prefixHost       = []byte(version + "host/")
	prefixHostAlloc  = []byte(version + "host-alloc/")
	prefixHostOrphan = []byte(version + "host-orphan/")
	prefixImage      = []byte(version + "image/")
	prefixNet        = []byte(version + "net/")
	prefixVM         = []byte(version + "vm/")
	prefixVMByHost   = []byte(version + "vmhost/")
	prefixCommand    = []byte(version + "cmd/")
	prefixFlagged    = []byte(version + "flagged/")
)

// nameKey is prefix followed by one name.
func nameKey(prefix []byte, name string) []byte {
	key := make([]byte, 0, len(prefix)+len(name))
	return append(append(key, prefix...), name...)
}

// appendPart appends s preceded by its length.
func appendPart(key []byte, s string) []byte {
	return append(binary.AppendUvarint(key, uint64(len(s))), s...)
}

// readPart reads a part appendPart wrote, and what follows it.
func readPart(key []byte) (part string, rest []byte, err error) {
	n, size := binary.Uvarint(key)
	if size <= 0 || uint64(len(key)-size) < n {
		return "", nil, errors.New("truncated key part")
	}
	return string(key[size : size+int(n)]), key[size+int(n):], nil
}

func appendSeq(key []byte, seq uint64) []byte { return binary.BigEndian.AppendUint64(key, seq) }

// hostMapPrefix is where the entries of one of host's maps are.
func hostMapPrefix(prefix []byte, host string) []byte {
	return appendPart(append([]byte(nil), prefix...), host)
}

// vmByHostPrefix is where the index lists the VMs of host.
func vmByHostPrefix(host string) []byte {
	return appendPart(append([]byte(nil), prefixVMByHost...), host)
}

func vmByHostKey(host, vm string) []byte { return append(vmByHostPrefix(host), vm...) }

// commandPrefix is where the events of command (actor, id) are listed.
func commandPrefix(actor, commandID string) []byte {
	return appendPart(appendPart(append([]byte(nil), prefixCommand...), actor), commandID)
}

func commandKey(actor, commandID string, seq uint64) []byte {
	return appendSeq(commandPrefix(actor, commandID), seq)
}

func flaggedKey(seq uint64) []byte { return appendSeq(append([]byte(nil), prefixFlagged...), seq) }

// prefixEnd is the first key after every key that starts with prefix.
func prefixEnd(prefix []byte) []byte {
	end := append([]byte(nil), prefix...)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil // prefix is all 0xff: no upper bound
}

func encodeSeq(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

func decodeSeq(value []byte) (uint64, error) {
	if len(value) != 8 {
		return 0, errors.New("stream sequence is not 8 bytes")
	}
	return binary.BigEndian.Uint64(value), nil
}
