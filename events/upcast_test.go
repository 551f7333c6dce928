package events

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestUpcast_V1GoldenSamplesReadAsTheNewest reads the v1 samples of the
// types that gained fields as their newest shapes: same fields, the new
// ones empty (no leases, no boot, no host key).
func TestUpcast_V1GoldenSamplesReadAsTheNewest(t *testing.T) {
	for file, want := range map[string]Event{
		"host.registered.v1.msgpack":  HostRegistered{CPU: 8, MemoryMiB: 16384, Address: "10.0.0.1", Labels: map[string]string{"zone": "a", "rack": "r1"}},
		"image.registered.v1.msgpack": ImageRegistered{Format: "qcow2", SizeBytes: 1 << 30, Source: "/var/lib/loom/images/demo.qcow2", Checksum: "sha256:00"},
		"vm.created.v1.msgpack":       VMCreated{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Image: "demo", CPU: 2, MemoryMiB: 512, Desired: DesiredRunning, OnHostLost: RestartElsewhere},
		"vm.placed.v1.msgpack":        VMPlaced{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Host: "h1", AllocationSeq: 41},
		"vm.observed.v1.msgpack":      VMObserved{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 42, State: ObservedRunning},
	} {
		data, err := os.ReadFile(filepath.Join(schemaDir, "events", file))
		if err != nil {
			t.Fatal(err)
		}
		rec, err := DecodeRecord(1, "loom.evt.vm.golden", time.Now(), data)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if rec.Envelope.Version != 1 || !reflect.DeepEqual(rec.Event, want) {
			t.Errorf("%s: v%d %#v, want %#v", file, rec.Envelope.Version, rec.Event, want)
		}
	}
}

// TestUpcast_MixedHistoryFoldsLikeANewOne folds one VM's history written
// with v1 placements and observations, and the same written in v2: the
// states agree.
func TestUpcast_MixedHistoryFoldsLikeANewOne(t *testing.T) {
	vm, obs := EventSubject(KindVM, "web-1"), ObservationSubject("h1", KindVM, "web-1")
	fold := func(old bool) VMState {
		h := &history{t: t}
		var s VMState
		apply := func(rec *Record) {
			if err := s.Apply(rec); err != nil {
				t.Fatal(err)
			}
		}
		apply(h.add(vm, VMCreated{UID: "u1", Image: "demo", CPU: 1, MemoryMiB: 256, Desired: DesiredRunning}, "c1"))
		placed := h.add(vm, VMPlaced{UID: "u1", Host: "h1", AllocationSeq: 1}, "c1")
		observed := h.add(obs, VMObserved{UID: "u1", Incarnation: 2, State: ObservedRunning}, "")
		if old {
			placed = reencode(t, placed, 1, vmPlacedV1{UID: "u1", Host: "h1", AllocationSeq: 1})
			observed = reencode(t, observed, 1, vmObservedV1{UID: "u1", Incarnation: 2, State: ObservedRunning})
		}
		apply(placed)
		apply(observed)
		return s
	}
	if old, current := fold(true), fold(false); !reflect.DeepEqual(old, current) {
		t.Fatalf("v1 history folds to %+v, v2 to %+v", old, current)
	}
}

// reencode stores rec's event as version v with payload old, and decodes
// it back as a reader would.
func reencode(t *testing.T, rec *Record, v int, old any) *Record {
	t.Helper()
	payload, err := Marshal(old)
	if err != nil {
		t.Fatal(err)
	}
	env := rec.Envelope
	env.Version, env.Payload = v, payload
	data, err := Marshal(&env)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeRecord(rec.Seq, rec.Subject, time.Now(), data)
	if err != nil {
		t.Fatal(err)
	}
	return &back
}
