package handlers

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// lockedBus is a server with authentication on: an admin (in Loom's
// account, where the service runs), the shared client identity and
// client-alice (both in the clients' account).
type lockedBus struct {
	admin, client, alice *nats.Conn
	// names are the identities' names by key.
	names map[string]string
}

func startLockedBus(t *testing.T) *lockedBus {
	t.Helper()
	ids := []bus.Identity{{Role: bus.RoleAdmin}, {Role: bus.RoleClient}, {Role: bus.RoleClient, Client: "alice"}}
	keys := make([]nkeys.KeyPair, len(ids))
	b := &lockedBus{names: map[string]string{}}
	for i := range ids {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = kp
		ids[i].Key, _ = kp.PublicKey()
		b.names[ids[i].Key] = ids[i].Name()
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	srv, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: t.TempDir(), Port: -1, Identities: ids})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	conns := make([]*nats.Conn, len(ids))
	for i, id := range ids {
		nc, err := nats.Connect(srv.ClientURL(), nats.Nkey(id.Key, keys[i].Sign), nats.CustomInboxPrefix(bus.InboxPrefix(id.Name())))
		if err != nil {
			t.Fatalf("connect as %s: %v", id.Name(), err)
		}
		t.Cleanup(nc.Close)
		conns[i] = nc
	}
	js, err := jetstream.New(conns[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.EnsureStreams(ctx, js, bus.StreamsConfig{}); err != nil {
		t.Fatal(err)
	}
	b.admin, b.client, b.alice = conns[0], conns[1], conns[2]
	return b
}

// actorOf is the actor recorded on the event a reply names first.
func actorOf(t *testing.T, nc *nats.Conn, reply events.Reply) string {
	t.Helper()
	if reply.Error != nil || len(reply.Events) == 0 {
		t.Fatalf("the command appended nothing: %+v", reply)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(t.Context(), events.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := stream.GetMsg(t.Context(), reply.Events[0].Seq)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := events.DecodeRecord(msg.Sequence, msg.Subject, msg.Time, msg.Data)
	if err != nil {
		t.Fatal(err)
	}
	return rec.Envelope.Actor
}

// forged is a host registration whose request claims, in both headers a
// client could fill, to come from someone else: Loom-Actor says "bob",
// and Nats-Request-Info says the shared client identity sent it.
func forged(t *testing.T, impersonated, commandID string) *nats.Msg {
	t.Helper()
	msg := nats.NewMsg(events.CommandSubject(events.KindHost, events.VerbRegister))
	var err error
	msg.Data, err = events.EncodeAs(events.FormatJSON, &events.RegisterHost{CommandMeta: events.CommandMeta{CommandID: commandID},
		Name: "h-" + commandID, CPU: 4, MemoryMiB: 4096})
	if err != nil {
		t.Fatal(err)
	}
	msg.Header.Set(events.HeaderActor, "bob")
	msg.Header.Set(server.ClientInfoHdr, `{"acc":"`+bus.ClientsAccount+`","user":"`+impersonated+`"}`)
	return msg
}

func send(t *testing.T, nc *nats.Conn, msg *nats.Msg) events.Reply {
	t.Helper()
	resp, err := nc.RequestMsg(msg, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var reply events.Reply
	if err := events.DecodeStrict(events.FormatJSON, resp.Data, &reply); err != nil {
		t.Fatal(err)
	}
	return reply
}

// TestAttestedActors_RecordTheIdentityTheServerAttests: the actor on
// client-alice's events is client-alice, whatever her request claims, and
// a command from inside Loom's account is refused. With the sender's word
// taken instead (ClaimedActors, what an open bus does), the same request
// is recorded as the actor it claims: the test sees what it guards.
func TestAttestedActors_RecordTheIdentityTheServerAttests(t *testing.T) {
	for _, attested := range []bool{true, false} {
		name := map[bool]string{true: "attested", false: "claimed (unprotected)"}[attested]
		t.Run(name, func(t *testing.T) {
			b := startLockedBus(t)
			startReplicaOn(t, b.admin, func(s *Service) {
				if attested {
					s.cfg.Actors = AttestedActors{Name: func(key string) (string, bool) { n, ok := b.names[key]; return n, ok }}
				}
			})
			var shared string
			for k, n := range b.names {
				if n == string(bus.RoleClient) {
					shared = k
				}
			}
			got := actorOf(t, b.admin, send(t, b.alice, forged(t, shared, "c1")))
			if attested && got != "client-alice/bob" {
				t.Errorf("actor %q, want client-alice/bob: the identity the server attests, then her own word", got)
			}
			if !attested && got != "bob" {
				t.Errorf("without attestation, actor %q, want the claimed bob", got)
			}

			// From inside Loom's account (the admin's) nothing attests the
			// sender.
			plain := forged(t, shared, "c2")
			plain.Header.Del(server.ClientInfoHdr)
			reply := send(t, b.admin, plain)
			if attested {
				if reply.Error == nil || reply.Error.Code != events.CodeUnattestedCommand {
					t.Errorf("a command from Loom's account: %+v, want unattested_command", reply)
				}
			} else if reply.Error != nil {
				t.Errorf("without attestation, a command from Loom's account: %v", reply.Error)
			}
		})
	}
}
