package main

// One simulated peer: how it builds its mesh, probers, link state and path
// choice, fed to a recording fake datapath. This file is the only one that
// knows weft's per-peer wiring; it mirrors router/membership.go startMesh
// and runMembership (join events), router/paths.go startPaths, updatePeers
// and updateLinks, and router/datapath.go runDatapath's event-driven loop,
// minus the kernel, Raft, DNS and metrics. Swap components here when the
// router's wiring changes.

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/identity"
	"github.com/weftnet/weft/mesh/pathsel"
)

// unknownGrace mirrors router/paths.go: how long a new probe target that has
// not answered counts as unknown rather than down.
const unknownGrace = 10 * time.Second

// idleProbeSlowdown, resyncEvery and mustLinger mirror router/paths.go and
// router/datapath.go (idleProbeSlowdown, reapplyEvery, mustLinger).
const (
	idleProbeSlowdown = 4
	resyncEvery       = 30 * time.Second
	mustLinger        = 2 * time.Minute
)

// underlayProbeSlowdown and underlayIdleSlowdown mirror router/paths.go: with link probes
// on, the underlay of a failing or settling link is probed 5× slower than the interval, a
// healthy one 20× slower (the active set is mesh.FailingLinks).
const (
	underlayProbeSlowdown = 5
	underlayIdleSlowdown  = underlayProbeSlowdown * idleProbeSlowdown
)

// ownMoved mirrors router/paths.go ownMoved: own links are fed to path
// choice on finer moves than they are published.
func ownMoved(prev, next mesh.LinkMetrics) bool {
	durMoved := func(a, b time.Duration) bool {
		d := max(a-b, b-a)
		return d >= 500*time.Microsecond && d*10 >= a
	}
	return prev.Up != next.Up || prev.Encrypted != next.Encrypted || durMoved(prev.RTT, next.RTT) ||
		durMoved(prev.Jitter, next.Jitter) || math.Abs(prev.Loss-next.Loss) >= 0.01-1e-9
}

// nodeConfig configures one simulated peer.
type nodeConfig struct {
	Name string
	Addr netip.Addr // a loopback address of its own
	// MeshPort, ProbePort, LinkProbePort: as weft peer's --mesh-port,
	// --probe-port, --link-probe-port (0: no link prober).
	MeshPort, ProbePort, LinkProbePort int
	Seeds                              []string
	// MembershipOnly: the mesh alone, no probers, link state or paths.
	MembershipOnly bool
	// SyncOnJoin: on every join event, a full push/pull with the joiner
	// (router/membership.go peerEvent does this today).
	SyncOnJoin bool
	// ProbeInterval as --probe-interval; the timeout is the router's
	// default, min(2 × interval, 1s). Underlay probes run five times slower
	// when link probes are on, as in the router.
	ProbeInterval time.Duration
	// ProbeTargets as --probe-targets (k).
	ProbeTargets int
	// Compress is mesh.Config's.
	Compress bool
	// SWIMProbeTimeout is mesh.Config's ProbeTimeout; 0 keeps the mesh default.
	SWIMProbeTimeout time.Duration
	// LogWarnings sends the mesh's warnings and errors to stderr.
	LogWarnings bool
	// LinkStateRetransmitMult is mesh.Config's; 0 keeps the mesh default.
	LinkStateRetransmitMult int
	// MovedSpacing is mesh.LinkTableConfig's (router/paths.go linkStateMovedSpacing);
	// 0: moved figures every 20 s whatever N (before issue 11's link-state round).
	MovedSpacing time.Duration
	// RTTMinChange is mesh.LinkTableConfig's (router/paths.go linkStateMinChange): an RTT or
	// jitter moving by less is not republished. 0: 1 ms, the router's.
	RTTMinChange time.Duration
	// MembershipRetransmitMult is mesh.Config's; 0 keeps the mesh default.
	MembershipRetransmitMult int
	// PathInterval is the router's datapath loop period (datapathTick); a
	// probed link going up or down runs a round at once, as in the router.
	PathInterval time.Duration
	// PathSlot is shared by all nodes: one path computation at a time, so a
	// super-linear path cost shows as time per run and fewer runs per
	// second instead of starving every peer's gossip goroutines.
	PathSlot chan struct{}
	// Paths records each path computation's duration.
	Paths *durations
	// Switches counts every peer's moves between measured paths (Choice.Switch), shared.
	Switches *atomic.Int64
	// Traffic counts what this peer sends.
	Traffic *counter
}

// node is one running simulated peer.
type node struct {
	cfg  nodeConfig
	mesh *mesh.Mesh
	dp   *recorder
	reg  *prometheus.Registry // this peer's mesh metrics (events by type, suppressed notes)

	// Path state, owned by the path loop goroutine (as router.paths is
	// owned by the datapath loop).
	underlay, link *mesh.Prober
	table          *mesh.LinkTable
	sel            *pathsel.Selector
	targets        map[string]netip.Addr
	added          map[string]time.Time
	probeSet       mesh.ProbeTargets
	rnd            *rand.Rand
	dests          map[string]pathsel.Dest
	live           map[string]struct{}
	relays         map[string]string // destination → relay, as the router keeps it
	own            map[string]mesh.LinkMetrics
	mustUntil      map[string]time.Time

	// Down links heard of from others (from, to) → when first merged, for
	// the publish probes; OnChange runs on the mesh's goroutines.
	downMu sync.Mutex
	downs  map[[2]string]time.Time

	// Links a publish probe holds down until the given time, as a failure
	// that lasts: updateLinks publishes them down whatever the prober says.
	heldMu sync.Mutex
	held   map[string]time.Time

	cancel context.CancelFunc
	loops  sync.WaitGroup // membership and path loops, probers
	syncs  sync.WaitGroup // mesh.Sync calls in flight
	conns  []net.PacketConn
}

// startNode starts one peer; on error everything it started is closed.
func startNode(ctx context.Context, cfg nodeConfig) (n *node, err error) {
	ctx, cancel := context.WithCancel(ctx)
	n = &node{cfg: cfg, dp: newRecorder(), reg: prometheus.NewRegistry(), cancel: cancel, rnd: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())),
		targets: map[string]netip.Addr{}, added: map[string]time.Time{}, dests: map[string]pathsel.Dest{},
		live: map[string]struct{}{}, relays: map[string]string{}, own: map[string]mesh.LinkMetrics{}, mustUntil: map[string]time.Time{}}
	defer func() {
		if err != nil {
			n.close()
			n = nil
		}
	}()
	id := identity.Generate() // as the router's identity.LoadOrCreate, in memory
	if !cfg.MembershipOnly {
		// As router/paths.go startPaths: RTT moves under 20% or RTTMinChange and loss moves
		// under 10 points are not republished, and moved figures at most every max(20 s, N ×
		// 0.4 s).
		rttMinChange := cfg.RTTMinChange
		if rttMinChange == 0 {
			rttMinChange = time.Millisecond
		}
		if n.table, err = mesh.NewLinkTable(mesh.LinkTableConfig{RTTChange: 0.2, RTTMinChange: rttMinChange, LossChange: 0.1,
			MinInterval: 20 * time.Second, MovedSpacing: cfg.MovedSpacing, Signer: id, Registerer: n.reg}); err != nil {
			return n, err
		}
		if n.sel, err = pathsel.New(pathsel.Config{Self: cfg.Name, SLA: pathsel.DefaultSLA(), Estimator: (*meshEstimator)(n)}); err != nil {
			return n, err
		}
		underlayEvery, underlayIdle := cfg.ProbeInterval, idleProbeSlowdown*cfg.ProbeInterval
		if cfg.LinkProbePort != 0 {
			underlayEvery, underlayIdle = underlayProbeSlowdown*cfg.ProbeInterval, underlayIdleSlowdown*cfg.ProbeInterval
		}
		if n.underlay, err = n.startProber(ctx, cfg.ProbePort, underlayEvery, underlayIdle, kindProbeUnderlay); err != nil {
			return n, err
		}
		if cfg.LinkProbePort != 0 {
			if n.link, err = n.startProber(ctx, cfg.LinkProbePort, cfg.ProbeInterval, idleProbeSlowdown*cfg.ProbeInterval, kindProbeLink); err != nil {
				return n, err
			}
		}
	}

	mc := mesh.DefaultConfig()
	mc.Name = cfg.Name
	mc.BindAddr = cfg.Addr // the router binds all addresses; here each peer has its own
	mc.BindPort = cfg.MeshPort
	mc.AdvertiseAddr = cfg.Addr
	mc.Seeds = cfg.Seeds
	mc.Identity = id
	mc.WrapTransport = wrapTransport(cfg.Traffic)
	mc.Compress = cfg.Compress
	mc.Registerer = n.reg
	if cfg.SWIMProbeTimeout > 0 {
		mc.ProbeTimeout = cfg.SWIMProbeTimeout
	}
	if cfg.LogWarnings {
		mc.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", cfg.Name)
	}
	if cfg.LinkStateRetransmitMult > 0 {
		mc.LinkStateRetransmitMult = cfg.LinkStateRetransmitMult
	}
	if cfg.MembershipRetransmitMult > 0 {
		mc.MembershipRetransmitMult = cfg.MembershipRetransmitMult
	}
	// Metadata shaped like a real peer's (--encrypt=never: no WireGuard key),
	// so alive messages have their real size.
	mac := net.HardwareAddr{0x02, 0x57, 0x46, byte(cfg.Addr.As4()[1]), cfg.Addr.As4()[2], cfg.Addr.As4()[3]}
	mc.Metadata = mesh.Metadata{
		Name: cfg.Name, Underlay: cfg.Addr, Capabilities: []string{"direct", "vxlan"}, VTEPMAC: mac,
		RaftAddr: netip.AddrPortFrom(cfg.Addr, 6785), RaftMember: true, ClusterID: "sim", Version: "sim",
	}
	mc.AcceptPeer = func(local, remote mesh.Metadata) error { // as router/membership.go acceptPeer
		if local.ClusterID != "" && remote.ClusterID != "" && local.ClusterID != remote.ClusterID {
			return fmt.Errorf("peer %s belongs to another cluster", remote.Name)
		}
		return nil
	}
	if n.mesh, err = mesh.New(mc); err != nil {
		return n, err
	}
	if n.table != nil {
		ch := &mesh.LinkStateChannel{Table: n.table, Self: cfg.Name, Keys: n.mesh.PublicKey, Sender: n.mesh, OnChange: n.feed}
		if err = n.mesh.RegisterChannel(mesh.LinkStateChannelName, ch); err != nil {
			return n, err
		}
	}
	if err = n.mesh.Start(ctx); err != nil {
		return n, err
	}
	events, unsubscribe := n.mesh.Subscribe()
	n.loops.Add(1)
	go func() {
		defer n.loops.Done()
		defer unsubscribe()
		n.membershipLoop(ctx, events)
	}()
	if !cfg.MembershipOnly {
		pathEvents, unsubscribe := n.mesh.Subscribe()
		n.loops.Add(1)
		go func() {
			defer n.loops.Done()
			defer unsubscribe()
			n.pathLoop(ctx, pathEvents)
		}()
	}
	return n, nil
}

// startProber binds a probe socket on the peer's address, counted as kind.
func (n *node) startProber(ctx context.Context, port int, every, idleEvery time.Duration, kind string) (*mesh.Prober, error) {
	conn, err := net.ListenPacket("udp", netip.AddrPortFrom(n.cfg.Addr, uint16(port)).String())
	if err != nil {
		return nil, fmt.Errorf("probe socket: %w", err)
	}
	n.conns = append(n.conns, conn)
	p, err := mesh.NewProber(mesh.ProberConfig{
		Self: n.cfg.Name, Conn: &countingPacketConn{PacketConn: conn, c: n.cfg.Traffic, kind: kind},
		Interval: every, IdleInterval: idleEvery, Timeout: min(2*n.cfg.ProbeInterval, time.Second),
	})
	if err != nil {
		return nil, err
	}
	n.loops.Add(1)
	go func() {
		defer n.loops.Done()
		p.Run(ctx)
	}()
	return p, nil
}

// membershipLoop mirrors router runMembership's event handling: a join
// triggers a full state exchange with the joiner.
func (n *node) membershipLoop(ctx context.Context, events <-chan mesh.Event) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			if ev.Type == mesh.EventJoin && n.cfg.SyncOnJoin {
				n.syncs.Add(1)
				go func() {
					defer n.syncs.Done()
					n.mesh.Sync(ev.Peer.Name) // errors: push/pull repairs, as in the router
				}()
			}
		}
	}
}

// pathLoop mirrors router runDatapath: the member list is read again and
// the probe targets chosen again only after a mesh event, a relay change or
// a resync; every tick measures (updateLinks); the desired routes are
// handed to the (fake) datapath only when the relays changed, the member
// list changed, or at a resync.
func (n *node) pathLoop(ctx context.Context, events <-chan mesh.Event) {
	tick := time.NewTicker(n.cfg.PathInterval)
	defer tick.Stop()
	linkChanged := n.prober().Changed()
	var (
		peers                    []mesh.Peer
		peersDirty, targetsDirty = true, true
		lastSet                  time.Time
	)
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil
			}
			peersDirty = true
			continue
		case <-linkChanged:
		case <-tick.C:
		}
		now := time.Now()
		resync := now.Sub(lastSet) >= resyncEvery
		dirty := resync
		if peersDirty || resync {
			peers = n.mesh.Peers()
			peersDirty, targetsDirty, dirty = false, true, true
		}
		if targetsDirty {
			n.updatePeers(peers, now)
			targetsDirty = false
		}
		relaysChanged, choicesChanged, ok := n.updateLinks(ctx, now)
		if !ok {
			return
		}
		if relaysChanged {
			targetsDirty, dirty = true, true
		}
		// The router's datapath changes only with the relays; the recorder also counts
		// destinations without a working path, so any changed choice is recorded.
		dirty = dirty || choicesChanged
		if dirty {
			n.setRoutes()
			lastSet = now
		}
	}
}

// updatePeers mirrors router/paths.go updatePeers with --encrypt=never:
// bounded probe targets (relays and relayed destinations kept for
// mustLinger, relays and relayed destinations in use probed at the full
// rate), destinations for path choice. O(N log k).
func (n *node) updatePeers(peers []mesh.Peer, now time.Time) {
	under := map[string]netip.Addr{}
	live := map[string]struct{}{}
	names := make([]string, 0, len(peers))
	for _, pr := range peers {
		if !pr.Self && pr.Up() && pr.Meta.Underlay.IsValid() {
			under[pr.Name] = pr.Meta.Underlay
			live[pr.Name] = struct{}{}
			names = append(names, pr.Name)
		}
	}
	needed := make([]string, 0, 2*len(n.relays))
	active := make([]string, 0, len(n.relays))
	for dest, relay := range n.relays {
		needed = append(needed, dest, relay)
		active = append(active, dest, relay)
	}
	must := mesh.Lingering(needed, n.mustUntil, now, mustLinger)
	n.probeSet = mesh.ChooseProbeTargets(mesh.ProbeTargetInput{
		Self: n.cfg.Name, Live: names, Estimate: n.mesh.EstimateRTT, Measured: n.measuredRTT, Must: must,
		Current: n.probeSet, Now: now, Rand: n.rnd,
	}, mesh.ProbeTargetConfig{K: n.cfg.ProbeTargets})
	targets := map[string]netip.Addr{}
	for _, name := range n.probeSet.All() {
		if a, ok := under[name]; ok {
			targets[name] = a
		}
	}
	if !maps.Equal(targets, n.targets) {
		n.underlay.SetTargets(withPort(targets, n.cfg.ProbePort))
		if n.link != nil {
			n.link.SetTargets(withPort(targets, n.cfg.LinkProbePort))
		}
		for name := range n.targets {
			if _, ok := targets[name]; !ok {
				delete(n.added, name)
			}
		}
		for name := range targets {
			if _, ok := n.added[name]; !ok {
				n.added[name] = now
			}
		}
		n.targets = targets
	}
	if n.link != nil {
		n.link.SetActive(active) // the underlay's active links are the failing ones (updateLinks)
	} else {
		n.underlay.SetActive(active)
	}
	dests := make(map[string]pathsel.Dest, len(live))
	for name := range live {
		dests[name] = pathsel.Dest{Pending: n.pending(name, now)}
	}
	for name := range n.live {
		if _, ok := live[name]; !ok {
			n.feed(n.table.Remove(name))
			n.sel.RemovePeer(name)
		}
	}
	for name := range live {
		if _, ok := n.live[name]; !ok {
			n.table.Restore(name)
		}
	}
	n.live = live
	if !maps.Equal(dests, n.dests) {
		n.sel.SetDestinations(dests)
		n.dests = dests
	}
}

func (n *node) prober() *mesh.Prober {
	if n.link != nil {
		return n.link
	}
	return n.underlay
}

// pending mirrors router/paths.go pending.
func (n *node) pending(name string, now time.Time) bool {
	added, probed := n.added[name]
	if !probed || now.Sub(added) >= unknownGrace {
		return false
	}
	st, ok := n.prober().Stats(name)
	return !ok || !st.Settled
}

// updateLinks mirrors router/paths.go updateLinks without the Prometheus
// gauges: only changed link entries published, path choice re-evaluated
// only where something changed. It returns whether the relays and any
// choice changed, and ok false when ctx ended while waiting for the path
// slot. O(k) plus O(changed × D).
func (n *node) updateLinks(ctx context.Context, now time.Time) (relaysChanged, choicesChanged, ok bool) {
	var dests map[string]pathsel.Dest
	for name := range n.added {
		d, ok := n.dests[name]
		if !ok || !d.Pending || n.pending(name, now) {
			continue
		}
		if dests == nil {
			dests = maps.Clone(n.dests)
		}
		d.Pending = false
		dests[name] = d
	}
	measured := n.prober().All()
	links := make(map[string]mesh.LinkMetrics, len(measured))
	for name, st := range measured {
		if _, ok := n.targets[name]; !ok || !st.Settled && now.Sub(n.added[name]) < unknownGrace {
			continue
		}
		links[name] = mesh.LinkMetrics{RTT: st.RTT, Jitter: st.Jitter, Loss: st.Loss, Up: st.Up}
	}
	n.applyHeld(links, now)
	if n.link != nil {
		n.underlay.SetActive(mesh.FailingLinks(links)) // a no-op unless the set changed
	}
	msgs, _ := n.table.PublishLinks(n.cfg.Name, links)
	for _, msg := range msgs {
		n.mesh.Broadcast(mesh.LinkStateChannelName, msg) // too large: push/pull carries it, as in the router
	}
	n.feedOwn(links)

	select {
	case n.cfg.PathSlot <- struct{}{}:
	case <-ctx.Done():
		return false, false, false
	}
	start := time.Now()
	if dests != nil {
		n.sel.SetDestinations(dests)
		n.dests = dests
	}
	changes := n.sel.Select(now)
	choicesChanged = len(changes) > 0
	for name, c := range changes {
		if c.Switch != "" {
			n.cfg.Switches.Add(1)
		}
		was, relayed := n.relays[name]
		if len(c.Path) == 2 {
			n.relays[name] = c.Path[0]
			relaysChanged = relaysChanged || !relayed || was != c.Path[0]
		} else {
			delete(n.relays, name)
			relaysChanged = relaysChanged || relayed
		}
	}
	for name := range n.relays {
		if _, ok := n.dests[name]; !ok {
			delete(n.relays, name)
			relaysChanged = true
		}
	}
	n.cfg.Paths.add(time.Since(start))
	<-n.cfg.PathSlot
	return relaysChanged, choicesChanged, true
}

// setRoutes hands the desired routes to the fake datapath (router
// runDatapath's desiredState + applyRelays + applyLinks).
func (n *node) setRoutes() {
	routes := make(map[string]string, len(n.live))
	for name, c := range n.sel.Choices() {
		switch {
		case len(c.Path) == 0:
			routes[name] = "" // no working path
		case len(c.Path) == 1:
			routes[name] = name
		default:
			routes[name] = c.Path[0] // relay
		}
	}
	n.dp.Set(routes)
}

// feed applies others' link-state changes to path selection (router/paths.go feed).
func (n *node) feed(changes []mesh.LinkChange) {
	for _, c := range changes {
		if c.From == n.cfg.Name {
			continue
		}
		if !c.Removed && !c.Link.Up {
			n.noteDown(c.From, c.To)
		}
		if c.Removed {
			n.sel.RemoveLink(c.From, c.To)
			continue
		}
		n.sel.SetLink(c.From, c.To, pathsel.Link{RTT: c.Link.RTT, Jitter: c.Link.Jitter, Loss: c.Link.Loss, Up: c.Link.Up, Encrypted: c.Link.Encrypted})
	}
}

// noteDown records when this peer last merged from→to as down (a link that was
// down before a probe must not hide the probe's own publication).
func (n *node) noteDown(from, to string) {
	n.downMu.Lock()
	defer n.downMu.Unlock()
	if n.downs == nil {
		n.downs = map[[2]string]time.Time{}
	}
	n.downs[[2]string{from, to}] = time.Now()
}

// measuredRTT mirrors router/paths.go measuredRTT.
func (n *node) measuredRTT(peer string) (time.Duration, bool) {
	st, ok := n.prober().Stats(peer)
	if !ok {
		return 0, false
	}
	return st.SettledMinRTT()
}

// holdDown makes updateLinks publish the link to peer as down until until (zero: release).
func (n *node) holdDown(peer string, until time.Time) {
	n.heldMu.Lock()
	defer n.heldMu.Unlock()
	if n.held == nil {
		n.held = map[string]time.Time{}
	}
	if until.IsZero() {
		delete(n.held, peer)
		return
	}
	n.held[peer] = until
}

// applyHeld turns the links held down (holdDown) down in links. O(held).
func (n *node) applyHeld(links map[string]mesh.LinkMetrics, now time.Time) {
	n.heldMu.Lock()
	defer n.heldMu.Unlock()
	for peer, until := range n.held {
		if !now.Before(until) {
			delete(n.held, peer)
			continue
		}
		if m, ok := links[peer]; ok {
			m.Up = false
			links[peer] = m
		}
	}
}

// sawDown reports whether this peer merged from→to as down at or after since.
func (n *node) sawDown(from, to string, since time.Time) bool {
	n.downMu.Lock()
	defer n.downMu.Unlock()
	t, ok := n.downs[[2]string{from, to}]
	return ok && !t.Before(since)
}

// feedOwn gives path selection this peer's links when they moved (router/paths.go feedOwn).
func (n *node) feedOwn(links map[string]mesh.LinkMetrics) {
	for name, m := range links {
		if prev, ok := n.own[name]; ok && !ownMoved(prev, m) {
			continue
		}
		n.own[name] = m
		n.sel.SetLink(n.cfg.Name, name, pathsel.Link{RTT: m.RTT, Jitter: m.Jitter, Loss: m.Loss, Up: m.Up, Encrypted: m.Encrypted})
	}
	for name := range n.own {
		if _, ok := links[name]; !ok {
			delete(n.own, name)
			n.sel.RemoveLink(n.cfg.Name, name)
		}
	}
}

// meshEstimator gives path selection the mesh's Vivaldi estimates.
type meshEstimator node

func (e *meshEstimator) EstimateRTT(a, b string) (time.Duration, bool) {
	if e.mesh == nil {
		return 0, false
	}
	return e.mesh.EstimateRTTBetween(a, b)
}

func withPort(addrs map[string]netip.Addr, port int) map[string]netip.AddrPort {
	out := make(map[string]netip.AddrPort, len(addrs))
	for name, a := range addrs {
		out[name] = netip.AddrPortFrom(a, uint16(port))
	}
	return out
}

// aliveSeen counts the peers this one sees alive, itself included. O(N).
func (n *node) aliveSeen() int {
	c := 0
	for _, p := range n.mesh.Peers() {
		if p.State == mesh.StateAlive {
			c++
		}
	}
	return c
}

// close stops the loops and probers, then the mesh, then the sockets. Safe
// on a partly started node.
func (n *node) close() {
	n.cancel()
	n.loops.Wait()
	if n.mesh != nil {
		n.mesh.Close()
	}
	n.syncs.Wait()
	for _, c := range n.conns {
		c.Close()
	}
}

// recorder is the fake datapath: like a declarative driver it takes the
// whole desired state, here the next hop per destination peer (the
// destination itself: direct; another peer: relay; "": no path).
type recorder struct {
	mu     sync.Mutex // guards routes
	routes map[string]string
}

func newRecorder() *recorder { return &recorder{routes: map[string]string{}} }

func (r *recorder) Set(routes map[string]string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.routes = routes
}

// withPath counts destinations with a path, and those relayed.
func (r *recorder) withPath() (paths, relayed int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for dest, hop := range r.routes {
		if hop != "" {
			paths++
			if hop != dest {
				relayed++
			}
		}
	}
	return paths, relayed
}
