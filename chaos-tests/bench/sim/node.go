package main

// One simulated peer: how it builds its mesh, probers, link state and path
// choice, fed to a recording fake datapath. This file is the only one that
// knows weft's per-peer wiring; it mirrors router/membership.go startMesh
// and runMembership (join events) and router/paths.go startPaths and
// updatePaths, minus the kernel, Raft, DNS and metrics. Swap components
// here when the router's wiring changes.

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/weftnet/weft/mesh"
)

// unknownGrace mirrors router/paths.go: how long a new probe target that has
// not answered counts as unknown rather than down.
const unknownGrace = 10 * time.Second

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
	// default, min(2 × interval, 1s).
	ProbeInterval time.Duration
	// PathInterval is the router's datapath loop period (reconcileInterval).
	PathInterval time.Duration
	// PathSlot is shared by all nodes: one path computation at a time, so a
	// super-linear path cost shows as time per run and fewer runs per
	// second instead of starving every peer's gossip goroutines.
	PathSlot chan struct{}
	// Paths records each path computation's duration.
	Paths *durations
	// Traffic counts what this peer sends.
	Traffic *counter
}

// node is one running simulated peer.
type node struct {
	cfg  nodeConfig
	mesh *mesh.Mesh
	dp   *recorder

	// Path state, owned by the path loop goroutine (as router.paths is
	// owned by the datapath loop).
	underlay, link *mesh.Prober
	table          *mesh.LinkTable
	sel            *mesh.PathSelector
	sla            mesh.SLA
	targets        map[string]netip.Addr
	added          map[string]time.Time

	cancel context.CancelFunc
	loops  sync.WaitGroup // membership and path loops, probers
	syncs  sync.WaitGroup // mesh.Sync calls in flight
	conns  []net.PacketConn
}

// startNode starts one peer; on error everything it started is closed.
func startNode(ctx context.Context, cfg nodeConfig) (n *node, err error) {
	ctx, cancel := context.WithCancel(ctx)
	n = &node{cfg: cfg, dp: newRecorder(), cancel: cancel, sla: mesh.DefaultSLA(),
		targets: map[string]netip.Addr{}, added: map[string]time.Time{}}
	defer func() {
		if err != nil {
			n.close()
			n = nil
		}
	}()
	if !cfg.MembershipOnly {
		n.table = mesh.NewLinkTable(mesh.LinkTableConfig{})
		if n.sel, err = mesh.NewPathSelector(mesh.DefaultPathSelectorConfig()); err != nil {
			return n, err
		}
		if n.underlay, err = n.startProber(ctx, cfg.ProbePort, kindProbeUnderlay); err != nil {
			return n, err
		}
		if cfg.LinkProbePort != 0 {
			if n.link, err = n.startProber(ctx, cfg.LinkProbePort, kindProbeLink); err != nil {
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
	mc.WrapTransport = wrapTransport(cfg.Traffic)
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
		if err = n.mesh.RegisterChannel(mesh.LinkStateChannelName, &mesh.LinkStateChannel{Table: n.table}); err != nil {
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
		n.loops.Add(1)
		go func() {
			defer n.loops.Done()
			n.pathLoop(ctx)
		}()
	}
	return n, nil
}

// startProber binds a probe socket on the peer's address, counted as kind.
func (n *node) startProber(ctx context.Context, port int, kind string) (*mesh.Prober, error) {
	conn, err := net.ListenPacket("udp", netip.AddrPortFrom(n.cfg.Addr, uint16(port)).String())
	if err != nil {
		return nil, fmt.Errorf("probe socket: %w", err)
	}
	n.conns = append(n.conns, conn)
	p, err := mesh.NewProber(mesh.ProberConfig{
		Self: n.cfg.Name, Conn: &countingPacketConn{PacketConn: conn, c: n.cfg.Traffic, kind: kind},
		Interval: n.cfg.ProbeInterval, Timeout: min(2*n.cfg.ProbeInterval, time.Second),
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

// pathLoop mirrors router runDatapath's tick: update paths, then hand the
// desired routes to the (fake) datapath.
func (n *node) pathLoop(ctx context.Context) {
	tick := time.NewTicker(n.cfg.PathInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if !n.updatePaths(ctx, n.mesh.Peers(), time.Now()) {
			return
		}
	}
}

// updatePaths mirrors router/paths.go updatePaths with --encrypt=never (no
// link is encrypted) and without the Prometheus gauges. It returns false
// when ctx ended while waiting for the path slot.
//
// Cost per run, today's components: probe targets O(N), link publish O(N),
// graph copy O(N²), path choice O(N) destinations × O(N) relays with a
// sort of each relay's neighbours: O(N³ log N).
func (n *node) updatePaths(ctx context.Context, peers []mesh.Peer, now time.Time) bool {
	targets := map[string]netip.Addr{}
	for _, pr := range peers {
		if !pr.Self && (pr.State == mesh.StateAlive || pr.State == mesh.StateSuspect) && pr.Meta.Underlay.IsValid() {
			targets[pr.Name] = pr.Meta.Underlay
		}
	}
	if !maps.Equal(targets, n.targets) {
		n.underlay.SetTargets(withPort(targets, n.cfg.ProbePort))
		if n.link != nil {
			n.link.SetTargets(withPort(targets, n.cfg.LinkProbePort))
		}
		for name := range n.targets {
			if _, ok := targets[name]; !ok {
				n.table.Remove(name)
				n.sel.Forget(name)
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
	prober := n.underlay
	if n.link != nil {
		prober = n.link
	}
	measured := prober.All()
	links := make(map[string]mesh.LinkMetrics, len(measured))
	for name, st := range measured {
		if st.Samples == 0 && now.Sub(n.added[name]) < unknownGrace {
			continue
		}
		links[name] = mesh.LinkMetrics{RTT: st.RTT, Jitter: st.Jitter, Loss: st.Loss, Up: st.Up}
	}
	if delta, changed := n.table.PublishLinks(n.cfg.Name, links); changed && delta != nil {
		n.mesh.Broadcast(mesh.LinkStateChannelName, delta) // too large: push/pull carries it, as in the router
	}

	select {
	case n.cfg.PathSlot <- struct{}{}:
	case <-ctx.Done():
		return false
	}
	start := time.Now()
	graph := n.table.Graph().Symmetric()
	_ = graph.Encrypted() // the router builds it every run, used for encrypted pairs
	routes := make(map[string]string, len(targets))
	for name := range targets {
		if st, ok := measured[name]; (!ok || st.Samples == 0) && now.Sub(n.added[name]) < unknownGrace {
			n.sel.Forget(name)
			routes[name] = name // not measured yet: direct
			continue
		}
		c := n.sel.Select(graph, n.cfg.Name, name, n.sla, now)
		switch len(c.Path) {
		case 0:
			routes[name] = "" // no working path
		case 1:
			routes[name] = name
		default:
			routes[name] = c.Path[0] // relay
		}
	}
	n.cfg.Paths.add(time.Since(start))
	<-n.cfg.PathSlot
	n.dp.Set(routes)
	return true
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
