package agents

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"golang.org/x/sys/unix"

	"github.com/loomctl/loom/agents/libvirt"
)

// FencePolicy is what fencing does to a domain holding an exclusive lease
// once the fencing deadline passed.
type FencePolicy string

// The policies.
const (
	// FencePause suspends the domain: its memory stays, and it resumes
	// (under a grant still current) once renewals are acknowledged again.
	FencePause FencePolicy = "pause"
	// FenceDestroy powers it off at once.
	FenceDestroy FencePolicy = "destroy"
)

// Valid tells whether p is a policy.
func (p FencePolicy) Valid() bool { return p == FencePause || p == FenceDestroy }

// fenceDomains applies policy to every running domain that holds says
// holds an exclusive lease (all of them, for holds nil), and returns how many it fenced. It goes on
// past a domain it cannot fence, and reports the first error.
func fenceDomains(ctx context.Context, hv Hypervisor, policy FencePolicy, holds func(libvirt.Domain) bool, log *slog.Logger) (int, error) {
	domains, err := hv.List(ctx)
	if err != nil {
		return 0, fmt.Errorf("list domains: %w", err)
	}
	var first error
	fenced := 0
	for _, d := range domains {
		if d.State != libvirt.StateRunning || (holds != nil && !holds(d)) {
			continue
		}
		if policy == FenceDestroy {
			err = hv.Destroy(ctx, d.Name)
		} else {
			err = hv.Suspend(ctx, d.Name)
		}
		if err != nil {
			log.Error("fence domain", "vm", d.Name, "policy", policy, "err", err)
			if first == nil {
				first = fmt.Errorf("fence %s: %w", d.Name, err)
			}
			continue
		}
		fenced++
		log.Warn("domain fenced: fencing deadline passed", "vm", d.Name, "policy", policy)
	}
	return fenced, first
}

// BootNanos reads CLOCK_BOOTTIME: this machine's monotonic clock,
// counting time suspended too, shared by every process on it. The agent
// hands its fencing deadline to `loom fence` on this clock. (Go's own
// monotonic reading is CLOCK_MONOTONIC, which stops while the machine is
// suspended; across a suspend the control plane's clock runs on and the
// deadline would fall late.)
func BootNanos() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		panic(fmt.Sprintf("clock_gettime(CLOCK_BOOTTIME): %v", err)) // Linux has had it since 2.6.39
	}
	return ts.Nano()
}

// untilBoot is how long from now until the CLOCK_BOOTTIME reading at.
func untilBoot(at int64, now func() int64) time.Duration {
	return time.Duration(at - now())
}

// Unsafe switches an agent's protections off, one by one, so that a test
// can show what each guards. Production code never sets any.
type Unsafe struct {
	// NoFence: start and resume past the fencing deadline, pause nothing
	// at it, and tell no fencer.
	NoFence bool
	// NoLeaseCheck: define, start and resume without checking the grants.
	NoLeaseCheck bool
	// NoLeaseWatch: subscribe to no lease changes.
	NoLeaseWatch bool
}
