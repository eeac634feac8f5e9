package pathsel

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// graph is a directed link set: graph[from][to].
type graph map[string]map[string]Link

// lk is an up link with the given RTT (ms) and loss.
func lk(rttMs, loss float64) Link {
	return Link{RTT: ms(rttMs), Jitter: ms(rttMs / 10), Loss: loss, Up: true}
}

var downLink = Link{RTT: ms(1)}

// topo builds a graph from "from>to" (one direction) or "x-y" (both) keys.
func topo(links map[string]Link) graph {
	g := graph{}
	add := func(a, b string, m Link) {
		if g[a] == nil {
			g[a] = map[string]Link{}
		}
		g[a][b] = m
	}
	for k, m := range links {
		if a, b, ok := strings.Cut(k, ">"); ok {
			add(a, b, m)
			continue
		}
		a, b, _ := strings.Cut(k, "-")
		add(a, b, m)
		add(b, a, m)
	}
	return g
}

// load makes s hold exactly g (prev is what it held).
func load(t testing.TB, s *Selector, prev, g graph) {
	t.Helper()
	for from, links := range prev {
		for to := range links {
			if _, ok := g[from][to]; !ok {
				s.RemoveLink(from, to)
			}
		}
	}
	for from, links := range g {
		for to, l := range links {
			if err := s.SetLink(from, to, l); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestSelectPaths(t *testing.T) {
	gold20, _ := ParseSLA("gold: rtt<=20ms")
	tight, _ := ParseSLA("tight: rtt<=1ms")
	type step struct {
		at       time.Duration // since the start
		g        graph
		want     []string
		wantOK   bool
		inReason string
	}
	cases := []struct {
		name  string
		sla   SLA
		steps []step
	}{
		{name: "direct wins a tie", steps: []step{
			{0, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, "initial"},
			{0, topo(map[string]Link{"a-b": lk(5.4, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, ""},
		}},
		{name: "broken direct link goes to the relay at once", steps: []step{
			{0, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"b"}, true, ""},
			{time.Second, topo(map[string]Link{"a-b": downLink, "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"r", "b"}, true, "broke"},
			// a's own direction gone, b's still published: it is the pair's link.
			{2 * time.Second, topo(map[string]Link{"b>a": downLink, "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "relay better than direct under SLA", sla: gold20, steps: []step{
			{0, topo(map[string]Link{"a-b": lk(30, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "initial"},
		}},
		{name: "SLA violation switches at once", sla: gold20, steps: []step{
			{0, topo(map[string]Link{"a-b": lk(10, 0), "a-r": lk(9, 0), "r-b": lk(9, 0)}), []string{"b"}, true, ""},
			{time.Second, topo(map[string]Link{"a-b": lk(30, 0), "a-r": lk(9, 0), "r-b": lk(9, 0)}), []string{"r", "b"}, true, "violated the SLA"},
		}},
		{name: "no path meets the SLA: best available", sla: tight, steps: []step{
			{0, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(1, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, false, "no path meets SLA tight"},
		}},
		{name: "flapping metrics do not flap the choice", steps: func() []step {
			calm := topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(5, 0), "r-b": lk(5, 0)})
			spike := topo(map[string]Link{"a-b": lk(10, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)})
			var s []step
			for i := range 20 {
				g := calm
				if i%2 == 1 {
					g = spike // relay 50% better for one second, then not
				}
				s = append(s, step{time.Duration(i) * time.Second, g, []string{"b"}, true, ""})
			}
			return s
		}()},
		{name: "back to direct only after the hold", steps: []step{
			{0, topo(map[string]Link{"a-b": downLink, "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, ""},
			{1 * time.Second, topo(map[string]Link{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{2 * time.Second, topo(map[string]Link{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{3900 * time.Millisecond, topo(map[string]Link{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{4 * time.Second, topo(map[string]Link{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, "better than via r for 3s"},
		}},
		{name: "direct link back at equal cost returns after the hold", steps: []step{
			{0, topo(map[string]Link{"a-b": downLink, "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, ""},
			{1 * time.Second, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{4 * time.Second, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, ""},
		}},
		{name: "small gains do not move traffic", steps: []step{
			{0, topo(map[string]Link{"a-b": lk(10, 0), "a-r": lk(5, 0), "r-b": lk(6, 0)}), []string{"b"}, true, ""},
			// Relay 9ms vs 10ms: 10% better, under the 20% margin.
			{time.Second, topo(map[string]Link{"a-b": lk(10, 0), "a-r": lk(4, 0), "r-b": lk(5, 0)}), []string{"b"}, true, "no candidate better"},
			{10 * time.Second, topo(map[string]Link{"a-b": lk(10, 0), "a-r": lk(4, 0), "r-b": lk(5, 0)}), []string{"b"}, true, ""},
		}},
		{name: "loss penalty changes the choice", steps: []step{
			// Direct 5ms + 5% loss costs 5 + 10 = 15ms; relay 8ms without loss.
			{0, topo(map[string]Link{"a-b": lk(5, 0.05), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "without loss the same direct link wins", steps: []step{
			{0, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"b"}, true, ""},
		}},
		{name: "a pair costs the worse of its two directions", steps: []step{
			// a measures a→b at 1ms; b measures b→a at 50ms: a relays, as b will.
			{0, topo(map[string]Link{"a>b": lk(1, 0), "b>a": lk(50, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "a link published by one end only counts", steps: []step{
			// r has not published r→b, b has published b→r.
			{0, topo(map[string]Link{"a>b": lk(50, 0), "a>r": lk(1, 0), "b>r": lk(1, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "relay without any link to the destination is not used", steps: []step{
			{0, topo(map[string]Link{"a>b": lk(50, 0), "a>r": lk(1, 0), "r>x": lk(1, 0)}), []string{"b"}, true, ""},
		}},
		{name: "one relay at most", steps: []step{
			{0, topo(map[string]Link{"a-b": downLink, "a-r1": lk(1, 0), "r1-r2": lk(1, 0), "r2-b": lk(1, 0)}), nil, false, "no working path"},
		}},
		{name: "no path then a path", steps: []step{
			{0, topo(map[string]Link{"a-b": downLink}), nil, false, "no working path to b"},
			{time.Second, topo(map[string]Link{"a-b": lk(1, 0)}), []string{"b"}, true, "initial"},
		}},
		{name: "unmeasured is reported, with the direct path", steps: []step{
			{0, topo(map[string]Link{"a-r": lk(1, 0), "r-b": lk(1, 0)}), []string{"b"}, false, "unmeasured"},
			{time.Second, topo(map[string]Link{"a-b": lk(5, 0), "a-r": lk(1, 0), "r-b": lk(1, 0)}), []string{"r", "b"}, true, "initial"},
		}},
	}
	start := time.Unix(1_700_000_000, 0)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := New(Config{Self: "a", SLA: c.sla})
			if err != nil {
				t.Fatal(err)
			}
			s.SetDestinations(map[string]Dest{"b": {}})
			var since time.Time
			prev := graph{}
			for i, st := range c.steps {
				load(t, s, prev, st.g)
				prev = st.g
				s.Select(start.Add(st.at))
				pc, ok := s.Choice("b")
				if !ok || !slices.Equal(pc.Path, st.want) || pc.SLAOK != st.wantOK || !strings.Contains(pc.Reason, st.inReason) {
					t.Fatalf("step %d (t=%v): got %v SLAOK=%v %q; want %v SLAOK=%v reason containing %q",
						i, st.at, pc.Path, pc.SLAOK, pc.Reason, st.want, st.wantOK, st.inReason)
				}
				if i > 0 && pc.Path != nil && slices.Equal(pc.Path, c.steps[i-1].want) && !pc.Since.Equal(since) {
					t.Fatalf("step %d: Since moved from %v to %v without a switch", i, since, pc.Since)
				}
				since = pc.Since
			}
		})
	}
}

func TestPathFigures(t *testing.T) {
	lossy, _ := ParseSLA("x: loss<=10%")
	for _, sla := range []SLA{{}, lossy} {
		s, _ := New(Config{Self: "a", SLA: sla})
		load(t, s, nil, topo(map[string]Link{
			"a-b": downLink,
			"a-r": {RTT: ms(2), Jitter: ms(1), Loss: 0.1, Up: true},
			"r-b": {RTT: ms(3), Jitter: ms(2), Loss: 0.2, Up: true},
		}))
		s.SetDestinations(map[string]Dest{"b": {}})
		pc := s.Select(time.Now())["b"]
		if pc.RTT != ms(5) || pc.Jitter != ms(3) || math.Abs(pc.Loss-0.28) > 1e-9 || pc.Cost != ms(5)+ms(60) {
			t.Errorf("figures %+v, want rtt 5ms, jitter 3ms, loss 0.28, cost 65ms", pc)
		}
		if sla == lossy && (pc.SLAOK || !strings.Contains(pc.Reason, "loss 28.00% > 10.00%")) {
			t.Errorf("loss SLA: %+v", pc)
		}
	}
}

func TestConfigAndBadLinks(t *testing.T) {
	for _, c := range []Config{{}, {Self: "a", SwitchRatio: 1}, {Self: "a", Hold: -1}, {Self: "a", SwitchRatio: math.NaN()}, {Self: "a", MaxLinksPerPeer: -1}} {
		if _, err := New(c); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("New(%+v) = %v, want ErrInvalidConfig", c, err)
		}
	}
	s, _ := New(Config{Self: "a", MaxLinksPerPeer: 2})
	s.SetDestinations(map[string]Dest{"b": {}})
	for _, l := range []Link{{RTT: -1}, {RTT: 2 * time.Hour}, {Jitter: -1}, {Loss: math.NaN()}, {Loss: -0.1}, {Loss: 1.5}, {RTT: math.MaxInt64}} {
		if err := s.SetLink("a", "b", l); !errors.Is(err, ErrBadLink) {
			t.Errorf("SetLink(%+v) = %v, want ErrBadLink", l, err)
		}
	}
	for _, p := range [][2]string{{"a", "a"}, {"", "b"}, {"a", ""}} {
		if err := s.SetLink(p[0], p[1], lk(1, 0)); !errors.Is(err, ErrBadLink) {
			t.Errorf("SetLink(%q, %q) = %v, want ErrBadLink", p[0], p[1], err)
		}
	}
	if _, ok := s.Link("a", "b"); ok {
		t.Error("a rejected link was recorded")
	}
	_ = s.SetLink("x", "y", lk(1, 0))
	_ = s.SetLink("x", "z", lk(1, 0))
	if err := s.SetLink("x", "w", lk(1, 0)); !errors.Is(err, ErrTooManyLinks) {
		t.Errorf("third link of x: %v, want ErrTooManyLinks", err)
	}
	if err := s.SetLink("x", "y", lk(2, 0)); err != nil {
		t.Errorf("updating a held link at the bound: %v", err)
	}
}

// Both ends of a pair, each choosing on the same link set, choose mirror
// paths (a→r→b and b→r→a), whichever direction measured what.
func TestMirrorPaths(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 200 {
		g := randomGraph(rng, 12, 5)
		sa, _ := New(Config{Self: "p0"})
		sb, _ := New(Config{Self: "p1"})
		load(t, sa, nil, g)
		load(t, sb, nil, g)
		sa.SetDestinations(map[string]Dest{"p1": {}})
		sb.SetDestinations(map[string]Dest{"p0": {}})
		now := time.Unix(1, 0)
		ca, cb := sa.Select(now)["p1"], sb.Select(now)["p0"]
		if len(ca.Path) != len(cb.Path) || len(ca.Path) == 2 && ca.Path[0] != cb.Path[0] || ca.Cost != cb.Cost {
			t.Fatalf("trial %d: p0→p1 %v (%v), p1→p0 %v (%v): not mirrors", trial, ca.Path, ca.Cost, cb.Path, cb.Cost)
		}
	}
}

func TestEncryptedOnlyRelays(t *testing.T) {
	enc := func(l Link) Link { l.Encrypted = true; return l }
	g := topo(map[string]Link{
		"a-b":  downLink,
		"a-r1": lk(1, 0), "r1-b": lk(1, 0), // plaintext relay, cheapest
		"a-r2": enc(lk(3, 0)), "r2-b": enc(lk(3, 0)),
		"a-r3": enc(lk(1, 0)), "r3>b": enc(lk(1, 0)), "b>r3": lk(1, 0), // b says plaintext: not encrypted
	})
	s, _ := New(Config{Self: "a"})
	load(t, s, nil, g)
	s.SetDestinations(map[string]Dest{"b": {Encrypted: true}})
	if c := s.Select(time.Unix(1, 0))["b"]; !slices.Equal(c.Path, []string{"r2", "b"}) {
		t.Fatalf("encrypted destination: %v (%s), want via r2", c.Path, c.Reason)
	}
	// No longer encrypted: the plaintext relay is better, but only after the hold.
	s.SetDestinations(map[string]Dest{"b": {}})
	s.Select(time.Unix(2, 0))
	if c, _ := s.Choice("b"); !slices.Equal(c.Path, []string{"r2", "b"}) || !strings.Contains(c.Reason, "holding: via r1") {
		t.Fatalf("plaintext destination: %v (%s), want via r2, holding for r1", c.Path, c.Reason)
	}
	if c := s.Select(time.Unix(5, 0))["b"]; !slices.Equal(c.Path, []string{"r1", "b"}) {
		t.Fatalf("plaintext destination after the hold: %v (%s), want via r1", c.Path, c.Reason)
	}
	// A direct link up but not encrypted is no path for an encrypted pair.
	s2, _ := New(Config{Self: "a"})
	load(t, s2, nil, topo(map[string]Link{"a-b": lk(1, 0)}))
	s2.SetDestinations(map[string]Dest{"b": {Encrypted: true}})
	if c := s2.Select(time.Unix(1, 0))["b"]; c.Path != nil {
		t.Fatalf("encrypted pair over a plaintext link: %v", c.Path)
	}
}

type fakeEstimator map[string]time.Duration

func (f fakeEstimator) EstimateRTT(a, b string) (time.Duration, bool) {
	d, ok := f[a+">"+b]
	return d, ok
}

func TestEstimates(t *testing.T) {
	est := fakeEstimator{"a>b": ms(7), "a>c": ms(40)}
	gold, _ := ParseSLA("gold: rtt<=20ms")
	s, _ := New(Config{Self: "a", Estimator: est, SLA: gold, EstimateRefresh: 5 * time.Second})
	// a→r and r→b measured: still no relay for b, whose direct link is not probed.
	load(t, s, nil, topo(map[string]Link{"a-r": lk(1, 0), "r-b": lk(1, 0)}))
	s.SetDestinations(map[string]Dest{"b": {}, "c": {}, "d": {}, "r": {}})
	t0 := time.Unix(100, 0)
	got := s.Select(t0)
	if c := got["b"]; !c.Estimated || c.RTT != ms(7) || !slices.Equal(c.Path, []string{"b"}) || !c.SLAOK {
		t.Errorf("b: %+v, want estimated 7ms direct, SLA ok", c)
	}
	if c := got["c"]; !c.Estimated || c.SLAOK || !strings.Contains(c.Reason, "estimated") {
		t.Errorf("c: %+v, want an estimate that misses the SLA", c)
	}
	if c := got["d"]; !c.Unmeasured || c.Estimated || !slices.Equal(c.Path, []string{"d"}) {
		t.Errorf("d: %+v, want unmeasured with the direct path", c)
	}
	if c := got["r"]; c.Estimated || c.RTT != ms(1) {
		t.Errorf("r: %+v, want measured 1ms", c)
	}
	// Estimates are refreshed on their own schedule, not on every Select.
	est["a>b"] = ms(9)
	if got := s.Select(t0.Add(time.Second)); len(got) != 0 {
		t.Errorf("re-evaluated before the refresh: %v", got)
	}
	if c := s.Select(t0.Add(5 * time.Second))["b"]; c.RTT != ms(9) || !c.Since.Equal(t0) {
		t.Errorf("after the refresh: %+v, want 9ms since %v", c, t0)
	}
	// A measured link replaces the estimate at once.
	_ = s.SetLink("a", "b", lk(1, 0))
	if c := s.Select(t0.Add(6 * time.Second))["b"]; c.Estimated || c.RTT != ms(1) || !strings.Contains(c.Reason, "initial") {
		t.Errorf("measured: %+v", c)
	}
}

func TestPendingDestination(t *testing.T) {
	s, _ := New(Config{Self: "a"})
	load(t, s, nil, topo(map[string]Link{"a-r": lk(1, 0), "r-b": lk(1, 0), "a>b": downLink}))
	s.SetDestinations(map[string]Dest{"b": {Pending: true}})
	if c := s.Select(time.Unix(1, 0))["b"]; !slices.Equal(c.Path, []string{"b"}) || !strings.Contains(c.Reason, "not measured yet") {
		t.Fatalf("pending: %+v", c)
	}
	_ = s.SetLink("a", "b", lk(5, 0))
	s.SetDestinations(map[string]Dest{"b": {}})
	if c := s.Select(time.Unix(2, 0))["b"]; !slices.Equal(c.Path, []string{"b"}) || !strings.Contains(c.Reason, "initial") {
		t.Fatalf("measured: %+v, want the direct link first, as while pending", c)
	}
	if c := s.Select(time.Unix(5, 0))["b"]; !slices.Equal(c.Path, []string{"r", "b"}) {
		t.Fatalf("after the hold: %+v, want via r", c)
	}
	// A destination first measured with its direct link down goes to the relay at once.
	s2, _ := New(Config{Self: "a"})
	load(t, s2, nil, topo(map[string]Link{"a-r": lk(1, 0), "r-b": lk(1, 0)}))
	s2.SetDestinations(map[string]Dest{"b": {Pending: true}})
	s2.Select(time.Unix(1, 0))
	_ = s2.SetLink("a", "b", downLink)
	s2.SetDestinations(map[string]Dest{"b": {}})
	if c := s2.Select(time.Unix(2, 0))["b"]; !slices.Equal(c.Path, []string{"r", "b"}) {
		t.Fatalf("direct down after pending: %+v, want via r at once", c)
	}
}

func TestSelectReportsOnlyChanges(t *testing.T) {
	s, _ := New(Config{Self: "a"})
	load(t, s, nil, topo(map[string]Link{"a-b": lk(1, 0), "a-c": lk(1, 0), "b-c": lk(1, 0)}))
	s.SetDestinations(map[string]Dest{"b": {}, "c": {}})
	now := time.Unix(1, 0)
	if got := s.Select(now); len(got) != 2 {
		t.Fatalf("first Select: %v", got)
	}
	if got := s.Select(now.Add(time.Second)); len(got) != 0 {
		t.Fatalf("nothing changed, got %v", got)
	}
	_ = s.SetLink("c", "x", lk(1, 0)) // a link that no path of a's uses
	if got := s.Select(now.Add(2 * time.Second)); len(got) != 0 {
		t.Fatalf("unrelated link changed choices: %v", got)
	}
	_ = s.SetLink("a", "b", lk(2, 0))
	if got := s.Select(now.Add(3 * time.Second)); len(got) != 1 || got["b"].RTT != ms(2) {
		t.Fatalf("after a→b changed: %v", got)
	}
	s.RemovePeer("b")
	s.SetDestinations(map[string]Dest{"c": {}})
	if got := s.Choices(); len(got) != 1 || got["c"].RTT != ms(1) {
		t.Fatalf("after removing b: %v", got)
	}
	if _, ok := s.Link("b", "c"); ok {
		t.Fatal("RemovePeer kept a link to b")
	}
}

// randomGraph gives n peers p0..p{n-1} about deg random links each, both
// directions mostly published, some one way, some down or lossy.
func randomGraph(rng *rand.Rand, n, deg int) graph {
	g := graph{}
	for i := range n {
		from := fmt.Sprintf("p%d", i)
		g[from] = map[string]Link{}
		for range deg {
			j := rng.IntN(n)
			if j == i {
				continue
			}
			g[from][fmt.Sprintf("p%d", j)] = randomLink(rng)
		}
	}
	for from, links := range g {
		for to := range links {
			if rng.IntN(4) > 0 {
				g[to][from] = randomLink(rng)
			}
		}
	}
	return g
}

func randomLink(rng *rand.Rand) Link {
	l := Link{RTT: time.Duration(rng.IntN(50_000)+100) * time.Microsecond, Jitter: time.Duration(rng.IntN(3000)) * time.Microsecond,
		Up: rng.IntN(10) > 0, Encrypted: rng.IntN(3) > 0}
	if rng.IntN(5) == 0 {
		l.Loss = float64(rng.IntN(100)) / 1000
	}
	return l
}

// Incremental evaluation gives the same choices as evaluating every
// destination every time, over random graphs changing a few links at a
// time (hysteresis included: Since and the held paths must agree).
func TestIncrementalEqualsFull(t *testing.T) {
	gold, _ := ParseSLA("gold: rtt<=40ms,loss<=5%")
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 7))
		n := 30 + rng.IntN(40)
		g := randomGraph(rng, n, 6)
		cfg := Config{Self: "p0", Hold: 2 * time.Second}
		if seed%2 == 1 {
			cfg.SLA = gold
		}
		inc, _ := New(cfg)
		full, _ := New(cfg)
		dests := map[string]Dest{}
		for i := 1; i < n; i++ {
			dests[fmt.Sprintf("p%d", i)] = Dest{Encrypted: rng.IntN(4) == 0}
		}
		load(t, inc, nil, g)
		load(t, full, nil, g)
		inc.SetDestinations(dests)
		full.SetDestinations(dests)
		now := time.Unix(1000, 0)
		for step := range 60 {
			now = now.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)
			for range 1 + rng.IntN(4) {
				from, to := fmt.Sprintf("p%d", rng.IntN(n)), fmt.Sprintf("p%d", rng.IntN(n))
				if from == to {
					continue
				}
				if from != "p0" && rng.IntN(2) == 0 {
					to = "p0"
				}
				switch rng.IntN(6) {
				case 0:
					inc.RemoveLink(from, to)
					full.RemoveLink(from, to)
				case 1:
					if step%10 == 9 {
						inc.RemovePeer(to)
						full.RemovePeer(to)
						continue
					}
					fallthrough
				default:
					l := randomLink(rng)
					_ = inc.SetLink(from, to, l)
					_ = full.SetLink(from, to, l)
				}
			}
			if step == 30 {
				dests["p1"] = Dest{Encrypted: !dests["p1"].Encrypted}
				delete(dests, "p2")
				inc.SetDestinations(dests)
			}
			inc.Select(now)
			full.SetDestinations(dests)
			markAll(full)
			full.Select(now)
			a, b := inc.Choices(), fullChoices(full)
			if len(a) != len(b) {
				t.Fatalf("seed %d step %d: %d choices, full recompute %d", seed, step, len(a), len(b))
			}
			for d, ca := range a {
				cb := b[d]
				if !ca.sameFigures(cb) {
					t.Fatalf("seed %d step %d dest %s:\nincremental %+v\nfull        %+v", seed, step, d, ca, cb)
				}
			}
		}
	}
}

func fullChoices(s *Selector) map[string]Choice { return s.Choices() }

// markAll makes the next Select evaluate every destination: a full recompute.
func markAll(s *Selector) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for d := range s.dests {
		s.dirty[d] = struct{}{}
	}
}

func TestLinksCopy(t *testing.T) {
	s, err := New(Config{Self: "a"})
	if err != nil {
		t.Fatal(err)
	}
	l := Link{RTT: time.Millisecond, Up: true}
	if err := s.SetLink("a", "b", l); err != nil {
		t.Fatal(err)
	}
	if err := s.SetLink("b", "c", l); err != nil {
		t.Fatal(err)
	}
	got := s.Links()
	if len(got) != 2 || got["a"]["b"] != l || got["b"]["c"] != l {
		t.Fatalf("Links() = %v", got)
	}
	got["a"]["b"] = Link{}
	if again := s.Links(); again["a"]["b"] != l {
		t.Fatal("Links() shares the selector's maps")
	}
}
