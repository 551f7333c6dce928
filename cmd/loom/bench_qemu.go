package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// What the bench parts on real QEMU share (checkpoint, migrate): two tiny
// guests (ops/qemu/guest.sh) on private libvirtd daemons, one defined and
// started through agents/libvirt alone, the other a Loom VM run by its
// host's agent, with their files where QEMU, as libvirt-qemu, reaches them.
const (
	// qemuGuestMiB is each guest's memory: a full checkpoint writes it all,
	// a migration copies it.
	qemuGuestMiB = 128
	// qemuHeartbeats is how many heartbeats a guest prints before it
	// counts as booted: its boot no longer competes for the CPUs.
	qemuHeartbeats = 3
	// qemuBootLimit bounds a guest's boot, and any wait for heartbeats.
	qemuBootLimit = 3 * time.Minute
	// qemuPoll is how often the Loom side reads the VM read model.
	qemuPoll = 10 * time.Millisecond
	// rawDomain and loomVM name the two guests.
	rawDomain = "bench-raw"
	loomVM    = "bench-loom"
)

// makeQEMUDirs makes each of dirs readable and traversable by QEMU,
// whatever the umask.
func makeQEMUDirs(dirs ...string) error {
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// startRawGuest defines and starts the raw guest as the agent would a VM
// of img: a qcow2 overlay on img's disk, booted from its kernel, its
// serial console to a file in dir, which it returns.
func startRawGuest(ctx context.Context, virt *libvirt.Client, img events.RegisterImage, dir string) (serial string, err error) {
	overlay := filepath.Join(dir, rawDomain+".qcow2")
	out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", img.Format, "-b", img.Source, overlay).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("qemu-img create %s: %w\n%s", overlay, err, out)
	}
	serial = filepath.Join(dir, rawDomain+".serial")
	spec := libvirt.DomainSpec{Name: rawDomain, VCPUs: 1, MemoryMiB: qemuGuestMiB, DiskPath: overlay, SerialPath: serial}
	if b := img.Boot; b != nil {
		spec.Kernel, spec.Initrd, spec.Cmdline = b.Kernel, b.Initrd, b.Cmdline
	}
	if err := virt.Define(ctx, spec); err != nil {
		return "", err
	}
	if err := virt.Start(ctx, rawDomain); err != nil {
		return "", err
	}
	return serial, nil
}

// runBenchAgents runs an agent for each of agents until stop is called.
// An agent stopping before that ends the returned context, with its error
// as the cause.
func runBenchAgents(ctx context.Context, conn *plane.Connection, agents []plane.AgentConfig, log *slog.Logger) (agentsCtx context.Context, stop func()) {
	ctx, fail := context.WithCancelCause(ctx)
	var running sync.WaitGroup
	for _, agent := range agents {
		running.Add(1)
		go func() {
			defer running.Done()
			fail(fmt.Errorf("agent %s stopped: %w", agent.Host, plane.RunAgent(ctx, conn, agent, log)))
		}()
	}
	return ctx, func() { fail(context.Canceled); running.Wait() }
}

// startLoomVM registers hosts and img, creates the Loom VM from img, and
// returns it once its agent reports it running. Its serial log is
// loomSerial(the storage dir of its host, its UID).
func startLoomVM(ctx context.Context, c *client, img events.RegisterImage, hosts []string) (*events.VMView, error) {
	if err := registerBench(ctx, c.nc, hosts, nil); err != nil {
		return nil, err
	}
	if _, err := c.command(ctx, events.KindImage, events.VerbRegister, &img); err != nil {
		return nil, fmt.Errorf("register image %s: %w", img.Name, err)
	}
	create := events.CreateVM{CommandMeta: events.CommandMeta{CommandID: "bench-create"}, Name: loomVM, Image: img.Name, CPU: 1, MemoryMiB: qemuGuestMiB}
	reply, err := c.command(ctx, events.KindVM, events.VerbCreate, &create)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", loomVM, err)
	}
	waitCtx, cancel := context.WithTimeout(ctx, qemuBootLimit)
	defer cancel()
	vm, err := waitConverged(waitCtx, c, loomVM, reply.LastSeq())
	if err != nil {
		return nil, err
	}
	if vm == nil {
		return nil, fmt.Errorf("%s is gone", loomVM)
	}
	return vm, nil
}

// loomSerial is the serial log of the Loom VM, of uid uid, on the host
// whose agent keeps its files in storage.
func loomSerial(storage, uid string) string {
	return filepath.Join(storage, loomVM+"-"+uid+".serial")
}

// heartbeatCount is how many times a guest's serial log shows marker.
func heartbeatCount(serial, marker string) (int, error) {
	data, err := os.ReadFile(serial)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	return bytes.Count(data, []byte(marker)), nil
}

// waitHeartbeats waits until a guest's serial log shows marker n times.
func waitHeartbeats(ctx context.Context, serial, marker string, n int) error {
	return pollUntil(ctx, qemuBootLimit, 200*time.Millisecond, fmt.Sprintf("%d heartbeats on %s", n, serial), func(context.Context) (bool, error) {
		count, err := heartbeatCount(serial, marker)
		return count >= n, err
	})
}

// pollUntil calls done every interval until it reports true or an error,
// for at most limit; when ctx ends first, its cause is the error.
func pollUntil(ctx context.Context, limit, every time.Duration, what string, done func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeoutCause(ctx, limit, fmt.Errorf("%s: not within %s", what, limit))
	defer cancel()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		ok, err := done(ctx)
		switch {
		case ctx.Err() != nil:
			return context.Cause(ctx)
		case err != nil:
			return fmt.Errorf("%s: %w", what, err)
		case ok:
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-tick.C:
		}
	}
}

// durationsOf is f of each round.
func durationsOf[R any](rounds []R, f func(R) time.Duration) []time.Duration {
	d := make([]time.Duration, len(rounds))
	for i, r := range rounds {
		d[i] = f(r)
	}
	return d
}

// medianOf is the median of d (the lower of the middle two), which it
// leaves unsorted.
func medianOf(d []time.Duration) time.Duration {
	return percentile(slices.Sorted(slices.Values(d)), 0.5)
}

// printDurationRow prints the median and the range of d and returns the
// median.
func printDurationRow(w io.Writer, what string, d []time.Duration) time.Duration {
	sorted := slices.Sorted(slices.Values(d))
	median := percentile(sorted, 0.5)
	fmt.Fprintf(w, "    %-40s median %9s  (%s .. %s)\n", what, roundMs(median), roundMs(sorted[0]), roundMs(sorted[len(sorted)-1]))
	return median
}

// roundMs rounds d to a tenth of a millisecond.
func roundMs(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }

// destroyDomains destroys and undefines every domain of the libvirtd on
// socket, on a connection of its own: stopping libvirtd leaves guests
// running.
func destroyDomains(socket, uri string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	virt, err := libvirt.Dial(ctx, libvirt.Config{Socket: socket, URI: uri, RPCTimeout: time.Minute})
	if err != nil {
		return fmt.Errorf("remove the guests: %w", err)
	}
	defer func() { _ = virt.Close() }()
	doms, err := virt.List(ctx)
	if err != nil {
		return fmt.Errorf("remove the guests: %w", err)
	}
	var errs []error
	for _, d := range doms {
		errs = append(errs, virt.Destroy(ctx, d.Name), virt.Undefine(ctx, d.Name))
	}
	return errors.Join(errs...)
}

// removeBenchFiles removes the guests' files, unless --keep.
func removeBenchFiles(cfg benchConfig, w io.Writer, dir string) error {
	if cfg.keep {
		fmt.Fprintf(w, "  (kept the guests' files in %s)\n", dir)
		return nil
	}
	return os.RemoveAll(dir)
}
