package page

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/mesh/pathsel"
	"github.com/weftnet/weft/mesh/segments"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func gold(t *testing.T) pathsel.SLA {
	t.Helper()
	s, err := pathsel.ParseSLA("gold: rtt<=20ms,loss<=10%")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// a three-peer mesh seen from a: a–c blocked, so a reaches c through b; b–c slow.
func threePeers(t *testing.T) Snapshot {
	return Snapshot{Self: "a", Now: t0, SLA: gold(t),
		Peers: []Peer{{Name: "c", State: "alive"}, {Name: "a", State: "alive", Self: true}, {Name: "b", State: "alive"}},
		Links: []Link{
			{From: "a", To: "b", Mode: ModeVXLAN, Up: true, RTT: 2 * time.Millisecond},
			{From: "b", To: "a", Mode: ModeVXLAN, Up: true, RTT: 3 * time.Millisecond, Loss: 0.05},
			{From: "a", To: "c", Mode: ModeVXLAN, Up: false},
			{From: "c", To: "a", Mode: ModeVXLAN, Up: true, RTT: time.Millisecond},
			{From: "b", To: "c", Mode: ModeDirect, ModeInferred: true, Up: true, RTT: 31 * time.Millisecond},
			{From: "x", To: "x", Up: true}, // a self-loop from a bad entry: ignored
		},
		Routes: []Route{
			{Peer: "b", Path: []string{"b"}, SLA: "gold: rtt<=20ms,loss<=10%", SLAOK: true, Since: t0.Add(-time.Minute), Reason: "direct link meets the SLA", RTT: 3 * time.Millisecond},
			{Peer: "c", Path: []string{"b", "c"}, SLA: "gold: rtt<=20ms,loss<=10%", SLAOK: false, Since: t0.Add(-5 * time.Second),
				Reason: "no path meets SLA gold", RTT: 34 * time.Millisecond},
		},
		Segments: []SegmentPath{
			{Peer: "c", Network: ""}, // host to host only, nothing measured yet
			{Peer: "b", Network: "default", Slow: segments.Underlay, Segments: []SegmentFigure{ // the source's order, one missing
				{Segment: segments.EndToEnd, RTTms: 31.2, BaselineRTTms: 1.2, HasBaseline: true, Grew: true, Estimated: true, Samples: 20},
				{Segment: segments.Underlay, RTTms: 30.5, BaselineRTTms: 0.5, HasBaseline: true, Grew: true, Samples: 20},
				{Segment: segments.Bridge, RTTms: 0.05, BaselineRTTms: 0.05, HasBaseline: true, Samples: 20},
				{Segment: segments.RemoteBridge, RTTms: 0.06, BaselineRTTms: 0.05, HasBaseline: true, Samples: 20},
			}},
			{Peer: "b", Network: "blue"},
		},
	}
}

func TestBuildTopology(t *testing.T) {
	topo := BuildTopology(threePeers(t))
	if got := []string{topo.Peers[0].Name, topo.Peers[1].Name, topo.Peers[2].Name}; !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("peers not sorted: %v", got)
	}
	ids := []string{}
	byID := map[string]TopoLink{}
	for _, l := range topo.Links {
		ids = append(ids, l.ID)
		byID[l.ID] = l
	}
	if !slices.Equal(ids, []string{"a--b", "a--c", "b--c"}) {
		t.Fatalf("links %v, want a--b a--c b--c (self-loop dropped, directions merged)", ids)
	}
	ab := byID["a--b"]
	if ab.RTTms != 3 || ab.Loss != 0.05 || ab.State != StateUp || !ab.SLAOK || !ab.Measured || ab.Mode != ModeVXLAN {
		t.Fatalf("a--b should be the worse of both directions, up and within the SLA: %+v", ab)
	}
	ac := byID["a--c"]
	if ac.State != StateDown || ac.SLAOK || !strings.Contains(ac.Why, "down") {
		t.Fatalf("a--c is down in one direction, so down: %+v", ac)
	}
	bc := byID["b--c"]
	if bc.SLAOK || !strings.Contains(bc.Why, "rtt 31ms > 20ms") || !bc.ModeInferred || bc.Measured {
		t.Fatalf("b--c breaks the rtt bound and its mode is inferred: %+v", bc)
	}
	if ab.Slow != segments.Underlay || ac.Slow != "" || bc.Slow != "" {
		t.Fatalf("slow segments a--b %q a--c %q b--c %q, want the underlay on a--b only", ab.Slow, ac.Slow, bc.Slow)
	}
	if len(topo.Relays) != 1 {
		t.Fatalf("relays %+v, want a>c via b", topo.Relays)
	}
	if r := topo.Relays[0]; r.Via != "b" || !slices.Equal(r.Path, []string{"a", "b", "c"}) || r.SLAOK {
		t.Fatalf("relay %+v", r)
	}
}

// An estimate stands in for a link nobody measures, and gives way to a measurement from
// either end, whatever the order.
func TestBuildTopologyEstimates(t *testing.T) {
	est := Link{From: "a", To: "d", Mode: ModeVXLAN, Up: true, RTT: 9 * time.Millisecond, Estimated: true}
	meas := Link{From: "d", To: "a", Up: true, RTT: 2 * time.Millisecond}
	for _, links := range [][]Link{{est}, {est, meas}, {meas, est}} {
		topo := BuildTopology(Snapshot{Self: "a", SLA: gold(t), Links: links})
		l := topo.Links[0]
		if len(links) == 1 {
			if !l.Estimated || l.Measured || l.RTTms != 9 || !l.SLAOK {
				t.Fatalf("estimate alone: %+v", l)
			}
			continue
		}
		if l.Estimated || l.RTTms != 2 {
			t.Fatalf("%d links: the measurement should win: %+v", len(links), l)
		}
		if links[0].Estimated && l.Mode != ModeVXLAN {
			t.Fatalf("the estimate's mode (this peer's link to d) was lost: %+v", l)
		}
	}
}

// A direct link that is up but bypassed for a relay shows as relayed, with the reason.
func TestBuildTopologyRelayedLink(t *testing.T) {
	s := threePeers(t)
	s.Links[2].Up = true
	s.Links[2].RTT = 40 * time.Millisecond
	topo := BuildTopology(s)
	for _, l := range topo.Links {
		if l.ID == "a--c" && (l.State != StateRelayed || l.SLAOK || !strings.Contains(l.Why, "rtt 40ms > 20ms")) {
			t.Fatalf("a--c: %+v", l)
		}
	}
	s.SLA = pathsel.DefaultSLA() // no bounds: the link holds, and says where traffic goes
	for _, l := range BuildTopology(s).Links {
		if l.ID == "a--c" && (l.State != StateRelayed || l.Why != "relayed through b: no path meets SLA gold") {
			t.Fatalf("a--c: %+v", l)
		}
	}
}

func TestBuildSLA(t *testing.T) {
	s := threePeers(t)
	topo := BuildTopology(s)
	since := map[string]SinceMark{}
	rows := BuildSLA(s, topo, since)
	if len(rows) != 3 {
		t.Fatalf("rows %+v, want a>b, a>c and b>c", rows)
	}
	ac := rows[1]
	if ac.To != "c" || ac.OK || !strings.HasPrefix(ac.Why, "rtt 34ms > 20ms") || !slices.Equal(ac.Path, []string{"a", "b", "c"}) || ac.Source != "path" {
		t.Fatalf("a>c should say which figure breaks gold: %+v", ac)
	}
	bc := rows[2]
	if bc.From != "b" || bc.To != "c" || bc.OK || bc.Source != "link" || !bc.Since.Equal(t0) {
		t.Fatalf("b>c: %+v", bc)
	}
	// The verdict holds: since stays; it changes: since moves.
	s.Now = t0.Add(time.Minute)
	if rows := BuildSLA(s, topo, since); !rows[2].Since.Equal(t0) {
		t.Fatalf("unchanged verdict moved its since to %v", rows[2].Since)
	}
	s.Links[4].RTT = time.Millisecond
	rows = BuildSLA(s, BuildTopology(s), since)
	if !rows[2].OK || !rows[2].Since.Equal(s.Now) {
		t.Fatalf("b>c recovered: %+v", rows[2])
	}
	// A pair gone from the table is forgotten.
	s.Links = s.Links[:4]
	BuildSLA(s, BuildTopology(s), since)
	if len(since) != 0 {
		t.Fatalf("since kept %v", since)
	}
}

// The segments view lists paths by peer and network, every path's segments in the order a
// packet crosses them, a segment the source left out as unmeasured.
func TestBuildSegments(t *testing.T) {
	v := BuildSegments(threePeers(t), "")
	var got []string
	for _, p := range v.Paths {
		got = append(got, p.Peer+"/"+p.Network)
		var names []string
		for _, f := range p.Segments {
			names = append(names, f.Segment)
		}
		if !slices.Equal(names, v.Order) {
			t.Fatalf("%s/%s segments %v, want %v", p.Peer, p.Network, names, v.Order)
		}
	}
	if !slices.Equal(got, []string{"b/blue", "b/default", "c/"}) {
		t.Fatalf("paths %v", got)
	}
	if !slices.Equal(v.Order, []string{segments.Bridge, segments.Underlay, segments.Link, segments.RemoteBridge, segments.EndToEnd}) {
		t.Fatalf("order %v", v.Order)
	}
	bd := v.Paths[1]
	if bd.Slow != segments.Underlay || bd.Segments[1].RTTms != 30.5 || bd.Segments[2].Samples != 0 || !bd.Segments[4].Estimated {
		t.Fatalf("b/default %+v", bd)
	}
	if v := BuildSegments(threePeers(t), "c"); len(v.Paths) != 1 || v.Paths[0].Peer != "c" {
		t.Fatalf("only c: %+v", v.Paths)
	}
	if v := BuildSegments(Snapshot{Self: "a"}, ""); v.Paths == nil || len(v.Paths) != 0 {
		t.Fatalf("no segments should be an empty list: %+v", v)
	}
}

func TestSummarize(t *testing.T) {
	if s := Summarize(nil); s.Samples != 0 || s.RTTP50ms != 0 {
		t.Fatalf("empty: %+v", s)
	}
	var xs []Sample
	for i := 1; i <= 100; i++ {
		xs = append(xs, Sample{RTTms: float64(i), JitterMs: 1, Up: true})
	}
	xs = append(xs, Sample{Up: false, Loss: 1}) // a down sample has no RTT
	s := Summarize(xs)
	if s.RTTP50ms != 50 || s.RTTP99ms != 99 || s.Samples != 101 || s.JitterMs != 1 || s.LossMax != 1 || s.LatestRTT != 100 {
		t.Fatalf("summary %+v", s)
	}
	if s.UpRatio < 0.99 || s.UpRatio > 0.991 {
		t.Fatalf("up ratio %v", s.UpRatio)
	}
}

type fakeSource struct {
	snap Snapshot
	hist map[HistoryKey][]Sample
}

func (f fakeSource) Snapshot() Snapshot { return f.snap }
func (f fakeSource) History(k HistoryKey) ([]Sample, bool) {
	s, ok := f.hist[k]
	return s, ok
}
func (f fakeSource) HistoryKeys() []HistoryKey {
	return []HistoryKey{{Peer: "b", Via: ViaLink}, {Peer: "c", Via: ViaLink}}
}
func (f fakeSource) Interfaces() []Interface {
	return []Interface{{Name: "weft", Samples: []IfaceSample{{T: t0, RxBps: 10, TxBps: 20}}}}
}

func testHandler(t *testing.T) (http.Handler, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	src := fakeSource{snap: threePeers(t), hist: map[HistoryKey][]Sample{
		{Peer: "b", Via: ViaLink}: {{T: t0, RTTms: 2, Up: true}, {T: t0.Add(5 * time.Second), RTTms: 4, Up: true}},
		{Peer: "c", Via: ViaLink}: nil,
	}}
	h, err := New(Config{Source: src, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	guarded := 0
	h.Register(mux, func(h http.Handler) http.Handler { guarded++; return h })
	if guarded != 7 {
		t.Fatalf("%d routes went through the guard, want all 7", guarded)
	}
	return mux, reg
}

func get(t *testing.T, h http.Handler, path string) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "http://127.0.0.1:6782"+path, nil))
	return w
}

func TestEndpoints(t *testing.T) {
	h, reg := testHandler(t)
	w := get(t, h, "/")
	if w.Code != 200 || !strings.Contains(w.Body.String(), `id="topo"`) || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") {
		t.Fatalf("/: %d %s", w.Code, w.Header())
	}
	for _, a := range []string{"/page/app.js", "/page/style.css"} {
		if w := get(t, h, a); w.Code != 200 || w.Body.Len() < 500 {
			t.Fatalf("%s: %d, %d bytes", a, w.Code, w.Body.Len())
		}
	}
	for _, p := range []string{"/page/missing.js", "/page/", "/page/../handler.go"} {
		if w := get(t, h, p); w.Code == 200 || strings.Contains(w.Body.String(), "package page") {
			t.Fatalf("%s: %d, want nothing served (404, or the mux's redirect to a cleaned path)", p, w.Code)
		}
	}

	var topo Topology
	decode(t, get(t, h, "/api/topology"), &topo)
	if topo.Self != "a" || len(topo.Peers) != 3 || len(topo.Links) != 3 || len(topo.Relays) != 1 || topo.SLA != "gold: rtt<=20ms,loss<=10%" {
		t.Fatalf("topology %+v", topo)
	}
	var sla SLAView
	decode(t, get(t, h, "/api/sla"), &sla)
	if len(sla.Rows) != 3 || sla.Rows[1].OK {
		t.Fatalf("sla %+v", sla)
	}
	var rows []HistoryRow
	decode(t, get(t, h, "/api/history"), &rows)
	if len(rows) != 2 || rows[0].Peer != "b" || rows[0].Summary.RTTP99ms != 4 {
		t.Fatalf("history rows %+v", rows)
	}
	var one HistoryView
	decode(t, get(t, h, "/api/history?peer=b&via=link"), &one)
	if one.Peer != "b" || len(one.Samples) != 2 || one.Summary.RTTP50ms != 2 {
		t.Fatalf("history of b %+v", one)
	}
	decode(t, get(t, h, "/api/history?peer=c"), &one) // via defaults to link; an empty ring is []
	if one.Samples == nil || len(one.Samples) != 0 {
		t.Fatalf("history of c %+v", one)
	}
	var ifs []Interface
	decode(t, get(t, h, "/api/interfaces"), &ifs)
	if len(ifs) != 1 || ifs[0].Samples[0].TxBps != 20 {
		t.Fatalf("interfaces %+v", ifs)
	}

	var segs SegmentsView
	decode(t, get(t, h, "/api/segments"), &segs)
	if segs.Self != "a" || len(segs.Paths) != 3 || segs.Paths[1].Slow != segments.Underlay {
		t.Fatalf("segments %+v", segs)
	}
	decode(t, get(t, h, "/api/segments?peer=b"), &segs)
	if len(segs.Paths) != 2 || segs.Paths[0].Peer != "b" {
		t.Fatalf("segments of b %+v", segs)
	}
	if w := get(t, h, "/api/segments?peer=nobody"); w.Code != 404 {
		t.Fatalf("segments of an unmeasured peer: %d", w.Code)
	}
	for _, tc := range []struct{ q, want string }{
		{"?peer=", "peer must be"},
		{"?peer=" + strings.Repeat("x", 65), "peer must be"},
		{"?network=default", `unknown parameter "network"`},
	} {
		w := get(t, h, "/api/segments"+tc.q)
		if w.Code != 400 || !strings.Contains(w.Body.String(), tc.want) {
			t.Fatalf("segments%s: %d %q, want 400 with %q", tc.q, w.Code, w.Body.String(), tc.want)
		}
	}

	// Bad queries: 400 naming the problem, counted; an unknown ring is 404, not counted.
	for _, tc := range []struct{ q, want string }{
		{"?peer=b&via=sideways", `via "sideways"`},
		{"?via=link", "peer must be"},
		{"?peer=" + strings.Repeat("x", 65), "peer must be"},
		{"?peer=b&limit=3", `unknown parameter "limit"`},
	} {
		w := get(t, h, "/api/history"+tc.q)
		if w.Code != 400 || !strings.Contains(w.Body.String(), tc.want) {
			t.Fatalf("%s: %d %q, want 400 with %q", tc.q, w.Code, w.Body.String(), tc.want)
		}
	}
	if w := get(t, h, "/api/history?peer=nobody"); w.Code != 404 {
		t.Fatalf("unknown peer: %d", w.Code)
	}
	want := "# HELP weft_page_bad_requests_total Requests to the status page's JSON endpoints refused as malformed (bad or unknown parameters), by endpoint.\n" +
		"# TYPE weft_page_bad_requests_total counter\nweft_page_bad_requests_total{endpoint=\"history\"} 4\n" +
		"weft_page_bad_requests_total{endpoint=\"segments\"} 3\n"
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "weft_page_bad_requests_total"); err != nil {
		t.Fatal(err)
	}
}

func decode(t *testing.T, w *httptest.ResponseRecorder, v any) {
	t.Helper()
	if w.Code != 200 || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("%d %s %s", w.Code, w.Header().Get("Content-Type"), w.Body.String())
	}
	if err := json.Unmarshal(w.Body.Bytes(), v); err != nil {
		t.Fatal(err)
	}
}

// A second handler on the same registry (the peer builds its HTTP handler once, tests more
// often) reuses the counter.
func TestNewTwiceOnOneRegistry(t *testing.T) {
	reg := prometheus.NewRegistry()
	for range 2 {
		if _, err := New(Config{Source: fakeSource{}, Registerer: reg}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := New(Config{Registerer: reg}); err == nil {
		t.Fatal("a handler without a source was built")
	}
}
