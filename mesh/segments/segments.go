// Package segments holds the pure part of weft's per-segment measurement (issue #16, as
// iCAN splits a path): container↔bridge, host↔host over the underlay, host↔host through
// the link in use, and container↔container end to end. It keeps bounded windows of
// samples and histories of figures, compares a segment's figure with its baseline (the
// median over the last minutes), says which segment grew, and computes the sender-TX vs
// receiver-RX loss cross-check. No I/O, no clocks: callers pass the time in.
package segments

import (
	"cmp"
	"maps"
	"slices"
	"time"
)

// Segment names, as they appear in the JSON of /v1/segments and /status.
const (
	Bridge       = "container-bridge"        // this host to its own containers
	RemoteBridge = "remote-container-bridge" // the other host to its containers (from gossip)
	Underlay     = "underlay"                // host to host over the underlay
	Link         = "link"                    // host to host through the link in use (tunnel)
	EndToEnd     = "end-to-end"              // container to container
)

// Figure is one segment's current measurement.
type Figure struct {
	// RTT is the median round trip of the answered samples.
	RTT time.Duration
	// Loss is the fraction of samples that got no answer, 0..1.
	Loss float64
	// Samples counts the samples the figure is made of (0: unknown).
	Samples int
}

// Known reports whether the figure rests on at least one sample.
func (f Figure) Known() bool { return f.Samples > 0 }

type sample struct {
	rtt  time.Duration
	lost bool
}

// Window is a bounded ring of the last samples of one segment. Not safe for concurrent
// use. Add is O(1), Figure O(size log size).
type Window struct {
	buf  []sample
	next int
	n    int
}

// NewWindow makes a window of the last size samples (at least 1).
func NewWindow(size int) *Window { return &Window{buf: make([]sample, max(size, 1))} }

// Add records one sample: an answered probe's RTT, or a lost one.
func (w *Window) Add(rtt time.Duration, lost bool) {
	w.buf[w.next] = sample{rtt: rtt, lost: lost}
	w.next = (w.next + 1) % len(w.buf)
	w.n = min(w.n+1, len(w.buf))
}

// Figure is the median RTT of the answered samples in the window and the lost fraction.
func (w *Window) Figure() Figure {
	if w.n == 0 {
		return Figure{}
	}
	rtts := make([]time.Duration, 0, w.n)
	lost := 0
	for _, s := range w.buf[:w.n] {
		if s.lost {
			lost++
			continue
		}
		rtts = append(rtts, s.rtt)
	}
	return Figure{RTT: Median(rtts), Loss: float64(lost) / float64(w.n), Samples: w.n}
}

// Median of ds (the lower middle one for an even count); 0 for none. ds is not changed.
// O(n log n).
func Median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[(len(s)-1)/2]
}

type point struct {
	at time.Time
	f  Figure
}

// History keeps a segment's figures over time (one per measuring tick), bounded to the
// last size points, for its baseline. Not safe for concurrent use.
type History struct {
	pts  []point
	size int
}

// NewHistory keeps the last size figures (at least 1).
func NewHistory(size int) *History { return &History{size: max(size, 1)} }

// Add records f as the figure at time at; figures without samples are not kept. O(1)
// amortised.
func (h *History) Add(at time.Time, f Figure) {
	if !f.Known() {
		return
	}
	if len(h.pts) == h.size {
		h.pts = append(h.pts[:0], h.pts[1:]...)
	}
	h.pts = append(h.pts, point{at: at, f: f})
}

// Len is the number of figures kept.
func (h *History) Len() int { return len(h.pts) }

// Baseline is the median RTT and median loss of the figures in [now−window, now−recent):
// what the segment used to read, leaving out the last moments that may be the change
// itself. ok is false with fewer than minPoints figures there. O(points log points).
func (h *History) Baseline(now time.Time, window, recent time.Duration, minPoints int) (Figure, bool) {
	var rtts []time.Duration
	var losses []float64
	for _, p := range h.pts {
		if p.at.Before(now.Add(-window)) || !p.at.Before(now.Add(-recent)) {
			continue
		}
		rtts = append(rtts, p.f.RTT)
		losses = append(losses, p.f.Loss)
	}
	if len(rtts) < max(minPoints, 1) {
		return Figure{}, false
	}
	slices.Sort(losses)
	return Figure{RTT: Median(rtts), Loss: losses[(len(losses)-1)/2], Samples: len(rtts)}, true
}

// Threshold says how much a segment must move to count as grown: its RTT by more than
// the larger of RTTAbs and RTTRel × baseline, or its loss by more than Loss.
type Threshold struct {
	RTTAbs time.Duration
	RTTRel float64
	Loss   float64
}

// DefaultThreshold: 2 ms or half the baseline, and 5 % loss. A container↔bridge hop reads
// tens of µs, so its relative part alone would flag scheduler noise; 2 ms does not.
func DefaultThreshold() Threshold {
	return Threshold{RTTAbs: 2 * time.Millisecond, RTTRel: 0.5, Loss: 0.05}
}

// Change is a segment's figure against its baseline.
type Change struct {
	// Grew: the segment moved beyond the threshold (RTT up or loss up).
	Grew bool
	// RTTDelta and LossDelta are current minus baseline (negative when it fell).
	RTTDelta  time.Duration
	LossDelta float64
}

// Compare says whether cur grew against base. Without both figures nothing grew.
func Compare(cur, base Figure, th Threshold) Change {
	if !cur.Known() || !base.Known() {
		return Change{}
	}
	c := Change{RTTDelta: cur.RTT - base.RTT, LossDelta: cur.Loss - base.Loss}
	limit := max(th.RTTAbs, time.Duration(th.RTTRel*float64(base.RTT)))
	c.Grew = c.RTTDelta > limit || c.LossDelta > th.Loss
	return c
}

// Sum is the end-to-end estimate of segments passed in series: RTTs add, and a packet
// survives only if it survives each segment. Unknown segments make it unknown. Its Samples
// is the smallest of the parts'.
func Sum(parts ...Figure) Figure {
	if len(parts) == 0 {
		return Figure{}
	}
	out := Figure{Samples: parts[0].Samples}
	survive := 1.0
	for _, p := range parts {
		if !p.Known() {
			return Figure{}
		}
		out.RTT += p.RTT
		survive *= 1 - min(max(p.Loss, 0), 1)
		out.Samples = min(out.Samples, p.Samples)
	}
	out.Loss = 1 - survive
	return out
}

// Path is one container↔container path split into its segments' changes.
type Path struct {
	LocalBridge, Underlay, Link, RemoteBridge Change
}

// Blame names the segment that grew the most on p, or "" when none grew. The link in use
// rides on the underlay, so a link that grew together with the underlay is the underlay's
// doing: the link is blamed only for what it grew beyond the underlay (a tunnel, a relay,
// encryption), by more than the threshold's absolute part. Pure.
func Blame(p Path, th Threshold) string {
	type cand struct {
		name string
		c    Change
		by   time.Duration
	}
	tunnel := p.Link
	if p.Underlay.Grew {
		extra := p.Link.RTTDelta - p.Underlay.RTTDelta
		tunnel = Change{Grew: extra > th.RTTAbs || p.Link.LossDelta-p.Underlay.LossDelta > th.Loss, RTTDelta: extra,
			LossDelta: p.Link.LossDelta - p.Underlay.LossDelta}
	}
	cs := []cand{
		{Bridge, p.LocalBridge, 0}, {Underlay, p.Underlay, 0}, {Link, tunnel, 0}, {RemoteBridge, p.RemoteBridge, 0},
	}
	var best *cand
	for i := range cs {
		c := &cs[i]
		if !c.c.Grew {
			continue
		}
		// Loss weighs as RTT at 1 % = 1 ms, so that a lossy segment is named over a
		// slightly slower one.
		c.by = c.c.RTTDelta + time.Duration(c.c.LossDelta*100*float64(time.Millisecond))
		if best == nil || c.by > best.by {
			best = c
		}
	}
	if best == nil {
		return ""
	}
	return best.name
}

// LossCrossCheck is the loss between two weft-owned ends: the packets one side's tunnel
// device counted as sent to the other (sentDelta) against those the other counted as
// received from it (recvDelta), both over the same interval. ok is false when fewer than
// minPackets were sent (too few to say) or a counter went backwards (a device recreated).
// The ratio is clamped to 0..1: counters read at slightly different moments can show more
// received than sent.
func LossCrossCheck(sentDelta, recvDelta int64, minPackets int64) (ratio float64, ok bool) {
	if sentDelta < max(minPackets, 1) || recvDelta < 0 {
		return 0, false
	}
	return min(max(1-float64(recvDelta)/float64(sentDelta), 0), 1), true
}

// Counters are one interface's counters as the kernel keeps them.
type Counters struct {
	RxPackets uint64 `json:"rx_packets"`
	TxPackets uint64 `json:"tx_packets"`
	RxBytes   uint64 `json:"rx_bytes"`
	TxBytes   uint64 `json:"tx_bytes"`
	RxErrors  uint64 `json:"rx_errors"`
	TxErrors  uint64 `json:"tx_errors"`
	RxDropped uint64 `json:"rx_dropped"`
	TxDropped uint64 `json:"tx_dropped"`
	// Overruns: the receive ring or FIFO overflowed (rx_over_errors + rx_fifo_errors).
	Overruns uint64 `json:"overruns"`
}

// Add sums two interfaces' counters.
func (c Counters) Add(o Counters) Counters {
	return Counters{
		RxPackets: c.RxPackets + o.RxPackets, TxPackets: c.TxPackets + o.TxPackets,
		RxBytes: c.RxBytes + o.RxBytes, TxBytes: c.TxBytes + o.TxBytes,
		RxErrors: c.RxErrors + o.RxErrors, TxErrors: c.TxErrors + o.TxErrors,
		RxDropped: c.RxDropped + o.RxDropped, TxDropped: c.TxDropped + o.TxDropped,
		Overruns: c.Overruns + o.Overruns,
	}
}

// Interface kinds weft owns.
const (
	KindBridge    = "bridge"
	KindVeth      = "veth"
	KindVXLAN     = "vxlan"
	KindWireGuard = "wireguard"
	KindUnderlay  = "underlay"
)

// Iface is one interface weft owns, or (Kind veth) the sum of a network's container veths.
type Iface struct {
	Name string `json:"iface"`
	Kind string `json:"kind"`
	// Network: the network a bridge or a veth sum belongs to.
	Network string `json:"network,omitempty"`
	// Members counts the veths summed into a veth row.
	Members  int      `json:"members,omitempty"`
	Counters Counters `json:"counters"`
}

// VethSumName is the iface label of a network's summed container veths.
func VethSumName(network string) string { return "veths:" + network }

// Aggregate folds the per-container veths (Kind veth, with their network) into one row per
// network, so that a metric's label count grows with the networks, not the containers;
// other interfaces are kept as they are. At most maxRows rows are returned (bridges,
// tunnels and the underlay first, then the veth sums by network name); dropped counts the
// rows left out. O(n log n).
func Aggregate(in []Iface, maxRows int) (out []Iface, dropped int) {
	sums := map[string]*Iface{}
	for _, f := range in {
		if f.Kind != KindVeth {
			out = append(out, f)
			continue
		}
		s, ok := sums[f.Network]
		if !ok {
			s = &Iface{Name: VethSumName(f.Network), Kind: KindVeth, Network: f.Network}
			sums[f.Network] = s
		}
		s.Members++
		s.Counters = s.Counters.Add(f.Counters)
	}
	slices.SortFunc(out, func(a, b Iface) int { return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Name, b.Name)) })
	for _, n := range slices.Sorted(maps.Keys(sums)) {
		out = append(out, *sums[n])
	}
	if maxRows > 0 && len(out) > maxRows {
		dropped = len(out) - maxRows
		out = out[:maxRows]
	}
	return out, dropped
}

// Reports: the JSON of a path split into segments, as /v1/segments, /status and the status
// page show it.

// Report is one segment of a path: its current figure and its baseline.
type Report struct {
	// Segment: container-bridge, remote-container-bridge, underlay, link or end-to-end.
	Segment string `json:"segment"`
	// RTTms is the median RTT in ms (for underlay and link, the probers' smoothed RTT);
	// Loss the fraction lost, 0..1; Samples how many samples the figure rests on (0: none).
	RTTms   float64 `json:"rtt_ms"`
	Loss    float64 `json:"loss"`
	Samples int     `json:"samples"`
	// BaselineRTTms and BaselineLoss are the median over the last minutes (leaving out the
	// most recent seconds); HasBaseline is false until there are enough.
	BaselineRTTms float64 `json:"baseline_rtt_ms"`
	BaselineLoss  float64 `json:"baseline_loss"`
	HasBaseline   bool    `json:"has_baseline"`
	// Grew: the figure rose beyond 2 ms or half its baseline, or its loss by 5 points.
	Grew bool `json:"grew"`
	// Estimated: an end-to-end figure summed from the other segments, not measured.
	Estimated bool `json:"estimated,omitempty"`
}

// PathReport is the path from this peer's containers to one peer's containers on one
// network, split into its segments.
type PathReport struct {
	Peer    string `json:"peer"`
	Network string `json:"network"`
	// Segments: container-bridge, underlay, link, remote-container-bridge, end-to-end (the
	// sum of the first, link and the remote bridge); absent figures read Samples 0.
	Segments []Report `json:"segments"`
	// Slow names the segment that grew the most ("" when none did): where to look when the
	// path is slow. A link that grew with the underlay is the underlay's doing.
	Slow string `json:"slow"`
	// LossCrossCheck is the loss between the two hosts' tunnel devices, sender TX against
	// receiver RX over the last minutes; absent when either side has no per-peer counters.
	LossCrossCheck *float64 `json:"loss_crosscheck,omitempty"`
}
