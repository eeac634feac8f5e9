package mesh

import (
	"container/heap"
	"math/rand/v2"
	"slices"
	"time"
)

// Bounded probe-target choice.
//
// Each peer measures a bounded set of peers directly and estimates the rest
// from network coordinates (coordinate.go), so that probe traffic per peer
// does not grow with N. The set is: every peer that must be measured (the
// peers this one carries traffic to or relays through: the caller knows
// them), the nearest by estimated RTT, and a few random ones (so that far
// regions stay measured and coordinate errors get caught). It changes
// slowly so that probers and link state do not churn: a nearest target is
// replaced only by a clearly nearer peer, and the random part is redrawn
// only every ProbeTargetConfig.Reshuffle.

// ProbeTargetConfig bounds the choice. The zero value of a field means its
// default (DefaultProbeTargetConfig).
type ProbeTargetConfig struct {
	// K is the number of peers measured by choice (nearest and random);
	// must-probe peers are measured on top of them. With at most K other
	// live peers, all are probed.
	K int
	// Random is how many of the K are random picks (default K/4).
	Random int
	// Reshuffle is how long random picks are kept before being redrawn.
	Reshuffle time.Duration
	// NearerBy and NearerByAtLeast say what "clearly nearer" is: a
	// candidate replaces the farthest current nearest target only when its
	// estimate is below that target's by this fraction and by at least
	// this much (the absolute margin keeps estimate noise from swapping
	// equally near peers: a peer learns another's coordinate only when it
	// pings it, about every N probe intervals, while its own coordinate
	// moves with every sample, and on a loaded host the samples carry
	// milliseconds of scheduling delay. At N=100 on 2 cores, with 1 ms,
	// 5–7 of 12 nearest targets were replaced every 30 s by peers a few
	// noisy milliseconds "nearer", on a LAN where every RTT is below 1 ms,
	// and each replacement is a link-state publication every peer gets).
	NearerBy        float64
	NearerByAtLeast time.Duration
}

// DefaultProbeTargetConfig is K=16, 4 random picks redrawn every 5 minutes,
// and "clearly nearer" = 20 % and 5 ms nearer.
func DefaultProbeTargetConfig() ProbeTargetConfig {
	return ProbeTargetConfig{K: 16, Random: 4, Reshuffle: 5 * time.Minute, NearerBy: 0.2, NearerByAtLeast: 5 * time.Millisecond}
}

func (c ProbeTargetConfig) withDefaults() ProbeTargetConfig {
	d := DefaultProbeTargetConfig()
	if c.K <= 0 {
		c.K = d.K
	}
	if c.Random <= 0 {
		c.Random = c.K / 4
	}
	c.Random = min(c.Random, c.K)
	if c.Reshuffle <= 0 {
		c.Reshuffle = d.Reshuffle
	}
	if c.NearerBy <= 0 || c.NearerBy >= 1 {
		c.NearerBy = d.NearerBy
	}
	if c.NearerByAtLeast <= 0 {
		c.NearerByAtLeast = d.NearerByAtLeast
	}
	return c
}

// ProbeTargets is a chosen set, by why each peer is in it. The caller keeps
// it and passes it back as ProbeTargetInput.Current on the next call.
type ProbeTargets struct {
	Must    []string // every live must-probe peer
	Nearest []string // nearest by estimate (or, in a small mesh, every other peer), nearest first
	Random  []string // random picks
	// Drawn is when Random was last redrawn in full.
	Drawn time.Time
}

// All returns every target once, sorted by name.
func (t ProbeTargets) All() []string {
	out := make([]string, 0, len(t.Must)+len(t.Nearest)+len(t.Random))
	out = append(out, t.Must...)
	out = append(out, t.Nearest...)
	out = append(out, t.Random...)
	slices.Sort(out)
	return slices.Compact(out)
}

// ProbeTargetInput is what ChooseProbeTargets decides from.
type ProbeTargetInput struct {
	Self string
	// Live are the peers that can be probed (Peer.Up, with an underlay
	// address); Self and duplicates are skipped. The order matters only
	// for the random picks: pass a stable order (Mesh.Peers is sorted) to
	// get the same choice from the same seed.
	Live []string
	// Estimate returns the estimated RTT from Self to a peer, false when
	// unknown (Mesh.EstimateRTT). Peers without an estimate are never
	// "nearest" but can be random picks.
	Estimate func(peer string) (time.Duration, bool)
	// Measured returns the smallest RTT measured to a peer this one probes
	// over the prober's window (LinkStats.SettledMinRTT), false when it has
	// none yet (nil: none). The smallest, because a loaded host's average
	// carries its scheduling delay. A current nearest target is ranked by
	// it rather than by its estimate: a candidate replaces it only when
	// its estimate is clearly below what the target really measures, so
	// estimate noise alone cannot swap two equally near peers.
	Measured func(peer string) (time.Duration, bool)
	// Must are the peers that must be measured: those this peer carries
	// traffic to or relays through. Those not live are ignored.
	Must []string
	// Current is the previous result (zero on the first call).
	Current ProbeTargets
	Now     time.Time
	// Rand draws the random picks; seed it for reproducible choices.
	Rand *rand.Rand
}

// ChooseProbeTargets returns the peers to probe: every live must-probe peer,
// then up to K in total with the nearest by estimate (K − Random slots) and
// random picks. With at most K other live peers it returns all of them, so
// a small mesh is probed in full. Pure: the same input gives the same
// output.
//
// Cost: O(N log K) for N live peers (a bounded heap for the nearest, one
// pass for the random picks), O(N) memory for the membership sets.
func ChooseProbeTargets(in ProbeTargetInput, cfg ProbeTargetConfig) ProbeTargets {
	cfg = cfg.withDefaults()
	// cands: the live peers once each, in input order (for the random
	// picks' reproducibility).
	live := make(map[string]struct{}, len(in.Live))
	cands := make([]string, 0, len(in.Live))
	for _, p := range in.Live {
		if _, dup := live[p]; !dup && p != in.Self {
			live[p] = struct{}{}
			cands = append(cands, p)
		}
	}
	out := ProbeTargets{Drawn: in.Current.Drawn}
	taken := make(map[string]struct{}, cfg.K+len(in.Must))
	take := func(list *[]string, p string) {
		*list = append(*list, p)
		taken[p] = struct{}{}
	}
	for _, p := range in.Must {
		if _, ok := live[p]; ok {
			if _, dup := taken[p]; !dup {
				take(&out.Must, p)
			}
		}
	}
	slices.Sort(out.Must)
	// Must-probe peers come on top of the K chosen ones and do not displace them: relays come
	// and go, and if each took a nearest peer's slot, every relay change would drop and later
	// re-add a probed link (link-state churn for the whole mesh). So nearest and random picks
	// are chosen as if there were no must-probe peers; All() merges the three lists.
	clear(taken)

	if len(live) <= cfg.K {
		// Small mesh: everyone, as before bounded probing.
		for _, p := range cands {
			if _, dup := taken[p]; !dup {
				take(&out.Nearest, p)
			}
		}
		slices.Sort(out.Nearest)
		return out
	}

	room := cfg.K
	randomSlots := min(cfg.Random, room)
	nearSlots := room - randomSlots

	// Nearest: keep current ones still eligible, then let clearly nearer
	// candidates in.
	eligible := func(p string) (time.Duration, bool) {
		if _, ok := live[p]; !ok {
			return 0, false
		}
		if _, ok := taken[p]; ok {
			return 0, false
		}
		if in.Estimate == nil {
			return 0, false
		}
		return in.Estimate(p)
	}
	// A current target is ranked by its measured RTT where there is one.
	// Candidates can only be estimated, and estimates are noisy: a peer
	// learns another's coordinate only when it pings it, about every N
	// probe intervals, while its own coordinate moves with every sample,
	// and a loaded host's samples carry milliseconds of scheduling delay.
	// Ranked by estimates alone, 2–11 of a peer's 12 nearest targets were
	// replaced within 30 s at N=100 on 2 cores, 150 s after the start, on
	// a LAN where every RTT is below 1 ms: each replacement is a
	// link-state publication every peer receives.
	current := func(p string) (time.Duration, bool) {
		if in.Measured == nil {
			return eligible(p)
		}
		if _, ok := live[p]; !ok {
			return eligible(p)
		}
		if _, dup := taken[p]; dup {
			return eligible(p)
		}
		if d, ok := in.Measured(p); ok {
			return d, true
		}
		return eligible(p)
	}
	var near []ranked
	for _, p := range in.Current.Nearest {
		if d, ok := current(p); ok && !containsRanked(near, p) {
			near = append(near, ranked{p, d})
		}
	}
	sortRanked(near)
	if len(near) > nearSlots {
		near = near[:nearSlots] // slots shrank: keep the nearest
	}
	for _, c := range nearestK(cands, nearSlots, eligible) {
		if containsRanked(near, c.name) {
			continue
		}
		if len(near) < nearSlots {
			near = append(near, c)
			sortRanked(near)
			continue
		}
		far := near[len(near)-1]
		if clearlyNearer(c.rtt, far.rtt, cfg) {
			near[len(near)-1] = c
			sortRanked(near)
		}
	}
	for _, r := range near {
		take(&out.Nearest, r.name)
	}

	// Random: keep the current picks until Reshuffle is due; fill gaps.
	redraw := in.Current.Drawn.IsZero() || in.Now.Sub(in.Current.Drawn) >= cfg.Reshuffle
	if redraw {
		out.Drawn = in.Now
	} else {
		for _, p := range in.Current.Random {
			if len(out.Random) >= randomSlots {
				break
			}
			_, ok := live[p]
			_, dup := taken[p]
			if ok && !dup {
				take(&out.Random, p)
			}
		}
	}
	if need := randomSlots - len(out.Random); need > 0 {
		for _, p := range sample(cands, need, in.Rand, func(p string) bool {
			_, dup := taken[p]
			return !dup
		}) {
			take(&out.Random, p)
		}
	}
	slices.Sort(out.Random)
	return out
}

// clearlyNearer: cand beats cur by the fraction and the absolute margin.
func clearlyNearer(cand, cur time.Duration, cfg ProbeTargetConfig) bool {
	return float64(cand) < float64(cur)*(1-cfg.NearerBy) && cur-cand >= cfg.NearerByAtLeast
}

type ranked struct {
	name string
	rtt  time.Duration
}

// less orders by RTT, then name, so that ties are decided the same way
// every time.
func (a ranked) less(b ranked) bool {
	if a.rtt != b.rtt {
		return a.rtt < b.rtt
	}
	return a.name < b.name
}

func sortRanked(rs []ranked) {
	slices.SortFunc(rs, func(a, b ranked) int {
		switch {
		case a.less(b):
			return -1
		case b.less(a):
			return 1
		}
		return 0
	})
}

func containsRanked(rs []ranked, name string) bool {
	return slices.ContainsFunc(rs, func(r ranked) bool { return r.name == name })
}

// maxHeap keeps the k nearest seen so far, the farthest on top.
type maxHeap []ranked

func (h maxHeap) Len() int           { return len(h) }
func (h maxHeap) Less(i, j int) bool { return h[j].less(h[i]) }
func (h maxHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *maxHeap) Push(x any)        { *h = append(*h, x.(ranked)) }
func (h *maxHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// nearestK returns the k eligible peers (distinct names) with the smallest
// estimates, nearest first. O(N log k).
func nearestK(peers []string, k int, eligible func(string) (time.Duration, bool)) []ranked {
	if k <= 0 {
		return nil
	}
	h := make(maxHeap, 0, k+1)
	for _, p := range peers {
		d, ok := eligible(p)
		if !ok {
			continue
		}
		r := ranked{p, d}
		if len(h) < k {
			heap.Push(&h, r)
		} else if r.less(h[0]) {
			h[0] = r
			heap.Fix(&h, 0)
		}
	}
	out := []ranked(h)
	sortRanked(out)
	return out
}

// sample picks up to n of the peers (distinct names) satisfying ok,
// uniformly, in one pass (reservoir sampling). O(N).
func sample(peers []string, n int, rng *rand.Rand, ok func(string) bool) []string {
	if n <= 0 {
		return nil
	}
	if rng == nil {
		rng = rand.New(rand.NewPCG(1, 2)) // deterministic; callers should pass their own
	}
	res := make([]string, 0, n)
	i := 0
	for _, p := range peers {
		if !ok(p) {
			continue
		}
		if len(res) < n {
			res = append(res, p)
		} else if j := rng.IntN(i + 1); j < n {
			res[j] = p
		}
		i++
	}
	return res
}

// Lingering records the needed names in until (each kept until now+linger), forgets names
// whose time is over, and returns every name still kept, sorted: the relays and relayed
// destinations a peer keeps probing for a while after they stop being either. Pure but for
// until. O(len(until) log len(until)).
func Lingering(needed []string, until map[string]time.Time, now time.Time, linger time.Duration) []string {
	for _, n := range needed {
		until[n] = now.Add(linger)
	}
	out := make([]string, 0, len(until))
	for n, t := range until {
		if !now.Before(t) {
			delete(until, n)
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}
