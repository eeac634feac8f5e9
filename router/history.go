package router

import (
	"context"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/segments"
	"github.com/weftnet/weft/router/page"
)

// History for the status page: every historyEvery the peer samples each probed link (per
// peer, over the underlay and through the link in use), the end-to-end figures of its
// chosen path to each measured peer (through a relay or not), and the byte counters of the
// interfaces weft owns (as weft_iface_* reads them), into fixed rings of historyLen samples (15 minutes). Memory is
// bounded: a link sample is 56 B, so a ring is 10 kB; only measured peers get rings
// (--probe-targets, 16 by default, plus relays: ~50 rings, 0.5 MB), and never more than
// historyMaxRings (10 MB) nor historyMaxIfaces interface rings (56 B a sample, 5 MB).
// A ring whose peer is no longer measured is dropped after a full window without samples.
// Sampling costs O(measured peers + interfaces) every 5 s.

const (
	historyEvery     = 5 * time.Second
	historyWindow    = 15 * time.Minute
	historyLen       = int(historyWindow / historyEvery)
	historyMaxRings  = 1024
	historyMaxIfaces = 512
)

// ring is a fixed-capacity ring of samples, oldest overwritten first. Not safe for
// concurrent use (history holds its lock).
type ring[T any] struct {
	buf  []T
	next int // where the next sample goes
	full bool
}

func newRing[T any](n int) *ring[T] { return &ring[T]{buf: make([]T, n)} }

// add appends x, overwriting the oldest sample when the ring is full. O(1).
func (r *ring[T]) add(x T) {
	r.buf[r.next] = x
	r.next++
	if r.next == len(r.buf) {
		r.next, r.full = 0, true
	}
}

// len is how many samples the ring holds.
func (r *ring[T]) len() int {
	if r.full {
		return len(r.buf)
	}
	return r.next
}

// items returns a copy of the samples, oldest first. O(n).
func (r *ring[T]) items() []T {
	out := make([]T, 0, r.len())
	if r.full {
		out = append(out, r.buf[r.next:]...)
	}
	return append(out, r.buf[:r.next]...)
}

// last returns the newest sample.
func (r *ring[T]) last() (T, bool) {
	var zero T
	if r.len() == 0 {
		return zero, false
	}
	i := r.next - 1
	if i < 0 {
		i = len(r.buf) - 1
	}
	return r.buf[i], true
}

// ifaceHistory is one interface's ring and its previous reading (rates are differences).
type ifaceHistory struct {
	ring     *ring[page.IfaceSample]
	prev     segments.Iface
	prevT    time.Time
	lastSeen time.Time
}

// history holds the rings. Written by the sampler goroutine, read by the page's handlers.
type history struct {
	mu     sync.Mutex // guards the fields below
	links  map[page.HistoryKey]*ring[page.Sample]
	ifaces map[string]*ifaceHistory
}

func newHistory() *history {
	return &history{links: map[page.HistoryKey]*ring[page.Sample]{}, ifaces: map[string]*ifaceHistory{}}
}

// recordLinks adds one sample per measured link of via. Rings of links no longer measured
// for a whole window are dropped; new rings beyond historyMaxRings are not made. O(links).
func (h *history) recordLinks(via string, stats map[string]mesh.LinkStats, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for name, st := range stats {
		k := page.HistoryKey{Peer: name, Via: via}
		r := h.links[k]
		if r == nil {
			if len(h.links) >= historyMaxRings {
				continue
			}
			r = newRing[page.Sample](historyLen)
			h.links[k] = r
		}
		r.add(page.Sample{T: now, RTTms: ms(st.RTT), JitterMs: ms(st.Jitter), Loss: st.Loss, Up: st.Up})
	}
	for k, r := range h.links {
		if k.Via != via {
			continue
		}
		if _, ok := stats[k.Peer]; !ok {
			if last, ok := r.last(); !ok || now.Sub(last.T) > historyWindow {
				delete(h.links, k)
			}
		}
	}
}

// recordIfaces adds one throughput sample per interface from a reading of their counters
// (segmentsPart.interfaces: the rows weft_iface_* exports, veths summed per network). A
// counter that went backwards (the interface was recreated, a container left its network's
// veth sum) restarts its rate. O(ifaces).
func (h *history) recordIfaces(read []segments.Iface, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	seen := make(map[string]bool, len(read))
	for _, f := range read {
		seen[f.Name] = true
		ih := h.ifaces[f.Name]
		if ih == nil {
			if len(h.ifaces) >= historyMaxIfaces {
				continue
			}
			h.ifaces[f.Name] = &ifaceHistory{ring: newRing[page.IfaceSample](historyLen), prev: f, prevT: now, lastSeen: now}
			continue
		}
		ih.lastSeen = now
		if dt := now.Sub(ih.prevT).Seconds(); dt > 0 {
			c, p := f.Counters, ih.prev.Counters
			ih.ring.add(page.IfaceSample{T: now, RxBps: rate(p.RxBytes, c.RxBytes, dt), TxBps: rate(p.TxBytes, c.TxBytes, dt),
				RxDrop: c.RxDropped, TxDrop: c.TxDropped})
		}
		ih.prev, ih.prevT = f, now
	}
	for name, ih := range h.ifaces {
		if !seen[name] && now.Sub(ih.lastSeen) > historyWindow {
			delete(h.ifaces, name)
		}
	}
}

// rate is bytes per second between two counter readings; 0 when the counter restarted.
func rate(prev, cur uint64, dt float64) float64 {
	if cur < prev {
		return 0
	}
	return float64(cur-prev) / dt
}

// linkSamples returns one ring's samples, oldest first.
func (h *history) linkSamples(k page.HistoryKey) ([]page.Sample, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r, ok := h.links[k]
	if !ok {
		return nil, false
	}
	return r.items(), true
}

// keys lists the link rings, sorted by peer then via.
func (h *history) keys() []page.HistoryKey {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.SortedFunc(maps.Keys(h.links), func(a, b page.HistoryKey) int {
		if c := strings.Compare(a.Peer, b.Peer); c != 0 {
			return c
		}
		return strings.Compare(a.Via, b.Via)
	})
}

// interfaces lists every interface ring, sorted by name.
func (h *history) interfaces() []page.Interface {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]page.Interface, 0, len(h.ifaces))
	for _, name := range slices.Sorted(maps.Keys(h.ifaces)) {
		ih := h.ifaces[name]
		f := ih.prev
		out = append(out, page.Interface{Name: name, Kind: f.Kind, Network: f.Network, Members: f.Members,
			RxBytes: f.Counters.RxBytes, TxBytes: f.Counters.TxBytes, Counters: f.Counters, Samples: ih.ring.items()})
	}
	return out
}

// pathStats is the end-to-end figures of the path this peer's class chose to each
// measured destination (relayed or not), as link stats. Estimated and unmeasured
// destinations have no figures worth a history. O(N).
func pathStats(pt *paths) map[string]mesh.LinkStats {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	out := make(map[string]mesh.LinkStats, len(pt.def.choices))
	for dest, c := range pt.def.choices {
		if c.Estimated || c.Unmeasured {
			continue
		}
		out[dest] = mesh.LinkStats{RTT: c.RTT, Jitter: c.Jitter, Loss: c.Loss, Up: len(c.Path) > 0}
	}
	return out
}

// startHistory samples links and interfaces every historyEvery until ctx ends; the
// returned stop waits for the sampler. A peer without probers (built in part by a test)
// samples interfaces only.
func (p *Peer) startHistory(ctx context.Context) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(historyEvery)
		defer t.Stop()
		for {
			p.sampleHistory(time.Now())
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return func() { cancel(); <-done }
}

// sampleHistory reads the interface counters where weft_iface_* reads them
// (segmentsPart.interfaces), so the page's throughput table and the metrics agree.
func (p *Peer) sampleHistory(now time.Time) {
	if pt := p.paths; pt != nil {
		p.history.recordLinks(page.ViaUnderlay, pt.underlay.All(), now)
		if pt.link != nil {
			p.history.recordLinks(page.ViaLink, pt.link.All(), now)
		}
		p.history.recordLinks(page.ViaPath, pathStats(pt), now)
	}
	if p.segs != nil {
		rows, _ := p.segs.interfaces()
		p.history.recordIfaces(rows, now)
	}
}
