package bus_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// TestStartServer_AdoptsTheStreamsOfADataDirWithoutAccounts: a data
// directory written by a server without accounts (Loom before them) keeps
// its streams and their messages.
func TestStartServer_AdoptsTheStreamsOfADataDirWithoutAccounts(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()

	old, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: dir, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go old.Start()
	if !old.ReadyForConnections(10 * time.Second) {
		t.Fatal("old server not ready")
	}
	nc, err := nats.Connect(old.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	if err := bus.EnsureStreams(ctx, js, bus.StreamsConfig{}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := js.Publish(ctx, events.EventSubject(events.KindVM, "web"), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	nc.Close()
	old.Shutdown()
	old.WaitForShutdown()

	for range 2 { // adopted once, then found where it was put
		srv, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: dir, Port: -1})
		if err != nil {
			t.Fatal(err)
		}
		nc, err := nats.Connect(srv.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		js, _ := jetstream.New(nc)
		s, err := js.Stream(ctx, events.StreamEvents)
		if err != nil {
			t.Fatalf("the stream of the old data dir: %v", err)
		}
		if n := s.CachedInfo().State.Msgs; n != 3 {
			t.Errorf("%d messages, want 3", n)
		}
		nc.Close()
		srv.Stop()
	}
}

// TestStartServer_OpenBusTakesAnyone: without identities (--insecure) a
// connection is let into Loom's account whatever it brings, credentials
// included, and may use JetStream.
func TestStartServer_OpenBusTakesAnyone(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	srv, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	kp := newUser(t)
	pub, _ := kp.PublicKey()
	for name, opts := range map[string][]nats.Option{"nothing": nil, "an nkey": {nats.Nkey(pub, kp.Sign)}} {
		nc, err := nats.Connect(srv.ClientURL(), opts...)
		if err != nil {
			t.Fatalf("with %s: %v", name, err)
		}
		js, _ := jetstream.New(nc)
		if err := bus.EnsureStreams(ctx, js, bus.StreamsConfig{}); err != nil {
			t.Errorf("with %s: %v", name, err)
		}
		nc.Close()
	}
}

// TestRequesterOf_TheServerSaysWhoCrossedTheImport: a client's request
// reaches Loom's account stamped with the client's key, over whatever the
// client wrote in that header itself; a request from within Loom's account
// carries what its sender wrote, which is why only the admin may send one.
func TestRequesterOf_TheServerSaysWhoCrossedTheImport(t *testing.T) {
	ids, keys := identities(t, false)
	_, parties := authBus(t, ids, keys)
	admin, plane, client := parties[0], parties[1], parties[4]
	got := make(chan nats.Header, 1)
	sub, err := plane.nc.Subscribe("loom.q.vm.get", func(m *nats.Msg) {
		got <- m.Header
		_ = m.Respond(nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := plane.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	forged := func() *nats.Msg {
		msg := nats.NewMsg("loom.q.vm.get")
		msg.Header.Set(server.ClientInfoHdr, `{"acc":"`+bus.ClientsAccount+`","user":"`+ids[0].Key+`"}`)
		return msg
	}

	if _, err := client.nc.RequestMsg(forged(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	who, ok, err := bus.RequesterOf(<-got)
	if err != nil || !ok || who.Key != ids[4].Key || who.Account != bus.ClientsAccount {
		t.Errorf("a client's request: %+v %v %v, want the client's key %s", who, ok, err, ids[4].Key)
	}

	plain := forged()
	plain.Header.Del(server.ClientInfoHdr)
	if _, err := admin.nc.RequestMsg(plain, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if who, ok, err := bus.RequesterOf(<-got); ok || err != nil {
		t.Errorf("a request from Loom's account: %+v %v %v, want none", who, ok, err)
	}

	for _, bad := range []string{"{", `{"acc":"X"}`} {
		if _, _, err := bus.RequesterOf(nats.Header{server.ClientInfoHdr: {bad}}); err == nil {
			t.Errorf("header %q: no error", bad)
		}
	}
}
