package events

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"testing"
	"time"
)

func TestMarshal_DeterministicMaps(t *testing.T) {
	labels := map[string]string{}
	for _, k := range []string{"zone", "rack", "a", "m", "b", "kernel", "gpu"} {
		labels[k] = k + "-value"
	}
	first, err := Marshal(HostRegistered{CPU: 4, MemoryMiB: 1024, Labels: labels})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		again, _ := Marshal(HostRegistered{CPU: 4, MemoryMiB: 1024, Labels: labels})
		if !bytes.Equal(first, again) {
			t.Fatalf("encoding %d differs: map order leaked into the bytes", i)
		}
	}
}

// Maps of structs are where msgpack's own key sorting stops: a host's
// allocations and orphans must encode the same way every time too.
func TestMarshal_DeterministicStateMaps(t *testing.T) {
	h := HostState{Name: "h1", Allocations: map[string]Allocation{}, Orphans: map[string]HostOrphanFound{}}
	for i := range 40 {
		name := fmt.Sprintf("vm-%02d", i)
		h.Allocations[name] = Allocation{UID: name, CPU: i, MemoryMiB: i, Seq: uint64(i)}
		h.Orphans[name] = HostOrphanFound{Domain: name}
	}
	first, err := Marshal(&h)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if again, _ := Marshal(&h); !bytes.Equal(first, again) {
			t.Fatalf("encoding %d differs: map order leaked into the bytes", i)
		}
	}
}

// Every map a Loom type can hold is either one msgpack sorts itself or one
// registered for sorted encoding: a new map field cannot slip past.
func TestMarshal_EveryMapIsSorted(t *testing.T) {
	roots := []reflect.Type{reflect.TypeFor[HostState](), reflect.TypeFor[VMState](), reflect.TypeFor[ImageState](), reflect.TypeFor[Goal]()}
	for typ := range Types() {
		ev, err := DecodePayload(typ, CurrentVersion(typ), mustMarshal(t, map[string]any{}))
		if err != nil {
			t.Fatalf("%s: %v", typ, err)
		}
		roots = append(roots, reflect.TypeOf(ev))
	}
	seen := map[reflect.Type]bool{}
	var walk func(reflect.Type, string)
	walk = func(typ reflect.Type, path string) {
		if seen[typ] {
			return
		}
		seen[typ] = true
		switch typ.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Array:
			walk(typ.Elem(), path)
		case reflect.Struct:
			for i := range typ.NumField() {
				walk(typ.Field(i).Type, path+"."+typ.Field(i).Name)
			}
		case reflect.Map:
			selfSorted := typ.Key().Kind() == reflect.String &&
				(typ.Elem().Kind() == reflect.String || typ.Elem().Kind() == reflect.Interface)
			if !selfSorted && !sortedMaps[typ] {
				t.Errorf("%s is a %s: register it with registerSortedMap", path, typ)
			}
			walk(typ.Elem(), path)
		}
	}
	for _, root := range roots {
		walk(root, root.Name())
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	data, err := Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestSeal_DecodeRecord_RoundTrip(t *testing.T) {
	origin := Origin{Actor: "alice", CommandID: "c1", CorrelationID: "corr", Time: time.Unix(1700000000, 5)}
	prev := Hash([]byte("previous"))
	env, data, err := Seal(VMCreated{UID: "u", Image: "demo", CPU: 2, MemoryMiB: 512, Desired: DesiredRunning}, KindVM, "web-1", origin, 0, prev)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := DecodeRecord(7, EventSubject(KindVM, "web-1"), time.Now(), data)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Envelope.ID != env.ID || rec.Envelope.Actor != "alice" || rec.Envelope.CommandID != "c1" ||
		rec.Envelope.Time != NanosOf(origin.Time) || !bytes.Equal(rec.Envelope.PrevHash, prev) || rec.Envelope.Version != CurrentVersion(TypeVMCreated) {
		t.Fatalf("envelope round trip: %+v", rec.Envelope)
	}
	got, ok := rec.Event.(VMCreated)
	if !ok || got.Image != "demo" || got.CPU != 2 || got.Desired != DesiredRunning {
		t.Fatalf("payload round trip: %#v", rec.Event)
	}
	// Re-encoding the decoded envelope gives the stored bytes back: the
	// hash chain does not depend on who encodes.
	again, _ := Marshal(&rec.Envelope)
	if !bytes.Equal(again, data) {
		t.Fatal("re-encoded envelope differs from stored bytes")
	}
}

func TestDecodeRecord_BadInput(t *testing.T) {
	good := func(mutate func(*Envelope)) []byte {
		env, _, err := Seal(HostCordoned{Reason: "x"}, KindHost, "h1", Origin{Actor: "a", CommandID: "c", Time: time.Unix(1, 0)}, 0, nil)
		if err != nil {
			t.Fatal(err)
		}
		mutate(&env)
		data, _ := Marshal(&env)
		return data
	}
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"empty", nil, ErrCorrupt},
		{"garbage", []byte{0xc1, 0xff, 0x00}, ErrCorrupt},
		{"json", []byte(`{"type":"host.cordoned"}`), ErrCorrupt},
		{"no id", good(func(e *Envelope) { e.ID = "" }), ErrCorrupt},
		{"short prev hash", good(func(e *Envelope) { e.PrevHash = []byte{1, 2} }), ErrCorrupt},
		{"unknown type", good(func(e *Envelope) { e.Type = "vm.teleported" }), ErrUnknownType},
		{"future version", good(func(e *Envelope) { e.Version = 99 }), ErrUnknownVersion},
		{"payload of wrong shape", good(func(e *Envelope) { e.Payload = []byte{0x92, 0x01, 0x02} }), ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := DecodeRecord(1, "loom.evt.host.h1", time.Now(), tc.data); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestDecodeStrict(t *testing.T) {
	var c CreateVM
	if err := DecodeStrict(FormatJSON, []byte(`{"command_id":"c","name":"a","image":"i","cpu":1,"mem_mib":64}`), &c); err != nil || c.Name != "a" || c.CommandID != "c" {
		t.Fatalf("json decode: %+v %v", c, err)
	}
	if err := DecodeStrict(FormatJSON, []byte(`{"name":"a","cpus":1}`), &c); err == nil {
		t.Fatal("unknown JSON field accepted")
	}
	if err := DecodeStrict(FormatJSON, []byte(`{"name":"a"} {"name":"b"}`), &c); err == nil {
		t.Fatal("trailing JSON accepted")
	}
	packed, _ := Marshal(map[string]any{"command_id": "c", "name": "b", "image": "i", "cpu": 1, "mem_mib": 64})
	var m CreateVM
	if SniffFormat(packed) != FormatMsgpack || DecodeStrict(FormatMsgpack, packed, &m) != nil || m.Name != "b" || m.CommandID != "c" {
		t.Fatalf("msgpack decode: %+v", m)
	}
	bad, _ := Marshal(map[string]any{"name": "b", "bogus": true})
	if err := DecodeStrict(FormatMsgpack, bad, &m); err == nil {
		t.Fatal("unknown msgpack field accepted")
	}
	if err := DecodeStrict(FormatJSON, []byte("  "), &m); err == nil {
		t.Fatal("empty body accepted")
	}
}

// A payload that is cut short must not leave a decoder recording. msgpack
// v5.4.1 returns a decoder that failed inside a raw-message decode to its
// pool still recording: every later decode on it appends all it reads to
// one buffer, held until a raw-message decode succeeds on it again. A
// fuzz worker, which hardly ever decodes a good envelope, grew without
// end until it died.
func TestUnmarshal_ACutPayloadLeavesNoDecoderRecording(t *testing.T) {
	// {"payload": bin8 of 100 bytes, three of them there}
	cut := append([]byte{0x81, 0xa7}, "payload"...)
	cut = append(cut, 0xc4, 100, 1, 2, 3)
	var env Envelope
	if err := Unmarshal(cut, &env); err == nil {
		t.Fatal("decoded a payload cut short")
	}
	type big struct{ S string }
	data, err := Marshal(big{S: string(bytes.Repeat([]byte{'x'}, 1<<20))})
	if err != nil {
		t.Fatal(err)
	}
	for range 64 {
		var b big
		if err := Unmarshal(data, &b); err != nil || len(b.S) != 1<<20 {
			t.Fatalf("decode: %v", err)
		}
	}
	// One collection moves pooled decoders aside without freeing them:
	// what one of them holds is still in the heap.
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	if m.HeapAlloc > 32<<20 {
		t.Fatalf("%d MiB of heap after 64 decodes of 1 MiB each: a decoder kept what it read", m.HeapAlloc>>20)
	}
}
