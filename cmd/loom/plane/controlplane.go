package plane

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go/micro"
	"golang.org/x/sync/errgroup"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/audit"
	"github.com/loomctl/loom/events/bus"
	"github.com/loomctl/loom/handlers"
	"github.com/loomctl/loom/projections"
	"github.com/loomctl/loom/projections/dispatch"
)

// Version is Loom's version, reported by the micro service.
const Version = "0.1.0"

// ControlPlaneConfig configures the control plane.
type ControlPlaneConfig struct {
	// DataDir holds the read models, under DataDir/projections.
	DataDir string
	// HTTPAddr serves /metrics and /readyz; empty serves none.
	HTTPAddr string
	// Ready, if set, is closed once the service answers requests.
	Ready chan<- struct{}
	// Unsafe switches protections off, for the tests that show what each
	// guards.
	Unsafe handlers.Unsafe
	// SealKey is the ed25519 key that signs the history's seals; empty
	// means DataDir/seal.key, made on first start with its public key
	// beside it (seal.pub), which is what auditors verify with.
	SealKey string
	// SealEvery is how often the history is sealed; zero means
	// handlers.DefaultSealEvery.
	SealEvery time.Duration
	// CredsDir holds identities.json. With an embedded server it is
	// watched: a change takes effect without a restart. With Attested, the
	// keys of the identities that send commands are named after it.
	CredsDir string
	// Attested, with authentication on, takes each command's actor from
	// the identity the server attests, and refuses a command it attests
	// none for; without it, actors are the senders' own word (--insecure).
	Attested bool
}

// RunControlPlane runs every part of `loom serve` until ctx ends.
func RunControlPlane(ctx context.Context, conn *Connection, cfg ControlPlaneConfig, log *slog.Logger) error {
	dataDir, httpAddr := cfg.DataDir, cfg.HTTPAddr
	var dispatcher *dispatch.Dispatcher
	store, err := projections.Open(filepath.Join(dataDir, "projections"), projections.Options{
		Logger:   log.With("component", "projections"),
		OnCommit: func(_ uint64, vms []string) { dispatcher.Notify(vms) },
	})
	if err != nil {
		return err
	}
	defer func() {
		if err := store.Close(); err != nil {
			log.Error("close read models", "err", err)
		}
	}()
	reader := readModel{store}
	dispatcher = dispatch.New(dispatch.Config{Conn: conn.Conn, JS: conn.JS, Reader: reader, Logger: log})
	var actors handlers.Actors = handlers.ClaimedActors{}
	if cfg.Attested {
		actors = AttestedActors(cfg.CredsDir)
	}
	commands, err := handlers.New(handlers.Config{JS: conn.JS, Conn: conn.Conn, Reader: reader, Now: time.Now,
		Logger: log.With("component", "handlers"), Unsafe: cfg.Unsafe, Actors: actors})
	if err != nil {
		return err
	}
	svc, err := micro.AddService(conn.Conn, micro.Config{
		Name: "loom", Version: Version, QueueGroup: "loom",
		Description: "Loom's commands (loom.cmd.>) and queries (loom.q.>)",
	})
	if err != nil {
		return fmt.Errorf("micro service: %w", err)
	}
	defer func() {
		// Stop taking requests first, then let those in flight finish: a
		// create cut short here is completed by the scheduler next start.
		_ = svc.Stop()
		closing, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := commands.Close(closing); err != nil {
			log.Warn("handlers did not finish in time", "err", err)
		}
	}()
	if err := commands.AddEndpoints(svc); err != nil {
		return err
	}
	if err := store.AddQueryEndpoints(svc); err != nil {
		return err
	}

	sealer, err := newSealer(conn, cfg, log)
	if err != nil {
		return err
	}

	registry := newRegistry(append(store.Collectors(), commands.Collectors()...)...)

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return store.Run(ctx, conn.JS) })
	g.Go(func() error { return dispatcher.Run(ctx) })
	g.Go(func() error { return commands.RunScheduler(ctx) })
	g.Go(func() error { return commands.RunDetector(ctx) })
	g.Go(func() error { return sealer.Run(ctx) })
	if conn.Server != nil && cfg.CredsDir != "" {
		g.Go(func() error { return WatchIdentities(ctx, cfg.CredsDir, conn.Server, log) })
	}
	if httpAddr != "" {
		mux := metricsMux(registry)
		mux.Handle("/readyz", readyHandler(conn, store))
		g.Go(func() error { return serveHTTP(ctx, httpAddr, mux, log) })
	}
	if cfg.Ready != nil {
		close(cfg.Ready)
	}
	log.Info("control plane running", "nats", conn.URL, "http", httpAddr, "data", dataDir)
	err = g.Wait()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// newSealer loads the seal key, making it on first start.
func newSealer(conn *Connection, cfg ControlPlaneConfig, log *slog.Logger) (*handlers.Sealer, error) {
	path := cfg.SealKey
	if path == "" {
		path = filepath.Join(cfg.DataDir, "seal.key")
	}
	key, created, err := audit.EnsureKey(path)
	if err != nil {
		return nil, fmt.Errorf("seal key: %w", err)
	}
	if created {
		log.Info("made the key that seals the history: give auditors its public key", "key", path,
			"public", audit.PublicPath(path), "id", audit.KeyID(key.Public().(ed25519.PublicKey)))
	}
	return handlers.NewSealer(handlers.SealerConfig{JS: conn.JS, Conn: conn.Conn, Key: key, Every: cfg.SealEvery,
		Logger: log})
}

// readyHandler answers /readyz: ready means connected to NATS and the read
// models caught up with the stream as it was a moment ago.
func readyHandler(conn *Connection, store *projections.Store) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !conn.Conn.IsConnected() {
			http.Error(w, "not connected to NATS", http.StatusServiceUnavailable)
			return
		}
		rctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		last, err := bus.LastSeq(rctx, conn.JS, events.StreamEvents)
		if err != nil {
			http.Error(w, "stream: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		if err := store.WaitFor(rctx, last); err != nil {
			http.Error(w, fmt.Sprintf("read models at %d, stream at %d", store.Applied(), last), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintf(w, "ready: read models at %d\n", store.Applied())
	}
}

// readModel adapts the projections store to what the handlers and the
// dispatcher declare they need.
type readModel struct{ *projections.Store }

func (r readModel) AllVMs(ctx context.Context) ([]events.VMState, error) {
	return r.VMs(ctx, projections.VMFilter{IncludeGone: true})
}

func (r readModel) AllLeases(ctx context.Context) ([]events.LeaseGrant, error) {
	return r.Leases(ctx, projections.LeaseFilter{})
}

func (r readModel) Hosts(ctx context.Context) ([]events.HostState, error) {
	rows, err := r.Store.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	hosts := make([]events.HostState, len(rows))
	for i, row := range rows {
		hosts[i] = row.State
	}
	return hosts, nil
}
