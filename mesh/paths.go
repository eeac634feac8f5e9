package mesh

// Path selection: from the link-state Graph, each peer picks per
// destination the path its traffic takes (direct, or through relays).
//
// Cost. A link costs RTT + LossPenalty × loss. The default penalty, 200 ms
// per unit of loss (2 ms per percentage point), is about what a loss costs
// a TCP flow: a retransmission timeout is at least 200 ms on Linux, so a
// link losing a fraction p of packets delays them on average by about
// p × 200 ms. A path costs the sum of its links' costs. Jitter is not in
// the cost; it is an SLA constraint only.
//
// End-to-end figures: RTT and jitter are the sums over the links (each
// link's RTT is a round trip over that hop, so the sum is the path's round
// trip), loss is 1 − Π(1 − loss_i).
//
// Search. Paths have at most MaxHops links (default 2: direct or through one
// relay), over links that are up, each link taken as measured by its origin
// (the from→to direction published by from). With so few hops every
// simple path is enumerated (at most N^(MaxHops−1) per destination), which
// handles the SLA constraint exactly, where a plain shortest-path search
// could not. Among the paths that meet the SLA the cheapest wins; when none
// does, the cheapest of all is used and SLAOK is false. The direct link
// wins ties: it is chosen when it costs at most TieEpsilon more than the
// cheapest (and meets the SLA when the cheapest does).
//
// Hysteresis, per (destination, SLA class). The current path is kept
// unless
//   - it broke (a link is down or gone): switch at once;
//   - it violates the SLA while another path meets it: switch at once;
//   - another path has been better for Hold without interruption: switch to
//     the best path of that moment. "Better" means cheaper by at least
//     SwitchRatio of the current cost and at least SwitchMin, or being the
//     direct link within TieEpsilon of a current relayed path (going back
//     to the direct link spares the relay).
//
// A single evaluation without a better candidate restarts the hold, so
// metrics that alternate do not move traffic.

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrBadSLA: an SLA class could not be parsed.
var ErrBadSLA = errors.New("mesh: bad SLA")

// SLA is a service class: bounds on a path's end-to-end figures. A zero
// bound means "no bound", so the zero SLA (and DefaultSLA) is met by any
// working path.
type SLA struct {
	Name      string
	MaxRTT    time.Duration
	MaxJitter time.Duration
	MaxLoss   float64 // fraction, 0..1
}

// DefaultSLA is the class without bounds.
func DefaultSLA() SLA { return SLA{Name: "default"} }

// ParseSLA parses "name: rtt<=5ms,jitter<=2ms,loss<=0.1%". The name is 1–32
// bytes of [a-z0-9_-]; each term is rtt, jitter (Go durations) or loss (a
// percentage with "%", or a fraction), bounded with "<="; each at most once,
// at least one. Bounds must be positive: leave a term out for no bound
// (loss<=0.01% asks for practically none, but note that with the default
// window of 20 probes measured loss moves in steps of 5%).
func ParseSLA(s string) (SLA, error) {
	name, rest, ok := strings.Cut(s, ":")
	name = strings.TrimSpace(name)
	if !ok {
		return SLA{}, fmt.Errorf(`%w: %q: want "name: rtt<=5ms,jitter<=2ms,loss<=0.1%%"`, ErrBadSLA, s)
	}
	if err := validSLAName(name); err != nil {
		return SLA{}, fmt.Errorf("%w: class name %q: %v", ErrBadSLA, name, err)
	}
	sla := SLA{Name: name}
	seen := map[string]bool{}
	for _, term := range strings.Split(rest, ",") {
		term = strings.TrimSpace(term)
		bad := func(format string, a ...any) (SLA, error) {
			return SLA{}, fmt.Errorf("%w: class %q: term %q: %s", ErrBadSLA, name, term, fmt.Sprintf(format, a...))
		}
		if term == "" {
			if strings.TrimSpace(rest) == "" {
				return SLA{}, fmt.Errorf("%w: class %q: no bounds (write at least one of rtt<=, jitter<=, loss<=)", ErrBadSLA, name)
			}
			return bad("empty term")
		}
		key, val, ok := strings.Cut(term, "<=")
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		if !ok {
			return bad("want rtt<=D, jitter<=D or loss<=P%%")
		}
		if seen[key] {
			return bad("%s given twice", key)
		}
		seen[key] = true
		switch key {
		case "rtt", "jitter":
			d, err := time.ParseDuration(val)
			if err != nil {
				return bad("%s bound %q is not a duration like 5ms", key, val)
			}
			if d <= 0 {
				return bad("%s bound must be positive (leave the term out for no bound)", key)
			}
			if key == "rtt" {
				sla.MaxRTT = d
			} else {
				sla.MaxJitter = d
			}
		case "loss":
			num, pct := strings.CutSuffix(val, "%")
			f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
			if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
				return bad("loss bound %q is not a number like 0.1%%", val)
			}
			if pct {
				f /= 100
			}
			if f <= 0 || f > 1 {
				return bad("loss bound must be above 0 and at most 100%% (leave the term out for no bound)")
			}
			sla.MaxLoss = f
		default:
			return bad("unknown bound %q (want rtt, jitter or loss)", key)
		}
	}
	return sla, nil
}

func validSLAName(s string) error {
	if s == "" || len(s) > 32 {
		return fmt.Errorf("want 1-32 bytes, got %d", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("byte %q not allowed (want [a-z0-9_-])", c)
		}
	}
	return nil
}

// String formats s the way ParseSLA reads it.
func (s SLA) String() string {
	var terms []string
	if s.MaxRTT > 0 {
		terms = append(terms, "rtt<="+s.MaxRTT.String())
	}
	if s.MaxJitter > 0 {
		terms = append(terms, "jitter<="+s.MaxJitter.String())
	}
	if s.MaxLoss > 0 {
		terms = append(terms, "loss<="+strconv.FormatFloat(s.MaxLoss*100, 'g', -1, 64)+"%")
	}
	if len(terms) == 0 {
		return s.Name + ": (no bounds)"
	}
	return s.Name + ": " + strings.Join(terms, ",")
}

// check returns "" when the figures meet s, else what breaks it.
func (s SLA) check(rtt, jitter time.Duration, loss float64) string {
	var out []string
	if s.MaxRTT > 0 && rtt > s.MaxRTT {
		out = append(out, fmt.Sprintf("rtt %v > %v", rtt, s.MaxRTT))
	}
	if s.MaxJitter > 0 && jitter > s.MaxJitter {
		out = append(out, fmt.Sprintf("jitter %v > %v", jitter, s.MaxJitter))
	}
	if s.MaxLoss > 0 && loss > s.MaxLoss+1e-12 {
		out = append(out, fmt.Sprintf("loss %.2f%% > %.2f%%", loss*100, s.MaxLoss*100))
	}
	return strings.Join(out, ", ")
}

// PathChoice is the selected path to one destination.
type PathChoice struct {
	// Path lists the peers traffic goes through, first hop first, ending
	// with the destination; nil when there is no working path.
	Path []string
	// End-to-end figures of Path (see the file comment).
	RTT    time.Duration
	Jitter time.Duration
	Loss   float64
	// Cost is the path's cost (RTT + LossPenalty × loss, summed over links).
	Cost time.Duration
	// SLAOK reports whether Path meets the SLA the selection was made for.
	SLAOK bool
	// Since is when this path was chosen.
	Since time.Time
	// Reason explains the choice in a few words, for `weft status routes`.
	Reason string
}

// PathSelectorConfig tunes path selection. Zero fields take the defaults.
type PathSelectorConfig struct {
	// MaxHops bounds a path's links: 1 direct only, 2 (default) allows one
	// relay; at most 4.
	MaxHops int
	// LossPenalty is the cost of a fully lossy link on top of its RTT;
	// default 200ms (2ms per percentage point of loss).
	LossPenalty time.Duration
	// TieEpsilon: the direct link is preferred when it costs at most this
	// much more than the cheapest path. Default 500µs.
	TieEpsilon time.Duration
	// SwitchRatio and SwitchMin: a candidate is better when it is cheaper
	// than the current path by at least SwitchRatio of the current cost and
	// at least SwitchMin. Defaults 0.20 and 1ms.
	SwitchRatio float64
	SwitchMin   time.Duration
	// Hold is how long a candidate must stay better before traffic moves.
	// Default 3s.
	Hold time.Duration
}

// DefaultPathSelectorConfig returns the defaults.
func DefaultPathSelectorConfig() PathSelectorConfig {
	return PathSelectorConfig{MaxHops: 2, LossPenalty: 200 * time.Millisecond, TieEpsilon: 500 * time.Microsecond,
		SwitchRatio: 0.20, SwitchMin: time.Millisecond, Hold: 3 * time.Second}
}

// PathSelector chooses paths with hysteresis, keeping per destination and
// SLA class the current path.
//
// Concurrency: safe for concurrent use; mu guards state.
type PathSelector struct {
	cfg PathSelectorConfig

	mu    sync.Mutex // guards following
	state map[pathKey]*pathState
}

type pathKey struct{ dest, sla string }

type pathState struct {
	path        []string
	since       time.Time
	betterSince time.Time // zero: no candidate is currently better
}

// NewPathSelector validates cfg (filling in defaults).
func NewPathSelector(cfg PathSelectorConfig) (*PathSelector, error) {
	d := DefaultPathSelectorConfig()
	if cfg.MaxHops == 0 {
		cfg.MaxHops = d.MaxHops
	}
	if cfg.LossPenalty == 0 {
		cfg.LossPenalty = d.LossPenalty
	}
	if cfg.TieEpsilon == 0 {
		cfg.TieEpsilon = d.TieEpsilon
	}
	if cfg.SwitchRatio == 0 {
		cfg.SwitchRatio = d.SwitchRatio
	}
	if cfg.SwitchMin == 0 {
		cfg.SwitchMin = d.SwitchMin
	}
	if cfg.Hold == 0 {
		cfg.Hold = d.Hold
	}
	switch {
	case cfg.MaxHops < 1 || cfg.MaxHops > 4:
		return nil, fmt.Errorf("%w: path MaxHops %d out of range 1..4", ErrInvalidConfig, cfg.MaxHops)
	case cfg.LossPenalty < 0 || cfg.TieEpsilon < 0 || cfg.SwitchMin < 0 || cfg.Hold < 0:
		return nil, fmt.Errorf("%w: path selector durations must not be negative", ErrInvalidConfig)
	case cfg.SwitchRatio < 0 || cfg.SwitchRatio >= 1:
		return nil, fmt.Errorf("%w: path SwitchRatio %v out of range [0,1)", ErrInvalidConfig, cfg.SwitchRatio)
	}
	return &PathSelector{cfg: cfg, state: map[pathKey]*pathState{}}, nil
}

// candidate is one evaluated path.
type candidate struct {
	path        []string // without self
	rtt, jitter time.Duration
	loss        float64
	cost        time.Duration
	violation   string // "" when the SLA is met
}

func (c *candidate) meets() bool { return c.violation == "" }

func (c *candidate) via() string {
	if len(c.path) <= 1 {
		return "direct"
	}
	return "via " + strings.Join(c.path[:len(c.path)-1], ",")
}

// Select returns the path from self to dest for the SLA at time now (the
// caller's clock; it only needs to increase), and updates the
// destination's hysteresis state.
func (s *PathSelector) Select(g Graph, self, dest string, sla SLA, now time.Time) PathChoice {
	cands := s.candidates(g, self, dest, sla)
	key := pathKey{dest, sla.Name}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(cands) == 0 {
		delete(s.state, key)
		return PathChoice{Reason: fmt.Sprintf("no working path to %s", dest)}
	}
	best := s.best(cands)
	st := s.state[key]
	var cur *candidate
	if st != nil {
		if i := slices.IndexFunc(cands, func(c *candidate) bool { return slices.Equal(c.path, st.path) }); i >= 0 {
			cur = cands[i]
		}
	}
	choose := func(c *candidate, why string) PathChoice {
		if st == nil || !slices.Equal(st.path, c.path) {
			st = &pathState{path: c.path, since: now}
			s.state[key] = st
		}
		st.betterSince = time.Time{}
		return s.choice(c, st, sla, why)
	}
	switch {
	case st == nil:
		return choose(best, "initial choice")
	case cur == nil:
		return choose(best, "previous path broke")
	case cur == best:
		return choose(cur, "best path")
	case !cur.meets() && best.meets():
		return choose(best, fmt.Sprintf("previous path %s violated the SLA (%s)", viaOf(st.path), cur.violation))
	case s.better(best, cur):
		if st.betterSince.IsZero() {
			st.betterSince = now
		}
		if held := now.Sub(st.betterSince); held >= s.cfg.Hold {
			return choose(best, fmt.Sprintf("%s better than %s for %v", best.via(), cur.via(), held.Round(time.Millisecond)))
		}
		return s.choice(cur, st, sla, fmt.Sprintf("holding: %s better for %v of %v",
			best.via(), now.Sub(st.betterSince).Round(time.Millisecond), s.cfg.Hold))
	default:
		st.betterSince = time.Time{}
		return s.choice(cur, st, sla, "current path, no candidate better by the switch margin")
	}
}

func viaOf(path []string) string {
	c := candidate{path: path}
	return c.via()
}

// better reports whether c should replace the current path cur (once held).
func (s *PathSelector) better(c, cur *candidate) bool {
	gain := cur.cost - c.cost
	if gain >= s.cfg.SwitchMin && float64(gain) >= s.cfg.SwitchRatio*float64(cur.cost) {
		return true
	}
	return len(c.path) == 1 && len(cur.path) > 1 && c.cost <= cur.cost+s.cfg.TieEpsilon &&
		(c.meets() || !cur.meets())
}

// best picks the cheapest path meeting the SLA, else the cheapest; the
// direct link wins within TieEpsilon.
func (s *PathSelector) best(cands []*candidate) *candidate {
	pool := slices.DeleteFunc(slices.Clone(cands), func(c *candidate) bool { return !c.meets() })
	if len(pool) == 0 {
		pool = cands
	}
	best := pool[0]
	for _, c := range pool[1:] {
		if c.cost < best.cost || c.cost == best.cost && len(c.path) < len(best.path) {
			best = c
		}
	}
	if i := slices.IndexFunc(pool, func(c *candidate) bool { return len(c.path) == 1 }); i >= 0 && pool[i].cost <= best.cost+s.cfg.TieEpsilon {
		best = pool[i]
	}
	return best
}

func (s *PathSelector) choice(c *candidate, st *pathState, sla SLA, why string) PathChoice {
	pc := PathChoice{
		Path: slices.Clone(c.path), RTT: c.rtt, Jitter: c.jitter, Loss: c.loss, Cost: c.cost,
		SLAOK: c.meets(), Since: st.since, Reason: why,
	}
	if !pc.SLAOK {
		pc.Reason = fmt.Sprintf("no path meets SLA %s (%s %s); %s", sla.Name, c.via(), c.violation, why)
	}
	return pc
}

// candidates enumerates the simple paths self→dest over up links with at
// most MaxHops links, in a deterministic order (neighbours sorted).
func (s *PathSelector) candidates(g Graph, self, dest string, sla SLA) []*candidate {
	if self == dest {
		return nil
	}
	var out []*candidate
	path := []string{}
	visited := map[string]bool{self: true}
	var walk func(at string, rtt, jitter time.Duration, deliver float64, cost time.Duration)
	walk = func(at string, rtt, jitter time.Duration, deliver float64, cost time.Duration) {
		for _, next := range slices.Sorted(maps.Keys(g[at])) {
			m := g[at][next]
			if !m.Up || visited[next] {
				continue
			}
			r, j, d := rtt+m.RTT, jitter+m.Jitter, deliver*(1-m.Loss)
			c := cost + m.RTT + time.Duration(m.Loss*float64(s.cfg.LossPenalty))
			path = append(path, next)
			if next == dest {
				loss := 1 - d
				out = append(out, &candidate{path: slices.Clone(path), rtt: r, jitter: j, loss: loss, cost: c,
					violation: sla.check(r, j, loss)})
			} else if len(path) < s.cfg.MaxHops {
				visited[next] = true
				walk(next, r, j, d, c)
				visited[next] = false
			}
			path = path[:len(path)-1]
		}
	}
	walk(self, 0, 0, 1, 0)
	return out
}

// Forget drops the state of one destination (all SLA classes), e.g. when
// the peer is removed.
func (s *PathSelector) Forget(dest string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.state {
		if k.dest == dest {
			delete(s.state, k)
		}
	}
}
