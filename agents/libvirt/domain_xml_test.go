package libvirt

import (
	"encoding/xml"
	"errors"
	"maps"
	"reflect"
	"strings"
	"testing"
)

var testUUID = [16]byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07}

func TestBuildDomainXML_Golden(t *testing.T) {
	got, err := buildDomainXML("test", DomainSpec{
		Name:      "web-1",
		UUID:      testUUID,
		VCPUs:     2,
		MemoryMiB: 256,
		Metadata:  map[string]string{"vm": "01J9", "owner": "team-a"},
		DiskPath:  "/var/lib/loom/web-1.qcow2",
	})
	if err != nil {
		t.Fatalf("buildDomainXML: %v", err)
	}
	want := `<domain type="test">
  <name>web-1</name>
  <uuid>12345678-9abc-4def-8001-020304050607</uuid>
  <metadata>
    <loom:vm xmlns:loom="https://loomctl.dev/xmlns/domain/1">
      <loom:entry key="owner">team-a</loom:entry>
      <loom:entry key="vm">01J9</loom:entry>
    </loom:vm>
  </metadata>
  <memory unit="MiB">256</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch="x86_64">hvm</type>
  </os>
  <features>
    <acpi></acpi>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2"></driver>
      <source file="/var/lib/loom/web-1.qcow2"></source>
      <target dev="vda" bus="virtio"></target>
    </disk>
  </devices>
</domain>`
	if got != want {
		t.Fatalf("domain XML:\n%s\nwant:\n%s", got, want)
	}
}

func TestBuildDomainXML_Minimal(t *testing.T) {
	got, err := buildDomainXML("qemu", DomainSpec{Name: "a"})
	if err != nil {
		t.Fatalf("buildDomainXML: %v", err)
	}
	for _, want := range []string{
		`<domain type="qemu">`,
		`<memory unit="MiB">128</memory>`,
		`<vcpu>1</vcpu>`,
		`<devices></devices>`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("domain XML lacks %s:\n%s", want, got)
		}
	}
	for _, absent := range []string{"<uuid>", "<metadata>", "<disk"} {
		if strings.Contains(got, absent) {
			t.Errorf("domain XML has %s, want none:\n%s", absent, got)
		}
	}
}

func TestBuildDomainXML_RawDisk(t *testing.T) {
	got, err := buildDomainXML("qemu", DomainSpec{Name: "a", DiskPath: "/d/a.img"})
	if err != nil {
		t.Fatalf("buildDomainXML: %v", err)
	}
	if want := `<driver name="qemu" type="raw">`; !strings.Contains(got, want) {
		t.Fatalf("domain XML lacks %s:\n%s", want, got)
	}
}

// A directly booted guest with its serial console in a file: the
// document QEMU needs, and nothing of it when unset.
func TestBuildDomainXML_KernelAndSerial(t *testing.T) {
	spec := DomainSpec{Name: "g", Kernel: "/k/vmlinuz", Initrd: "/k/initrd.gz", Cmdline: "console=ttyS0 quiet", SerialPath: "/v/g.serial"}
	got, err := buildDomainXML("qemu", spec)
	if err != nil {
		t.Fatal(err)
	}
	var parsed struct {
		OS struct {
			Kernel  string `xml:"kernel"`
			Initrd  string `xml:"initrd"`
			Cmdline string `xml:"cmdline"`
		} `xml:"os"`
		Serial struct {
			Type   string `xml:"type,attr"`
			Source struct {
				Path string `xml:"path,attr"`
			} `xml:"source"`
		} `xml:"devices>serial"`
		Console struct {
			Target struct {
				Type string `xml:"type,attr"`
			} `xml:"target"`
		} `xml:"devices>console"`
	}
	if err := xml.Unmarshal([]byte(got), &parsed); err != nil {
		t.Fatalf("parse: %v\n%s", err, got)
	}
	if parsed.OS.Kernel != spec.Kernel || parsed.OS.Initrd != spec.Initrd || parsed.OS.Cmdline != spec.Cmdline ||
		parsed.Serial.Type != "file" || parsed.Serial.Source.Path != spec.SerialPath || parsed.Console.Target.Type != "serial" {
		t.Fatalf("parsed %+v from\n%s", parsed, got)
	}
	plain, err := buildDomainXML("test", DomainSpec{Name: "g"})
	if err != nil {
		t.Fatal(err)
	}
	for _, absent := range []string{"<kernel", "<initrd", "<cmdline", "<serial", "<console"} {
		if strings.Contains(plain, absent) {
			t.Errorf("a spec without them renders %s:\n%s", absent, plain)
		}
	}
}

// A bridged virtio card: the <interface> element both drivers take, with
// the MAC in canonical form and the tap name only when one is asked for.
func TestBuildDomainXML_Interface(t *testing.T) {
	tests := []struct {
		name string
		nic  Interface
		want string
	}{
		{
			name: "libvirt names the tap",
			nic:  Interface{Bridge: "loombr42", MAC: "52:54:00:0a:4d:05"},
			want: `
    <interface type="bridge">
      <source bridge="loombr42"></source>
      <mac address="52:54:00:0a:4d:05"></mac>
      <model type="virtio"></model>
    </interface>`,
		},
		{
			name: "named tap, MAC in upper case",
			nic:  Interface{Bridge: "br-0", MAC: "52:54:00:AB:CD:EF", Target: "loomtap.7"},
			want: `
    <interface type="bridge">
      <source bridge="br-0"></source>
      <mac address="52:54:00:ab:cd:ef"></mac>
      <model type="virtio"></model>
      <target dev="loomtap.7"></target>
    </interface>`,
		},
		{
			name: "dashes in the MAC",
			nic:  Interface{Bridge: "b", MAC: "02-00-00-00-00-01"},
			want: `
      <mac address="02:00:00:00:00:01"></mac>`,
		},
	}
	for _, typ := range []string{"test", "qemu"} {
		for _, tc := range tests {
			t.Run(typ+"/"+tc.name, func(t *testing.T) {
				nic := tc.nic
				got, err := buildDomainXML(typ, DomainSpec{Name: "a", DiskPath: "/d/a.qcow2", Interface: &nic})
				if err != nil {
					t.Fatalf("buildDomainXML: %v", err)
				}
				if !strings.Contains(got, tc.want) {
					t.Fatalf("domain XML:\n%s\nwant it to contain:%s", got, tc.want)
				}
				// Between the disk and the serial ports, once.
				if n := strings.Count(got, "<interface"); n != 1 || strings.Index(got, "<interface") < strings.Index(got, "</disk>") {
					t.Fatalf("%d interfaces, or one before the disk:\n%s", n, got)
				}
			})
		}
	}
	plain, err := buildDomainXML("qemu", DomainSpec{Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(plain, "<interface") {
		t.Fatalf("a spec without an interface renders one:\n%s", plain)
	}
}

func TestBuildDomainXML_InvalidInterface(t *testing.T) {
	const mac = "52:54:00:00:00:01"
	tests := []struct {
		name    string
		nic     Interface
		wantErr string
	}{
		{name: "no bridge", nic: Interface{MAC: mac}, wantErr: "interface bridge"},
		{name: "bridge too long", nic: Interface{Bridge: "loombr1234567890", MAC: mac}, wantErr: "1-15 bytes"},
		{name: "bridge with a slash", nic: Interface{Bridge: "a/b", MAC: mac}, wantErr: `byte 1 is '/'`},
		{name: "bridge with a quote", nic: Interface{Bridge: `a'b`, MAC: mac}, wantErr: "byte 1"},
		{name: "bridge dot", nic: Interface{Bridge: ".", MAC: mac}, wantErr: "1-15 bytes"},
		{name: "no MAC", nic: Interface{Bridge: "br0"}, wantErr: "not a 48-bit MAC"},
		{name: "garbage MAC", nic: Interface{Bridge: "br0", MAC: "52:54:00:00:00"}, wantErr: "not a 48-bit MAC"},
		{name: "EUI-64", nic: Interface{Bridge: "br0", MAC: "52:54:00:00:00:00:00:01"}, wantErr: "not a 48-bit MAC"},
		{name: "multicast MAC", nic: Interface{Bridge: "br0", MAC: "53:54:00:00:00:01"}, wantErr: "multicast"},
		{name: "broadcast MAC", nic: Interface{Bridge: "br0", MAC: "ff:ff:ff:ff:ff:ff"}, wantErr: "multicast"},
		{name: "vendor MAC", nic: Interface{Bridge: "br0", MAC: "00:16:3e:00:00:01"}, wantErr: "not locally administered"},
		{name: "target vnet", nic: Interface{Bridge: "br0", MAC: mac, Target: "vnet3"}, wantErr: "keeps names starting with vnet"},
		{name: "target macvtap", nic: Interface{Bridge: "br0", MAC: mac, Target: "macvtap0"}, wantErr: "macvtap"},
		{name: "target too long", nic: Interface{Bridge: "br0", MAC: mac, Target: "tap-0123456789ab"}, wantErr: "interface target"},
		{name: "target with a space", nic: Interface{Bridge: "br0", MAC: mac, Target: "tap 1"}, wantErr: "interface target"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nic := tc.nic
			_, err := buildDomainXML("qemu", DomainSpec{Name: "a", Interface: &nic})
			if !errors.Is(err, ErrInvalidSpec) {
				t.Fatalf("buildDomainXML = %v, want ErrInvalidSpec", err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %q, want it to mention %q", err, tc.wantErr)
			}
		})
	}
}

func TestBuildDomainXML_Escaping(t *testing.T) {
	hostile := `</loom:entry><evil a="1"/>&amp;'"` + "\t\n\r"
	spec := DomainSpec{
		Name:     "esc",
		Metadata: map[string]string{hostile: hostile, "k": " spaces "},
		DiskPath: `/tmp/a"b<c>&d.qcow2`,
	}
	got, err := buildDomainXML("test", spec)
	if err != nil {
		t.Fatalf("buildDomainXML: %v", err)
	}
	if strings.Contains(got, "<evil") {
		t.Fatalf("metadata escaped into markup:\n%s", got)
	}

	// The document parses back to exactly what went in.
	var parsed struct {
		Metadata struct {
			Inner string `xml:",innerxml"`
		} `xml:"metadata"`
		Disk struct {
			Source struct {
				File string `xml:"file,attr"`
			} `xml:"source"`
		} `xml:"devices>disk"`
	}
	if err := xml.Unmarshal([]byte(got), &parsed); err != nil {
		t.Fatalf("parse built XML: %v\n%s", err, got)
	}
	if parsed.Disk.Source.File != spec.DiskPath {
		t.Fatalf("disk path=%q, want %q", parsed.Disk.Source.File, spec.DiskPath)
	}
	kv, err := parseMetadata(parsed.Metadata.Inner)
	if err != nil {
		t.Fatalf("parseMetadata: %v", err)
	}
	if !maps.Equal(kv, spec.Metadata) {
		t.Fatalf("metadata=%q, want %q", kv, spec.Metadata)
	}
}

func TestBuildDomainXML_Invalid(t *testing.T) {
	tests := []struct {
		name    string
		spec    DomainSpec
		wantErr string
	}{
		{name: "negative vcpus", spec: DomainSpec{Name: "a", VCPUs: -1}, wantErr: "must not be negative"},
		{name: "negative memory", spec: DomainSpec{Name: "a", MemoryMiB: -1}, wantErr: "must not be negative"},
		{name: "empty key", spec: DomainSpec{Name: "a", Metadata: map[string]string{"": "v"}}, wantErr: "empty metadata key"},
		{name: "control char value", spec: DomainSpec{Name: "a", Metadata: map[string]string{"k": "a\x01"}}, wantErr: "U+0001"},
		{name: "control char key", spec: DomainSpec{Name: "a", Metadata: map[string]string{"\x1b": "v"}}, wantErr: "U+001B"},
		{name: "bad utf8", spec: DomainSpec{Name: "a", Metadata: map[string]string{"k": "\xff"}}, wantErr: "not valid UTF-8"},
		{name: "nul in disk path", spec: DomainSpec{Name: "a", DiskPath: "/a\x00b"}, wantErr: "disk path"},
		{name: "nul in serial path", spec: DomainSpec{Name: "a", SerialPath: "/a\x00b"}, wantErr: "serial path"},
		{name: "initrd without a kernel", spec: DomainSpec{Name: "a", Initrd: "/i.gz"}, wantErr: "needs a kernel"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := buildDomainXML("test", tc.spec)
			if !errors.Is(err, ErrInvalidSpec) {
				t.Fatalf("buildDomainXML = %v, want ErrInvalidSpec", err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %q, want it to mention %q", err, tc.wantErr)
			}
		})
	}
}

func TestBuildMetadataElement(t *testing.T) {
	got, err := buildMetadataElement(map[string]string{"b": "2", "a": "1"})
	if err != nil {
		t.Fatalf("buildMetadataElement: %v", err)
	}
	want := `<vm><entry key="a">1</entry><entry key="b">2</entry></vm>`
	if got != want {
		t.Fatalf("element=%s, want %s", got, want)
	}
	if got, err := buildMetadataElement(nil); got != "" || err != nil {
		t.Fatalf("buildMetadataElement(nil) = %q, %v; want empty, nil", got, err)
	}
}

func TestParseMetadata(t *testing.T) {
	tests := []struct {
		name    string
		element string
		want    map[string]string
		wantErr string
	}{
		{
			// libvirt may re-prefix and re-indent what it stores.
			name:    "other prefix",
			element: "<x:vm xmlns:x=\"https://loomctl.dev/xmlns/domain/1\">\n  <x:entry key=\"a\">1</x:entry>\n</x:vm>",
			want:    map[string]string{"a": "1"},
		},
		{
			name:    "default namespace",
			element: `<vm xmlns="https://loomctl.dev/xmlns/domain/1"><entry key="a">&lt;1&gt;</entry></vm>`,
			want:    map[string]string{"a": "<1>"},
		},
		{name: "no entries", element: `<loom:vm xmlns:loom="https://loomctl.dev/xmlns/domain/1"/>`},
		{
			name:    "foreign entries ignored",
			element: `<loom:vm xmlns:loom="https://loomctl.dev/xmlns/domain/1" xmlns:o="urn:other"><o:entry key="x">y</o:entry></loom:vm>`,
		},
		{
			// What get-metadata really returns: the namespace stripped.
			name:    "no namespace",
			element: "<vm>\n  <entry key=\"a\">1</entry>\n  <entry key=\"b\"></entry>\n</vm>",
			want:    map[string]string{"a": "1", "b": ""},
		},
		{name: "wrong namespace", element: `<vm xmlns="urn:other"/>`, wantErr: "namespace"},
		{name: "garbage", element: `<vm`, wantErr: "parse loom metadata"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseMetadata(tc.element)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseMetadata = %v, want error mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseMetadata: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("parseMetadata=%q, want %q", got, tc.want)
			}
		})
	}
}

func TestDomainType(t *testing.T) {
	tests := []struct {
		uri, want string
	}{
		{"test:///default", "test"},
		{"test+unix:///default", "test"},
		{"qemu:///system", "qemu"},
		{"qemu+unix:///system?socket=/x", "qemu"},
		{"xen:///system", ""},
		{"::", ""},
	}
	for _, tc := range tests {
		got, err := domainType(tc.uri)
		if tc.want == "" {
			if !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("domainType(%q) = %q, %v; want ErrInvalidConfig", tc.uri, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("domainType(%q) = %q, %v; want %q", tc.uri, got, err, tc.want)
		}
	}
}

func TestStateString(t *testing.T) {
	tests := []struct {
		state State
		want  string
	}{
		{StateNoState, "nostate"},
		{StateRunning, "running"},
		{StatePaused, "paused"},
		{StateShutoff, "shutoff"},
		{StatePMSuspended, "pmsuspended"},
		{State(42), "state(42)"},
	}
	for _, tc := range tests {
		if got := tc.state.String(); got != tc.want {
			t.Errorf("State(%d).String()=%q, want %q", int(tc.state), got, tc.want)
		}
	}
}
