package libvirt

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// Client is one connection to one libvirtd driver. It is safe for concurrent
// use. It does not reconnect: when Disconnected closes, Close it and Dial again.
type Client struct {
	cfg        Config
	domainType string // <domain type=...> for this driver
	rpc        *golibvirt.Libvirt
	conn       *trackedDialer
	gone       <-chan struct{} // closed when the socket to libvirtd is gone

	// lifetime ends when Close starts; it stops in-flight waits and event streams.
	lifetime context.Context
	stop     context.CancelFunc
	mu       sync.Mutex // guards closing; held while adding to inflight
	closing  bool
	// inflight counts goroutines running RPCs or event streams; Close waits for them.
	inflight  sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Dial connects to libvirtd at cfg.Socket and opens cfg.URI. It gives up after
// cfg.DialTimeout or when ctx ends, whichever comes first.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("dial libvirtd: %w", err)
	}
	typ, _ := domainType(cfg.URI) // validated above

	dialCtx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()
	conn := &trackedDialer{ctx: dialCtx, socket: cfg.Socket}
	rpc := golibvirt.NewWithDialer(conn)

	// ConnectToURI dials and then runs the connect-open RPCs, none of which
	// take a context; closing the socket is what unblocks them.
	done := make(chan error, 1)
	go func() { done <- rpc.ConnectToURI(golibvirt.ConnectURI(cfg.URI)) }()
	var err error
	select {
	case err = <-done:
	case <-dialCtx.Done():
		conn.abort()
		<-done
		err = dialCtx.Err()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
	}
	if err != nil {
		conn.abort()
		return nil, fmt.Errorf("dial libvirtd %s %s: %w", cfg.Socket, cfg.URI, err)
	}

	lifetime, stop := context.WithCancel(context.Background())
	return &Client{
		cfg:        cfg,
		domainType: typ,
		rpc:        rpc,
		conn:       conn,
		gone:       rpc.Disconnected(),
		lifetime:   lifetime,
		stop:       stop,
	}, nil
}

// Disconnected returns a channel that closes when the connection to libvirtd
// is lost, whether libvirtd went away or Close was called.
func (c *Client) Disconnected() <-chan struct{} {
	return c.gone
}

// Close ends event streams, closes the connection and waits for every
// goroutine the Client started. It is safe to call more than once.
func (c *Client) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

func (c *Client) close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.stop()
	// Disconnect sends a connect-close RPC, which blocks while libvirtd is
	// wedged; closing the socket underneath it unblocks everything.
	done := make(chan error, 1)
	go func() { done <- c.rpc.Disconnect() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(c.cfg.RPCTimeout):
		// libvirtd is wedged: close the socket under the RPC and ignore its
		// error. The connection is gone either way, which is all Close promises.
		c.conn.abort()
		<-done
	}
	c.conn.abort() // no-op after a clean Disconnect
	c.inflight.Wait()
	if err != nil {
		return fmt.Errorf("close libvirt connection: %w", err)
	}
	return nil
}

// goTracked runs f on a goroutine that Close waits for. It reports false,
// without running f, once Close has started.
func (c *Client) goTracked(f func()) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return false
	}
	c.inflight.Add(1)
	go func() {
		defer c.inflight.Done()
		f()
	}()
	return true
}

// trackedDialer dials libvirtd's unix socket and keeps the connection so the
// Client can force it closed; go-libvirt does not expose it.
type trackedDialer struct {
	ctx    context.Context // bounds the dial itself
	socket string

	mu      sync.Mutex // guards conn and aborted
	conn    net.Conn
	aborted bool
}

// Dial implements go-libvirt's socket.Dialer.
func (d *trackedDialer) Dial() (net.Conn, error) {
	var dialer net.Dialer
	conn, err := dialer.DialContext(d.ctx, "unix", d.socket)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.aborted {
		_ = conn.Close() // aborted while dialing: the caller gets ErrClosed either way
		return nil, net.ErrClosed
	}
	d.conn = conn
	return conn, nil
}

// abort closes the connection, now or as soon as it is dialed.
func (d *trackedDialer) abort() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.aborted = true
	if d.conn != nil {
		_ = d.conn.Close() // unblocks any RPC stuck on a wedged daemon; nothing to do on error
	}
}
