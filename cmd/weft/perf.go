package main

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/router"
)

func newPerfCmd() *cobra.Command {
	var network, rate string
	var seconds int
	var asJSON, last bool
	cmd := &cobra.Command{
		Use:   "perf PEER",
		Short: "Measure throughput and latency to a test endpoint on PEER (bounded, rate-capped; both ends made by weft and removed after)",
		Long: "weft perf attaches a short-lived test endpoint to the network on this peer and on PEER, sends a TCP stream\n" +
			"paced at --rate for --seconds with UDP probes alongside, and prints the throughput the far end received,\n" +
			"RTT p50/p99, jitter and loss. Peers take part in one test at a time and cap the rate at their --perf-max-rate.\n" +
			"--last lists the results this peer recorded.",
		Args: func(cmd *cobra.Command, args []string) error {
			if last {
				return cobra.NoArgs(cmd, args)
			}
			return cobra.ExactArgs(1)(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			socket, _ := cmd.Flags().GetString("socket")
			if last {
				var results []router.PerfResult
				if err := client(cmd).Get(cmd.Context(), "/v1/perf", &results); err != nil {
					return err
				}
				if asJSON {
					return printJSON(cmd, results)
				}
				printPerfResults(cmd.OutOrStdout(), results)
				return nil
			}
			req := router.PerfRequest{Peer: args[0], Network: network, Seconds: seconds}
			if rate != "" {
				r, err := router.ParseRate(rate)
				if err != nil {
					return fmt.Errorf("--rate: %w", err)
				}
				req.Rate = r
			}
			if seconds < 1 || seconds > router.MaxPerfSeconds {
				return fmt.Errorf("--seconds %d: want 1 to %d", seconds, router.MaxPerfSeconds)
			}
			var res router.PerfResult
			// The test itself, plus making and removing both endpoints.
			c := cni.NewClient(socket, time.Duration(seconds)*time.Second+80*time.Second)
			if err := c.Post(cmd.Context(), "/v1/perf", req, &res); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, res)
			}
			printPerf(cmd.OutOrStdout(), res)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&network, "network", router.DefaultNetwork, "the network to test over")
	f.IntVar(&seconds, "seconds", router.DefaultPerfSeconds, fmt.Sprintf("how long the stream runs (at most %d)", router.MaxPerfSeconds))
	f.StringVar(&rate, "rate", "", "the stream's rate cap in bits/s, e.g. 20mbit or 1gbit (default 100mbit, at most the peers' --perf-max-rate)")
	f.BoolVar(&asJSON, "json", false, "print JSON for scripts")
	f.BoolVar(&last, "last", false, "list the results this peer recorded (the last 20) instead of testing")
	return cmd
}

// formatRate prints bits per second with an SI unit.
func formatRate(bps float64) string {
	switch {
	case bps >= 1e9:
		return fmt.Sprintf("%.2f Gbit/s", bps/1e9)
	case bps >= 1e6:
		return fmt.Sprintf("%.1f Mbit/s", bps/1e6)
	case bps >= 1e3:
		return fmt.Sprintf("%.1f kbit/s", bps/1e3)
	}
	return fmt.Sprintf("%.0f bit/s", bps)
}

func printPerf(out io.Writer, r router.PerfResult) {
	fmt.Fprintf(out, "perf %s → %s over %s (%s → %s), %.1f s, cap %s\n", r.From, r.To, r.Network, r.Source, r.Sink, r.Seconds, formatRate(float64(r.RateCap)))
	fmt.Fprintf(out, "throughput  %s at the receiver (received %.1f MB, sent %.1f MB)\n", formatRate(r.Throughput), float64(r.Received)/1e6, float64(r.Sent)/1e6)
	fmt.Fprintf(out, "latency     rtt p50 %.3f ms  p99 %.3f ms  jitter %.3f ms  loss %.1f%% (%d probes, under load)\n", r.RTTP50ms, r.RTTP99ms, r.JitterMs, r.Loss*100, r.Probes)
	if r.Error != "" {
		fmt.Fprintf(out, "error       %s\n", r.Error)
	}
}

func printPerfResults(out io.Writer, results []router.PerfResult) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STARTED\tTO\tNETWORK\tSECONDS\tCAP\tTHROUGHPUT\tRTT P50\tRTT P99\tJITTER\tLOSS\tERROR")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.1f\t%s\t%s\t%.3fms\t%.3fms\t%.3fms\t%.1f%%\t%s\n", r.Started.Format(time.DateTime), r.To, r.Network, r.Seconds,
			formatRate(float64(r.RateCap)), formatRate(r.Throughput), r.RTTP50ms, r.RTTP99ms, r.JitterMs, r.Loss*100, orDash(r.Error))
	}
	tw.Flush()
}
