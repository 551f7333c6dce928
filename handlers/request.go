package handlers

import (
	"github.com/nats-io/nats.go"

	"github.com/loomctl/loom/events"
)

// request is a command request as it came off the bus.
type request struct {
	subject string
	reply   string
	data    []byte
	header  nats.Header
	// format is the body's encoding; the reply uses the same.
	format events.Format
}

// command is who asked for what: the context stamped on every event a
// command appends, and what its Nats-Msg-Ids derive from.
type command struct {
	actor string
	id    string
	// origin is stamped on the command's events.
	origin events.Origin
}

func newCommand(actor, id, correlationID string, origin events.Origin) *command {
	origin.Actor, origin.CommandID, origin.CorrelationID = actor, id, correlationID
	return &command{actor: actor, id: id, origin: origin}
}

// validator is a command that checks its own arguments.
type validator interface{ Validate() error }

// decode decodes req's body into cmd (whose CommandMeta is meta), checks
// it, and says who sent it.
func (s *Service) decode(req *request, cmd validator, meta *events.CommandMeta) (*command, *events.Fault) {
	if err := events.DecodeStrict(req.format, req.data, cmd); err != nil {
		return nil, events.Errorf(events.CodeBadRequest, "%s: %v", req.subject, err)
	}
	if err := cmd.Validate(); err != nil {
		return nil, events.Errorf(events.CodeInvalidArgument, "%v", err)
	}
	if meta.CommandID == "" {
		return nil, events.Errorf(events.CodeMissingCommandID,
			"%s: command_id is empty; choose a unique id and reuse it when you retry", req.subject)
	}
	actor, fault := s.cfg.Actors.Actor(req.header)
	if fault != nil {
		return nil, fault
	}
	return newCommand(actor, meta.CommandID, meta.CorrelationID, events.Origin{Time: s.cfg.Now()}), nil
}
