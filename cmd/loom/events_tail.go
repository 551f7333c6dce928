package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// tailFlags select which events `loom events tail` shows.
type tailFlags struct {
	from     string
	last     int
	types    []string
	host     string
	actor    string
	noFollow bool
	json     bool
	// subjects, if set, are the only subjects read (history).
	subjects []string
}

func newEventsCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "events", Short: "The event history"}
	var tf tailFlags
	tail := &cobra.Command{
		Use:   "tail",
		Short: "Print events as they are appended, decoded (-o json for JSON lines)",
		Args:  cobra.NoArgs,
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			if tf.json {
				c.flags.output = "json"
			}
			return tailEvents(cmd.Context(), c, tf, cmd.OutOrStdout())
		}),
	}
	tail.Flags().StringVar(&tf.from, "from", "", "start at this stream sequence or RFC 3339 time (default: the last --last events)")
	tail.Flags().IntVar(&tf.last, "last", 50, "without --from, start this many events before the end")
	tail.Flags().StringSliceVar(&tf.types, "type", nil, "only events of these types (repeat or separate with commas, e.g. vm.created,vm.placed)")
	tail.Flags().StringVar(&tf.host, "host", "", "only what concerns this host: its own events (registration, allocations, cordons, loss), its agent's observations, the decisions about VMs from their placement on it, and the grants of holders on it")
	tail.Flags().StringVar(&tf.actor, "actor", "", "only events by this actor, or by this identity on anyone's behalf")
	tail.Flags().BoolVar(&tf.noFollow, "no-follow", false, "stop at the end of the history instead of following")
	tail.Flags().BoolVar(&tf.json, "json", false, "JSON lines, one event per line (the same as -o json)")
	var hf tailFlags
	history := &cobra.Command{
		Use:   "history KIND/ID",
		Short: "Print the whole history of one aggregate (vm/web, host/node-7, image/tiny, net/blue), decisions and its hosts' reports, in order",
		Args:  cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			kind, id, ok := strings.Cut(args[0], "/")
			if !ok || events.ValidateName(kind, id) != nil || kind == "" {
				return events.Errorf(events.CodeInvalidArgument, "%q: want KIND/ID, e.g. vm/web", args[0])
			}
			if hf.json {
				c.flags.output = "json"
			}
			hf.from, hf.noFollow = "1", true
			hf.subjects = []string{events.EventSubject(events.Kind(kind), id), events.ObservationSubject("*", events.Kind(kind), id)}
			return tailEvents(cmd.Context(), c, hf, cmd.OutOrStdout())
		}),
	}
	history.Flags().StringSliceVar(&hf.types, "type", nil, "only events of these types")
	history.Flags().BoolVar(&hf.json, "json", false, "JSON lines, one event per line (the same as -o json)")
	cmd.AddCommand(tail, history)
	return cmd
}

func tailEvents(ctx context.Context, c *client, tf tailFlags, w io.Writer) error {
	js, stream, info, err := c.eventsStream(ctx)
	if err != nil {
		return err
	}
	cfg := jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy}
	if tf.from == "" {
		first := uint64(1)
		if info.State.LastSeq > uint64(tf.last) {
			first = info.State.LastSeq - uint64(tf.last) + 1
		}
		cfg.OptStartSeq = first
	} else {
		if seq, err := strconv.ParseUint(tf.from, 10, 64); err == nil {
			cfg.OptStartSeq = max(seq, 1)
		} else if at, err := time.Parse(time.RFC3339, tf.from); err == nil {
			cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &at
		} else {
			return events.Errorf(events.CodeInvalidArgument, "--from %q: want a sequence number or an RFC 3339 time", tf.from)
		}
	}
	cfg.FilterSubjects = tf.subjects
	var onHost *hostFilter
	if tf.host != "" {
		cfg.FilterSubjects = []string{events.HostObservations(tf.host), events.EventSubject(events.KindHost, tf.host),
			events.EventSubject(events.KindVM, "*"), events.EventSubject(events.KindLease, ">")}
		onHost = newHostFilter(tf.host)
	}
	cons, err := bus.OrderedConsumer(ctx, js, stream, cfg)
	if err != nil {
		return err
	}
	defer bus.Forget(js, events.StreamEvents, cons)
	end := info.State.LastSeq
	if tf.noFollow && (end == 0 || cfg.OptStartSeq > end) {
		return nil
	}
	// One subscription for the whole tail: a fetch per message on an
	// ordered consumer would make a server-side consumer each time.
	iter, err := cons.Messages()
	if err != nil {
		return err
	}
	defer iter.Stop()
	// Following waits as long as it takes; --no-follow stops once a second
	// passes with nothing (the filters may leave nothing up to end).
	next := jetstream.NextContext(ctx)
	if tf.noFollow {
		next = jetstream.NextMaxWait(time.Second)
	}
	for {
		msg, err := iter.Next(next)
		if ctx.Err() != nil || (tf.noFollow && errors.Is(err, nats.ErrTimeout)) {
			return nil
		}
		if err != nil {
			return err
		}
		meta, err := msg.Metadata()
		if err != nil {
			return err
		}
		rec, decodeErr := events.DecodeRecord(meta.Sequence.Stream, msg.Subject(), meta.Timestamp, msg.Data())
		if tf.match(&rec, decodeErr) && onHost.keeps(&rec, decodeErr) {
			if err := printRecord(w, c.flags.output, &rec, decodeErr); err != nil {
				return err
			}
		}
		if tf.noFollow && meta.Sequence.Stream >= end {
			return nil
		}
	}
}

func (tf tailFlags) match(rec *events.Record, decodeErr error) bool {
	if decodeErr != nil {
		// Shown unless a filter needs the envelope: never dropped silently.
		return len(tf.types) == 0 && tf.actor == ""
	}
	return (len(tf.types) == 0 || slices.Contains(tf.types, string(rec.Envelope.Type))) &&
		(tf.actor == "" || actorIs(rec.Envelope.Actor, tf.actor))
}

// actorIs says whether actor is want, or was sent by the identity want on
// someone's behalf ("client-ci" matches "client-ci/alice").
func actorIs(actor, want string) bool {
	return actor == want || strings.HasPrefix(actor, want+"/")
}

// tailLine is one event as `-o json` prints it.
type tailLine struct {
	Seq       uint64          `json:"seq"`
	Subject   string          `json:"subject"`
	Stored    time.Time       `json:"stored"`
	Envelope  events.Envelope `json:"envelope"`
	Payload   any             `json:"payload,omitempty"`
	PrevHash  string          `json:"prev_hash,omitempty"`
	Undecoded string          `json:"undecodable,omitempty"`
}

func printRecord(w io.Writer, output string, rec *events.Record, decodeErr error) error {
	if output == "json" {
		line := tailLine{Seq: rec.Seq, Subject: rec.Subject, Stored: rec.Stored, Envelope: rec.Envelope, Payload: rec.Event,
			PrevHash: hex.EncodeToString(rec.Envelope.PrevHash)}
		if decodeErr != nil {
			line.Undecoded = decodeErr.Error()
		}
		data, err := json.Marshal(line)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(w, string(data))
		return err
	}
	if decodeErr != nil {
		_, err := fmt.Fprintf(w, "#%-6d %s  %-20s %s  !! %v\n", rec.Seq, rec.Stored.Local().Format("15:04:05.000"), "(undecodable)", rec.Subject, decodeErr)
		return err
	}
	payload, _ := json.Marshal(rec.Event)
	_, err := fmt.Fprintf(w, "#%-6d %s  %-20s %-28s by %s  %s\n", rec.Seq, rec.Envelope.At().Local().Format("15:04:05.000"),
		rec.Envelope.Type, rec.Subject, rec.Envelope.Actor, payload)
	return err
}
