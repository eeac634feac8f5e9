package router

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/pathsel"
)

// Measured paths: every peer probes its probe targets (UDP, timestamps T1..T4), publishes
// its links as versioned link-state entries, and an incremental selector (mesh/pathsel)
// picks for each destination the path that meets its SLA — relaying through a third peer
// when the direct link is down or too slow. Link-state changes (ours from Publish, the
// others' from the link-state channel) go straight into the selector, which marks only the
// destinations they can affect; the datapath tick then costs O(N) map upkeep plus
// O(changed) path search, never a path search per destination.

// unknownGrace is how long a newly probed peer that has not answered yet counts as unknown
// rather than unreachable: a few probe intervals, plus WireGuard's 5 s handshake retry (a
// first handshake is lost when the other end has not configured us yet).
const unknownGrace = 10 * time.Second

// With link probes on, underlay probes run underlayProbeSlowdown times slower than
// --probe-interval for a link that is settling, or whose link probe is down or lost a probe in
// its window (see startPaths and mesh.FailingLinks), and underlayIdleSlowdown times slower for a
// healthy one: every 20 s at the default 1 s, as before round 6. Not slower: the segments
// view names the underlay slow by comparing its figure with the link's, and a link that
// only got slower stays "healthy" here; with one underlay probe a minute the view named the
// underlay late, after the baselines had taken the delay in (chaos TestSegments).
const (
	underlayProbeSlowdown = 5
	underlayIdleSlowdown  = underlayProbeSlowdown * idleProbeSlowdown
)

// idleProbeSlowdown: a quiet, healthy link (settled, up, no recent loss, not a relay or a
// relayed destination) is probed this many times slower than --probe-interval. Probe packets
// were most of an idle peer's CPU. A single loss brings the link back to the full rate, so a
// broken idle link is down after at most 4×1.2 + 1 (timeout) + 2 (two more losses) ≈ 8 s
// with the defaults, against ≈ 4 s for an active one (mesh.ProberConfig.IdleInterval).
const idleProbeSlowdown = 4

// linkStateMinChange: an RTT or jitter moving by less than this is not republished. Path
// choice switches only on gains of 20%, 2 ms and 4× the paths' jitter (pathsel.Config), so smaller moves would be gossip to all for
// nothing (they are still measured and shown locally, and fed to this peer's own path
// choice). Every publication reaches every peer, and memberlist delivers each about
// 4·⌈log₁₀(N+1)⌉ times (measured at N=25: 13 link-state messages a second taken by a peer,
// 100 more dropped as duplicates, each costing a 64 KB receive buffer and a decompression),
// so the mesh-wide publication rate drives every peer's idle CPU.
const linkStateMinChange = time.Millisecond

// linkStateRTTChange: nor is an RTT or jitter moving by less than this fraction, the gain
// path choice needs to switch.
const linkStateRTTChange = 0.2

// linkStateLossChange: a loss figure moving by less than this (two probes of the window of
// 20) is not republished: one lost probe on a busy host is noise, not a lossy link.
const linkStateLossChange = 0.1

// linkStateMinInterval: a link whose figures moved (but that did not go up or down) is
// republished at most this often (longer above 50 peers: linkStateMovedSpacing), which
// bounds the mesh-wide rate of moved figures whatever the noise. Up and down go out at once. This peer's own path choice is fed
// its links at once, not at this pace; but the other end of a link takes the worse of both
// directions, so an RTT that fell back is used by the other end only once published: 30 s
// made the SLA chaos test (back to the direct link within 30 s after a delay is removed)
// fail under load.
const linkStateMinInterval = 20 * time.Second

// linkStateMovedSpacing stretches linkStateMinInterval with the mesh: moved figures wait
// max(20 s, N × 0.4 s) (mesh.MovedInterval), so that the whole mesh publishes moved figures
// at most 2.5 times a second whatever N. With the fixed 20 s, each peer relayed N/20
// publications a second, each about 9 times: per-peer link-state traffic grew as N^1.9
// (3.3 kB/s at N=50, 11.9 kB/s at N=100, SCALING.md). Up to N=50 nothing changes (20 s);
// at N=200 the other end of a link learns an RTT that fell back within 80 s instead of 20 s,
// which only delays a switch back to the direct link (its own end switches at once: feedOwn).
const linkStateMovedSpacing = 400 * time.Millisecond

// paths holds the measuring and path-choice state. The datapath loop is its only writer,
// except for the link-state channel feeding the selectors (under classMu; each selector is
// safe for concurrent use) and the status API reading them.
type paths struct {
	// underlay probes go over the underlay (--probe-port); link probes through the link in
	// use to each peer (--link-probe-port, routed by datapath.EnsureProbeRule). Path choice
	// and link-state gossip use the link probes, so a broken tunnel counts as a broken link
	// even while the underlay answers; without them (port 0), the underlay probes.
	underlay, link *mesh.Prober
	table          *mesh.LinkTable
	// def is path selection with this peer's own class (--sla): every destination, and the
	// networks without a class of their own. Networks with one are served by classes
	// (slaclass.go); with none, def is all there is, as before networks had classes.
	def *slaClass
	est pathsel.Estimator // given to every selector

	targets   map[string]netip.Addr       // peers probed now, by underlay address
	probeSet  mesh.ProbeTargets           // why each target is probed; input to the next choice
	rnd       *rand.Rand                  // random probe picks
	added     map[string]time.Time        // when each target was first probed
	dests     map[string]pathsel.Dest     // destinations as last given to sel
	own       map[string]mesh.LinkMetrics // this peer's links as last given to sel
	live      map[string]struct{}         // live peers as of the last updatePeers
	enc       map[string]bool             // live peers whose direct link is encrypted
	mustUntil map[string]time.Time        // must-probe peers, until when (see lingering)

	// classMu guards classes and netClass, and is held across a feed to every selector so
	// that a selector being seeded misses no change. Taken before mu.
	classMu      sync.Mutex
	classes      map[string]*slaClass // by class name: the networks' own classes (≤ maxSLAClasses)
	netClass     map[string]string    // network → its class in classes
	defServes    bool                 // some network uses def (or none is known)
	classRefused map[string]string    // network → SLA refused (logged and counted once)
	classesMoved bool                 // a class came or went: relays changed (under mu)

	mu sync.Mutex // guards every class's choices and relays, and classesMoved

	rtt, loss, jitter, slaOK, hops, estimated *prometheus.GaugeVec
	violations                                *prometheus.CounterVec
	switches                                  *prometheus.CounterVec // by pathsel.Choice.Switch
	log                                       *slog.Logger           // path switches; nil: none logged
	linkRTT, linkLoss, linkUp                 *prometheus.GaugeVec
	rejectedLinks, refusedClasses             prometheus.Counter
}

// measured is the prober whose figures choose paths: link probes when they are on.
func (pt *paths) measured() *mesh.Prober {
	if pt.link != nil {
		return pt.link
	}
	return pt.underlay
}

// probeKey authenticates probes; derived from the cluster key with a label of its own.
func probeKey(clusterKey []byte) []byte {
	if len(clusterKey) == 0 {
		return nil
	}
	key, err := hkdf.Key(sha256.New, clusterKey, nil, "weft probe v1", 32)
	if err != nil {
		panic("router: hkdf: " + err.Error()) // only for lengths over 255*32
	}
	return key
}

// startPaths opens the probe sockets and starts the probers; their stops go on stops.
func (p *Peer) startPaths(ctx context.Context, advertise netip.Addr, stops *[]func()) error {
	sla := pathsel.DefaultSLA()
	if p.cfg.SLA != "" {
		var err error
		if sla, err = pathsel.ParseSLA(p.cfg.SLA); err != nil {
			return fmt.Errorf("%w: --sla: %v", ErrInvalidConfig, err)
		}
	}
	table, err := mesh.NewLinkTable(mesh.LinkTableConfig{Logger: p.log.With("component", "linkstate"), Registerer: p.reg,
		RTTChange: linkStateRTTChange, RTTMinChange: linkStateMinChange, LossChange: linkStateLossChange, MinInterval: linkStateMinInterval,
		MovedSpacing: linkStateMovedSpacing, Signer: p.identity})
	if err != nil {
		return err
	}
	// Destinations that are not probed get an RTT estimated from Vivaldi coordinates.
	pt, err := newPaths(p.cfg.Name, sla, &p.coords, table)
	if err != nil {
		return err
	}
	pt.log = p.log.With("component", "paths")
	// With link probes on, paths are chosen on them; the underlay probes only tell an operator
	// whether a broken link is the tunnel or the underlay, which matters when the link probe
	// fails. So they run at a fifth of the rate for those links (updateLinks marks them
	// active) and once a minute for the others (probe packets are most of an idle peer's CPU).
	underlayEvery, underlayIdle := p.cfg.ProbeInterval, idleProbeSlowdown*p.cfg.ProbeInterval
	if p.cfg.LinkProbePort != 0 {
		underlayEvery, underlayIdle = underlayProbeSlowdown*p.cfg.ProbeInterval, underlayIdleSlowdown*p.cfg.ProbeInterval
	}
	if pt.underlay, err = p.startProber(ctx, advertise, p.cfg.ProbePort, underlayEvery, underlayIdle, "--probe-port", stops); err != nil {
		return err
	}
	if p.cfg.LinkProbePort != 0 {
		if pt.link, err = p.startProber(ctx, advertise, p.cfg.LinkProbePort, p.cfg.ProbeInterval, idleProbeSlowdown*p.cfg.ProbeInterval, "--link-probe-port", stops); err != nil {
			return err
		}
	}
	for via, pr := range map[string]*mesh.Prober{"underlay": pt.underlay, "link": pt.link} {
		if pr == nil {
			continue
		}
		p.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "weft_probes_sent_total",
			Help: "Probe requests this peer sent (quiet links are probed slower).", ConstLabels: prometheus.Labels{"via": via}},
			func() float64 { return float64(pr.Counters().Sent) }))
		p.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "weft_probes_answered_total",
			Help: "Probe requests of other peers this peer answered.", ConstLabels: prometheus.Labels{"via": via}},
			func() float64 { return float64(pr.Counters().Answered) }))
		p.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "weft_probes_timeouts_total",
			Help: "Probe requests of this peer that got no reply within the timeout.", ConstLabels: prometheus.Labels{"via": via}},
			func() float64 { return float64(pr.Counters().Timeouts) }))
		p.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "weft_probes_late_total",
			Help: "Timed-out probe requests whose reply still came (a loaded host): their loss was taken back.", ConstLabels: prometheus.Labels{"via": via}},
			func() float64 { return float64(pr.Counters().Late) }))
	}
	p.reg.MustRegister(pt.rtt, pt.jitter, pt.loss, pt.slaOK, pt.hops, pt.estimated, pt.violations, pt.linkRTT, pt.linkLoss, pt.linkUp, pt.rejectedLinks, pt.refusedClasses, pt.switches)
	p.paths = pt
	return nil
}

// newPaths is the path-choice state without its probers (startPaths adds them): one
// selector for this peer's class, the others made by syncClasses.
func newPaths(self string, sla pathsel.SLA, est pathsel.Estimator, table *mesh.LinkTable) (*paths, error) {
	def, err := newSLAClass(self, sla, est)
	if err != nil {
		return nil, err
	}
	return &paths{
		table: table, def: def, est: est, targets: map[string]netip.Addr{}, added: map[string]time.Time{}, rnd: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
		dests: map[string]pathsel.Dest{}, own: map[string]mesh.LinkMetrics{}, live: map[string]struct{}{}, enc: map[string]bool{}, mustUntil: map[string]time.Time{},
		classes: map[string]*slaClass{}, netClass: map[string]string{}, defServes: true, classRefused: map[string]string{},
		rtt:        prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_rtt_seconds", Help: "End-to-end RTT of the chosen path to each peer (an estimate where weft_path_estimated is 1)."}, []string{"peer"}),
		jitter:     prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_jitter_seconds", Help: "End-to-end jitter of the chosen path to each peer."}, []string{"peer"}),
		loss:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_loss_ratio", Help: "End-to-end loss of the chosen path to each peer."}, []string{"peer"}),
		slaOK:      prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_sla_ok", Help: "1 when the path chosen to the peer for the SLA class meets it (one series per class in use)."}, []string{"peer", "sla"}),
		hops:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_hops", Help: "Links in the chosen path to each peer (2 = relayed)."}, []string{"peer"}),
		estimated:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_estimated", Help: "1 when the path figures to the peer are estimated (direct link not probed), 2 when unmeasured."}, []string{"peer"}),
		violations: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_sla_violations_total", Help: "Times the path chosen to a peer for the SLA class started violating it."}, []string{"peer", "sla"}),
		switches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_path_switches_total",
			Help: "Times traffic to a peer moved from one measured path to another, in any SLA class, by why: broken (a link of the old path failed), sla (it violated the SLA), better (another path gained the switch margin for the hold time). Flapping shows here."}, []string{"reason"}),
		linkRTT:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_rtt_seconds", Help: "Measured RTT (moving average) of the direct link to each peer, over the underlay or through the link in use."}, []string{"peer", "via"}),
		linkLoss: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_loss_ratio", Help: "Probe loss over the recent window on the direct link to each peer."}, []string{"peer", "via"}),
		linkUp:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_up", Help: "1 when the direct link to the peer answers probes."}, []string{"peer", "via"}),
		rejectedLinks: prometheus.NewCounter(prometheus.CounterOpts{Name: "weft_path_links_rejected_total",
			Help: "Link-state entries path selection refused (out of range, or over the per-peer link bound)."}),
		refusedClasses: prometheus.NewCounter(prometheus.CounterOpts{Name: "weft_path_sla_classes_refused_total",
			Help: "Networks whose SLA class path selection refused (unparsable, a name clash, or over the bound of classes); they use this peer's --sla class."}),
	}, nil
}

// linkStateChannel is the link-state gossip handler to register on m: it feeds every
// link that changed into path selection.
func (p *Peer) linkStateChannel(m *mesh.Mesh) *mesh.LinkStateChannel {
	return &mesh.LinkStateChannel{Table: p.paths.table, Self: p.cfg.Name, Keys: m.PublicKey, Sender: m, Logger: p.log,
		OnChange: func(changes []mesh.LinkChange) { p.paths.feed(p.log, changes) }}
}

// feed applies others' link-state changes to the selector (this peer's own links go in by
// feedOwn, fresher than what it publishes). O(changes × D).
func (pt *paths) feed(log *slog.Logger, changes []mesh.LinkChange) {
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	for _, c := range changes {
		if c.From == pt.def.sel.Self() {
			continue
		}
		if c.Removed {
			pt.removeLinkLocked(c.From, c.To)
			continue
		}
		l := pathsel.Link{RTT: c.Link.RTT, Jitter: c.Link.Jitter, Loss: c.Link.Loss, Up: c.Link.Up, Encrypted: c.Link.Encrypted}
		if err := pt.setLinkLocked(c.From, c.To, l); err != nil {
			pt.rejectedLinks.Inc()
			log.Warn("path selection refused a link", "from", c.From, "to", c.To, "err", err)
		}
	}
}

// feedOwn gives the selector this peer's links when they moved beyond ownMoved's
// thresholds — finer than what is published: this peer's own choices should follow its own
// measurements closely, only the gossip to all is coarse — without waiting for their
// (rate-limited) publication. O(D).
func (pt *paths) feedOwn(log *slog.Logger, links map[string]mesh.LinkMetrics) {
	pt.classMu.Lock()
	defer pt.classMu.Unlock()
	self := pt.def.sel.Self()
	for name, m := range links {
		if prev, ok := pt.own[name]; ok && !ownMoved(prev, m) {
			continue
		}
		pt.own[name] = m
		if err := pt.setLinkLocked(self, name, pathsel.Link{RTT: m.RTT, Jitter: m.Jitter, Loss: m.Loss, Up: m.Up, Encrypted: m.Encrypted}); err != nil {
			pt.rejectedLinks.Inc()
			log.Warn("path selection refused a link", "from", self, "to", name, "err", err)
		}
	}
	for name := range pt.own {
		if _, ok := links[name]; !ok {
			delete(pt.own, name)
			pt.removeLinkLocked(self, name)
		}
	}
}

// ownMoved: a change of one of this peer's links worth feeding to its own path choice: up,
// down, encryption, RTT or jitter by 10% and 0.5 ms, loss by one point.
func ownMoved(prev, next mesh.LinkMetrics) bool {
	durMoved := func(a, b time.Duration) bool {
		d := max(a-b, b-a)
		return d >= 500*time.Microsecond && d*10 >= a
	}
	return prev.Up != next.Up || prev.Encrypted != next.Encrypted || durMoved(prev.RTT, next.RTT) ||
		durMoved(prev.Jitter, next.Jitter) || math.Abs(prev.Loss-next.Loss) >= 0.01-1e-9
}

// probeTargets returns the peers to probe, by underlay address: a bounded set (--probe-targets
// nearest by coordinates and some random ones, mesh.ChooseProbeTargets) plus every peer this
// one relays through and every destination it relays (so a healed direct link is seen), so
// probe traffic per peer does not grow with N. A relay or relayed destination stays a target
// for mustLinger after it stopped being one, so that a relay choice flapping on noise does
// not add and remove probed links (each a link-state publication to every peer). It also
// returns the relays in use and the destinations relayed now: they are probed at the full
// rate even when quiet, a relay because it carries traffic, a relayed destination so that
// its direct link's recovery (an RTT falling back, which the moving average follows sample
// by sample) is seen fast. Lingering ones are probed at the idle rate: probing them all at
// the full rate made a loaded host, whose RTTs are noise and whose choices relay on that
// noise, probe 40 targets a second at N=50. O(N log k).
func (p *Peer) probeTargets(peers []mesh.Peer, now time.Time) (map[string]netip.Addr, []string) {
	pt := p.paths
	under := make(map[string]netip.Addr, len(peers))
	live := make([]string, 0, len(peers))
	for _, pr := range peers {
		if isLiveRemote(pr) {
			live = append(live, pr.Name)
			under[pr.Name] = pr.Meta.Underlay
		}
	}
	var needed, active []string
	for _, cl := range pt.allClasses() { // every class's relays, O(K·N)
		pt.mu.Lock()
		for dest, relay := range cl.relays {
			needed = append(needed, dest, relay)
			active = append(active, dest, relay)
		}
		pt.mu.Unlock()
	}
	must := mesh.Lingering(needed, pt.mustUntil, now, mustLinger)
	pt.probeSet = mesh.ChooseProbeTargets(mesh.ProbeTargetInput{
		Self: p.cfg.Name, Live: live, Estimate: p.coords.estimateFromSelf, Measured: pt.measuredRTT, Must: must,
		Current: pt.probeSet, Now: now, Rand: pt.rnd,
	}, mesh.ProbeTargetConfig{K: p.cfg.ProbeTargets})
	targets := make(map[string]netip.Addr, p.cfg.ProbeTargets+len(must))
	for _, name := range pt.probeSet.All() {
		if a, ok := under[name]; ok {
			targets[name] = a
		}
	}
	return targets, active
}

// measuredRTT is the smallest RTT the link prober measured to peer over its window
// (mesh.LinkStats.SettledMinRTT).
func (pt *paths) measuredRTT(peer string) (time.Duration, bool) {
	st, ok := pt.measured().Stats(peer)
	if !ok {
		return 0, false
	}
	return st.SettledMinRTT()
}

// mustLinger: how long a relay or relayed destination stays a must-probe target after it
// stopped being one (see probeTargets).
const mustLinger = 2 * time.Minute

// coordEstimator estimates RTTs from the mesh's Vivaldi coordinates. Path selection is built
// before the mesh starts, so the mesh is bound late; until then there are no estimates.
type coordEstimator struct {
	mesh atomic.Pointer[mesh.Mesh]
}

// EstimateRTT implements pathsel.Estimator.
func (e *coordEstimator) EstimateRTT(a, b string) (time.Duration, bool) {
	m := e.mesh.Load()
	if m == nil {
		return 0, false
	}
	return m.EstimateRTTBetween(a, b)
}

func (e *coordEstimator) estimateFromSelf(peer string) (time.Duration, bool) {
	m := e.mesh.Load()
	if m == nil {
		return 0, false
	}
	return m.EstimateRTT(peer)
}

func isLiveRemote(pr mesh.Peer) bool {
	return !pr.Self && pr.Up() && pr.Meta.Underlay.IsValid()
}

// startProber binds one probe socket on the underlay address and runs a prober on it.
func (p *Peer) startProber(ctx context.Context, advertise netip.Addr, port int, every, idleEvery time.Duration, flag string, stops *[]func()) (*mesh.Prober, error) {
	conn, err := net.ListenPacket("udp", netip.AddrPortFrom(advertise, uint16(port)).String())
	if err != nil {
		return nil, fmt.Errorf("listen on %s %d: %w", flag, port, err)
	}
	prober, err := mesh.NewProber(mesh.ProberConfig{
		Self: p.cfg.Name, Conn: conn, Interval: every, IdleInterval: idleEvery, Timeout: p.cfg.probeTimeout(),
		Key: probeKey(p.cfg.ClusterKey), Logger: p.log.With("component", "probe", "port", port),
	})
	if err != nil {
		conn.Close()
		return nil, err
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		prober.Run(runCtx)
	}()
	*stops = append(*stops, func() { cancel(); <-done; conn.Close() })
	return prober, nil
}

// updatePeers is the membership half of path upkeep, run by the datapath loop only when the
// membership or the relays changed (and at every resync): it chooses the probe targets —
// relays and relayed destinations probed at the full rate even when quiet — and the
// destinations of path selection. O(N log k) for N peers and k probe targets.
func (p *Peer) updatePeers(peers []mesh.Peer, now time.Time) {
	pt := p.paths
	targets, active := p.probeTargets(peers, now)
	if !maps.Equal(targets, pt.targets) {
		if err := pt.underlay.SetTargets(withPort(targets, p.cfg.ProbePort)); err != nil {
			p.log.Warn("probe targets", "err", err)
		}
		if pt.link != nil {
			if err := pt.link.SetTargets(withPort(targets, p.cfg.LinkProbePort)); err != nil {
				p.log.Warn("link-probe targets", "err", err)
			}
		}
		for name := range pt.targets {
			if _, ok := targets[name]; !ok {
				delete(pt.added, name)
				for _, via := range []string{"underlay", "link"} {
					pt.linkRTT.DeleteLabelValues(name, via)
					pt.linkLoss.DeleteLabelValues(name, via)
					pt.linkUp.DeleteLabelValues(name, via)
				}
			}
		}
		for name := range targets {
			if _, ok := pt.added[name]; !ok {
				pt.added[name] = now
			}
		}
		pt.targets = targets
	}
	if pt.link != nil {
		pt.link.SetActive(active) // the underlay's active links are those failing (updateLinks)
	} else {
		pt.underlay.SetActive(active)
	}
	// Destinations: every live peer, encrypted when its direct link runs over WireGuard (a
	// pair that must be encrypted is relayed only along encrypted links, every hop included).
	live := make(map[string]struct{}, len(peers))
	dests := make(map[string]pathsel.Dest, len(peers))
	encrypted := map[string]bool{}
	for _, pr := range peers {
		if !isLiveRemote(pr) {
			continue
		}
		live[pr.Name] = struct{}{}
		enc := chooseLink(p.links.pol, pr.Meta).Mode == datapath.ModeWireGuard
		encrypted[pr.Name] = enc
		dests[pr.Name] = pathsel.Dest{Encrypted: enc, Pending: pt.pending(pr.Name, now)}
	}
	pt.enc = encrypted
	// A peer gone from the mesh: forget its links (ours to it go by the next publication).
	for name := range pt.live {
		if _, ok := live[name]; !ok {
			pt.feed(p.log, pt.table.Remove(name))
			pt.removePeer(name)
		}
	}
	for name := range live {
		if _, ok := pt.live[name]; !ok {
			pt.table.Restore(name) // back after a Remove: take its links again
		}
	}
	pt.live = live
	if !maps.Equal(dests, pt.dests) {
		pt.setDestinations(dests)
	}
}

// pending says whether a destination's direct link is still unknown rather than broken: a
// link not measured yet is unknown until its probes have settled (three answers in a row:
// the tunnel and probe routes are built at both ends) or unknownGrace has passed (then
// silence does mean down); meanwhile traffic takes the direct link rather than a relay
// chosen on set-up losses. O(1).
func (pt *paths) pending(name string, now time.Time) bool {
	added, probed := pt.added[name]
	if !probed || now.Sub(added) >= unknownGrace {
		return false
	}
	st, ok := pt.measured().Stats(name)
	return !ok || !st.Settled
}

// updateLinks is the measuring half of path upkeep, run every datapath tick: it publishes
// this peer's links when they moved, feeds every change into path selection and
// re-evaluates only the destinations it affected, in every SLA class's selector; with export
// it also sets the link gauges (see linkExportDue). It
// returns, for each destination that goes through a relay in this peer's own class, the
// relay's name, and whether any class's relays changed since the last call (the networks
// with a class of their own take theirs from paths.netRelays). O(k) for k probe targets
// plus O(K × changed × D) path search for K classes; nothing in it grows with N except a
// copy of the destinations when a new target settles (O(N), rare).
func (p *Peer) updateLinks(now time.Time, export bool) (map[string]string, bool) {
	pt := p.paths
	// Targets still in their grace: their pending flag ends when they settle or it expires.
	var dests map[string]pathsel.Dest
	for name := range pt.added {
		d, ok := pt.dests[name]
		if !ok || !d.Pending {
			continue
		}
		if !pt.pending(name, now) {
			if dests == nil {
				dests = maps.Clone(pt.dests) // the selector keeps the map it was given
			}
			d.Pending = false
			dests[name] = d
		}
	}
	if dests != nil {
		pt.setDestinations(dests)
	}
	measured := pt.measured().All()
	// A link not settled yet is not advertised until unknownGrace says it is down: the
	// other end takes each link as the worse of both directions, and "still being built"
	// must not count there as "down" or "lossy".
	links := make(map[string]mesh.LinkMetrics, len(measured))
	for name, st := range measured {
		if _, ok := pt.targets[name]; !ok || !st.Settled && now.Sub(pt.added[name]) < unknownGrace {
			continue
		}
		links[name] = mesh.LinkMetrics{RTT: st.RTT, Jitter: st.Jitter, Loss: st.Loss, Up: st.Up, Encrypted: pt.enc[name]}
	}
	if pt.link != nil {
		pt.underlay.SetActive(mesh.FailingLinks(links)) // a no-op unless the set changed
	}
	msgs, _ := pt.table.PublishLinks(p.cfg.Name, links)
	for _, msg := range msgs {
		if err := p.mesh.Broadcast(mesh.LinkStateChannelName, msg); err != nil {
			p.log.Debug("link-state broadcast skipped; push/pull carries it", "err", err)
		}
	}
	pt.feedOwn(p.log, links)
	if export {
		pt.exportLinks("underlay", pt.underlay.All())
		if pt.link != nil {
			pt.exportLinks("link", measured)
		}
	}
	return pt.selectAll(now)
}

// ownLink is this peer's link to dest as measured now: the table holds what was published,
// which lags by up to linkStateMinInterval. A link not probed falls back to the table.
func (pt *paths) ownLink(dest string, measured map[string]mesh.LinkStats) mesh.LinkMetrics {
	if st, ok := measured[dest]; ok {
		return mesh.LinkMetrics{RTT: st.RTT, Jitter: st.Jitter, Loss: st.Loss, Up: st.Up}
	}
	lm, _ := pt.table.Link(pt.def.sel.Self(), dest)
	return lm
}

func (pt *paths) current(dest string) (pathsel.Choice, bool) {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	c, ok := pt.def.choices[dest]
	return c, ok
}

func withPort(addrs map[string]netip.Addr, port int) map[string]netip.AddrPort {
	out := make(map[string]netip.AddrPort, len(addrs))
	for name, a := range addrs {
		out[name] = netip.AddrPortFrom(a, uint16(port))
	}
	return out
}

func (pt *paths) exportLinks(via string, stats map[string]mesh.LinkStats) {
	for name, st := range stats {
		up := 0.0
		if st.Up {
			up = 1
		}
		pt.linkUp.WithLabelValues(name, via).Set(up)
		pt.linkRTT.WithLabelValues(name, via).Set(st.RTT.Seconds())
		pt.linkLoss.WithLabelValues(name, via).Set(st.Loss)
	}
}

// nearest gives DNS the measured RTT to a peer, so answers list nearby containers first.
func (p *Peer) nearest(peer string) (time.Duration, bool) {
	if peer == p.cfg.Name {
		return 0, true
	}
	if p.paths == nil {
		return 0, false
	}
	c, ok := p.paths.current(peer)
	if !ok || len(c.Path) == 0 || c.Unmeasured {
		return 0, false
	}
	// A remote peer is never as near as this host, even when its RTT reads 0 (an estimate
	// from coordinates, or a clock too coarse for a namespace hop): DNS puts local first.
	return max(c.RTT, time.Nanosecond), true
}

// Route is one row of `weft status routes`.
type Route struct {
	Peer     string    `json:"peer"`
	Path     []string  `json:"path"`
	Hops     []Hop     `json:"hops"`
	RTTms    float64   `json:"rtt_ms"`
	JitterMs float64   `json:"jitter_ms"`
	Loss     float64   `json:"loss"`
	SLA      string    `json:"sla"`
	SLAOK    bool      `json:"sla_ok"`
	Since    time.Time `json:"since"`
	Reason   string    `json:"reason"`
	// Estimated: the direct link is not probed; RTT is an estimate (from coordinates).
	// Unmeasured: neither a measurement nor an estimate exists; the figures are zero.
	Estimated  bool `json:"estimated"`
	Unmeasured bool `json:"unmeasured"`
	// Direct is the measured direct link (through the link in use, see Link), whether or
	// not the path uses it; Underlay is the same peer measured over the underlay.
	Direct   Hop    `json:"direct"`
	Underlay Hop    `json:"underlay"`
	Link     string `json:"link"` // the direct link's mode (the one its probes use): direct, vxlan, wireguard
	// Networks are the networks whose traffic to the peer takes Path (a network the relay
	// cannot carry stays on the direct link and is not listed on a relayed path).
	Networks []string `json:"networks"`
}

// Hop is one measured link of a path.
type Hop struct {
	From     string  `json:"from"`
	To       string  `json:"to"`
	RTTms    float64 `json:"rtt_ms"`
	JitterMs float64 `json:"jitter_ms"`
	Loss     float64 `json:"loss"`
	Up       bool    `json:"up"`
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// routes lists every destination's choice, as the selectors hold it now (with the
// current reason of a pending hold): one row per destination for this peer's class and,
// when networks have classes of their own, one more per (destination, class), each naming
// the networks it serves. O(K·N) for K classes.
func (p *Peer) routes() []Route {
	pt := p.paths
	under := pt.underlay.All()
	measured := pt.measured().All()
	modes := p.linkModes()
	relayedNets, directNets := map[string][]string{}, map[string][]string{} // peer → networks, O(N·M)
	for _, c := range p.connections() {
		switch c.State {
		case plan.StateRelayed:
			relayedNets[c.Peer] = append(relayedNets[c.Peer], c.Network)
		case plan.StateEstablished:
			directNets[c.Peer] = append(directNets[c.Peer], c.Network)
		}
	}
	pt.classMu.Lock()
	netClass, defServes := maps.Clone(pt.netClass), pt.defServes
	classes := make([]*slaClass, 0, 1+len(pt.classes))
	if defServes || len(pt.classes) == 0 {
		classes = append(classes, pt.def)
	}
	for _, name := range slices.Sorted(maps.Keys(pt.classes)) {
		classes = append(classes, pt.classes[name])
	}
	pt.classMu.Unlock()
	out := []Route{}
	for _, cl := range classes {
		// The networks of this class among those listed: the others are another row's.
		mine := func(nets []string) []string {
			out := []string{}
			for _, n := range nets {
				if c, own := netClass[n]; own && c == cl.sla.Name || !own && cl == pt.def {
					out = append(out, n)
				}
			}
			return out
		}
		for dest, c := range cl.sel.Choices() {
			r := Route{Peer: dest, Path: slices.Clone(c.Path), Hops: []Hop{}, RTTms: ms(c.RTT), JitterMs: ms(c.Jitter),
				Loss: c.Loss, SLA: cl.sla.String(), SLAOK: c.SLAOK, Since: c.Since, Reason: c.Reason,
				Estimated: c.Estimated, Unmeasured: c.Unmeasured}
			if r.Path == nil {
				r.Path = []string{}
			}
			lm := pt.ownLink(dest, measured)
			r.Direct = Hop{From: p.cfg.Name, To: dest, RTTms: ms(lm.RTT), JitterMs: ms(lm.Jitter), Loss: lm.Loss, Up: lm.Up}
			u := under[dest]
			r.Underlay = Hop{From: p.cfg.Name, To: dest, RTTms: ms(u.RTT), JitterMs: ms(u.Jitter), Loss: u.Loss, Up: u.Up}
			r.Link = modes[dest]
			r.Networks = mine(directNets[dest])
			if len(r.Path) > 1 {
				r.Networks = mine(relayedNets[dest])
			}
			if pt.link != nil && u.Up && !lm.Up && r.Link != "" && r.Link != datapath.ModeDirect {
				r.Reason += fmt.Sprintf("; the %s link is broken while the underlay answers", r.Link)
			}
			if !c.Estimated && !c.Unmeasured {
				from := p.cfg.Name
				for _, to := range c.Path {
					lm, _ := pt.table.Link(from, to)
					if from == p.cfg.Name {
						lm = pt.ownLink(to, measured)
					}
					r.Hops = append(r.Hops, Hop{From: from, To: to, RTTms: ms(lm.RTT), JitterMs: ms(lm.Jitter), Loss: lm.Loss, Up: lm.Up})
					from = to
				}
			}
			out = append(out, r)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}
