package main

import (
	"fmt"
	"io"
	"net/url"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

func newCapacityCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "capacity NETWORK",
		Short: "List the peers a container of NETWORK fits on: for an SR-IOV network, those with a free VF of the kind it takes, most free first",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var c router.Capacity
			if err := client(cmd).Get(cmd.Context(), "/v1/capacity?network="+url.QueryEscape(args[0]), &c); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, c)
			}
			printCapacity(cmd.OutOrStdout(), c)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for schedulers and scripts")
	return cmd
}

// vfKind says in words which VFs an SR-IOV network's --dpdk choice takes.
func vfKind(dpdk string) string {
	switch dpdk {
	case "on":
		return "VFs bound to a DPDK driver"
	case "off":
		return "netdev VFs"
	case "auto", "":
		return "VFs of either kind"
	}
	return "VFs (dpdk " + dpdk + ")"
}

func printCapacity(out io.Writer, c router.Capacity) {
	if c.Mode != "sriov" {
		fmt.Fprintf(out, "network %s (%s) fits on every alive peer:\n", c.Network, c.Mode)
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PEER\tADDRESS")
		for _, p := range c.Peers {
			fmt.Fprintf(tw, "%s\t%s\n", p.Name, p.Address)
		}
		tw.Flush()
		return
	}
	kind := vfKind(c.DPDK)
	if len(c.Peers) == 0 {
		fmt.Fprintf(out, "network %s (sriov on %s) fits nowhere: no alive peer has free %s on %s\n", c.Network, c.PF, kind, c.PF)
		return
	}
	fmt.Fprintf(out, "network %s (sriov on %s) takes %s; free on:\n", c.Network, c.PF, kind)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tADDRESS\tFREE\tTOTAL")
	for _, p := range c.Peers {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", p.Name, p.Address, p.Free, p.Total)
	}
	tw.Flush()
}
