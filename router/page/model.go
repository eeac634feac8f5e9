// Package page is the peer's status page: the embedded assets (HTML, CSS and a few hundred
// lines of plain JavaScript drawing SVG; no build step, no CDN, no vendored library) and the
// JSON the page polls. The views are built here by pure functions from a Snapshot that the
// router fills from its own state, so everything the page shows is testable without a peer.
package page

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"sort"
	"time"

	"github.com/weftnet/weft/mesh/pathsel"
	"github.com/weftnet/weft/mesh/segments"
)

// Link modes as the page colours them. ModeRelay marks a pair whose traffic goes through a
// third peer.
const (
	ModeDirect    = "direct"
	ModeVXLAN     = "vxlan"
	ModeWireGuard = "wireguard"
	ModeRelay     = "relay"
)

// Link states.
const (
	StateUp      = "up"
	StateDown    = "down"
	StateRelayed = "relayed" // this peer's direct link, bypassed: traffic goes through a relay
)

// Peer is one member of the mesh as the page shows it.
type Peer struct {
	Name    string    `json:"name"`
	State   string    `json:"state"` // alive, suspect, dead, left
	Address string    `json:"address"`
	Self    bool      `json:"self"`
	Since   time.Time `json:"since"`
}

// Link is one measured direction of a link, as this peer knows it: measured by itself
// (From is Self) or gossiped by From.
type Link struct {
	From, To string
	Mode     string // the link's mode; "" when unknown
	// ModeInferred: Mode is what this peer's rule would pick for the pair from the two
	// peers' gossiped metadata, not a mode a peer reported using.
	ModeInferred bool
	Up           bool
	RTT, Jitter  time.Duration
	Loss         float64
	// Estimated: nobody measures the link; RTT is this peer's estimate from network
	// coordinates (a peer outside its probe set), the rest zero.
	Estimated bool
}

// Route is this peer's chosen path to one destination for one SLA class.
type Route struct {
	Peer        string
	Path        []string // first hop first; the destination last
	SLA         string   // the class as pathsel.SLA.String writes it
	SLAOK       bool
	Since       time.Time
	Reason      string
	RTT, Jitter time.Duration
	Loss        float64
	Estimated   bool
	Networks    []string
}

// Snapshot is everything the topology and SLA views are built from.
type Snapshot struct {
	Self   string
	Now    time.Time
	SLA    pathsel.SLA // this peer's own class: remote pairs are judged against it
	Peers  []Peer
	Links  []Link
	Routes []Route
	// Segments: this peer's paths to the peers it measures, split into segments.
	Segments []SegmentPath
}

// Topology is GET /api/topology.
type Topology struct {
	Self      string      `json:"self"`
	Generated time.Time   `json:"generated"`
	SLA       string      `json:"sla"`
	Peers     []Peer      `json:"peers"`
	Links     []TopoLink  `json:"links"`
	Relays    []TopoRelay `json:"relays"`
}

// TopoLink is one pair of peers: both directions merged, each figure the worse of the two
// (as path choice takes it).
type TopoLink struct {
	ID           string  `json:"id"` // "a--b", a < b
	A            string  `json:"a"`
	B            string  `json:"b"`
	Mode         string  `json:"mode"`
	ModeInferred bool    `json:"mode_inferred"`
	State        string  `json:"state"` // up, down, relayed
	RTTms        float64 `json:"rtt_ms"`
	JitterMs     float64 `json:"jitter_ms"`
	Loss         float64 `json:"loss"`
	SLAOK        bool    `json:"sla_ok"`
	Why          string  `json:"why"` // what breaks the SLA, or why the link is not used
	// Measured: this peer measures the link itself (one end is Self); else gossiped.
	Measured bool `json:"measured"`
	// Estimated: not measured by either end; RTT estimated from coordinates.
	Estimated bool `json:"estimated"`
	// Slow: on this peer's own links, the segment of its path to the other end that grew
	// the most (mesh/segments names; "" when none did).
	Slow string `json:"slow"`
}

// TopoRelay is a path of this peer that goes through a relay.
type TopoRelay struct {
	ID    string   `json:"id"` // "self>dest"
	From  string   `json:"from"`
	To    string   `json:"to"`
	Via   string   `json:"via"`
	Path  []string `json:"path"` // from, relay, to
	SLA   string   `json:"sla"`
	SLAOK bool     `json:"sla_ok"`
}

// LinkID names the pair a–b the same way whichever end is first.
func LinkID(a, b string) string {
	if b < a {
		a, b = b, a
	}
	return a + "--" + b
}

func ms(d time.Duration) float64 { return math.Round(float64(d.Microseconds())) / 1000 }

// BuildTopology merges the snapshot's directed links into pairs and marks the relayed
// paths. O(L + R·P) for L directed links, R routes of at most P hops.
func BuildTopology(s Snapshot) Topology {
	t := Topology{Self: s.Self, Generated: s.Now, SLA: s.SLA.String(), Peers: slices.Clone(s.Peers),
		Links: []TopoLink{}, Relays: []TopoRelay{}}
	if t.Peers == nil {
		t.Peers = []Peer{}
	}
	slices.SortFunc(t.Peers, func(a, b Peer) int { return cmp.Compare(a.Name, b.Name) })
	pairs := map[string]*TopoLink{}
	for _, l := range s.Links {
		if l.From == l.To || l.From == "" || l.To == "" {
			continue
		}
		id := LinkID(l.From, l.To)
		mine := l.From == s.Self || l.To == s.Self
		p, ok := pairs[id]
		if ok && l.Estimated && !p.Estimated {
			continue // a measurement, from either end, beats an estimate
		}
		if !ok || p.Estimated && !l.Estimated {
			a, b := min(l.From, l.To), max(l.From, l.To)
			mode, inferred := l.Mode, l.ModeInferred
			if ok && mode == "" {
				mode, inferred = p.Mode, p.ModeInferred
			}
			p = &TopoLink{ID: id, A: a, B: b, Mode: mode, ModeInferred: inferred, State: StateUp,
				RTTms: ms(l.RTT), JitterMs: ms(l.Jitter), Loss: l.Loss, Measured: mine && !l.Estimated, Estimated: l.Estimated}
			if !l.Up {
				p.State = StateDown
			}
			pairs[id] = p
			continue
		}
		// A measured mode beats an inferred one; this peer's own measurement beats gossip.
		if p.Mode == "" || p.ModeInferred && !l.ModeInferred {
			p.Mode, p.ModeInferred = l.Mode, l.ModeInferred
		}
		p.RTTms, p.JitterMs, p.Loss = max(p.RTTms, ms(l.RTT)), max(p.JitterMs, ms(l.Jitter)), max(p.Loss, l.Loss)
		if !l.Up {
			p.State = StateDown
		}
	}
	for _, p := range pairs {
		if p.State == StateDown {
			p.Why = "down: probes unanswered"
			continue
		}
		p.Why = s.SLA.Check(time.Duration(p.RTTms*1e6), time.Duration(p.JitterMs*1e6), p.Loss)
		p.SLAOK = p.Why == ""
	}
	for peer, seg := range slowSegments(s.Segments) {
		if p := pairs[LinkID(s.Self, peer)]; p != nil {
			p.Slow = seg
		}
	}
	for _, r := range s.Routes {
		if len(r.Path) < 2 {
			continue
		}
		path := append([]string{s.Self}, r.Path...)
		t.Relays = append(t.Relays, TopoRelay{ID: s.Self + ">" + r.Peer, From: s.Self, To: r.Peer, Via: r.Path[0],
			Path: path, SLA: r.SLA, SLAOK: r.SLAOK})
		if p := pairs[LinkID(s.Self, r.Peer)]; p != nil && p.State == StateUp {
			p.State = StateRelayed
			if p.Why == "" {
				p.Why = "relayed through " + r.Path[0]
				if r.Reason != "" {
					p.Why += ": " + r.Reason
				}
			}
		}
	}
	for _, p := range pairs {
		t.Links = append(t.Links, *p)
	}
	sort.Slice(t.Links, func(i, j int) bool { return t.Links[i].ID < t.Links[j].ID })
	sort.SliceStable(t.Relays, func(i, j int) bool { return t.Relays[i].ID < t.Relays[j].ID })
	return t
}

// SLARow is one pair of GET /api/sla.
type SLARow struct {
	From string `json:"from"`
	To   string `json:"to"`
	SLA  string `json:"sla"`
	OK   bool   `json:"ok"`
	// Since is when the pair last changed between holding and not: for this peer's own
	// paths, as its path selector recorded it; for gossiped pairs, as this page's handler
	// saw it (it judges them when the page or the API asks, so the first verdict's since
	// is the first request after the peer started).
	Since time.Time `json:"since"`
	// Why names the figure that breaks the class ("rtt 31ms > 20ms"), or what the path
	// selector says about a pair that holds.
	Why string `json:"why"`
	// Path is this peer's path to To (its own pairs only); Source says where the verdict
	// comes from: "path" (this peer's path choice) or "link" (a gossiped link judged
	// against this peer's class).
	Path     []string `json:"path"`
	Source   string   `json:"source"`
	RTTms    float64  `json:"rtt_ms"`
	JitterMs float64  `json:"jitter_ms"`
	Loss     float64  `json:"loss"`
	Networks []string `json:"networks"`
}

// BuildSLA lists every pair: this peer's own paths (one row per destination and class,
// as its path selector holds them), then every other pair's link judged against this
// peer's class. since carries, per row key, when a remote pair's verdict last changed
// (the selector keeps its own pairs' since); it is updated in place. O(R + L).
func BuildSLA(s Snapshot, topo Topology, since map[string]SinceMark) []SLARow {
	rows := []SLARow{}
	for _, r := range s.Routes {
		why := r.Reason
		if !r.SLAOK {
			if cl, err := pathsel.ParseSLA(r.SLA); err == nil {
				if f := cl.Check(r.RTT, r.Jitter, r.Loss); f != "" {
					why = f + "; " + r.Reason
				}
			}
		}
		path := append([]string{s.Self}, r.Path...)
		rows = append(rows, SLARow{From: s.Self, To: r.Peer, SLA: r.SLA, OK: r.SLAOK, Since: r.Since, Why: why,
			Path: path, Source: "path", RTTms: ms(r.RTT), JitterMs: ms(r.Jitter), Loss: r.Loss, Networks: nonNil(r.Networks)})
	}
	seen := make(map[string]bool, len(topo.Links))
	for _, l := range topo.Links {
		if l.A == s.Self || l.B == s.Self {
			continue
		}
		ok := l.State != StateDown && l.SLAOK
		key := l.ID
		seen[key] = true
		m, had := since[key]
		if !had || m.OK != ok {
			m = SinceMark{OK: ok, Since: s.Now}
			since[key] = m
		}
		rows = append(rows, SLARow{From: l.A, To: l.B, SLA: topo.SLA, OK: ok, Since: m.Since, Why: l.Why,
			Path: []string{l.A, l.B}, Source: "link", RTTms: l.RTTms, JitterMs: l.JitterMs, Loss: l.Loss, Networks: []string{}})
	}
	for k := range since {
		if !seen[k] {
			delete(since, k) // bounded by the pairs the table holds now
		}
	}
	return rows
}

// SinceMark is when a remote pair's verdict last changed.
type SinceMark struct {
	OK    bool
	Since time.Time
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Sample is one reading of a link, taken every few seconds by the peer.
type Sample struct {
	T        time.Time `json:"t"`
	RTTms    float64   `json:"rtt_ms"`
	JitterMs float64   `json:"jitter_ms"`
	Loss     float64   `json:"loss"`
	Up       bool      `json:"up"`
}

// Summary condenses a link's samples.
type Summary struct {
	Samples   int     `json:"samples"`
	UpRatio   float64 `json:"up_ratio"`
	RTTP50ms  float64 `json:"rtt_p50_ms"`
	RTTP99ms  float64 `json:"rtt_p99_ms"`
	JitterMs  float64 `json:"jitter_ms"` // mean
	LossMean  float64 `json:"loss_mean"`
	LossMax   float64 `json:"loss_max"`
	LatestRTT float64 `json:"latest_rtt_ms"`
}

// Summarize computes the percentiles over the samples taken while the link was up (a
// down link has no RTT) and loss over all of them. Nearest-rank percentiles. O(n log n).
func Summarize(samples []Sample) Summary {
	s := Summary{Samples: len(samples)}
	if len(samples) == 0 {
		return s
	}
	var rtts []float64
	var jit float64
	for _, x := range samples {
		s.LossMean += x.Loss
		s.LossMax = max(s.LossMax, x.Loss)
		if x.Up {
			rtts = append(rtts, x.RTTms)
			jit += x.JitterMs
		}
	}
	s.LossMean /= float64(len(samples))
	s.UpRatio = float64(len(rtts)) / float64(len(samples))
	if len(rtts) > 0 {
		s.LatestRTT = rtts[len(rtts)-1]
		s.JitterMs = jit / float64(len(rtts))
		slices.Sort(rtts)
		s.RTTP50ms = rank(rtts, 0.50)
		s.RTTP99ms = rank(rtts, 0.99)
	}
	return s
}

// rank is the nearest-rank percentile q of sorted xs.
func rank(xs []float64, q float64) float64 {
	i := int(math.Ceil(q*float64(len(xs)))) - 1
	return xs[min(max(i, 0), len(xs)-1)]
}

// IfaceSample is one reading of an interface's throughput.
type IfaceSample struct {
	T      time.Time `json:"t"`
	RxBps  float64   `json:"rx_bps"` // bytes per second since the previous reading
	TxBps  float64   `json:"tx_bps"`
	RxDrop uint64    `json:"rx_dropped"`
	TxDrop uint64    `json:"tx_dropped"`
}

// Interface is one interface weft owns (or the underlay NIC), or a network's container
// veths summed (Kind veth, Name "veths:NETWORK"), with its counters (the ones
// weft_iface_* exports) and its recent throughput.
type Interface struct {
	Name    string `json:"name"`
	Kind    string `json:"kind"`              // bridge, veth, vxlan, wireguard, underlay
	Network string `json:"network,omitempty"` // a bridge's or a veth sum's network
	Members int    `json:"members,omitempty"` // veths summed into a veth row
	RxBytes uint64 `json:"rx_bytes"`
	TxBytes uint64 `json:"tx_bytes"`
	// Counters: packets, bytes, errors, drops and overruns as last read.
	Counters segments.Counters `json:"counters"`
	Samples  []IfaceSample     `json:"samples"`
}

// HistoryKey names one ring: a peer measured over the underlay, through the link in use,
// or end to end along the path this peer chose (through a relay or not).
type HistoryKey struct {
	Peer string `json:"peer"`
	Via  string `json:"via"`
}

// Via values.
const (
	ViaLink     = "link"
	ViaUnderlay = "underlay"
	ViaPath     = "path"
)

// ValidVia says whether via names a ring kind.
func ValidVia(via string) error {
	if via != ViaLink && via != ViaUnderlay && via != ViaPath {
		return fmt.Errorf("%w: via %q (want %s, %s or %s)", ErrBadRequest, via, ViaLink, ViaUnderlay, ViaPath)
	}
	return nil
}

// Segment names, as mesh/segments names them, in the order a path crosses them.
var segmentOrder = []string{segments.Bridge, segments.Underlay, segments.Link, segments.RemoteBridge, segments.EndToEnd}

// SegmentFigure is one segment of a path (segments.Report, what /v1/segments shows).
type SegmentFigure = segments.Report

// SegmentPath is this peer's containers to one peer's containers on one network, split into
// its segments (segments.PathReport).
type SegmentPath = segments.PathReport

// SegmentsView is GET /api/segments.
type SegmentsView struct {
	Self      string    `json:"self"`
	Generated time.Time `json:"generated"`
	// Order is the segments' order along a path, for the table's columns.
	Order []string      `json:"order"`
	Paths []SegmentPath `json:"paths"`
}

// BuildSegments lists the snapshot's segment paths by peer then network, each path's
// segments in the order a packet crosses them (a segment the source did not report reads
// Samples 0), only peer's when peer is not "". O(P log P) for P paths.
func BuildSegments(s Snapshot, peer string) SegmentsView {
	v := SegmentsView{Self: s.Self, Generated: s.Now, Order: slices.Clone(segmentOrder), Paths: []SegmentPath{}}
	for _, p := range s.Segments {
		if peer != "" && p.Peer != peer {
			continue
		}
		byName := map[string]SegmentFigure{}
		for _, f := range p.Segments {
			byName[f.Segment] = f
		}
		q := p
		q.Segments = make([]SegmentFigure, 0, len(segmentOrder))
		for _, name := range segmentOrder {
			f, ok := byName[name]
			if !ok {
				f = SegmentFigure{Segment: name}
			}
			q.Segments = append(q.Segments, f)
		}
		v.Paths = append(v.Paths, q)
	}
	slices.SortFunc(v.Paths, func(a, b SegmentPath) int {
		return cmp.Or(cmp.Compare(a.Peer, b.Peer), cmp.Compare(a.Network, b.Network))
	})
	return v
}

// slowSegments names, per peer, the slow segment of this peer's paths to it: the first
// network's (by name) that has one. O(P).
func slowSegments(paths []SegmentPath) map[string]string {
	out := map[string]string{}
	sorted := slices.Clone(paths)
	slices.SortFunc(sorted, func(a, b SegmentPath) int { return cmp.Compare(a.Network, b.Network) })
	for _, p := range sorted {
		if p.Slow != "" && out[p.Peer] == "" {
			out[p.Peer] = p.Slow
		}
	}
	return out
}
