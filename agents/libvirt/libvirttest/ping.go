package libvirttest

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Pinger sends ICMP echo requests from inside another process's network
// namespace (a daemon's: a host's), through a raw socket opened there,
// and measures the replies. Its echo identifier is the process id: use one
// Pinger per namespace and destination at a time. Its methods must not be
// called concurrently, except FirstReplySince during Watch.
type Pinger struct {
	conn     *net.IPConn
	from, to netip.Addr
	id       uint16

	mu          sync.Mutex // guards seq, sentAt, lastReplies
	seq         uint16
	sentAt      map[uint16]time.Time
	lastReplies []time.Time // of the running watch
}

// NewPinger opens a raw ICMP socket in the network namespace of pid, which
// pings to; from is the address the namespace sends from, for messages.
// The socket is closed in t.Cleanup.
func NewPinger(t testing.TB, pid int, from, to netip.Addr) *Pinger {
	t.Helper()
	fd, err := rawICMPSocketIn(pid)
	if err != nil {
		t.Fatalf("ICMP socket in the namespace of %d: %v", pid, err)
	}
	file := os.NewFile(uintptr(fd), "icmp")
	conn, err := net.FilePacketConn(file)
	_ = file.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &Pinger{conn: conn.(*net.IPConn), from: from, to: to, id: uint16(pid), sentAt: map[uint16]time.Time{}}
}

// DaemonPID is the pid of the libvirtd serving socket (started by
// StartDaemon): the process whose network namespace is the host's.
func DaemonPID(t testing.TB, socket string) int {
	t.Helper()
	pid, err := daemonPID(socket)
	if err != nil {
		t.Fatalf("pid of the libvirtd of %s: %v", socket, err)
	}
	return pid
}

// rawICMPSocketIn opens the socket on a thread that moves into the
// namespace and is never used again: a goroutine that ends locked to its
// thread takes the thread with it.
func rawICMPSocketIn(pid int) (int, error) {
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread ends with the goroutine
		ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			done <- result{err: err}
			return
		}
		defer func() { _ = ns.Close() }()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{err: fmt.Errorf("setns: %w", err)}
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		done <- result{fd: fd, err: err}
	}()
	r := <-done
	return r.fd, r.err
}

// send sends the next echo request.
func (p *Pinger) send() error {
	p.mu.Lock()
	p.seq++
	seq := p.seq
	p.sentAt[seq] = time.Now()
	p.mu.Unlock()
	msg := []byte{8, 0, 0, 0, 0, 0, 0, 0, 'l', 'o', 'o', 'm'}
	binary.BigEndian.PutUint16(msg[4:], p.id)
	binary.BigEndian.PutUint16(msg[6:], seq)
	binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
	_, err := p.conn.WriteTo(msg, &net.IPAddr{IP: p.to.AsSlice()})
	return err
}

// receive reads until deadline and returns the round-trip times of the
// echo replies for p that came.
func (p *Pinger) receive(deadline time.Time) []time.Duration {
	var rtts []time.Duration
	buf := make([]byte, 1500)
	_ = p.conn.SetReadDeadline(deadline)
	for {
		n, from, err := p.conn.ReadFrom(buf)
		if err != nil {
			return rtts // the deadline, or the socket closed
		}
		now := time.Now()
		src, _ := netip.AddrFromSlice(from.(*net.IPAddr).IP)
		if n < 8 || buf[0] != 0 || src.Unmap() != p.to || binary.BigEndian.Uint16(buf[4:]) != p.id {
			continue // not a reply to us
		}
		p.mu.Lock()
		sent, ok := p.sentAt[binary.BigEndian.Uint16(buf[6:])]
		p.lastReplies = append(p.lastReplies, now)
		p.mu.Unlock()
		if ok {
			rtts = append(rtts, now.Sub(sent))
		}
	}
}

// PingCount is what Count saw: requests sent, replies, and their
// round-trip times.
type PingCount struct {
	Sent, Replies int
	RTTs          []time.Duration
}

// RTT summarizes the round-trip times: min, median and max, or "-".
func (c PingCount) RTT() string {
	if len(c.RTTs) == 0 {
		return "-"
	}
	s := slices.Clone(c.RTTs)
	slices.Sort(s)
	return fmt.Sprintf("min %s median %s max %s", s[0].Round(10*time.Microsecond),
		s[len(s)/2].Round(10*time.Microsecond), s[len(s)-1].Round(10*time.Microsecond))
}

// Count sends n requests interval apart and counts the replies, waiting
// 300 ms more for the last.
func (p *Pinger) Count(n int, interval time.Duration) PingCount {
	var c PingCount
	for i := range n {
		if p.send() == nil {
			c.Sent++
		}
		wait := interval
		if i == n-1 {
			wait = 300 * time.Millisecond
		}
		c.RTTs = append(c.RTTs, p.receive(time.Now().Add(wait))...)
	}
	c.Replies = len(c.RTTs)
	return c
}

// Reachable sends one request and reports whether a reply came within
// 200 ms.
func (p *Pinger) Reachable() error {
	if err := p.send(); err != nil {
		return err
	}
	if len(p.receive(time.Now().Add(200*time.Millisecond))) == 0 {
		return fmt.Errorf("no reply from %s to %s", p.to, p.from)
	}
	return nil
}

// WatchResult is what Watch saw: when it ran, how many requests it sent,
// and when each reply came.
type WatchResult struct {
	Start, End time.Time
	Sent       int
	Replies    []time.Time
}

// Watch sends a request every interval until ctx ends, noting when each
// reply comes; FirstReplySince reads those notes meanwhile.
func (p *Pinger) Watch(ctx context.Context, interval time.Duration) WatchResult {
	p.mu.Lock()
	p.lastReplies = nil
	p.mu.Unlock()
	w := WatchResult{Start: time.Now()}
	for ctx.Err() == nil {
		if p.send() == nil {
			w.Sent++
		}
		p.receive(time.Now().Add(interval))
	}
	w.End = time.Now()
	p.mu.Lock()
	w.Replies = slices.Clone(p.lastReplies)
	p.mu.Unlock()
	return w
}

// FirstReplySince returns when the first reply of the running (or last)
// watch at or after t came, or the zero time. It may be called while
// Watch runs.
func (p *Pinger) FirstReplySince(t time.Time) time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.lastReplies {
		if !r.Before(t) {
			return r
		}
	}
	return time.Time{}
}

// LongestGap is the longest time the watch went without a reply (from its
// start to the first, between two, from the last to its end), and when
// that began.
func (w WatchResult) LongestGap() (gap time.Duration, from time.Time) {
	last := w.Start
	for _, r := range append(slices.Clone(w.Replies), w.End) {
		if d := r.Sub(last); d > gap {
			gap, from = d, last
		}
		last = r
	}
	return gap, from
}

// Describe summarizes the watch, its times counted from origin.
func (w WatchResult) Describe(origin time.Time) string {
	gap, from := w.LongestGap()
	return fmt.Sprintf("%d sent, %d replies, longest gap %s from %s", w.Sent, len(w.Replies), gap, from.Sub(origin))
}

// icmpChecksum is the Internet checksum (RFC 1071) of msg.
func icmpChecksum(msg []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(msg); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(msg[i:]))
	}
	if len(msg)%2 == 1 {
		sum += uint32(msg[len(msg)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
