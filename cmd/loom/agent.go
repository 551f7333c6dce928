package main

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/agents"
	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

func newAgentCommand(client *clientFlags) *cobra.Command {
	var (
		cfg     plane.AgentConfig
		verbose bool
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the host agent: follow this host's goal states and make libvirt match them",
		Long: `loom agent runs on every host. It renews the host's liveness, follows
loom.goal.<host>.>, drives libvirtd to each VM's goal and reports what it
observed on loom.obs.<host>.>. It connects to the control plane's NATS (--nats)
and never creates or changes streams.

It signs every observation with the host's key: by default the seed of its
NATS identity (agent-HOST.nk, from --creds), one key for both jobs; or
--host-key FILE (made on first start, its public half logged and written to
FILE.pub). Register the host with that public key (loom host register NAME
... --key U...), and the read models take from the host's subjects only what
this agent signed. With neither (an open bus, no --host-key) its reports are
unsigned.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := events.ValidateName("host", cfg.Host); err != nil {
				return events.Errorf(events.CodeInvalidArgument, "--host: %v", err)
			}
			log := newLogger(verbose)
			access, err := client.accessFor(plane.AgentName(cfg.Host))
			if err != nil {
				return err
			}
			if cfg.HostKey == "" {
				// One key per host: its NATS identity signs its reports.
				cfg.HostKey = access.Creds
			}
			conn, err := plane.Join(client.url, "loom-agent-"+cfg.Host, access)
			if err != nil {
				return err
			}
			defer conn.Close()
			return plane.RunAgent(cmd.Context(), conn, cfg, log)
		},
	}
	cmd.Flags().StringVar(&cfg.Host, "host", "", "name of this host, as registered (required)")
	cmd.Flags().StringVar(&cfg.HostKey, "host-key", "", "the host's key (an nkey user seed): signs every observation; made, mode 0600 with FILE.pub beside it, if missing; a file others can read is refused (empty: the agent's NATS identity from --creds, or unsigned without one)")
	cmd.Flags().StringVar(&cfg.Socket, "libvirt-socket", libvirt.DefaultSocket, "libvirtd's read-write unix socket")
	cmd.Flags().StringVar(&cfg.URI, "libvirt", libvirt.DefaultURI, "libvirt driver URI, e.g. qemu:///system or test:///default")
	cmd.Flags().BoolVar(&cfg.Simulated, "simulated", false, "the host is libvirt's test driver: hold a connection open so its state survives reconnects, and remove its built-in domain")
	cmd.Flags().DurationVar(&cfg.TTL, "ttl", 10*time.Second, "liveness TTL of each renewal")
	cmd.Flags().DurationVar(&cfg.FenceMargin, "fence-margin", 0, "m_a: the agent starts and resumes nothing once TTL minus this has passed since its last acknowledged renewal was sent (default TTL/5)")
	cmd.Flags().DurationVar(&cfg.StopGrace, "stop-grace", 30*time.Second, "how long a guest has to power off before it is destroyed")
	cmd.Flags().StringVar(&cfg.HTTPAddr, "http", "", "HTTP address for /metrics (empty: none)")
	cmd.Flags().StringVar(&cfg.StorageDir, "storage", "", "directory for the VMs' disks (qcow2 overlays on their images) and serial logs; empty: no disks (simulated hosts)")
	cmd.Flags().StringVar(&cfg.MigrateURI, "migrate-uri", "", "this host's libvirtd as other hosts' daemons dial it for a live migration (e.g. qemu+tls://node-7/system); empty: this host receives no migration")
	cmd.Flags().StringVar(&cfg.MigrateListen, "migrate-listen", "", "where this host's QEMU listens for a migration's memory and disk: unix:DIR or tcp:ADDRESS (empty: libvirt's default, TCP to the host's name)")
	cmd.Flags().StringVar(&cfg.TunnelEndpoint, "tunnel-endpoint", "", "this host's address on the underlay, where other hosts send its VMs' VXLAN traffic")
	cmd.Flags().StringVar(&cfg.AliveMarker, "alive-marker", "", "what a guest prints on its serial console once it is up; progress is reported until it shows")
	cmd.Flags().StringVar(&cfg.FenceSocket, "fence-socket", "", "unixgram socket of this host's `loom fence`, told every fencing deadline (empty: no fencer)")
	cmd.Flags().StringVar((*string)(&cfg.FencePolicy), "fence-policy", string(agents.FencePause), "what the deadline does to a running domain holding an exclusive lease: pause or destroy")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "debug logging")
	// Fault injection and protections off, for the safety tests only.
	cmd.Flags().DurationVar(&cfg.ClockOffset, "test-clock-offset", 0, "shift the agent's wall clock (tests only)")
	cmd.Flags().Float64Var(&cfg.ClockRate, "test-clock-rate", 1, "scale the spans the agent measures; above 1 models a slow clock (tests only)")
	cmd.Flags().BoolVar(&cfg.Unsafe.NoFence, "unsafe-no-fence", false, "switch fencing off (tests only: shows what it guards)")
	cmd.Flags().BoolVar(&cfg.Unsafe.NoLeaseCheck, "unsafe-no-lease-check", false, "switch the lease check off (tests only)")
	for _, name := range []string{"test-clock-offset", "test-clock-rate", "unsafe-no-fence", "unsafe-no-lease-check"} {
		_ = cmd.Flags().MarkHidden(name)
	}
	_ = cmd.MarkFlagRequired("host")
	return cmd
}

func newFenceCommand() *cobra.Command {
	var (
		cfg     plane.FencerConfig
		verbose bool
	)
	cmd := &cobra.Command{
		Use:   "fence",
		Short: "Run the fencing companion of a host agent",
		Long: `loom fence runs beside loom agent on every host, with its own connection to
libvirtd. The agent sends it the fencing deadline after every acknowledged
liveness renewal; if a deadline passes with no newer one (the agent frozen,
crashed or cut off from NATS), the fencer pauses (or destroys) every running
domain, before the control plane could consider their leases expired. It
never resumes anything: the agent does, under grants still current.

If both the agent and the fencer freeze, nothing fences the host; only a
hardware watchdog covers that.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := events.ValidateName("host", cfg.Host); err != nil {
				return events.Errorf(events.CodeInvalidArgument, "--host: %v", err)
			}
			if !cfg.Policy.Valid() {
				return events.Errorf(events.CodeInvalidArgument, "--policy %q: want pause or destroy", cfg.Policy)
			}
			return plane.RunFencer(cmd.Context(), cfg, newLogger(verbose))
		},
	}
	cmd.Flags().StringVar(&cfg.Host, "host", "", "name of this host, as its agent knows it (required)")
	cmd.Flags().StringVar(&cfg.Listen, "socket", "/run/loom/fence.sock", "unixgram socket to hear the agent's deadlines on (the agent's --fence-socket)")
	cmd.Flags().StringVar(&cfg.Socket, "libvirt-socket", libvirt.DefaultSocket, "libvirtd's read-write unix socket")
	cmd.Flags().StringVar(&cfg.URI, "libvirt", libvirt.DefaultURI, "libvirt driver URI")
	cmd.Flags().StringVar((*string)(&cfg.Policy), "policy", string(agents.FencePause), "pause or destroy")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "debug logging")
	_ = cmd.MarkFlagRequired("host")
	return cmd
}
