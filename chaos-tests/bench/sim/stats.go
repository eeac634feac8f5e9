package main

import (
	"fmt"
	"math"
	"net/netip"
	"runtime/metrics"
	"slices"
	"sync"
	"time"
)

// durations collects samples; safe for concurrent use.
type durations struct {
	mu sync.Mutex // guards d
	d  []time.Duration
}

func (s *durations) add(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.d = append(s.d, d)
}

// take returns the samples and starts over.
func (s *durations) take() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.d
	s.d = nil
	return out
}

// quantile returns the q-quantile (nearest rank) of d, 0 for none.
func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// slope is the least-squares slope of log(y) over log(x): the exponent k
// of y ~ x^k. Points with x or y not positive are left out; fewer than two
// distinct x give NaN.
func slope(x, y []float64) float64 {
	var lx, ly []float64
	for i := range x {
		if i < len(y) && x[i] > 0 && y[i] > 0 && !math.IsInf(y[i], 0) && !math.IsNaN(y[i]) {
			lx = append(lx, math.Log(x[i]))
			ly = append(ly, math.Log(y[i]))
		}
	}
	if len(lx) < 2 {
		return math.NaN()
	}
	var mx, my float64
	for i := range lx {
		mx += lx[i]
		my += ly[i]
	}
	mx /= float64(len(lx))
	my /= float64(len(lx))
	var sxy, sxx float64
	for i := range lx {
		sxy += (lx[i] - mx) * (ly[i] - my)
		sxx += (lx[i] - mx) * (lx[i] - mx)
	}
	if sxx == 0 {
		return math.NaN()
	}
	return sxy / sxx
}

// nodeAddr is the i-th peer's address in the /16 of base: 127.B.(i/250).(i%250+1),
// so no address ends in .0 or .255. It must be in 127.0.0.0/8: all of it
// routes to lo on Linux, binding needs no setup.
func nodeAddr(base netip.Addr, i int) (netip.Addr, error) {
	if !base.Is4() || base.As4()[0] != 127 {
		return netip.Addr{}, fmt.Errorf("address base %s is not in 127.0.0.0/8", base)
	}
	if i < 0 || i >= 250*256 {
		return netip.Addr{}, fmt.Errorf("peer index %d out of range 0..%d", i, 250*256-1)
	}
	b := base.As4()
	return netip.AddrFrom4([4]byte{127, b[1], byte(i / 250), byte(i%250 + 1)}), nil
}

// exponentLabel describes a cost's growth in N.
func exponentLabel(k float64) string {
	switch {
	case math.IsNaN(k):
		return "n/a"
	case k < 0.15:
		return "flat"
	case k < 0.9:
		return "sub-linear"
	case k < 1.15:
		return "linear"
	}
	return "super-linear"
}

// metTag prints a target verdict.
func metTag(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// meshCounters sums the counters of every peer's mesh metrics by name and
// labels ("weft_mesh_events_total{type=join}"): memberlist's alive, suspect
// and dead decisions as each peer saw them, suppressed suspicion notes, join
// attempts. O(N × metrics).
func meshCounters(nodes []*node) map[string]float64 {
	out := map[string]float64{}
	for _, nd := range nodes {
		mfs, err := nd.reg.Gather()
		if err != nil {
			continue // a half-registered peer: its counters are left out
		}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				if m.GetCounter() == nil {
					continue
				}
				key := mf.GetName()
				for _, l := range m.GetLabel() {
					key += "{" + l.GetName() + "=" + l.GetValue() + "}"
				}
				out[key] += m.GetCounter().GetValue()
			}
		}
	}
	return out
}

// schedHist is the Go runtime's histogram of how long goroutines waited in
// the run queue before they ran (/sched/latencies:seconds). With all peers
// in one process this is the simulation's own artefact: a peer that waits
// half a second for a CPU misses memberlist's probe timeout (500 ms), which
// a real peer with its own CPU would not.
type schedHist struct {
	counts  []uint64
	buckets []float64
}

func readSched() schedHist {
	s := []metrics.Sample{{Name: "/sched/latencies:seconds"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return schedHist{}
	}
	h := s[0].Value.Float64Histogram()
	return schedHist{counts: slices.Clone(h.Counts), buckets: slices.Clone(h.Buckets)}
}

// quantilesSince returns the q-quantiles (upper bucket bounds) of the waits
// recorded since before, and how many waits exceeded over.
func (h schedHist) quantilesSince(before schedHist, over float64, qs ...float64) (out []time.Duration, exceeded uint64) {
	if len(h.counts) == 0 || len(before.counts) != len(h.counts) {
		return make([]time.Duration, len(qs)), 0
	}
	d := make([]uint64, len(h.counts))
	var total uint64
	for i := range d {
		d[i] = h.counts[i] - before.counts[i]
		total += d[i]
		if h.buckets[i] >= over {
			exceeded += d[i]
		}
	}
	out = make([]time.Duration, len(qs))
	for j, q := range qs {
		want := uint64(math.Ceil(q * float64(total)))
		var acc uint64
		for i, c := range d {
			acc += c
			if acc >= want && want > 0 {
				hi := h.buckets[i+1]
				if math.IsInf(hi, 1) {
					hi = h.buckets[i]
				}
				out[j] = time.Duration(hi * float64(time.Second))
				break
			}
		}
	}
	return out, exceeded
}
