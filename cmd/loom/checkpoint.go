package main

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

// newCheckpointCommands are the checkpoint verbs of `loom vm`.
func newCheckpointCommands(flags *clientFlags) []*cobra.Command {
	var kind string
	var wait time.Duration
	take := &cobra.Command{
		Use: "checkpoint NAME [--kind disk|full]", Short: "Checkpoint a running VM: its disk, or its disk with memory and device state", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			body := events.CheckpointVM{CommandMeta: events.CommandMeta{CommandID: c.newCommandID()}, Name: args[0], Kind: events.CheckpointKind(kind)}
			reply, err := c.command(cmd.Context(), events.KindVM, events.VerbCheckpoint, &body)
			if err != nil {
				return err
			}
			return finishStep(cmd, c, reply, args[0], wait)
		}),
	}
	take.Flags().StringVar(&kind, "kind", string(events.CheckpointFull), "disk (an atomic disk overlay) or full (disk plus memory and device state)")
	take.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the host to take it (e.g. --wait 1m)")

	var restoreWait time.Duration
	restore := &cobra.Command{
		Use: "restore NAME CHECKPOINT", Short: "Bring a VM back to one of its checkpoints", Args: cobra.ExactArgs(2),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			body := events.RestoreVM{CommandMeta: events.CommandMeta{CommandID: c.newCommandID()}, Name: args[0], Checkpoint: args[1]}
			reply, err := c.command(cmd.Context(), events.KindVM, events.VerbRestore, &body)
			if err != nil {
				return err
			}
			return finishStep(cmd, c, reply, args[0], restoreWait)
		}),
	}
	restore.Flags().DurationVar(&restoreWait, "wait", 0, "wait up to this long for the host to restore it")

	var del string
	var every time.Duration
	var keep int
	var scheduleKind string
	list := &cobra.Command{
		Use:   "checkpoints NAME [--delete ID | --every DURATION --keep K]",
		Short: "List a VM's checkpoints (where their files are, sizes, times); delete one; or set its schedule",
		Args:  cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			name := args[0]
			meta := events.CommandMeta{CommandID: c.newCommandID()}
			switch {
			case del != "":
				reply, err := c.command(cmd.Context(), events.KindVM, events.VerbDeleteCheckpoint, &events.DeleteCheckpoint{CommandMeta: meta, Name: name, Checkpoint: del})
				if err != nil {
					return err
				}
				return printReply(cmd.OutOrStdout(), flags.output, reply)
			case cmd.Flags().Changed("every"):
				body := events.ScheduleCheckpoints{CommandMeta: meta, Name: name, EveryMillis: every.Milliseconds(), Keep: keep, Kind: events.CheckpointKind(scheduleKind)}
				reply, err := c.command(cmd.Context(), events.KindVM, events.VerbSchedule, &body)
				if err != nil {
					return err
				}
				return printReply(cmd.OutOrStdout(), flags.output, reply)
			}
			vm, err := getVM(cmd.Context(), c, name, 0)
			if err != nil {
				return err
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), vm.Checkpoints)
			}
			if s := vm.Schedule; s != nil {
				fmt.Fprintf(cmd.OutOrStdout(), "schedule: a %s checkpoint every %s, keeping the last %d\n", s.Kind, s.Every(), s.Keep)
			}
			return printCheckpoints(cmd, vm)
		}),
	}
	list.Flags().StringVar(&del, "delete", "", "delete this checkpoint and remove its files")
	list.Flags().DurationVar(&every, "every", 0, "take a checkpoint this often (at least 1m; 0 clears the schedule)")
	list.Flags().IntVar(&keep, "keep", 5, "with --every: keep the last K scheduled checkpoints")
	list.Flags().StringVar(&scheduleKind, "kind", string(events.CheckpointDisk), "with --every: disk or full")
	return []*cobra.Command{take, restore, list}
}

// printCheckpoints prints a VM's catalog.
func printCheckpoints(cmd *cobra.Command, vm *events.VMView) error {
	rows := make([][]string, 0, len(vm.Checkpoints))
	for _, ck := range vm.Checkpoints {
		state := string(ck.State)
		if ck.Fault != nil {
			state += ": " + ck.Fault.Error()
		}
		size := "-"
		if ck.State == events.CheckpointTaken || ck.State == events.CheckpointDeleting {
			size = mib(ck.DiskBytes) + " disk"
			if ck.Kind == events.CheckpointFull {
				size += " + " + mib(ck.MemoryBytes) + " memory"
			}
		}
		by := "person"
		if ck.Scheduled {
			by = "schedule"
		}
		took := "-"
		if ck.TakenSeq != 0 {
			took = (time.Duration(ck.Millis) * time.Millisecond).String()
		}
		rows = append(rows, []string{ck.ID, string(ck.Kind), state, ck.Host, size, took, ago(ck.RequestedAt), by, strconv.Itoa(ck.Restores)})
	}
	return table(cmd.OutOrStdout(), []string{"CHECKPOINT", "KIND", "STATE", "HOST", "SIZE", "TOOK", "REQUESTED", "BY", "RESTORES"}, rows)
}

func mib(b int64) string { return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) + " MiB" }

// getVM reads one VM, reflecting at least minSeq.
func getVM(ctx context.Context, c *client, name string, minSeq uint64) (*events.VMView, error) {
	reply, err := c.query(ctx, events.KindVM, events.VerbGet, events.Query{Name: name, MinSeq: minSeq})
	if err != nil {
		return nil, err
	}
	if len(reply.VMs) != 1 {
		return nil, events.Errorf(events.CodeVMNotFound, "no VM %q", name)
	}
	return &reply.VMs[0], nil
}

// finishStep prints a checkpoint command's reply and, with --wait, waits
// until the VM's host reported on the step and the VM converged, then
// prints the checkpoint's catalog entry.
func finishStep(cmd *cobra.Command, c *client, reply *events.Reply, name string, wait time.Duration) error {
	if err := printReply(cmd.OutOrStdout(), c.flags.output, reply); err != nil {
		return err
	}
	if wait <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), wait)
	defer cancel()
	vm, err := waitConverged(ctx, c, name, reply.LastSeq())
	for err == nil && vm != nil && vm.Step != nil {
		select {
		case <-ctx.Done():
			return events.Errorf(events.CodeTimeout, "the host of %s did not report on checkpoint %s in time", name, vm.Step.Checkpoint)
		case <-time.After(100 * time.Millisecond):
		}
		vm, err = getVM(ctx, c, name, 0)
	}
	if err != nil {
		return err
	}
	if vm == nil {
		return events.Errorf(events.CodeVMNotFound, "%s is gone", name)
	}
	return printCheckpoints(cmd, vm)
}
