package main

import (
	"bytes"
	"context"
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

// ANSI sequences: all colour codes have the same length, so rows that start with one stay
// aligned by tabwriter.
const (
	ansiClear  = "\x1b[H\x1b[2J"
	ansiBold   = "\x1b[01m"
	ansiRed    = "\x1b[31m"
	ansiGreen  = "\x1b[32m"
	ansiYellow = "\x1b[33m"
	ansiReset  = "\x1b[0m"
)

func newTopCmd() *cobra.Command {
	var once, noColor bool
	var every time.Duration
	cmd := &cobra.Command{
		Use:   "top",
		Short: "A live view of the mesh's paths: per peer the path, link mode, RTT, jitter, loss and SLA state, refreshed every 2 s",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if every < 200*time.Millisecond {
				return fmt.Errorf("--interval %s: want at least 200ms", every)
			}
			c := client(cmd)
			out := cmd.OutOrStdout()
			if once { // one plain frame, for tests and scripts
				f, err := fetchTop(cmd.Context(), c)
				if err != nil {
					return err
				}
				renderTop(out, f, false)
				return nil
			}
			tick := time.NewTicker(every)
			defer tick.Stop()
			for {
				var buf bytes.Buffer
				buf.WriteString(ansiClear)
				if f, err := fetchTop(cmd.Context(), c); err != nil {
					fmt.Fprintf(&buf, "weft top — %s — %v (retrying every %s; Ctrl-C quits)\n", time.Now().Format(time.TimeOnly), err, every)
				} else {
					renderTop(&buf, f, !noColor)
				}
				out.Write(buf.Bytes())
				select {
				case <-cmd.Context().Done():
					return nil
				case <-tick.C:
				}
			}
		},
	}
	f := cmd.Flags()
	f.BoolVar(&once, "once", false, "print one frame without colours and exit")
	f.BoolVar(&noColor, "no-color", false, "no ANSI colours")
	f.DurationVar(&every, "interval", 2*time.Second, "time between two frames")
	return cmd
}

// topFrame is what one frame shows.
type topFrame struct {
	Now    time.Time
	Peers  []router.PeerStatus
	Routes []router.Route
	Perf   []router.PerfResult
}

func fetchTop(ctx context.Context, c *cni.Client) (topFrame, error) {
	f := topFrame{Now: time.Now()}
	if err := c.Get(ctx, "/v1/peers", &f.Peers); err != nil {
		return f, err
	}
	if err := c.Get(ctx, "/v1/routes", &f.Routes); err != nil {
		return f, err
	}
	// An older peer without /v1/perf still gets a view.
	_ = c.Get(ctx, "/v1/perf", &f.Perf)
	return f, nil
}

// renderTop writes one frame: a summary line, then one row per path (per destination and
// SLA class), coloured red when the SLA is violated or there is no path, yellow when the
// figures are estimated or unknown, green when measured and holding.
func renderTop(out io.Writer, f topFrame, color bool) {
	paint := func(code, s string) string {
		if !color {
			return s
		}
		return code + s + ansiReset
	}
	self, alive := "?", 0
	state := map[string]string{}
	for _, p := range f.Peers {
		if p.Self {
			self = p.Name
		}
		if p.State == "alive" {
			alive++
		}
		state[p.Name] = p.State
	}
	violated := 0
	for _, r := range f.Routes {
		if !r.SLAOK || len(r.Path) == 0 {
			violated++
		}
	}
	fmt.Fprintf(out, "%s\n", paint(ansiBold, fmt.Sprintf("weft top — %s — %s — %d peers (%d alive), %d paths, %d not meeting their SLA",
		self, f.Now.Format(time.TimeOnly), len(f.Peers), alive, len(f.Routes), violated)))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	row := func(code string, cells ...string) {
		line := strings.Join(cells, "\t")
		if color {
			line = code + line + ansiReset
		}
		fmt.Fprintln(tw, line)
	}
	row(ansiBold, "PEER", "STATE", "PATH", "LINK", "RTT", "JITTER", "LOSS", "SLA", "SINCE", "WHY")
	routes := slices.Clone(f.Routes)
	slices.SortStableFunc(routes, func(a, b router.Route) int { return strings.Compare(a.Peer, b.Peer) })
	for _, r := range routes {
		code, ok := ansiGreen, "ok"
		rtt := fmt.Sprintf("%.2fms", r.RTTms)
		switch {
		case len(r.Path) == 0:
			code, ok = ansiRed, "NO PATH"
		case !r.SLAOK:
			code, ok = ansiRed, "VIOLATED"
		case r.Unmeasured:
			code, ok, rtt = ansiYellow, "unknown", "?"
		case r.Estimated:
			code, rtt = ansiYellow, "~"+rtt
		}
		path := strings.Join(r.Path, "→")
		if path == "" {
			path = "-"
		}
		link := orDash(r.Link)
		if !r.Direct.Up && r.Link != "" {
			link += " (down)"
		}
		row(code, r.Peer, orDash(state[r.Peer]), path, link, rtt, fmt.Sprintf("%.2fms", r.JitterMs), fmt.Sprintf("%.1f%%", r.Loss*100),
			r.SLA+" "+ok, r.Since.Format(time.TimeOnly), r.Reason)
	}
	tw.Flush()
	if n := len(f.Perf); n > 0 {
		p := f.Perf[n-1]
		line := fmt.Sprintf("last perf: %s → %s over %s at %s: %s (cap %s), rtt p50 %.3fms p99 %.3fms, loss %.1f%%",
			p.From, p.To, p.Network, p.Started.Format(time.TimeOnly), formatRate(p.Throughput), formatRate(float64(p.RateCap)), p.RTTP50ms, p.RTTP99ms, p.Loss*100)
		if p.Error != "" {
			line += " — " + p.Error
		}
		fmt.Fprintln(out, line)
	}
}
