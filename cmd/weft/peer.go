package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/router"
)

func newPeerCmd() *cobra.Command {
	def := router.DefaultConfig()
	host, _ := os.Hostname()
	var (
		name, dataDir, httpAddr, ipRange, logLevel string
		mtu                                        int
	)
	cmd := &cobra.Command{
		Use:   "peer",
		Short: "Run the weft peer daemon on this host",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
			}
			prefix, err := netip.ParsePrefix(ipRange)
			if err != nil {
				return fmt.Errorf("--ipalloc-range %q: %w", ipRange, err)
			}
			socket, _ := cmd.Flags().GetString("socket")
			cfg := def
			cfg.Name, cfg.DataDir, cfg.Socket, cfg.HTTPAddr = name, dataDir, socket, httpAddr
			cfg.IPAllocRange, cfg.MTU, cfg.Version = prefix, mtu, version
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("peer", name)
			p, err := router.New(cfg)
			if err != nil {
				return err
			}
			return p.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&name, "name", host, "this peer's name, unique in the mesh")
	f.StringVar(&dataDir, "data-dir", def.DataDir, "where the peer keeps its database")
	f.StringVar(&httpAddr, "http-addr", def.HTTPAddr, "loopback address for /metrics, /status and the status page (empty: off)")
	f.StringVar(&ipRange, "ipalloc-range", def.IPAllocRange.String(), "address range of the default network")
	f.IntVar(&mtu, "mtu", def.MTU, "MTU of container interfaces and bridges")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}
