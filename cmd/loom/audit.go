package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

func newAuditCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "For auditors: the whole history, kept outside Loom"}
	var out string
	export := &cobra.Command{
		Use:   "export --out FILE",
		Short: "Write every event to FILE as JSON lines (decoded, and the stored bytes), resuming after the last one it holds",
		Long: `loom audit export appends the event stream to FILE, one JSON line per message: its sequence,
subject, store time, envelope, decoded payload, and the stored bytes themselves (base64), from
which hashes can be checked again. A message that does not decode is written with the reason,
never left out. Run again, it resumes after the last complete line of FILE; a line cut short
by a crash is dropped first and written again. It stops at the end of the stream as it was
when it began.`,
		Args: cobra.NoArgs,
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			if out == "" {
				return events.Errorf(events.CodeInvalidArgument, "--out FILE is required")
			}
			n, from, err := exportEvents(cmd.Context(), c, out)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%d events written to %s, from sequence %d\n", n, out, from)
			return nil
		}),
	}
	export.Flags().StringVar(&out, "out", "", "the file to append to")
	cmd.AddCommand(export, newAuditVerifyCommand(flags))
	cmd.AddCommand(newAuditReplayCommand(flags))
	return cmd
}

// exportLine is one exported message.
type exportLine struct {
	tailLine
	// Header is the stored headers: seals cover them too.
	Header map[string][]string `json:"header,omitempty"`
	Raw    []byte              `json:"raw"`
}

// exportEvents appends the stream to path after the last complete line it
// holds, and returns how many messages it wrote and from which sequence.
func exportEvents(ctx context.Context, c *client, path string) (int, uint64, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return 0, 0, err
	}
	defer func() { _ = f.Close() }()
	last, keep, err := lastExported(f)
	if err != nil {
		return 0, 0, fmt.Errorf("%s: %w", path, err)
	}
	if err := f.Truncate(keep); err != nil {
		return 0, 0, err
	}
	if _, err := f.Seek(keep, io.SeekStart); err != nil {
		return 0, 0, err
	}
	js, stream, info, err := c.eventsStream(ctx)
	if err != nil {
		return 0, 0, err
	}
	from, end := last+1, info.State.LastSeq
	if from > end {
		return 0, from, nil
	}
	cons, err := bus.OrderedConsumer(ctx, js, stream, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: from})
	if err != nil {
		return 0, 0, err
	}
	defer bus.Forget(js, events.StreamEvents, cons)
	iter, err := cons.Messages()
	if err != nil {
		return 0, 0, err
	}
	defer iter.Stop()
	w := bufio.NewWriter(f)
	n := 0
	for {
		msg, err := iter.Next(jetstream.NextMaxWait(10 * time.Second))
		if errors.Is(err, nats.ErrTimeout) {
			return n, from, fmt.Errorf("stream ended at %d before %d (messages removed?): %w", last, end, err)
		}
		if err != nil {
			return n, from, err
		}
		meta, err := msg.Metadata()
		if err != nil {
			return n, from, err
		}
		seq := meta.Sequence.Stream
		rec, decodeErr := events.DecodeRecord(seq, msg.Subject(), meta.Timestamp, msg.Data())
		line := exportLine{tailLine: tailLine{Seq: seq, Subject: msg.Subject(), Stored: meta.Timestamp, Envelope: rec.Envelope,
			Payload: rec.Event, PrevHash: hex.EncodeToString(rec.Envelope.PrevHash)}, Header: msg.Headers(), Raw: msg.Data()}
		if decodeErr != nil {
			line.Undecoded = decodeErr.Error()
		}
		data, err := json.Marshal(line)
		if err != nil {
			return n, from, fmt.Errorf("sequence %d: %w", seq, err)
		}
		if _, err := w.Write(append(data, '\n')); err != nil {
			return n, from, err
		}
		n, last = n+1, seq
		if seq >= end {
			break
		}
	}
	if err := w.Flush(); err != nil {
		return n, from, err
	}
	return n, from, f.Sync()
}

// lastExported reads the sequence of the last complete line of f, and the
// length of f up to its end: what to keep. A last line without its
// newline, or that does not parse, is not kept.
func lastExported(f *os.File) (last uint64, keep int64, err error) {
	data, err := io.ReadAll(f)
	if err != nil {
		return 0, 0, err
	}
	end := bytes.LastIndexByte(data, '\n') + 1 // complete lines only
	for end > 0 {
		start := bytes.LastIndexByte(data[:end-1], '\n') + 1
		var line struct {
			Seq uint64 `json:"seq"`
		}
		if json.Unmarshal(data[start:end-1], &line) == nil && line.Seq > 0 {
			return line.Seq, int64(end), nil
		}
		end = start // a damaged line: drop it, and look at the one before
	}
	return 0, 0, nil
}
