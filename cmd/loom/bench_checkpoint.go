package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/loomctl/loom/agents/libvirt"
	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

// What the checkpoint bench runs: the two tiny guests of bench_qemu.go
// on one private libvirtd.
const (
	// checkpointRounds is how many checkpoints of each kind each guest takes.
	checkpointRounds = 5
	// checkpointStepLimit bounds one checkpoint.
	checkpointStepLimit = 2 * time.Minute
	// checkpointDaemonIndex is the bench's libvirtd for host.sh.
	checkpointDaemonIndex = 240
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
	if err := makeQEMUDirs(files, rawDir, storage); err != nil {
		return err
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

	conn, stopPlane, _, err := startBenchPlane(ctx, cfg, filepath.Join(dir, "plane"), log, false)
	if err != nil {
		return err
	}
	defer stopPlane()
	// The agent stopping ends the run, with its error.
	agent := plane.AgentConfig{Host: hostName(0), Socket: socket, URI: kind.uri, StorageDir: storage, AliveMarker: kind.aliveMarker}
	ctx, stopAgents := runBenchAgents(ctx, conn, []plane.AgentConfig{agent}, log)
	defer stopAgents()

	admin := &client{flags: &clientFlags{actor: "bench", timeout: 30 * time.Second}, nc: conn.Conn}
	vm, err := startLoomVM(ctx, admin, kind.image, []string{agent.Host})
	if err != nil {
		return err
	}
	for _, serial := range []string{rawSerial, loomSerial(storage, vm.UID)} {
		if err := waitHeartbeats(ctx, serial, kind.aliveMarker, qemuHeartbeats); err != nil {
			return err
		}
	}

	kinds := []events.CheckpointKind{events.CheckpointDisk, events.CheckpointFull}
	fmt.Fprintf(w, "  two tiny guests (1 vCPU, %d MiB, %s) on one libvirtd, one through libvirt alone, one a Loom VM;\n", qemuGuestMiB, kind.uri)
	fmt.Fprintf(w, "  %d checkpoints of each kind each, alternating (who goes first swaps each round); Loom polls every %s\n", checkpointRounds, qemuPoll)
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
	return pollUntil(ctx, checkpointStepLimit, qemuPoll, "checkpoint of "+loomVM+" taken", func(ctx context.Context) (bool, error) {
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

// printCheckpointRounds prints one kind's medians and ranges, and Loom's
// overhead: the median of its rounds' differences, each Loom round paired
// with the raw one beside it, so drift across rounds cancels out.
func printCheckpointRounds(w io.Writer, kind events.CheckpointKind, rounds []checkpointRound) {
	row := func(what string, f func(checkpointRound) time.Duration) time.Duration {
		return printDurationRow(w, what, durationsOf(rounds, f))
	}
	fmt.Fprintf(w, "  %s:\n", kind)
	raw := row("libvirt alone (TakeSnapshot)", func(r checkpointRound) time.Duration { return r.raw })
	loom := row("Loom, command -> read model taken", func(r checkpointRound) time.Duration { return r.loom })
	row("  of which command -> reply", func(r checkpointRound) time.Duration { return r.reply })
	row("  of which in libvirt (agent's Millis)", func(r checkpointRound) time.Duration { return r.inLibvirt })
	overRaw := medianOf(durationsOf(rounds, func(r checkpointRound) time.Duration { return r.loom - r.raw }))
	overOwn := medianOf(durationsOf(rounds, func(r checkpointRound) time.Duration { return r.loom - r.inLibvirt }))
	fmt.Fprintf(w, "    ratio Loom/libvirt %.2f (medians); Loom's overhead, median per round: %s over libvirt alone, %s over its own libvirt call\n",
		float64(loom)/float64(raw), roundMs(overRaw), roundMs(overOwn))
}
