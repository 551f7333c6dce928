package main

import (
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

func newImageCommand(flags *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Images VMs are created from"}
	flags.registerCommandFlags(cmd)
	var reg events.RegisterImage
	register := &cobra.Command{
		Use: "register NAME", Short: "Register an image", Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			reg.Name, reg.CommandID = args[0], c.newCommandID()
			reply, err := c.command(cmd.Context(), events.KindImage, events.VerbRegister, &reg)
			if err != nil {
				return err
			}
			return printReply(cmd.OutOrStdout(), flags.output, reply)
		}),
	}
	register.Flags().StringVar(&reg.Format, "format", "qcow2", "disk format: qcow2 or raw")
	register.Flags().Int64Var(&reg.SizeBytes, "size", 0, "virtual size in bytes")
	register.Flags().StringVar(&reg.Source, "source", "", "where the image's bytes are (path or URL)")
	register.Flags().StringVar(&reg.Checksum, "checksum", "", "sha256:<hex> digest of the image")
	var boot events.ImageBoot
	register.Flags().StringVar(&boot.Kernel, "boot-kernel", "", "boot VMs of this image from this kernel on the hosts (absolute path)")
	register.Flags().StringVar(&boot.Initrd, "boot-initrd", "", "with --boot-kernel: the initramfs")
	register.Flags().StringVar(&boot.Cmdline, "boot-cmdline", "", "with --boot-kernel: the kernel command line")
	register.PreRun = func(*cobra.Command, []string) {
		if boot != (events.ImageBoot{}) {
			reg.Boot = &boot
		}
	}

	cmd.AddCommand(register)
	cmd.AddCommand(imageQueryVerbs(flags, flags.liveQueries)...)
	return cmd
}
