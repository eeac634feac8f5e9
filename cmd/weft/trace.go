package main

import (
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

func newTraceCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "trace CONTAINER-or-IP",
		Short: "Show the path a packet from this peer to a container or address takes: owner, link modes, relays, per-hop figures",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var t router.Trace
			if err := client(cmd).Get(cmd.Context(), "/v1/trace?dst="+url.QueryEscape(args[0]), &t); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, t)
			}
			printTrace(cmd.OutOrStdout(), t)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func printTrace(out io.Writer, t router.Trace) {
	what := t.Address
	if t.Container != "" && t.Container != t.Address {
		what += " (" + t.Container + ")"
	}
	fmt.Fprintf(out, "trace %s", what)
	if t.Network != "" {
		fmt.Fprintf(out, ", network %s, block %s", t.Network, t.Block)
	}
	fmt.Fprintln(out)
	switch {
	case t.Owner == "":
		fmt.Fprintf(out, "owner  none: %s\n", t.Reason)
		return
	case t.Local:
		fmt.Fprintf(out, "owner  %s (this peer): %s\n", t.Owner, t.Reason)
		return
	}
	how := "direct link"
	if t.Relayed {
		how = "relayed"
	}
	fmt.Fprintf(out, "owner  %s, %s, first hop %s (%s)\n", t.Owner, how, orDash(t.Mode), orDash(t.State))
	ok := "ok"
	if !t.SLAOK {
		ok = "VIOLATED"
	}
	path := strings.Join(t.Path, " → ")
	if path == "" {
		path = "none"
	}
	fmt.Fprintf(out, "path   %s  rtt %.2fms  jitter %.2fms  loss %.1f%%  (%s)  sla %s %s\n", path, t.RTTms, t.JitterMs, t.Loss*100, t.Figures, orDash(t.SLA), ok)
	if t.Reason != "" {
		fmt.Fprintf(out, "why    %s\n", t.Reason)
	}
	if len(t.Hops) == 0 {
		return
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "HOP\tMODE\tRTT\tJITTER\tLOSS\tSTATE\tFIGURES")
	for _, h := range t.Hops {
		state := "up"
		if !h.Up {
			state = "down"
		}
		fmt.Fprintf(tw, "%s → %s\t%s\t%.2fms\t%.2fms\t%.1f%%\t%s\t%s\n", h.From, h.To, orDash(h.Mode), h.RTTms, h.JitterMs, h.Loss*100, state, h.Figures)
	}
	tw.Flush()
}
