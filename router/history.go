package router

import (
	"context"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/router/page"
)

// History for the status page: every historyEvery the peer samples each probed link (per
// peer, over the underlay and through the link in use), the end-to-end figures of its
// chosen path to each measured peer (through a relay or not), and the byte counters of the
// interfaces weft owns, into fixed rings of historyLen samples (15 minutes). Memory is
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

// ifaceCounters is one reading of an interface's statistics.
type ifaceCounters struct {
	rxBytes, txBytes, rxDropped, txDropped uint64
}

// ifaceHistory is one interface's ring and its previous reading (rates are differences).
type ifaceHistory struct {
	ring     *ring[page.IfaceSample]
	prev     ifaceCounters
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

// recordIfaces adds one throughput sample per interface from a reading of their counters.
// A counter that went backwards (the interface was recreated) restarts its rate. O(ifaces).
func (h *history) recordIfaces(read map[string]ifaceCounters, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for name, c := range read {
		ih := h.ifaces[name]
		if ih == nil {
			if len(h.ifaces) >= historyMaxIfaces {
				continue
			}
			h.ifaces[name] = &ifaceHistory{ring: newRing[page.IfaceSample](historyLen), prev: c, prevT: now, lastSeen: now}
			continue
		}
		ih.lastSeen = now
		if dt := now.Sub(ih.prevT).Seconds(); dt > 0 {
			ih.ring.add(page.IfaceSample{T: now, RxBps: rate(ih.prev.rxBytes, c.rxBytes, dt), TxBps: rate(ih.prev.txBytes, c.txBytes, dt),
				RxDrop: c.rxDropped, TxDrop: c.txDropped})
		}
		ih.prev, ih.prevT = c, now
	}
	for name, ih := range h.ifaces {
		if _, ok := read[name]; !ok && now.Sub(ih.lastSeen) > historyWindow {
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
		out = append(out, page.Interface{Name: name, RxBytes: ih.prev.rxBytes, TxBytes: ih.prev.txBytes, Samples: ih.ring.items()})
	}
	return out
}

// ownedInterface says whether weft made the interface: its bridges ("weft", "weft-…"),
// container veths ("weft" + hex), VXLAN ("weft-vxlan", "weftvx…") and WireGuard ("weftwg…")
// devices all start with "weft".
func ownedInterface(name string) bool { return strings.HasPrefix(name, "weft") }

// ifaceCountersOf picks, from the links of this network namespace, those weft owns plus
// the underlay NIC, with their kernel counters. Netlink rather than /sys/class/net: sysfs
// shows the namespace of whoever mounted it, which for a peer started in a fresh namespace
// without a remount is the host's. Issue #16 U2 builds per-segment counters in
// router/segments.go; until the two meet, the page reads them here. O(interfaces).
func ifaceCountersOf(links []netlink.Link, underlay string) map[string]ifaceCounters {
	out := map[string]ifaceCounters{}
	for _, l := range links {
		a := l.Attrs()
		if a == nil || a.Statistics == nil || !ownedInterface(a.Name) && a.Name != underlay {
			continue
		}
		st := a.Statistics
		out[a.Name] = ifaceCounters{rxBytes: st.RxBytes, txBytes: st.TxBytes, rxDropped: st.RxDropped, txDropped: st.TxDropped}
	}
	return out
}

// underlayInterface is the name of the interface holding addr ("" when none does).
func underlayInterface(addr netip.Addr) string {
	ifs, err := net.Interfaces()
	if err != nil {
		return ""
	}
	for _, i := range ifs {
		addrs, err := i.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == addr {
					return i.Name
				}
			}
		}
	}
	return ""
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
func (p *Peer) startHistory(ctx context.Context, advertise netip.Addr) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	underlay := underlayInterface(advertise)
	go func() {
		defer close(done)
		t := time.NewTicker(historyEvery)
		defer t.Stop()
		for {
			p.sampleHistory(underlay, time.Now())
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return func() { cancel(); <-done }
}

func (p *Peer) sampleHistory(underlay string, now time.Time) {
	if pt := p.paths; pt != nil {
		p.history.recordLinks(page.ViaUnderlay, pt.underlay.All(), now)
		if pt.link != nil {
			p.history.recordLinks(page.ViaLink, pt.link.All(), now)
		}
		p.history.recordLinks(page.ViaPath, pathStats(pt), now)
	}
	links, err := netlink.LinkList()
	if err != nil {
		p.log.Debug("history: cannot list interfaces", "err", err)
		return
	}
	p.history.recordIfaces(ifaceCountersOf(links, underlay), now)
}
