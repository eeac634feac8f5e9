package main

import (
	"fmt"
	"io"
	"math"
	"runtime"
	"slices"
	"strings"
	"time"
)

// result is what one lab (one system at one N) measured. Zero values were not measured.
type result struct {
	system string // "weft" or "serf"
	n      int

	started   int           // processes that were started and answered their API
	startTook time.Duration // from the first start to the last
	loadStart float64       // 1-minute load average before the first start

	seeAll   time.Duration // from the last start until every peer saw all n alive
	seeAllOK bool
	reached  int // peers that saw all n alive (== n when seeAllOK)
	minSeen  int // the fewest alive members any peer saw at its last poll
	// seeAllEach: when each peer first saw all n alive, from the last start, in host order
	// (-1: never); last names the peer that got there last. One straggler (a peer held
	// suspect for a while) and a slow spread look the same in seeAll, not here.
	seeAllEach []time.Duration
	last       string

	window      time.Duration
	cpu         []float64 // idle CPU per peer over window, % of one core
	rss         []float64 // RSS per peer at the end of window, MB
	rssAnon     []float64 // its anonymous part (heap, stacks; not the shared binary), MB
	pss         []float64 // PSS per peer (shared pages divided among their users), MB
	loadWindow  float64   // 1-minute load average at the end of window
	machineBusy float64   // CPU the whole machine used over window, % of one core

	leader     string
	voters     []string           // Raft voters, as host 0 lists them
	cpuByHost  map[string]float64 // idle CPU per peer by host name, % of one core
	leaderTook time.Duration      // from convergence (or its timeout) until a leader was known
	pingsOK    int
	pingsTotal int
	pingTook   time.Duration // from the attachments until the last pair answered

	// Path switches (weft_path_switches_total) over the idle window, summed over the
	// switchPeers peers scraped at both ends, by reason; weft only.
	switchPeers int
	switches    map[string]float64
	notes       []string // what went wrong, in order
}

func (r *result) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

// target is what issue 11 asks of weft on this machine; never asserted, only printed.
type target struct {
	seeAll time.Duration
	cpuPct float64 // idle CPU per peer, % of one core
	rssMB  float64
}

// targetFor returns the targets for n peers. They are given for N=50 and N=100;
// a smaller lab is held to the N=50 figures. ok is false above 100.
func targetFor(n int) (target, bool) {
	switch {
	case n <= 50:
		return target{seeAll: 2 * time.Second, cpuPct: 0.5, rssMB: 25}, true
	case n <= 100:
		return target{seeAll: 5 * time.Second, cpuPct: 0.5, rssMB: 25}, true
	}
	return target{}, false
}

// median returns the median of xs (NaN for none). It does not modify xs.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

func maxOf(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	return slices.Max(xs)
}

func sum(xs []float64) float64 {
	t := 0.0
	for _, x := range xs {
		t += x
	}
	return t
}

// ratio formats a/b as "3.2×", or "–" when either is missing or b is zero.
func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b <= 0 || a < 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f×", a/b)
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2fs", d.Seconds()) }

// seeAllQuantiles returns the median, 90th percentile and largest of the peers' own see-all
// times that were reached (negative ones never were); false when none was. Pure.
func seeAllQuantiles(each []time.Duration) ([3]time.Duration, bool) {
	var got []time.Duration
	for _, d := range each {
		if d >= 0 {
			got = append(got, d)
		}
	}
	if len(got) == 0 {
		return [3]time.Duration{}, false
	}
	slices.Sort(got)
	at := func(q float64) time.Duration { return got[min(len(got)-1, int(q*float64(len(got))))] }
	return [3]time.Duration{at(0.5), at(0.9), got[len(got)-1]}, true
}

// seeAllText is the see-all time, or what was reached when it timed out.
func (r *result) seeAllText() string {
	if r == nil {
		return "–"
	}
	if r.seeAllOK {
		return secs(r.seeAll)
	}
	return fmt.Sprintf(">%s (%d/%d peers saw all, fewest seen %d)", secs(r.seeAll), r.reached, r.n, r.minSeen)
}

func (r *result) seeAllSecs() float64 {
	if r == nil || !r.seeAllOK {
		return math.NaN()
	}
	return r.seeAll.Seconds()
}

func (r *result) cpuMedian() float64 {
	if r == nil {
		return math.NaN()
	}
	return median(r.cpu)
}

func (r *result) pssMedian() float64 {
	if r == nil {
		return math.NaN()
	}
	return median(r.pss)
}

func (r *result) rssMedian() float64 {
	if r == nil {
		return math.NaN()
	}
	return median(r.rss)
}

func metText(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// writeDetail prints everything one lab measured.
func writeDetail(w io.Writer, r *result) {
	fmt.Fprintf(w, "%s N=%d: %d/%d started in %s (load average before %.1f)\n", r.system, r.n, r.started, r.n, secs(r.startTook), r.loadStart)
	fmt.Fprintf(w, "  all see all %d alive: %s after the last start\n", r.n, r.seeAllText())
	if q, ok := seeAllQuantiles(r.seeAllEach); ok {
		fmt.Fprintf(w, "  each peer's own see-all: median %s, 90th percentile %s, last %s (%s)\n", secs(q[0]), secs(q[1]), secs(q[2]), r.last)
	}
	if len(r.cpu) > 0 {
		fmt.Fprintf(w, "  idle CPU over %s, %% of one core: median %.2f%%, max %.2f%%, all %d together %.1f%% (the whole machine: %.0f%% of %d cores' %d%%; load average at the end %.1f)\n",
			r.window, median(r.cpu), maxOf(r.cpu), len(r.cpu), sum(r.cpu), r.machineBusy, runtime.NumCPU(), 100*runtime.NumCPU(), r.loadWindow)
		fmt.Fprintf(w, "  RSS: median %.1f MB, max %.1f MB; anonymous part (heap, stacks; the rest is the binary's pages, shared): median %.1f MB; PSS (shared pages divided among the %d): median %.1f MB\n",
			median(r.rss), maxOf(r.rss), median(r.rssAnon), len(r.pss), median(r.pss))
	}
	if r.system == "weft" {
		if r.switches != nil {
			fmt.Fprintf(w, "  path switches over the idle window: %s\n", r.switchesText())
		}
		if r.leader != "" {
			fmt.Fprintf(w, "  raft leader %s, known %s after the see-all step\n", r.leader, secs(r.leaderTook))
			fmt.Fprintf(w, "  idle CPU by raft role: %s\n", r.rolesText())
		}
		if r.pingsTotal > 0 {
			fmt.Fprintf(w, "  container pings between sampled hosts: %d/%d ok (last pair answered %s after the attachments)\n",
				r.pingsOK, r.pingsTotal, secs(r.pingTook))
		}
	}
	for _, n := range r.notes {
		fmt.Fprintf(w, "  ! %s\n", n)
	}
}

// writeSummary prints one line per N, weft next to serf with ratios, and weft against the
// issue's targets.
func writeSummary(w io.Writer, ns []int, weft, serf map[int]*result) {
	fmt.Fprintln(w, "\n== side by side (ratio = weft / serf; targets from issue 11, printed, never asserted) ==")
	for _, n := range ns {
		wr, sr := weft[n], serf[n]
		var b strings.Builder
		fmt.Fprintf(&b, "N=%-4d see-all weft %s", n, wr.seeAllText())
		if sr != nil {
			rt := ratio(wr.seeAllSecs(), sr.seeAllSecs())
			if wr != nil && !wr.seeAllOK && sr.seeAllOK {
				rt = ">" + ratio(wr.seeAll.Seconds(), sr.seeAllSecs()) // a lower bound
			}
			fmt.Fprintf(&b, " serf %s (%s)", sr.seeAllText(), rt)
		}
		fmt.Fprintf(&b, " | idle CPU/peer weft %.2f%%", wr.cpuMedian())
		if sr != nil {
			fmt.Fprintf(&b, " serf %.2f%% (%s)", sr.cpuMedian(), ratio(wr.cpuMedian(), sr.cpuMedian()))
		}
		fmt.Fprintf(&b, " | RSS weft %.0fMB", wr.rssMedian())
		if sr != nil {
			fmt.Fprintf(&b, " serf %.0fMB (%s)", sr.rssMedian(), ratio(wr.rssMedian(), sr.rssMedian()))
		}
		fmt.Fprintf(&b, " | PSS weft %.1fMB", wr.pssMedian())
		if sr != nil {
			fmt.Fprintf(&b, " serf %.1fMB (%s)", sr.pssMedian(), ratio(wr.pssMedian(), sr.pssMedian()))
		}
		if wr != nil {
			fmt.Fprintf(&b, " | pings %d/%d | load %.1f", wr.pingsOK, wr.pingsTotal, wr.loadWindow)
		}
		fmt.Fprintln(w, b.String())
		if t, ok := targetFor(n); ok && wr != nil {
			fmt.Fprintf(w, "        targets: see-all ≤ %s %s | idle CPU/peer ≤ %.1f%% %s | RSS ≤ %.0fMB %s | every ping %s\n",
				secs(t.seeAll), metText(wr.seeAllOK && wr.seeAll <= t.seeAll),
				t.cpuPct, metText(len(wr.cpu) == n && median(wr.cpu) <= t.cpuPct),
				t.rssMB, metText(len(wr.rss) == n && median(wr.rss) <= t.rssMB),
				metText(wr.pingsTotal > 0 && wr.pingsOK == wr.pingsTotal))
		}
	}
}

// rolesText gives the idle CPU of each Raft voter (the leader marked) and the median of
// the other peers, to show what Raft costs the voters.
func (r *result) rolesText() string {
	var b strings.Builder
	isVoter := map[string]bool{}
	for _, v := range r.voters {
		isVoter[v] = true
		c, ok := r.cpuByHost[v]
		if !ok {
			continue
		}
		mark := ""
		if v == r.leader {
			mark = " (leader)"
		}
		fmt.Fprintf(&b, "voter %s%s %.2f%%, ", v, mark, c)
	}
	var others []float64
	for h, c := range r.cpuByHost {
		if !isVoter[h] {
			others = append(others, c)
		}
	}
	fmt.Fprintf(&b, "the other %d peers median %.2f%%", len(others), median(others))
	return b.String()
}
