package agents

import (
	"bufio"
	"context"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/loomctl/loom/events"
)

// How long a VM's address was unreachable during its migration, as seen
// from the host it leaves. If this host has a port on the VM's net, the
// source agent pings the VM's address from it every probeEvery while the
// migration runs and a little after, and reports the longest gap between
// replies. It is what a client of the VM on that host saw: the guest
// paused for the switch-over, plus the time until this host's entry for
// the address led to the target.

// probeEvery is the probe's interval; probeTail how long it goes on after
// the migration call returned, waiting for a reply again.
const (
	probeEvery = 20 * time.Millisecond
	probeTail  = 3 * time.Second
)

// probe pings an address from this host's port and keeps reply times.
type probe struct {
	cancel  context.CancelFunc
	done    chan struct{}
	mu      sync.Mutex
	replies []time.Time
}

// replyLine is a reply of iputils ping -D: "[1732979123.123456] 64 bytes from ...".
var replyLine = regexp.MustCompile(`^\[(\d+)\.(\d+)\] \d+ bytes from `)

// startProbe pings goal's VM's address from this host's port on its net;
// nil when the VM is on no net, this host has no port there, or no ping.
func (a *Agent) startProbe(ctx context.Context, goal events.Goal) *probe {
	addr := goal.Spec.Net
	if addr == nil || a.cfg.Overlay == nil {
		return nil
	}
	port, ok := a.portOn(addr.Net)
	if !ok {
		return nil
	}
	pctx, cancel := context.WithCancel(ctx)
	args := append(append([]string{}, a.cfg.Overlay.Prefix...), "ping", "-n", "-D", "-i", strconv.FormatFloat(probeEvery.Seconds(), 'f', 3, 64), "-I", port, addr.Addr)
	cmd := exec.CommandContext(pctx, args[0], args[1:]...)
	out, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		cancel()
		a.log.Warn("probe of the migrating vm's address not started", logVM, goal.VM, logErr, err)
		return nil
	}
	p := &probe{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		scan := bufio.NewScanner(out)
		for scan.Scan() {
			m := replyLine.FindStringSubmatch(scan.Text())
			if m == nil {
				continue
			}
			sec, _ := strconv.ParseInt(m[1], 10, 64)
			frac, _ := strconv.ParseFloat("0."+m[2], 64)
			p.mu.Lock()
			p.replies = append(p.replies, time.Unix(sec, int64(frac*1e9)))
			p.mu.Unlock()
		}
		_ = cmd.Wait()
	}()
	return p
}

// stop waits until a reply came after since (or probeTail passed), stops
// the probe and returns the longest gap between replies; zero when it
// saw fewer than two.
func (p *probe) stop(ctx context.Context, since time.Time) time.Duration {
	if p == nil {
		return 0
	}
	deadline := time.Now().Add(probeTail)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		n := len(p.replies)
		fresh := n > 0 && p.replies[n-1].After(since)
		p.mu.Unlock()
		if fresh || !sleepCtx(ctx, probeEvery) {
			break
		}
	}
	p.cancel()
	<-p.done
	var gap time.Duration
	for i := 1; i < len(p.replies); i++ {
		gap = max(gap, p.replies[i].Sub(p.replies[i-1]))
	}
	return gap
}

// abort stops the probe at once.
func (p *probe) abort() {
	if p == nil {
		return
	}
	p.cancel()
	<-p.done
}
