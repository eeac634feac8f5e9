package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

func newConnectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "connect ADDR",
		Short: "Add a seed (host[:port]) the peer joins now and rejoins whenever it is not a member",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return client(cmd).Post(cmd.Context(), "/v1/connect", router.AddressRequest{Address: args[0]}, nil)
		},
	}
}

func newForgetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "forget ADDR",
		Short: "Stop using a seed; peers already met stay members",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return client(cmd).Post(cmd.Context(), "/v1/forget", router.AddressRequest{Address: args[0]}, nil)
		},
	}
}

func newRotateKeyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rotate-key",
		Short: "Make a new WireGuard key; peers switch to it as the gossip reaches them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var res map[string]string
			if err := client(cmd).Post(cmd.Context(), "/v1/rotate-key", struct{}{}, &res); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), "new public key", res["public_key"])
			return nil
		},
	}
}

func newRmpeerCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rmpeer NAME",
		Short: "Return a gone peer's address blocks to the pool (safe to repeat, from any peer)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var res router.RemovePeerResult
			if err := client(cmd).Post(cmd.Context(), "/v1/rmpeer", router.RemovePeerRequest{Name: args[0], Force: force}, &res); err != nil {
				return err
			}
			if len(res.Released) == 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "%s owns no blocks\n", args[0])
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "released %d blocks of %s: %s\n", len(res.Released), args[0], strings.Join(res.Released, " "))
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "remove even if the mesh still sees the peer alive")
	return cmd
}
