package main

import (
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

// newNetworkCmd is `weft network`: networks are replicated objects (in the Raft state), so
// any peer's socket serves them; a write is forwarded to the Raft leader.
func newNetworkCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "network",
		Short: "Create, list, inspect and remove the cluster's networks",
		Args:  cobra.NoArgs,
		// Only --socket comes from the environment here: a definition replicated to every
		// host must say what the operator typed, not what this host's WEFT_MTU, WEFT_ENCRYPT
		// or WEFT_SLA (the daemon's own settings) happen to be.
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags().Lookup("socket")
			if f == nil || f.Changed {
				return nil
			}
			if v, ok := os.LookupEnv(envName("socket")); ok {
				return cmd.Flags().Set("socket", v)
			}
			return nil
		},
	}
	cmd.AddCommand(newNetworkCreateCmd(), newNetworkLsCmd(), newNetworkInspectCmd(), newNetworkRmCmd())
	return cmd
}

func newNetworkCreateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "create NAME --subnet CIDR",
		Short: "Define a network in the cluster (every peer sees it); its range may overlap no other network and no peer's underlay",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := networkRequest(cmd, args[0])
			if err != nil {
				return err
			}
			var info router.NetworkInfo
			if err := client(cmd).Post(cmd.Context(), "/v1/networks", req, &info); err != nil {
				return err
			}
			mode := ""
			if info.Mode != "" {
				mode = ", " + modeOf(info)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created network %s %s (/%d blocks, gateway %s, %s%s)\n", info.Name, info.Subnet, info.BlockSize, info.Gateway, isolation(info.Isolated), mode)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.String("subnet", "", "the network's IPv4 range, /8 to /24 (required)")
	fl.Int("block-size", 26, "prefix length of the blocks peers claim from the range")
	fl.Int("mtu", 0, "MTU of the network's interfaces (0: each peer's --mtu)")
	fl.String("encrypt", "", "never, auto or always (empty: each peer's --encrypt)")
	fl.String("sla", "", `SLA class of the network's traffic, e.g. "gold: rtt<=5ms,loss<=0.1%" (empty: each peer's --sla)`)
	fl.Bool("isolated", true, "containers on other networks may not reach this one; --isolated=false routes it like the default network")
	fl.String("mode", "", "how containers attach: empty for a veth on the network's bridge, sriov for a virtual function of --pf")
	fl.String("pf", "", "with --mode sriov: the physical function whose VFs the network hands out, e.g. ens1f0")
	fl.Int("vlan", 0, "with --mode sriov: VLAN tag of the VFs on the PF (0: untagged)")
	fl.String("dpdk", "", "with --mode sriov: auto (either kind of VF), on (only VFs bound to a userspace driver, by PCI address) or off (only netdevs)")
	// Per-container rates (#15): bits per second and bits, with units bit, kbit, mbit, gbit.
	fl.String("ingress-rate", "", "default rate into each container, e.g. 10mbit (empty: unlimited; the runtime's bandwidth capability overrides it)")
	fl.String("ingress-burst", "", "burst into each container, e.g. 16kbit (empty or larger: 2 ms of the rate; at least one frame)")
	fl.String("egress-rate", "", "default rate out of each container, e.g. 20mbit (empty: unlimited)")
	fl.String("egress-burst", "", "burst out of each container (empty or larger: 2 ms of the rate; at least one frame)")
	cmd.MarkFlagRequired("subnet")
	return cmd
}

// networkRequest builds the create request from the flags: only what was given travels, so
// the peer applies its defaults (isolated unless --isolated=false). Pure over the flags.
func networkRequest(cmd *cobra.Command, name string) (router.NetworkRequest, error) {
	fl := cmd.Flags()
	req := router.NetworkRequest{Name: name}
	var err error
	if req.Subnet, err = fl.GetString("subnet"); err != nil {
		return req, err
	}
	if req.Subnet == "" {
		return req, fmt.Errorf("network create %s: --subnet is required", name)
	}
	if req.BlockSize, err = fl.GetInt("block-size"); err != nil {
		return req, err
	}
	if req.MTU, err = fl.GetInt("mtu"); err != nil {
		return req, err
	}
	if req.Encrypt, err = fl.GetString("encrypt"); err != nil {
		return req, err
	}
	if req.SLA, err = fl.GetString("sla"); err != nil {
		return req, err
	}
	if req.Mode, err = fl.GetString("mode"); err != nil {
		return req, err
	}
	if req.PF, err = fl.GetString("pf"); err != nil {
		return req, err
	}
	if req.VLAN, err = fl.GetInt("vlan"); err != nil {
		return req, err
	}
	if req.DPDK, err = fl.GetString("dpdk"); err != nil {
		return req, err
	}
	if err := rateFlags(cmd, &req); err != nil {
		return req, err
	}
	if fl.Changed("isolated") {
		iso, err := fl.GetBool("isolated")
		if err != nil {
			return req, err
		}
		req.Isolated = &iso
	}
	return req, nil
}

func newNetworkLsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the cluster's networks",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var nets []router.NetworkInfo
			if err := client(cmd).Get(cmd.Context(), "/v1/networks", &nets); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, nets)
			}
			printNetworks(cmd.OutOrStdout(), nets)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newNetworkInspectCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show one network's definition and its blocks with their owners",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var info router.NetworkInfo
			if err := client(cmd).Get(cmd.Context(), "/v1/networks/"+url.PathEscape(args[0]), &info); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, info)
			}
			printNetwork(cmd.OutOrStdout(), info)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	return cmd
}

func newNetworkRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME",
		Short: "Remove a network; refused for default and while any peer owns a block of it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := client(cmd).Delete(cmd.Context(), "/v1/networks/"+url.PathEscape(args[0]), nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed network %s\n", args[0])
			return nil
		},
	}
}

func isolation(isolated bool) string {
	if isolated {
		return "isolated"
	}
	return "routed"
}

// orPeer shows an unset per-network setting as the peer's own flag.
func orPeer(v string) string {
	if v == "" || v == "0" {
		return "(peer)"
	}
	return v
}

// modeOf is how a network's containers attach, for people: "bridge", or "sriov pf X" with
// its VLAN and DPDK choice when set.
func modeOf(n router.NetworkInfo) string {
	if n.Mode == "" {
		return "bridge"
	}
	s := n.Mode + " pf " + n.PF
	if n.VLAN != 0 {
		s += " vlan " + strconv.Itoa(n.VLAN)
	}
	if n.DPDK != "" {
		s += " dpdk " + n.DPDK
	}
	return s
}

func printNetworks(out io.Writer, nets []router.NetworkInfo) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSUBNET\tBLOCKS\tGATEWAY\tMTU\tENCRYPT\tISOLATION\tSLA\tMODE\tPF")
	for _, n := range nets {
		mode, pf := n.Mode, n.PF
		if mode == "" {
			mode, pf = "bridge", "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t/%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, n.Subnet, n.BlockSize, n.Gateway,
			orPeer(strconv.Itoa(n.MTU)), orPeer(n.Encrypt), isolation(n.Isolated), orPeer(n.SLA), mode, pf)
	}
	tw.Flush()
}

func printNetwork(out io.Writer, n router.NetworkInfo) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "name:\t%s\n", n.Name)
	fmt.Fprintf(tw, "subnet:\t%s\n", n.Subnet)
	fmt.Fprintf(tw, "blocks:\t/%d\n", n.BlockSize)
	fmt.Fprintf(tw, "gateway:\t%s\n", n.Gateway)
	fmt.Fprintf(tw, "mtu:\t%s\n", orPeer(strconv.Itoa(n.MTU)))
	fmt.Fprintf(tw, "encrypt:\t%s\n", orPeer(n.Encrypt))
	fmt.Fprintf(tw, "isolation:\t%s\n", isolation(n.Isolated))
	fmt.Fprintf(tw, "sla:\t%s\n", orPeer(n.SLA))
	fmt.Fprintf(tw, "mode:\t%s\n", modeOf(n))
	if n.Mode != "" {
		fmt.Fprintf(tw, "pf:\t%s\n", n.PF)
		fmt.Fprintf(tw, "vlan:\t%d\n", n.VLAN)
		fmt.Fprintf(tw, "dpdk:\t%s\n", n.DPDK)
	}
	tw.Flush()
	if len(n.Blocks) == 0 {
		fmt.Fprintln(out, "no block owned")
		return
	}
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BLOCK\tOWNER")
	for _, b := range n.Blocks {
		fmt.Fprintf(tw, "%s\t%s\n", b.CIDR, b.Owner)
	}
	tw.Flush()
}
