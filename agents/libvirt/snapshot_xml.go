package libvirt

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// snapshotXML is the <domainsnapshot> TakeSnapshot sends: one external
// overlay for vda, and external memory or none.
type snapshotXML struct {
	XMLName xml.Name          `xml:"domainsnapshot"`
	Name    string            `xml:"name"`
	Memory  snapshotMemoryXML `xml:"memory"`
	Disks   []snapshotDiskXML `xml:"disks>disk"`
}

type snapshotMemoryXML struct {
	Snapshot string `xml:"snapshot,attr"` // "external" or "no"
	File     string `xml:"file,attr,omitempty"`
}

type snapshotDiskXML struct {
	Name     string `xml:"name,attr"`
	Snapshot string `xml:"snapshot,attr"`
	Driver   struct {
		Type string `xml:"type,attr"`
	} `xml:"driver"`
	Source struct {
		File string `xml:"file,attr"`
	} `xml:"source"`
}

// buildSnapshotXML renders s for DomainSnapshotCreateXML. s must already
// be valid.
func buildSnapshotXML(s Snapshot) (string, error) {
	snap := snapshotXML{Name: s.Name, Memory: snapshotMemoryXML{Snapshot: "no"}}
	if s.Memory != "" {
		snap.Memory = snapshotMemoryXML{Snapshot: "external", File: s.Memory}
	}
	disk := snapshotDiskXML{Name: snapshotDisk, Snapshot: "external"}
	disk.Driver.Type = "qcow2"
	disk.Source.File = s.Overlay
	snap.Disks = []snapshotDiskXML{disk}
	out, err := xml.MarshalIndent(snap, "", "  ")
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrInvalidSnapshot, err)
	}
	return string(out), nil
}

// saveImageDomain is what RestoreMemory needs to know about the domain
// inside a save image.
type saveImageDomain struct {
	Name string `xml:"name"`
	UUID string `xml:"uuid"`
}

// parseSaveImageDomain reads the name and UUID of domain XML.
func parseSaveImageDomain(domXML string) (saveImageDomain, error) {
	var d saveImageDomain
	if err := xml.Unmarshal([]byte(domXML), &d); err != nil {
		return saveImageDomain{}, fmt.Errorf("parse domain xml: %w", err)
	}
	if d.Name == "" || d.UUID == "" {
		return saveImageDomain{}, errors.New("parse domain xml: no <name> or <uuid>")
	}
	return d, nil
}

// span is the byte range [start, end) of some text in an XML document.
type span struct{ start, end int }

// diskElement is where one <disk> of domain XML keeps what a restore
// rewrites.
type diskElement struct {
	target string
	// file is the <source file=...> value, decoded; fileValue is the span
	// of its raw value between the quotes. hasFile is false when the disk
	// has no such attribute (no source, or not a file).
	file      string
	fileValue span
	hasFile   bool
	// backingStores are the disk's own <backingStore> elements, whole.
	backingStores []span
}

// findDisk locates the <disk> under /domain/devices whose <target dev=...>
// is target. It reads the XML as tokens with their byte offsets, so callers
// can rewrite the document in place and keep every other byte (namespaced
// metadata, formatting) exactly as it was.
func findDisk(domXML, target string) (diskElement, error) {
	dec := xml.NewDecoder(strings.NewReader(domXML))
	var (
		path      []string // local names of the open elements
		found     []diskElement
		disk      *diskElement // the open /domain/devices/disk, if any
		backStart = -1         // start of the open direct <backingStore>
	)
	for offset := 0; ; {
		token, err := dec.RawToken()
		if err == io.EOF && len(path) > 0 {
			return diskElement{}, fmt.Errorf("parse domain xml: <%s> is not closed", path[len(path)-1])
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return diskElement{}, fmt.Errorf("parse domain xml: %w", err)
		}
		start, end := offset, int(dec.InputOffset())
		offset = end

		switch t := token.(type) {
		case xml.StartElement:
			path = append(path, t.Name.Local)
			if t.Name.Space != "" {
				path[len(path)-1] = t.Name.Space + ":" + t.Name.Local // not libvirt's
			}
			switch {
			case slices.Equal(path, []string{"domain", "devices", "disk"}):
				disk = &diskElement{}
			case disk != nil && len(path) == 4:
				disk.child(t, domXML[start:end], start)
				if t.Name.Local == "backingStore" {
					backStart = start
				}
			}
		case xml.EndElement:
			if len(path) == 0 {
				return diskElement{}, fmt.Errorf("parse domain xml: unexpected </%s>", t.Name.Local)
			}
			switch {
			case disk != nil && len(path) == 4 && backStart >= 0:
				disk.backingStores = append(disk.backingStores, span{backStart, end})
				backStart = -1
			case disk != nil && len(path) == 3:
				if disk.target == target {
					found = append(found, *disk)
				}
				disk = nil
			}
			path = path[:len(path)-1]
		}
	}
	switch len(found) {
	case 0:
		return diskElement{}, fmt.Errorf("domain xml has no <disk> with <target dev='%s'/>", target)
	case 1:
		return found[0], nil
	default:
		return diskElement{}, fmt.Errorf("domain xml has %d disks with <target dev='%s'/>", len(found), target)
	}
}

// child records a direct child element of the disk: its target, or its
// source file and where that value sits. tag is the element's raw start
// tag, found at offset in the document.
func (d *diskElement) child(t xml.StartElement, tag string, offset int) {
	switch t.Name.Local {
	case "target":
		d.target = attrValue(t, "dev")
	case "source":
		if value, ok := rawAttrValue(tag, "file"); ok {
			d.file, d.hasFile = attrValue(t, "file"), true
			d.fileValue = span{offset + value.start, offset + value.end}
		}
	}
}

// attrValue returns the decoded value of t's unprefixed attribute name.
func attrValue(t xml.StartElement, name string) string {
	for _, a := range t.Attr {
		if a.Name.Space == "" && a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

// rawAttrValue finds the unprefixed attribute name in a start tag the
// decoder has already accepted as well formed, and returns the span of its
// raw value, quotes excluded.
func rawAttrValue(tag, name string) (span, bool) {
	i := strings.IndexAny(tag, " \t\r\n") // past "<element"
	for i >= 0 && i < len(tag) {
		for i < len(tag) && strings.IndexByte(" \t\r\n", tag[i]) >= 0 {
			i++
		}
		eq := strings.IndexByte(tag[i:], '=')
		if eq < 0 {
			return span{}, false // only "/>" or ">" is left
		}
		attr := strings.TrimRight(tag[i:i+eq], " \t\r\n")
		i += eq + 1
		for i < len(tag) && strings.IndexByte(" \t\r\n", tag[i]) >= 0 {
			i++
		}
		quote := tag[i]
		closing := strings.IndexByte(tag[i+1:], quote)
		if closing < 0 {
			return span{}, false
		}
		value := span{i + 1, i + 1 + closing}
		if attr == name {
			return value, true
		}
		i = value.end + 1
	}
	return span{}, false
}

// diskFile returns the file the disk with the given target uses.
func diskFile(domXML, target string) (string, error) {
	disk, err := findDisk(domXML, target)
	if err != nil {
		return "", err
	}
	if !disk.hasFile {
		return "", fmt.Errorf("disk %s has no <source file=...>", target)
	}
	return disk.file, nil
}

// withDiskFile points the disk with the given target at file: it rewrites
// the value of its <source file=...> and removes its <backingStore>, so
// libvirt probes the new file's chain itself. Every other byte of domXML is
// kept. file must be text XML can carry.
func withDiskFile(domXML, target, file string) (string, error) {
	disk, err := findDisk(domXML, target)
	if err != nil {
		return "", err
	}
	if !disk.hasFile {
		return "", fmt.Errorf("disk %s has no <source file=...>", target)
	}
	var escaped strings.Builder
	if err := xml.EscapeText(&escaped, []byte(file)); err != nil {
		return "", err
	}
	type edit struct {
		span
		text string
	}
	edits := []edit{{disk.fileValue, escaped.String()}}
	for _, removed := range disk.backingStores {
		edits = append(edits, edit{wholeLine(domXML, removed), ""})
	}
	// Apply from the end so earlier offsets stay valid.
	slices.SortFunc(edits, func(a, b edit) int { return b.start - a.start })
	out := domXML
	for _, e := range edits {
		out = out[:e.start] + e.text + out[e.end:]
	}
	return out, nil
}

// wholeLine widens s over the indentation before it and the line break
// that ends the previous line, when s sits on lines of its own, so that
// removing it leaves no blank line behind.
func wholeLine(doc string, s span) span {
	start := s.start
	for start > 0 && (doc[start-1] == ' ' || doc[start-1] == '\t') {
		start--
	}
	if start > 0 && doc[start-1] == '\n' && (s.end == len(doc) || doc[s.end] == '\n' || doc[s.end] == '\r') {
		start--
		if start > 0 && doc[start-1] == '\r' {
			start--
		}
		return span{start, s.end}
	}
	return s
}
