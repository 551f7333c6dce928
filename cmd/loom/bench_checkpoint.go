package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// What the checkpoint bench runs: two tiny guests (ops/qemu/guest.sh)
// under QEMU on one private libvirtd, one defined and started through
// agents/libvirt alone, the other a Loom VM with its host's agent.
const (
	// checkpointRounds is how many checkpoints of each kind each guest takes.
	checkpointRounds = 5
	// checkpointGuestMiB is each guest's memory: a full checkpoint writes it.
	checkpointGuestMiB = 128
	// checkpointHeartbeats is how many heartbeats a guest prints before it
	// counts as booted: its boot no longer competes for the CPUs.
	checkpointHeartbeats = 3
	// checkpointBootLimit bounds a guest's boot; checkpointStepLimit one
	// checkpoint.
	checkpointBootLimit = 3 * time.Minute
	checkpointStepLimit = 2 * time.Minute
	// checkpointPoll is how often the Loom side reads the VM read model.
	checkpointPoll = 10 * time.Millisecond
	// checkpointDaemonIndex is the bench's libvirtd for host.sh.
	checkpointDaemonIndex = 240
	// rawDomain and loomVM name the two guests.
	rawDomain = "bench-raw"
	loomVM    = "bench-loom"
)

// checkpointRound is one round's figures of one kind.
type checkpointRound struct {
	raw       time.Duration // TakeSnapshot, called directly
	loom      time.Duration // command sent -> the read model shows it taken
	reply     time.Duration // command sent -> its reply
	inLibvirt time.Duration // TakeSnapshot inside the agent, as it reports
}

// benchCheckpoint measures checkpoint time through Loom, from sending
// vm.checkpoint to the VM read model showing the checkpoint taken, against
// the libvirt snapshot call alone, disk-only and full, on the same kind of
// guest on the same libvirtd. Raw and Loom rounds alternate, and which
// goes first swaps each round, so drift hits both alike. --vms is ignored.
func benchCheckpoint(ctx context.Context, cfg benchConfig, dir string, w io.Writer) (err error) {
	log := quietLogger()
	if cfg.verbose {
		log = newLogger(false)
	}
	kind, err := qemuHosts(ctx)
	if err != nil {
		return err
	}
	// The guests' disks live where QEMU, as libvirt-qemu, reaches them.
	files, err := os.MkdirTemp(qemuRoot, "bench-")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, removeBenchFiles(cfg, w, files)) }()
	rawDir, storage := filepath.Join(files, "raw"), filepath.Join(files, "loom")
	for _, d := range []string{files, rawDir, storage} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o755); err != nil {
			return err
		}
	}

	hosts, err := startSimHosts(ctx, []string{filepath.Join(dir, "libvirtd")}, checkpointDaemonIndex, log)
	if err != nil {
		return err
	}
	defer hosts.stop()
	socket := hosts.sockets[0]
	// Guests outlive their libvirtd: they go before it, after the agent
	// (which would start its VM again).
	defer func() { err = errors.Join(err, destroyDomains(socket, kind.uri)) }()
	virt, err := libvirt.Dial(ctx, libvirt.Config{Socket: socket, URI: kind.uri, RPCTimeout: time.Minute})
	if err != nil {
		return err
	}
	defer func() { _ = virt.Close() }()
	rawSerial, err := startRawGuest(ctx, virt, kind.image, rawDir)
	if err != nil {
		return err
	}

	conn, stopPlane, err := startBenchPlane(ctx, cfg, filepath.Join(dir, "plane"), log)
	if err != nil {
		return err
	}
	defer stopPlane()
	// The agent stopping ends the run, with its error.
	ctx, fail := context.WithCancelCause(ctx)
	agentDone := make(chan struct{})
	go func() {
		defer close(agentDone)
		agent := plane.AgentConfig{Host: hostName(0), Socket: socket, URI: kind.uri, StorageDir: storage, AliveMarker: kind.aliveMarker}
		fail(fmt.Errorf("agent %s stopped: %w", agent.Host, plane.RunAgent(ctx, conn, agent, log)))
	}()
	defer func() { fail(context.Canceled); <-agentDone }()

	admin := &client{flags: &clientFlags{actor: "bench", timeout: 30 * time.Second}, nc: conn.Conn}
	loomSerial, err := startLoomVM(ctx, admin, kind.image, storage)
	if err != nil {
		return err
	}
	for _, serial := range []string{rawSerial, loomSerial} {
		if err := waitHeartbeats(ctx, serial, kind.aliveMarker); err != nil {
			return err
		}
	}

	kinds := []events.CheckpointKind{events.CheckpointDisk, events.CheckpointFull}
	fmt.Fprintf(w, "  two tiny guests (1 vCPU, %d MiB, %s) on one libvirtd, one through libvirt alone, one a Loom VM;\n", checkpointGuestMiB, kind.uri)
	fmt.Fprintf(w, "  %d checkpoints of each kind each, alternating (who goes first swaps each round); Loom polls every %s\n", checkpointRounds, checkpointPoll)
	for _, k := range kinds {
		rounds := make([]checkpointRound, checkpointRounds)
		for round := range rounds {
			turns := []func() error{
				func() (err error) {
					rounds[round].raw, err = rawCheckpoint(ctx, virt, rawDir, k, round)
					return err
				},
				func() error { return loomCheckpoint(ctx, admin, k, round, &rounds[round]) },
			}
			if round%2 == 1 {
				slices.Reverse(turns)
			}
			for _, turn := range turns {
				if err := turn(); err != nil {
					return fmt.Errorf("%s checkpoint %d: %w", k, round+1, err)
				}
			}
		}
		printCheckpointRounds(w, k, rounds)
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
	spec := libvirt.DomainSpec{Name: rawDomain, VCPUs: 1, MemoryMiB: checkpointGuestMiB, DiskPath: overlay, SerialPath: serial}
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

// startLoomVM registers the host and img, creates the Loom VM from img,
// waits until its agent reports it running, and returns its serial log.
func startLoomVM(ctx context.Context, c *client, img events.RegisterImage, storage string) (serial string, err error) {
	if err := registerBench(ctx, c.nc, []string{hostName(0)}, nil); err != nil {
		return "", err
	}
	if _, err := c.command(ctx, events.KindImage, events.VerbRegister, &img); err != nil {
		return "", fmt.Errorf("register image %s: %w", img.Name, err)
	}
	create := events.CreateVM{CommandMeta: events.CommandMeta{CommandID: "bench-create"}, Name: loomVM, Image: img.Name, CPU: 1, MemoryMiB: checkpointGuestMiB}
	reply, err := c.command(ctx, events.KindVM, events.VerbCreate, &create)
	if err != nil {
		return "", fmt.Errorf("create %s: %w", loomVM, err)
	}
	waitCtx, cancel := context.WithTimeout(ctx, checkpointBootLimit)
	defer cancel()
	vm, err := waitConverged(waitCtx, c, loomVM, reply.LastSeq())
	if err != nil {
		return "", err
	}
	if vm == nil {
		return "", fmt.Errorf("%s is gone", loomVM)
	}
	return filepath.Join(storage, loomVM+"-"+vm.UID+".serial"), nil
}

// waitHeartbeats waits until a guest's serial log shows marker
// checkpointHeartbeats times.
func waitHeartbeats(ctx context.Context, serial, marker string) error {
	return pollUntil(ctx, checkpointBootLimit, 200*time.Millisecond, "heartbeats on "+serial, func(context.Context) (bool, error) {
		data, err := os.ReadFile(serial)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return false, err
		}
		return bytes.Count(data, []byte(marker)) >= checkpointHeartbeats, nil
	})
}

// rawCheckpoint takes one checkpoint of the raw guest, its files in dir,
// and returns how long TakeSnapshot took.
func rawCheckpoint(ctx context.Context, virt *libvirt.Client, dir string, kind events.CheckpointKind, round int) (time.Duration, error) {
	name := fmt.Sprintf("%s-%d", kind, round)
	s := libvirt.Snapshot{Name: name, Overlay: filepath.Join(dir, rawDomain+"."+name+".qcow2")}
	if kind == events.CheckpointFull {
		s.Memory = filepath.Join(dir, rawDomain+"."+name+".mem")
	}
	start := time.Now()
	err := virt.TakeSnapshot(ctx, rawDomain, s)
	return time.Since(start), err
}

// loomCheckpoint takes one checkpoint of the Loom VM and records in r the
// time from sending the command to its reply and to the read model showing
// it taken, and the time the agent reports it spent in libvirt.
func loomCheckpoint(ctx context.Context, c *client, kind events.CheckpointKind, round int, r *checkpointRound) error {
	body := events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: fmt.Sprintf("bench-%s-%d", kind, round)}, Name: loomVM, Kind: kind}
	start := time.Now()
	reply, err := c.command(ctx, events.KindVM, events.VerbCheckpoint, &body)
	if err != nil {
		return err
	}
	r.reply = time.Since(start)
	i := slices.IndexFunc(reply.Events, func(e events.Appended) bool { return e.Type == events.TypeVMCheckpointRequested })
	if i < 0 {
		return fmt.Errorf("the reply appended no %s: %+v", events.TypeVMCheckpointRequested, reply.Events)
	}
	requested := reply.Events[i].Seq
	return pollUntil(ctx, checkpointStepLimit, checkpointPoll, "checkpoint of "+loomVM+" taken", func(ctx context.Context) (bool, error) {
		vm, err := getVM(ctx, c, loomVM, reply.LastSeq())
		if err != nil {
			return false, err
		}
		for _, ck := range vm.Checkpoints {
			if ck.RequestedSeq != requested {
				continue
			}
			switch {
			case ck.State == events.CheckpointTaken:
				r.loom, r.inLibvirt = time.Since(start), time.Duration(ck.Millis)*time.Millisecond
				return true, nil
			case ck.Fault != nil:
				return false, fmt.Errorf("checkpoint %s: %w", ck.ID, ck.Fault)
			case ck.State != events.CheckpointRequested:
				return false, fmt.Errorf("checkpoint %s is %s", ck.ID, ck.State)
			}
		}
		return false, nil
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

// printCheckpointRounds prints one kind's medians and ranges, and Loom's
// overhead: the median of its rounds' differences, each Loom round paired
// with the raw one beside it, so drift across rounds cancels out.
func printCheckpointRounds(w io.Writer, kind events.CheckpointKind, rounds []checkpointRound) {
	column := func(f func(checkpointRound) time.Duration) []time.Duration {
		d := make([]time.Duration, len(rounds))
		for i, r := range rounds {
			d[i] = f(r)
		}
		slices.Sort(d)
		return d
	}
	row := func(what string, f func(checkpointRound) time.Duration) time.Duration {
		d := column(f)
		median := percentile(d, 0.5)
		fmt.Fprintf(w, "    %-38s median %9s  (%s .. %s)\n", what, roundMs(median), roundMs(d[0]), roundMs(d[len(d)-1]))
		return median
	}
	fmt.Fprintf(w, "  %s:\n", kind)
	raw := row("libvirt alone (TakeSnapshot)", func(r checkpointRound) time.Duration { return r.raw })
	loom := row("Loom, command -> read model taken", func(r checkpointRound) time.Duration { return r.loom })
	row("  of which command -> reply", func(r checkpointRound) time.Duration { return r.reply })
	row("  of which in libvirt (agent's Millis)", func(r checkpointRound) time.Duration { return r.inLibvirt })
	overRaw := percentile(column(func(r checkpointRound) time.Duration { return r.loom - r.raw }), 0.5)
	overOwn := percentile(column(func(r checkpointRound) time.Duration { return r.loom - r.inLibvirt }), 0.5)
	fmt.Fprintf(w, "    ratio Loom/libvirt %.2f (medians); Loom's overhead, median per round: %s over libvirt alone, %s over its own libvirt call\n",
		float64(loom)/float64(raw), roundMs(overRaw), roundMs(overOwn))
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
