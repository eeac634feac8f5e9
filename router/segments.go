package router

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/weftnet/weft/datapath/vxlan"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/identity"
	"github.com/weftnet/weft/mesh/segments"
)

// Per-segment measurement (#16), as iCAN splits a path: container↔bridge (this host pings
// a few of its own containers each tick from the host netns, ICMP echo on a raw socket: no
// agent in the container), host↔host over the underlay and through the link in use (the
// probers' figures), and container↔container end to end — estimated as local bridge + link
// + remote bridge, the remote part learnt from the other peer's gossip, and measured on
// demand from inside a local container (POST /v1/segments/measure). Each segment's figure
// is compared with its baseline (the median of its figures over the last minutes), so that
// a slow path says which segment grew. The pure part is package mesh/segments.
//
// Costs per peer: a tick (segmentTick) pings at most segmentPingsPerTick containers and
// records O(k + M) figures for k probed peers and M networks; histories hold
// segmentHistory points each, O((k + M)·k) in all at most. Gossip: one record per peer of at
// most maxSegmentNetworks networks and maxSegmentTunnels tunnel counters (fits one
// broadcast), sent when it changed and at least every max(2 min, N × 2.4 s)
// (segmentRepublishEvery): at most 0.42 records a second mesh-wide when nothing changes,
// whatever N; push/pull carries all, O(N), and repairs a lost one. (With 30 s and 0.6 s
// an idle N=50 mesh relayed 1.6 unchanged records a second, 40 % of every peer's
// gossip messages, each verified by every peer: SCALING.md round 9.)

// ErrBadSegmentRequest: a /v1/segments request names no known peer, container or address.
var ErrBadSegmentRequest = errors.New("bad segments request")

const (
	segmentsChannel   = "segments"
	segmentSignDomain = "weft segments v1"

	segmentTick         = 2 * time.Second
	segmentPingsPerTick = 4                       // containers pinged per tick, all networks together
	segmentPingTimeout  = 500 * time.Millisecond  // a container↔bridge echo later than this is lost
	segmentWindow       = 20                      // samples per network's container↔bridge window
	segmentHistory      = 150                     // figures kept per segment: 5 min at one per tick
	segmentBaseline     = 5 * time.Minute         // the baseline is the median over this long…
	segmentRecent       = 20 * time.Second        // …leaving out the last moments (the change itself)
	segmentMinBaseline  = 5                       // figures needed for a baseline
	segmentRepublish    = 2 * time.Minute         // a record unchanged is re-sent this often…
	segmentSpacing      = 2400 * time.Millisecond // …or every N × this in a mesh of N (segmentRepublishEvery)
	segmentMinPublish   = 10 * time.Second        // a changed record is sent at most this often
	segmentRecordTTLs   = 4                       // a peer's record not refreshed for this many republish periods is dropped
	maxSegmentNetworks  = 8                       // networks a record carries (bounded broadcast)
	maxSegmentTunnels   = 8                       // tunnel counters a record carries
	maxSegmentRecords   = 4096                    // records held (peers)
	maxSegmentState     = 4 << 20                 // bytes of one push/pull state
	maxIfaceRows        = 64                      // interface rows in metrics and /status
	maxMeasureCount     = 20                      // echoes of one on-demand measurement
	crossCheckReadings  = 8                       // our TX readings kept per peer (16 s)
	crossCheckMin       = 1000                    // units (bytes) sent before a cross-check ratio is given
)

// SegmentFigure is one segment's figure as /v1/segments and /status show it
// (segments.Report; the page shows the same type).
type SegmentFigure = segments.Report

// BridgeSegment is this host's container↔bridge segment of one network.
type BridgeSegment struct {
	Network string `json:"network"`
	SegmentFigure
}

// SegmentPath is the path from this peer's containers to one peer's containers on one
// network, split into its segments (segments.PathReport; the page shows the same type).
type SegmentPath = segments.PathReport

// SegmentsStatus answers GET /v1/segments and is the segments section of /status.
type SegmentsStatus struct {
	Self string    `json:"self"`
	At   time.Time `json:"at"`
	// Bridges: this host's container↔bridge segment per network with containers.
	Bridges []BridgeSegment `json:"bridges"`
	// Paths: per probed peer and network.
	Paths []SegmentPath `json:"paths"`
	// Interfaces: the counters of every interface weft owns; container veths summed per
	// network (iface "veths:NETWORK", Members veths); at most 64 rows, InterfacesDropped
	// counts the rest.
	Interfaces        []segments.Iface `json:"interfaces"`
	InterfacesDropped int              `json:"interfaces_dropped,omitempty"`
}

// MeasureRequest asks POST /v1/segments/measure for an end-to-end measurement: Count (1–20,
// default 5) ICMP echoes from inside a local container (ContainerID, or any of Network's
// when empty; Network "default" when both are empty) to Address.
type MeasureRequest struct {
	ContainerID string     `json:"container_id,omitempty"`
	Network     string     `json:"network,omitempty"`
	Address     netip.Addr `json:"address"`
	Count       int        `json:"count,omitempty"`
}

// MeasureResult is one on-demand end-to-end measurement.
type MeasureResult struct {
	From    string    `json:"from"` // the container's address
	To      string    `json:"to"`
	Sent    int       `json:"sent"`
	Lost    int       `json:"lost"`
	RTTms   float64   `json:"rtt_ms"` // median of the answered
	MinMs   float64   `json:"min_ms"`
	MaxMs   float64   `json:"max_ms"`
	Samples []float64 `json:"samples_ms"`
}

// segmentRecord is what a peer gossips of its segments: its container↔bridge figure per
// network and its tunnel counters per peer. Signed by the peer.
type segmentRecord struct {
	Peer    string        `json:"p"`
	Version uint64        `json:"v"`
	Bridges []bridgeFig   `json:"b,omitempty"`
	Tunnels []tunnelCount `json:"t,omitempty"`
	Sig     []byte        `json:"s,omitempty"`
}

type bridgeFig struct {
	Network string  `json:"n"`
	RTTus   int64   `json:"r"`
	Loss    float64 `json:"l"`
	Samples int     `json:"c"`
}

// tunnelCount: what this peer's tunnel sent to Peer and received from it, in the tunnel's
// unit (bytes for WireGuard, which counts bytes per peer).
type tunnelCount struct {
	Peer string `json:"p"`
	TX   uint64 `json:"tx"`
	RX   uint64 `json:"rx"`
}

// seal is what signing and verifying need of r (signedrecord.go).
func (r segmentRecord) seal() recordSeal {
	sig := r.Sig
	r.Sig = nil
	return recordSeal{peer: r.Peer, sig: sig, body: r}
}

// check says what is wrong with a record from gossip. Pure.
func (r segmentRecord) check() error {
	switch {
	case r.Peer == "" || len(r.Peer) > maxLabelNameLen:
		return fmt.Errorf("record names peer %q", r.Peer)
	case r.Version == 0:
		return fmt.Errorf("record of %s has version 0", r.Peer)
	case len(r.Bridges) > maxSegmentNetworks:
		return fmt.Errorf("record of %s carries %d networks, at most %d", r.Peer, len(r.Bridges), maxSegmentNetworks)
	case len(r.Tunnels) > maxSegmentTunnels:
		return fmt.Errorf("record of %s carries %d tunnel counters, at most %d", r.Peer, len(r.Tunnels), maxSegmentTunnels)
	}
	for _, b := range r.Bridges {
		if b.Network == "" || len(b.Network) > maxLabelNameLen || b.RTTus < 0 || b.RTTus > int64(time.Minute/time.Microsecond) ||
			!(b.Loss >= 0 && b.Loss <= 1) || b.Samples < 0 || b.Samples > 1<<20 {
			return fmt.Errorf("record of %s: bad figure for network %q", r.Peer, b.Network)
		}
	}
	for _, t := range r.Tunnels {
		if t.Peer == "" || len(t.Peer) > maxLabelNameLen {
			return fmt.Errorf("record of %s: tunnel counter names peer %q", r.Peer, t.Peer)
		}
	}
	return nil
}

// tunnelCounter reports, per remote peer, what this host's tunnel sent to it and
// received from it. Called from the segments goroutine once a tick; must be safe for
// concurrent use and cheap. nil: no per-peer counters (no cross-check).
type tunnelCounter func() map[string]tunnelCount

// segmentsConfig is what the segments part needs of the peer. Every function is safe for
// concurrent use and must not block long.
type segmentsConfig struct {
	Self        string
	Attachments func() []ipam.Attachment
	Networks    func() []ipam.NetworkStatus
	// Underlay and Link: the probers' figures per peer (nil: not running).
	Underlay, Link func() map[string]mesh.LinkStats
	// Owned names the interfaces weft owns besides bridges and veths: tunnel devices and the
	// underlay NIC (kind by name), read at each scrape.
	Owned   func() map[string]string
	Tunnels tunnelCounter
	Signer  identity.Signer                             // nil: unsigned (tests)
	Keys    func(peer string) (ed25519.PublicKey, bool) // nil: unchecked (tests)
	// Broadcast sends a record on the segments channel; nil sends nothing.
	Broadcast func(msg []byte) error
	// CrossCheckWindow is the loss cross-check's sliding interval; a ratio is given once the
	// readings span half of it. 0: DefaultLossCrossCheckWindow.
	CrossCheckWindow time.Duration
	Logger           *slog.Logger
	// Pinger pings a local container from the host; nil: a raw ICMP socket.
	Pinger func(ctx context.Context, dst netip.Addr) (time.Duration, error)
	Now    func() time.Time
}

// segmentsPart measures segments and holds the other peers' records. A mesh.ChannelHandler
// (its methods are safe for memberlist's goroutines and never block).
type segmentsPart struct {
	cfg     segmentsConfig
	th      segments.Threshold
	signing recordSigning // signs ours, verifies the others'

	refused    *prometheus.CounterVec
	crossCheck *prometheus.GaugeVec
	bridgeRTT  *prometheus.GaugeVec

	mu       sync.Mutex                   // guards the fields below
	windows  map[string]*segments.Window  // network → container↔bridge samples
	hist     map[string]*segments.History // segment key → figures
	current  map[string]segments.Figure   // segment key → last figure
	records  map[string]segmentRecord     // peer → its last record
	received map[string]time.Time         // peer → when its record last changed here
	next     int                          // round robin over attachments
	version  uint64
	sent     segmentRecord // last published, without Version and Sig
	sentAt   time.Time
	cross    map[string][]crossReading // peer → the cross-check's readings, oldest first
	ratio    map[string]float64
	txHist   map[string][]txPoint // peer → our last TX readings
}

type crossReading struct {
	at     time.Time
	tx, rx uint64 // our TX to the peer, its RX from us, when its record came
}

func newSegments(cfg segmentsConfig, reg prometheus.Registerer) (*segmentsPart, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.CrossCheckWindow <= 0 {
		cfg.CrossCheckWindow = DefaultLossCrossCheckWindow
	}
	s := &segmentsPart{
		cfg: cfg, th: segments.DefaultThreshold(),
		signing: recordSigning{domain: segmentSignDomain, signer: cfg.Signer, keys: cfg.Keys},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_segments_refused_total",
			Help: "Gossiped segment records refused (nothing changed), by reason."}, []string{"reason"}),
		crossCheck: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_loss_crosscheck_ratio",
			Help: "Loss to a peer as its tunnel's RX counter against this peer's TX counter, over the last minutes (peers with per-peer tunnel counters only)."}, []string{"peer"}),
		bridgeRTT: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_segment_bridge_rtt_seconds",
			Help: "Median RTT from this host to a sample of its containers, per network (the container↔bridge segment)."}, []string{"network"}),
		windows: map[string]*segments.Window{}, hist: map[string]*segments.History{}, current: map[string]segments.Figure{},
		records: map[string]segmentRecord{}, received: map[string]time.Time{}, cross: map[string][]crossReading{}, ratio: map[string]float64{}, txHist: map[string][]txPoint{},
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{s.refused, s.crossCheck, s.bridgeRTT, ifaceCollector{s}} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register segment metrics: %w", err)
			}
		}
	}
	return s, nil
}

// run ticks until ctx is done.
func (s *segmentsPart) run(ctx context.Context) {
	t := time.NewTicker(segmentTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.tick(ctx)
		}
	}
}

// tick pings a few containers, records every segment's figure and publishes this peer's
// record when due.
func (s *segmentsPart) tick(ctx context.Context) {
	s.sampleBridges(ctx)
	now := s.cfg.Now()
	var under, link map[string]mesh.LinkStats
	if s.cfg.Underlay != nil {
		under = s.cfg.Underlay()
	}
	if s.cfg.Link != nil {
		link = s.cfg.Link()
	}
	var tunnels map[string]tunnelCount
	if s.cfg.Tunnels != nil {
		tunnels = s.cfg.Tunnels()
	}
	s.mu.Lock()
	s.recordLocked(now, under, link)
	s.crossCheckLocked(now, tunnels)
	rec, due := s.recordDueLocked(now, tunnels)
	s.mu.Unlock()
	if due {
		s.publish(rec)
	}
}

// sampleBridges pings up to segmentPingsPerTick containers of bridge networks (round robin).
func (s *segmentsPart) sampleBridges(ctx context.Context) {
	sriov := map[string]bool{} // their containers hold VFs: no bridge to measure
	for _, n := range s.cfg.Networks() {
		sriov[n.Name] = n.Mode == ipam.ModeSRIOV
	}
	var as []ipam.Attachment
	for _, a := range s.cfg.Attachments() {
		if a.Address.Is4() && a.HostIfName != "" && !sriov[a.Network] {
			as = append(as, a)
		}
	}
	if len(as) == 0 {
		return
	}
	s.mu.Lock()
	start := s.next
	s.next += min(segmentPingsPerTick, len(as))
	s.mu.Unlock()
	for i := range min(segmentPingsPerTick, len(as)) {
		a := as[(start+i)%len(as)]
		rtt, err := s.ping(ctx, a.Address)
		s.mu.Lock()
		w := s.windows[a.Network]
		if w == nil {
			w = segments.NewWindow(segmentWindow)
			s.windows[a.Network] = w
		}
		w.Add(rtt, err != nil)
		s.mu.Unlock()
	}
}

func (s *segmentsPart) ping(ctx context.Context, dst netip.Addr) (time.Duration, error) {
	if s.cfg.Pinger != nil {
		return s.cfg.Pinger(ctx, dst)
	}
	conn, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	return echo(ctx, conn, dst, uint16(rand.Uint32()), 1, segmentPingTimeout)
}

func bridgeKey(network string) string         { return "bridge/" + network }
func remoteKey(peer, network string) string   { return "remote/" + peer + "/" + network }
func endToEndKey(peer, network string) string { return "e2e/" + peer + "/" + network }
func probeKeyOf(via, peer string) string      { return via + "/" + peer }

// recordLocked stores the current figure of every segment and adds it to its history.
// O(M + k·M) for M networks and k probed peers. Caller holds mu.
func (s *segmentsPart) recordLocked(now time.Time, under, link map[string]mesh.LinkStats) {
	cur := map[string]segments.Figure{}
	for n, w := range s.windows {
		f := w.Figure()
		cur[bridgeKey(n)] = f
		s.bridgeRTT.WithLabelValues(n).Set(f.RTT.Seconds())
	}
	asFigure := func(st mesh.LinkStats) segments.Figure {
		if st.Samples == 0 {
			return segments.Figure{}
		}
		return segments.Figure{RTT: st.RTT, Loss: st.Loss, Samples: st.Samples}
	}
	for peer, st := range under {
		cur[probeKeyOf(segments.Underlay, peer)] = asFigure(st)
	}
	if link == nil {
		link = under
	}
	for peer, st := range link {
		lf := asFigure(st)
		cur[probeKeyOf(segments.Link, peer)] = lf
		rec, ok := s.records[peer]
		if !ok {
			continue
		}
		for _, b := range rec.Bridges {
			rf := segments.Figure{RTT: time.Duration(b.RTTus) * time.Microsecond, Loss: b.Loss, Samples: b.Samples}
			cur[remoteKey(peer, b.Network)] = rf
			if w := s.windows[b.Network]; w != nil {
				cur[endToEndKey(peer, b.Network)] = segments.Sum(w.Figure(), lf, rf)
			}
		}
	}
	for k, f := range cur {
		h := s.hist[k]
		if h == nil {
			h = segments.NewHistory(segmentHistory)
			s.hist[k] = h
		}
		h.Add(now, f)
	}
	// Segments no longer measured (a peer no longer probed, a network gone) go with their
	// history: what is kept stays O(k·M).
	for k := range s.hist {
		if _, ok := cur[k]; !ok {
			delete(s.hist, k)
		}
	}
	s.current = cur
}

// figureLocked is the segment's figure against its baseline. Caller holds mu.
func (s *segmentsPart) figureLocked(now time.Time, name, key string) (SegmentFigure, segments.Change) {
	f := s.current[key]
	out := SegmentFigure{Segment: name, RTTms: ms(f.RTT), Loss: f.Loss, Samples: f.Samples}
	h := s.hist[key]
	if h == nil {
		return out, segments.Change{}
	}
	base, ok := h.Baseline(now, segmentBaseline, segmentRecent, segmentMinBaseline)
	if !ok {
		return out, segments.Change{}
	}
	c := segments.Compare(f, base, s.th)
	out.BaselineRTTms, out.BaselineLoss, out.HasBaseline, out.Grew = ms(base.RTT), base.Loss, true, c.Grew
	return out, c
}

// status is the segments section. O(k·M + interfaces).
func (s *segmentsPart) status(peer string) SegmentsStatus {
	st := s.figures(peer)
	st.Interfaces, st.InterfacesDropped = s.interfaces()
	if st.Interfaces == nil {
		st.Interfaces = []segments.Iface{}
	}
	return st
}

// figures is the segments section without the interface counters (no netlink dump: the
// status page asks for it at every poll). O(k·M).
func (s *segmentsPart) figures(peer string) SegmentsStatus {
	now := s.cfg.Now()
	st := SegmentsStatus{Self: s.cfg.Self, At: now, Bridges: []BridgeSegment{}, Paths: []SegmentPath{}}
	s.mu.Lock()
	nets := slices.Sorted(maps.Keys(s.windows))
	for _, n := range nets {
		f, _ := s.figureLocked(now, segments.Bridge, bridgeKey(n))
		st.Bridges = append(st.Bridges, BridgeSegment{Network: n, SegmentFigure: f})
	}
	peers := map[string]bool{}
	for k := range s.current {
		if via, p, ok := strings.Cut(k, "/"); ok && (via == segments.Link || via == segments.Underlay) {
			peers[p] = true
		}
	}
	for _, p := range slices.Sorted(maps.Keys(peers)) {
		if peer != "" && p != peer {
			continue
		}
		pathNets := []string{}
		if rec, ok := s.records[p]; ok {
			for _, b := range rec.Bridges {
				if s.windows[b.Network] != nil {
					pathNets = append(pathNets, b.Network)
				}
			}
		}
		if len(pathNets) == 0 {
			pathNets = append(pathNets, "") // host to host only: no containers on one side
		}
		for _, n := range pathNets {
			sp := SegmentPath{Peer: p, Network: n}
			var path segments.Path
			var f SegmentFigure
			f, path.LocalBridge = s.figureLocked(now, segments.Bridge, bridgeKey(n))
			sp.Segments = append(sp.Segments, f)
			f, path.Underlay = s.figureLocked(now, segments.Underlay, probeKeyOf(segments.Underlay, p))
			sp.Segments = append(sp.Segments, f)
			f, path.Link = s.figureLocked(now, segments.Link, probeKeyOf(segments.Link, p))
			sp.Segments = append(sp.Segments, f)
			f, path.RemoteBridge = s.figureLocked(now, segments.RemoteBridge, remoteKey(p, n))
			sp.Segments = append(sp.Segments, f)
			f, _ = s.figureLocked(now, segments.EndToEnd, endToEndKey(p, n))
			f.Estimated = true
			sp.Segments = append(sp.Segments, f)
			sp.Slow = segments.Blame(path, s.th)
			if r, ok := s.ratio[p]; ok {
				sp.LossCrossCheck = &r
			}
			st.Paths = append(st.Paths, sp)
		}
	}
	s.mu.Unlock()
	return st
}

// recordDueLocked builds this peer's record and says whether to send it: when it changed
// (at most every segmentMinPublish) or every segmentRepublishEvery. Caller holds mu.
func (s *segmentsPart) recordDueLocked(now time.Time, tunnels map[string]tunnelCount) (segmentRecord, bool) {
	rec := segmentRecord{Peer: s.cfg.Self}
	for _, n := range slices.Sorted(maps.Keys(s.windows)) {
		if len(rec.Bridges) == maxSegmentNetworks {
			break
		}
		f := s.windows[n].Figure()
		// Quantised to 10 µs and 5 % loss, so noise does not count as a change.
		rec.Bridges = append(rec.Bridges, bridgeFig{Network: n, RTTus: f.RTT.Microseconds() / 10 * 10,
			Loss: float64(int(f.Loss*20)) / 20, Samples: f.Samples})
	}
	for _, p := range slices.Sorted(maps.Keys(tunnels)) {
		if len(rec.Tunnels) == maxSegmentTunnels {
			break
		}
		c := tunnels[p]
		c.Peer = p
		rec.Tunnels = append(rec.Tunnels, c)
	}
	changed := !slices.Equal(rec.Bridges, s.sent.Bridges) || !slices.Equal(rec.Tunnels, s.sent.Tunnels)
	since := now.Sub(s.sentAt)
	if !(changed && since >= segmentMinPublish || since >= segmentRepublishEvery(len(s.records))) {
		return segmentRecord{}, false
	}
	s.sent, s.sentAt = rec, now
	s.version = max(s.version+1, uint64(now.UnixNano()))
	rec.Version = s.version
	return rec, true
}

func (s *segmentsPart) publish(rec segmentRecord) {
	rec.Sig = s.signing.sign(rec.seal())
	if s.cfg.Broadcast == nil {
		return
	}
	b, _ := json.Marshal(rec)
	if err := s.cfg.Broadcast(b); err != nil {
		s.cfg.Logger.Debug("segment record not broadcast; push/pull will carry it", "err", err)
	}
	s.mu.Lock()
	s.records[s.cfg.Self] = rec // our own, for LocalState
	s.received[s.cfg.Self] = s.cfg.Now()
	s.mu.Unlock()
}

// crossCheckLocked updates the loss cross-check of every peer whose record carries its
// tunnel's RX from us while ours carries our TX to it. Its counters were read when it
// published, about when its record reached us, so they are set against our TX reading
// nearest to that moment (readings kept for the last few ticks): a skew of about a tick,
// small against an interval of at least half of CrossCheckWindow. Caller holds mu. O(k).
func (s *segmentsPart) crossCheckLocked(now time.Time, tunnels map[string]tunnelCount) {
	for peer, mine := range tunnels {
		h := append(s.txHist[peer], txPoint{at: now, tx: mine.TX})
		if len(h) > crossCheckReadings {
			h = h[len(h)-crossCheckReadings:]
		}
		s.txHist[peer] = h
		rec, ok := s.records[peer]
		if !ok {
			continue
		}
		i := slices.IndexFunc(rec.Tunnels, func(t tunnelCount) bool { return t.Peer == s.cfg.Self })
		if i < 0 {
			continue
		}
		theirs, at := rec.Tunnels[i], s.received[peer]
		tx := txNear(h, at)
		w := s.cross[peer]
		if n := len(w); n > 0 && (tx < w[n-1].tx || theirs.RX < w[n-1].rx) {
			w = nil // a device recreated: its counters started again
		}
		if n := len(w); n == 0 || at.After(w[n-1].at) {
			w = append(w, crossReading{at: at, tx: tx, rx: theirs.RX})
		}
		// A sliding window: the oldest reading kept is at most CrossCheckWindow old, so a
		// loss that starts shows in full within that time. O(window / publish interval).
		for len(w) > 1 && at.Sub(w[1].at) >= s.cfg.CrossCheckWindow {
			w = w[1:]
		}
		s.cross[peer] = w
		first := w[0]
		if at.Sub(first.at) < s.cfg.CrossCheckWindow/2 {
			continue
		}
		if r, ok := segments.LossCrossCheck(int64(tx-first.tx), int64(theirs.RX-first.rx), crossCheckMin); ok {
			s.ratio[peer] = r
			s.crossCheck.WithLabelValues(peer).Set(r)
		}
	}
	for peer := range s.txHist {
		if _, ok := tunnels[peer]; !ok {
			delete(s.txHist, peer)
			delete(s.ratio, peer)
			delete(s.cross, peer)
			s.crossCheck.DeleteLabelValues(peer)
		}
	}
}

type txPoint struct {
	at time.Time
	tx uint64
}

// txNear is the reading of h nearest to at. h is not empty.
func txNear(h []txPoint, at time.Time) uint64 {
	best := h[0]
	for _, p := range h[1:] {
		if p.at.Sub(at).Abs() < best.at.Sub(at).Abs() {
			best = p
		}
	}
	return best.tx
}

// NotifyMsg takes one peer's record from gossip.
func (s *segmentsPart) NotifyMsg(msg []byte) {
	r, reason, err := decodeGossip[segmentRecord]("broadcast", msg, mesh.MaxBroadcastSize)
	if err != nil {
		s.refuse(reason, err)
		return
	}
	s.merge([]segmentRecord{r})
}

// LocalState is every record held (ours included). O(N).
func (s *segmentsPart) LocalState(bool) []byte {
	s.mu.Lock()
	s.sweepLocked()
	recs := make([]segmentRecord, 0, len(s.records))
	for _, r := range s.records {
		recs = append(recs, r)
	}
	s.mu.Unlock()
	b, _ := json.Marshal(recs)
	return b
}

// MergeRemoteState merges another peer's LocalState.
func (s *segmentsPart) MergeRemoteState(buf []byte, _ bool) {
	recs, reason, err := decodeGossip[[]segmentRecord]("state", buf, maxSegmentState)
	if err != nil {
		s.refuse(reason, err)
		return
	}
	s.merge(recs)
}

func (s *segmentsPart) merge(recs []segmentRecord) {
	for _, r := range recs {
		if r.Peer == s.cfg.Self {
			continue // ours is ours
		}
		if err := r.check(); err != nil {
			s.refuse("invalid", err)
			continue
		}
		s.mu.Lock()
		cur, ok := s.records[r.Peer]
		s.mu.Unlock()
		if !supersedes(r.Version, cur.Version, ok) {
			continue // what we hold, or older: no signature check (push/pull lists every record)
		}
		if err := s.signing.verify(r.seal()); err != nil {
			s.refuse("signature", err)
			continue
		}
		s.mu.Lock()
		cur, ok = s.records[r.Peer]
		switch {
		case !supersedes(r.Version, cur.Version, ok):
		case !ok && len(s.records) >= maxSegmentRecords:
			s.mu.Unlock()
			s.refuse("full", fmt.Errorf("record of %s: %d records held", r.Peer, maxSegmentRecords))
			continue
		default:
			s.records[r.Peer] = r
			s.received[r.Peer] = s.cfg.Now()
		}
		s.mu.Unlock()
	}
}

// segmentRepublishEvery is how often an unchanged record is re-sent in a mesh of n peers
// (the records held): the mesh-wide rate of such records stays at most 1/segmentSpacing.
// Pure.
func segmentRepublishEvery(n int) time.Duration {
	return max(segmentRepublish, time.Duration(n)*segmentSpacing)
}

// sweepLocked drops the records of peers not heard of for segmentRecordTTLs republish
// periods (gone or partitioned: their figures would be stale). Caller holds mu. O(N).
func (s *segmentsPart) sweepLocked() {
	now := s.cfg.Now()
	ttl := segmentRecordTTLs * segmentRepublishEvery(len(s.records))
	for p, at := range s.received {
		if p != s.cfg.Self && now.Sub(at) > ttl {
			delete(s.records, p)
			delete(s.received, p)
		}
	}
}

func (s *segmentsPart) refuse(reason string, err error) {
	s.refused.WithLabelValues(reason).Inc()
	s.cfg.Logger.Debug("segment record refused", "reason", reason, "err", err)
}

// interfaces reads the counters of every interface weft owns: bridges of the networks,
// container veths (summed per network), and what Owned names. One netlink dump, O(links).
func (s *segmentsPart) interfaces() ([]segments.Iface, int) {
	links, err := netlink.LinkList()
	if err != nil {
		s.cfg.Logger.Debug("list links for counters", "err", err)
		return nil, 0
	}
	kinds := map[string]segments.Iface{}
	for _, n := range s.cfg.Networks() {
		if n.Mode != ipam.ModeSRIOV {
			kinds[bridgeName(n.Name)] = segments.Iface{Kind: segments.KindBridge, Network: n.Name}
		}
	}
	for _, a := range s.cfg.Attachments() {
		if _, bridged := kinds[bridgeName(a.Network)]; a.HostIfName != "" && bridged {
			kinds[a.HostIfName] = segments.Iface{Kind: segments.KindVeth, Network: a.Network}
		}
	}
	if s.cfg.Owned != nil {
		for name, kind := range s.cfg.Owned() {
			kinds[name] = segments.Iface{Kind: kind}
		}
	}
	var out []segments.Iface
	for _, l := range links {
		a := l.Attrs()
		f, ok := kinds[a.Name]
		if !ok && l.Type() == "vxlan" && (a.Name == vxlan.DefaultName || strings.HasPrefix(a.Name, "weftvx")) {
			f, ok = segments.Iface{Kind: segments.KindVXLAN}, true
		}
		if !ok || a.Statistics == nil {
			continue
		}
		f.Name = a.Name
		st := a.Statistics
		f.Counters = segments.Counters{RxPackets: st.RxPackets, TxPackets: st.TxPackets, RxBytes: st.RxBytes, TxBytes: st.TxBytes,
			RxErrors: st.RxErrors, TxErrors: st.TxErrors, RxDropped: st.RxDropped, TxDropped: st.TxDropped,
			Overruns: st.RxOverErrors + st.RxFifoErrors}
		out = append(out, f)
	}
	return segments.Aggregate(out, maxIfaceRows)
}

// ifaceCollector exports the interface counters at scrape time: labels {iface, kind}, with
// container veths summed per network (iface "veths:NETWORK"), so that the series grow with
// networks and tunnel devices, not with containers; at most maxIfaceRows interfaces.
type ifaceCollector struct{ s *segmentsPart }

var ifaceDescs = func() map[string]*prometheus.Desc {
	m := map[string]*prometheus.Desc{}
	for _, n := range []string{"rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped", "rx_overruns"} {
		m[n] = prometheus.NewDesc("weft_iface_"+n+"_total", "Interface counter "+n+" of an interface weft owns (container veths summed per network).", []string{"iface", "kind"}, nil)
	}
	return m
}()

func (c ifaceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range ifaceDescs {
		ch <- d
	}
}

func (c ifaceCollector) Collect(ch chan<- prometheus.Metric) {
	rows, _ := c.s.interfaces()
	for _, r := range rows {
		k := r.Counters
		for name, v := range map[string]uint64{"rx_packets": k.RxPackets, "tx_packets": k.TxPackets, "rx_bytes": k.RxBytes, "tx_bytes": k.TxBytes,
			"rx_errors": k.RxErrors, "tx_errors": k.TxErrors, "rx_dropped": k.RxDropped, "tx_dropped": k.TxDropped, "rx_overruns": k.Overruns} {
			ch <- prometheus.MustNewConstMetric(ifaceDescs[name], prometheus.CounterValue, float64(v), r.Name, r.Kind)
		}
	}
}

// measure pings req.Address Count times from inside a local container's netns. The socket
// is opened inside the namespace on a locked thread (ns.WithNetNSPath) and used from here:
// a socket stays in the namespace it was made in.
func (s *segmentsPart) measure(ctx context.Context, req MeasureRequest) (MeasureResult, error) {
	if !req.Address.Is4() {
		return MeasureResult{}, fmt.Errorf("%w: address %q: an IPv4 address is needed", ErrBadSegmentRequest, req.Address)
	}
	if req.Count == 0 {
		req.Count = 5
	}
	if req.Count < 1 || req.Count > maxMeasureCount {
		return MeasureResult{}, fmt.Errorf("%w: count %d out of 1..%d", ErrBadSegmentRequest, req.Count, maxMeasureCount)
	}
	network := cmp.Or(req.Network, DefaultNetwork)
	var from *ipam.Attachment
	for _, a := range s.cfg.Attachments() {
		if a.NetNS == "" || !a.Address.Is4() {
			continue
		}
		// A container named: any of its interfaces, or the one on the network named;
		// none named: any container of the network (default when none is named either).
		if (req.ContainerID == "" || a.ContainerID == req.ContainerID) && (req.ContainerID != "" && req.Network == "" || a.Network == network) {
			from = &a
			break
		}
	}
	if from == nil {
		return MeasureResult{}, fmt.Errorf("%w: no local container %q on network %q to measure from", ErrBadSegmentRequest, req.ContainerID, network)
	}
	var conn net.PacketConn
	if err := ns.WithNetNSPath(from.NetNS, func(ns.NetNS) error {
		var err error
		conn, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}); err != nil {
		return MeasureResult{}, fmt.Errorf("open an ICMP socket in %s: %w", from.NetNS, err)
	}
	defer conn.Close()
	res := MeasureResult{From: from.Address.String(), To: req.Address.String(), Samples: []float64{}}
	id := uint16(rand.Uint32())
	var rtts []time.Duration
	for i := range req.Count {
		res.Sent++
		rtt, err := echo(ctx, conn, req.Address, id, uint16(i+1), time.Second)
		if err != nil {
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			res.Lost++
			continue
		}
		rtts = append(rtts, rtt)
		res.Samples = append(res.Samples, ms(rtt))
	}
	if len(rtts) > 0 {
		res.RTTms = ms(segments.Median(rtts))
		res.MinMs, res.MaxMs = ms(slices.Min(rtts)), ms(slices.Max(rtts))
	}
	return res, nil
}

// echo sends one ICMP echo request on conn (an "ip4:icmp" socket) and waits up to timeout
// for its reply, matched by id and seq (a raw socket sees every ICMP packet of the host).
func echo(ctx context.Context, conn net.PacketConn, dst netip.Addr, id, seq uint16, timeout time.Duration) (time.Duration, error) {
	msg := make([]byte, 16)
	msg[0] = 8 // echo request
	binary.BigEndian.PutUint16(msg[4:], id)
	binary.BigEndian.PutUint16(msg[6:], seq)
	binary.BigEndian.PutUint64(msg[8:], rand.Uint64())
	binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := conn.SetReadDeadline(deadline); err != nil {
		return 0, err
	}
	start := time.Now()
	if _, err := conn.WriteTo(msg, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return 0, err
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return 0, err
		}
		ip, _ := from.(*net.IPAddr)
		if n < 16 || buf[0] != 0 || ip == nil || !ip.IP.Equal(dst.AsSlice()) ||
			binary.BigEndian.Uint16(buf[4:]) != id || binary.BigEndian.Uint16(buf[6:]) != seq || string(buf[8:16]) != string(msg[8:16]) {
			continue
		}
		return time.Since(start), nil
	}
}

func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// segmentsEndpoint answers GET /v1/segments?peer=NAME (every probed peer without it).
func (p *Peer) segmentsEndpoint(r *http.Request) (any, error) {
	if p.segs == nil {
		return nil, newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "segments are not measured yet")
	}
	peer := r.URL.Query().Get("peer")
	st := p.segs.status(peer)
	if peer != "" && len(st.Paths) == 0 {
		return nil, newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig, "%v: peer %q is not measured by this peer (not probed, or unknown)", ErrBadSegmentRequest, peer)
	}
	return st, nil
}

// segmentsMeasure answers POST /v1/segments/measure.
func (p *Peer) segmentsMeasure(r *http.Request) (any, error) {
	var req MeasureRequest
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	if p.segs == nil {
		return nil, newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "segments are not measured yet")
	}
	res, err := p.segs.measure(r.Context(), req)
	if errors.Is(err, ErrBadSegmentRequest) {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "%v", err)
	}
	return res, err
}

// segmentsStatus is /status's segments section; nil before the peer measures.
func (p *Peer) segmentsStatus() *SegmentsStatus {
	if p.segs == nil {
		return nil
	}
	st := p.segs.status("")
	return &st
}

// newPeerSegments builds the segments part of p (before the mesh starts: its channel is
// registered there); runSegments starts its ticks.
func (p *Peer) newPeerSegments(advertise netip.Addr) error {
	var err error
	p.segs, err = newSegments(segmentsConfig{
		Self: p.cfg.Name, Attachments: p.alloc.Attachments, Networks: p.alloc.Networks,
		Underlay: func() map[string]mesh.LinkStats {
			if p.paths == nil || p.paths.underlay == nil {
				return nil
			}
			return p.paths.underlay.All()
		},
		Link: func() map[string]mesh.LinkStats {
			if p.paths == nil || p.paths.link == nil {
				return nil
			}
			return p.paths.link.All()
		},
		Owned:   p.ownedDevices(advertise),
		Tunnels: p.wireGuardCounters(),
		Signer:  p.identity, Keys: p.originKey,
		Broadcast: func(msg []byte) error {
			if p.mesh == nil {
				return nil
			}
			return p.mesh.Broadcast(segmentsChannel, msg)
		},
		CrossCheckWindow: p.cfg.LossCrossCheckWindow,
		Logger:           p.log.With("component", "segments"),
	}, p.reg)
	return err
}

// wireGuardCounters reads the bytes WireGuard sent to and received from each peer (the
// kernel and wireguard-go keep them per peer; VXLAN and direct routing keep no per-peer
// counts, so their pairs get no cross-check). A client of its own, opened and closed each
// call: the driver's is not safe to share with this goroutine. nil without WireGuard.
// O(WireGuard peers + N).
func (p *Peer) wireGuardCounters() tunnelCounter {
	if p.links == nil || p.links.wg == nil {
		return nil
	}
	name := p.links.wg.Name()
	return func() map[string]tunnelCount {
		if p.mesh == nil {
			return nil
		}
		c, err := wgctrl.New()
		if err != nil {
			return nil
		}
		defer c.Close()
		dev, err := c.Device(name)
		if err != nil {
			return nil
		}
		return wireGuardCounts(dev.Peers, p.mesh.Peers())
	}
}

// wireGuardCounts names WireGuard's per-peer byte counters by the mesh peer whose gossiped
// key they belong to; keys no peer announces are left out. Pure.
func wireGuardCounts(wps []wgtypes.Peer, peers []mesh.Peer) map[string]tunnelCount {
	byKey := map[[32]byte]string{}
	for _, pr := range peers {
		if pr.Meta.WireGuardKey != ([32]byte{}) && !pr.Self {
			byKey[pr.Meta.WireGuardKey] = pr.Name
		}
	}
	out := map[string]tunnelCount{}
	for _, wp := range wps {
		if name, ok := byKey[wp.PublicKey]; ok && wp.TransmitBytes >= 0 && wp.ReceiveBytes >= 0 {
			out[name] = tunnelCount{TX: uint64(wp.TransmitBytes), RX: uint64(wp.ReceiveBytes)}
		}
	}
	return out
}

// underlayNICRefresh is how long the underlay NIC's name is kept before it is looked up
// again: the lookup dumps every address of the host, and ran at each history sample (5 s)
// and scrape of an idle peer (4 % of its CPU at N=50).
const underlayNICRefresh = time.Minute

// ownedDevices returns the function that names the tunnel devices and the underlay NIC by
// kind. O(addresses) for the NIC once a underlayNICRefresh, O(1) otherwise.
func (p *Peer) ownedDevices(advertise netip.Addr) func() map[string]string {
	var mu sync.Mutex
	var nic string
	var at time.Time
	return func() map[string]string {
		out := map[string]string{}
		if p.links != nil && p.links.wg != nil {
			out[p.links.wg.Name()] = segments.KindWireGuard
		}
		mu.Lock()
		if now := time.Now(); nic == "" || now.Sub(at) >= underlayNICRefresh {
			nic, at = underlayNIC(advertise), now
		}
		if nic != "" {
			out[nic] = segments.KindUnderlay
		}
		mu.Unlock()
		return out
	}
}

// underlayNIC is the interface holding addr ("" when none does).
func underlayNIC(addr netip.Addr) string {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			if l, err := netlink.LinkByIndex(a.LinkIndex); err == nil {
				return l.Attrs().Name
			}
		}
	}
	return ""
}
