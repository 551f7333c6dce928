package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
)

// Marshal encodes v as deterministic msgpack: map keys sorted, integers and
// floats in their most compact form, struct fields in declaration order.
// The same value always gives the same bytes, which is what hashes need.
func Marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.SetSortMapKeys(true)
	enc.UseCompactInts(true)
	enc.UseCompactFloats(true)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("msgpack encode %T: %w", v, err)
	}
	return buf.Bytes(), nil
}

// msgpack's SetSortMapKeys sorts only map[string]string and
// map[string]interface{}; any other map is written in Go's random
// iteration order. Every other map type in the events package is
// registered here to encode with sorted keys, so Marshal keeps its promise
// (and so does any encoder of these types, such as the read models').
func init() {
	registerSortedMap[Allocation]()
	registerSortedMap[HostOrphanFound]()
	registerSortedMap[LeaseGrant]()
}

// sortedMaps lists the map types registerSortedMap has taken care of.
var sortedMaps = map[reflect.Type]bool{}

// registerSortedMap makes msgpack encode map[string]V with sorted keys.
func registerSortedMap[V any]() {
	sortedMaps[reflect.TypeFor[map[string]V]()] = true
	msgpack.Register(map[string]V(nil), func(e *msgpack.Encoder, v reflect.Value) error {
		m := v.Interface().(map[string]V)
		if m == nil {
			return e.EncodeNil()
		}
		if err := e.EncodeMapLen(len(m)); err != nil {
			return err
		}
		for _, k := range slices.Sorted(maps.Keys(m)) {
			if err := e.EncodeString(k); err != nil {
				return err
			}
			if err := e.Encode(m[k]); err != nil {
				return err
			}
		}
		return nil
	}, nil)
}

// Unmarshal decodes msgpack data into v. Unknown fields are ignored, so a
// reader tolerates fields added by a newer writer of the same version.
func Unmarshal(data []byte, v any) error {
	dec := decoders.Get().(*msgpack.Decoder)
	dec.Reset(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("msgpack decode %T: %w", v, err) // dec is dropped
	}
	dec.Reset(nil)
	decoders.Put(dec)
	return nil
}

// decoders are Unmarshal's msgpack decoders. msgpack.Unmarshal pools its
// own, but returns one that failed inside a raw-message decode (an
// envelope's payload cut short) to its pool still recording: every later
// decode on it appends all it reads to one buffer (msgpack v5.4.1). A
// decoder goes back to this pool only after a decode that succeeded.
var decoders = sync.Pool{New: func() any { return msgpack.NewDecoder(nil) }}

// Format is the encoding of a request or reply body.
type Format int

const (
	// FormatMsgpack is Loom's own wire format.
	FormatMsgpack Format = iota
	// FormatJSON is accepted so that people can use `nats req` by hand.
	FormatJSON
)

// SniffFormat tells JSON from msgpack by the first byte: a JSON object opens
// with '{' (after optional whitespace), which as a msgpack byte would be a
// positive fixint, never a valid request body.
func SniffFormat(data []byte) Format {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) > 0 && trimmed[0] == '{' {
		return FormatJSON
	}
	return FormatMsgpack
}

// DecodeStrict decodes a body from outside (a command or a query) in the
// given format and rejects unknown fields, so a misspelled field is an error
// rather than a silently missing value.
func DecodeStrict(format Format, data []byte, v any) error {
	if len(bytes.TrimSpace(data)) == 0 {
		return errors.New("empty body")
	}
	switch format {
	case FormatJSON:
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return fmt.Errorf("json: %w", err)
		}
		if dec.More() {
			return errors.New("json: trailing data after the object")
		}
		return nil
	default:
		dec := msgpack.NewDecoder(bytes.NewReader(data))
		dec.DisallowUnknownFields(true)
		if err := dec.Decode(v); err != nil {
			return fmt.Errorf("msgpack: %w", err)
		}
		return nil
	}
}

// EncodeAs encodes a reply in the format its request came in.
func EncodeAs(format Format, v any) ([]byte, error) {
	if format == FormatJSON {
		return json.Marshal(v)
	}
	return Marshal(v)
}
