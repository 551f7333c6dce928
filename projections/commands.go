package projections

import (
	"bytes"
	"context"
	"fmt"
	"slices"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// The command results read model: for each command, by (actor, command
// id), every event that carries its id, in stream order. A handler asked
// again for a command that already took effect answers with these, however
// long after the duplicate window. Events without a command id (an agent's
// observations) are not recorded; flagged messages are not either.
//
// Each event is its own key under the command's prefix, so recording one
// is a blind write, and a command's events read back in stream order.

// commandEvent is one event of a command, waiting in a batch.
type commandEvent struct {
	actor, commandID string
	appended         events.Appended
}

func (b *batch) recordCommand(rec *events.Record) {
	env := &rec.Envelope
	if env.CommandID == "" {
		return
	}
	b.results = append(b.results, commandEvent{actor: env.Actor, commandID: env.CommandID,
		appended: events.Appended{Seq: rec.Seq, Subject: rec.Subject, Type: env.Type, ID: env.ID}})
}

// writeCommands writes the batch's command events in key order.
func (b *batch) writeCommands(pb *pebble.Batch, enc *encoder) error {
	keys := make([][]byte, len(b.results))
	order := make([]int, len(b.results))
	for i := range b.results {
		e := &b.results[i]
		keys[i], order[i] = commandKey(e.actor, e.commandID, e.appended.Seq), i
	}
	slices.SortFunc(order, func(i, j int) int { return bytes.Compare(keys[i], keys[j]) })
	for _, i := range order {
		value, err := enc.encode(&b.results[i].appended)
		if err != nil {
			return fmt.Errorf("encode command result %s: %w", b.results[i].commandID, err)
		}
		if err := pb.Set(keys[i], value, nil); err != nil {
			return err
		}
	}
	return nil
}

// CommandResult lists the events the command (actor, commandID) appended,
// in stream order, and whether there were any.
func (s *Store) CommandResult(ctx context.Context, actor, commandID string) ([]events.Appended, bool, error) {
	var appended []events.Appended
	err := s.read(ctx, func(v *view) error {
		return v.scan(commandPrefix(actor, commandID), func(_, value []byte) error {
			var a events.Appended
			if err := events.Unmarshal(value, &a); err != nil {
				return fmt.Errorf("command %s of %s: %w", commandID, actor, err)
			}
			appended = append(appended, a)
			return nil
		})
	})
	if err != nil {
		return nil, false, err
	}
	return appended, len(appended) > 0, nil
}
