package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/router"
)

func newStatusCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the peer's networks, address blocks and attachments",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			socket, _ := cmd.Flags().GetString("socket")
			var st router.Status
			if err := cni.NewClient(socket, 10*time.Second).Get(cmd.Context(), "/v1/status", &st); err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
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
	fmt.Fprintln(tw, "NAME\tADDRESS\tNETWORK\tCONTAINER\tIFNAME\tHOST-IF")
	for _, a := range st.Attachments {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", a.Name, a.Address, a.Network, shortID(a.ContainerID), a.IfName, a.HostIfName)
	}
	tw.Flush()
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
