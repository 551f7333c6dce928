package libvirt

import (
	"strings"
	"testing"
)

func TestWithSerialFile(t *testing.T) {
	dom := `<domain type='kvm'>
  <devices>
    <disk type='file' device='disk'><source file='/a/web.qcow2'/><target dev='vda'/></disk>
    <serial type='file'>
      <source path='/a/web.serial' append='on'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <console type="file">
      <source path="/a/web.serial" append="on"/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>`
	got, err := withSerialFile(dom, "/b/web.serial")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(got, "/a/web.serial") || strings.Count(got, "/b/web.serial") != 2 || !strings.Contains(got, "/a/web.qcow2") {
		t.Fatalf("rewritten:\n%s", got)
	}
	if want := strings.ReplaceAll(dom, "/a/web.serial", "/b/web.serial"); got != want {
		t.Fatalf("other bytes changed:\n%s", got)
	}
	none := `<domain><devices><disk type='file'><source file='/a/x'/></disk></devices></domain>`
	if got, err := withSerialFile(none, "/b/x.serial"); err != nil || got != none {
		t.Fatalf("a domain without a serial file: %q %v", got, err)
	}
	if _, err := withSerialFile("<domain", "/b/x"); err == nil {
		t.Fatal("broken xml accepted")
	}
}
