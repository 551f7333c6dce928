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
		dataDir  string
		hosts    []string
		clients  []string
		tlsNames []string
	)
	cmd := &cobra.Command{
		Use:   "init [--data-dir DIR] [--host NAME]... [--client NAME]...",
		Short: "Make the bus's identities: one nkey per role, one per host agent, one per named client",
		Long: `loom init makes, in DATA-DIR/creds, an nkey seed (mode 0600) for each identity
that has none yet: admin (creates and changes streams), plane (loom serve),
client (commands and queries), auditor (reads the event stream), agent-HOST
for each --host and client-NAME for each --client (a person or a service of
its own: the events its commands append name it as their actor, as the NATS
server attests it); and identities.json, their public keys and roles, which the
embedded server of loom serve and loom up lets in and nothing else. Seeds that
exist are kept: run it again to add hosts and clients; a running loom serve
lets them in within a second. Give each host's agent its own agent-HOST.nk
(loom agent --creds), each person their own client-NAME.nk (--creds), auditors their auditor.nk; keep admin.nk and plane.nk on the
control plane. It also makes a CA (ca.pem, which clients trust) and the
server's certificate (server.pem, server-key.pem); replace them with your own
if you have a CA. loom serve and loom up run it themselves.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, h := range hosts {
				if err := events.ValidateName("host", h); err != nil {
					return events.Errorf(events.CodeInvalidArgument, "--host: %v", err)
				}
			}
			for _, c := range clients {
				if err := events.ValidateName("client", c); err != nil {
					return events.Errorf(events.CodeInvalidArgument, "--client: %v", err)
				}
			}
			abs, err := filepath.Abs(dataDir)
			if err != nil {
				return err
			}
			dir := plane.CredsDir(abs)
			made, err := plane.InitCreds(dir, hosts, clients)
			if err != nil {
				return err
			}
			ids, err := plane.LoadIdentities(dir)
			if err != nil {
				return err
			}
			madeTLS, err := plane.InitTLS(dir, tlsNames)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "%s: %d identities, %d new\n", dir, len(ids), len(made))
			if madeTLS {
				fmt.Fprintf(w, "  made a CA (%s, what clients trust) and the server's certificate\n", plane.CAFile(dir))
			}
			for _, id := range ids {
				fmt.Fprintf(w, "  %-16s %-8s %s\n", id.Name(), id.Role, id.Key)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", defaultDataDir(), "the data directory whose creds/ to fill")
	cmd.Flags().StringArrayVar(&hosts, "host", nil, "a host whose agent needs an identity; repeat for several")
	cmd.Flags().StringArrayVar(&clients, "client", nil, "a person or service that needs a client identity of its own (client-NAME.nk); repeat for several")
	cmd.Flags().StringArrayVar(&tlsNames, "tls-name", nil, "a name or address clients reach the server by, besides localhost, the loopback addresses and this machine's name, for its certificate (only when it is first made)")
	return cmd
}
