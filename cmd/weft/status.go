package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/router"
)

func newStatusCmd() *cobra.Command {
	cmd := statusCommand("status", "Show the peer's networks, address blocks and attachments", "/v1/status",
		func() any { return &router.Status{} }, func(out io.Writer, v any) { printStatus(out, *v.(*router.Status)) })
	cmd.AddCommand(
		statusCommand("peers", "List the peers of the mesh with state, address, capabilities and SR-IOV VFs (free/total per PF)", "/v1/peers",
			func() any { return &[]router.PeerStatus{} }, func(out io.Writer, v any) { printPeers(out, *v.(*[]router.PeerStatus)) }),
		statusCommand("connections", "Show, per remote peer and network, the link mode, underlay address, state and why", "/v1/connections",
			func() any { return &[]router.Connection{} }, func(out io.Writer, v any) { printConnections(out, *v.(*[]router.Connection)) }),
		statusCommand("routes", "Show, per remote peer (and per SLA class when networks have classes of their own), the chosen path, the networks it serves, its measured RTT, jitter and loss, and whether the SLA holds", "/v1/routes",
			func() any { return &[]router.Route{} }, func(out io.Writer, v any) { printRoutes(out, *v.(*[]router.Route)) }),
		statusCommand("segments", "Show, per peer and network, each segment of the path (container↔bridge, underlay, link, remote container↔bridge, end to end) against its baseline and which one grew; and the counters of the interfaces weft owns", "/v1/segments",
			func() any { return &router.SegmentsStatus{} }, func(out io.Writer, v any) { printSegments(out, *v.(*router.SegmentsStatus)) }),
		statusCommand("ipam", "Show the address range, every peer's blocks, the Raft leader and voters", "/v1/ipam",
			func() any { return &router.IPAMStatus{} }, func(out io.Writer, v any) { printIPAM(out, *v.(*router.IPAMStatus)) }),
		newStatusRatesCmd(), // cmd/weft/rates.go
	)
	return cmd
}

// statusCommand fetches path from the peer and prints it as a table, or as JSON with --json.
func statusCommand(use, short, path string, newValue func() any, print func(io.Writer, any)) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := newValue()
			if err := client(cmd).Get(cmd.Context(), path, v); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, v)
			}
			print(cmd.OutOrStdout(), v)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func printJSON(cmd *cobra.Command, v any) error {
	enc := json.NewEncoder(cmd.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func client(cmd *cobra.Command) *cni.Client {
	socket, _ := cmd.Flags().GetString("socket")
	return cni.NewClient(socket, 30*time.Second)
}

func printPeers(out io.Writer, peers []router.PeerStatus) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	// SR-IOV comes last: its cells hold spaces, and scripts splitting rows on blanks keep
	// finding the other columns where they were.
	fmt.Fprintln(tw, "NAME\tSTATE\tADDRESS\tRAFT\tCAPABILITIES\tSINCE\tSR-IOV")
	for _, p := range peers {
		name := p.Name
		if p.Self {
			name += " (self)"
		}
		raft := p.RaftRole
		if raft == "" { // a peer of an older version
			raft = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, p.State, p.Address, raft, strings.Join(p.Capabilities, ","), p.Since.Format(time.RFC3339), formatSRIOV(p.SRIOV))
	}
	tw.Flush()
}

// formatSRIOV prints a peer's PFs as "ens1f0 3/4 (dpdk 1), ens1f1 0/8": free/total VFs,
// and how many of the free ones are bound to a DPDK driver when any are; "-" for none.
func formatSRIOV(pfs []router.PFStatus) string {
	if len(pfs) == 0 {
		return "-"
	}
	parts := make([]string, len(pfs))
	for i, c := range pfs {
		parts[i] = fmt.Sprintf("%s %d/%d", c.PF, c.Free, c.Total)
		if c.FreeDPDK > 0 {
			parts[i] += fmt.Sprintf(" (dpdk %d)", c.FreeDPDK)
		}
	}
	return strings.Join(parts, ", ")
}

// printConnections prints one row per (peer, network); the peer's name and address are
// written on its first row only, so the networks of one peer read as a group.
func printConnections(out io.Writer, conns []router.Connection) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tADDRESS\tNETWORK\tMODE\tSTATE\tBLOCKS\tREASON")
	prev := ""
	for _, c := range conns {
		peer, addr := c.Peer, c.Address
		if peer == prev {
			peer, addr = "", ""
		}
		prev = c.Peer
		reason := c.Reason
		if len(c.OutOfRange) > 0 {
			reason += fmt.Sprintf(" (%d blocks outside every network, not routed: %s)", len(c.OutOfRange), strings.Join(c.OutOfRange, ","))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", peer, addr, orDash(c.Network), orDash(c.Mode), c.State, len(c.Blocks), reason)
	}
	tw.Flush()
}

func printRoutes(out io.Writer, routes []router.Route) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tPATH\tNETWORKS\tRTT\tJITTER\tLOSS\tSLA\tSINCE\tWHY")
	for _, r := range routes {
		path := strings.Join(r.Path, " → ")
		if path == "" {
			path = "none"
		}
		ok := "ok"
		if !r.SLAOK {
			ok = "VIOLATED"
		}
		rtt := fmt.Sprintf("%.2fms", r.RTTms)
		switch {
		case r.Unmeasured:
			rtt, ok = "?", "unknown"
		case r.Estimated:
			rtt, ok = "~"+rtt+" (est.)", ok+" (est.)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.2fms\t%.1f%%\t%s %s\t%s\t%s\n", r.Peer, path, orDash(strings.Join(r.Networks, ",")), rtt, r.JitterMs, r.Loss*100,
			r.SLA, ok, r.Since.Format(time.TimeOnly), r.Reason)
		for _, h := range r.Hops {
			fmt.Fprintf(tw, "\t  %s → %s\t\t%.2fms\t%.2fms\t%.1f%%\t\t\t\n", h.From, h.To, h.RTTms, h.JitterMs, h.Loss*100)
		}
		// The direct link and the underlay under it, when the path does not show them.
		if len(r.Path) != 1 {
			printLink(tw, "direct link ("+orDash(r.Link)+")", r.Direct)
		}
		if len(r.Path) != 1 || r.Underlay.Up != r.Direct.Up {
			printLink(tw, "underlay", r.Underlay)
		}
	}
	tw.Flush()
}

// printSegments: one row per segment of each path, marked when it grew against its
// baseline, then the interface counters.
func printSegments(out io.Writer, st router.SegmentsStatus) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tNETWORK\tSEGMENT\tRTT p50\tLOSS\tBASELINE\tGREW")
	row := func(peer, network string, f router.SegmentFigure) {
		rtt, base, grew := "?", "-", ""
		if f.Samples > 0 {
			rtt = fmt.Sprintf("%.3fms", f.RTTms)
			if f.Estimated {
				rtt = "~" + rtt + " (sum)"
			}
		}
		if f.HasBaseline {
			base = fmt.Sprintf("%.3fms %.1f%%", f.BaselineRTTms, f.BaselineLoss*100)
		}
		if f.Grew {
			grew = fmt.Sprintf("GREW +%.3fms", f.RTTms-f.BaselineRTTms)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1f%%\t%s\t%s\n", peer, orDash(network), f.Segment, rtt, f.Loss*100, base, grew)
	}
	for _, b := range st.Bridges {
		row("(local)", b.Network, b.SegmentFigure)
	}
	for _, p := range st.Paths {
		for _, f := range p.Segments {
			row(p.Peer, p.Network, f)
		}
		slow := "none grew"
		if p.Slow != "" {
			slow = "slow segment: " + p.Slow
		}
		if p.LossCrossCheck != nil {
			slow += fmt.Sprintf("; tunnel loss (sender TX vs receiver RX) %.1f%%", *p.LossCrossCheck*100)
		}
		fmt.Fprintf(tw, "%s\t%s\t→ %s\t\t\t\t\n", p.Peer, orDash(p.Network), slow)
	}
	tw.Flush()
	fmt.Fprintln(out)
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IFACE\tKIND\tRX PKTS\tTX PKTS\tRX BYTES\tTX BYTES\tERRORS rx/tx\tDROPS rx/tx\tOVERRUNS")
	for _, f := range st.Interfaces {
		c := f.Counters
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d/%d\t%d/%d\t%d\n", f.Name, f.Kind, c.RxPackets, c.TxPackets, c.RxBytes, c.TxBytes,
			c.RxErrors, c.TxErrors, c.RxDropped, c.TxDropped, c.Overruns)
	}
	tw.Flush()
	if st.InterfacesDropped > 0 {
		fmt.Fprintf(out, "(%d more interfaces not shown)\n", st.InterfacesDropped)
	}
}

func printLink(tw io.Writer, what string, h router.Hop) {
	state := "up"
	if !h.Up {
		state = "down"
	}
	fmt.Fprintf(tw, "\t  %s: %s\t\t%.2fms\t%.2fms\t%.1f%%\t\t\t\n", what, state, h.RTTms, h.JitterMs, h.Loss*100)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func printIPAM(out io.Writer, st router.IPAMStatus) {
	leader := st.Leader
	if leader == "" {
		leader = "none (no quorum)"
	}
	fmt.Fprintf(out, "range %s  leader %s  this peer %s\nvoters %s  non-voters %s\n\n", st.Range, leader, st.State,
		strings.Join(st.Voters, ","), strings.Join(st.Nonvoters, ","))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tBLOCKS\tUSED\tFREE")
	for _, p := range st.Peers {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", p.Name, p.Blocks, optInt(p.Used), optInt(p.Free))
	}
	tw.Flush()
	fmt.Fprintln(out)
	fmt.Fprintln(tw, "BLOCK\tNETWORK\tOWNER\tUSED\tFREE")
	for _, b := range st.Blocks {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", b.CIDR, b.Network, b.Owner, optInt(b.Used), optInt(b.Free))
	}
	tw.Flush()
}

// optInt prints a count that may not be known yet (usage travels by gossip).
func optInt(v *int) string {
	if v == nil {
		return "?"
	}
	return fmt.Sprint(*v)
}

func printStatus(out io.Writer, st router.Status) {
	fmt.Fprintf(out, "peer %s  version %s  up %s  data %s\n\n", st.Name, st.Version, st.Uptime, st.DataDir)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NETWORK\tSUBNET\tBRIDGE\tGATEWAY\tMTU\tBLOCKS\tUSED\tFREE")
	for _, n := range st.Networks {
		used, free := 0, 0
		var blocks []string
		for _, b := range n.Blocks {
			used, free = used+b.Used, free+b.Free
			blocks = append(blocks, b.CIDR.String())
		}
		if len(blocks) == 0 {
			blocks = []string{"-"}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%d\t%d\n", n.Name, n.Subnet, n.Bridge, n.Gateway, n.MTU, strings.Join(blocks, ","), used, free)
	}
	tw.Flush()
	fmt.Fprintln(out)
	if len(st.Attachments) == 0 {
		fmt.Fprintln(out, "no attachments")
		return
	}
	ids := make([]string, len(st.Attachments))
	for i, a := range st.Attachments {
		ids[i] = a.ContainerID
	}
	short := shortIDs(ids, 12)
	fmt.Fprintln(tw, "NAME\tADDRESS\tNETWORK\tCONTAINER\tIFNAME\tHOST-IF\tLABELS")
	for _, a := range st.Attachments {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.Name, a.Address, a.Network, short[a.ContainerID], a.IfName, a.HostIfName, formatLabels(a.Labels))
	}
	tw.Flush()
}

// shortIDs maps every ID to its shortest prefix of at least minLen characters that no other
// (different) ID starts with, like docker's and git's short IDs: two containers never read
// the same, and an ID no longer than that prefix is shown whole. O(n log n) in the number of
// IDs: after sorting, the longest prefix an ID shares with any other is the one it shares
// with a neighbour.
func shortIDs(ids []string, minLen int) map[string]string {
	sorted := slices.Clone(ids)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	out := make(map[string]string, len(sorted))
	for i, id := range sorted {
		n := minLen
		if i > 0 {
			n = max(n, commonPrefixLen(id, sorted[i-1])+1)
		}
		if i+1 < len(sorted) {
			n = max(n, commonPrefixLen(id, sorted[i+1])+1)
		}
		out[id] = id[:min(n, len(id))]
	}
	return out
}

func commonPrefixLen(a, b string) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}
