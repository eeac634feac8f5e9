package pathsel

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"sync"
	"time"
)

var (
	// ErrBadLink: a link's figures are out of range (negative or huge RTT,
	// loss outside 0..1 or NaN, an empty or self-referencing name).
	ErrBadLink = errors.New("pathsel: bad link")
	// ErrTooManyLinks: a peer already has MaxLinksPerPeer links.
	ErrTooManyLinks = errors.New("pathsel: too many links")
	// ErrInvalidConfig: a Config field is out of range.
	ErrInvalidConfig = errors.New("pathsel: invalid config")
)

// MaxLinkRTT bounds a link's RTT and jitter: anything above is a broken
// measurement, not a link.
const MaxLinkRTT = time.Hour

// Link is one directed link's figures as measured by its origin.
type Link struct {
	RTT    time.Duration
	Jitter time.Duration
	Loss   float64 // fraction, 0..1
	Up     bool
	// Encrypted: the link runs over WireGuard, so it may carry traffic that
	// must stay encrypted.
	Encrypted bool
}

// Validate reports a link whose figures no measurement can produce.
func (l Link) Validate() error {
	switch {
	case l.RTT < 0 || l.RTT > MaxLinkRTT:
		return fmt.Errorf("%w: rtt %v out of range 0..%v", ErrBadLink, l.RTT, MaxLinkRTT)
	case l.Jitter < 0 || l.Jitter > MaxLinkRTT:
		return fmt.Errorf("%w: jitter %v out of range 0..%v", ErrBadLink, l.Jitter, MaxLinkRTT)
	case math.IsNaN(l.Loss) || l.Loss < 0 || l.Loss > 1:
		return fmt.Errorf("%w: loss %v out of range 0..1", ErrBadLink, l.Loss)
	}
	return nil
}

// Dest is what the selector needs to know about one destination.
type Dest struct {
	// Encrypted: traffic to it must stay encrypted, so every hop must be an
	// encrypted link.
	Encrypted bool
	// Pending: the direct link was just added to probing and has not
	// answered yet. It counts as unknown, not broken: the destination takes
	// the direct path and its hysteresis starts fresh once measured (a
	// relay chosen during start-up would otherwise stick for Hold).
	Pending bool
}

// Estimator estimates the RTT between two peers that did not measure each
// other (e.g. from Vivaldi coordinates). It must be safe for concurrent use
// and cheap: it is called once per estimated destination and refresh.
type Estimator interface {
	EstimateRTT(a, b string) (time.Duration, bool)
}

// Choice is the selected path to one destination.
type Choice struct {
	// Path lists the peers traffic goes through, first hop first, ending
	// with the destination; nil when the destination's direct link is
	// measured and no working path exists.
	Path []string
	// End-to-end figures of Path (see the package comment); for an
	// Estimated choice, RTT and Cost are the estimate.
	RTT    time.Duration
	Jitter time.Duration
	Loss   float64
	Cost   time.Duration
	// SLAOK reports whether Path meets the SLA (for an estimate: whether the
	// estimate does; for Unmeasured: false).
	SLAOK bool
	// Since is when this path was chosen.
	Since time.Time
	// Reason explains the choice in a few words, for `weft status routes`.
	Reason string
	// Estimated: the direct link is not measured; RTT is an estimate.
	Estimated bool
	// Unmeasured: neither a measured link nor an estimate exists.
	Unmeasured bool
	// Switch is set on the evaluation that moved traffic from one measured path to
	// another (SwitchBroken, SwitchSLA or SwitchBetter), for counting flaps; "" otherwise.
	Switch string
}

// Why a measured path was left (Choice.Switch).
const (
	SwitchBroken = "broken" // a link of the previous path went down or away
	SwitchSLA    = "sla"    // the previous path violated the SLA while another met it
	SwitchBetter = "better" // another path was better by the switch margin for Hold
)

// sameFigures reports whether two choices differ only in Reason (Switch is set only
// with a change of path, which this compares).
func (c Choice) sameFigures(o Choice) bool {
	if len(c.Path) != len(o.Path) {
		return false
	}
	for i := range c.Path {
		if c.Path[i] != o.Path[i] {
			return false
		}
	}
	return c.RTT == o.RTT && c.Jitter == o.Jitter && c.Loss == o.Loss && c.Cost == o.Cost && c.SLAOK == o.SLAOK &&
		c.Since.Equal(o.Since) && c.Estimated == o.Estimated && c.Unmeasured == o.Unmeasured
}

// Config tunes a Selector. Zero fields take the defaults.
type Config struct {
	// Self is the local peer's name (required).
	Self string
	// MaxLinksPerPeer bounds the links one peer may publish; default 256.
	MaxLinksPerPeer int
	// LossPenalty is the cost of a fully lossy link on top of its RTT;
	// default 200ms (2ms per percentage point of loss).
	LossPenalty time.Duration
	// TieEpsilon: the direct link is preferred when it costs at most this
	// much more than the cheapest path. Default 500µs.
	TieEpsilon time.Duration
	// SwitchRatio, SwitchMin and JitterMargin: a candidate is better when it
	// is cheaper than the current path by at least each of SwitchRatio of the
	// current cost, SwitchMin, and JitterMargin × (the current path's jitter +
	// the candidate's). Defaults 0.20, 2ms and 4. The fixed terms alone let
	// relays flap at N=50 on a loaded host: RTTs there move by a few ms of
	// scheduling noise on sub-millisecond links, and every relay change puts
	// two links on the full probe rate and recomputes the datapath. The
	// jitter term makes the margin grow with the noise actually measured.
	// Why 4: at N=50 on a saturated machine, a destination host starved for
	// seconds lifts the direct link's smoothed RTT (measured fresh) while the
	// relay's far hop is a published figure from a quiet moment; in every
	// such switch logged with a factor of 2 the gain was 2.1–2.5× the summed
	// jitter (the stall makes the samples erratic, so jitter grows with it).
	// A real step in a link's delay gains ~16× its jitter (the prober's
	// jitter takes 1/16 of one step), so 4 separates the two.
	SwitchRatio  float64
	SwitchMin    time.Duration
	JitterMargin float64
	// Hold is how long a candidate must stay better before traffic moves.
	// Default 3s.
	Hold time.Duration
	// SLA the paths are chosen for; zero: DefaultSLA.
	SLA SLA
	// Estimator, optional, estimates destinations without a measured link.
	Estimator Estimator
	// EstimateRefresh: how often estimated destinations are re-estimated
	// (estimates drift with coordinates, not with link-state events).
	// Default 5s.
	EstimateRefresh time.Duration
}

// DefaultConfig returns the defaults (Self still to be set).
func DefaultConfig() Config {
	return Config{MaxLinksPerPeer: 256, LossPenalty: 200 * time.Millisecond, TieEpsilon: 500 * time.Microsecond,
		SwitchRatio: 0.20, SwitchMin: 2 * time.Millisecond, JitterMargin: 4, Hold: 3 * time.Second, SLA: DefaultSLA(),
		EstimateRefresh: 5 * time.Second}
}

func (c *Config) fill() error {
	d := DefaultConfig()
	if c.MaxLinksPerPeer == 0 {
		c.MaxLinksPerPeer = d.MaxLinksPerPeer
	}
	if c.LossPenalty == 0 {
		c.LossPenalty = d.LossPenalty
	}
	if c.TieEpsilon == 0 {
		c.TieEpsilon = d.TieEpsilon
	}
	if c.SwitchRatio == 0 {
		c.SwitchRatio = d.SwitchRatio
	}
	if c.SwitchMin == 0 {
		c.SwitchMin = d.SwitchMin
	}
	if c.JitterMargin == 0 {
		c.JitterMargin = d.JitterMargin
	}
	if c.Hold == 0 {
		c.Hold = d.Hold
	}
	if c.SLA == (SLA{}) {
		c.SLA = d.SLA
	}
	if c.EstimateRefresh == 0 {
		c.EstimateRefresh = d.EstimateRefresh
	}
	switch {
	case c.Self == "":
		return fmt.Errorf("%w: empty Self", ErrInvalidConfig)
	case c.MaxLinksPerPeer < 1:
		return fmt.Errorf("%w: MaxLinksPerPeer %d below 1", ErrInvalidConfig, c.MaxLinksPerPeer)
	case c.LossPenalty < 0 || c.TieEpsilon < 0 || c.SwitchMin < 0 || c.Hold < 0 || c.EstimateRefresh < 0:
		return fmt.Errorf("%w: durations must not be negative", ErrInvalidConfig)
	case math.IsNaN(c.SwitchRatio) || c.SwitchRatio < 0 || c.SwitchRatio >= 1:
		return fmt.Errorf("%w: SwitchRatio %v out of range [0,1)", ErrInvalidConfig, c.SwitchRatio)
	case math.IsNaN(c.JitterMargin) || c.JitterMargin < 0 || c.JitterMargin > 100:
		return fmt.Errorf("%w: JitterMargin %v out of range [0,100]", ErrInvalidConfig, c.JitterMargin)
	}
	return nil
}

// Selector chooses paths incrementally with hysteresis.
//
// Costs (N peers, D = a peer's link count, both directions): SetLink and
// RemoveLink O(D) (they mark the destinations the link can matter to);
// RemovePeer O(D²) at worst; SetDestinations O(N) (a map compare);
// Select O(changed × min(D_self, D_dst)) plus O(estimated) every
// EstimateRefresh; memory O(N × D).
//
// Concurrency: safe for concurrent use; mu guards everything.
type Selector struct {
	cfg Config

	mu      sync.Mutex                 // guards following
	out     map[string]map[string]Link // out[from][to]: as published by from
	adj     map[string]map[string]struct{}
	dests   map[string]Dest
	state   map[string]*destState
	dirty   map[string]struct{}
	holds   map[string]time.Time // destination → when its hold expires
	estim   map[string]struct{}  // destinations whose choice is an estimate
	nextEst time.Time
}

type kind uint8

const (
	kindNone       kind = iota // no path (measured, all broken)
	kindMeasured               // a measured path: relay "" is direct
	kindEstimated              // direct, estimated
	kindUnmeasured             // direct, nothing known
	kindPending                // direct, being measured
)

// destState is one destination's hysteresis state and last choice.
type destState struct {
	kind        kind
	relay       string
	since       time.Time
	betterSince time.Time // zero: no candidate is currently better
	choice      Choice
}

// New returns an empty selector.
func New(cfg Config) (*Selector, error) {
	if err := cfg.fill(); err != nil {
		return nil, err
	}
	return &Selector{cfg: cfg, out: map[string]map[string]Link{}, adj: map[string]map[string]struct{}{},
		dests: map[string]Dest{}, state: map[string]*destState{}, dirty: map[string]struct{}{},
		holds: map[string]time.Time{}, estim: map[string]struct{}{}}, nil
}

// SetLink records the link from→to as measured by from. A link equal to
// the one held changes nothing. O(D).
func (s *Selector) SetLink(from, to string, l Link) error {
	if from == "" || to == "" || from == to {
		return fmt.Errorf("%w: link %q→%q", ErrBadLink, from, to)
	}
	if err := l.Validate(); err != nil {
		return fmt.Errorf("link %s→%s: %w", from, to, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	links := s.out[from]
	if old, ok := links[to]; ok && old == l {
		return nil
	} else if !ok && len(links) >= s.cfg.MaxLinksPerPeer {
		return fmt.Errorf("%w: %s already has %d links", ErrTooManyLinks, from, len(links))
	}
	if links == nil {
		links = map[string]Link{}
		s.out[from] = links
	}
	links[to] = l
	s.link(from, to)
	s.link(to, from)
	s.markPair(from, to)
	return nil
}

// RemoveLink forgets the link from→to. O(D).
func (s *Selector) RemoveLink(from, to string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.removeLocked(from, to)
}

func (s *Selector) removeLocked(from, to string) {
	if _, ok := s.out[from][to]; !ok {
		return
	}
	delete(s.out[from], to)
	if len(s.out[from]) == 0 {
		delete(s.out, from)
	}
	if _, back := s.out[to][from]; !back {
		s.unlink(from, to)
		s.unlink(to, from)
	}
	s.markPair(from, to)
}

// RemovePeer forgets every link from or to name. O(D²) at worst.
func (s *Selector) RemovePeer(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for to := range s.out[name] {
		s.removeLocked(name, to)
	}
	for from := range s.adj[name] {
		s.removeLocked(from, name)
	}
}

func (s *Selector) link(a, b string) {
	n := s.adj[a]
	if n == nil {
		n = map[string]struct{}{}
		s.adj[a] = n
	}
	n[b] = struct{}{}
}

func (s *Selector) unlink(a, b string) {
	delete(s.adj[a], b)
	if len(s.adj[a]) == 0 {
		delete(s.adj, a)
	}
}

// markPair marks the destinations whose paths can use the pair {a, b}: a
// link of self's makes its other end dirty, and every destination that
// end could relay to; any other link is the far hop of a relayed path to
// one end only when self has a link to the other (its relay), so it marks
// only such ends. With bounded probing most gossiped links join two peers
// self has no link to, and re-evaluating their ends on every such change
// was most of Select's time at N=100. A link of self's that appears later
// marks every destination its far end can relay to, so nothing is missed.
// O(D) for self's links, O(1) for others'.
func (s *Selector) markPair(a, b string) {
	self := s.cfg.Self
	if b == self {
		a, b = b, a
	}
	if a != self {
		mine := s.adj[self]
		if _, ok := mine[a]; ok {
			s.dirty[b] = struct{}{}
		}
		if _, ok := mine[b]; ok {
			s.dirty[a] = struct{}{}
		}
		return
	}
	s.dirty[b] = struct{}{}
	for d := range s.adj[b] {
		s.dirty[d] = struct{}{}
	}
}

// SetDestinations sets the peers to choose paths to; the others' choices
// are dropped. O(N).
func (s *Selector) SetDestinations(dests map[string]Dest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name := range s.dests {
		if _, ok := dests[name]; !ok {
			delete(s.dests, name)
			delete(s.state, name)
			delete(s.holds, name)
			delete(s.estim, name)
			delete(s.dirty, name)
		}
	}
	for name, d := range dests {
		if name == s.cfg.Self {
			continue
		}
		if old, ok := s.dests[name]; !ok || old != d {
			s.dests[name] = d
			s.dirty[name] = struct{}{}
		}
	}
}

// SetSLA changes the SLA; every destination is re-evaluated. O(N).
func (s *Selector) SetSLA(sla SLA) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sla == (SLA{}) {
		sla = DefaultSLA()
	}
	if sla == s.cfg.SLA {
		return
	}
	s.cfg.SLA = sla
	for name := range s.dests {
		s.dirty[name] = struct{}{}
	}
}

// Self returns the peer the paths are chosen from (fixed at New).
func (s *Selector) Self() string { return s.cfg.Self }

// SLA returns the SLA the paths are chosen for.
func (s *Selector) SLA() SLA {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg.SLA
}

// Links returns a copy of every link held, by origin then neighbour, as given to SetLink:
// a new selector for another SLA class is seeded from it. O(N × D).
func (s *Selector) Links() map[string]map[string]Link {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]map[string]Link, len(s.out))
	for from, links := range s.out {
		out[from] = maps.Clone(links)
	}
	return out
}

// Link returns the pair {a, b}'s symmetric link (see the package comment).
func (s *Selector) Link(a, b string) (Link, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pair(a, b)
}

// Select re-evaluates the destinations whose inputs changed and those whose
// hold expired, at time now (the caller's clock; it only needs to
// increase), and returns the ones whose choice changed (besides its
// Reason). O(changed × min(D_self, D_dst)).
func (s *Selector) Select(now time.Time) map[string]Choice {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg.Estimator != nil && !now.Before(s.nextEst) {
		for d := range s.estim {
			s.dirty[d] = struct{}{}
		}
		s.nextEst = now.Add(s.cfg.EstimateRefresh)
	}
	for d, at := range s.holds {
		if !now.Before(at) {
			s.dirty[d] = struct{}{}
		}
	}
	changed := map[string]Choice{}
	for d := range s.dirty {
		delete(s.dirty, d)
		dest, ok := s.dests[d]
		if !ok {
			continue
		}
		prev, had := s.state[d]
		var prevChoice Choice
		if had {
			prevChoice = prev.choice
		}
		c := s.evaluate(d, dest, now)
		if !had || !c.sameFigures(prevChoice) {
			changed[d] = c
		}
	}
	return changed
}

// Choices returns every destination's current choice. O(N).
func (s *Selector) Choices() map[string]Choice {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]Choice, len(s.state))
	for d, st := range s.state {
		out[d] = st.choice
	}
	return out
}

// Choice returns one destination's current choice.
func (s *Selector) Choice(dest string) (Choice, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.state[dest]
	if !ok {
		return Choice{}, false
	}
	return st.choice, true
}

// cand is one evaluated path; relay "" is the direct link.
type cand struct {
	ok          bool
	relay       string
	rtt, jitter time.Duration
	loss        float64
	cost        time.Duration
	meets       bool
}

func (c cand) via() string {
	if c.relay == "" {
		return "direct"
	}
	return "via " + c.relay
}

func viaOf(relay string) string { return cand{relay: relay}.via() }

// pair returns the symmetric link of {a, b}: the worse of both directions
// where both are published.
func (s *Selector) pair(a, b string) (Link, bool) {
	ab, okab := s.out[a][b]
	ba, okba := s.out[b][a]
	switch {
	case okab && okba:
		return Link{RTT: max(ab.RTT, ba.RTT), Jitter: max(ab.Jitter, ba.Jitter), Loss: max(ab.Loss, ba.Loss),
			Up: ab.Up && ba.Up, Encrypted: ab.Encrypted && ba.Encrypted}, true
	case okab:
		return ab, true
	case okba:
		return ba, true
	}
	return Link{}, false
}

// usable returns the pair's link when traffic (encrypted or not) may take it.
func (s *Selector) usable(a, b string, enc bool) (Link, bool) {
	l, ok := s.pair(a, b)
	return l, ok && l.Up && (!enc || l.Encrypted)
}

// path evaluates self→(relay→)dst; relay "" is the direct link.
func (s *Selector) path(dst, relay string, enc bool) cand {
	var c cand
	deliver := 1.0
	hop := func(a, b string) bool {
		l, ok := s.usable(a, b, enc)
		if !ok {
			return false
		}
		c.rtt += l.RTT
		c.jitter += l.Jitter
		deliver *= 1 - l.Loss
		c.cost += l.RTT + time.Duration(l.Loss*float64(s.cfg.LossPenalty))
		return true
	}
	if relay == "" {
		if !hop(s.cfg.Self, dst) {
			return cand{}
		}
	} else if relay == dst || relay == s.cfg.Self || !hop(s.cfg.Self, relay) || !hop(relay, dst) {
		return cand{}
	}
	c.ok, c.relay, c.loss = true, relay, 1-deliver
	c.meets = s.cfg.SLA.Meets(c.rtt, c.jitter, c.loss)
	return c
}

// less orders candidates: cheaper, then direct, then the smaller relay name.
func less(a, b cand) bool {
	if !b.ok {
		return a.ok
	}
	if !a.ok || a.cost != b.cost {
		return a.ok && a.cost < b.cost
	}
	if (a.relay == "") != (b.relay == "") {
		return a.relay == ""
	}
	return a.relay < b.relay
}

// search returns the best path to dst and the direct one. O(min(D_self, D_dst)).
func (s *Selector) search(dst string, enc bool) (best, direct cand) {
	direct = s.path(dst, "", enc)
	var all, meet cand
	consider := func(c cand) {
		if !c.ok {
			return
		}
		if less(c, all) {
			all = c
		}
		if c.meets && less(c, meet) {
			meet = c
		}
	}
	consider(direct)
	mine, theirs := s.adj[s.cfg.Self], s.adj[dst]
	small, large := mine, theirs
	if len(theirs) < len(mine) {
		small, large = theirs, mine
	}
	for r := range small {
		if _, ok := large[r]; ok && r != dst && r != s.cfg.Self {
			consider(s.path(dst, r, enc))
		}
	}
	best = all
	if meet.ok {
		best = meet
	}
	if direct.ok && (direct.meets || !meet.ok) && direct.cost <= best.cost+s.cfg.TieEpsilon {
		best = direct
	}
	return best, direct
}

// better reports whether c should replace the current path cur (once held):
// going back to the direct link at about the same cost always is (it spares
// the relay); anything else must gain the switch margin. A direct link that
// meets the SLA is thus left for a relay only when the relay's gain stands
// out of both paths' measured noise, never for one merely faster.
func (s *Selector) better(c, cur cand) bool {
	if c.relay == "" && cur.relay != "" && c.cost <= cur.cost+s.cfg.TieEpsilon && (c.meets || !cur.meets) {
		return true
	}
	return cur.cost-c.cost >= s.margin(c, cur)
}

// margin is the gain c needs over cur: the largest of SwitchMin, SwitchRatio
// of cur's cost and JitterMargin × both paths' jitter. Saturates instead of
// overflowing on absurd (but valid) figures.
func (s *Selector) margin(c, cur cand) time.Duration {
	m := max(s.cfg.SwitchMin, time.Duration(s.cfg.SwitchRatio*float64(cur.cost)))
	j := s.cfg.JitterMargin * (float64(cur.jitter) + float64(c.jitter))
	if j >= float64(math.MaxInt64) {
		return time.Duration(math.MaxInt64)
	}
	return max(m, time.Duration(j))
}

// evaluate chooses dst's path now and stores it. O(min(D_self, D_dst)).
func (s *Selector) evaluate(dst string, dest Dest, now time.Time) Choice {
	st := s.state[dst]
	delete(s.holds, dst)
	delete(s.estim, dst)
	keep := func(k kind, c Choice) Choice {
		c.Since = now
		if st != nil && st.kind == k {
			c.Since = st.since
		}
		s.state[dst] = &destState{kind: k, since: c.Since, choice: c}
		return c
	}
	if dest.Pending {
		return keep(kindPending, Choice{Path: []string{dst}, SLAOK: true, Reason: "not measured yet"})
	}
	if _, measured := s.adj[s.cfg.Self][dst]; !measured {
		// The direct link is no longer measured (its figures were withdrawn) while traffic
		// goes through a relay whose links still work: an estimate must not move it off a
		// measured working path, so the relay stays until the direct link is measured again
		// (the router probes relayed destinations) or the relay path breaks.
		if st != nil && st.kind == kindMeasured && st.relay != "" {
			if cur := s.path(dst, st.relay, dest.Encrypted); cur.ok {
				st.betterSince = time.Time{}
				st.choice = s.choice(dst, cur, st, "direct link not measured; keeping the measured relay")
				return st.choice
			}
		}
		if s.cfg.Estimator != nil {
			if rtt, ok := s.cfg.Estimator.EstimateRTT(s.cfg.Self, dst); ok && rtt >= 0 && rtt <= MaxLinkRTT {
				s.estim[dst] = struct{}{}
				return keep(kindEstimated, Choice{Path: []string{dst}, RTT: rtt, Cost: rtt, Estimated: true,
					SLAOK:  s.cfg.SLA.Meets(rtt, 0, 0),
					Reason: "direct link not probed; RTT estimated from coordinates"})
			}
			s.estim[dst] = struct{}{} // an estimate may appear later
		}
		return keep(kindUnmeasured, Choice{Path: []string{dst}, Unmeasured: true,
			Reason: "unmeasured: no measured link and no estimate"})
	}
	best, direct := s.search(dst, dest.Encrypted)
	if !best.ok {
		return keep(kindNone, Choice{Reason: fmt.Sprintf("no working path to %s", dst)})
	}
	var cur cand
	if st != nil && st.kind == kindMeasured {
		cur = s.path(dst, st.relay, dest.Encrypted)
	}
	choose := func(c cand, why, switched string) Choice {
		if st == nil || st.kind != kindMeasured || st.relay != c.relay {
			if st == nil || st.kind != kindMeasured {
				switched = "" // not a move between measured paths
			}
			st = &destState{kind: kindMeasured, relay: c.relay, since: now}
		} else {
			switched = ""
		}
		st.betterSince = time.Time{}
		st.choice = s.choice(dst, c, st, why)
		st.choice.Switch = switched
		s.state[dst] = st
		return st.choice
	}
	switch {
	case st != nil && st.kind == kindPending && direct.ok && direct.relay == "" && (direct.meets || !best.meets) && best.relay != "":
		// A destination just measured starts on its direct link, which it used while pending:
		// its first samples are the least reliable (cold caches, a tunnel still settling),
		// so a relay must be better for the hold time like any other switch.
		c := choose(direct, "initial choice: the direct link, as while it was being measured", "")
		if s.better(best, direct) {
			st.betterSince = now
			s.holds[dst] = now.Add(s.cfg.Hold)
		}
		return c
	case (st == nil || st.kind != kindMeasured) && best.relay != "" && direct.ok && direct.meets && !s.better(best, direct):
		// A first measured choice (new, or back from an estimate or from no path) takes a
		// direct link that meets the SLA unless a relay beats it by the switch margin, as a switch would have
		// to: a relay chosen on one noisy sample was left again for the direct link after
		// the hold, a flap each time a destination's measurement came back.
		return choose(direct, "initial choice: the direct link, no relay better by the switch margin", "")
	case st == nil || st.kind != kindMeasured:
		return choose(best, "initial choice", "")
	case !cur.ok:
		return choose(best, "previous path broke", SwitchBroken)
	case cur.relay == best.relay:
		return choose(cur, "best path", "")
	case !cur.meets && best.meets:
		return choose(best, fmt.Sprintf("previous path %s violated the SLA (%s)", viaOf(st.relay),
			s.cfg.SLA.Check(cur.rtt, cur.jitter, cur.loss)), SwitchSLA)
	case s.better(best, cur):
		if st.betterSince.IsZero() {
			st.betterSince = now
		}
		if held := now.Sub(st.betterSince); held >= s.cfg.Hold {
			return choose(best, fmt.Sprintf("%s better than %s for %v (cost %v against %v, margin %v)", best.via(), cur.via(),
				held.Round(time.Millisecond), best.cost.Round(time.Microsecond), cur.cost.Round(time.Microsecond),
				s.margin(best, cur).Round(time.Microsecond)), SwitchBetter)
		}
		s.holds[dst] = st.betterSince.Add(s.cfg.Hold)
		st.choice = s.choice(dst, cur, st, fmt.Sprintf("holding: %s better for %v of %v",
			best.via(), now.Sub(st.betterSince).Round(time.Millisecond), s.cfg.Hold))
		return st.choice
	default:
		st.betterSince = time.Time{}
		st.choice = s.choice(dst, cur, st, "current path, no candidate better by the switch margin")
		return st.choice
	}
}

func (s *Selector) choice(dst string, c cand, st *destState, why string) Choice {
	path := []string{dst}
	if c.relay != "" {
		path = []string{c.relay, dst}
	}
	pc := Choice{Path: path, RTT: c.rtt, Jitter: c.jitter, Loss: c.loss, Cost: c.cost,
		SLAOK: c.meets, Since: st.since, Reason: why}
	if !pc.SLAOK {
		pc.Reason = fmt.Sprintf("no path meets SLA %s (%s %s); %s", s.cfg.SLA.Name, c.via(),
			s.cfg.SLA.Check(c.rtt, c.jitter, c.loss), why)
	}
	return pc
}
