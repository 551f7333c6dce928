package libvirt

import (
	"errors"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"
)

var (
	// ErrNotFound means the named domain does not exist.
	ErrNotFound = errors.New("domain not found")
	// ErrDisconnected means the connection to libvirtd is gone; Dial again.
	ErrDisconnected = errors.New("libvirtd connection lost")
	// ErrClosed means the Client was closed by its owner.
	ErrClosed = errors.New("libvirt client closed")
	// ErrInvalidName means a domain name failed ValidateName.
	ErrInvalidName = errors.New("invalid domain name")
	// ErrInvalidSpec means a DomainSpec cannot be turned into domain XML.
	ErrInvalidSpec = errors.New("invalid domain spec")
	// ErrInvalidConfig means a Config cannot be used to dial.
	ErrInvalidConfig = errors.New("invalid libvirt config")
	// ErrInvalidSnapshot means a Snapshot, or a path given to RestoreMemory,
	// cannot be used.
	ErrInvalidSnapshot = errors.New("invalid snapshot")
	// ErrInvalidMigration means a Migration cannot be used.
	ErrInvalidMigration = errors.New("invalid migration")
	// ErrNoMigrationStats means libvirt keeps no statistics of a completed
	// incoming migration for the domain.
	ErrNoMigrationStats = errors.New("no completed migration statistics")
	// ErrInvalidPool means a storage pool's name or directory cannot be used.
	ErrInvalidPool = errors.New("invalid storage pool")
)

// Error is a failure reported by libvirtd itself. Code is libvirt's
// virErrorNumber (for example 42 = no domain, 55 = operation invalid).
type Error struct {
	Code    int
	Message string
}

// Libvirt error numbers this package interprets (virerror.h).
const (
	codeOperationInvalid = int(golibvirt.ErrOperationInvalid)
	codeNoDomain         = int(golibvirt.ErrNoDomain)
	codeNoDomainMetadata = int(golibvirt.ErrNoDomainMetadata)
)

// Error returns libvirt's message with its code.
func (e *Error) Error() string {
	return fmt.Sprintf("libvirt error %d: %s", e.Code, e.Message)
}

// Is makes a "no domain" error match ErrNotFound.
func (e *Error) Is(target error) bool {
	return target == ErrNotFound && e.Code == codeNoDomain
}

// hasCode reports whether err carries libvirt error number code.
func hasCode(err error, code int) bool {
	var lerr *Error
	return errors.As(err, &lerr) && lerr.Code == code
}

// translate turns a go-libvirt error into this package's vocabulary. gone
// reports whether the connection had already dropped when err was returned.
func translate(err error, gone bool) error {
	if err == nil {
		return nil
	}
	var lerr golibvirt.Error
	if errors.As(err, &lerr) {
		return &Error{Code: int(lerr.Code), Message: lerr.Message}
	}
	// Anything else from go-libvirt is a transport failure: EINVAL once the
	// socket is closed, ErrInterrupted for calls in flight when it closed.
	if gone || errors.Is(err, golibvirt.ErrInterrupted) {
		return ErrDisconnected
	}
	return err
}
