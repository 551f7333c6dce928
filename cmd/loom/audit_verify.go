package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime"
	"sync"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
)

// verifyFlags are the flags of `loom audit verify`.
type verifyFlags struct {
	keys []string
	pin  string
	file string
}

func newAuditVerifyCommand(flags *clientFlags) *cobra.Command {
	var vf verifyFlags
	cmd := &cobra.Command{
		Use:   "verify --key PUBLIC.pem [--pin FILE] [--file EXPORT]",
		Short: "Check that nobody rewrote the history: chains, seals, signatures, gaps, against your pin",
		Long: `loom audit verify reads the whole event stream (or a file written by loom audit
export) and checks, message by message: that no sequence is missing; that each
event names the hash of the previous event on its subject; that every seal is
signed by a key given with --key, follows the seal before it, and signs the
running hash of every message it covers; and that every observation of a host
registered with a key (loom host register --key) is signed by that key for its
place in its subject (unsigned_observation, forged_observation,
replayed_observation otherwise). It names the first bad event it finds.

With --pin FILE it also checks the history against what you pinned last time
(the keys you trust, the first seal, the last seal you verified): a cut tail
or an older copy restored fails there. A history that verifies advances the
pin to its last seal. Without the file, it is made from this history and the
keys given (trust on first use). Events after the last seal are reported as
not sealed yet: the control plane seals about once a second.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVerify(cmd.Context(), cmd.OutOrStdout(), flags, vf)
		},
	}
	cmd.Flags().StringArrayVar(&vf.keys, "key", nil, "a public key (PEM) that seals are trusted from; repeat for several (the control plane's is DATA-DIR/seal.pub)")
	cmd.Flags().StringVar(&vf.pin, "pin", "", "the pin file to check the history against and advance (made if missing)")
	cmd.Flags().StringVar(&vf.file, "file", "", "verify this export (loom audit export) instead of the stream")
	return cmd
}

func runVerify(ctx context.Context, w io.Writer, flags *clientFlags, vf verifyFlags) error {
	keys, ids, err := loadKeys(vf.keys)
	if err != nil {
		return err
	}
	var pin *audit.Pin
	if vf.pin != "" {
		pin, err = audit.LoadPin(vf.pin)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return events.Errorf(events.CodeInvalidArgument, "%v", err)
		}
	}
	// The signatures and hashes of messages are checked ahead, on every
	// CPU; the Verifier reads them in order.
	v := audit.NewAhead(audit.NewVerifier(keys, pin), runtime.GOMAXPROCS(0))
	var source string
	if vf.file != "" {
		source = vf.file
		err = verifyFile(vf.file, v.Add)
	} else {
		source = events.StreamEvents
		var c *client
		if c, err = flags.connect(bus.RoleAuditor); err == nil {
			defer c.close()
			err = verifyStream(ctx, c, v.Add)
		}
	}
	report := v.Finish()
	if err != nil {
		return err
	}
	if flags.output == "json" {
		if err := json.NewEncoder(w).Encode(report); err != nil {
			return err
		}
		if bad, ok := report.FirstBad(); ok {
			return events.Errorf(bad.Code, "the history does not verify: the first bad event is at sequence %d", bad.Seq)
		}
		return nil
	}
	return printReport(w, source, report, pin, vf.pin, ids)
}

// loadKeys reads the public keys given.
func loadKeys(paths []string) ([]ed25519.PublicKey, []string, error) {
	if len(paths) == 0 {
		return nil, nil, events.Errorf(events.CodeInvalidArgument, "--key PUBLIC.pem is required: the public key of the control plane's seal key (DATA-DIR/seal.pub)")
	}
	keys := make([]ed25519.PublicKey, 0, len(paths))
	ids := make([]string, 0, len(paths))
	for _, path := range paths {
		key, err := audit.LoadPublicKey(path)
		if err != nil {
			return nil, nil, events.Errorf(events.CodeInvalidArgument, "%v", err)
		}
		keys, ids = append(keys, key), append(ids, audit.KeyID(key))
	}
	return keys, ids, nil
}

// printReport prints what verify found, advances the pin if the history
// verified, and returns the first bad event's fault if it did not.
func printReport(w io.Writer, source string, r *audit.Report, pin *audit.Pin, pinPath string, ids []string) error {
	fmt.Fprintf(w, "read %s: %d messages, sequences %d to %d, %d seals\n", source, r.Messages, r.First, r.Last, r.Seals)
	if r.Seals > 0 {
		fmt.Fprintf(w, "last seal at %d covers up to %d; %d messages after it are not sealed yet\n", r.LastSeal.Seq, r.LastSeal.To, r.Unsealed)
	} else {
		fmt.Fprintf(w, "no seal: none of the %d messages is sealed\n", r.Unsealed)
	}
	if r.Signed+r.Unchecked > 0 {
		fmt.Fprintf(w, "observations: %d signed by their hosts' keys, %d of hosts without a key (not checked)\n", r.Signed, r.Unchecked)
	}
	if bad, ok := r.FirstBad(); ok {
		for _, p := range r.Problems {
			fmt.Fprintf(w, "  %s\n", p)
		}
		if r.Dropped > 0 {
			fmt.Fprintf(w, "  and %d more\n", r.Dropped)
		}
		return events.Errorf(bad.Code, "the history does not verify: %d problems; the first bad event is at sequence %d (%s): %s",
			len(r.Problems)+r.Dropped, bad.Seq, bad.Subject, bad.Message)
	}
	if pinPath == "" {
		fmt.Fprintf(w, "verified, but without a pin: keep one (--pin FILE) so that a cut tail or an older copy is caught next time\n")
		return nil
	}
	next := audit.Advanced(pin, r, ids)
	if next == nil {
		fmt.Fprintf(w, "verified; no seal to pin yet\n")
		return nil
	}
	if err := next.Save(pinPath); err != nil {
		return fmt.Errorf("save pin %s: %w", pinPath, err)
	}
	if pin == nil {
		fmt.Fprintf(w, "verified; pinned %s (first use: trusting keys %v and this history's first seal at %d)\n", pinPath, next.Keys, next.First.Seq)
		return nil
	}
	fmt.Fprintf(w, "verified against %s; pin advanced from the seal at %d to the one at %d\n", pinPath, pin.Last.Seq, next.Last.Seq)
	return nil
}

// verifyStream feeds the stream to add, from its first message to the last
// one it held when verify began.
func verifyStream(ctx context.Context, c *client, add func(*audit.Message)) error {
	js, _, info, err := c.eventsStream(ctx)
	if err != nil {
		return err
	}
	if info.State.LastSeq == 0 {
		return nil
	}
	_, err = readStream(ctx, js, info.State.LastSeq, add)
	return err
}

// readStream hands every message of LOOM_EVENTS up to last to add, in
// order, on one goroutine, and returns how many it read.
func readStream(ctx context.Context, js jetstream.JetStream, last uint64, add func(*audit.Message)) (uint64, error) {
	stream, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return 0, err
	}
	cons, err := bus.OrderedConsumer(ctx, js, stream, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		return 0, err
	}
	defer bus.Forget(js, events.StreamEvents, cons)
	var (
		n    uint64
		once sync.Once
		done = make(chan error, 1)
		m    audit.Message
		// ended is set once done is sent: what the consumer delivers
		// before it stops is not read. Only the callback touches it.
		ended bool
	)
	consume, err := cons.Consume(func(msg jetstream.Msg) {
		if ended {
			return
		}
		meta, err := msg.Metadata()
		if err != nil {
			ended = true
			once.Do(func() { done <- err })
			return
		}
		m = audit.Message{Seq: meta.Sequence.Stream, Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data()}
		add(&m)
		n++
		if m.Seq >= last || meta.NumPending == 0 {
			ended = true
			once.Do(func() { done <- nil })
		}
	}, jetstream.PullMaxMessages(2000))
	if err != nil {
		return 0, err
	}
	defer func() {
		consume.Stop()
		<-consume.Closed()
	}()
	select {
	case err := <-done:
		return n, err
	case <-ctx.Done():
		return n, ctx.Err()
	}
}

// verifyFile feeds an export file to add, line by line.
func verifyFile(path string, add func(*audit.Message)) error {
	f, err := os.Open(path)
	if err != nil {
		return events.Errorf(events.CodeInvalidArgument, "%v", err)
	}
	defer func() { _ = f.Close() }()
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 0, 1<<20), 64<<20)
	for n := 1; scanner.Scan(); n++ {
		var line struct {
			Seq     uint64              `json:"seq"`
			Subject string              `json:"subject"`
			Header  map[string][]string `json:"header"`
			Raw     []byte              `json:"raw"`
		}
		if err := json.Unmarshal(scanner.Bytes(), &line); err != nil || line.Seq == 0 {
			return events.Errorf(events.CodeBadRequest, "%s line %d: not a line of loom audit export (%v)", path, n, err)
		}
		add(&audit.Message{Seq: line.Seq, Subject: line.Subject, Header: line.Header, Data: line.Raw})
	}
	return scanner.Err()
}
