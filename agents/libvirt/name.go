package libvirt

import "fmt"

// MaxNameLen is the longest domain name ValidateName accepts.
const MaxNameLen = 64

// ValidateName reports whether name is a domain name Loom may use: 1-64 bytes
// of [A-Za-z0-9._-], not starting with '-' or '.'. The error wraps
// ErrInvalidName and says what is wrong.
func ValidateName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty", ErrInvalidName)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: %d bytes long, max %d", ErrInvalidName, len(name), MaxNameLen)
	case name[0] == '-' || name[0] == '.':
		return fmt.Errorf("%w %q: must not start with %q", ErrInvalidName, name, name[0])
	}
	for i := 0; i < len(name); i++ {
		if !nameByte(name[i]) {
			return fmt.Errorf("%w %q: byte %d is %q; allowed are A-Z a-z 0-9 . _ -", ErrInvalidName, name, i, name[i])
		}
	}
	return nil
}

// nameByte reports whether b may appear in a domain name.
func nameByte(b byte) bool {
	return 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' ||
		b == '.' || b == '_' || b == '-'
}
