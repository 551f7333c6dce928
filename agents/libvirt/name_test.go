package libvirt

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		wantErr string // substring; "" means valid
	}{
		{name: "simple", input: "web-1"},
		{name: "all classes", input: "A.z_0-9"},
		{name: "single char", input: "a"},
		{name: "max length", input: strings.Repeat("x", 64)},
		{name: "inner dots", input: "vm..1"},
		{name: "empty", input: "", wantErr: "empty"},
		{name: "too long", input: strings.Repeat("x", 65), wantErr: "65 bytes long, max 64"},
		{name: "leading dash", input: "-vm", wantErr: `must not start with '-'`},
		{name: "leading dot", input: ".vm", wantErr: `must not start with '.'`},
		{name: "slash", input: "a/b", wantErr: `byte 1 is '/'`},
		{name: "space", input: "a b", wantErr: `byte 1 is ' '`},
		{name: "xml", input: "<x>", wantErr: `byte 0 is '<'`},
		{name: "unicode", input: "vmé", wantErr: "byte 2"},
		{name: "nul", input: "a\x00", wantErr: `byte 1 is '\x00'`},
		{name: "newline", input: "a\n", wantErr: `byte 1 is '\n'`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateName(tc.input)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("ValidateName(%q) = %v, want nil", tc.input, err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidName) {
				t.Fatalf("ValidateName(%q) = %v, want ErrInvalidName", tc.input, err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("ValidateName(%q) = %q, want it to mention %q", tc.input, err, tc.wantErr)
			}
		})
	}
}
