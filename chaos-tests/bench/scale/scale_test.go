package main

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseStatTicks(t *testing.T) {
	// A command name with a space and a parenthesis: fields are counted after the last ')'.
	line := "1234 (weft (x) y) S 1 1234 1234 0 -1 4194560 1990 0 0 0 731 269 0 0 20 0 12 0 4242 1000 2000 18446744073709551615\n"
	got, err := parseStatTicks(line)
	if err != nil || got != 1000 {
		t.Fatalf("parseStatTicks = %d, %v; want 1000 (731 + 269)", got, err)
	}
	for _, bad := range []string{"", "1234 weft S 1", "1 (a) S 1 2", "1 (a) S 1 1 1 0 -1 0 0 0 0 0 x 2"} {
		if _, err := parseStatTicks(bad); !errors.Is(err, errProcFormat) {
			t.Errorf("parseStatTicks(%q) = %v, want errProcFormat", bad, err)
		}
	}
}

func TestParseVmRSS(t *testing.T) {
	status := "Name:\tweft\nVmPeak:\t 9999 kB\nVmRSS:\t   24640 kB\nRssAnon:\t   14000 kB\nRssFile:\t 10640 kB\nThreads: 12\n"
	got, err := parseVmRSS(status)
	if err != nil || got != 24640<<10 {
		t.Fatalf("parseVmRSS = %d, %v; want %d", got, err, 24640<<10)
	}
	if anon, err := parseStatusKB(status, "RssAnon"); err != nil || anon != 14000<<10 {
		t.Fatalf("RssAnon = %d, %v; want %d", anon, err, 14000<<10)
	}
	for _, bad := range []string{"Name:\tweft\n", "VmRSS:\t12 MB\n", "VmRSS:\tx kB\n"} {
		if _, err := parseVmRSS(bad); !errors.Is(err, errProcFormat) {
			t.Errorf("parseVmRSS(%q) = %v, want errProcFormat", bad, err)
		}
	}
}

func TestParseCPULine(t *testing.T) {
	busy, total, err := parseCPULine("cpu  100 5 50 800 40 3 2 0 0 0")
	if err != nil || busy != 160 || total != 1000 {
		t.Fatalf("parseCPULine = %d, %d, %v; want 160, 1000", busy, total, err)
	}
	for _, bad := range []string{"", "cpu0 1 2 3 4 5 6 7", "cpu 1 2 3", "cpu 1 2 3 x 5 6 7"} {
		if _, _, err := parseCPULine(bad); !errors.Is(err, errProcFormat) {
			t.Errorf("parseCPULine(%q) = %v, want errProcFormat", bad, err)
		}
	}
}

func TestMedian(t *testing.T) {
	xs := []float64{5, 1, 3}
	if m := median(xs); m != 3 {
		t.Errorf("median odd = %v, want 3", m)
	}
	if !slices.Equal(xs, []float64{5, 1, 3}) {
		t.Errorf("median modified its input: %v", xs)
	}
	if m := median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Errorf("median even = %v, want 2.5", m)
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median of nothing is not NaN")
	}
}

func TestSampleIndexes(t *testing.T) {
	for _, c := range []struct {
		n, k int
		want []int
	}{
		{50, 5, []int{0, 12, 25, 37, 49}},
		{100, 5, []int{0, 25, 50, 74, 99}},
		{3, 5, []int{0, 1, 2}},
		{5, 2, []int{0, 4}},
	} {
		if got := sampleIndexes(c.n, c.k); !slices.Equal(got, c.want) {
			t.Errorf("sampleIndexes(%d, %d) = %v, want %v", c.n, c.k, got, c.want)
		}
	}
}

func TestParseNs(t *testing.T) {
	got, err := parseNs("50, 100,")
	if err != nil || !slices.Equal(got, []int{50, 100}) {
		t.Fatalf("parseNs = %v, %v", got, err)
	}
	for _, bad := range []string{"", "2", "201", "fifty", "50,-1"} {
		if _, err := parseNs(bad); err == nil {
			t.Errorf("parseNs(%q) accepted", bad)
		}
	}
}

func TestRatio(t *testing.T) {
	for _, c := range []struct {
		a, b float64
		want string
	}{
		{3.2, 1, "3.2×"}, {1, 0, "–"}, {math.NaN(), 1, "–"}, {1, math.NaN(), "–"},
	} {
		if got := ratio(c.a, c.b); got != c.want {
			t.Errorf("ratio(%v, %v) = %q, want %q", c.a, c.b, got, c.want)
		}
	}
}

func TestSummaryTargets(t *testing.T) {
	ok := &result{system: "weft", n: 50, seeAllOK: true, seeAll: 1500 * time.Millisecond,
		cpu: slices.Repeat([]float64{0.4}, 50), rss: slices.Repeat([]float64{20}, 50), pingsOK: 20, pingsTotal: 20}
	slow := &result{system: "weft", n: 100, seeAll: 90 * time.Second, reached: 40, minSeen: 61,
		cpu: slices.Repeat([]float64{3}, 100), rss: slices.Repeat([]float64{60}, 100), pingsOK: 19, pingsTotal: 20}
	serf := &result{system: "serf", n: 50, seeAllOK: true, seeAll: 500 * time.Millisecond,
		cpu: slices.Repeat([]float64{0.2}, 50), rss: slices.Repeat([]float64{15}, 50)}
	var b strings.Builder
	writeSummary(&b, []int{50, 100}, map[int]*result{50: ok, 100: slow}, map[int]*result{50: serf})
	out := b.String()
	lines := strings.Split(out, "\n")
	var n50, t50, n100, t100 string
	for i, l := range lines {
		if strings.HasPrefix(l, "N=50 ") {
			n50, t50 = l, lines[i+1]
		}
		if strings.HasPrefix(l, "N=100") {
			n100, t100 = l, lines[i+1]
		}
	}
	for _, want := range []string{"weft 1.50s serf 0.50s (3.0×)", "weft 0.40% serf 0.20% (2.0×)", "weft 20MB serf 15MB (1.3×)", "pings 20/20"} {
		if !strings.Contains(n50, want) {
			t.Errorf("N=50 line %q lacks %q", n50, want)
		}
	}
	if strings.Contains(t50, "MISSED") {
		t.Errorf("N=50 met every target, got %q", t50)
	}
	if !strings.Contains(n100, ">90.00s (40/100 peers saw all, fewest seen 61)") {
		t.Errorf("N=100 line does not say what the timeout reached: %q", n100)
	}
	slow50 := *slow
	slow50.n = 50
	b.Reset()
	writeSummary(&b, []int{50}, map[int]*result{50: &slow50}, map[int]*result{50: serf})
	if !strings.Contains(b.String(), "serf 0.50s (>180.0×)") {
		t.Errorf("a timed-out see-all is not shown as a lower bound of the ratio: %q", b.String())
	}
	if strings.Count(t100, "MISSED") != 4 {
		t.Errorf("N=100 missed all four targets, got %q", t100)
	}
}

func TestParseSwitches(t *testing.T) {
	text := "# HELP weft_path_switches_total x\n# TYPE weft_path_switches_total counter\n" +
		"weft_path_switches_total{reason=\"better\"} 3\nweft_path_switches_total{reason=\"broken\"} 1\n" +
		"weft_path_switches_totalx{reason=\"better\"} 9\nweft_other 2\n"
	got, err := parseSwitches(text)
	if err != nil || len(got) != 2 || got["better"] != 3 || got["broken"] != 1 {
		t.Fatalf("parseSwitches = %v, %v; want better 3, broken 1", got, err)
	}
	if got, err := parseSwitches("weft_other 1\n"); err != nil || len(got) != 0 {
		t.Fatalf("no series: %v, %v; want none, no error", got, err)
	}
	for _, bad := range []string{"weft_path_switches_total{reason=\"x\"} y\n", "weft_path_switches_total{sla=\"x\"} 1\n"} {
		if _, err := parseSwitches(bad); !errors.Is(err, errMetricFormat) {
			t.Errorf("parseSwitches(%q) = %v, want errMetricFormat", bad, err)
		}
	}
	r := &result{switchPeers: 4, switches: map[string]float64{"better": 2, "broken": 2}}
	if s := r.switchesText(); !strings.Contains(s, "4 over 4 peers (1.00 per peer; better 2, broken 2)") {
		t.Errorf("switchesText = %q", s)
	}
}

func TestParsePss(t *testing.T) {
	rollup := "55d0c0000000-7ffc00000000 ---p 00000000 00:00 0                          [rollup]\nRss:               29000 kB\nPss:                9800 kB\nPss_Anon:           9100 kB\nPss_File:            700 kB\n"
	if pss, err := parseStatusKB(rollup, "Pss"); err != nil || pss != 9800<<10 {
		t.Fatalf("Pss = %d, %v; want %d", pss, err, 9800<<10)
	}
}

func TestProfiledHosts(t *testing.T) {
	for _, c := range []struct {
		n, count int
		want     []int
	}{
		{50, 2, []int{1, 49}},
		{50, 4, []int{1, 49, 48, 47}},
		{3, 10, []int{1, 2}},
		{50, 0, []int{1}},
	} {
		if got := profiledHosts(c.n, c.count); !slices.Equal(got, c.want) {
			t.Errorf("profiledHosts(%d, %d) = %v, want %v", c.n, c.count, got, c.want)
		}
	}
}

func TestSeeAllQuantiles(t *testing.T) {
	if _, ok := seeAllQuantiles([]time.Duration{-1, -1}); ok {
		t.Fatal("no peer got there, but quantiles were reported")
	}
	each := []time.Duration{-1}
	for i := 1; i <= 10; i++ {
		each = append(each, time.Duration(i)*time.Second)
	}
	q, ok := seeAllQuantiles(each)
	if !ok || q[0] != 6*time.Second || q[1] != 10*time.Second || q[2] != 10*time.Second {
		t.Fatalf("quantiles %v, %v; want 6s, 10s, 10s (the peer that never got there left out)", q, ok)
	}
}
