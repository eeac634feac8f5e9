package main

// Per-container rates (#15) in the CLI: the rate flags of `weft network create` and
// `weft status rates`.

import (
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/weftnet/weft/datapath/shape"
	"github.com/weftnet/weft/router"
)

// rateUnits are tc's bit units, in decimal multiples as tc counts them.
var rateUnits = []struct {
	suffix string
	mult   float64
}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}}

// parseBits reads a rate or burst in bits: a number with an optional unit bit, kbit, mbit
// or gbit ("10mbit", "2.5gbit", "800000"). Pure.
func parseBits(s string) (uint64, error) {
	v := strings.ToLower(strings.TrimSpace(s))
	mult := 1.0
	for _, u := range rateUnits {
		if strings.HasSuffix(v, u.suffix) {
			v, mult = strings.TrimSuffix(v, u.suffix), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("%q is not a number of bits with a unit bit, kbit, mbit or gbit", s)
	}
	bits := math.Round(f * mult)
	if bits > shape.MaxRate {
		return 0, fmt.Errorf("%q is above %d bits", s, uint64(shape.MaxRate))
	}
	return uint64(bits), nil
}

// rateFlags reads --ingress-rate, --ingress-burst, --egress-rate and --egress-burst into
// req, refusing a rate below shape.MinRate and a burst without its rate.
func rateFlags(cmd *cobra.Command, req *router.NetworkRequest) error {
	fl := cmd.Flags()
	for _, f := range []struct {
		name string
		dst  *uint64
	}{{"ingress-rate", &req.IngressRate}, {"ingress-burst", &req.IngressBurst}, {"egress-rate", &req.EgressRate}, {"egress-burst", &req.EgressBurst}} {
		v, err := fl.GetString(f.name)
		if err != nil || v == "" {
			continue
		}
		if *f.dst, err = parseBits(v); err != nil {
			return fmt.Errorf("--%s: %w", f.name, err)
		}
	}
	for _, d := range []struct {
		dir         string
		rate, burst uint64
	}{{"ingress", req.IngressRate, req.IngressBurst}, {"egress", req.EgressRate, req.EgressBurst}} {
		if d.rate != 0 && d.rate < shape.MinRate {
			return fmt.Errorf("--%s-rate: %d bit/s is below the minimum %d bit/s", d.dir, d.rate, shape.MinRate)
		}
		if d.burst != 0 && d.rate == 0 {
			return fmt.Errorf("--%s-burst needs --%s-rate", d.dir, d.dir)
		}
	}
	return nil
}

// formatBits shows bits with the largest unit that keeps it readable, as tc does.
func formatBits(b uint64) string {
	for _, u := range rateUnits {
		if float64(b) >= u.mult && u.mult > 1 {
			return strconv.FormatFloat(float64(b)/u.mult, 'f', -1, 64) + u.suffix
		}
	}
	return strconv.FormatUint(b, 10) + "bit"
}

func newStatusRatesCmd() *cobra.Command {
	return statusCommand("rates", "Show each attachment's rate limits as the kernel holds them (rate, burst, queue) and their drops", "/v1/rates",
		func() any { return &[]router.RateStatus{} }, func(out io.Writer, v any) { printRates(out, *v.(*[]router.RateStatus)) })
}

func printRates(out io.Writer, rates []router.RateStatus) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONTAINER\tIFNAME\tNETWORK\tINGRESS\tIN DROPS\tEGRESS\tOUT DROPS")
	dir := func(d *shape.DirState) (string, string) {
		if d == nil {
			return "unlimited", "-"
		}
		return fmt.Sprintf("%s/s burst %s queue %dB", formatBits(d.RateBits), formatBits(d.BurstBits), d.LimitBytes), strconv.FormatUint(d.Drops, 10)
	}
	ids := make([]string, 0, len(rates))
	for _, r := range rates {
		ids = append(ids, r.ContainerID)
	}
	short := shortIDs(ids, 12)
	for _, r := range rates {
		in, inDrops := dir(r.Ingress)
		eg, egDrops := dir(r.Egress)
		if r.Error != "" {
			in, inDrops, eg, egDrops = "error: "+r.Error, "-", "", "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", short[r.ContainerID], r.IfName, r.Network, in, inDrops, eg, egDrops)
	}
	tw.Flush()
}
