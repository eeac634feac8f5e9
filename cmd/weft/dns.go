package main

import (
	"fmt"
	"net/url"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

func newDNSCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dns",
		Short: "Manage service DNS names that do not come from CNI",
	}
	var services []string
	add := &cobra.Command{
		Use:   "add NAME IP...",
		Short: "Answer NAME (without the domain) with these addresses, from every peer; repeating it is harmless",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return client(cmd).Post(cmd.Context(), "/v1/dns/add", router.DNSRequest{Name: args[0], Addrs: args[1:], Services: services}, nil)
		},
	}
	add.Flags().StringSliceVar(&services, "service", nil, "also publish SRV records, SERVICE/PROTO/PORT (e.g. http/tcp/80)")
	remove := &cobra.Command{
		Use:   "remove NAME [IP...]",
		Short: "Stop answering NAME with these addresses (all of this peer's, if none are given)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return client(cmd).Post(cmd.Context(), "/v1/dns/remove", router.DNSRequest{Name: args[0], Addrs: args[1:]}, nil)
		},
	}
	var asJSON bool
	lookup := &cobra.Command{
		Use:   "lookup NAME",
		Short: "Show the addresses NAME resolves to across the mesh, and which peer published each",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var ans router.DNSAnswer
			if err := client(cmd).Get(cmd.Context(), "/v1/dns/lookup?name="+url.QueryEscape(args[0]), &ans); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, ans)
			}
			if len(ans.Addrs) == 0 {
				return fmt.Errorf("%s: no such name", ans.Name)
			}
			for _, a := range ans.Addrs {
				fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\n", a.Addr, a.Peer)
			}
			return nil
		},
	}
	lookup.Flags().BoolVar(&asJSON, "json", false, "print JSON for scripts")
	cmd.AddCommand(add, remove, lookup)
	return cmd
}
