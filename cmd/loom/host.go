package main

import (
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

func newHostCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "Hosts: register, list, cordon"}
	flags.registerCommandFlags(cmd)
	var reg events.RegisterHost
	register := &cobra.Command{
		Use: "register NAME --cpu N --mem MIB [--key PUBLIC]", Short: "Register a host, its capacity and its key", Args: cobra.ExactArgs(1),
		Long: `loom host register records a host and the capacity it offers. With --key, the
public half of the host's key (what loom agent logs at start, and finds beside
the key file as FILE.pub: its NATS identity's agent-HOST.pub, or --host-key's), every observation on the host's
subjects must be signed by that key from then on: the read models flag and
skip any that is not (unsigned, forged, or an old one published again), and
loom audit verify names it. Without a key the host is in the legacy mode: its
observations are taken from anyone who may publish on its subjects.

Registering again with the same spec changes nothing. A host registered
without a key may be given one by registering it again with --key; a key,
once registered, cannot be changed or removed that way.`,
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			reg.Name, reg.CommandID = args[0], c.newCommandID()
			reply, err := c.command(cmd.Context(), events.KindHost, events.VerbRegister, &reg)
			if err != nil {
				return err
			}
			return printReply(cmd.OutOrStdout(), flags.output, reply)
		}),
	}
	register.Flags().IntVar(&reg.CPU, "cpu", 0, "CPUs the host offers")
	register.Flags().IntVar(&reg.MemoryMiB, "mem", 0, "memory the host offers, MiB")
	register.Flags().StringVar(&reg.Address, "addr", "", "the host's tunnel endpoint address")
	register.Flags().StringVar(&reg.Key, "key", "", "the public half of the host's key, U… (the agent's agent-HOST.pub, or its --host-key FILE.pub)")

	cordon := func(uncordon bool) *cobra.Command {
		verb, short := events.VerbCordon, "Stop placing new VMs on a host"
		if uncordon {
			verb, short = events.VerbUncordon, "Place new VMs on a host again"
		}
		var reason string
		c := &cobra.Command{
			Use: verb + " NAME", Short: short, Args: cobra.ExactArgs(1),
			RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
				body := events.CordonHost{CommandMeta: events.CommandMeta{CommandID: c.newCommandID()}, Name: args[0], Reason: reason, Uncordon: uncordon}
				reply, err := c.command(cmd.Context(), events.KindHost, verb, &body)
				if err != nil {
					return err
				}
				return printReply(cmd.OutOrStdout(), flags.output, reply)
			}),
		}
		if !uncordon {
			c.Flags().StringVar(&reason, "reason", "", "why, for the record")
		}
		return c
	}

	cmd.AddCommand(register, cordon(false), cordon(true))
	cmd.AddCommand(hostQueryVerbs(flags, flags.liveQueries)...)
	return cmd
}
