package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/handlers"
)

// registerNATSFlags binds the flags that choose the NATS server.
func registerNATSFlags(cmd *cobra.Command, c *plane.NATSConfig) {
	cmd.Flags().StringVar(&c.URL, "nats-url", "", "use this NATS cluster instead of an embedded server")
	cmd.Flags().StringVar(&c.Listen, "listen", plane.DefaultListen, "embedded NATS: client listen address")
	cmd.Flags().StringVar(&c.Sync, "sync", "always", "embedded NATS: fsync every write before acking (always), or every DURATION (e.g. 2m: faster, but a machine crash may lose that much)")
	cmd.Flags().IntVar(&c.Replicas, "replicas", 1, "replicas of Loom's streams (3 or 5 on a cluster)")
}

// serveIdentity chooses how loom serve authenticates: with an embedded
// server, the credentials of its data directory (made if missing), or
// none with --insecure; with --nats-url, the control plane's seed from
// --creds (plane.nk in a directory). credsDir holds identities.json,
// which names the keys commands come from; an embedded server's is also
// watched for new identities.
func serveIdentity(cfg *plane.NATSConfig, client *clientFlags, dataDir string, insecure bool, log *slog.Logger) (credsDir string, err error) {
	switch {
	case insecure:
		plane.WarnInsecure(log)
		return "", nil
	case cfg.URL == "":
		return plane.SecureEmbedded(cfg, dataDir, nil, log)
	}
	access, err := client.accessFor(string(bus.RolePlane))
	if err != nil {
		return "", err
	}
	cfg.Creds, cfg.CA = access.Creds, access.CA
	return filepath.Dir(access.Creds), nil
}

// sealFlags choose how the control plane seals the history.
type sealFlags struct {
	key   string
	every time.Duration
}

func (f *sealFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.key, "seal-key", "", "the ed25519 key (PKCS #8 PEM, mode 0600) that signs the history's seals; made on first start if missing (default DATA-DIR/seal.key, public key beside it as seal.pub)")
	cmd.Flags().DurationVar(&f.every, "seal-every", handlers.DefaultSealEvery, "how often to seal the events appended since the last seal")
}

func newServeCommand(client *clientFlags) *cobra.Command {
	var (
		natsCfg  plane.NATSConfig
		dataDir  string
		httpAddr string
		verbose  bool
		seal     sealFlags
		insecure bool
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the control plane: commands, projections, queries, dispatcher, scheduler, metrics",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			log := newLogger(verbose)
			credsDir, err := serveIdentity(&natsCfg, client, dataDir, insecure, log)
			if err != nil {
				return err
			}
			conn, err := plane.Connect(cmd.Context(), natsCfg, dataDir, "loom-serve", log)
			if err != nil {
				return err
			}
			defer conn.Close()
			return plane.RunControlPlane(cmd.Context(), conn, plane.ControlPlaneConfig{DataDir: dataDir, HTTPAddr: httpAddr, CredsDir: credsDir,
				Attested: !insecure, SealKey: seal.key, SealEvery: seal.every}, log)
		},
	}
	seal.register(cmd)
	cmd.Flags().BoolVar(&insecure, "insecure", false, "run the embedded NATS without authentication: anyone who reaches the port may do anything (a throwaway setup only)")
	cmd.Flags().StringVar(&natsCfg.AdminCreds, "admin-creds", "", "with --nats-url: the admin identity's seed, to create or update Loom's streams (without it, serve only checks them and refuses to run on streams that differ)")
	registerNATSFlags(cmd, &natsCfg)
	cmd.Flags().StringVar(&natsCfg.ServerName, "server-name", "", "embedded NATS: this server's name, unique in its cluster (default: loom, or the machine's name with --cluster-listen)")
	cmd.Flags().StringVar(&natsCfg.ClusterListen, "cluster-listen", "", "embedded NATS: take routes from the cluster's other servers here (e.g. 0.0.0.0:6222); TLS both ways with the certificates of DATA-DIR/creds")
	cmd.Flags().StringVar(&natsCfg.ClusterName, "cluster-name", "loom", "embedded NATS: the cluster's name, the same on each of its servers")
	cmd.Flags().StringSliceVar(&natsCfg.Routes, "routes", nil, "embedded NATS: other servers' routes, nats-route://HOST:PORT, comma-separated")
	cmd.Flags().StringVar(&dataDir, "data-dir", defaultDataDir(), "where the embedded NATS and the read models keep their files")
	cmd.Flags().StringVar(&httpAddr, "http", "127.0.0.1:9464", "HTTP address for /metrics and /readyz (empty: none)")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "debug logging")
	return cmd
}

func defaultDataDir() string {
	if d := os.Getenv("LOOM_DATA"); d != "" {
		return d
	}
	return ".loom"
}

func newLogger(verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}
