package libvirt

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"strings"
)

// serialFile is the file the domain's first serial port writes to; empty
// when it writes to none.
func serialFile(domXML string) (string, error) {
	var d struct {
		Devices struct {
			Serials []struct {
				Type   string `xml:"type,attr"`
				Source struct {
					Path string `xml:"path,attr"`
				} `xml:"source"`
			} `xml:"serial"`
		} `xml:"devices"`
	}
	if err := xml.Unmarshal([]byte(domXML), &d); err != nil {
		return "", fmt.Errorf("domain xml: %w", err)
	}
	for _, s := range d.Devices.Serials {
		if s.Type == "file" && s.Source.Path != "" {
			return s.Source.Path, nil
		}
	}
	return "", nil
}

// withSerialFile points every path attribute that names the domain's
// serial file (its serial port's and its console's) at file, keeping every
// other byte. A domain without a serial file is returned as it is.
func withSerialFile(domXML, file string) (string, error) {
	old, err := serialFile(domXML)
	if err != nil || old == "" {
		return domXML, err
	}
	var escOld, escNew bytes.Buffer
	if err := xml.EscapeText(&escOld, []byte(old)); err != nil {
		return "", err
	}
	if err := xml.EscapeText(&escNew, []byte(file)); err != nil {
		return "", err
	}
	out := domXML
	for _, q := range []string{"'", `"`} {
		out = strings.ReplaceAll(out, "path="+q+escOld.String()+q, "path="+q+escNew.String()+q)
	}
	if out == domXML {
		return "", fmt.Errorf("domain xml: serial file %q named in no path attribute", old)
	}
	return out, nil
}
