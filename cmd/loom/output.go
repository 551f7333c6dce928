package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/loomctl/loom/events"
)

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table writes rows aligned in columns under a header.
func table(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// printReply reports what a command appended.
func printReply(w io.Writer, output string, reply *events.Reply) error {
	if output == "json" {
		return printJSON(w, reply)
	}
	if len(reply.Events) == 0 {
		fmt.Fprintln(w, "nothing to do: already so")
		return nil
	}
	for _, e := range reply.Events {
		again := ""
		if reply.Replayed {
			again = " (already done earlier; original result)"
		}
		fmt.Fprintf(w, "#%d %s %s%s\n", e.Seq, e.Type, e.Subject, again)
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func ago(at events.UnixNano) string { return agoFrom(time.Now(), at) }

// agoFrom shows at as how long before now.
func agoFrom(now time.Time, at events.UnixNano) string {
	if at == 0 {
		return "-"
	}
	return now.Sub(at.Time()).Round(time.Second).String() + " ago"
}
