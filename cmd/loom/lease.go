package main

import (
	"fmt"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

func newLeaseCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "lease", Short: "Leases on images and disks: who may read or write them, under which epoch"}
	flags.registerCommandFlags(cmd)

	var acq events.AcquireLease
	acquire := &cobra.Command{
		Use: "acquire RESOURCE", Short: "Take a grant on a resource for a holder on a host", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			acq.Resource, acq.CommandID = args[0], c.newCommandID()
			return sendLeaseCommand(cmd, flags, c, events.VerbAcquire, &acq)
		}),
	}
	acquire.Flags().StringVar((*string)(&acq.Mode), "mode", string(events.LeaseExclusive), "exclusive (one writer) or shared (readers)")
	acquire.Flags().StringVar(&acq.ID, "holder", "", "who holds it: a VM's UID, or a name of your own")
	acquire.Flags().StringVar(&acq.Host, "host", "", "the host the holder runs on")
	acquire.Flags().StringVar(&acq.VM, "vm", "", "the holder's VM name, if it is one")

	var rel events.ReleaseLease
	release := &cobra.Command{
		Use: "release RESOURCE", Short: "Give a grant back", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			rel.Resource, rel.CommandID = args[0], c.newCommandID()
			return sendLeaseCommand(cmd, flags, c, events.VerbRelease, &rel)
		}),
	}
	release.Flags().StringVar(&rel.Holder, "holder", "", "the holder whose grant to release")
	release.Flags().Uint64Var(&rel.Epoch, "epoch", 0, "release only if the grant is still this epoch")
	release.Flags().StringVar(&rel.Reason, "reason", "", "why, for the record")

	var brk events.BreakLease
	breakCmd := &cobra.Command{
		Use:   "break RESOURCE",
		Short: "End a holder's grant: at once if its host was declared lost; with --force, mark a live one breaking until its holder stops",
		Args:  cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			brk.Resource, brk.CommandID = args[0], c.newCommandID()
			return sendLeaseCommand(cmd, flags, c, events.VerbBreak, &brk)
		}),
	}
	breakCmd.Flags().StringVar(&brk.Holder, "holder", "", "the holder whose grant to break")
	breakCmd.Flags().BoolVar(&brk.Force, "force", false, "break a live grant: mark it breaking, recorded with you as the actor")
	breakCmd.Flags().StringVar(&brk.Reason, "reason", "", "why, for the record")
	for _, c := range []*cobra.Command{acquire, release, breakCmd} {
		_ = c.MarkFlagRequired("holder")
	}
	_ = acquire.MarkFlagRequired("host")
	cmd.AddCommand(leaseQueryVerbs(flags, flags.liveQueries)...)
	cmd.AddCommand(acquire, release, breakCmd)
	return cmd
}

func sendLeaseCommand(cmd *cobra.Command, flags *clientFlags, c *client, verb string, body any) error {
	reply, err := c.command(cmd.Context(), events.KindLease, verb, body)
	if err != nil {
		return err
	}
	return printReply(cmd.OutOrStdout(), flags.output, reply)
}

func printGrants(w io.Writer, output string, grants []events.LeaseGrant) error {
	if output == "json" {
		if grants == nil {
			grants = []events.LeaseGrant{}
		}
		return printJSON(w, grants)
	}
	rows := make([][]string, 0, len(grants))
	for _, g := range grants {
		state := "held"
		switch {
		case g.Void:
			state = "void"
		case g.Breaking:
			state = fmt.Sprintf("breaking (by %s)", g.BreakingBy)
		}
		rows = append(rows, []string{g.Resource, string(g.Mode), strconv.FormatUint(g.Epoch, 10), orDash(g.VM), g.ID, g.Host, state})
	}
	return table(w, []string{"RESOURCE", "MODE", "EPOCH", "VM", "HOLDER", "HOST", "STATE"}, rows)
}
