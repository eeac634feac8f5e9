package router

import (
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/segments"
	"github.com/weftnet/weft/router/page"
)

func TestRing(t *testing.T) {
	r := newRing[int](3)
	if _, ok := r.last(); ok || r.len() != 0 || len(r.items()) != 0 {
		t.Fatal("an empty ring holds something")
	}
	r.add(1)
	r.add(2)
	if got := r.items(); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("items %v", got)
	}
	for i := 3; i <= 7; i++ {
		r.add(i)
	}
	if got := r.items(); !slices.Equal(got, []int{5, 6, 7}) || r.len() != 3 {
		t.Fatalf("after wrapping: %v", got)
	}
	if l, _ := r.last(); l != 7 {
		t.Fatalf("last %d", l)
	}
	r.add(8) // next wraps to 0: last is the end of the buffer's start
	r.add(9)
	r.add(10)
	if l, _ := r.last(); l != 10 || !slices.Equal(r.items(), []int{8, 9, 10}) {
		t.Fatalf("last %d, items %v", l, r.items())
	}
	items := r.items()
	items[0] = 99
	if r.items()[0] == 99 {
		t.Fatal("items shares the ring's buffer")
	}
}

// 15 minutes at one sample every 5 s, and no more, per ring.
func TestHistoryBoundedWindow(t *testing.T) {
	if historyLen != 180 {
		t.Fatalf("historyLen %d, want 180 (15 min / 5 s)", historyLen)
	}
	h := newHistory()
	now := time.Unix(1e9, 0)
	for i := range 500 {
		h.recordLinks(page.ViaLink, map[string]mesh.LinkStats{"b": {RTT: time.Duration(i) * time.Millisecond, Up: true}}, now.Add(time.Duration(i)*historyEvery))
	}
	s, ok := h.linkSamples(page.HistoryKey{Peer: "b", Via: page.ViaLink})
	if !ok || len(s) != historyLen || s[len(s)-1].RTTms != 499 || s[0].RTTms != 320 {
		t.Fatalf("%d samples, first %v last %v", len(s), s[0], s[len(s)-1])
	}
	if _, ok := h.linkSamples(page.HistoryKey{Peer: "b", Via: page.ViaUnderlay}); ok {
		t.Fatal("an underlay ring appeared from link samples")
	}
}

// A peer no longer measured keeps its ring for a window (the page still shows what
// happened), then the ring goes; rings beyond the cap are not made.
func TestHistoryForgetsAndCaps(t *testing.T) {
	h := newHistory()
	now := time.Unix(1e9, 0)
	h.recordLinks(page.ViaLink, map[string]mesh.LinkStats{"b": {Up: true}, "c": {Up: true}}, now)
	h.recordLinks(page.ViaLink, map[string]mesh.LinkStats{"b": {Up: true}}, now.Add(historyWindow))
	if got := h.keys(); len(got) != 2 {
		t.Fatalf("c forgotten too early: %v", got)
	}
	h.recordLinks(page.ViaLink, map[string]mesh.LinkStats{"b": {Up: true}}, now.Add(historyWindow+historyEvery))
	if got := h.keys(); len(got) != 1 || got[0].Peer != "b" {
		t.Fatalf("keys %v, want only b", got)
	}
	many := map[string]mesh.LinkStats{}
	for i := range historyMaxRings + 10 {
		many[string(rune('A'+i%26))+time.Duration(i).String()] = mesh.LinkStats{Up: true}
	}
	h.recordLinks(page.ViaUnderlay, many, now)
	if n := len(h.keys()); n != historyMaxRings {
		t.Fatalf("%d rings, cap %d", n, historyMaxRings)
	}
}

func TestHistoryInterfaces(t *testing.T) {
	h := newHistory()
	now := time.Unix(1e9, 0)
	row := func(name string, c segments.Counters) []segments.Iface {
		return []segments.Iface{{Name: name, Kind: segments.KindBridge, Network: "default", Counters: c}}
	}
	h.recordIfaces(row("weft", segments.Counters{RxBytes: 1000, TxBytes: 5000}), now)
	h.recordIfaces(row("weft", segments.Counters{RxBytes: 6000, TxBytes: 5000, RxDropped: 2, RxErrors: 3}), now.Add(5*time.Second))
	// recreated: counters start again from zero, which is no negative rate
	h.recordIfaces(row("weft", segments.Counters{RxBytes: 10, TxBytes: 10}), now.Add(10*time.Second))
	ifs := h.interfaces()
	if len(ifs) != 1 || len(ifs[0].Samples) != 2 {
		t.Fatalf("interfaces %+v", ifs)
	}
	if s := ifs[0].Samples[0]; s.RxBps != 1000 || s.TxBps != 0 || s.RxDrop != 2 {
		t.Fatalf("first rate %+v, want 1000 B/s in", s)
	}
	if s := ifs[0].Samples[1]; s.RxBps != 0 || s.TxBps != 0 {
		t.Fatalf("rate after a restart %+v, want 0", s)
	}
	if i := ifs[0]; i.Kind != segments.KindBridge || i.Network != "default" || i.RxBytes != 10 || i.Counters.RxBytes != 10 {
		t.Fatalf("interface %+v: want the last reading, with its kind and network", i)
	}
	// An interface gone is kept for a window (its history still shows), then dropped.
	h.recordIfaces(nil, now.Add(10*time.Second+historyWindow))
	if n := len(h.interfaces()); n != 1 {
		t.Fatalf("%d interfaces right after the last reading, want 1", n)
	}
	h.recordIfaces(nil, now.Add(11*time.Second+historyWindow))
	if n := len(h.interfaces()); n != 0 {
		t.Fatalf("%d interfaces a window after the last reading, want 0", n)
	}
}

// The page's interface rows are the rows weft_iface_* exports: the sampler reads them
// from the segments part, veths summed per network, so the two cannot disagree.
func TestHistoryReadsSegmentCounters(t *testing.T) {
	reg := prometheus.NewRegistry()
	s, err := newSegments(segmentsConfig{Self: "a",
		Attachments: func() []ipam.Attachment { return nil },
		Networks:    func() []ipam.NetworkStatus { return nil },
		Owned:       func() map[string]string { return map[string]string{"lo": segments.KindUnderlay} },
	}, reg)
	if err != nil {
		t.Fatal(err)
	}
	p := &Peer{history: newHistory(), segs: s, log: slog.New(slog.DiscardHandler)}
	now := time.Now()
	p.sampleHistory(now)
	p.sampleHistory(now.Add(historyEvery))
	// Other tests of this package share its network namespace and may have left weft's own
	// devices there (weft-vxlan), which the segments part also reads: look for lo alone.
	ifs := p.history.interfaces()
	i := slices.IndexFunc(ifs, func(i page.Interface) bool { return i.Name == "lo" })
	if i < 0 || ifs[i].Kind != segments.KindUnderlay || len(ifs[i].Samples) != 1 {
		t.Fatalf("interfaces %+v, want lo as the underlay with one rate sample", ifs)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "weft_iface_rx_bytes_total" {
			continue
		}
		// Every row the metrics export is a row of the page, and the counter read after the
		// page's reading is not below it.
		for _, m := range mf.GetMetric() {
			var name string
			for _, l := range m.GetLabel() {
				if l.GetName() == "iface" {
					name = l.GetValue()
				}
			}
			j := slices.IndexFunc(ifs, func(i page.Interface) bool { return i.Name == name })
			if j < 0 {
				t.Fatalf("metric for %q, not among the page rows %+v", name, ifs)
			}
			if v := m.GetCounter().GetValue(); v < float64(ifs[j].RxBytes) {
				t.Fatalf("weft_iface_rx_bytes_total{iface=%q} %v below the page's reading %d taken before it", name, v, ifs[j].RxBytes)
			}
		}
		return
	}
	t.Fatal("no weft_iface_rx_bytes_total gathered")
}
