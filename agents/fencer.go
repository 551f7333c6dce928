package agents

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// FencerConfig configures the fencer of one host: `loom fence`, the small
// second process that fences the host's domains when the agent cannot.
type FencerConfig struct {
	// Host is the host fenced; messages for another host are ignored.
	Host string
	// Socket is the unixgram socket to listen on; the agent's
	// Config.FenceSocket names it.
	Socket string
	// Dial opens the fencer's own connection to libvirtd.
	Dial func(ctx context.Context) (Hypervisor, error)
	// Policy is what fencing does to a running domain; empty: FencePause.
	Policy FencePolicy
	// Logger receives the fencer's logs; nil discards them.
	Logger *slog.Logger
	// Clock reads CLOCK_BOOTTIME; nil means BootNanos.
	Clock func() int64
}

// Fencer fences a host's domains when the agent's fencing deadline passes
// with no newer deadline heard. It holds its own libvirt connection, so it
// works while the agent is frozen, crashed or cut off; it fences every
// running domain of its libvirtd, since each of Loom's VMs holds an
// exclusive lease on its disk. It never resumes anything: once renewals
// are acknowledged again the agent resumes what is still leased.
//
// If the agent and the fencer both freeze, nothing fences the host: only a
// hardware watchdog (one the agent pets, that resets the machine) covers
// that case. The control plane's margins assume one of them runs.
type Fencer struct {
	cfg FencerConfig
	log *slog.Logger

	mu       sync.Mutex
	deadline int64 // newest deadline heard (CLOCK_BOOTTIME); zero: none yet
	fencedAt int64 // deadline last fenced for
	heard    chan struct{}
	fenced   int // domains fenced, in all
}

// NewFencer makes a Fencer; Run starts it.
func NewFencer(cfg FencerConfig) (*Fencer, error) {
	switch {
	case cfg.Host == "":
		return nil, errors.New("fencer: no host")
	case cfg.Socket == "":
		return nil, errors.New("fencer: no socket")
	case cfg.Dial == nil:
		return nil, errors.New("fencer: no way to dial libvirtd")
	case cfg.Policy != "" && !cfg.Policy.Valid():
		return nil, fmt.Errorf("fencer: policy %q: want %s or %s", cfg.Policy, FencePause, FenceDestroy)
	}
	if cfg.Policy == "" {
		cfg.Policy = FencePause
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = BootNanos
	}
	return &Fencer{cfg: cfg, log: cfg.Logger.With("component", "fence", "host", cfg.Host), heard: make(chan struct{}, 1)}, nil
}

// Run listens for deadlines and fences at each one that passes with no
// newer one heard, until ctx ends. It removes a stale socket file first.
func (f *Fencer) Run(ctx context.Context) error {
	_ = os.Remove(f.cfg.Socket)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: f.cfg.Socket, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("listen on %s: %w", f.cfg.Socket, err)
	}
	defer func() {
		_ = conn.Close()
		_ = os.Remove(f.cfg.Socket)
	}()
	go func() {
		<-ctx.Done()
		_ = conn.Close()
	}()
	go f.listen(conn)
	f.log.Info("fencer listening", "socket", f.cfg.Socket, "policy", f.cfg.Policy)
	return f.watch(ctx)
}

// listen takes each agent message off the socket.
func (f *Fencer) listen(conn *net.UnixConn) {
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return // closed
		}
		var m FenceMessage
		if err := json.Unmarshal(buf[:n], &m); err != nil || m.Host != f.cfg.Host || m.Deadline <= 0 {
			f.log.Warn("ignored a message that is not this host's deadline", "bytes", n, "err", err, "message_host", m.Host)
			continue
		}
		f.hear(m.Deadline)
	}
}

// hear takes a deadline, keeping the newest.
func (f *Fencer) hear(deadline int64) {
	f.mu.Lock()
	if deadline > f.deadline {
		f.deadline = deadline
	}
	f.mu.Unlock()
	select {
	case f.heard <- struct{}{}:
	default:
	}
}

// watch waits for each deadline to pass and fences at it.
func (f *Fencer) watch(ctx context.Context) error {
	for {
		f.mu.Lock()
		d, done := f.deadline, f.fencedAt
		f.mu.Unlock()
		wait := time.Hour
		if d != 0 && d != done {
			wait = untilBoot(d, f.cfg.Clock)
		}
		if wait <= 0 {
			f.fence(ctx, d)
			continue
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-f.heard:
			t.Stop()
		case <-t.C:
		}
	}
}

// fence fences every running domain for deadline d, retrying until it
// has, a newer deadline is heard, or ctx ends.
func (f *Fencer) fence(ctx context.Context, d int64) {
	f.log.Warn("fencing deadline passed with no renewal heard since: fencing", "policy", f.cfg.Policy)
	for attempt := 1; ; attempt++ {
		err := f.fenceOnce(ctx)
		if err == nil {
			f.mu.Lock()
			f.fencedAt = d
			f.mu.Unlock()
			return
		}
		f.log.Error("fence; retrying", "err", err, "attempt", attempt)
		f.mu.Lock()
		newer := f.deadline != d
		f.mu.Unlock()
		if newer || !sleepCtx(ctx, min(time.Duration(attempt)*50*time.Millisecond, time.Second)) {
			return
		}
	}
}

func (f *Fencer) fenceOnce(ctx context.Context) error {
	hv, err := f.cfg.Dial(ctx)
	if err != nil {
		return fmt.Errorf("dial libvirtd: %w", err)
	}
	defer func() { _ = hv.Close() }()
	n, err := fenceDomains(ctx, hv, f.cfg.Policy, nil, f.log)
	f.mu.Lock()
	f.fenced += n
	f.mu.Unlock()
	return err
}

// Fenced counts the domains fenced so far.
func (f *Fencer) Fenced() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fenced
}
