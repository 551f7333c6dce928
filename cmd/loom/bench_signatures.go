package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/agents"
	"github.com/loomctl/loom/events/hostkey"
	"github.com/loomctl/loom/projections"
)

// signatureRounds is how many times each figure is measured, signed and
// unsigned alternating: the best of each is reported, the least disturbed
// on a shared machine.
const signatureRounds = 3

// historyRounds is the same for the histories, whose rounds are longer.
const historyRounds = 2

// benchSignatures measures what signed observations cost, each figure
// against the same without signatures in the same run:
//
//   - an agent's reports/s through its own append path (seal, sign,
//     append with the subject check, wait for the ack), 8 VMs at once as
//     an agent's workers report, on a server with --sync's durability and
//     on one that fsyncs lazily (where the server's CPU, not the disk,
//     bounds it), signed and unsigned in alternating rounds;
//   - a rebuild of the read models from --events events of a fleet's
//     history whose every host has a key and signs, against the same
//     history unsigned (message for message), each on a server of its own
//     with its own decode-only replay as a yardstick, in alternating
//     rounds;
//   - loom audit verify's check over each of the two.
//
// Each figure is the best of its rounds: on a shared machine, the least
// disturbed.
func benchSignatures(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error {
	key, err := hostkey.Generate()
	if err != nil {
		return err
	}
	syncs := []string{cfg.sync}
	if cfg.sync != "2m" {
		syncs = append(syncs, "2m")
	}
	for _, sync := range syncs {
		signed, unsigned, err := benchAgentReports(ctx, cfg, filepath.Join(dir, "agent-"+sync), sync, key)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "  agent reports, 8 VMs at once, sync %s (best of %d rounds each)\n", sync, signatureRounds)
		compare(w, "signed", signed, "unsigned", unsigned, "/s")
	}

	unsigned, signed, err := benchSignedHistories(ctx, cfg, dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "  rebuild of the read models, %d events of which %d observations (best of %d rounds each)\n", signed.events, signed.observations, historyRounds)
	compare(w, "signed", signed.rebuild, "unsigned", unsigned.rebuild, " events/s")
	fmt.Fprintf(w, "    each against its own decode-only replay: signed %.2f (%0.f/s), unsigned %.2f (%0.f/s)\n",
		signed.rebuild/signed.raw, signed.raw, unsigned.rebuild/unsigned.raw, unsigned.raw)
	fmt.Fprintf(w, "    cost per signed observation: %.1f µs\n", perObservation(signed.rebuild, unsigned.rebuild, signed))
	fmt.Fprintf(w, "  loom audit verify\n")
	compare(w, "signed", signed.verify, "unsigned", unsigned.verify, " events/s")
	fmt.Fprintf(w, "    cost per signed observation: %.1f µs\n", perObservation(signed.verify, unsigned.verify, signed))
	return nil
}

// compare prints two rates and their ratio.
func compare(w io.Writer, what string, got float64, baselineName string, baseline float64, unit string) {
	fmt.Fprintf(w, "    %-10s %10.0f%s\n    %-10s %10.0f%s\n    ratio %.2f\n", what, got, unit, baselineName, baseline, unit, got/baseline)
}

// perObservation is the time a signed history spends per observation more
// than the unsigned one, in µs, from the two rates over the same events.
func perObservation(signedRate, unsignedRate float64, run signatureRun) float64 {
	extra := float64(run.events)/signedRate - float64(run.events)/unsignedRate
	return extra / float64(run.observations) * 1e6
}

// benchAgentReports measures an agent's reports/s, signed with key and
// unsigned, in alternating rounds on one fresh server of the durability
// sync, and returns the best of each.
func benchAgentReports(ctx context.Context, cfg benchConfig, dir, sync string, key *hostkey.Key) (signed, unsigned float64, err error) {
	scfg, err := benchServerConfig(benchConfig{sync: sync}, dir)
	if err != nil {
		return 0, 0, err
	}
	js, stop, err := inProcessBus(ctx, scfg)
	if err != nil {
		return 0, 0, err
	}
	defer stop()
	round := max(cfg.duration/(2*signatureRounds), time.Second)
	var rates [2][]float64
	for r := range signatureRounds {
		for i, k := range []*hostkey.Key{key, nil} {
			acfg := agents.Config{Host: "bench", HostKey: k, Conn: js.Conn(), JS: js, Logger: quietLogger(),
				Dial: func(context.Context) (agents.Hypervisor, error) {
					return nil, errors.New("the bench runs no hypervisor")
				}}
			rate, err := agents.AppendBench(ctx, acfg, fmt.Sprintf("r%d-%d", r, i), agents.DefaultWorkers, round)
			if err != nil {
				return 0, 0, err
			}
			rates[i] = append(rates[i], rate)
		}
	}
	return slices.Max(rates[0]), slices.Max(rates[1]), nil
}

// signatureRun is what one history measured.
type signatureRun struct {
	events, observations uint64
	// raw, rebuild and verify are events/s, the best of the rounds.
	raw, rebuild, verify float64
}

// benchSignedHistories fills two fresh servers' LOOM_EVENTS with
// cfg.events events of the same fleet's history, unsigned and signed, then
// times on each, alternating, in historyRounds rounds: a rebuild of the
// read models against a decode-only replay, and loom audit verify's check.
// The best of the rounds counts: on a shared machine, the least disturbed.
func benchSignedHistories(ctx context.Context, cfg benchConfig, dir string) (unsigned, signed signatureRun, err error) {
	var js [2]jetstream.JetStream
	var runs [2]signatureRun
	for i, sign := range []bool{false, true} {
		var stop func()
		if js[i], stop, runs[i].events, err = historyBus(ctx, cfg, filepath.Join(dir, fmt.Sprintf("history-%d", i)), sign, io.Discard); err != nil {
			return unsigned, signed, err
		}
		defer stop()
	}
	for round := range historyRounds {
		for i, sign := range []bool{false, true} {
			run := &runs[i]
			result, err := projections.RebuildBench(ctx, js[i], filepath.Join(dir, fmt.Sprintf("pebble-%d-%d", i, round)))
			if err != nil {
				return unsigned, signed, err
			}
			run.raw, run.rebuild = max(run.raw, result.Raw), max(run.rebuild, result.Rebuild)
			took, r, err := timeVerify(ctx, js[i], run.events, nil)
			if err != nil {
				return unsigned, signed, err
			}
			if !r.OK() || (sign && r.Unchecked > 0) || (!sign && r.Signed > 0) {
				return unsigned, signed, fmt.Errorf("the bench history (signed %v) does not verify: %d signed, %d unchecked, %v", sign, r.Signed, r.Unchecked, r.Problems)
			}
			run.verify, run.observations = max(run.verify, float64(run.events)/took.Seconds()), r.Signed+r.Unchecked
		}
	}
	return runs[0], runs[1], nil
}
