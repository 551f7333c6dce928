package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// What every part of loom bench sets up: a fresh embedded server (in
// process, or on a free port), the control plane on one, and fixtures
// registered through the commands.

// inProcessBus starts an embedded server that listens on no port, connects
// to it in-process and creates Loom's streams. stop undoes it all.
func inProcessBus(ctx context.Context, scfg bus.ServerConfig) (js jetstream.JetStream, stop func(), err error) {
	scfg.NoListen = true
	srv, err := bus.StartServer(ctx, scfg)
	if err != nil {
		return nil, nil, err
	}
	nc, err := nats.Connect("", nats.InProcessServer(srv))
	if err != nil {
		srv.Stop()
		return nil, nil, err
	}
	stop = func() { nc.Close(); srv.Stop() }
	if js, err = jetstream.New(nc); err == nil {
		err = bus.EnsureStreams(ctx, js, bus.StreamsConfig{})
	}
	if err != nil {
		stop()
		return nil, nil, err
	}
	return js, stop, nil
}

// benchServerConfig is the embedded server of one bench part, with the
// durability of --sync, on a free port.
func benchServerConfig(cfg benchConfig, dir string) (bus.ServerConfig, error) {
	return plane.NATSConfig{Listen: "127.0.0.1:0", Sync: cfg.sync}.ServerConfig(dir)
}

// startBenchBus starts a fresh embedded server with cfg's durability and
// creates Loom's streams.
func startBenchBus(ctx context.Context, cfg benchConfig, dir string) (*bus.Server, error) {
	scfg, err := benchServerConfig(cfg, dir)
	if err != nil {
		return nil, err
	}
	srv, err := bus.StartServer(ctx, scfg)
	if err != nil {
		return nil, err
	}
	setup, err := nats.Connect(srv.ClientURL())
	if err == nil {
		var js jetstream.JetStream
		if js, err = jetstream.New(setup); err == nil {
			err = bus.EnsureStreams(ctx, js, bus.StreamsConfig{})
		}
		setup.Close()
	}
	if err != nil {
		srv.Stop()
		return nil, err
	}
	return srv, nil
}

// startBenchPlane starts a fresh embedded server with cfg's durability and
// the control plane on it; stop stops both. secure locks the bus down as
// loom up does; access is then how a client gets in.
func startBenchPlane(ctx context.Context, cfg benchConfig, dir string, log *slog.Logger, secure bool) (conn *plane.Connection, stop func(), access plane.Access, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, access, err
	}
	natsCfg := plane.NATSConfig{Listen: "127.0.0.1:0", Sync: cfg.sync, Replicas: 1}
	credsDir := ""
	if secure {
		if credsDir, err = plane.SecureEmbedded(&natsCfg, dir, nil, log); err != nil {
			return nil, nil, access, err
		}
		access = plane.AccessIn(credsDir, string(bus.RoleClient))
	}
	conn, err = plane.Connect(ctx, natsCfg, dir, "loom-bench", log)
	if err != nil {
		return nil, nil, access, err
	}
	planeCtx, stopPlane := context.WithCancel(ctx)
	planeDone := make(chan error, 1)
	go func() {
		planeDone <- plane.RunControlPlane(planeCtx, conn, plane.ControlPlaneConfig{DataDir: dir, CredsDir: credsDir, Attested: secure}, log)
	}()
	return conn, func() { stopPlane(); <-planeDone; conn.Close() }, access, nil
}

// registerBench registers hosts of the largest size and raw images,
// through the commands, retrying while the control plane starts.
func registerBench(ctx context.Context, nc *nats.Conn, hosts, images []string) error {
	admin := &client{flags: &clientFlags{actor: "bench", timeout: 10 * time.Second}, nc: nc}
	send := func(kind events.Kind, body any) error {
		return retryUnavailable(ctx, func() error {
			_, err := admin.command(ctx, kind, events.VerbRegister, body)
			return err
		})
	}
	for _, name := range hosts {
		reg := events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: "bench-host-" + name},
			Name: name, CPU: events.MaxCPU, MemoryMiB: events.MaxMemoryMiB}
		if err := send(events.KindHost, &reg); err != nil {
			return fmt.Errorf("register host %s: %w", name, err)
		}
	}
	for _, name := range images {
		img := events.RegisterImage{CommandMeta: events.CommandMeta{CommandID: "bench-image-" + name}, Name: name, Format: "raw"}
		if err := send(events.KindImage, &img); err != nil {
			return fmt.Errorf("register image %s: %w", name, err)
		}
	}
	return nil
}
