package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/events/hostkey"
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
	seal     sealFlags
	insecure bool
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
image. With --qemu the hosts run real guests under QEMU instead: a tiny
Linux (ops/qemu/guest.sh) registered as image "tiny", each VM a qcow2
overlay on it. Ctrl-C stops everything it started. Needs root.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
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
	cfg.seal.register(cmd)
	cmd.Flags().BoolVar(&cfg.insecure, "insecure", false, "run NATS without authentication: anyone who reaches the port may do anything (a throwaway setup only)")
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
	names := make([]string, cfg.hosts)
	for i := range names {
		names[i] = hostName(i)
	}
	credsDir := ""
	if cfg.insecure {
		plane.WarnInsecure(log)
	} else if credsDir, err = plane.SecureEmbedded(&cfg.nats, dataDir, names, log); err != nil {
		return err
	}
	// access is how an identity gets in: none without auth.
	access := func(name string) plane.Access {
		if credsDir == "" {
			return plane.Access{}
		}
		return plane.AccessIn(credsDir, name)
	}
	conn, err := plane.Connect(ctx, cfg.nats, dataDir, "loom-up", log)
	if err != nil {
		return err
	}
	defer conn.Close()

	kind := simulatedHosts()
	if cfg.qemu {
		if kind, err = qemuHosts(ctx); err != nil {
			return err
		}
	}
	// Hosts: one namespaced libvirtd each, stopped on the way out.
	dirs := make([]string, cfg.hosts)
	for i := range dirs {
		dirs[i] = filepath.Join(dataDir, "hosts", hostName(i))
	}
	// Each host has its own key, kept under the data dir: its agent signs
	// with it, and the host is registered with its public half.
	keys := make([]*hostkey.Key, cfg.hosts)
	for i := range keys {
		if keys[i], _, err = hostkey.Ensure(hostKeyPath(dataDir, credsDir, hostName(i))); err != nil {
			return err
		}
	}
	hosts, err := startSimHosts(ctx, dirs, 1, log)
	if err != nil {
		return err
	}
	defer hosts.stop()
	sockets := hosts.sockets

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		return plane.RunControlPlane(ctx, conn, plane.ControlPlaneConfig{DataDir: dataDir, HTTPAddr: cfg.httpAddr, CredsDir: credsDir,
			Attested: !cfg.insecure, SealKey: cfg.seal.key, SealEvery: cfg.seal.every}, log)
	})
	for i, socket := range sockets {
		name := hostName(i)
		// Each host has its fencer beside its agent, as on a real host.
		fence := filepath.Join(dirs[i], "fence.sock")
		agent, err := kind.agentConfig(name, socket, fence)
		if err != nil {
			return err
		}
		agent.HostKey = hostKeyPath(dataDir, credsDir, name)
		g.Go(func() error {
			return plane.RunFencer(ctx, plane.FencerConfig{Host: name, Socket: socket, URI: kind.uri, Listen: fence}, log)
		})
		// Each agent connects as its own host's identity.
		agentConn, err := plane.Join(conn.URL, "loom-agent-"+name, access(plane.AgentName(name)))
		if err != nil {
			return err
		}
		defer agentConn.Close()
		g.Go(func() error {
			return plane.RunAgent(ctx, agentConn, agent, log)
		})
	}
	clientConn, err := plane.Join(conn.URL, "loom-up", access(string(bus.RoleClient)))
	if err != nil {
		return err
	}
	defer clientConn.Close()
	g.Go(func() error {
		if err := registerFleet(ctx, clientConn, cfg, func(h string) string { return hostKeyPath(dataDir, credsDir, h) }, keys, kind.image); err != nil {
			return err
		}
		printWhere(out, conn, cfg, dataDir, credsDir, sockets, kind)
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

// hostKeyPath is the key a simulated host signs with: its agent's NATS
// identity (one key per host, both jobs: the signatures are domain
// separated from a connect nonce, see hostkey.Domain), or with no
// identities (--insecure) a key of its own under DATA-DIR/host-keys. A
// key a data dir of an older Loom keeps there is kept, since its host is
// registered with it.
func hostKeyPath(dataDir, credsDir, host string) string {
	own := filepath.Join(dataDir, "host-keys", host+".nk")
	if _, err := os.Stat(own); err == nil || credsDir == "" {
		return own
	}
	return plane.CredsFile(credsDir, plane.AgentName(host))
}

// registerFleet registers the simulated hosts, each with its key, and the
// demo image, with command ids fixed per data dir and key, so running
// `loom up` again is a no-op (and gives a key to a host an older `loom up`
// registered without one).
func registerFleet(ctx context.Context, conn *plane.Connection, cfg upConfig, keyPath func(host string) string, keys []*hostkey.Key, img events.RegisterImage) error {
	c := &client{flags: &clientFlags{actor: "loom-up", timeout: 15 * time.Second}, nc: conn.Conn}
	send := func(kind events.Kind, body any) error {
		// The control plane may still be starting: retry while nobody serves.
		return retryUnavailable(ctx, func() error {
			_, err := c.command(ctx, kind, events.VerbRegister, body)
			return err
		})
	}
	for i := 0; i < cfg.hosts; i++ {
		public := keys[i].Public()
		reg := events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: "up-register-" + hostName(i) + "-" + public[1:13]},
			Name: hostName(i), CPU: cfg.hostCPU, MemoryMiB: cfg.hostMiB, Key: public}
		if err := send(events.KindHost, &reg); err != nil {
			if errors.Is(err, events.Errorf(events.CodeHostExists, "")) {
				return fmt.Errorf("register %s: %w (was its key %s replaced? restore it, or start from an empty --data-dir)",
					reg.Name, err, keyPath(reg.Name))
			}
			return fmt.Errorf("register %s: %w", reg.Name, err)
		}
	}
	if err := send(events.KindImage, &img); err != nil {
		return fmt.Errorf("register image %s: %w", img.Name, err)
	}
	return nil
}

func printWhere(w io.Writer, conn *plane.Connection, cfg upConfig, dataDir, credsDir string, sockets []string, kind hostKind) {
	fmt.Fprintf(w, "\nLoom is up.\n")
	fmt.Fprintf(w, "  NATS        %s  (client verbs find it with no flags)\n", conn.URL)
	if cfg.httpAddr != "" {
		fmt.Fprintf(w, "  metrics     http://%s/metrics   readiness http://%s/readyz\n", cfg.httpAddr, cfg.httpAddr)
	}
	fmt.Fprintf(w, "  data        %s\n", dataDir)
	if credsDir != "" {
		fmt.Fprintf(w, "  creds       %s  (one nkey per identity; the verbs find them with --creds %s, or by themselves in the default data dir)\n", credsDir, credsDir)
	} else {
		fmt.Fprintf(w, "  creds       none: INSECURE, anyone who reaches NATS may do anything\n")
	}
	sealKey := cmp.Or(cfg.seal.key, filepath.Join(dataDir, "seal.key"))
	fmt.Fprintf(w, "  seals       signed with %s; auditors verify with %s\n", sealKey, audit.PublicPath(sealKey))
	for i, s := range sockets {
		fmt.Fprintf(w, "  %-10s  libvirtd %s (%s), %d CPU, %d MiB\n", hostName(i), s, kind.uri, cfg.hostCPU, cfg.hostMiB)
	}
	fmt.Fprintf(w, "  host keys   %s: each agent signs its observations; each host is registered with its key\n",
		hostKeyPath(dataDir, credsDir, "<host>"))
	fmt.Fprintf(w, "  image       %s\n\nTry, in another shell:\n", kind.image.Name)
	fmt.Fprintf(w, "  loom vm create web-1 --image %s --cpu 1 --mem 256 --wait 60s\n  loom vm get web-1\n  loom events tail\n\nCtrl-C stops everything.\n", kind.image.Name)
}
