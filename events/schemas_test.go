package events

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

var rewrite = flag.Bool("rewrite", false, "rewrite schemas/ from the Go types instead of checking them")

// schemaDir is where the wire schemas and golden samples live.
const schemaDir = "../schemas"

// samples has one representative value of every event type's newest
// version. A type without a sample fails TestSchemas_EveryTypeHasASample.
var samples = map[Type]Event{
	TypeHostRegistered: HostRegistered{CPU: 8, MemoryMiB: 16384, Address: "10.0.0.1", Labels: map[string]string{"zone": "a", "rack": "r1"},
		Key: "UASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLF"},
	TypeHostCordoned:   HostCordoned{Reason: "maintenance"},
	TypeHostUncordoned: HostUncordoned{},
	TypeHostAllocated:  HostAllocated{VM: "web-1", UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", CPU: 2, MemoryMiB: 512},
	TypeHostReleased:   HostReleased{VM: "web-1", UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Reason: "deleted"},
	TypeHostLost:       HostLost{MarkerSeq: 4812, RenewalSeq: 4790},
	TypeHostRejoined:   HostRejoined{RenewalSeq: 4901},
	TypeImageRegistered: ImageRegistered{Format: "qcow2", SizeBytes: 1 << 30, Source: "/var/lib/loom/images/demo.qcow2", Checksum: "sha256:00",
		Boot: &ImageBoot{Kernel: "/var/lib/loom/images/vmlinuz", Initrd: "/var/lib/loom/images/initrd.gz", Cmdline: "console=ttyS0"}},
	TypeVMCreated:         VMCreated{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Image: "demo", CPU: 2, MemoryMiB: 512, Desired: DesiredRunning, OnHostLost: RestartElsewhere, Net: "blue"},
	TypeVMPlaced:          VMPlaced{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Host: "h1", AllocationSeq: 41, Leases: []LeaseEpoch{{Resource: "image/demo", Mode: LeaseShared, Epoch: 42}, {Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 43}}, From: "h0", Reason: AbsentHostLost, Reprovisioned: true},
	TypeVMGoalChanged:     VMGoalChanged{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Desired: DesiredPaused},
	TypeVMDeleted:         VMDeleted{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Reason: AbsentDeleted},
	TypeVMObserved:        VMObserved{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 44, State: ObservedRunning, Leases: []LeaseEpoch{{Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 43}}},
	TypeVMProgress:        VMProgress{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 42, Step: "define", Done: 1, Total: 3},
	TypeHostOrphanFound:   HostOrphanFound{Domain: "stray", UUID: "11111111-2222-4333-8444-555555555555", State: ObservedRunning},
	TypeHostOrphanCleared: HostOrphanCleared{Domain: "stray"},
	TypeLeaseGranted:      LeaseGranted{Mode: LeaseShared, LeaseHolder: LeaseHolder{ID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", VM: "web-1", Host: "h1"}},
	TypeLeaseReleased:     LeaseReleased{Holder: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Epoch: 42, Reason: "stopped"},
	TypeLeaseExpired:      LeaseExpired{Holder: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Epoch: 42, Host: "h1", MarkerSeq: 4812},
	TypeLeaseBreaking:     LeaseBreaking{Holder: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Epoch: 42, Reason: "disk needed elsewhere"},
	TypeLeaseBroken:       LeaseBroken{Holder: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Epoch: 42, Reason: "host lost"},

	TypeVMCheckpointRequested: VMCheckpointRequested{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Checkpoint: "ck-0123456789abcdef", Kind: CheckpointFull, Scheduled: true},
	TypeVMRestoreRequested: VMRestoreRequested{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Checkpoint: "ck-0123456789abcdef", Restore: "rs-0123456789abcdef", Kind: CheckpointFull, Host: "h1",
		Disk: "/var/lib/loom/vms/web-1-0f7c3a54-1b2c-5d3e-8f40-123456789abc.qcow2", Memory: "/var/lib/loom/vms/web-1-0f7c3a54-1b2c-5d3e-8f40-123456789abc.ck-0123456789abcdef.mem", Desired: DesiredRunning},
	TypeVMCheckpointDeleted:   VMCheckpointDeleted{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Checkpoint: "ck-0123456789abcdef", Reason: DeletedBySchedule, Host: "h1", Stranded: true},
	TypeVMCheckpointScheduled: VMCheckpointScheduled{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", EveryMillis: 600000, Keep: 5, Kind: CheckpointDisk},
	TypeVMCheckpointTaken: VMCheckpointTaken{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 50, Checkpoint: "ck-0123456789abcdef", Kind: CheckpointFull,
		Disk: "/var/lib/loom/vms/web-1-0f7c3a54-1b2c-5d3e-8f40-123456789abc.qcow2", Memory: "/var/lib/loom/vms/web-1-0f7c3a54-1b2c-5d3e-8f40-123456789abc.ck-0123456789abcdef.mem", Top: "/var/lib/loom/vms/web-1-0f7c3a54-1b2c-5d3e-8f40-123456789abc.ck-0123456789abcdef.qcow2",
		DiskBytes: 1 << 20, MemoryBytes: 90 << 20, Millis: 310, Leases: []LeaseEpoch{{Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 43}}},
	TypeVMRestored: VMRestored{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 51, Checkpoint: "ck-0123456789abcdef", Restore: "rs-0123456789abcdef",
		Top: "/var/lib/loom/vms/web-1-0f7c3a54-1b2c-5d3e-8f40-123456789abc.rs-0123456789abcdef.qcow2", Millis: 1200, Leases: []LeaseEpoch{{Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 43}}},
	TypeVMCheckpointFailed: VMCheckpointFailed{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 50, Checkpoint: "ck-0123456789abcdef", Op: CheckpointOpTake, Fault: &Fault{Code: 5001, Name: "libvirt_error", Message: "no space"}},
	TypeVMMigrationStarted: VMMigrationStarted{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Migration: "mg-0123456789abcdef", From: "h1", To: "h2",
		DestURI: "qemu+tls://h2/system", DataURI: "tcp://10.0.0.2", DisksURI: "tcp://10.0.0.2", DestDisk: "/var/lib/loom/vms/web-1-x.mg-0123456789abcdef.qcow2"},
	TypeVMMigrated: VMMigrated{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Migration: "mg-0123456789abcdef", From: "h1", To: "h2", AllocSeq: 60,
		Grants: []MovedGrant{{Resource: "image/demo", Mode: LeaseShared, Back: 3}, {Resource: "disk/web-1", Mode: LeaseExclusive, Back: 1}}},
	TypeVMMigrationFailed:     VMMigrationFailed{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Migration: "mg-0123456789abcdef", Reason: "aborted", Fault: &Fault{Code: 5001, Name: "libvirt_error", Message: "unable to connect"}},
	TypeVMMigrationCancelling: VMMigrationCancelling{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Migration: "mg-0123456789abcdef"},
	TypeVMMigrationReceived: VMMigrationReceived{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 61, Migration: "mg-0123456789abcdef", Disk: "/var/lib/loom/vms/web-1-x.mg-0123456789abcdef.qcow2",
		TotalMillis: 3100, DowntimeMillis: 40},
	TypeVMMigrationSent: VMMigrationSent{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 61, Migration: "mg-0123456789abcdef", Millis: 3150, UnreachableMillis: 520,
		MemoryBytes: 130 << 20, DiskBytes: 64 << 20, Leases: []LeaseEpoch{{Resource: "disk/web-1", Mode: LeaseExclusive, Epoch: 43}}},
	TypeVMMigrationAborted: VMMigrationAborted{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Incarnation: 61, Migration: "mg-0123456789abcdef", Fault: &Fault{Code: 5001, Name: "libvirt_error", Message: "cancelled"}},
	TypeHostAgentStarted:   HostAgentStarted{Agent: "01J0000000000000000000000", StorageDir: "/var/lib/loom/vms", MigrateURI: "qemu+tls://h2/system", MigrateListen: "tcp:10.0.0.2", TunnelEndpoint: "10.0.0.2"},
	TypeNetCreated:         NetCreated{CIDR: "10.77.0.0/24", VNI: 42},
	TypeNetAddressBound: NetAddressBound{Addr: "10.77.0.2", MAC: "02:11:22:33:44:55", VM: "web-1", UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc",
		Host: "h2", Endpoint: "10.0.0.2"},
	TypeNetAddressReleased:  NetAddressReleased{Addr: "10.77.0.2", UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Reason: "deleted"},
	TypeAuditSealed:         AuditSealed{From: 1, To: 4811, Root: make([]byte, 32), PrevSeal: 4790, KeyID: "0123456789abcdef", Sig: make([]byte, 64)},
	TypeVMCheckpointRemoved: VMCheckpointRemoved{UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Checkpoints: []string{"ck-0123456789abcdef"}, KeptDisk: []string{"ck-0123456789abcdef"}},
}

// commandSamples has one value of every command body, by subject.
var commandSamples = map[string]any{
	CommandSubject(KindHost, VerbRegister): RegisterHost{CommandMeta: CommandMeta{CommandID: "c1"}, Name: "h1", CPU: 8, MemoryMiB: 16384,
		Key: "UASL4UOHD2OV7V2KTWIQX77KOAW6LDA2Z6WWLZ5COCF72WJIBWUNKPLF"},
	CommandSubject(KindHost, VerbCordon):         CordonHost{CommandMeta: CommandMeta{CommandID: "c2"}, Name: "h1", Reason: "maintenance"},
	CommandSubject(KindImage, VerbRegister):      RegisterImage{CommandMeta: CommandMeta{CommandID: "c3"}, Name: "demo", Format: "qcow2", SizeBytes: 1 << 30},
	CommandSubject(KindVM, VerbCreate):           CreateVM{CommandMeta: CommandMeta{CommandID: "c4"}, Name: "web-1", Image: "demo", CPU: 1, MemoryMiB: 256, Net: "blue"},
	CommandSubject(KindNet, VerbAttach):          AttachNet{CommandMeta: CommandMeta{CommandID: "c15"}, Net: "blue", Host: "h1"},
	CommandSubject(KindNet, VerbCreate):          CreateNet{CommandMeta: CommandMeta{CommandID: "c14"}, Name: "blue", CIDR: "10.77.0.0/24", VNI: 42},
	CommandSubject(KindVM, "lifecycle"):          VMCommand{CommandMeta: CommandMeta{CommandID: "c5"}, Name: "web-1"},
	CommandSubject(KindLease, VerbAcquire):       AcquireLease{CommandMeta: CommandMeta{CommandID: "c6"}, Resource: "disk/web-1", Mode: LeaseExclusive, LeaseHolder: LeaseHolder{ID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", VM: "web-1", Host: "h1"}},
	CommandSubject(KindLease, VerbRelease):       ReleaseLease{CommandMeta: CommandMeta{CommandID: "c7"}, Resource: "disk/web-1", Holder: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Epoch: 42},
	CommandSubject(KindLease, VerbBreak):         BreakLease{CommandMeta: CommandMeta{CommandID: "c8"}, Resource: "disk/web-1", Holder: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Force: true, Reason: "disk needed elsewhere"},
	CommandSubject(KindVM, VerbCheckpoint):       CheckpointVM{CommandMeta: CommandMeta{CommandID: "c9"}, Name: "web-1", Kind: CheckpointFull},
	CommandSubject(KindVM, VerbRestore):          RestoreVM{CommandMeta: CommandMeta{CommandID: "c10"}, Name: "web-1", Checkpoint: "ck-0123456789abcdef"},
	CommandSubject(KindVM, VerbDeleteCheckpoint): DeleteCheckpoint{CommandMeta: CommandMeta{CommandID: "c11"}, Name: "web-1", Checkpoint: "ck-0123456789abcdef"},
	CommandSubject(KindVM, VerbMigrate):          MigrateVM{CommandMeta: CommandMeta{CommandID: "c13"}, Name: "web-1", To: "h2"},
	CommandSubject(KindVM, VerbSchedule):         ScheduleCheckpoints{CommandMeta: CommandMeta{CommandID: "c12"}, Name: "web-1", EveryMillis: 600000, Keep: 5, Kind: CheckpointDisk},
	"loom.q.query":                               Query{Name: "web-1", MinSeq: 42},
	"loom.reply.command":                         Reply{Events: []Appended{{Seq: 42, Subject: "loom.evt.vm.web-1", Type: TypeVMCreated, ID: "01J0000000000000000000000"}}},
	"loom.goal": Goal{VM: "web-1", UID: "0f7c3a54-1b2c-5d3e-8f40-123456789abc", Host: "h1", Desired: DesiredRunning, Incarnation: 42, Spec: DomainSpec{Image: "demo", CPU: 1, MemoryMiB: 256,
		Disk: &ImageDisk{Source: "/var/lib/loom/images/demo.qcow2", Format: "qcow2", Boot: &ImageBoot{Kernel: "/var/lib/loom/images/vmlinuz"}},
		Net:  &NetAddress{Net: "blue", VNI: 42, Addr: "10.77.0.2", Prefix: 24, MAC: "02:11:22:33:44:55"}},
		Step:     &GoalStep{Op: CheckpointOpTake, Checkpoint: "ck-0123456789abcdef", Kind: CheckpointFull},
		Drop:     []CheckpointFiles{{Checkpoint: "ck-fedcba9876543210", Memory: "/var/lib/loom/vms/web-1.ck-fedcba9876543210.mem"}},
		Keep:     []CheckpointFiles{{Checkpoint: "ck-aaaaaaaaaaaaaaaa", Disk: "/var/lib/loom/vms/web-1.qcow2"}},
		Migrate:  &MigrateStep{Migration: "mg-0123456789abcdef", To: "h2", DestURI: "qemu+tls://h2/system", DestDisk: "/var/lib/loom/vms/web-1-x.mg-0123456789abcdef.qcow2"},
		Incoming: &IncomingStep{Migration: "mg-0123456789abcdef", From: "h1", Disk: "/var/lib/loom/vms/web-1-x.mg-0123456789abcdef.qcow2"}},
	"loom.live": Renewal{Host: "h1", TTLMillis: 10000, Agent: "01J0000000000000000000000"},
}

func TestSchemas_EveryTypeHasASample(t *testing.T) {
	for typ := range Types() {
		if _, ok := samples[typ]; !ok {
			t.Errorf("event type %s has no sample: add one to samples in schemas_test.go and run go test ./events -rewrite", typ)
		}
	}
}

// TestSchemas_Current checks (or, with -rewrite, writes) the schema and the
// golden encoded sample of each type's newest version.
func TestSchemas_Current(t *testing.T) {
	origin := Origin{Actor: "golden", CommandID: "golden-command", CorrelationID: "golden", Time: time.Unix(1767225600, 0)}
	for typ, ev := range samples {
		version := CurrentVersion(typ)
		_, data, err := Seal(ev, Kind(strings.SplitN(string(typ), ".", 2)[0]), "golden", origin, 0, Hash([]byte("prev")))
		if err != nil {
			t.Fatalf("%s: %v", typ, err)
		}
		base := filepath.Join(schemaDir, "events", fmt.Sprintf("%s.v%d", typ, version))
		checkFile(t, base+".msgpack", data)
		checkFile(t, base+".schema.json", schemaOf(reflect.TypeOf(ev), string(typ), version))
	}
	for subject, v := range commandSamples {
		body, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		base := filepath.Join(schemaDir, "commands", subject)
		checkFile(t, base+".sample.json", append(body, '\n'))
		checkFile(t, base+".schema.json", schemaOf(reflect.TypeOf(v), subject, 1))
	}
}

// TestSchemas_GoldenSamplesDecode decodes every golden sample ever written,
// old versions included: stored history must stay readable forever.
func TestSchemas_GoldenSamplesDecode(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(schemaDir, "events", "*.msgpack"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden samples in %s/events (%v)", schemaDir, err)
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		rec, err := DecodeRecord(1, "loom.evt.x.golden", time.Now(), data)
		if err != nil {
			t.Errorf("%s: %v", filepath.Base(file), err)
			continue
		}
		name := filepath.Base(file)
		want := fmt.Sprintf("%s.v%d.msgpack", rec.Envelope.Type, rec.Envelope.Version)
		if name != want {
			t.Errorf("%s holds %s", name, want)
		}
	}
}

func checkFile(t *testing.T, path string, want []byte) {
	t.Helper()
	if *rewrite {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, want, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	have, err := os.ReadFile(path)
	if err != nil {
		t.Errorf("%s: %v (run go test ./events -rewrite, and review the diff)", path, err)
		return
	}
	if !bytes.Equal(have, want) {
		t.Errorf("%s is out of date with the Go types: a changed payload needs a new version and an upcaster; if this change is intended and compatible, run go test ./events -rewrite", path)
	}
}

// schemaOf describes a type's wire shape: its fields in encoding order, by
// msgpack name, with their types.
func schemaOf(typ reflect.Type, name string, version int) []byte {
	doc := map[string]any{"name": name, "version": version, "encoding": "msgpack (JSON accepted for commands and queries)", "fields": fieldsOf(typ)}
	out, _ := json.MarshalIndent(doc, "", "  ")
	return append(out, '\n')
}

func fieldsOf(typ reflect.Type) []map[string]any {
	var fields []map[string]any
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		tag := f.Tag.Get("msgpack")
		if f.Anonymous && strings.Contains(tag, "inline") {
			fields = append(fields, fieldsOf(f.Type)...)
			continue
		}
		key, opts, _ := strings.Cut(tag, ",")
		if key == "" {
			key = f.Name
		}
		field := map[string]any{"name": key, "type": typeName(f.Type)}
		if strings.Contains(opts, "omitempty") {
			field["optional"] = true
		}
		fields = append(fields, field)
	}
	return fields
}

func typeName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return "bytes"
		}
		return "array of " + typeName(t.Elem())
	case reflect.Map:
		return "map of " + typeName(t.Key()) + " to " + typeName(t.Elem())
	case reflect.Pointer:
		return typeName(t.Elem()) + " (nullable)"
	case reflect.Struct:
		var parts []string
		for _, f := range fieldsOf(t) {
			parts = append(parts, fmt.Sprintf("%s: %s", f["name"], f["type"]))
		}
		return "{" + strings.Join(parts, ", ") + "}"
	}
	return t.Kind().String()
}
