package router

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/mesh"
)

// Measured paths: every peer probes every other (UDP, timestamps T1..T4), publishes its
// neighbour table as link-state deltas, and picks for each destination the path that meets
// its SLA — relaying through a third peer when the direct link is down or too slow.

// unknownGrace is how long a newly probed peer that has not answered yet counts as unknown
// rather than unreachable: a few probe intervals, plus WireGuard's 5 s handshake retry (a
// first handshake is lost when the other end has not configured us yet).
const unknownGrace = 10 * time.Second

// paths holds the measuring and path-choice state. The datapath loop is its only writer.
type paths struct {
	// underlay probes go over the underlay (--probe-port); link probes through the link in
	// use to each peer (--link-probe-port, routed by datapath.EnsureProbeRule). Path choice
	// and link-state gossip use the link probes, so a broken tunnel counts as a broken link
	// even while the underlay answers; without them (port 0), the underlay probes.
	underlay, link *mesh.Prober
	table          *mesh.LinkTable
	sel            *mesh.PathSelector
	sla            mesh.SLA

	targets map[string]netip.Addr // peers probed now, by underlay address
	added   map[string]time.Time  // when each target was first probed

	mu      sync.Mutex // guards choices
	choices map[string]mesh.PathChoice

	rtt, loss, jitter, slaOK, hops *prometheus.GaugeVec
	violations                     *prometheus.CounterVec
	linkRTT, linkLoss, linkUp      *prometheus.GaugeVec
}

// measured is the prober whose figures choose paths: link probes when they are on.
func (pt *paths) measured() *mesh.Prober {
	if pt.link != nil {
		return pt.link
	}
	return pt.underlay
}

// probeKey authenticates probes; derived from the password with a label of its own.
func probeKey(password []byte) []byte {
	if len(password) == 0 {
		return nil
	}
	key, err := hkdf.Key(sha256.New, password, nil, "weft probe v1", 32)
	if err != nil {
		panic("router: hkdf: " + err.Error()) // only for lengths over 255*32
	}
	return key
}

// startPaths opens the probe sockets and starts the probers; their stops go on stops.
func (p *Peer) startPaths(ctx context.Context, advertise netip.Addr, stops *[]func()) error {
	sla := mesh.DefaultSLA()
	if p.cfg.SLA != "" {
		var err error
		if sla, err = mesh.ParseSLA(p.cfg.SLA); err != nil {
			return fmt.Errorf("%w: --sla: %v", ErrInvalidConfig, err)
		}
	}
	sel, err := mesh.NewPathSelector(mesh.DefaultPathSelectorConfig())
	if err != nil {
		return err
	}
	pt := &paths{
		table: mesh.NewLinkTable(mesh.LinkTableConfig{Logger: p.log.With("component", "linkstate")}),
		sel:   sel, sla: sla, targets: map[string]netip.Addr{}, added: map[string]time.Time{}, choices: map[string]mesh.PathChoice{},
		rtt:        prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_rtt_seconds", Help: "End-to-end RTT of the chosen path to each peer."}, []string{"peer"}),
		jitter:     prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_jitter_seconds", Help: "End-to-end jitter of the chosen path to each peer."}, []string{"peer"}),
		loss:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_loss_ratio", Help: "End-to-end loss of the chosen path to each peer."}, []string{"peer"}),
		slaOK:      prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_sla_ok", Help: "1 when the chosen path to the peer meets the SLA."}, []string{"peer", "sla"}),
		hops:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_path_hops", Help: "Links in the chosen path to each peer (2 = relayed)."}, []string{"peer"}),
		violations: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_sla_violations_total", Help: "Times the chosen path to a peer started violating the SLA."}, []string{"peer", "sla"}),
		linkRTT:    prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_rtt_seconds", Help: "Measured RTT (moving average) of the direct link to each peer, over the underlay or through the link in use."}, []string{"peer", "via"}),
		linkLoss:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_loss_ratio", Help: "Probe loss over the recent window on the direct link to each peer."}, []string{"peer", "via"}),
		linkUp:     prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "weft_link_up", Help: "1 when the direct link to the peer answers probes."}, []string{"peer", "via"}),
	}
	if pt.underlay, err = p.startProber(ctx, advertise, p.cfg.ProbePort, "--probe-port", stops); err != nil {
		return err
	}
	if p.cfg.LinkProbePort != 0 {
		if pt.link, err = p.startProber(ctx, advertise, p.cfg.LinkProbePort, "--link-probe-port", stops); err != nil {
			return err
		}
	}
	p.reg.MustRegister(pt.rtt, pt.jitter, pt.loss, pt.slaOK, pt.hops, pt.violations, pt.linkRTT, pt.linkLoss, pt.linkUp)
	p.paths = pt
	return nil
}

// startProber binds one probe socket on the underlay address and runs a prober on it.
func (p *Peer) startProber(ctx context.Context, advertise netip.Addr, port int, flag string, stops *[]func()) (*mesh.Prober, error) {
	conn, err := net.ListenPacket("udp", netip.AddrPortFrom(advertise, uint16(port)).String())
	if err != nil {
		return nil, fmt.Errorf("listen on %s %d: %w", flag, port, err)
	}
	prober, err := mesh.NewProber(mesh.ProberConfig{
		Self: p.cfg.Name, Conn: conn, Interval: p.cfg.ProbeInterval, Timeout: p.cfg.probeTimeout(),
		Key: probeKey(p.cfg.Password), Logger: p.log.With("component", "probe", "port", port),
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

// updatePaths probes the live peers, publishes this peer's links when they moved, and
// chooses a path to every live peer. It returns, for each destination that goes through a
// relay, the relay's name.
func (p *Peer) updatePaths(peers []mesh.Peer, now time.Time) map[string]string {
	pt := p.paths
	targets := map[string]netip.Addr{}
	encrypted := map[string]bool{} // the direct link runs over WireGuard
	for _, pr := range peers {
		if !pr.Self && (pr.State == mesh.StateAlive || pr.State == mesh.StateSuspect) && pr.Meta.Underlay.IsValid() {
			targets[pr.Name] = pr.Meta.Underlay
			encrypted[pr.Name] = chooseLink(p.links.pol, pr.Meta).Mode == datapath.ModeWireGuard
		}
	}
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
				pt.table.Remove(name)
				pt.sel.Forget(name)
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
	measured := pt.measured().All()
	// A link not measured yet is not advertised until unknownGrace says it is down: the
	// other end takes each link as the worse of both directions, and "not measured yet"
	// must not count there as "down".
	links := make(map[string]mesh.LinkMetrics, len(measured))
	for name, st := range measured {
		if st.Samples == 0 && now.Sub(pt.added[name]) < unknownGrace {
			continue
		}
		links[name] = mesh.LinkMetrics{RTT: st.RTT, Jitter: st.Jitter, Loss: st.Loss, Up: st.Up, Encrypted: encrypted[name]}
	}
	if delta, changed := pt.table.PublishLinks(p.cfg.Name, links); changed && delta != nil {
		if err := p.mesh.Broadcast(mesh.LinkStateChannelName, delta); err != nil {
			p.log.Debug("link-state broadcast skipped; push/pull carries it", "err", err)
		}
	}
	pt.exportLinks("underlay", pt.underlay.All())
	if pt.link != nil {
		pt.exportLinks("link", measured)
	}
	// Both ends of a pair choose on the same symmetric graph, and a pair that must be
	// encrypted only over encrypted links, every hop included: so the two ends pick mirror
	// paths (WireGuard drops a peer's packets that arrive from another peer than the one
	// its blocks are routed to) and a relay never carries them in plaintext.
	graph := pt.table.Graph().Symmetric()
	encGraph := graph.Encrypted()
	relays := map[string]string{}
	choices := map[string]mesh.PathChoice{}
	for name := range targets {
		// A link not measured yet is unknown, not broken: until the first probe answer (or
		// unknownGrace, after which silence does mean down), traffic takes the direct link,
		// and the selector starts from a fresh state (its hysteresis would otherwise keep a
		// start-up relay for seconds).
		if st, ok := pt.measured().Stats(name); (!ok || st.Samples == 0) && now.Sub(pt.added[name]) < unknownGrace {
			pt.sel.Forget(name)
			choices[name] = mesh.PathChoice{Path: []string{name}, Since: now, SLAOK: true, Reason: "not measured yet"}
			continue
		}
		g := graph
		if encrypted[name] {
			g = encGraph
		}
		c := pt.sel.Select(g, p.cfg.Name, name, pt.sla, now)
		choices[name] = c
		if len(c.Path) == 2 {
			relays[name] = c.Path[0]
		}
		prev, had := pt.current(name)
		if !c.SLAOK && len(c.Path) > 0 && (!had || prev.SLAOK) {
			pt.violations.WithLabelValues(name, pt.sla.Name).Inc()
		}
		pt.rtt.WithLabelValues(name).Set(c.RTT.Seconds())
		pt.jitter.WithLabelValues(name).Set(c.Jitter.Seconds())
		pt.loss.WithLabelValues(name).Set(c.Loss)
		pt.hops.WithLabelValues(name).Set(float64(len(c.Path)))
		ok := 0.0
		if c.SLAOK {
			ok = 1
		}
		pt.slaOK.WithLabelValues(name, pt.sla.Name).Set(ok)
	}
	pt.mu.Lock()
	for name := range pt.choices {
		if _, ok := choices[name]; !ok {
			pt.rtt.DeleteLabelValues(name)
			pt.jitter.DeleteLabelValues(name)
			pt.loss.DeleteLabelValues(name)
			pt.hops.DeleteLabelValues(name)
			pt.slaOK.DeleteLabelValues(name, pt.sla.Name)
		}
	}
	pt.choices = choices
	pt.mu.Unlock()
	return relays
}

func (pt *paths) current(dest string) (mesh.PathChoice, bool) {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	c, ok := pt.choices[dest]
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
	if !ok || len(c.Path) == 0 {
		return 0, false
	}
	return c.RTT, true
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
	// Direct is the measured direct link (through the link in use, see Link), whether or
	// not the path uses it; Underlay is the same peer measured over the underlay.
	Direct   Hop    `json:"direct"`
	Underlay Hop    `json:"underlay"`
	Link     string `json:"link"` // the direct link's mode: direct, vxlan, wireguard
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

func (p *Peer) routes() []Route {
	pt := p.paths
	graph := pt.table.Graph()
	under := pt.underlay.All()
	modes := map[string]string{}
	for _, c := range p.connections() {
		modes[c.Peer] = c.Mode
	}
	pt.mu.Lock()
	defer pt.mu.Unlock()
	out := []Route{}
	for dest, c := range pt.choices {
		r := Route{Peer: dest, Path: slices.Clone(c.Path), Hops: []Hop{}, RTTms: ms(c.RTT), JitterMs: ms(c.Jitter),
			Loss: c.Loss, SLA: pt.sla.String(), SLAOK: c.SLAOK, Since: c.Since, Reason: c.Reason}
		if r.Path == nil {
			r.Path = []string{}
		}
		lm, _ := graph.Link(p.cfg.Name, dest)
		r.Direct = Hop{From: p.cfg.Name, To: dest, RTTms: ms(lm.RTT), JitterMs: ms(lm.Jitter), Loss: lm.Loss, Up: lm.Up}
		u := under[dest]
		r.Underlay = Hop{From: p.cfg.Name, To: dest, RTTms: ms(u.RTT), JitterMs: ms(u.Jitter), Loss: u.Loss, Up: u.Up}
		r.Link = modes[dest]
		if pt.link != nil && u.Up && !lm.Up && r.Link != "" && r.Link != datapath.ModeDirect {
			r.Reason += fmt.Sprintf("; the %s link is broken while the underlay answers", r.Link)
		}
		from := p.cfg.Name
		for _, to := range c.Path {
			lm, _ := graph.Link(from, to)
			r.Hops = append(r.Hops, Hop{From: from, To: to, RTTms: ms(lm.RTT), JitterMs: ms(lm.Jitter), Loss: lm.Loss, Up: lm.Up})
			from = to
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}
