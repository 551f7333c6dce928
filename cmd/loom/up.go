package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// upConfig configures `loom up`.
type upConfig struct {
	nats     plane.NATSConfig
	dataDir  string
	httpAddr string
	hosts    int
	hostCPU  int
	hostMiB  int
	qemu     bool
	verbose  bool
}

func newUpCommand() *cobra.Command {
	var cfg upConfig
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run everything on this machine: embedded NATS, the control plane, simulated hosts with their agents",
		Long: `loom up starts, on this machine: an embedded NATS server on port 4222, the
control plane (as loom serve), N simulated hosts (each a private libvirtd on
libvirt's test driver, in its own mount and network namespace, started by
ops/libvirt/host.sh) with one agent each, and registers the hosts and a demo
image. Ctrl-C stops everything it started. Needs root.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cfg.qemu {
				return events.Errorf(events.CodeInvalidArgument, "--qemu (real guests) is not built yet: use the test driver for now")
			}
			return runUp(cmd.Context(), cfg, cmd.OutOrStdout())
		},
	}
	registerNATSFlags(cmd, &cfg.nats)
	cmd.Flags().StringVar(&cfg.dataDir, "data-dir", defaultDataDir(), "where NATS, the read models and the simulated hosts keep their files")
	cmd.Flags().StringVar(&cfg.httpAddr, "http", "127.0.0.1:9464", "HTTP address for /metrics and /readyz")
	cmd.Flags().IntVar(&cfg.hosts, "hosts", 3, "simulated hosts to start")
	cmd.Flags().IntVar(&cfg.hostCPU, "host-cpu", 16, "CPUs each simulated host offers")
	cmd.Flags().IntVar(&cfg.hostMiB, "host-mem", 32768, "memory each simulated host offers, MiB")
	cmd.Flags().BoolVar(&cfg.qemu, "qemu", false, "run real QEMU guests instead of the test driver")
	cmd.Flags().BoolVarP(&cfg.verbose, "verbose", "v", false, "debug logging")
	return cmd
}

func runUp(ctx context.Context, cfg upConfig, out io.Writer) error {
	if cfg.hosts < 1 || cfg.hosts > 250 {
		return fmt.Errorf("--hosts %d: want 1..250", cfg.hosts)
	}
	log := newLogger(cfg.verbose)
	dataDir, err := filepath.Abs(cfg.dataDir)
	if err != nil {
		return err
	}
	conn, err := plane.Connect(ctx, cfg.nats, dataDir, "loom-up", log)
	if err != nil {
		return err
	}
	defer conn.Close()

	// Simulated hosts: one namespaced libvirtd each, stopped on the way out.
	dirs := make([]string, cfg.hosts)
	for i := range dirs {
		dirs[i] = filepath.Join(dataDir, "hosts", hostName(i))
	}
	hosts, err := startSimHosts(ctx, dirs, 1, log)
	if err != nil {
		return err
	}
	defer hosts.stop()
	sockets := hosts.sockets

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return plane.RunControlPlane(ctx, conn, plane.ControlPlaneConfig{DataDir: dataDir, HTTPAddr: cfg.httpAddr}, log)
	})
	for i, socket := range sockets {
		name := hostName(i)
		// Each host has its fencer beside its agent, as on a real host.
		fence := filepath.Join(dirs[i], "fence.sock")
		g.Go(func() error {
			return plane.RunFencer(ctx, plane.FencerConfig{Host: name, Socket: socket, URI: "test:///default", Listen: fence}, log)
		})
		g.Go(func() error {
			return plane.RunAgent(ctx, conn, plane.AgentConfig{Host: name, Socket: socket, URI: "test:///default", Simulated: true, FenceSocket: fence}, log)
		})
	}
	g.Go(func() error {
		if err := registerFleet(ctx, conn, cfg); err != nil {
			return err
		}
		printWhere(out, conn, cfg, dataDir, sockets)
		return nil
	})
	err = g.Wait()
	if errors.Is(err, context.Canceled) || ctx.Err() != nil {
		log.Info("stopping")
		return nil
	}
	return err
}

func hostName(i int) string { return fmt.Sprintf("host-%d", i+1) }

// registerFleet registers the simulated hosts and the demo image, with
// command ids fixed per data dir, so running `loom up` again is a no-op.
func registerFleet(ctx context.Context, conn *plane.Connection, cfg upConfig) error {
	c := &client{flags: &clientFlags{actor: "loom-up", timeout: 15 * time.Second}, nc: conn.Conn}
	send := func(kind events.Kind, body any) error {
		// The control plane may still be starting: retry while nobody serves.
		return retryUnavailable(ctx, func() error {
			_, err := c.command(ctx, kind, events.VerbRegister, body)
			return err
		})
	}
	for i := 0; i < cfg.hosts; i++ {
		reg := events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: "up-register-" + hostName(i)},
			Name: hostName(i), CPU: cfg.hostCPU, MemoryMiB: cfg.hostMiB}
		if err := send(events.KindHost, &reg); err != nil {
			return fmt.Errorf("register %s: %w", reg.Name, err)
		}
	}
	img := events.RegisterImage{CommandMeta: events.CommandMeta{CommandID: "up-register-demo"},
		Name: "demo", Format: "qcow2", SizeBytes: 64 << 20, Source: "builtin:demo"}
	if err := send(events.KindImage, &img); err != nil {
		return fmt.Errorf("register image demo: %w", err)
	}
	return nil
}

func printWhere(w io.Writer, conn *plane.Connection, cfg upConfig, dataDir string, sockets []string) {
	fmt.Fprintf(w, "\nLoom is up.\n")
	fmt.Fprintf(w, "  NATS        %s  (client verbs find it with no flags)\n", conn.URL)
	if cfg.httpAddr != "" {
		fmt.Fprintf(w, "  metrics     http://%s/metrics   readiness http://%s/readyz\n", cfg.httpAddr, cfg.httpAddr)
	}
	fmt.Fprintf(w, "  data        %s\n", dataDir)
	for i, s := range sockets {
		fmt.Fprintf(w, "  %-10s  libvirtd %s (test driver), %d CPU, %d MiB\n", hostName(i), s, cfg.hostCPU, cfg.hostMiB)
	}
	fmt.Fprintf(w, "  image       demo\n\nTry, in another shell:\n")
	fmt.Fprintf(w, "  loom vm create web-1 --image demo --cpu 1 --mem 256 --wait 30s\n  loom vm get web-1\n  loom events tail\n\nCtrl-C stops everything.\n")
}
