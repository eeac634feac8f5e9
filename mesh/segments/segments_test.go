package segments

import (
	"testing"
	"time"
)

const ms = time.Millisecond

func TestWindowFigure(t *testing.T) {
	w := NewWindow(4)
	if w.Figure().Known() {
		t.Fatal("empty window has a figure")
	}
	for _, d := range []time.Duration{5 * ms, 1 * ms, 3 * ms} {
		w.Add(d, false)
	}
	w.Add(0, true)
	f := w.Figure()
	if f.RTT != 3*ms || f.Loss != 0.25 || f.Samples != 4 {
		t.Fatalf("figure %+v, want 3ms, 0.25 loss, 4 samples", f)
	}
	// The ring forgets the oldest: four more answered samples leave no loss.
	for range 4 {
		w.Add(10*ms, false)
	}
	if f := w.Figure(); f.Loss != 0 || f.RTT != 10*ms || f.Samples != 4 {
		t.Fatalf("after wrap %+v", f)
	}
}

func TestBaselineLeavesOutRecent(t *testing.T) {
	h := NewHistory(100)
	t0 := time.Unix(1000, 0)
	for i := range 30 {
		h.Add(t0.Add(time.Duration(i)*time.Second), Figure{RTT: 1 * ms, Samples: 1})
	}
	for i := 30; i < 40; i++ {
		h.Add(t0.Add(time.Duration(i)*time.Second), Figure{RTT: 31 * ms, Samples: 1})
	}
	now := t0.Add(40 * time.Second)
	base, ok := h.Baseline(now, 5*time.Minute, 10*time.Second, 5)
	if !ok || base.RTT != 1*ms {
		t.Fatalf("baseline %+v %v, want 1ms (the recent 31ms left out)", base, ok)
	}
	if _, ok := h.Baseline(now, 5*time.Minute, 39*time.Second, 5); ok {
		t.Fatal("baseline from a single point")
	}
	h.Add(now, Figure{}) // unknown figures are not kept
	if h.Len() != 40 {
		t.Fatalf("history holds %d", h.Len())
	}
	small := NewHistory(3)
	for i := range 10 {
		small.Add(t0.Add(time.Duration(i)*time.Second), Figure{RTT: time.Duration(i) * ms, Samples: 1})
	}
	if small.Len() != 3 {
		t.Fatalf("bounded history holds %d", small.Len())
	}
}

func TestCompare(t *testing.T) {
	th := DefaultThreshold()
	base := Figure{RTT: 1 * ms, Samples: 10}
	for _, tc := range []struct {
		cur  Figure
		grew bool
	}{
		{Figure{RTT: 2 * ms, Samples: 1}, false},             // +1ms: under 2ms
		{Figure{RTT: 4 * ms, Samples: 1}, true},              // +3ms
		{Figure{RTT: 1 * ms, Loss: 0.2, Samples: 1}, true},   // loss
		{Figure{RTT: 50 * ms}, false},                        // unknown
		{Figure{RTT: 0, Loss: 0, Samples: 1}, false},         // fell
		{Figure{RTT: 1 * ms, Loss: 0.04, Samples: 1}, false}, // loss under 5 %
		{Figure{RTT: 2900 * time.Microsecond, Samples: 1}, false},
	} {
		if c := Compare(tc.cur, base, th); c.Grew != tc.grew {
			t.Errorf("Compare(%+v, %+v) = %+v, want grew %v", tc.cur, base, c, tc.grew)
		}
	}
	// Relative part: a 100ms baseline needs more than 50ms.
	if c := Compare(Figure{RTT: 140 * ms, Samples: 1}, Figure{RTT: 100 * ms, Samples: 1}, th); c.Grew {
		t.Errorf("+40%% counted as grown: %+v", c)
	}
}

func TestSum(t *testing.T) {
	f := Sum(Figure{RTT: 100 * time.Microsecond, Samples: 5}, Figure{RTT: 30 * ms, Loss: 0.5, Samples: 20}, Figure{RTT: 200 * time.Microsecond, Loss: 0.5, Samples: 3})
	if f.RTT != 30300*time.Microsecond || f.Loss != 0.75 || f.Samples != 3 {
		t.Fatalf("sum %+v", f)
	}
	if Sum(Figure{RTT: ms, Samples: 1}, Figure{}).Known() {
		t.Fatal("sum with an unknown part is known")
	}
	if Sum().Known() {
		t.Fatal("empty sum known")
	}
}

func TestBlame(t *testing.T) {
	th := DefaultThreshold()
	grew := func(d time.Duration) Change { return Change{Grew: true, RTTDelta: d} }
	for _, tc := range []struct {
		name string
		p    Path
		want string
	}{
		{"nothing", Path{}, ""},
		{"underlay carries the link", Path{Underlay: grew(30 * ms), Link: grew(31 * ms)}, Underlay},
		{"tunnel alone", Path{Link: grew(20 * ms)}, Link},
		{"tunnel beyond the underlay", Path{Underlay: grew(5 * ms), Link: grew(25 * ms)}, Link},
		{"local bridge", Path{LocalBridge: grew(4 * ms)}, Bridge},
		{"remote bridge over a smaller underlay change", Path{RemoteBridge: grew(9 * ms), Underlay: grew(3 * ms), Link: grew(3 * ms)}, RemoteBridge},
		{"loss", Path{Link: Change{Grew: true, LossDelta: 0.3}, LocalBridge: grew(3 * ms)}, Link},
	} {
		if got := Blame(tc.p, th); got != tc.want {
			t.Errorf("%s: blame %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestLossCrossCheck(t *testing.T) {
	for _, tc := range []struct {
		sent, recv int64
		ratio      float64
		ok         bool
	}{
		{1000, 900, 0.1, true},
		{1000, 1010, 0, true}, // read a moment apart
		{10, 5, 0, false},     // too few
		{1000, -5, 0, false},  // counter reset
		{0, 0, 0, false},
	} {
		r, ok := LossCrossCheck(tc.sent, tc.recv, 100)
		if ok != tc.ok || (ok && (r < tc.ratio-1e-9 || r > tc.ratio+1e-9)) {
			t.Errorf("LossCrossCheck(%d, %d) = %v %v, want %v %v", tc.sent, tc.recv, r, ok, tc.ratio, tc.ok)
		}
	}
}

func TestAggregate(t *testing.T) {
	c := func(n uint64) Counters { return Counters{RxPackets: n, TxPackets: n, Overruns: 1} }
	in := []Iface{
		{Name: "vethA", Kind: KindVeth, Network: "default", Counters: c(1)},
		{Name: "vethB", Kind: KindVeth, Network: "default", Counters: c(2)},
		{Name: "vethC", Kind: KindVeth, Network: "media", Counters: c(4)},
		{Name: "weft-default", Kind: KindBridge, Network: "default", Counters: c(8)},
		{Name: "eth0", Kind: KindUnderlay, Counters: c(16)},
	}
	out, dropped := Aggregate(in, 0)
	if dropped != 0 || len(out) != 4 {
		t.Fatalf("rows %+v dropped %d", out, dropped)
	}
	if out[0].Name != "weft-default" || out[1].Name != "eth0" {
		t.Fatalf("order %+v", out)
	}
	d := out[2]
	if d.Name != VethSumName("default") || d.Members != 2 || d.Counters.RxPackets != 3 || d.Counters.Overruns != 2 {
		t.Fatalf("default veths %+v", d)
	}
	if out[3].Name != VethSumName("media") || out[3].Counters.TxPackets != 4 {
		t.Fatalf("media veths %+v", out[3])
	}
	capped, dropped := Aggregate(in, 3)
	if len(capped) != 3 || dropped != 1 || capped[2].Name != VethSumName("default") {
		t.Fatalf("capped %+v dropped %d", capped, dropped)
	}
}
