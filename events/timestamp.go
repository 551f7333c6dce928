package events

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// UnixNano is a wall-clock time stored as Unix nanoseconds: an integer in
// msgpack (compact, and exact for hashing), an RFC 3339 string in JSON, so
// that what people and auditors read says when. Zero is no time.
type UnixNano int64

// NanosOf is t as UnixNano.
func NanosOf(t time.Time) UnixNano { return UnixNano(t.UnixNano()) }

// Time is n as a time.Time in UTC.
func (n UnixNano) Time() time.Time { return time.Unix(0, int64(n)).UTC() }

// MarshalJSON writes the time in RFC 3339 with nanoseconds.
func (n UnixNano) MarshalJSON() ([]byte, error) {
	return json.Marshal(n.Time().Format(time.RFC3339Nano))
}

// UnmarshalJSON reads RFC 3339, or a number of Unix nanoseconds.
func (n *UnixNano) UnmarshalJSON(data []byte) error {
	if len(data) > 0 && data[0] != '"' {
		v, err := strconv.ParseInt(string(bytes.TrimSpace(data)), 10, 64)
		if err != nil {
			return fmt.Errorf("time %s: want an RFC 3339 string or Unix nanoseconds", data)
		}
		*n = UnixNano(v)
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return err
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return fmt.Errorf("time %q: %w", s, err)
	}
	*n = NanosOf(t)
	return nil
}
