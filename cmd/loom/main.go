// Command loom is Loom's one binary: the control plane (serve), a host agent
// (agent), everything on one machine (up), and the client verbs.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRoot()
	if err := root.ExecuteContext(ctx); err != nil {
		var f *events.Fault
		if errors.As(err, &f) {
			fmt.Fprintf(os.Stderr, "loom: %s (%d): %s\n", f.Name, f.Code, f.Message)
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "loom: %v\n", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "loom",
		Short:         "An event-sourced control plane for fleets of virtual machines",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	client := &clientFlags{}
	client.register(root)
	root.AddCommand(
		newInitCommand(),
		newUpCommand(),
		newServeCommand(client),
		newAgentCommand(client),
		newFenceCommand(),
		newHostCommand(client),
		newImageCommand(client),
		newNetCommand(client),
		newLeaseCommand(client),
		newVMCommand(client),
		newEventsCommand(client),
		newAuditCommand(client),
		newBenchCommand(),
	)
	return root
}
