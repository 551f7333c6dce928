package projections

import (
	"context"
	"fmt"

	"github.com/cockroachdb/pebble/v2"

	"github.com/loomctl/loom/events"
)

// The flagged table: messages of LOOM_EVENTS the read models could not
// apply (corrupt bytes, an unknown type or version, an event on a subject
// it does not belong to, a stale observation, an observation of a host
// registered with a key that is unsigned, forged or replayed). The runner
// records each, skips it and goes on, so one bad message never stalls the
// read models.

// Flagged is a message the read models skipped, and why.
type Flagged struct {
	Seq     uint64 `msgpack:"seq" json:"seq"`
	Subject string `msgpack:"subject" json:"subject"`
	// Code is the catalog code of why: corrupt_event, unknown_event,
	// stale_observation, unsigned_observation, forged_observation,
	// replayed_observation or chain_broken.
	Code   events.Code `msgpack:"code" json:"code"`
	Reason string      `msgpack:"reason" json:"reason"`
}

func (b *batch) flag(rec *events.Record, code events.Code, reason string) {
	b.flagged = append(b.flagged, Flagged{Seq: rec.Seq, Subject: rec.Subject, Code: code, Reason: reason})
}

func (b *batch) writeFlagged(pb *pebble.Batch, enc *encoder) error {
	for i := range b.flagged {
		value, err := enc.encode(&b.flagged[i])
		if err != nil {
			return fmt.Errorf("encode flagged %d: %w", b.flagged[i].Seq, err)
		}
		if err := pb.Set(flaggedKey(b.flagged[i].Seq), value, nil); err != nil {
			return err
		}
	}
	return nil
}

// FlaggedEvents lists the messages the read models skipped, in stream
// order.
func (s *Store) FlaggedEvents(ctx context.Context) ([]Flagged, error) {
	var flagged []Flagged
	err := s.read(ctx, func(v *view) error {
		return v.scan(prefixFlagged, func(_, value []byte) error {
			var f Flagged
			if err := events.Unmarshal(value, &f); err != nil {
				return fmt.Errorf("flagged: %w", err)
			}
			flagged = append(flagged, f)
			return nil
		})
	})
	return flagged, err
}
