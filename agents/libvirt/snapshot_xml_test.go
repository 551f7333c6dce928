package libvirt

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// A domain as libvirt formats it after an external snapshot: namespaced
// metadata, a cdrom before vda, and vda on a two-file backing chain.
const restoredDomainXML = `<domain type='qemu' id='3'>
  <name>tiny</name>
  <uuid>16b418ae-e3a2-49fa-9365-7c116210c74b</uuid>
  <metadata>
    <loom:vm xmlns:loom="https://loomctl.dev/xmlns/domain/1">
      <loom:entry key="disk">keep &amp; me</loom:entry>
    </loom:vm>
  </metadata>
  <devices>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/seed.iso' index='4'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vm/top.qcow2' index='3'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/vm/mid.qcow2'/>
        <backingStore type='file' index='2'>
          <format type='qcow2'/>
          <source file='/base.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
  </devices>
</domain>
`

func TestWithDiskFile(t *testing.T) {
	tests := []struct {
		name    string
		domXML  string
		file    string
		want    string // whole output
		wantErr string // substring of the error
	}{
		{
			name:   "single quotes",
			domXML: `<domain><devices><disk type='file'><source file='/old.qcow2'/><target dev='vda'/></disk></devices></domain>`,
			file:   "/new.qcow2",
			want:   `<domain><devices><disk type='file'><source file='/new.qcow2'/><target dev='vda'/></disk></devices></domain>`,
		},
		{
			name:   "double quotes and spaces around the equals sign",
			domXML: `<domain><devices><disk type="file"><source index="1" file = "/old.qcow2" /><target bus="virtio" dev="vda"/></disk></devices></domain>`,
			file:   "/new.qcow2",
			want:   `<domain><devices><disk type="file"><source index="1" file = "/new.qcow2" /><target bus="virtio" dev="vda"/></disk></devices></domain>`,
		},
		{
			name:   "a file name XML must escape",
			domXML: `<domain><devices><disk><source file='/old'/><target dev='vda'/></disk></devices></domain>`,
			file:   `/vm/it's "a" & <b>`,
			want:   `<domain><devices><disk><source file='/vm/it&#39;s &#34;a&#34; &amp; &lt;b&gt;'/><target dev='vda'/></disk></devices></domain>`,
		},
		{
			name:   "cdrom before vda, a backing chain, and namespaced metadata",
			domXML: restoredDomainXML,
			file:   "/vm/restored.qcow2",
			want: strings.Replace(strings.Replace(restoredDomainXML, "/vm/top.qcow2", "/vm/restored.qcow2", 1),
				`      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/vm/mid.qcow2'/>
        <backingStore type='file' index='2'>
          <format type='qcow2'/>
          <source file='/base.qcow2'/>
          <backingStore/>
        </backingStore>
      </backingStore>
`, "", 1),
		},
		{
			name:   "an empty backing store",
			domXML: "<domain>\n<devices>\n<disk>\n  <source file='/a'/>\n  <backingStore/>\n  <target dev='vda'/>\n</disk>\n</devices>\n</domain>",
			file:   "/b",
			want:   "<domain>\n<devices>\n<disk>\n  <source file='/b'/>\n  <target dev='vda'/>\n</disk>\n</devices>\n</domain>",
		},
		{
			name:    "no vda",
			domXML:  `<domain><devices><disk device='cdrom'><source file='/x.iso'/><target dev='hdc'/></disk></devices></domain>`,
			file:    "/new.qcow2",
			wantErr: "no <disk> with <target dev='vda'/>",
		},
		{
			name:    "vda only inside foreign metadata",
			domXML:  `<domain><metadata><x:devices xmlns:x="urn:x"><x:disk><x:source file='/a'/><x:target dev='vda'/></x:disk></x:devices></metadata><devices/></domain>`,
			file:    "/new.qcow2",
			wantErr: "no <disk> with <target dev='vda'/>",
		},
		{
			name:    "vda on a block device",
			domXML:  `<domain><devices><disk type='block'><source dev='/dev/sdb'/><target dev='vda'/></disk></devices></domain>`,
			file:    "/new.qcow2",
			wantErr: "disk vda has no <source file=...>",
		},
		{
			name:    "not XML",
			domXML:  `<domain><devices>`,
			file:    "/new.qcow2",
			wantErr: "parse domain xml",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := withDiskFile(tc.domXML, "vda", tc.file)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err=%v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", got, tc.want)
			}
			if file, err := diskFile(got, "vda"); err != nil || file != tc.file {
				t.Fatalf("diskFile of the result=%q, %v, want %q", file, err, tc.file)
			}
		})
	}
}

func TestDiskFile(t *testing.T) {
	got, err := diskFile(restoredDomainXML, "vda")
	if err != nil || got != "/vm/top.qcow2" {
		t.Fatalf("vda=%q, %v, want /vm/top.qcow2", got, err)
	}
	got, err = diskFile(restoredDomainXML, "hdc")
	if err != nil || got != "/iso/seed.iso" {
		t.Fatalf("hdc=%q, %v, want /iso/seed.iso", got, err)
	}
}

func TestBuildSnapshotXML(t *testing.T) {
	tests := []struct {
		name string
		s    Snapshot
		want string
	}{
		{
			name: "disk only",
			s:    Snapshot{Name: "ck1", Overlay: "/vm/o2.qcow2"},
			want: `<domainsnapshot>
  <name>ck1</name>
  <memory snapshot="no"></memory>
  <disks>
    <disk name="vda" snapshot="external">
      <driver type="qcow2"></driver>
      <source file="/vm/o2.qcow2"></source>
    </disk>
  </disks>
</domainsnapshot>`,
		},
		{
			name: "with memory",
			s:    Snapshot{Name: "ck2", Overlay: "/vm/o3.qcow2", Memory: "/vm/ck2 & co.mem"},
			want: `<domainsnapshot>
  <name>ck2</name>
  <memory snapshot="external" file="/vm/ck2 &amp; co.mem"></memory>
  <disks>
    <disk name="vda" snapshot="external">
      <driver type="qcow2"></driver>
      <source file="/vm/o3.qcow2"></source>
    </disk>
  </disks>
</domainsnapshot>`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := buildSnapshotXML(tc.s)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func TestParseSaveImageDomain(t *testing.T) {
	got, err := parseSaveImageDomain(restoredDomainXML)
	if err != nil {
		t.Fatal(err)
	}
	if want := (saveImageDomain{Name: "tiny", UUID: "16b418ae-e3a2-49fa-9365-7c116210c74b"}); got != want {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	if _, err := parseSaveImageDomain("<domain><name>x</name></domain>"); err == nil {
		t.Fatal("a domain without a UUID parsed")
	}
}

// Bad arguments fail before any RPC: the zero Client here has no
// connection, and would panic if one were tried.
func TestSnapshot_InvalidArguments(t *testing.T) {
	ctx := context.Background()
	c := &Client{}
	snapshots := []struct {
		name string
		s    Snapshot
	}{
		{"no name", Snapshot{Overlay: "/vm/o.qcow2"}},
		{"bad name", Snapshot{Name: "a/b", Overlay: "/vm/o.qcow2"}},
		{"no overlay", Snapshot{Name: "ck"}},
		{"relative overlay", Snapshot{Name: "ck", Overlay: "vm/o.qcow2"}},
		{"relative memory", Snapshot{Name: "ck", Overlay: "/vm/o.qcow2", Memory: "ck.mem"}},
		{"memory is the overlay", Snapshot{Name: "ck", Overlay: "/vm/o.qcow2", Memory: "/vm/./o.qcow2"}},
		{"control character", Snapshot{Name: "ck", Overlay: "/vm/o\x01.qcow2"}},
		{"invalid UTF-8", Snapshot{Name: "ck", Overlay: "/vm/o\xff.qcow2"}},
	}
	for _, tc := range snapshots {
		t.Run(tc.name, func(t *testing.T) {
			err := c.TakeSnapshot(ctx, "vm1", tc.s)
			if !errors.Is(err, ErrInvalidSnapshot) {
				t.Fatalf("err=%v, want ErrInvalidSnapshot", err)
			}
		})
	}
	if err := c.TakeSnapshot(ctx, "bad name", Snapshot{Name: "ck", Overlay: "/o"}); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("domain name: err=%v, want ErrInvalidName", err)
	}
	if err := c.RestoreMemory(ctx, "ck.mem", "/vm/o.qcow2", false); !errors.Is(err, ErrInvalidSnapshot) {
		t.Fatalf("relative memory file: err=%v, want ErrInvalidSnapshot", err)
	}
	if err := c.RestoreMemory(ctx, "/vm/ck.mem", "", false); !errors.Is(err, ErrInvalidSnapshot) {
		t.Fatalf("no disk: err=%v, want ErrInvalidSnapshot", err)
	}
}
