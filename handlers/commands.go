package handlers

import (
	"context"

	"github.com/loomctl/loom/events"
)

// The event index of a command of one step.
const stepOnly = 0

// single runs a command of one step: its original result if it already
// took effect, else the step.
func (s *Service) single(ctx context.Context, c *command, step func(ctx context.Context) (stepResult, *events.Fault)) *events.Reply {
	result, found, err := s.cfg.Reader.CommandResult(ctx, c.actor, c.id)
	if err != nil {
		return failed(unavailable("read command result", err), nil)
	}
	if found {
		return &events.Reply{Events: result, Replayed: true}
	}
	res, fault := step(ctx)
	reply := &events.Reply{Error: fault, Replayed: res.replayed}
	if res.appended != nil {
		reply.Events = []events.Appended{*res.appended}
	}
	return reply
}

func (s *Service) serveRegisterHost(ctx context.Context, req *request) *events.Reply {
	var cmd events.RegisterHost
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		return appendStep(ctx, s, s.hosts, c, cmd.Name, stepOnly, events.TypeHostRegistered, func(h *hostView) (events.Event, *events.Fault) {
			return decideRegisterHost(h.state, &cmd)
		})
	})
}

// serveCordon serves cordon, or uncordon (also asked for by a cordon with
// uncordon set).
func (s *Service) serveCordon(uncordon bool) serveFunc {
	return func(ctx context.Context, req *request) *events.Reply {
		var cmd events.CordonHost
		c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
		if fault != nil {
			return failed(fault, nil)
		}
		undo := uncordon || cmd.Uncordon
		typ := events.TypeHostCordoned
		if undo {
			typ = events.TypeHostUncordoned
		}
		return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
			return appendStep(ctx, s, s.hosts, c, cmd.Name, stepOnly, typ, func(h *hostView) (events.Event, *events.Fault) {
				return decideCordon(h.state, cmd.Name, undo, cmd.Reason)
			})
		})
	}
}

func (s *Service) serveRegisterImage(ctx context.Context, req *request) *events.Reply {
	var cmd events.RegisterImage
	c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
	if fault != nil {
		return failed(fault, nil)
	}
	return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
		return appendStep(ctx, s, s.images, c, cmd.Name, stepOnly, events.TypeImageRegistered, func(img *events.ImageState) (events.Event, *events.Fault) {
			return decideRegisterImage(*img, &cmd)
		})
	})
}

// serveGoal serves start, stop, pause or resume.
func (s *Service) serveGoal(verb string) serveFunc {
	return func(ctx context.Context, req *request) *events.Reply {
		var cmd events.VMCommand
		c, fault := s.decode(req, &cmd, &cmd.CommandMeta)
		if fault != nil {
			return failed(fault, nil)
		}
		return s.single(ctx, c, func(ctx context.Context) (stepResult, *events.Fault) {
			return appendStep(ctx, s, s.vms, c, cmd.Name, stepOnly, events.TypeVMGoalChanged, func(vm *events.VMState) (events.Event, *events.Fault) {
				return decideGoal(*vm, cmd.Name, verb)
			})
		})
	}
}
