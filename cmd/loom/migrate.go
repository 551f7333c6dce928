package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

// newMigrateCommand is `loom vm migrate`.
func newMigrateCommand(flags *clientFlags) *cobra.Command {
	var body events.MigrateVM
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "migrate NAME [--to HOST] [--cancel]",
		Short: "Move a running VM to another host while it runs (live migration); --cancel asks its host to abort",
		Long: `loom vm migrate moves a running VM to --to HOST, or to the host with the most free memory
that can take it, copying its disk while the guest runs. With --wait it shows the copy's progress
and, at the end, libvirt's own downtime figure (how long the guest was paused at the switch-over)
and the migration's total time. A failed or cancelled migration leaves the VM running where it was.`,
		Args: cobra.ExactArgs(1),
		RunE: flags.withClient(func(cmd *cobra.Command, args []string, c *client) error {
			body.Name, body.CommandID = args[0], c.newCommandID()
			// Watch the VM's reports before asking, so no progress is missed.
			progress := make(chan events.VMProgress, 16)
			if wait > 0 && !body.Cancel {
				sub, err := c.nc.Subscribe(events.ObservationSubject("*", events.KindVM, body.Name), func(m *nats.Msg) {
					if events.Type(m.Header.Get(events.HeaderType)) != events.TypeVMProgress {
						return
					}
					rec, err := events.DecodeRecord(0, m.Subject, time.Now(), m.Data)
					if p, ok := rec.Event.(events.VMProgress); err == nil && ok && p.Step == "migrate" {
						select {
						case progress <- p:
						default:
						}
					}
				})
				if err != nil {
					return err
				}
				defer func() { _ = sub.Unsubscribe() }()
			}
			reply, err := c.command(cmd.Context(), events.KindVM, events.VerbMigrate, &body)
			if err != nil {
				return err
			}
			if err := printReply(cmd.OutOrStdout(), flags.output, reply); err != nil {
				return err
			}
			if wait <= 0 {
				return nil
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), wait)
			defer cancel()
			return followMigration(ctx, c, cmd.ErrOrStderr(), body.Name, reply.LastSeq(), progress)
		}),
	}
	cmd.Flags().StringVar(&body.To, "to", "", "the host to move to (default: the one with the most free memory that can take it)")
	cmd.Flags().BoolVar(&body.Cancel, "cancel", false, "ask the VM's host to abort its migration under way")
	cmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the migration to end, showing its progress (e.g. --wait 2m)")
	return cmd
}

// followMigration shows the progress of name's migration until the read
// model says it ended, then how it ended.
func followMigration(ctx context.Context, c *client, w io.Writer, name string, minSeq uint64, progress <-chan events.VMProgress) error {
	bar := progressbar.NewOptions64(-1, progressbar.OptionSetWriter(w), progressbar.OptionSetDescription("migrating "+name),
		progressbar.OptionShowBytes(true), progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish())
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	var migration string
	for {
		select {
		case <-ctx.Done():
			_ = bar.Finish()
			return events.Errorf(events.CodeTimeout, "migration of %s did not end in time (it goes on; loom vm get %s shows it)", name, name)
		case p := <-progress:
			if p.Total > 0 {
				bar.ChangeMax64(p.Total)
				_ = bar.Set64(p.Done)
			}
		case <-tick.C:
			vm, err := getVM(ctx, c, name, minSeq)
			if err != nil {
				continue
			}
			if vm.Migration != nil {
				migration = vm.Migration.ID
				continue
			}
			last := vm.LastMigration
			if last == nil || (migration != "" && last.ID != migration) {
				continue
			}
			_ = bar.Finish()
			if !last.Moved {
				fmt.Fprintf(w, "%s stays on %s: migration %s %s", name, last.From, last.ID, last.Reason)
				if last.Fault != nil {
					fmt.Fprintf(w, ": %s", last.Fault.Error())
				}
				fmt.Fprintln(w)
				return last.Fault
			}
			fmt.Fprintf(w, "%s moved from %s to %s in %s; libvirt's downtime (guest paused at the switch-over): %s\n",
				name, last.From, last.To, time.Duration(last.TotalMillis)*time.Millisecond, time.Duration(last.DowntimeMillis)*time.Millisecond)
			if last.UnreachableMillis > 0 {
				fmt.Fprintf(w, "its address went unanswered from %s for %s (probed from %s's port on its net)\n",
					last.From, time.Duration(last.UnreachableMillis)*time.Millisecond, last.From)
			} else {
				fmt.Fprintf(w, "its address was not probed (%s has no port on the VM's net: loom net attach)\n", last.From)
			}
			return nil
		}
	}
}
