package mesh

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// lk is an up link with the given RTT (ms) and loss.
func lk(rttMs, loss float64) LinkMetrics {
	return LinkMetrics{RTT: ms(rttMs), Jitter: ms(rttMs / 10), Loss: loss, Up: true}
}

var downLink = LinkMetrics{RTT: ms(1)}

// topo builds a graph from "from>to" (one direction) or "x-y" (both)
// keys.
func topo(links map[string]LinkMetrics) Graph {
	g := Graph{}
	add := func(a, b string, m LinkMetrics) {
		if g[a] == nil {
			g[a] = map[string]LinkMetrics{}
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

func TestParseSLA(t *testing.T) {
	good := []struct {
		in   string
		want SLA
	}{
		{"gold: rtt<=5ms,jitter<=2ms,loss<=0.1%", SLA{"gold", ms(5), ms(2), 0.001}},
		{" silver :rtt <= 20ms , loss<=0.02", SLA{Name: "silver", MaxRTT: ms(20), MaxLoss: 0.02}},
		{"bulk: loss<=5%", SLA{Name: "bulk", MaxLoss: 0.05}},
	}
	for _, c := range good {
		got, err := ParseSLA(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseSLA(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
			continue
		}
		if again, err := ParseSLA(got.String()); err != nil || again != got {
			t.Errorf("String() %q does not parse back: %+v %v", got.String(), again, err)
		}
	}
	bad := []struct{ in, want string }{
		{"rtt<=5ms", "want \"name:"},
		{"Gold: rtt<=5ms", "class name \"Gold\""},
		{"gold:", "no bounds"},
		{"gold: rtt<5ms", "term \"rtt<5ms\""},
		{"gold: rtt<=5", "not a duration"},
		{"gold: rtt<=0ms", "positive"},
		{"gold: latency<=5ms", "unknown bound \"latency\""},
		{"gold: rtt<=5ms,rtt<=6ms", "rtt given twice"},
		{"gold: loss<=abc%", "not a number"},
		{"gold: loss<=150%", "at most 100%"},
		{"gold: loss<=0%", "above 0"},
		{"gold: rtt<=5ms,,loss<=1%", "empty term"},
		{"gold: jitter<=-1ms", "positive"},
	}
	for _, c := range bad {
		_, err := ParseSLA(c.in)
		if !errors.Is(err, ErrBadSLA) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseSLA(%q) error %v, want ErrBadSLA mentioning %q", c.in, err, c.want)
		}
	}
	if d := DefaultSLA(); d.check(time.Hour, time.Hour, 1) != "" {
		t.Error("the default class rejects a working link")
	}
}

func TestSelectPaths(t *testing.T) {
	gold20, _ := ParseSLA("gold: rtt<=20ms")
	tight, _ := ParseSLA("tight: rtt<=1ms")
	type step struct {
		at       time.Duration // since the start
		g        Graph
		want     []string
		wantOK   bool
		inReason string
	}
	cases := []struct {
		name  string
		cfg   PathSelectorConfig
		sla   SLA
		steps []step
	}{
		{name: "direct wins a tie", steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, "initial"},
			{0, topo(map[string]LinkMetrics{"a-b": lk(5.4, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, ""},
		}},
		{name: "broken direct link goes to the relay at once", steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"b"}, true, ""},
			{time.Second, topo(map[string]LinkMetrics{"a-b": downLink, "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"r", "b"}, true, "broke"},
			// Direct link gone from the graph altogether (b's LSA still has it).
			{2 * time.Second, topo(map[string]LinkMetrics{"b>a": lk(1, 0), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "relay better than direct under SLA", sla: gold20, steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(30, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "initial"},
		}},
		{name: "SLA violation switches at once", sla: gold20, steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(10, 0), "a-r": lk(9, 0), "r-b": lk(9, 0)}), []string{"b"}, true, ""},
			{time.Second, topo(map[string]LinkMetrics{"a-b": lk(30, 0), "a-r": lk(9, 0), "r-b": lk(9, 0)}), []string{"r", "b"}, true, "violated the SLA"},
		}},
		{name: "no path meets the SLA: best available", sla: tight, steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(1, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, false, "no path meets SLA tight"},
		}},
		{name: "flapping metrics do not flap the choice", steps: func() []step {
			calm := topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(5, 0), "r-b": lk(5, 0)})
			spike := topo(map[string]LinkMetrics{"a-b": lk(10, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)})
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
			{0, topo(map[string]LinkMetrics{"a-b": downLink, "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, ""},
			{1 * time.Second, topo(map[string]LinkMetrics{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{2 * time.Second, topo(map[string]LinkMetrics{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{3900 * time.Millisecond, topo(map[string]LinkMetrics{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{4 * time.Second, topo(map[string]LinkMetrics{"a-b": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, "better than via r for 3s"},
		}},
		{name: "direct link back at equal cost returns after the hold", steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": downLink, "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, ""},
			{1 * time.Second, topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, "holding"},
			{4 * time.Second, topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"b"}, true, ""},
		}},
		{name: "small gains do not move traffic", steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(10, 0), "a-r": lk(5, 0), "r-b": lk(6, 0)}), []string{"b"}, true, ""},
			// Relay 9ms vs 10ms: 10% better, under the 20% margin.
			{time.Second, topo(map[string]LinkMetrics{"a-b": lk(10, 0), "a-r": lk(4, 0), "r-b": lk(5, 0)}), []string{"b"}, true, "no candidate better"},
			{10 * time.Second, topo(map[string]LinkMetrics{"a-b": lk(10, 0), "a-r": lk(4, 0), "r-b": lk(5, 0)}), []string{"b"}, true, ""},
		}},
		{name: "loss penalty changes the choice", steps: []step{
			// Direct 5ms + 5% loss costs 5 + 10 = 15ms; relay 8ms without loss.
			{0, topo(map[string]LinkMetrics{"a-b": lk(5, 0.05), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "without loss the same direct link wins", steps: []step{
			{0, topo(map[string]LinkMetrics{"a-b": lk(5, 0), "a-r": lk(4, 0), "r-b": lk(4, 0)}), []string{"b"}, true, ""},
		}},
		{name: "asymmetric links use the origin's measurement", steps: []step{
			// a measures a→b at 50ms; b measures b→a at 1ms: a relays.
			{0, topo(map[string]LinkMetrics{"a>b": lk(50, 0), "b>a": lk(1, 0), "a-r": lk(2, 0), "r-b": lk(3, 0)}), []string{"r", "b"}, true, ""},
		}},
		{name: "relay without its own advertisement is not used", steps: []step{
			// a→r is measured, but r has not published r→b.
			{0, topo(map[string]LinkMetrics{"a>b": lk(50, 0), "a>r": lk(1, 0), "b>r": lk(1, 0)}), []string{"b"}, true, ""},
		}},
		{name: "one relay at most by default", steps: []step{
			{0, topo(map[string]LinkMetrics{"a-r1": lk(1, 0), "r1-r2": lk(1, 0), "r2-b": lk(1, 0)}), nil, false, "no working path"},
		}},
		{name: "more hops when configured", cfg: PathSelectorConfig{MaxHops: 3}, steps: []step{
			{0, topo(map[string]LinkMetrics{"a-r1": lk(1, 0), "r1-r2": lk(1, 0), "r2-b": lk(1, 0)}), []string{"r1", "r2", "b"}, true, ""},
		}},
		{name: "no path then a path", steps: []step{
			{0, Graph{}, nil, false, "no working path to b"},
			{time.Second, topo(map[string]LinkMetrics{"a-b": lk(1, 0)}), []string{"b"}, true, "initial"},
		}},
	}
	start := time.Unix(1_700_000_000, 0)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := NewPathSelector(c.cfg)
			if err != nil {
				t.Fatal(err)
			}
			sla := c.sla
			if sla.Name == "" {
				sla = DefaultSLA()
			}
			var since time.Time
			for i, st := range c.steps {
				pc := s.Select(st.g, "a", "b", sla, start.Add(st.at))
				if !slices.Equal(pc.Path, st.want) || pc.SLAOK != st.wantOK || !strings.Contains(pc.Reason, st.inReason) {
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
	s, _ := NewPathSelector(PathSelectorConfig{})
	g := topo(map[string]LinkMetrics{
		"a-r": {RTT: ms(2), Jitter: ms(1), Loss: 0.1, Up: true},
		"r-b": {RTT: ms(3), Jitter: ms(2), Loss: 0.2, Up: true},
	})
	pc := s.Select(g, "a", "b", DefaultSLA(), time.Now())
	if pc.RTT != ms(5) || pc.Jitter != ms(3) || math.Abs(pc.Loss-0.28) > 1e-9 || pc.Cost != ms(5)+ms(60) {
		t.Errorf("figures %+v, want rtt 5ms, jitter 3ms, loss 0.28, cost 65ms", pc)
	}
	lossy, _ := ParseSLA("x: loss<=10%")
	if pc := s.Select(g, "a", "b", lossy, time.Now()); pc.SLAOK || !strings.Contains(pc.Reason, "loss 28.00% > 10.00%") {
		t.Errorf("loss SLA: %+v", pc)
	}
	// Per-class state: the two classes above keep separate state, Forget drops both.
	s.Forget("b")
	if len(s.state) != 0 {
		t.Errorf("state after Forget: %v", s.state)
	}
	if _, err := NewPathSelector(PathSelectorConfig{MaxHops: 9}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("MaxHops 9: %v", err)
	}
}
