package bus

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/oklog/ulid/v2"
)

// ADR-50 atomic batch headers (nats.go has no atomic-batch API yet), and
// the most messages a batch may hold.
const (
	MaxBatch = 1000

	headerBatchID     = "Nats-Batch-Id"
	headerBatchSeq    = "Nats-Batch-Sequence"
	headerBatchCommit = "Nats-Batch-Commit"
)

// PublishBatch stores msgs as one atomic batch on a stream that allows
// atomic publish: all of them or none. The server stores a batch
// contiguously, so the i-th message of n lands at the returned sequence
// minus n-1-i. Each message keeps its own headers, so each may carry its
// check (the first write to a subject in a batch is checked). Every
// message but the last is sent without waiting; the last carries the
// commit, and its ack answers for the whole batch. A failed check is
// ErrWrongLastSeq, as for a single append.
func PublishBatch(ctx context.Context, nc *nats.Conn, msgs []*nats.Msg) (uint64, error) {
	if len(msgs) == 0 || len(msgs) > MaxBatch {
		return 0, fmt.Errorf("publish batch: %d messages, want 1..%d", len(msgs), MaxBatch)
	}
	id := ulid.Make().String()
	for i, m := range msgs {
		if m.Header == nil {
			m.Header = nats.Header{}
		}
		m.Header.Set(headerBatchID, id)
		m.Header.Set(headerBatchSeq, strconv.Itoa(i+1))
		if i == len(msgs)-1 {
			break
		}
		if err := nc.PublishMsg(m); err != nil {
			return 0, fmt.Errorf("publish batch %s: message %d: %w", id, i+1, err)
		}
	}
	commit := msgs[len(msgs)-1]
	commit.Header.Set(headerBatchCommit, "1")
	resp, err := nc.RequestMsgWithContext(ctx, commit)
	if err != nil {
		return 0, fmt.Errorf("publish batch %s: commit: %w", id, err)
	}
	var ack struct {
		Seq   uint64              `json:"seq"`
		Count int                 `json:"count"`
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(resp.Data, &ack); err != nil {
		return 0, fmt.Errorf("publish batch %s: undecodable ack %q: %w", id, resp.Data, err)
	}
	switch {
	case ack.Error != nil:
		return 0, fmt.Errorf("publish batch %s: %w", id, classify(ack.Error))
	case ack.Count != len(msgs):
		return 0, fmt.Errorf("publish batch %s: ack counts %d messages, sent %d", id, ack.Count, len(msgs))
	}
	return ack.Seq, nil
}
