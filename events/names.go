package events

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strconv"
	"time"

	"github.com/oklog/ulid/v2"
)

// MaxNameLen bounds host, image and VM names. Names are subject tokens and
// libvirt domain names, so they are short and plain.
const MaxNameLen = 63

// ValidateName checks a host, image or VM name: 1 to 63 characters of
// a-z, A-Z, 0-9, '-' and '_', starting with a letter or digit. Such a name is
// safe as a NATS subject token, a Pebble key part and a libvirt domain name.
func ValidateName(what, name string) error {
	if name == "" {
		return fmt.Errorf("%s name is empty", what)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%s name %.20q... is %d characters, at most %d allowed", what, name, len(name), MaxNameLen)
	}
	for i, r := range name {
		letterOrDigit := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
		if letterOrDigit || (i > 0 && (r == '-' || r == '_')) {
			continue
		}
		return fmt.Errorf("%s name %q: character %q at %d not allowed (use letters, digits, '-' and '_', starting with a letter or digit)", what, name, r, i)
	}
	return nil
}

// MsgID is the Nats-Msg-Id of the index-th event a command appends. A retry
// of the same command by the same actor derives the same ids, so the
// stream's duplicate window drops its appends.
func MsgID(actor, commandID string, index int) string {
	return derive("msg", actor, commandID, strconv.Itoa(index))
}

// DeriveUID derives the UID of an aggregate that a command creates (a VM's
// incarnation). The same command always derives the same UID. It is a
// lowercase RFC 4122-shaped string, usable as a libvirt domain UUID.
func DeriveUID(actor, commandID string) string {
	sum := sha256.Sum256([]byte("uid\x00" + actor + "\x00" + commandID))
	b := sum[:16]
	b[6] = b[6]&0x0f | 0x50 // version 5 shape: name-based
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// EventID is the ULID of the index-th event of a command, decided at t. Its
// entropy derives from the command, so a decision repeated at the same
// instant names the same event. Without a command (an agent's observation)
// the entropy is random.
func EventID(t time.Time, actor, commandID string, index int) string {
	if commandID == "" {
		return ulid.MustNew(ulid.Timestamp(t), rand.Reader).String()
	}
	sum := sha256.Sum256([]byte("event\x00" + actor + "\x00" + commandID + "\x00" + strconv.Itoa(index)))
	var id ulid.ULID
	ms := uint64(t.UnixMilli())
	var ts [8]byte
	binary.BigEndian.PutUint64(ts[:], ms)
	copy(id[0:6], ts[2:8])
	copy(id[6:], sum[:10])
	return id.String()
}

func derive(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:20])
}
