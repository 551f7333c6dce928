package handlers

import (
	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// Actors says who sent a command: the actor stamped on its events, and
// the scope its command id is unique in.
type Actors interface {
	Actor(h nats.Header) (string, *events.Fault)
}

// ClaimedActors takes the sender's word: the Loom-Actor header, or
// AnonymousActor. It is all an open bus (--insecure) can know, and the
// default of Config.
type ClaimedActors struct{}

// Actor returns the actor h claims.
func (ClaimedActors) Actor(h nats.Header) (string, *events.Fault) {
	actor := h.Get(events.HeaderActor)
	if actor == "" {
		actor = AnonymousActor
	}
	return actor, checkActorLen(actor)
}

// checkActorLen bounds an actor, whatever it is made of.
func checkActorLen(actor string) *events.Fault {
	if len(actor) > MaxActorLen {
		return events.Errorf(events.CodeInvalidArgument, "the actor (%s header, after the identity if any) is %d bytes, at most %d allowed", events.HeaderActor, len(actor), MaxActorLen)
	}
	return nil
}

// AttestedActors takes the actor from the identity the NATS server
// attests (bus.RequesterOf): the name of the client identity whose key
// sent the command, as Name gives it, or the key itself when Name knows
// none. A Loom-Actor header, if any, is kept after a slash, as the
// identity's own word on whose behalf it asks ("client-ci/alice"): the
// part before the first slash is the server's, the rest the client's.
// A command that crossed no import (sent from within Loom's account) is
// refused: unattested_command.
type AttestedActors struct {
	// Name is the identity name of a client's public key.
	Name func(key string) (string, bool)
}

// Actor returns the attested actor of h.
func (a AttestedActors) Actor(h nats.Header) (string, *events.Fault) {
	who, ok, err := bus.RequesterOf(h)
	if err != nil {
		return "", events.Errorf(events.CodeUnattestedCommand, "%v", err)
	}
	if !ok || who.Account != bus.ClientsAccount {
		return "", events.Errorf(events.CodeUnattestedCommand,
			"the command did not come from a client identity, so the server does not say who sent it; send it with client credentials (loom init --client NAME makes them)")
	}
	actor := who.Key
	if a.Name != nil {
		if name, known := a.Name(who.Key); known {
			actor = name
		}
	}
	if claimed := h.Get(events.HeaderActor); claimed != "" {
		actor += "/" + claimed
	}
	return actor, checkActorLen(actor)
}
