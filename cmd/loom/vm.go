package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

func newVMCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "vm", Short: "Virtual machines"}
	flags.registerCommandFlags(cmd)
	var wait time.Duration

	var create events.CreateVM
	createCmd := &cobra.Command{
		Use: "create NAME --image IMAGE --cpu N --mem MIB", Short: "Create a VM and place it on a host with room", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			create.Name, create.CommandID = args[0], c.newCommandID()
			reply, err := c.command(cmd.Context(), events.KindVM, events.VerbCreate, &create)
			if err != nil {
				return err
			}
			return finish(cmd, c, reply, create.Name, wait)
		}),
	}
	createCmd.Flags().StringVar(&create.Image, "image", "", "image to create the VM from")
	createCmd.Flags().IntVar(&create.CPU, "cpu", 1, "vCPUs")
	createCmd.Flags().IntVar(&create.MemoryMiB, "mem", 256, "memory, MiB")
	createCmd.Flags().BoolVar(&create.Stopped, "stopped", false, "create without starting")
	createCmd.Flags().StringVar((*string)(&create.OnHostLost), "on-host-lost", string(events.RestartElsewhere), "if its host is declared lost: restart (elsewhere, disk provisioned again from the image) or stop")
	createCmd.Flags().StringVar(&create.Net, "net", "", "give the VM an address on this virtual network (loom net create)")
	createCmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the VM to converge (e.g. --wait 30s)")

	lifecycle := func(verb, short string) *cobra.Command {
		var wait time.Duration
		c := &cobra.Command{
			Use: verb + " NAME", Short: short, Args: cobra.ExactArgs(1),
			RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
				body := events.VMCommand{CommandMeta: events.CommandMeta{CommandID: c.newCommandID()}, Name: args[0]}
				reply, err := c.command(cmd.Context(), events.KindVM, verb, &body)
				if err != nil {
					return err
				}
				return finish(cmd, c, reply, args[0], wait)
			}),
		}
		c.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the VM to converge (e.g. --wait 30s)")
		return c
	}

	cmd.AddCommand(createCmd,
		lifecycle(events.VerbStart, "Start a VM"), lifecycle(events.VerbStop, "Stop a VM (ACPI shutdown, then power off after a grace period)"),
		lifecycle(events.VerbPause, "Pause a VM"), lifecycle(events.VerbResume, "Resume a paused VM"),
		lifecycle(events.VerbDelete, "Delete a VM: destroy and undefine its domain"))
	cmd.AddCommand(vmQueryVerbs(flags, flags.liveQueries)...)
	cmd.AddCommand(newCheckpointCommands(flags)...)
	cmd.AddCommand(newMigrateCommand(flags))
	return cmd
}

// printVM shows a VM; times are shown as how long before now.
func printVM(w io.Writer, output string, vm *events.VMView, now time.Time) error {
	if output == "json" {
		return printJSON(w, vm)
	}
	fault := "-"
	if vm.Observed.Fault != nil {
		fault = vm.Observed.Fault.Error()
	}
	goal := string(vm.Desired)
	if vm.AbsentReason != "" {
		goal += " (" + vm.AbsentReason + ")"
	}
	leases := make([]string, 0, len(vm.Leases))
	for _, l := range vm.Leases {
		leases = append(leases, fmt.Sprintf("%s %s@%d", l.Resource, l.Mode, l.Epoch))
	}
	migration := "-"
	if m := vm.Migration; m != nil {
		migration = fmt.Sprintf("%s: %s -> %s, under way", m.ID, m.From, m.To)
	} else if m := vm.LastMigration; m != nil && m.Moved {
		migration = fmt.Sprintf("%s: %s -> %s in %s, downtime %s", m.ID, m.From, m.To, time.Duration(m.TotalMillis)*time.Millisecond, time.Duration(m.DowntimeMillis)*time.Millisecond)
	} else if m != nil {
		migration = fmt.Sprintf("%s: %s -> %s %s", m.ID, m.From, m.To, m.Reason)
	}
	step := "-"
	if vm.Step != nil {
		step = fmt.Sprintf("%s checkpoint %s (%s), not yet reported", vm.Step.Op, vm.Step.Checkpoint, vm.Step.Kind)
	}
	moved := "-"
	if vm.Left != "" {
		moved = "from " + vm.Left + " (" + vm.LeftReason + ")"
	}
	return table(w, []string{"FIELD", "VALUE"}, [][]string{
		{"name", vm.Name}, {"uid", vm.UID}, {"phase", string(vm.Phase)}, {"host", orDash(vm.Host)},
		{"image", vm.Image}, {"cpu", strconv.Itoa(vm.CPU)}, {"memory", strconv.Itoa(vm.MemoryMiB) + " MiB"},
		{"goal", goal}, {"incarnation", strconv.FormatUint(vm.Incarnation, 10)},
		{"leases", orDash(strings.Join(leases, ", "))}, {"moved", moved}, {"on host lost", orDash(string(vm.OnHostLost))},
		{"observed", orDash(string(vm.Observed.State))}, {"observed incarnation", strconv.FormatUint(vm.Observed.Incarnation, 10)},
		{"observed at", agoFrom(now, vm.Observed.Time)}, {"fault", fault}, {"converged", strconv.FormatBool(vm.Converged)},
		{"checkpoints", strconv.Itoa(len(vm.Checkpoints))}, {"step", step}, {"migration", migration},
	})
}

// finish prints a command's reply and, with --wait, waits for the VM to
// converge (or, after a delete, to be gone).
func finish(cmd *cobra.Command, c *client, reply *events.Reply, name string, wait time.Duration) error {
	if err := printReply(cmd.OutOrStdout(), c.flags.output, reply); err != nil {
		return err
	}
	if wait <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), wait)
	defer cancel()
	vm, err := waitConverged(ctx, c, name, reply.LastSeq())
	if err != nil {
		return err
	}
	if vm == nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "%s is gone\n", name)
		return nil
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "%s converged: %s on %s\n", name, vm.Observed.State, vm.Host)
	return nil
}

// waitConverged polls the VM read model (reflecting at least minSeq) until
// the VM converged; nil when it is gone.
func waitConverged(ctx context.Context, c *client, name string, minSeq uint64) (*events.VMView, error) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last *events.VMView
	for {
		reply, err := c.query(ctx, events.KindVM, events.VerbGet, events.Query{Name: name, MinSeq: minSeq, IncludeGone: true})
		var f *events.Fault
		switch {
		case errors.As(err, &f) && f.Code == events.CodeVMNotFound:
			return nil, nil
		case err != nil && ctx.Err() == nil:
			return nil, err
		case err == nil && len(reply.VMs) == 1:
			vm := reply.VMs[0]
			last = &vm
			if vm.Phase == events.PhaseGone {
				return nil, nil
			}
			if vm.Converged {
				return &vm, nil
			}
		}
		select {
		case <-ctx.Done():
			if last != nil && last.Observed.Fault != nil {
				return nil, fmt.Errorf("%s not converged: %s", name, last.Observed.Fault.Error())
			}
			return nil, events.Errorf(events.CodeTimeout, "%s did not converge in time", name)
		case <-tick.C:
		}
	}
}
