package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/cmd/loom/plane"
	"github.com/loomctl/loom/events"
)

func newInitCommand() *cobra.Command {
	var (
		dataDir string
		hosts   []string
	)
	cmd := &cobra.Command{
		Use:   "init [--data-dir DIR] [--host NAME]...",
		Short: "Make the bus's identities: one nkey per role, and one per host agent",
		Long: `loom init makes, in DATA-DIR/creds, an nkey seed (mode 0600) for each identity
that has none yet: admin (creates and changes streams), plane (loom serve),
client (commands and queries), auditor (reads the event stream) and agent-HOST
for each --host; and identities.json, their public keys and roles, which the
embedded server of loom serve and loom up lets in and nothing else. Seeds that
exist are kept: run it again to add hosts, then restart loom serve. Give each
host's agent its own agent-HOST.nk (loom agent --creds), people their
client.nk, auditors their auditor.nk; keep admin.nk and plane.nk on the
control plane. loom serve and loom up run it themselves.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, h := range hosts {
				if err := events.ValidateName("host", h); err != nil {
					return events.Errorf(events.CodeInvalidArgument, "--host: %v", err)
				}
			}
			abs, err := filepath.Abs(dataDir)
			if err != nil {
				return err
			}
			dir := plane.CredsDir(abs)
			made, err := plane.InitCreds(dir, hosts)
			if err != nil {
				return err
			}
			ids, err := plane.LoadIdentities(dir)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "%s: %d identities, %d new\n", dir, len(ids), len(made))
			for _, id := range ids {
				fmt.Fprintf(w, "  %-16s %-8s %s\n", id.Name(), id.Role, id.Key)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", defaultDataDir(), "the data directory whose creds/ to fill")
	cmd.Flags().StringArrayVar(&hosts, "host", nil, "a host whose agent needs an identity; repeat for several")
	return cmd
}
