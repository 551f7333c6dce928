package overlay

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestConfig_Validate(t *testing.T) {
	local := netip.MustParseAddr("10.250.1.1")
	tests := []struct {
		name    string
		cfg     Config
		wantErr string // "" for valid
	}{
		{name: "minimal", cfg: Config{VNI: 42, Local: local}},
		{name: "everything", cfg: Config{Prefix: []string{"nsenter", "-t", "1", "-n"}, Bridge: "br-vms", VNI: MaxVNI,
			Local: netip.MustParseAddr("fd00::1"), Underlay: "eth0.100", Port: 8472}},
		{name: "VNI 0", cfg: Config{Local: local}, wantErr: "VNI 0"},
		{name: "VNI too large", cfg: Config{VNI: MaxVNI + 1, Local: local}, wantErr: "VNI 16777216"},
		{name: "no local", cfg: Config{VNI: 1}, wantErr: "local endpoint"},
		{name: "unspecified local", cfg: Config{VNI: 1, Local: netip.IPv4Unspecified()}, wantErr: "local endpoint"},
		{name: "multicast local", cfg: Config{VNI: 1, Local: netip.MustParseAddr("239.1.1.1")}, wantErr: "local endpoint"},
		{name: "bridge too long", cfg: Config{VNI: 1, Local: local, Bridge: "a-very-long-name"}, wantErr: "bridge"},
		{name: "bridge with a space", cfg: Config{VNI: 1, Local: local, Bridge: "br 0"}, wantErr: "byte 2"},
		{name: "bridge named like the device", cfg: Config{VNI: 7, Local: local, Bridge: "loomvx7"}, wantErr: "VXLAN device's name"},
		{name: "underlay with a slash", cfg: Config{VNI: 1, Local: local, Underlay: "a/b"}, wantErr: "underlay"},
		{name: "empty prefix program", cfg: Config{VNI: 1, Local: local, Prefix: []string{"", "x"}}, wantErr: "prefix"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Validate = %v, want ErrInvalidConfig mentioning %q", err, tc.wantErr)
			}
		})
	}
}

func TestConfig_Names(t *testing.T) {
	cfg := Config{VNI: 42, Local: netip.MustParseAddr("10.0.0.1")}
	if got, want := cfg.BridgeName(), "loombr42"; got != want {
		t.Fatalf("BridgeName=%q, want %q", got, want)
	}
	if got, want := cfg.DeviceName(), "loomvx42"; got != want {
		t.Fatalf("DeviceName=%q, want %q", got, want)
	}
	cfg.Bridge = "br0"
	if got := cfg.BridgeName(); got != "br0" {
		t.Fatalf("BridgeName=%q, want br0", got)
	}
	// The longest names fit in a device name.
	cfg = Config{VNI: MaxVNI, Local: cfg.Local}
	if err := checkLinkName("bridge", cfg.BridgeName()); err != nil {
		t.Fatal(err)
	}
	if err := checkLinkName("device", cfg.DeviceName()); err != nil {
		t.Fatal(err)
	}
}
