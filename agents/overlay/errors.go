package overlay

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrInvalidConfig means a Config cannot be used.
	ErrInvalidConfig = errors.New("invalid overlay config")
	// ErrInvalidEntry means an Entry given to SetPeers cannot be used.
	ErrInvalidEntry = errors.New("invalid overlay entry")
	// ErrInvalidPort means an address or MAC given to SetPort cannot be used.
	ErrInvalidPort = errors.New("invalid overlay port")
	// ErrForeignDevice means a device has the bridge's or the VXLAN
	// device's name but is of another kind; it is left alone.
	ErrForeignDevice = errors.New("device of another kind")
)

// CommandError is a command that failed: what ran (with the prefix), how
// it ended and what it wrote to standard error.
type CommandError struct {
	// Args is the whole command line, prefix included.
	Args []string
	// Stderr is the command's standard error, trimmed.
	Stderr string
	// Err is how it ended, usually an *exec.ExitError.
	Err error
}

func (e *CommandError) Error() string {
	msg := fmt.Sprintf("%s: %v", strings.Join(e.Args, " "), e.Err)
	if e.Stderr != "" {
		msg += ": " + e.Stderr
	}
	return msg
}

func (e *CommandError) Unwrap() error { return e.Err }
