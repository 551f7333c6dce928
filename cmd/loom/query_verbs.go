package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/loomctl/loom/events"
)

// The query verbs (vm, host, image, net and lease get and list) are built
// once, over a source of answers: the live read models, or read models
// replayed to a point of the history (loom audit replay). So both take the
// same arguments and print the same way.

// answers is where a query verb gets its answers.
type answers struct {
	// ask answers a query, or returns its Fault.
	ask func(ctx context.Context, kind events.Kind, verb string, q events.Query) (*events.QueryReply, error)
	// now is the moment the answers describe, for times shown as "ago":
	// the clock for live answers, the stored time of the point replayed.
	now time.Time
}

// querySource makes the RunE of a query verb: it gets answers, runs fn
// with them, and lets go of them.
type querySource func(fn func(cmd *cobra.Command, args []string, a *answers) error) func(*cobra.Command, []string) error

// liveQueries answers from the control plane's read models, over loom.q.*.
func (f *clientFlags) liveQueries(fn func(cmd *cobra.Command, args []string, a *answers) error) func(*cobra.Command, []string) error {
	return f.withClient(func(cmd *cobra.Command, args []string, c *client) error {
		return fn(cmd, args, &answers{ask: c.query, now: time.Now()})
	})
}

// vmQueryVerbs are vm list and vm get.
func vmQueryVerbs(flags *clientFlags, source querySource) []*cobra.Command {
	var host string
	var all, unconverged bool
	list := &cobra.Command{
		Use: "list", Short: "List VMs", Args: cobra.NoArgs,
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindVM, events.VerbList, events.Query{Host: host, IncludeGone: all})
			if err != nil {
				return err
			}
			vms := reply.VMs
			if unconverged {
				vms = slices.DeleteFunc(vms, func(vm events.VMView) bool { return vm.Converged })
			}
			return printVMs(cmd.OutOrStdout(), flags.output, vms)
		}),
	}
	list.Flags().StringVar(&host, "host", "", "only VMs on this host")
	list.Flags().BoolVar(&all, "all", false, "include deleted VMs")
	list.Flags().BoolVar(&unconverged, "unconverged", false, "only VMs whose host has not reported them as their goal says")

	get := &cobra.Command{
		Use: "get NAME", Short: "Show a VM: its goal, what its host observed, and whether they agree", Args: cobra.ExactArgs(1),
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindVM, events.VerbGet, events.Query{Name: args[0]})
			if err != nil {
				return err
			}
			if len(reply.VMs) != 1 {
				return events.Errorf(events.CodeVMNotFound, "no VM %q", args[0])
			}
			return printVM(cmd.OutOrStdout(), flags.output, &reply.VMs[0], a.now)
		}),
	}
	return []*cobra.Command{list, get}
}

// hostQueryVerbs are host list and host get.
func hostQueryVerbs(flags *clientFlags, source querySource) []*cobra.Command {
	list := &cobra.Command{
		Use: "list", Short: "List hosts with their capacity", Args: cobra.NoArgs,
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindHost, events.VerbList, events.Query{})
			if err != nil {
				return err
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), reply.Hosts)
			}
			return printHosts(cmd.OutOrStdout(), reply.Hosts)
		}),
	}
	get := &cobra.Command{
		Use: "get NAME", Short: "Show a host with its capacity", Args: cobra.ExactArgs(1),
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindHost, events.VerbGet, events.Query{Name: args[0]})
			if err != nil {
				return err
			}
			if len(reply.Hosts) != 1 {
				return events.Errorf(events.CodeHostNotFound, "no host %q", args[0])
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), reply.Hosts[0])
			}
			return printHosts(cmd.OutOrStdout(), reply.Hosts)
		}),
	}
	return []*cobra.Command{list, get}
}

// imageQueryVerbs are image list and image get.
func imageQueryVerbs(flags *clientFlags, source querySource) []*cobra.Command {
	list := &cobra.Command{
		Use: "list", Short: "List images", Args: cobra.NoArgs,
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindImage, events.VerbList, events.Query{})
			if err != nil {
				return err
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), reply.Images)
			}
			return printImages(cmd.OutOrStdout(), reply.Images)
		}),
	}
	get := &cobra.Command{
		Use: "get NAME", Short: "Show an image", Args: cobra.ExactArgs(1),
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindImage, events.VerbGet, events.Query{Name: args[0]})
			if err != nil {
				return err
			}
			if len(reply.Images) != 1 {
				return events.Errorf(events.CodeImageNotFound, "no image %q", args[0])
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), reply.Images[0])
			}
			return printImages(cmd.OutOrStdout(), reply.Images)
		}),
	}
	return []*cobra.Command{list, get}
}

// netQueryVerbs are net get and net list.
func netQueryVerbs(flags *clientFlags, source querySource) []*cobra.Command {
	get := &cobra.Command{
		Use: "get NAME", Short: "Show a network and where each of its addresses is: the VM, its host, the host's tunnel endpoint", Args: cobra.ExactArgs(1),
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindNet, events.VerbGet, events.Query{Name: args[0]})
			if err != nil {
				return err
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), reply.Nets)
			}
			var rows [][]string
			for _, n := range reply.Nets {
				for _, b := range n.Bindings {
					rows = append(rows, []string{n.Name, n.CIDR, strconv.FormatUint(uint64(n.VNI), 10), b.Addr, b.MAC, b.VM, b.Host, orDash(b.Endpoint)})
				}
				if len(n.Bindings) == 0 {
					rows = append(rows, []string{n.Name, n.CIDR, strconv.FormatUint(uint64(n.VNI), 10), "-", "-", "-", "-", "-"})
				}
			}
			return table(cmd.OutOrStdout(), []string{"NET", "CIDR", "VNI", "ADDRESS", "MAC", "VM", "HOST", "ENDPOINT"}, rows)
		}),
	}
	list := &cobra.Command{
		Use: "list", Short: "List networks", Args: cobra.NoArgs,
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindNet, events.VerbList, events.Query{})
			if err != nil {
				return err
			}
			if flags.output == "json" {
				return printJSON(cmd.OutOrStdout(), reply.Nets)
			}
			rows := make([][]string, 0, len(reply.Nets))
			for _, n := range reply.Nets {
				rows = append(rows, []string{n.Name, n.CIDR, strconv.FormatUint(uint64(n.VNI), 10), strconv.Itoa(len(n.Bindings))})
			}
			return table(cmd.OutOrStdout(), []string{"NET", "CIDR", "VNI", "ADDRESSES"}, rows)
		}),
	}
	return []*cobra.Command{get, list}
}

// leaseQueryVerbs are lease list and lease get.
func leaseQueryVerbs(flags *clientFlags, source querySource) []*cobra.Command {
	var filter events.Query
	list := &cobra.Command{
		Use: "list", Short: "List the standing grants", Args: cobra.NoArgs,
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindLease, events.VerbList, filter)
			if err != nil {
				return err
			}
			return printGrants(cmd.OutOrStdout(), flags.output, reply.Leases)
		}),
	}
	list.Flags().StringVar(&filter.Resource, "resource", "", "only this resource (image/NAME or disk/NAME)")
	list.Flags().StringVar(&filter.Host, "host", "", "only grants whose holder runs on this host")
	list.Flags().StringVar(&filter.Holder, "holder", "", "only this holder's grants (a VM's UID)")

	get := &cobra.Command{
		Use: "get RESOURCE", Short: "Show the grants on one resource (image/NAME or disk/NAME)", Args: cobra.ExactArgs(1),
		RunE: source(func(cmd *cobra.Command, args []string, a *answers) error {
			reply, err := a.ask(cmd.Context(), events.KindLease, events.VerbGet, events.Query{Name: args[0]})
			if err != nil {
				return err
			}
			return printGrants(cmd.OutOrStdout(), flags.output, reply.Leases)
		}),
	}
	return []*cobra.Command{list, get}
}

func printVMs(w io.Writer, output string, vms []events.VMView) error {
	if output == "json" {
		return printJSON(w, vms)
	}
	rows := make([][]string, 0, len(vms))
	for _, vm := range vms {
		rows = append(rows, []string{vm.Name, orDash(vm.Host), string(vm.Desired), orDash(string(vm.Observed.State)),
			strconv.FormatBool(vm.Converged), strconv.Itoa(vm.CPU), strconv.Itoa(vm.MemoryMiB), vm.Image})
	}
	return table(w, []string{"VM", "HOST", "GOAL", "OBSERVED", "CONVERGED", "CPU", "MEM", "IMAGE"}, rows)
}

func printHosts(w io.Writer, hosts []events.HostView) error {
	rows := make([][]string, 0, len(hosts))
	for _, h := range hosts {
		state := "ready"
		switch {
		case h.Lost:
			state = "lost"
		case h.Cordoned:
			state = "cordoned"
		}
		orphans := make([]string, 0, len(h.Orphans))
		for name := range h.Orphans {
			orphans = append(orphans, name)
		}
		sort.Strings(orphans)
		rows = append(rows, []string{h.Name, state,
			fmt.Sprintf("%d/%d", h.UsedCPU, h.CPU), fmt.Sprintf("%d/%d", h.UsedMiB, h.MemoryMiB),
			strconv.Itoa(h.VMs), orDash(strings.Join(orphans, ",")), keyShown(h.Key)})
	}
	return table(w, []string{"HOST", "STATE", "CPU USED", "MEM USED (MiB)", "VMS", "ORPHANS", "KEY"}, rows)
}

// keyShown is a host's key as tables show it: enough to tell keys apart
// (-o json has it whole), or that the host's observations are unsigned.
func keyShown(key string) string {
	if key == "" {
		return "none (unsigned)"
	}
	return key[:12] + "…"
}

func printImages(w io.Writer, images []events.ImageState) error {
	rows := make([][]string, 0, len(images))
	for _, im := range images {
		rows = append(rows, []string{im.Name, im.Format, strconv.FormatInt(im.SizeBytes, 10), orDash(im.Source)})
	}
	return table(w, []string{"IMAGE", "FORMAT", "SIZE", "SOURCE"}, rows)
}
