package router

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/direct"
	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/datapath/vxlan"
	"github.com/weftnet/weft/datapath/wireguard"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

const (
	// peerDownGrace is how long a dead or departed peer keeps its routes. A stopped peer
	// leaves its kernel datapath in place (see runDatapath), so its containers stay
	// reachable through the routes the others keep: the grace must outlast a restart —
	// stop, start, rejoin (within a second or two through the member snapshot) — and weft
	// stops a peer with SIGTERM, which the others see as a leave, for restarts too. Keeping
	// a dead host's routes a little longer costs nothing (its containers are unreachable
	// either way; its blocks stay its own until `weft rmpeer`), while withdrawing them
	// during a restart cuts traffic that still works. 20 s covers a restart with 10 s or
	// more to spare, and a departed peer's routes still go within half a minute.
	peerDownGrace = 20 * time.Second
	// keepAppliedFor bounds the start-up phase in which the datapath only adds (see
	// runDatapath) when the peer cannot rejoin anyone: the routes it applied last stay that
	// long (they are what the containers were using; without the mesh nothing better is
	// known), then it converges to what it knows.
	keepAppliedFor = 10 * time.Minute
	// reapplyEvery re-sends the whole desired state to the drivers so that routes someone
	// deleted by hand come back.
	reapplyEvery = 30 * time.Second
	// datapathTick is how often runDatapath takes the probers' figures without being woken:
	// a link going up or down wakes it at once (mesh.Prober.Changed), so the tick only
	// paces RTT and loss moves, which path choice acts on after holds of seconds anyway.
	datapathTick = time.Second
	// linkExportEvery paces the per-link gauges (weft_link_rtt_seconds and the others): set
	// every tick they were a sixth of the loop's CPU, for scrapes that come every 15 s or
	// more. A link going up or down sets them at once (linkExportDue).
	linkExportEvery = 5 * time.Second
)

// linkExportDue says whether a datapath round sets the link gauges: when a probed link went
// up, down or settled (linkEvent), and otherwise every linkExportEvery.
func linkExportDue(now, last time.Time, linkEvent bool) bool {
	return linkEvent || now.Sub(last) >= linkExportEvery
}

// links is the datapath side of the peer: the link drivers and what was last applied.
type links struct {
	pol linkPolicy
	// drivers by plan.DriverKey: one per mode, plus a VXLAN driver per network other than
	// the default one (its own device and VNI), made and removed as networks come and go
	// (syncNetworkDevices). Touched only by runDatapath's goroutine after start.
	drivers map[string]datapath.Driver
	vtepMAC net.HardwareAddr
	wg      *wireguard.Driver // nil with --encrypt=never
	// newVXLAN makes the VXLAN driver of a network's VNI, configured as the default one.
	newVXLAN func(vni uint32) (*vxlan.Driver, error)
	vnis     map[string]uint32 // network → VNI of the per-network driver that exists
	// policyLogged: networks whose --encrypt never or unknown policy was logged (once each).
	policyLogged map[string]string
	badPolicy    prometheus.Counter

	mu         sync.Mutex // guards conns and probeModes
	conns      []Connection
	probeModes map[string]string // peer → mode of the link its probes (and status routes' Link) use

	kick chan struct{} // asks runDatapath to recompute the desired state (poke)
}

// poke asks the datapath loop to recompute the desired state at its next tick (a change
// no mesh event reports, such as this peer's own key). Never blocks.
func (l *links) poke() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// startDatapath creates the link drivers and brings them up. It runs before the mesh starts
// so that the VXLAN MAC and the capabilities are in the first gossip.
func (p *Peer) startDatapath(ctx context.Context, advertise netip.Addr) error {
	prefix, dev, err := datapath.UnderlayPrefix(advertise)
	if err != nil {
		return fmt.Errorf("underlay %s: %w", advertise, err)
	}
	log := p.log.With("component", "datapath")
	linkProbes := p.cfg.LinkProbePort != 0
	if linkProbes {
		family := netlink.FAMILY_V4
		if advertise.Is6() {
			family = netlink.FAMILY_V6
		}
		if err := datapath.EnsureProbeRule(family, p.cfg.LinkProbePort); err != nil {
			return err
		}
	}
	dm := datapath.NewMetrics(p.reg)
	vxCfg := vxlan.Config{Underlay: advertise, UnderlayDev: dev, LinkProbes: linkProbes, Logger: log, Metrics: dm}
	vx, err := vxlan.New(vxCfg)
	if err != nil {
		return err
	}
	l := &links{drivers: map[string]datapath.Driver{datapath.ModeVXLAN: vx}, vtepMAC: vx.MAC(), kick: make(chan struct{}, 1),
		vnis: map[string]uint32{}, policyLogged: map[string]string{},
		newVXLAN: func(vni uint32) (*vxlan.Driver, error) {
			cfg := vxCfg
			cfg.VNI, cfg.Name = vni, vxlan.DeviceName(vni)
			return vxlan.New(cfg)
		},
		badPolicy: prometheus.NewCounter(prometheus.CounterOpts{Name: "weft_datapath_network_policy_rejected_total",
			Help: "Networks with an unknown encryption policy in the Raft state, counted once per network and value; none of their traffic is routed."}),
	}
	p.reg.MustRegister(l.badPolicy)
	l.pol = linkPolicy{UnderlayPrefix: prefix, NoDirect: p.cfg.NoDirect, Modes: []string{datapath.ModeVXLAN}}
	if !p.cfg.NoDirect {
		dr, err := direct.New(direct.Config{Underlay: advertise, UnderlayDev: dev, Logger: log, Metrics: dm})
		if err != nil {
			return err
		}
		l.drivers[datapath.ModeDirect] = dr
		l.pol.Modes = append([]string{datapath.ModeDirect}, l.pol.Modes...)
	}
	l.pol.Encrypt, l.pol.Trusted = p.cfg.encrypts(), p.cfg.TrustedSubnets
	if p.cfg.Encrypt != "never" {
		wg, err := wireguard.New(wireguard.Config{Metrics: dm,
			PeerName: p.cfg.Name, KeyFile: filepath.Join(p.cfg.DataDir, "wireguard.key"),
			Port: p.cfg.WireGuardPort, Underlay: advertise, LinkProbes: linkProbes, Logger: log,
		})
		if err != nil {
			return err
		}
		l.wg = wg
		l.drivers[datapath.ModeWireGuard] = wg
		l.pol.Modes = append(l.pol.Modes, datapath.ModeWireGuard)
	}
	for mode, d := range l.drivers {
		if err := d.Up(ctx); err != nil {
			return fmt.Errorf("datapath %s: %w", mode, err)
		}
	}
	if err := datapath.EnableRelaying(dev); err != nil {
		return err
	}
	// Containers see the whole range on-link; the bridge answers ARP for remote ones.
	for _, n := range p.alloc.Networks() {
		if n.Mode == ipam.ModeSRIOV {
			continue // no bridge
		}
		if err := datapath.EnableProxyARP(bridgeName(n.Name)); err != nil {
			return err
		}
	}
	p.links = l
	registerRangeMetrics(p.reg, p.connections)
	return nil
}

// stopDatapath leaves the kernel datapath in place (see runDatapath), except a userspace
// WireGuard device: it lives in this process and cannot outlive it, so it is closed cleanly.
func (p *Peer) stopDatapath() {
	if p.links == nil || p.links.wg == nil || p.links.wg.Kernel() {
		return
	}
	if err := p.links.wg.Close(); err != nil {
		p.log.Warn("closing the WireGuard device", "err", err)
	}
}

// runDatapath keeps the kernel's routes to remote peers in step with the mesh and the block
// table until ctx ends. Drivers are not closed on the way out: a stopped peer leaves the
// datapath in place, so containers keep talking while it restarts.
//
// Right after a start the mesh and the Raft log have not caught up; removing routes then
// would cut traffic the peer simply has not heard about yet. So it first reinstalls what
// it applied last time (kept in the database), and until it has rejoined the cluster (see
// startup) it only adds; after that it converges exactly. A peer that cannot reach anyone
// keeps its last routes for keepAppliedFor.
//
// The desired state is recomputed only when an input changed: the membership (mesh events,
// which carry metadata and key changes), the block table, the relays chosen, this peer's key
// (links.kick), or the end of a dead peer's peerDownGrace — coalesced into the next tick —
// and every reapplyEvery as a safety resync that re-applies idempotently. A probed link going
// up or down runs a round at once (the probers' Changed). Each round otherwise
// costs O(k) for k probe targets (updateLinks) plus reading the block table, O(blocks); the
// O(N) work (member list, probe-target choice, plan) runs only on a change.
func (p *Peer) runDatapath(ctx context.Context) {
	l := p.links
	events, cancel := p.mesh.Subscribe()
	defer cancel()
	applied, err := loadApplied(p.db)
	if err != nil {
		p.log.Warn("last datapath state unreadable; starting from scratch", "err", err)
	}
	// Until the peer has rejoined, a network it does not list yet may just not have reached
	// it: its device stays (pruned is false) with what it forwards.
	devicesOK, _ := p.syncNetworkDevices(ctx, p.cluster.Networks(), false)
	devicesPruned := false // the last device sync removed what the network list lacks
	newDevice := false     // a device was made since the last apply: apply even if unchanged
	p.applyLinks(applied)
	lastApply := time.Now()
	st := startup{start: lastApply}
	live := false
	tick := time.NewTicker(datapathTick)
	defer tick.Stop()
	linkChanged := p.paths.measured().Changed()
	recomputes := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_datapath_recomputes_total",
		Help: "Times the desired datapath state was computed, by what changed (peers, relays, blocks, networks, grace, key, resync, startup)."}, []string{"reason"})
	p.reg.MustRegister(recomputes)
	var (
		why         string // what made the desired state dirty first, for recomputes
		peers       []mesh.Peer
		blocks      []ipam.BlockOwnership // the table the desired state was computed from
		peersDirty  = true                // the member list must be read again
		targetDirty = true                // probe targets and destinations must be chosen again
		dirty       = true                // the desired state must be computed again
		graceEnds   time.Time             // a dead peer's routes go then (zero: none pending)
		networks    []ipam.Network        // the definitions DNS was last told of
		linkEvent   bool                  // this round was woken by a link going up or down
		lastExport  time.Time             // when the link gauges were last set
	)
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil // the mesh is closing; ctx ends next
			}
			peersDirty = true
			continue
		case <-l.kick:
			dirty, why = true, cmp.Or(why, "key")
			continue
		case <-linkChanged:
			linkEvent = true
		case <-tick.C:
		}
		now := time.Now()
		resync := now.Sub(lastApply) >= reapplyEvery
		switch {
		case resync:
			why = "resync"
		case !live:
			why = "startup"
		case peersDirty:
			why = cmp.Or(why, "peers")
		}
		if peersDirty || resync || !live {
			peers = p.mesh.Peers()
			peersDirty, targetDirty, dirty = false, true, true
		}
		if targetDirty || resync {
			p.updatePeers(peers, now)
			targetDirty = false
		}
		export := linkExportDue(now, lastExport, linkEvent)
		if export {
			lastExport = now
		}
		linkEvent = false
		relays, relaysChanged := p.updateLinks(now, export)
		if relaysChanged {
			targetDirty, dirty, why = true, true, cmp.Or(why, "relays") // relays are probed at the full rate
		}
		cst := p.cluster.Status()
		p.syncFilters(live) // the networks' guard and isolation (router/isolate.go); errors are logged there
		// O(networks):
		if nets := p.cluster.Networks(); !slices.Equal(nets, networks) {
			networks = nets
			p.paths.syncClasses(p.log, nets) // a selector per SLA class in use (slaclass.go)
			p.dnsNetworksChanged()
			p.sriov.networksChanged() // PFs of new SR-IOV networks are scanned now
			l.notePolicies(p.log, nets)
			devicesOK = false
			dirty, why = true, cmp.Or(why, "networks")
		}
		// A network came or went, making its device failed last time, or the peer has just
		// rejoined (so devices of networks it does not list can go).
		if !devicesOK || devicesPruned != live {
			var made bool
			devicesOK, made = p.syncNetworkDevices(ctx, networks, live)
			devicesPruned = live
			if made {
				newDevice, dirty, why = true, true, cmp.Or(why, "networks")
			}
		}
		if !slices.EqualFunc(cst.Blocks, blocks, sameBlock) {
			blocks, dirty, why = cst.Blocks, true, cmp.Or(why, "blocks")
		}
		if !graceEnds.IsZero() && !now.Before(graceEnds) {
			dirty, why = true, cmp.Or(why, "grace")
		}
		if !dirty {
			continue
		}
		recomputes.WithLabelValues(why).Inc()
		dirty, why = false, ""
		want, conns := desiredState(p.cfg.Name, l.pol, peers, remoteBlocks(blocks), planNetworks(networks), now, peerDownGrace, uint16(p.cfg.WireGuardPort))
		want, conns = applyRelays(want, conns, relays, p.paths.netRelays())
		graceEnds = nextGraceEnd(peers, now, peerDownGrace)
		probeModes := probeModes(want)
		l.mu.Lock()
		l.conns, l.probeModes = conns, probeModes
		l.mu.Unlock()
		if !live {
			live = st.over(now, peers, cst.Leader != "", p.cfg.SettleTime)
			switch {
			case !live:
				want = unionPeers(applied, want)
			case st.joined.IsZero():
				p.log.Warn("rejoined no peer since the start; converging the datapath to what this peer knows",
					"after", now.Sub(st.start).Round(time.Second))
			default:
				p.log.Info("rejoined the cluster; the datapath converges exactly from now on",
					"after", now.Sub(st.start).Round(time.Millisecond))
			}
		}
		if sameDesired(want, applied) && !resync && !newDevice {
			continue
		}
		newDevice = false
		p.applyLinks(want)
		applied, lastApply = want, now
		if err := saveApplied(p.db, want); err != nil {
			p.log.Warn("could not save the datapath state", "err", err)
		}
	}
}

// sameBlock compares what the datapath uses of a block table row.
func sameBlock(a, b ipam.BlockOwnership) bool { return a.CIDR == b.CIDR && a.Owner == b.Owner }

// nextGraceEnd is the earliest time after now at which a peer that is not up loses its
// routes (plan.Links keeps them for downGrace after it went down), zero when none will: the
// desired state changes then without any event. O(N).
func nextGraceEnd(peers []mesh.Peer, now time.Time, downGrace time.Duration) time.Time {
	var next time.Time
	for _, pr := range peers {
		if pr.Self || pr.Up() {
			continue
		}
		if end := pr.Since.Add(downGrace); end.After(now) && (next.IsZero() || end.Before(next)) {
			next = end
		}
	}
	return next
}

// startup decides when runDatapath's start-up phase, in which it only adds, is over: once
// the peer has rejoined — another peer is alive in the mesh (a join brings the whole
// member list at once) and a Raft leader is known (so the block table has caught up) —
// and that has held for settle, the time the others' metadata and link state take to
// arrive; or, if it never rejoins, keepAppliedFor after the start. A timer alone is not
// enough: a restarted peer that has not found the others yet sees none of them, and would
// withdraw every route.
type startup struct {
	start  time.Time
	joined time.Time // since when the peer has been rejoined; zero while it is not
}

// over is called once per reconcile round; O(N) in peers.
func (s *startup) over(now time.Time, peers []mesh.Peer, leader bool, settle time.Duration) bool {
	if !leader || !anyOtherUp(peers) {
		s.joined = time.Time{}
		return now.Sub(s.start) >= keepAppliedFor
	}
	if s.joined.IsZero() {
		s.joined = now
	}
	return now.Sub(s.joined) >= settle
}

// anyOtherUp says whether a peer other than this one is alive or suspect.
func anyOtherUp(peers []mesh.Peer) bool {
	for _, pr := range peers {
		if !pr.Self && pr.Up() {
			return true
		}
	}
	return false
}

// syncNetworkDevices makes the VXLAN device of every network other than the default one
// (its VNI from plan.VNIs over the cluster's network list, the same on every peer), keeps
// those that exist with the right VNI, and with prune removes the devices of networks gone
// (or whose VNI moved) — also devices left behind by an earlier run (vxlan.RemoveStale).
// It says whether every device is right (runDatapath retries on its next round when not)
// and whether it made one (whose peers must then be set). O(M log M) for M networks.
func (p *Peer) syncNetworkDevices(ctx context.Context, nets []ipam.Network, prune bool) (ok, made bool) {
	l := p.links
	names := make([]string, 0, len(nets))
	for _, n := range nets {
		if n.Mode != ipam.ModeSRIOV { // no VXLAN device: the physical network carries it
			names = append(names, n.Name)
		}
	}
	vnis := plan.VNIs(names)
	ok = true
	for name, vni := range l.vnis {
		if want, still := vnis[name]; !prune || (still && want == vni) {
			continue
		}
		key := plan.DriverKey(datapath.ModeVXLAN, name)
		if err := l.drivers[key].Close(); err != nil {
			p.log.Warn("removing a network's VXLAN device", "network", name, "vni", vni, "err", err)
			ok = false
			continue
		}
		delete(l.drivers, key)
		delete(l.vnis, name)
		p.log.Info("removed the VXLAN device of a network", "network", name, "vni", vni)
	}
	keep := []string{vxlan.DefaultName}
	for _, name := range slices.Sorted(maps.Keys(vnis)) {
		vni := vnis[name]
		if name == plan.DefaultNetwork {
			continue
		}
		keep = append(keep, vxlan.DeviceName(vni))
		if _, exists := l.vnis[name]; exists {
			continue // right, or its VNI moved and the old device stays until pruning
		}
		d, err := l.newVXLAN(vni)
		if err == nil {
			err = d.Up(ctx)
		}
		if err != nil {
			p.log.Warn("making a network's VXLAN device; will retry", "network", name, "vni", vni, "err", err)
			ok = false
			continue
		}
		l.drivers[plan.DriverKey(datapath.ModeVXLAN, name)] = d
		l.vnis[name] = vni
		made = true
		p.log.Info("VXLAN device of a network up", "network", name, "vni", vni, "dev", d.Name())
	}
	if ok && prune {
		if err := vxlan.RemoveStale(keep, p.log); err != nil {
			p.log.Warn("removing VXLAN devices of gone networks", "err", err)
			ok = false
		}
	}
	return ok, made
}

// notePolicies logs, once per network and policy, a network that is --encrypt never (an
// operator's choice that overrides the hosts' encryption: a warning) and counts and logs a
// policy the plan does not know (a bad Raft entry: nothing of that network is routed).
// O(M) for M networks.
func (l *links) notePolicies(log *slog.Logger, nets []ipam.Network) {
	for _, n := range nets {
		if l.policyLogged[n.Name] == n.Encrypt {
			continue
		}
		switch n.Encrypt {
		case "", plan.EncryptAuto, plan.EncryptAlways:
		case plan.EncryptNever:
			log.Warn("network is --encrypt never: its traffic between hosts is plaintext even where the hosts' policy would encrypt it",
				"network", n.Name, "this_host_encrypts", l.pol.Encrypt)
		default:
			l.badPolicy.Inc()
			log.Error("network has an unknown encryption policy; none of its traffic is routed", "network", n.Name, "encrypt", n.Encrypt)
		}
		l.policyLogged[n.Name] = n.Encrypt
	}
}

// probeModes maps every peer to the mode of the driver that carries its link probes (the
// entry without NoProbe). O(entries).
func probeModes(want map[string][]datapath.RemotePeer) map[string]string {
	out := map[string]string{}
	for key, list := range want {
		mode, _, _ := strings.Cut(key, "/")
		for _, rp := range list {
			if !rp.NoProbe {
				out[rp.Name] = mode
			}
		}
	}
	return out
}

// applyLinks hands every driver its peers (none for a driver without any).
func (p *Peer) applyLinks(want map[string][]datapath.RemotePeer) {
	for mode, d := range p.links.drivers {
		if err := d.Set(want[mode]); err != nil {
			p.log.Warn("datapath not fully converged; will retry", "mode", mode, "err", err)
		}
	}
}

// remoteBlocks groups the Raft block table by owner. O(blocks).
func remoteBlocks(rows []ipam.BlockOwnership) map[string][]netip.Prefix {
	out := map[string][]netip.Prefix{}
	for _, row := range rows {
		out[row.Owner] = append(out[row.Owner], row.CIDR)
	}
	return out
}

// unionPeers is b (the state wanted now) plus what a (applied before) routes and b does
// not: a's entries missing from b, and a's blocks that b routes nowhere. It is the
// start-up phase's "only add": right after a restart the mesh knows a peer before the Raft
// log has caught up with its blocks, and b then has the peer without them. An entry is a
// (driver key, peer) pair — a peer has one per driver that carries one of its networks —
// and a's blocks go back to the same entry of b when b has it; else, when b has the peer
// under another driver (its link mode changed), to b's entry that carries the peer's probes
// (its pair link), so b wins on the mode — except that blocks never leave WireGuard or a
// network's own VXLAN device, nor join them (a network's encryption and VNI hold during
// start-up too): those stay in a's entry, kept as it was, without probes. b wins where both
// speak (mode, addresses, keys, a block b routes to another peer). O(blocks) in both.
func unionPeers(a, b map[string][]datapath.RemotePeer) map[string][]datapath.RemotePeer {
	type entry struct{ key, name string }
	inB := map[entry]bool{}
	carrier := map[string]string{} // peer → key of b's entry that carries its probes
	routed := map[netip.Prefix]bool{}
	for key, list := range b {
		for _, rp := range list {
			inB[entry{key, rp.Name}] = true
			if _, ok := carrier[rp.Name]; !ok || !rp.NoProbe {
				carrier[rp.Name] = key
			}
			for _, blk := range rp.Blocks {
				routed[blk] = true
			}
		}
	}
	movable := func(key string) bool { return key == datapath.ModeDirect || key == datapath.ModeVXLAN }
	extra := map[entry][]netip.Prefix{} // entry → a's blocks that b routes nowhere
	for key, list := range a {
		for _, rp := range list {
			to := entry{key, rp.Name}
			if c, ok := carrier[rp.Name]; ok && !inB[to] && movable(key) && movable(c) {
				to.key = c
			}
			for _, blk := range rp.Blocks {
				if !routed[blk] {
					extra[to] = append(extra[to], blk)
					routed[blk] = true
				}
			}
		}
	}
	out := map[string][]datapath.RemotePeer{}
	for key, list := range b {
		for _, rp := range list {
			if more := extra[entry{key, rp.Name}]; len(more) > 0 {
				rp.Blocks = append(slices.Clone(rp.Blocks), more...)
			}
			out[key] = append(out[key], rp)
		}
	}
	for key, list := range a {
		for _, rp := range list {
			e := entry{key, rp.Name}
			_, known := carrier[rp.Name]
			if inB[e] || (known && len(extra[e]) == 0) {
				continue // in b already, or a peer b has elsewhere with nothing left here
			}
			rp.Blocks = extra[e]
			rp.NoProbe = rp.NoProbe || known
			out[key] = append(out[key], rp)
		}
	}
	return out
}

// sameDesired compares two desired states field by field. O(peers + blocks).
func sameDesired(a, b map[string][]datapath.RemotePeer) bool {
	return maps.EqualFunc(a, b, func(x, y []datapath.RemotePeer) bool {
		return slices.EqualFunc(x, y, sameRemotePeer)
	})
}

func sameRemotePeer(a, b datapath.RemotePeer) bool {
	return a.Name == b.Name && a.Underlay == b.Underlay && bytes.Equal(a.VTEPMAC, b.VTEPMAC) && a.NoProbe == b.NoProbe &&
		a.WireGuardKey == b.WireGuardKey && a.WireGuardPort == b.WireGuardPort && slices.Equal(a.Blocks, b.Blocks)
}

// rotateKey makes a new WireGuard key and announces its public half; peers switch as the
// gossip reaches them, and WireGuard re-handshakes without resetting flows.
func (p *Peer) rotateKey() (string, error) {
	if p.links.wg == nil {
		return "", newAPIError(http.StatusConflict, types.ErrInvalidNetworkConfig, "rotate-key: WireGuard is off (--encrypt=never)")
	}
	pub, err := p.links.wg.RotateKey()
	if err != nil {
		return "", err
	}
	if err := p.mesh.UpdateMetadata(func(md *mesh.Metadata) { md.WireGuardKey = pub }); err != nil {
		return "", err
	}
	p.links.poke()
	p.log.Info("rotated the WireGuard key")
	return base64.StdEncoding.EncodeToString(pub[:]), nil
}

func (p *Peer) connections() []Connection {
	p.links.mu.Lock()
	defer p.links.mu.Unlock()
	return append([]Connection{}, p.links.conns...)
}

// linkModes is, per peer, the mode of the link its probes measure (status routes' Link).
func (p *Peer) linkModes() map[string]string {
	p.links.mu.Lock()
	defer p.links.mu.Unlock()
	return maps.Clone(p.links.probeModes)
}
