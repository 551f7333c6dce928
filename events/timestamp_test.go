package events

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

// Times are integers on the wire and RFC 3339 for people, both exact.
func TestUnixNano(t *testing.T) {
	at := time.Date(2026, 11, 30, 14, 3, 7, 123456789, time.UTC)
	env := Envelope{ID: "x", Type: TypeHostRegistered, Version: 1, Kind: KindHost, AggregateID: "h1", Time: NanosOf(at)}

	data, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(data, &fields); err != nil {
		t.Fatal(err)
	}
	if fields["time"] != "2026-11-30T14:03:07.123456789Z" {
		t.Fatalf("JSON time = %v, want RFC 3339 with nanoseconds", fields["time"])
	}
	var back Envelope
	if err := json.Unmarshal(data, &back); err != nil || back.Time != env.Time {
		t.Fatalf("JSON round trip: %v, %v", back.Time, err)
	}
	if err := json.Unmarshal([]byte(`{"time":1796032551029028204}`), &back); err != nil || back.Time != 1796032551029028204 {
		t.Fatalf("JSON nanoseconds: %v, %v", back.Time, err)
	}
	if err := json.Unmarshal([]byte(`{"time":"yesterday"}`), &back); err == nil {
		t.Fatal("a time that is not RFC 3339 decoded")
	}

	// msgpack keeps the integer: the stored bytes (and so every hash) are
	// what they were when the field was a plain int64.
	typed, err := Marshal(NanosOf(at))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := Marshal(at.UnixNano())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(typed, plain) {
		t.Fatalf("msgpack of UnixNano = %x, of int64 = %x", typed, plain)
	}
}
