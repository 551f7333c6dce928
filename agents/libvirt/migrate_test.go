package libvirt

import (
	"context"
	"errors"
	"maps"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// Bad arguments fail before any RPC: the zero Client here has no
// connection, and would panic if one were tried.
func TestMigrate_InvalidArguments(t *testing.T) {
	ctx := context.Background()
	c := &Client{}
	valid := Migration{
		DestURI:  "qemu+unix:///system?socket=/run/h2/libvirt-sock",
		DataURI:  "unix:///run/mig/memory.sock",
		DisksURI: "tcp://h2:49200",
		DestDisk: "/vm/h2/vm1.qcow2",
	}
	tests := []struct {
		name   string
		change func(m *Migration)
	}{
		{"no destination", func(m *Migration) { m.DestURI = "" }},
		{"destination not qemu", func(m *Migration) { m.DestURI = "test+unix:///default?socket=/s" }},
		{"destination unparsable", func(m *Migration) { m.DestURI = "qemu://h2/%zz" }},
		{"data uri scheme", func(m *Migration) { m.DataURI = "rdma://h2" }},
		{"data uri relative socket", func(m *Migration) { m.DataURI = "unix:run/memory.sock" }},
		{"data uri tcp without host", func(m *Migration) { m.DataURI = "tcp://:49200" }},
		{"disks uri with a host and a socket", func(m *Migration) { m.DisksURI = "unix://h2/run/disk.sock" }},
		{"no destination disk", func(m *Migration) { m.DestDisk = "" }},
		{"relative destination disk", func(m *Migration) { m.DestDisk = "vm1.qcow2" }},
		{"control character", func(m *Migration) { m.DestDisk = "/vm/\x01.qcow2" }},
		{"invalid UTF-8", func(m *Migration) { m.DestURI = "qemu+tcp://h\xff/system" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := valid
			tc.change(&m)
			if err := c.Migrate(ctx, "vm1", m); !errors.Is(err, ErrInvalidMigration) {
				t.Fatalf("err=%v, want ErrInvalidMigration", err)
			}
		})
	}
	if err := valid.validate(); err != nil {
		t.Fatalf("valid migration: %v", err)
	}
	if err := c.Migrate(ctx, "bad name", valid); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("domain name: err=%v, want ErrInvalidName", err)
	}
	pools := []struct{ name, pool, dir string }{
		{"bad pool name", "a/b", "/vm"},
		{"relative pool directory", "loom", "vm"},
		{"control character in directory", "loom", "/vm\x00"},
	}
	for _, tc := range pools {
		t.Run(tc.name, func(t *testing.T) {
			if err := c.EnsureDirPool(ctx, tc.pool, tc.dir); !errors.Is(err, ErrInvalidPool) {
				t.Fatalf("err=%v, want ErrInvalidPool", err)
			}
		})
	}
}

func TestMigrateParams(t *testing.T) {
	m := Migration{DestURI: "qemu+tcp://h2/system", DestDisk: "/vm/x.qcow2"}
	got := paramStrings(migrateParams(m, "<live/>", "<persistent/>"))
	want := map[string]string{"destination_xml": "<live/>", "persistent_xml": "<persistent/>", "migrate_disks": "vda"}
	if !maps.Equal(got, want) {
		t.Fatalf("defaults: got %v, want %v", got, want)
	}

	m.DataURI, m.DisksURI, m.Bandwidth = "tcp://h2:49152", "unix:///run/d.sock", 100
	params := migrateParams(m, "<live/>", "<persistent/>")
	got = paramStrings(params)
	want["migrate_uri"], want["disks_uri"] = "tcp://h2:49152", "unix:///run/d.sock"
	if !maps.Equal(got, want) {
		t.Fatalf("with uris: got %v, want %v", got, want)
	}
	if bw := uintParam(params, golibvirt.MigrateParamBandwidth); bw != 100 {
		t.Fatalf("bandwidth=%d, want 100", bw)
	}
}

func TestParseJobStats(t *testing.T) {
	ull := func(field string, v uint64) golibvirt.TypedParam {
		return golibvirt.TypedParam{Field: field, Value: *golibvirt.NewTypedParamValueUllong(v)}
	}
	params := []golibvirt.TypedParam{
		{Field: "operation", Value: *golibvirt.NewTypedParamValueInt(5)},
		ull("time_elapsed", 1296),
		ull("data_total", 400), ull("data_processed", 300), ull("data_remaining", 100),
		ull("memory_total", 300), ull("memory_processed", 250), ull("memory_remaining", 100),
		ull("memory_bps", 7), ull("memory_dirty_rate", 3), ull("memory_page_size", 4096), ull("memory_iteration", 2),
		ull("disk_total", 100), ull("disk_processed", 100), ull("disk_remaining", 0),
		ull("downtime", 252), ull("downtime_net", 246), ull("setup_time", 2),
		{Field: "negative", Value: *golibvirt.NewTypedParamValueLlong(-1)},
		{Field: "text", Value: *golibvirt.NewTypedParamValueString("7")},
	}
	progress := parseProgress(params)
	want := MigrationProgress{Active: true, Elapsed: 1296 * time.Millisecond,
		DataTotal: 400, DataProcessed: 300, DataRemaining: 100,
		MemoryTotal: 300, MemoryProcessed: 250, MemoryRemaining: 100,
		MemoryBytesPerSecond: 7, DirtyBytesPerSecond: 3 * 4096, MemoryPasses: 2,
		DiskTotal: 100, DiskProcessed: 100}
	if progress != want {
		t.Fatalf("progress\n%+v, want\n%+v", progress, want)
	}
	if got := progress.Fraction(); got != 0.75 {
		t.Fatalf("Fraction=%v, want 0.75", got)
	}
	if got := (MigrationProgress{}).Fraction(); got != 0 {
		t.Fatalf("Fraction with no totals=%v, want 0", got)
	}
	if got := (MigrationProgress{DataTotal: 1, DataRemaining: 5}).Fraction(); got != 0 {
		t.Fatalf("Fraction with more left than the total=%v, want 0", got)
	}

	stats := parseStats(params)
	wantStats := MigrationStats{Total: 1296 * time.Millisecond, Downtime: 252 * time.Millisecond,
		DowntimeNet: 246 * time.Millisecond, Setup: 2 * time.Millisecond,
		MemoryTotal: 300, MemoryProcessed: 250, MemoryBytesPerSecond: 7, MemoryPasses: 2}
	if stats != wantStats {
		t.Fatalf("stats\n%+v, want\n%+v", stats, wantStats)
	}
	for _, field := range []string{"negative", "text", "absent"} {
		if got := uintParam(params, field); got != 0 {
			t.Fatalf("uintParam(%s)=%d, want 0", field, got)
		}
	}
}

func TestDirPoolXML(t *testing.T) {
	got, err := dirPoolXML{Type: "dir", Name: "loom", Path: "/var/lib/loom/vms & co"}.render()
	if err != nil {
		t.Fatal(err)
	}
	want := `<pool type="dir"><name>loom</name><target><path>/var/lib/loom/vms &amp; co</path></target></pool>`
	if got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}

// paramStrings returns the string parameters by name.
func paramStrings(params []golibvirt.TypedParam) map[string]string {
	out := map[string]string{}
	for _, p := range params {
		if s, ok := p.Value.I.(string); ok {
			out[p.Field] = s
		}
	}
	return out
}
