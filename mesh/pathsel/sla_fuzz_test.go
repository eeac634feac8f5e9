package pathsel

import (
	"errors"
	"math"
	"testing"
	"time"
)

// FuzzParseSLA: an SLA string either fails with ErrBadSLA and a zero SLA, or parses into
// bounds that are in range and print back (String) into the same SLA. The figures it is
// then checked against are fuzzed too, extreme ones included (NaN, negative, huge), and the
// two ways of checking (Check for people, Meets for the path search) must agree.
func FuzzParseSLA(f *testing.F) {
	for _, s := range []string{
		"gold: rtt<=5ms,jitter<=2ms,loss<=0.1%",
		"silver: rtt<=50ms",
		"bulk: loss<=5%",
		"x: loss<=1",
		"a_b-9: jitter<=1ns",
		"max: rtt<=2562047h47m16.854775807s,jitter<=2562047h47m16.854775807s,loss<=100%",
		"tiny: loss<=1e-300",
		"tiny: loss<=4.9e-324%",
		"abcdefghijklmnopqrstuvwxyz012345: rtt<=1h",
		"abcdefghijklmnopqrstuvwxyz0123456: rtt<=1h",
		"gold: rtt<=5ms,rtt<=6ms",
		"gold: rtt<=0s",
		"gold: rtt<=-1ms",
		"gold: loss<=NaN%",
		"gold: loss<=Inf",
		"gold: loss<=101%",
		"gold:",
		"gold: ,",
		"Gold: rtt<=5ms",
		"gold rtt<=5ms",
		"",
		":",
	} {
		f.Add(s, int64(time.Millisecond), int64(0), 0.0)
		f.Add(s, int64(math.MaxInt64), int64(math.MinInt64), math.NaN())
		f.Add(s, int64(-1), int64(1), math.Inf(1))
	}
	f.Fuzz(func(t *testing.T, s string, rtt, jitter int64, loss float64) {
		sla, err := ParseSLA(s)
		if err != nil {
			if !errors.Is(err, ErrBadSLA) || sla != (SLA{}) {
				t.Fatalf("ParseSLA(%q) = %+v, %v: a refusal must be ErrBadSLA and a zero SLA", s, sla, err)
			}
			return
		}
		if sla.Name == "" || len(sla.Name) > 32 {
			t.Fatalf("ParseSLA(%q): name %q", s, sla.Name)
		}
		if sla.MaxRTT < 0 || sla.MaxJitter < 0 || !(sla.MaxLoss >= 0 && sla.MaxLoss <= 1) {
			t.Fatalf("ParseSLA(%q): bounds out of range %+v", s, sla)
		}
		if sla.MaxRTT == 0 && sla.MaxJitter == 0 && sla.MaxLoss == 0 {
			t.Fatalf("ParseSLA(%q): accepted without a bound: %+v", s, sla)
		}
		back, err := ParseSLA(sla.String())
		if err != nil || back != sla {
			t.Fatalf("ParseSLA(%q) = %+v prints as %q, which parses as %+v, %v", s, sla, sla.String(), back, err)
		}
		r, j := time.Duration(rtt), time.Duration(jitter)
		if meets, why := sla.Meets(r, j, loss), sla.Check(r, j, loss); meets != (why == "") {
			t.Fatalf("%v with rtt %v jitter %v loss %v: Meets says %v, Check says %q", sla, r, j, loss, meets, why)
		}
	})
}
