package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/oklog/ulid/v2"
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
	"github.com/loomctl/loom/events/bus"
)

// defaultNATS is where a local `loom up` listens.
const defaultNATS = "nats://127.0.0.1:4222"

// clientFlags are the flags every client verb shares.
type clientFlags struct {
	url       string
	actor     string
	commandID string
	output    string
	timeout   time.Duration
	// creds is a seed file, or a directory of them (--creds).
	creds string
	// tlsCA is the CA certificate to trust (--tls-ca).
	tlsCA string
}

func (f *clientFlags) register(root *cobra.Command) {
	url := os.Getenv("LOOM_NATS")
	if url == "" {
		url = defaultNATS
	}
	root.PersistentFlags().StringVar(&f.url, "nats", url, "NATS server URL of the control plane (env LOOM_NATS)")
	root.PersistentFlags().StringVarP(&f.output, "output", "o", "table", "output format: table or json")
	root.PersistentFlags().DurationVar(&f.timeout, "timeout", 10*time.Second, "how long to wait for an answer")
	root.PersistentFlags().StringVar(&f.creds, "creds", os.Getenv("LOOM_CREDS"),
		"your identity's nkey seed file, or a directory of them (loom up's DATA-DIR/creds), from which a verb picks what it needs: client.nk, auditor.nk for events and audit, agent-HOST.nk for agent (env LOOM_CREDS; default DATA-DIR/creds if it exists)")
	root.PersistentFlags().StringVar(&f.tlsCA, "tls-ca", os.Getenv("LOOM_TLS_CA"), "the CA certificate (PEM) to trust for TLS to NATS (env LOOM_TLS_CA; default ca.pem beside the credentials)")
}

// accessFor is how the identity name gets in: its seed file (--creds if
// it is a file, name.nk in --creds if it is a directory, or in the default
// data directory's creds) and the CA to trust (--tls-ca, or ca.pem beside
// the seed); none of either where there is none (a server without auth or
// TLS).
func (f *clientFlags) accessFor(name string) (plane.Access, error) {
	a := plane.Access{CA: f.tlsCA}
	path := f.creds
	if path == "" && strings.Contains(f.url, "@") {
		return a, nil // the URL carries its own user
	}
	if path == "" {
		path = plane.CredsDir(defaultDataDir())
		if _, err := os.Stat(plane.CredsFile(path, name)); err != nil {
			return a, nil
		}
	}
	info, err := os.Stat(path)
	if err != nil {
		return a, events.Errorf(events.CodeInvalidArgument, "--creds: %v", err)
	}
	if info.IsDir() {
		path = plane.CredsFile(path, name)
		if _, err := os.Stat(path); err != nil {
			return a, events.Errorf(events.CodeInvalidArgument, "--creds: %s holds no credentials of %s", f.creds, name)
		}
	}
	a.Creds = path
	if ca := plane.CAFile(filepath.Dir(path)); a.CA == "" {
		if _, err := os.Stat(ca); err == nil {
			a.CA = ca
		}
	}
	return a, nil
}

// roleOf is the identity a verb acts as: reading the event stream is an
// auditor's right, the rest a client's.
func roleOf(cmd *cobra.Command) bus.Role {
	for c := cmd; c != nil; c = c.Parent() {
		if c.Name() == "events" || c.Name() == "audit" {
			return bus.RoleAuditor
		}
	}
	return bus.RoleClient
}

// registerCommandFlags binds the flags of verbs that send commands, on a
// group of them (host, image, vm). They are not global: events tail has a
// --actor of its own, a filter.
func (f *clientFlags) registerCommandFlags(group *cobra.Command) {
	group.PersistentFlags().StringVar(&f.actor, "actor", defaultActor(), "on whose behalf you ask, recorded on every event after the identity the server attests (client-NAME/ACTOR); empty: the identity alone")
	group.PersistentFlags().StringVar(&f.commandID, "command-id", "", "command id to send; reuse it to retry a command safely (default: a new ULID)")
}

func defaultActor() string {
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	host, _ := os.Hostname()
	return name + "@" + host
}

// client is a connection to the control plane.
type client struct {
	flags *clientFlags
	nc    *nats.Conn
}

// connect connects as role.
func (f *clientFlags) connect(role bus.Role) (*client, error) {
	if f.output != "table" && f.output != "json" {
		return nil, fmt.Errorf("--output %q: want table or json", f.output)
	}
	access, err := f.accessFor(string(role))
	if err != nil {
		return nil, err
	}
	who := "without credentials"
	if strings.Contains(f.url, "@") {
		who = "the user the URL names"
	}
	opts := []nats.Option{nats.Name("loom-cli"), nats.Timeout(3 * time.Second),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			// The server's refusals come asynchronously: say them.
			fmt.Fprintf(os.Stderr, "loom: the server refused %s: %v\n", who, err)
		})}
	if access.Creds != "" {
		who = "identity " + strings.TrimSuffix(filepath.Base(access.Creds), ".nk") + " (" + access.Creds + ")"
	}
	more, err := access.Options()
	if err != nil {
		return nil, err
	}
	opts = append(opts, more...)
	nc, err := nats.Connect(f.url, opts...)
	var unknownCA x509.UnknownAuthorityError
	if errors.As(err, &unknownCA) || (err != nil && strings.Contains(err.Error(), "x509")) {
		return nil, fmt.Errorf("connect to %s: %w (give --tls-ca: the CA that signed the server's certificate; loom up keeps it as DATA-DIR/creds/ca.pem)", f.url, err)
	}
	if errors.Is(err, nats.ErrAuthorization) && access.Creds == "" {
		return nil, fmt.Errorf("connect to %s %s: %w (give --creds: loom up keeps them in DATA-DIR/creds)", f.url, who, err)
	}
	if errors.Is(err, nats.ErrAuthorization) {
		return nil, fmt.Errorf("connect to %s %s: %w (the server does not know this identity's key: "+
			"loom init --data-dir DIR on the server's machine adds identities to its creds/identities.json, or these credentials are another Loom's)", f.url, who, err)
	}
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w (is `loom up` or `loom serve` running? set --nats or LOOM_NATS)", f.url, err)
	}
	return &client{flags: f, nc: nc}, nil
}

func (c *client) close() { c.nc.Close() }

// withClient makes the RunE of a verb that talks to the control plane: it
// connects, runs fn, and disconnects.
func (f *clientFlags) withClient(fn func(cmd *cobra.Command, args []string, c *client) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		c, err := f.connect(roleOf(cmd))
		if err != nil {
			return err
		}
		defer c.close()
		return fn(cmd, args, c)
	}
}

// newCommandID is the id of a command this invocation sends.
func (c *client) newCommandID() string {
	if c.flags.commandID != "" {
		return c.flags.commandID
	}
	return ulid.Make().String()
}

// command sends a command and returns its reply, or the reply's Fault.
func (c *client) command(ctx context.Context, kind events.Kind, verb string, body any) (*events.Reply, error) {
	data, err := events.Marshal(body)
	if err != nil {
		return nil, err
	}
	msg := nats.NewMsg(events.CommandSubject(kind, verb))
	msg.Data = data
	if c.flags.actor != "" {
		msg.Header.Set(events.HeaderActor, c.flags.actor)
	}
	ctx, cancel := context.WithTimeout(ctx, c.flags.timeout)
	defer cancel()
	resp, err := c.nc.RequestMsgWithContext(ctx, msg)
	if err != nil {
		return nil, requestError(msg.Subject, err)
	}
	var reply events.Reply
	if err := events.Unmarshal(resp.Data, &reply); err != nil {
		return nil, fmt.Errorf("%s: undecodable reply: %w", msg.Subject, err)
	}
	if reply.Error != nil {
		return nil, reply.Error
	}
	return &reply, nil
}

// query asks a read model.
func (c *client) query(ctx context.Context, kind events.Kind, verb string, q events.Query) (*events.QueryReply, error) {
	data, err := events.Marshal(q)
	if err != nil {
		return nil, err
	}
	subject := events.QuerySubject(kind, verb)
	ctx, cancel := context.WithTimeout(ctx, c.flags.timeout)
	defer cancel()
	resp, err := c.nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		return nil, requestError(subject, err)
	}
	var reply events.QueryReply
	if err := events.Unmarshal(resp.Data, &reply); err != nil {
		return nil, fmt.Errorf("%s: undecodable reply: %w", subject, err)
	}
	if reply.Error != nil {
		return nil, reply.Error
	}
	return &reply, nil
}

func requestError(subject string, err error) error {
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return events.Errorf(events.CodeUnavailable, "nobody serves %s: is the control plane (loom serve / loom up) running?", subject)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout):
		return events.Errorf(events.CodeTimeout, "%s: no answer in time (--timeout)", subject)
	}
	return fmt.Errorf("%s: %w", subject, err)
}

// retryUnavailable retries f while the control plane is still starting.
func retryUnavailable(ctx context.Context, f func() error) error {
	for {
		err := f()
		var fault *events.Fault
		if !errors.As(err, &fault) || fault.Code != events.CodeUnavailable {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// eventsStream looks up LOOM_EVENTS and how it stands now.
func (c *client) eventsStream(ctx context.Context) (jetstream.JetStream, jetstream.Stream, *jetstream.StreamInfo, error) {
	js, err := jetstream.New(c.nc)
	if err != nil {
		return nil, nil, nil, err
	}
	stream, err := js.Stream(ctx, events.StreamEvents)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("stream %s: %w", events.StreamEvents, err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("stream %s: %w", events.StreamEvents, err)
	}
	return js, stream, info, nil
}
