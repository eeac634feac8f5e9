package pathsel

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// noisyMesh is a full mesh of n peers at random points of a plane (coordinates
// in ms), so that the triangle inequality holds and no relay is ever better
// than a direct link on average: base RTT = distance + perHop. Each directed
// link has a true jitter; its RTT is base + an offset that wanders within ±
// that jitter (a smoothed RTT moves slowly, so its excursions last: each step
// the offset keeps 90% of itself plus up to ±jitter/2, clamped), and its
// published jitter is the true one ×0.5..1.5 (the measurement is noisy too).
type noisyMesh struct {
	n      int
	base   [][]time.Duration
	jitter [][]time.Duration
	offset [][]time.Duration
	extra  [][]time.Duration // a real degradation added to a pair's RTT
}

func newNoisyMesh(rng *rand.Rand, n int, maxJitter time.Duration) *noisyMesh {
	const perHop = 200 * time.Microsecond
	xs, ys := make([]float64, n), make([]float64, n)
	for i := range n {
		xs[i], ys[i] = rng.Float64()*10, rng.Float64()*10
	}
	m := &noisyMesh{n: n}
	for i := range n {
		m.base = append(m.base, make([]time.Duration, n))
		m.jitter = append(m.jitter, make([]time.Duration, n))
		m.extra = append(m.extra, make([]time.Duration, n))
		m.offset = append(m.offset, make([]time.Duration, n))
		for j := range n {
			d := math.Hypot(xs[i]-xs[j], ys[i]-ys[j])
			m.base[i][j] = time.Duration(d*float64(time.Millisecond)) + perHop
			m.jitter[i][j] = time.Duration(rng.Int64N(int64(maxJitter)-int64(maxJitter)/8)) + maxJitter/8
		}
	}
	return m
}

func peerName(i int) string { return fmt.Sprintf("p%d", i) }

// feed gives s every directed link: with noise, or (rng nil) at its base.
func (m *noisyMesh) feed(t *testing.T, s *Selector, rng *rand.Rand) {
	t.Helper()
	for i := range m.n {
		for j := range m.n {
			if i == j {
				continue
			}
			l := Link{RTT: m.base[i][j] + m.extra[i][j], Jitter: m.jitter[i][j], Up: true}
			if rng != nil {
				jit := m.jitter[i][j]
				off := m.offset[i][j]*9/10 + time.Duration(rng.Int64N(int64(jit)+1)) - jit/2
				off = min(max(off, -jit), jit)
				m.offset[i][j] = off
				l.RTT = max(0, l.RTT+off)
				l.Jitter = time.Duration(float64(jit) * (0.5 + rng.Float64()))
			}
			if err := s.SetLink(peerName(i), peerName(j), l); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func (m *noisyMesh) dests() map[string]Dest {
	d := map[string]Dest{}
	for i := 1; i < m.n; i++ {
		d[peerName(i)] = Dest{}
	}
	return d
}

// run feeds noise every step for steps steps and returns the switches seen,
// as "dest:reason" strings.
func (m *noisyMesh) run(t *testing.T, s *Selector, rng *rand.Rand, start time.Time, step time.Duration, steps int) []string {
	t.Helper()
	var switches []string
	for k := 1; k <= steps; k++ {
		m.feed(t, s, rng)
		for d, c := range s.Select(start.Add(time.Duration(k) * step)) {
			if c.Switch != "" {
				switches = append(switches, d+":"+c.Switch)
			}
		}
	}
	return switches
}

// RTT noise within the measured jitter around a stable mesh moves no traffic:
// every destination stays on its direct link. The same noise does move
// traffic under the fixed margins alone (JitterMargin ~0), so the property is
// the jitter term's doing and the test can fail.
func TestNoiseWithinJitterDoesNotSwitch(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	oldPolicySwitches := 0
	for seed := range uint64(8) {
		rng := rand.New(rand.NewPCG(seed, 11))
		// Lab-like: sub-10 ms links with jitter of up to 4 ms (a loaded host).
		m := newNoisyMesh(rng, 16, 4*time.Millisecond)
		for _, jm := range []float64{0, 1e-9} { // 0: the default
			s, err := New(Config{Self: "p0", JitterMargin: jm})
			if err != nil {
				t.Fatal(err)
			}
			s.SetDestinations(m.dests())
			m.feed(t, s, nil)
			for d, c := range s.Select(start) {
				if len(c.Path) != 1 {
					t.Fatalf("seed %d: %s starts on %v (%s), want the direct link", seed, d, c.Path, c.Reason)
				}
			}
			sw := m.run(t, s, rand.New(rand.NewPCG(seed, 12)), start, 500*time.Millisecond, 240)
			if jm != 0 {
				oldPolicySwitches += len(sw)
				continue
			}
			if len(sw) > 0 {
				t.Fatalf("seed %d: %d switches on noise within jitter, e.g. %v", seed, len(sw), sw[:min(5, len(sw))])
			}
			for d, c := range s.Choices() {
				if len(c.Path) != 1 {
					t.Fatalf("seed %d: %s on %v (%s) after the noise, want the direct link", seed, d, c.Path, c.Reason)
				}
			}
		}
	}
	if oldPolicySwitches == 0 {
		t.Fatal("the fixed margins alone did not switch on this noise either: the test shows nothing")
	}
	t.Logf("fixed margins alone: %d switches over 8 meshes × 120 s", oldPolicySwitches)
}

// A real degradation of a direct link (40 ms more, beyond the jitter margin)
// still moves traffic to a relay within Hold and one step, as before, and
// says so.
func TestDegradationStillSwitches(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	const step = 500 * time.Millisecond
	for seed := range uint64(8) {
		rng := rand.New(rand.NewPCG(seed, 21))
		// Links with up to 1 ms of jitter: the 40 ms step is then at least 4× the
		// summed jitter of the direct path and any relay (JitterMargin).
		m := newNoisyMesh(rng, 16, time.Millisecond)
		s, err := New(Config{Self: "p0"})
		if err != nil {
			t.Fatal(err)
		}
		s.SetDestinations(m.dests())
		m.feed(t, s, nil)
		s.Select(start)
		noise := rand.New(rand.NewPCG(seed, 22))
		if sw := m.run(t, s, noise, start, step, 20); len(sw) > 0 {
			t.Fatalf("seed %d: switches before the degradation: %v", seed, sw)
		}
		// The degraded link's measured jitter rises for a while too (the prober's
		// jitter follows |RTT(i) − RTT(i−1)| with weight 1/16: one 40 ms step adds 2.5 ms).
		m.extra[0][5], m.extra[5][0] = 40*time.Millisecond, 40*time.Millisecond
		m.jitter[0][5] += 2500 * time.Microsecond
		m.jitter[5][0] += 2500 * time.Microsecond
		at := start.Add(20 * step)
		var moved time.Duration
		for k := 1; k <= 20 && moved == 0; k++ {
			m.feed(t, s, noise)
			now := at.Add(time.Duration(k) * step)
			if c, ok := s.Select(now)["p5"]; ok && len(c.Path) == 2 {
				if c.Switch != SwitchBetter {
					t.Fatalf("seed %d: switch %q (%s), want %q", seed, c.Switch, c.Reason, SwitchBetter)
				}
				moved = now.Sub(at)
			}
		}
		if moved == 0 || moved > DefaultConfig().Hold+step {
			t.Fatalf("seed %d: moved to a relay after %v, want within %v", seed, moved, DefaultConfig().Hold+step)
		}
	}
}

// The jitter term alone holds traffic on the direct link: a relay 5 ms
// cheaper (past 20% and 2 ms) is taken on quiet paths (summed jitter 0.6 ms,
// margin 2.4 ms), not on noisy ones (6 ms, margin 24 ms).
func TestJitterScalesTheMargin(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	for _, c := range []struct {
		jitterMs float64
		want     []string
	}{{0.2, []string{"r", "b"}}, {2, []string{"b"}}} {
		t.Run(fmt.Sprintf("jitter %vms", c.jitterMs), func(t *testing.T) {
			s, _ := New(Config{Self: "a"})
			s.SetDestinations(map[string]Dest{"b": {}})
			l := func(rtt float64) Link { return Link{RTT: ms(rtt), Jitter: ms(c.jitterMs), Up: true} }
			load(t, s, nil, topo(map[string]Link{"a-b": l(10), "a-r": l(5), "r-b": l(5)}))
			s.Select(start)
			load(t, s, nil, topo(map[string]Link{"a-b": l(10), "a-r": l(2.5), "r-b": l(2.5)}))
			for k := range 10 {
				s.Select(start.Add(time.Duration(k+1) * time.Second))
			}
			if got, _ := s.Choice("b"); !slices.Equal(got.Path, c.want) {
				t.Fatalf("path %v (%s), want %v", got.Path, got.Reason, c.want)
			}
		})
	}
}

// Estimates never move traffic off a measured working relay.
func TestEstimateKeepsMeasuredRelay(t *testing.T) {
	est := fakeEstimator{"a>b": ms(1)}
	s, _ := New(Config{Self: "a", Estimator: est})
	s.SetDestinations(map[string]Dest{"b": {}})
	t0 := time.Unix(100, 0)
	g := topo(map[string]Link{"a-b": downLink, "a-r": lk(2, 0), "r-b": lk(3, 0)})
	load(t, s, nil, g)
	if c := s.Select(t0)["b"]; !slices.Equal(c.Path, []string{"r", "b"}) {
		t.Fatalf("b: %v (%s), want via r", c.Path, c.Reason)
	}
	// The direct link's figures are withdrawn (no longer probed): the 1 ms estimate
	// must not take traffic off the working relay.
	g2 := topo(map[string]Link{"a-r": lk(2, 0), "r-b": lk(3, 0)})
	load(t, s, g, g2)
	for k := range 20 {
		s.Select(t0.Add(time.Duration(k+1) * time.Second))
	}
	c, _ := s.Choice("b")
	if !slices.Equal(c.Path, []string{"r", "b"}) || c.Estimated || !strings.Contains(c.Reason, "keeping the measured relay") {
		t.Fatalf("b: %+v, want the measured relay kept", c)
	}
	// The relay breaks: now the estimate is all there is.
	g3 := topo(map[string]Link{"a-r": downLink, "r-b": lk(3, 0)})
	load(t, s, g2, g3)
	if c := s.Select(t0.Add(30 * time.Second))["b"]; !c.Estimated || !slices.Equal(c.Path, []string{"b"}) {
		t.Fatalf("b after the relay broke: %+v, want the estimated direct path", c)
	}
}

// Choice.Switch names why a measured path was left, and only then.
func TestSwitchReasons(t *testing.T) {
	gold, _ := ParseSLA("gold: rtt<=20ms")
	s, _ := New(Config{Self: "a", SLA: gold})
	s.SetDestinations(map[string]Dest{"b": {}})
	t0 := time.Unix(100, 0)
	steps := []struct {
		at   time.Duration
		g    graph
		path []string
		sw   string
	}{
		{0, topo(map[string]Link{"a-b": lk(10, 0), "a-r": lk(9, 0), "r-b": lk(9, 0)}), []string{"b"}, ""},
		{1, topo(map[string]Link{"a-b": lk(30, 0), "a-r": lk(9, 0), "r-b": lk(9, 0)}), []string{"r", "b"}, SwitchSLA},
		{2, topo(map[string]Link{"a-b": lk(30, 0), "a-r": downLink, "r-b": lk(9, 0)}), []string{"b"}, SwitchBroken},
		{3, topo(map[string]Link{"a-b": lk(40, 0), "a-r": downLink, "r-b": lk(9, 0)}), []string{"b"}, ""},
		{4, topo(map[string]Link{"a-b": lk(40, 0), "a-r": lk(1, 0), "r-b": lk(1, 0)}), []string{"r", "b"}, SwitchSLA},
		{5, topo(map[string]Link{"a-b": lk(1, 0), "a-r": lk(1, 0), "r-b": lk(1, 0)}), []string{"r", "b"}, ""},
		{9, topo(map[string]Link{"a-b": lk(1, 0), "a-r": lk(1, 0), "r-b": lk(1, 0)}), []string{"b"}, SwitchBetter},
	}
	var prev graph
	for i, st := range steps {
		load(t, s, prev, st.g)
		prev = st.g
		c := s.Select(t0.Add(st.at * time.Second))["b"]
		got, _ := s.Choice("b")
		if !slices.Equal(got.Path, st.path) || c.Switch != st.sw {
			t.Fatalf("step %d: path %v switch %q (%s); want %v %q", i, got.Path, c.Switch, got.Reason, st.path, st.sw)
		}
	}
}

// A first measured choice takes a direct link that meets the SLA unless a
// relay beats it by the switch margin: a relay faster on one noisy sample
// would be left again after the hold, a flap per returning measurement.
func TestInitialChoicePrefersDirect(t *testing.T) {
	jl := func(rtt, jitter float64) Link { return Link{RTT: ms(rtt), Jitter: ms(jitter), Up: true} }
	for _, c := range []struct {
		name string
		g    graph
		want []string
	}{
		{"relay faster within the noise", topo(map[string]Link{"a-b": jl(5, 1), "a-r": jl(1, 0.5), "r-b": jl(1, 0.5)}), []string{"b"}},
		{"relay faster beyond the noise", topo(map[string]Link{"a-b": jl(12, 1), "a-r": jl(1, 0.5), "r-b": jl(1, 0.5)}), []string{"r", "b"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, _ := New(Config{Self: "a", Estimator: fakeEstimator{"a>b": ms(3)}})
			s.SetDestinations(map[string]Dest{"b": {}})
			load(t, s, nil, c.g)
			if got := s.Select(time.Unix(100, 0))["b"]; !slices.Equal(got.Path, c.want) || got.Switch != "" {
				t.Fatalf("first choice %v switch %q (%s), want %v and no switch", got.Path, got.Switch, got.Reason, c.want)
			}
			// Back from an estimate (the direct link's figures withdrawn, then back).
			g2 := topo(map[string]Link{"a-r": c.g["a"]["r"], "r-b": c.g["r"]["b"]})
			load(t, s, c.g, g2)
			s.Select(time.Unix(101, 0))
			load(t, s, g2, c.g)
			s.Select(time.Unix(102, 0))
			if got, _ := s.Choice("b"); !slices.Equal(got.Path, c.want) {
				t.Fatalf("choice back from the estimate %v (%s), want %v", got.Path, got.Reason, c.want)
			}
		})
	}
}
