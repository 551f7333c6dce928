package handlers

import (
	"context"

	"github.com/loomctl/loom/events"
)

// Reader is what the handlers need of the read side. cmd passes the
// projections; tests pass an in-memory fold of the stream.
//
// A read may lag the stream, never lead it: whatever a Reader returns
// reflects a prefix of LOOM_EVENTS in stream order. The handlers never trust
// a read for safety (every append is checked against the subject's last
// sequence), only for deciding what to try.
type Reader interface {
	// VM is the named VM's state and the head of loom.evt.vm.<name>; the
	// zero state and zero Head when the name was never used.
	VM(ctx context.Context, name string) (events.VMState, events.Head, error)
	// Host is the named host's state and the head of loom.evt.host.<name>;
	// the zero state and zero Head when it was never registered.
	Host(ctx context.Context, name string) (events.HostState, events.Head, error)
	// Image is the named image's state and the head of its subject; the
	// zero state and zero Head when it was never registered.
	Image(ctx context.Context, name string) (events.ImageState, events.Head, error)
	// Net is the named net's state and the head of loom.evt.net.<name>;
	// the zero state and zero Head when it was never created.
	Net(ctx context.Context, name string) (events.NetState, events.Head, error)
	// Nets lists every net the read model knows.
	Nets(ctx context.Context) ([]events.NetState, error)
	// Lease is a resource's lease state ("image/<name>", "disk/<name>"),
	// with every shared grant; Grants is zero when none was ever made.
	Lease(ctx context.Context, resource string) (events.LeaseState, error)
	// LeaseOf is Lease with, of the shared grants, only holder's.
	LeaseOf(ctx context.Context, resource, holder string) (events.LeaseState, error)
	// Head is where a loom.evt subject stands, flagged messages included;
	// the zero Head when it is empty.
	Head(ctx context.Context, subject string) (events.Head, error)
	// AllLeases lists every standing grant.
	AllLeases(ctx context.Context) ([]events.LeaseGrant, error)
	// Hosts lists every host the read model knows.
	Hosts(ctx context.Context) ([]events.HostState, error)
	// AllVMs lists every VM the read model knows, gone ones included.
	AllVMs(ctx context.Context) ([]events.VMState, error)
	// CommandResult is what the command (actor, commandID) appended, in
	// stream order, and whether it appended anything.
	CommandResult(ctx context.Context, actor, commandID string) ([]events.Appended, bool, error)
	// WaitFor returns once the read model has applied stream sequence seq,
	// or with ctx's error.
	WaitFor(ctx context.Context, seq uint64) error
}
