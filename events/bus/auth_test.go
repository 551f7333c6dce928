package bus_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// party is one identity's connection, and the permission errors the
// server sent it.
type party struct {
	nc *nats.Conn
	js jetstream.JetStream

	mu       sync.Mutex
	refusals []string
}

func (p *party) refused(subject string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.refusals {
		if strings.Contains(r, `"`+subject) { // the subject, or one it begins
			return true
		}
	}
	return false
}

// authBus starts a server whose users are ids (keys[i] signs for ids[i]),
// creates Loom's streams as the admin, and connects every identity.
func authBus(t *testing.T, ids []bus.Identity, keys []nkeys.KeyPair) (string, []*party) {
	t.Helper()
	ctx := t.Context()
	srv, err := bus.StartServer(ctx, bus.ServerConfig{DataDir: t.TempDir(), Port: -1, Identities: ids})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	parties := make([]*party, len(ids))
	for i, id := range ids {
		parties[i] = connectAs(t, srv.ClientURL(), keys[i], id.Name())
	}
	if err := bus.EnsureStreams(ctx, parties[0].js, bus.StreamsConfig{}); err != nil {
		t.Fatalf("the admin (%s) cannot create the streams: %v", ids[0].Role, err)
	}
	// A goal of h2's to steal, and a command service to send commands to.
	if _, err := parties[0].js.Publish(ctx, events.GoalSubject("h2", "web"), []byte("goal")); err != nil {
		t.Fatal(err)
	}
	sub, err := parties[1].nc.Subscribe("loom.cmd.vm.create", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := parties[1].nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return srv.ClientURL(), parties
}

func connectAs(t *testing.T, url string, kp nkeys.KeyPair, name string) *party {
	t.Helper()
	p := &party{}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	p.nc, err = nats.Connect(url, nats.Nkey(pub, kp.Sign), nats.CustomInboxPrefix(bus.InboxPrefix(name)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.refusals = append(p.refusals, err.Error())
		}))
	if err != nil {
		t.Fatalf("connect as %s: %v", name, err)
	}
	t.Cleanup(p.nc.Close)
	if p.js, err = jetstream.New(p.nc); err != nil {
		t.Fatal(err)
	}
	return p
}

func newUser(t *testing.T) nkeys.KeyPair {
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

func identities(t *testing.T, unsafe bool) ([]bus.Identity, []nkeys.KeyPair) {
	roles := []struct {
		role bus.Role
		host string
	}{{bus.RoleAdmin, ""}, {bus.RolePlane, ""}, {bus.RoleAgent, "h1"}, {bus.RoleAgent, "h2"}, {bus.RoleClient, ""}, {bus.RoleAuditor, ""}}
	ids := make([]bus.Identity, len(roles))
	keys := make([]nkeys.KeyPair, len(roles))
	for i, r := range roles {
		keys[i] = newUser(t)
		pub, _ := keys[i].PublicKey()
		ids[i] = bus.Identity{Role: r.role, Host: r.host, Key: pub}
		if unsafe && i > 0 {
			// Everyone an admin: what the bus is without permissions.
			ids[i] = bus.Identity{Role: bus.RoleAdmin, Key: pub}
		}
	}
	return ids, keys
}

// attack is one thing an identity must not be able to do.
type attack struct {
	name string
	// by indexes the parties: 1 plane, 2 agent h1, 3 agent h2, 4 client,
	// 5 auditor.
	by int
	do func(ctx context.Context, p *party) error
	// subject is the subject the server must name in its refusal; empty
	// for a refusal that comes as an API error.
	subject string
}

func publish(subject string) func(context.Context, *party) error {
	return func(ctx context.Context, p *party) error {
		_, err := p.js.Publish(ctx, subject, []byte("x"))
		return err
	}
}

func streamAdmin(op string) func(context.Context, *party) error {
	return func(ctx context.Context, p *party) error {
		switch op {
		case "delete":
			return p.js.DeleteStream(ctx, events.StreamEvents)
		case "purge":
			s, err := p.js.Stream(ctx, events.StreamEvents)
			if err != nil {
				return err
			}
			return s.Purge(ctx)
		}
		_, err := p.js.UpdateStream(ctx, jetstream.StreamConfig{Name: events.StreamEvents, Subjects: []string{"loom.evt.>", "loom.obs.>"}, MaxAge: time.Hour})
		return err
	}
}

func attacks() []attack {
	consumeGoals := func(host string) func(context.Context, *party) error {
		return func(ctx context.Context, p *party) error {
			_, err := bus.LastPerSubject(ctx, p.js, events.StreamGoals, events.HostGoals(host))
			return err
		}
	}
	subscribe := func(subject string) func(context.Context, *party) error {
		return func(ctx context.Context, p *party) error {
			sub, err := p.nc.SubscribeSync(subject)
			if err != nil {
				return err
			}
			defer func() { _ = sub.Unsubscribe() }()
			return p.nc.FlushWithContext(ctx)
		}
	}
	return []attack{
		{"an agent publishes as another host", 2, publish("loom.obs.h2.vm.web"), "loom.obs.h2.vm.web"},
		{"an agent renews another host's liveness", 2, publish("loom.live.h2"), "loom.live.h2"},
		{"an agent appends a decision", 2, publish("loom.evt.vm.web"), "loom.evt.vm.web"},
		{"an agent reads another host's goals", 2, consumeGoals("h2"), "$JS.API.CONSUMER.CREATE.LOOM_GOALS"},
		{"an agent reads every goal", 2, consumeGoals("*"), "$JS.API.CONSUMER.CREATE.LOOM_GOALS"},
		{"an agent gets a goal by subject", 2, func(ctx context.Context, p *party) error {
			_, err := bus.LastOnSubject(ctx, p.nc, events.StreamGoals, events.GoalSubject("h2", "web"))
			return err
		}, "$JS.API.STREAM.MSG.GET.LOOM_GOALS"},
		{"a client appends an event", 4, publish("loom.evt.vm.web"), "loom.evt.vm.web"},
		{"a client publishes an observation", 4, publish("loom.obs.h1.vm.web"), "loom.obs.h1.vm.web"},
		{"a client reads the stream", 4, func(ctx context.Context, p *party) error {
			_, err := bus.LastOnSubject(ctx, p.nc, events.StreamEvents, "loom.evt.>")
			return err
		}, "$JS.API.STREAM.MSG.GET.LOOM_EVENTS"},
		{"a client deletes the stream", 4, streamAdmin("delete"), "$JS.API.STREAM.DELETE.LOOM_EVENTS"},
		{"an auditor sends a command", 5, func(ctx context.Context, p *party) error {
			_, err := p.nc.RequestWithContext(ctx, "loom.cmd.vm.create", []byte("{}"))
			return err
		}, "loom.cmd.vm.create"},
		{"an auditor appends an event", 5, publish("loom.evt.vm.web"), "loom.evt.vm.web"},
		{"the control plane deletes the stream", 1, streamAdmin("delete"), "$JS.API.STREAM.DELETE.LOOM_EVENTS"},
		{"the control plane purges the stream", 1, streamAdmin("purge"), "$JS.API.STREAM.PURGE.LOOM_EVENTS"},
		{"the control plane gives the stream an age limit", 1, streamAdmin("update"), "$JS.API.STREAM.UPDATE.LOOM_EVENTS"},
		{"an agent purges the stream", 2, streamAdmin("purge"), "$JS.API.STREAM.PURGE.LOOM_EVENTS"},
		{"an auditor deletes the stream", 5, streamAdmin("delete"), "$JS.API.STREAM.DELETE.LOOM_EVENTS"},
		{"a client reads the control plane's replies", 4, subscribe(bus.InboxPrefix("plane") + ".>"), bus.InboxPrefix("plane") + ".>"},
		{"an agent reads every inbox", 2, subscribe("_INBOX.>"), "_INBOX.>"},
		{"an auditor listens to commands", 5, subscribe("loom.cmd.>"), "loom.cmd.>"},
	}
}

// TestPermissions_AttacksFail tries what no role may do, on a real server
// with each role's permissions: each attempt fails, and the server's
// refusal names the subject. With every identity an admin (no
// permissions), the same attempts succeed: the test sees what it guards.
func TestPermissions_AttacksFail(t *testing.T) {
	for _, unsafe := range []bool{false, true} {
		name := "least privilege"
		if unsafe {
			name = "everyone an admin"
		}
		t.Run(name, func(t *testing.T) {
			ids, keys := identities(t, unsafe)
			_, parties := authBus(t, ids, keys)
			for _, a := range attacks() {
				if unsafe && strings.Contains(a.name, "stream") && !strings.Contains(a.name, "reads") {
					continue // an admin's stream change would spoil the next attempts
				}
				p := parties[a.by]
				ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
				err := a.do(ctx, p)
				cancel()
				if unsafe {
					if err != nil || p.refused(a.subject) {
						t.Errorf("%s: fails even without permissions (%v): the attack tests nothing", a.name, err)
					}
					continue
				}
				// The server's refusal comes asynchronously; a refused
				// request may also just go unanswered.
				if !waitRefused(p, a.subject) {
					t.Errorf("%s: no refusal naming %s (the attempt returned %v)", a.name, a.subject, err)
				}
			}
		})
	}
}

func waitRefused(p *party, subject string) bool {
	deadline := time.Now().Add(2 * time.Second)
	for !p.refused(subject) {
		if time.Now().After(deadline) {
			return false
		}
		if err := p.nc.Flush(); err != nil {
			return false
		}
	}
	return true
}

// TestPermissions_EachRoleDoesItsJob is the legitimate path of each role
// under the same permissions.
func TestPermissions_EachRoleDoesItsJob(t *testing.T) {
	ids, keys := identities(t, false)
	_, parties := authBus(t, ids, keys)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	plane, agent, client, auditor := parties[1], parties[2], parties[4], parties[5]

	// The control plane appends a decision and a goal, serves a command.
	env, data := seal(t, "web", 0, nil)
	if _, err := bus.Append(ctx, plane.js, events.EventSubject(events.KindVM, "web"), &env, data, 0, ""); err != nil {
		t.Fatalf("plane appends: %v", err)
	}
	if _, err := plane.js.Publish(ctx, events.GoalSubject("h1", "web"), []byte("goal")); err != nil {
		t.Fatalf("plane publishes a goal: %v", err)
	}
	goalStream, err := plane.js.Stream(ctx, events.StreamGoals)
	if err != nil {
		t.Fatal(err)
	}
	if err := goalStream.Purge(ctx, jetstream.WithPurgeSubject(events.GoalSubject("h2", "web"))); err != nil {
		t.Fatalf("plane trims a goal subject: %v", err)
	}
	sub, err := plane.nc.Subscribe("loom.cmd.vm.get", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) })
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := plane.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// A client sends it a command and gets the reply in its own inbox.
	if reply, err := client.nc.RequestWithContext(ctx, "loom.cmd.vm.get", nil); err != nil || string(reply.Data) != "ok" {
		t.Fatalf("client command: %v %v", reply, err)
	}
	// The agent reads its own goals, renews, reports, reads a lease.
	goals, err := bus.LastPerSubject(ctx, agent.js, events.StreamGoals, events.HostGoals("h1"))
	if err != nil || len(goals) != 1 {
		t.Fatalf("agent reads its goals: %v %v", goals, err)
	}
	if _, err := agent.js.Publish(ctx, events.LivenessSubject("h1"), []byte("renewal")); err != nil {
		t.Fatalf("agent renews: %v", err)
	}
	if _, err := agent.js.Publish(ctx, events.ObservationSubject("h1", events.KindVM, "web"), []byte("obs")); err != nil {
		t.Fatalf("agent reports: %v", err)
	}
	if _, err := bus.LastOnSubject(ctx, agent.nc, events.StreamEvents, events.EventSubject(events.KindVM, "web")); err != nil {
		t.Fatalf("agent reads an event through the leader: %v", err)
	}
	// The auditor reads the whole stream.
	msgs, err := bus.LastPerSubject(ctx, auditor.js, events.StreamEvents, ">")
	if err != nil || len(msgs) != 2 {
		t.Fatalf("auditor reads the stream: %d messages, %v", len(msgs), err)
	}
	for i, p := range parties {
		if len(p.refusals) != 0 {
			t.Errorf("%s was refused: %v", ids[i].Name(), p.refusals)
		}
	}
}

func TestStartServer_RefusesUnknownAndMissingKeys(t *testing.T) {
	ids, keys := identities(t, false)
	url, _ := authBus(t, ids, keys)
	if _, err := nats.Connect(url); !errors.Is(err, nats.ErrAuthorization) {
		t.Errorf("unauthenticated: %v, want an authorization error", err)
	}
	stranger := newUser(t)
	pub, _ := stranger.PublicKey()
	if _, err := nats.Connect(url, nats.Nkey(pub, stranger.Sign)); !errors.Is(err, nats.ErrAuthorization) {
		t.Errorf("unknown key: %v, want an authorization error", err)
	}
	bad := []bus.Identity{{Role: "root", Key: ids[0].Key}}
	if _, err := bus.StartServer(t.Context(), bus.ServerConfig{DataDir: t.TempDir(), Port: -1, Identities: bad}); err == nil {
		t.Error("a server with an unknown role started")
	}
}
