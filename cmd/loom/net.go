package main

import (
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

func newNetCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "net", Short: "Virtual networks: addresses that follow their VMs between hosts"}
	flags.registerCommandFlags(cmd)
	var create events.CreateNet
	createCmd := &cobra.Command{
		Use: "create NAME --cidr PREFIX", Short: "Create a virtual network (an IPv4 prefix, carried between hosts in a VXLAN segment)", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			create.Name, create.CommandID = args[0], c.newCommandID()
			reply, err := c.command(cmd.Context(), events.KindNet, events.VerbCreate, &create)
			if err != nil {
				return err
			}
			return printReply(cmd.OutOrStdout(), flags.output, reply)
		}),
	}
	createCmd.Flags().StringVar(&create.CIDR, "cidr", "", "the network's IPv4 prefix, e.g. 10.77.0.0/24 (/8 to /29)")
	createCmd.Flags().Uint32Var(&create.VNI, "vni", 0, "its VXLAN segment id (default: derived from the name)")

	var attach events.AttachNet
	attachCmd := &cobra.Command{
		Use: "attach NET --host HOST", Short: "Give a host a port on a net: an address of its own there, on its bridge (a gateway, a probe)", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			attach.Net, attach.CommandID = args[0], c.newCommandID()
			reply, err := c.command(cmd.Context(), events.KindNet, events.VerbAttach, &attach)
			if err != nil {
				return err
			}
			return printReply(cmd.OutOrStdout(), flags.output, reply)
		}),
	}
	attachCmd.Flags().StringVar(&attach.Host, "host", "", "the host")
	cmd.AddCommand(createCmd, attachCmd)
	cmd.AddCommand(netQueryVerbs(flags, flags.liveQueries)...)
	return cmd
}
