package libvirt

import (
	"encoding/xml"
	"fmt"
	"net"
	"slices"
	"strings"
	"unicode/utf8"
)

// Defaults applied to zero DomainSpec fields.
const (
	DefaultVCPUs     = 1
	DefaultMemoryMiB = 128
)

// MetadataNamespace is the XML namespace of Loom's element inside a domain's
// <metadata>. Other tools' metadata in other namespaces is left alone.
const MetadataNamespace = "https://loomctl.dev/xmlns/domain/1"

// metadataPrefix is the prefix Loom's metadata element is written with.
const metadataPrefix = "loom"

// DomainSpec is what Define turns into domain XML. The XML is valid for both
// the test and the QEMU driver.
type DomainSpec struct {
	// Name is the libvirt domain name; see ValidateName.
	Name string
	// UUID identifies the domain. Zero keeps the UUID of an existing domain of
	// the same name, or lets libvirt pick one for a new domain.
	UUID [16]byte
	// VCPUs is the number of virtual CPUs; 0 means DefaultVCPUs.
	VCPUs int
	// MemoryMiB is the guest memory; 0 means DefaultMemoryMiB.
	MemoryMiB int
	// Metadata is Loom's own key/values, stored under MetadataNamespace and
	// returned by Lookup, List and Metadata. Keys must not be empty.
	Metadata map[string]string
	// DiskPath optionally attaches a file as virtio disk vda; a ".qcow2"
	// suffix selects qcow2, anything else raw.
	DiskPath string
	// Kernel, Initrd and Cmdline, if Kernel is set, boot the guest from
	// that kernel directly (QEMU), without a bootloader on the disk.
	Kernel, Initrd, Cmdline string
	// SerialPath, if set, sends the guest's first serial port (and its
	// console) to that file, appended to.
	SerialPath string
	// Interface, if set, gives the guest a virtio network card on a host
	// bridge.
	Interface *Interface
}

// Interface is a virtio network card whose tap device joins a host bridge
// (<interface type='bridge'>). The bridge must exist when the domain
// starts, and on the target host of a migration before it begins.
type Interface struct {
	// Bridge is the host bridge, a network device name (see Target).
	Bridge string
	// MAC is the card's address: a locally administered unicast MAC such
	// as 52:54:00:12:34:56. It is required because the network outside
	// the host (an overlay's forwarding entries) is keyed by it.
	MAC string
	// Target optionally names the tap device on the host; empty lets
	// libvirt pick vnetN. A name must be unique among the network devices
	// of the host (of its network namespace) and must not start with
	// vnet, macvtap or macvlan: libvirt takes such names for its own and
	// drops them.
	Target string
}

// domainXML is the subset of libvirt's domain schema Loom writes.
type domainXML struct {
	XMLName    xml.Name     `xml:"domain"`
	Type       string       `xml:"type,attr"`
	Name       string       `xml:"name"`
	UUID       string       `xml:"uuid,omitempty"`
	Metadata   *metadataXML `xml:"metadata,omitempty"`
	Memory     memoryXML    `xml:"memory"`
	VCPU       int          `xml:"vcpu"`
	OS         osXML        `xml:"os"`
	Features   featuresXML  `xml:"features"`
	OnPoweroff string       `xml:"on_poweroff"`
	OnReboot   string       `xml:"on_reboot"`
	OnCrash    string       `xml:"on_crash"`
	Devices    devicesXML   `xml:"devices"`
}

type memoryXML struct {
	Unit  string `xml:"unit,attr"`
	Value int    `xml:",chardata"`
}

type osXML struct {
	Type    osTypeXML `xml:"type"`
	Kernel  string    `xml:"kernel,omitempty"`
	Initrd  string    `xml:"initrd,omitempty"`
	Cmdline string    `xml:"cmdline,omitempty"`
}

type osTypeXML struct {
	Arch  string `xml:"arch,attr"`
	Value string `xml:",chardata"`
}

// featuresXML turns on ACPI so Shutdown reaches QEMU guests.
type featuresXML struct {
	ACPI struct{} `xml:"acpi"`
}

type devicesXML struct {
	Disks      []diskXML      `xml:"disk"`
	Interfaces []interfaceXML `xml:"interface"`
	Serials    []serialXML    `xml:"serial"`
	Console    *serialXML     `xml:"console,omitempty"`
}

// interfaceXML is a virtio card on a host bridge.
type interfaceXML struct {
	Type   string `xml:"type,attr"`
	Source struct {
		Bridge string `xml:"bridge,attr"`
	} `xml:"source"`
	MAC struct {
		Address string `xml:"address,attr"`
	} `xml:"mac"`
	Model struct {
		Type string `xml:"type,attr"`
	} `xml:"model"`
	Target *struct {
		Dev string `xml:"dev,attr"`
	} `xml:"target,omitempty"`
}

// serialXML is a serial port or console written to a file.
type serialXML struct {
	Type   string `xml:"type,attr"`
	Source struct {
		Path   string `xml:"path,attr"`
		Append string `xml:"append,attr,omitempty"`
	} `xml:"source"`
	Target struct {
		Type string `xml:"type,attr,omitempty"`
		Port int    `xml:"port,attr"`
	} `xml:"target"`
}

type diskXML struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Driver struct {
		Name string `xml:"name,attr"`
		Type string `xml:"type,attr"`
	} `xml:"driver"`
	Source struct {
		File string `xml:"file,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
		Bus string `xml:"bus,attr"`
	} `xml:"target"`
}

// metadataXML is <metadata> holding Loom's element. encoding/xml cannot
// choose prefixes, so the prefixed names are written literally; libvirt keeps
// them as given.
type metadataXML struct {
	Loom loomMetadataXML `xml:"loom:vm"`
}

type loomMetadataXML struct {
	XMLName   xml.Name       `xml:"loom:vm"`
	Namespace string         `xml:"xmlns:loom,attr"`
	Entries   []loomEntryXML `xml:"loom:entry"`
}

type loomEntryXML struct {
	Key   string `xml:"key,attr"`
	Value string `xml:",chardata"`
}

// buildDomainXML renders spec as domain XML of the given type ("test" or
// "qemu"). spec.Name must already be valid.
func buildDomainXML(typ string, spec DomainSpec) (string, error) {
	if spec.VCPUs < 0 || spec.MemoryMiB < 0 {
		return "", fmt.Errorf("%w: vcpus %d and memory %d MiB must not be negative", ErrInvalidSpec, spec.VCPUs, spec.MemoryMiB)
	}
	for what, text := range map[string]string{"disk path": spec.DiskPath, "kernel": spec.Kernel, "initrd": spec.Initrd,
		"cmdline": spec.Cmdline, "serial path": spec.SerialPath} {
		if err := checkXMLText(what, text); err != nil {
			return "", err
		}
	}
	if spec.Kernel == "" && (spec.Initrd != "" || spec.Cmdline != "") {
		return "", fmt.Errorf("%w: an initrd or a kernel command line needs a kernel", ErrInvalidSpec)
	}
	metadata, err := buildMetadata(spec.Metadata)
	if err != nil {
		return "", err
	}
	d := domainXML{
		Type:       typ,
		Name:       spec.Name,
		Metadata:   metadata,
		Memory:     memoryXML{Unit: "MiB", Value: orDefault(spec.MemoryMiB, DefaultMemoryMiB)},
		VCPU:       orDefault(spec.VCPUs, DefaultVCPUs),
		OS:         osXML{Type: osTypeXML{Arch: "x86_64", Value: "hvm"}},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		OnCrash:    "destroy",
	}
	if spec.UUID != ([16]byte{}) {
		d.UUID = formatUUID(spec.UUID)
	}
	if spec.DiskPath != "" {
		d.Devices.Disks = []diskXML{buildDisk(spec.DiskPath)}
	}
	d.OS.Kernel, d.OS.Initrd, d.OS.Cmdline = spec.Kernel, spec.Initrd, spec.Cmdline
	if spec.Interface != nil {
		nic, err := buildInterface(*spec.Interface)
		if err != nil {
			return "", err
		}
		d.Devices.Interfaces = []interfaceXML{nic}
	}
	if spec.SerialPath != "" {
		serial := serialXML{Type: "file"}
		serial.Source.Path, serial.Source.Append = spec.SerialPath, "on"
		console := serial
		console.Target.Type = "serial"
		d.Devices.Serials = []serialXML{serial}
		d.Devices.Console = &console
	}
	out, err := xml.MarshalIndent(d, "", "  ")
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSpec, err)
	}
	return string(out), nil
}

func buildDisk(path string) diskXML {
	disk := diskXML{Type: "file", Device: "disk"}
	disk.Driver.Name = "qemu"
	disk.Driver.Type = "raw"
	if strings.HasSuffix(path, ".qcow2") {
		disk.Driver.Type = "qcow2"
	}
	disk.Source.File = path
	disk.Target.Dev = "vda"
	disk.Target.Bus = "virtio"
	return disk
}

// buildInterface renders a bridged virtio card, its MAC in canonical form.
func buildInterface(spec Interface) (interfaceXML, error) {
	nic := interfaceXML{Type: "bridge"}
	if err := checkLinkName("interface bridge", spec.Bridge); err != nil {
		return nic, err
	}
	mac, err := net.ParseMAC(spec.MAC)
	switch {
	case err != nil || len(mac) != 6:
		return nic, fmt.Errorf("%w: interface MAC %q is not a 48-bit MAC address", ErrInvalidSpec, spec.MAC)
	case mac[0]&1 != 0:
		return nic, fmt.Errorf("%w: interface MAC %s is a multicast address", ErrInvalidSpec, mac)
	case mac[0]&2 == 0:
		// Globally administered addresses belong to hardware vendors.
		return nic, fmt.Errorf("%w: interface MAC %s is not locally administered (set bit 0x02 of its first byte, as 52:54:00:... does)", ErrInvalidSpec, mac)
	}
	if spec.Target != "" {
		if err := checkLinkName("interface target", spec.Target); err != nil {
			return nic, err
		}
		for _, reserved := range []string{"vnet", "macvtap", "macvlan"} {
			if strings.HasPrefix(spec.Target, reserved) {
				return nic, fmt.Errorf("%w: interface target %q: libvirt keeps names starting with %s for itself", ErrInvalidSpec, spec.Target, reserved)
			}
		}
		nic.Target = &struct {
			Dev string `xml:"dev,attr"`
		}{Dev: spec.Target}
	}
	nic.Source.Bridge = spec.Bridge
	nic.MAC.Address = mac.String()
	nic.Model.Type = "virtio"
	return nic, nil
}

// checkLinkName checks a Linux network device name: 1-15 bytes (IFNAMSIZ
// less its NUL) of [A-Za-z0-9._-], not "." or "..". The kernel allows more,
// but not ':' or '/', and such names are never worth the quoting.
func checkLinkName(what, name string) error {
	if name == "" || len(name) > 15 || name == "." || name == ".." {
		return fmt.Errorf("%w: %s %q must be a device name of 1-15 bytes", ErrInvalidSpec, what, name)
	}
	for i := 0; i < len(name); i++ {
		if !nameByte(name[i]) {
			return fmt.Errorf("%w: %s %q: byte %d is %q; allowed are A-Z a-z 0-9 . _ -", ErrInvalidSpec, what, name, i, name[i])
		}
	}
	return nil
}

// buildMetadata renders Loom's key/values with keys sorted, or nil if empty.
func buildMetadata(kv map[string]string) (*metadataXML, error) {
	if len(kv) == 0 {
		return nil, nil
	}
	keys := make([]string, 0, len(kv))
	for key := range kv {
		keys = append(keys, key)
	}
	slices.Sort(keys)
	m := &metadataXML{Loom: loomMetadataXML{Namespace: MetadataNamespace}}
	for _, key := range keys {
		if key == "" {
			return nil, fmt.Errorf("%w: empty metadata key", ErrInvalidSpec)
		}
		if err := checkXMLText("metadata key", key); err != nil {
			return nil, err
		}
		if err := checkXMLText("metadata value of "+key, kv[key]); err != nil {
			return nil, err
		}
		m.Loom.Entries = append(m.Loom.Entries, loomEntryXML{Key: key, Value: kv[key]})
	}
	return m, nil
}

// buildMetadataElement renders Loom's element for set-metadata, or "" if kv
// is empty. It carries no namespace: set-metadata adds the one it is given
// and fails if the element already declares it.
func buildMetadataElement(kv map[string]string) (string, error) {
	m, err := buildMetadata(kv)
	if err != nil || m == nil {
		return "", err
	}
	bare := struct {
		XMLName xml.Name       `xml:"vm"`
		Entries []loomEntryXML `xml:"entry"`
	}{Entries: m.Loom.Entries}
	out, err := xml.Marshal(bare)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSpec, err)
	}
	return string(out), nil
}

// parseMetadata reads Loom's element as returned by libvirt's get-metadata,
// which strips the namespace; a namespaced element (any prefix) is accepted
// too. Entries in other namespaces are ignored.
func parseMetadata(element string) (map[string]string, error) {
	var parsed struct {
		XMLName xml.Name
		Entries []struct {
			XMLName xml.Name
			Key     string `xml:"key,attr"`
			Value   string `xml:",chardata"`
		} `xml:"entry"`
	}
	if err := xml.Unmarshal([]byte(element), &parsed); err != nil {
		return nil, fmt.Errorf("parse loom metadata: %w", err)
	}
	if !loomSpace(parsed.XMLName.Space) {
		return nil, fmt.Errorf("parse loom metadata: root element in namespace %q, want %q", parsed.XMLName.Space, MetadataNamespace)
	}
	var kv map[string]string
	for _, entry := range parsed.Entries {
		if !loomSpace(entry.XMLName.Space) {
			continue
		}
		if kv == nil {
			kv = make(map[string]string, len(parsed.Entries))
		}
		kv[entry.Key] = entry.Value
	}
	return kv, nil
}

// loomSpace reports whether an element in namespace space is Loom's.
func loomSpace(space string) bool {
	return space == "" || space == MetadataNamespace
}

// checkXMLText rejects strings XML 1.0 cannot carry. encoding/xml would
// silently replace them, and the value read back would differ.
func checkXMLText(what, s string) error {
	return checkText(ErrInvalidSpec, what, s)
}

// checkText is checkXMLText with the error wrapping kind.
func checkText(kind error, what, s string) error {
	for i, r := range s {
		if r == utf8.RuneError && !strings.HasPrefix(s[i:], "\uFFFD") {
			return fmt.Errorf("%w: %s is not valid UTF-8 at byte %d", kind, what, i)
		}
		if !xmlChar(r) {
			return fmt.Errorf("%w: %s holds %U at byte %d, which XML cannot carry", kind, what, r, i)
		}
	}
	return nil
}

// xmlChar reports whether r is in XML 1.0's Char production.
func xmlChar(r rune) bool {
	return r == '\t' || r == '\n' || r == '\r' ||
		r >= 0x20 && r <= 0xD7FF ||
		r >= 0xE000 && r <= 0xFFFD ||
		r >= 0x10000 && r <= 0x10FFFF
}

func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

func orDefault(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}
