package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/pprof"
	"sort"
	"time"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/cmd/loom/plane"
)

// benchConfig configures `loom bench`.
type benchConfig struct {
	only     string
	clients  int
	duration time.Duration
	events   int
	vms      int
	sync     string
	keep     bool
	verbose  bool
	// cpuProfile, if set, receives a CPU profile of the whole run: server,
	// control plane and clients share this process.
	cpuProfile string
	// access is how runClients' connections get in: none on a server
	// without auth or TLS.
	access plane.Access
}

func newBenchCommand() *cobra.Command {
	var cfg benchConfig
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure Loom's speed figures, each as a ratio against a baseline measured in the same run",
		Long: `loom bench measures, in one run, on this machine:
  create    vm.create commands/s with --clients concurrent clients over TCP loopback,
            against raw JetStream publishes with expected-subject-sequence at the same concurrency;
            and again with the bus locked down (nkey identities, TLS), against the first
  lease     lease acquire+release pairs/s with --clients concurrent clients over TCP loopback,
            shared grants of one image and exclusive grants of an image each, against raw
            expected-subject-sequence publish pairs at the same concurrency; again with --sync always
            if it is not already; and, with sync always, atomic batches of --clients checked
            messages (a group commit) against as many single synced publishes
  rebuild   projection rebuild events/s over --events events, against a raw ordered-consumer
            replay that only decodes
  audit     loom audit verify and loom audit replay events/s over --events sealed events,
            against a raw ordered-consumer replay that only decodes; goal: at least 0.5 of it
  signatures
            what signed observations cost: an agent's reports/s (8 VMs at once, --sync and 2m),
            a rebuild of the read models and loom audit verify over --events events of a fleet
            whose hosts all sign, each against the same unsigned in the same run
  converge  command accepted -> agent observed converged, p50 and p99, with --vms VMs on the
            test driver
  memory    NATS server memory per 10,000 aggregates
  checkpoint
            checkpoint time of a running guest, disk-only and full, through Loom (command sent ->
            read model shows it taken) against the libvirt snapshot call alone, on the same kind
            of guest (the tiny Linux of loom up --qemu) on one private libvirtd; --vms is ignored
  migrate   live migration of a running guest between two private libvirtd daemons, there and
            back: through Loom (command sent -> read model shows it moved) against libvirt's own
            peer-to-peer migration called directly, with libvirt's total and downtime figures of
            both; goal: Loom adds under 10 % to the total and nothing to the downtime
Every part starts its own embedded NATS in a temporary directory. Needs root for converge,
checkpoint and migrate, and QEMU for checkpoint and migrate (run: ops/libvirt/install.sh --qemu).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cfg.cpuProfile != "" {
				f, err := os.Create(cfg.cpuProfile)
				if err != nil {
					return err
				}
				defer func() { _ = f.Close() }()
				if err := pprof.StartCPUProfile(f); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			return runBench(cmd.Context(), cfg, cmd.OutOrStdout())
		},
	}
	cmd.Flags().StringVar(&cfg.only, "only", "", "run one part: create, lease, rebuild, audit, signatures, converge, memory, checkpoint or migrate")
	cmd.Flags().IntVar(&cfg.clients, "clients", 16, "concurrent clients for create and lease")
	cmd.Flags().DurationVar(&cfg.duration, "duration", 10*time.Second, "how long each throughput run lasts")
	cmd.Flags().IntVar(&cfg.events, "events", 1_000_000, "events for rebuild, audit and signatures")
	cmd.Flags().IntVar(&cfg.vms, "vms", 1000, "VMs for converge")
	cmd.Flags().StringVar(&cfg.sync, "sync", "always", "embedded NATS durability for every part: always, or an fsync interval")
	cmd.Flags().BoolVar(&cfg.keep, "keep", false, "keep the temporary directories")
	cmd.Flags().StringVar(&cfg.cpuProfile, "cpuprofile", "", "write a CPU profile of the run to this file (go tool pprof)")
	cmd.Flags().BoolVarP(&cfg.verbose, "verbose", "v", false, "log what the control plane and agents do (converge, checkpoint, migrate)")
	return cmd
}

// benchPart is one measurement of `loom bench`.
type benchPart struct {
	name string
	run  func(ctx context.Context, cfg benchConfig, dir string, w io.Writer) error
}

func runBench(ctx context.Context, cfg benchConfig, w io.Writer) error {
	parts := []benchPart{
		{"create", benchCreate},
		{"lease", benchLease},
		{"rebuild", benchRebuild},
		{"audit", benchAudit},
		{"signatures", benchSignatures},
		{"converge", benchConverge},
		{"memory", benchMemory},
		{"checkpoint", benchCheckpoint},
		{"migrate", benchMigrate},
	}
	names := make([]string, 0, len(parts))
	for _, p := range parts {
		names = append(names, p.name)
	}
	sort.Strings(names)
	found := cfg.only == ""
	fmt.Fprintf(w, "loom bench: sync=%s, %d CPUs\n", cfg.sync, numCPU())
	for _, p := range parts {
		if cfg.only != "" && cfg.only != p.name {
			continue
		}
		found = true
		dir, err := os.MkdirTemp("", "loom-bench-"+p.name+"-")
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "\n== %s\n", p.name)
		err = p.run(ctx, cfg, dir, w)
		if !cfg.keep {
			if rmErr := os.RemoveAll(dir); rmErr != nil {
				fmt.Fprintf(w, "  (could not remove %s: %v)\n", dir, rmErr)
			}
		}
		if err != nil {
			return fmt.Errorf("bench %s: %w", p.name, err)
		}
	}
	if !found {
		return fmt.Errorf("--only %q: want one of %v", cfg.only, names)
	}
	return nil
}

// quietLogger discards the control plane's logs during benchmarks.
func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// ratio prints "name: x/s vs baseline y/s = r".
// A goal of zero means the figure has none: only the ratio is printed.
func ratio(w io.Writer, what string, got float64, baselineName string, baseline float64, goal float64) {
	r := got / baseline
	fmt.Fprintf(w, "  %-28s %10.0f/s\n  %-28s %10.0f/s\n", what, got, baselineName, baseline)
	if goal == 0 {
		fmt.Fprintf(w, "  ratio %.2f\n", r)
		return
	}
	verdict := "meets"
	if r < goal {
		verdict = "BELOW"
	}
	fmt.Fprintf(w, "  ratio %.2f (goal >= %.2f: %s)\n", r, goal, verdict)
}

// percentile of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}
