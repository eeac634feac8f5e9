// Command weft is the weft peer daemon (`weft peer`) and the operator CLI that talks to it.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "weft:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "weft",
		Short: "weft: a decentralized container mesh network",
		Long: "weft runs one peer per host (weft peer) and attaches containers through the weft CNI plugin.\n" +
			"Every flag can also be set from the environment: --some-flag is WEFT_SOME_FLAG.",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return flagsFromEnv(cmd.Flags())
		},
	}
	root.PersistentFlags().String("socket", "/run/weft/weft.sock", "control socket of the peer")
	root.AddCommand(newPeerCmd(), newStatusCmd(), newConnectCmd(), newForgetCmd(), newRmpeerCmd(), newRotateKeyCmd(), newDNSCmd(), newNetworkCmd(), newCapacityCmd(), newPolicyCmd(), newLabelCmd(), newPerfCmd(), newTraceCmd(), newTopCmd(), newKeygenCmd(), newVersionCmd())
	return root
}

// envName is the environment variable that stands for a flag: --ipalloc-range is
// WEFT_IPALLOC_RANGE.
func envName(flag string) string {
	return "WEFT_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// flagsFromEnv sets every flag not given on the command line from its WEFT_* variable, so
// the command line wins over the environment, which wins over the default.
func flagsFromEnv(flags *pflag.FlagSet) error {
	var err error
	flags.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Changed {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if serr := flags.Set(f.Name, v); serr != nil {
				err = fmt.Errorf("%s=%q: %w", envName(f.Name), v, serr)
			}
		}
	})
	return err
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "weft", version) },
	}
}
