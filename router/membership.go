package router

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// The membership loop is event-driven, as the datapath loop is: a round reads the member
// list and reconciles Raft (O(N)), so it runs only when something it reads changed. Between
// rounds a tick does the O(blocks) work whose inputs have no event of their own.
const (
	// membershipTick paces the light work (usage, table fetch, ownership, own metadata)
	// and the rounds that must poll (bootstrap settling, the Raft leader's timed duties).
	membershipTick = time.Second
	// membershipCoalesce gathers a burst of mesh events (a join brings several) into one
	// round; short, so Raft learns of a joiner as quickly as before.
	membershipCoalesce = 100 * time.Millisecond
	// membershipResync runs a round with no event at all, should one have been missed.
	membershipResync = 15 * time.Second
)

// startMesh joins the gossip mesh, advertising this peer's Raft address.
func (p *Peer) startMesh(ctx context.Context, advertise netip.Addr) (*mesh.Mesh, error) {
	cfg := mesh.DefaultConfig()
	cfg.Name = p.cfg.Name
	// Gossip listens on the advertise address only, not 0.0.0.0 (#12): containers and
	// other networks of this host do not reach it.
	cfg.BindAddr = advertise
	cfg.BindPort = p.cfg.MeshPort
	cfg.AdvertiseAddr = advertise
	cfg.Seeds = p.cfg.Seeds
	cfg.Password = p.cfg.ClusterKey // mesh derives its own gossip key from it (GossipKey)
	cfg.Logger = p.log.With("component", "mesh")
	cfg.Registerer = p.reg
	cfg.WrapTransport = mesh.StreamLimiter(mesh.StreamLimits{Logger: cfg.Logger, Registry: p.reg}) // per-source stream limits
	cfg.Metadata = mesh.Metadata{
		Name:           p.cfg.Name,
		Underlay:       advertise,
		Capabilities:   p.links.pol.Modes,
		VTEPMAC:        p.links.vtepMAC,
		Encrypt:        p.links.pol.Encrypt,
		TrustedSubnets: p.cfg.TrustedSubnets,
		RaftAddr:       netip.AddrPortFrom(advertise, uint16(p.raftPort())),
		RaftMember:     p.cluster.InCluster(),
		Version:        strings.Map(printableOnly, p.cfg.Version),
	}
	cfg.Metadata.ClusterID = p.cluster.ClusterID()
	if p.links.wg != nil {
		cfg.Metadata.WireGuardKey = p.links.wg.PublicKey()
	}
	cfg.AcceptPeer = acceptPeer
	// The peer's ed25519 identity signs what it owns in gossip; the key first seen for
	// each name is pinned in the data dir (cleared by `weft rmpeer`).
	cfg.Identity = p.identity
	cfg.PinsPath = filepath.Join(p.cfg.DataDir, "keypins.json")
	// The members this peer knew, so that it rejoins them after a restart without seeds.
	cfg.SnapshotPath = filepath.Join(p.cfg.DataDir, "members.json")
	m, err := mesh.New(cfg)
	if err != nil {
		return nil, err
	}
	if err := m.RegisterChannel(ipam.UsageChannel, p.usage); err != nil {
		return nil, err
	}
	if err := m.RegisterChannel(ipam.TableChannel, p.cluster.TableHandler()); err != nil {
		return nil, err
	}
	if err := m.RegisterChannel(dnsChannel, p.dnsRep); err != nil {
		return nil, err
	}
	if err := m.RegisterChannel(labelsChannel, p.labels); err != nil {
		return nil, err
	}
	if err := m.RegisterChannel(mesh.LinkStateChannelName, p.linkStateChannel(m)); err != nil {
		return nil, err
	}
	if p.segs != nil { // segment figures and tunnel counters (router/segments.go)
		if err := m.RegisterChannel(segmentsChannel, p.segs); err != nil {
			return nil, err
		}
	}
	if err := m.Start(ctx); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// acceptPeer keeps two separately bootstrapped weft clusters apart: each owns the whole
// range in its own Raft log, so merging them would hand out addresses twice.
func acceptPeer(local, remote mesh.Metadata) error {
	if local.ClusterID != "" && remote.ClusterID != "" && local.ClusterID != remote.ClusterID {
		return fmt.Errorf("peer %s belongs to another weft cluster (%s, ours %s): it was bootstrapped separately; "+
			"to move it into this cluster, stop it, empty its --data-dir and start it with --peers pointing here",
			remote.Name, remote.ClusterID, local.ClusterID)
	}
	return nil
}

func printableOnly(r rune) rune {
	if r > ' ' && r <= '~' {
		return r
	}
	return '_'
}

func (p *Peer) raftPort() int {
	if p.transport != nil {
		if a, ok := p.transport.Addr().(*net.TCPAddr); ok {
			return a.Port
		}
	}
	return p.cfg.RaftPort
}

// runMembership keeps Raft membership in step with the mesh: it bootstraps the cluster when
// this peer is the one to, and on the leader adds, promotes and removes servers. It gossips
// the block table (the leader its changes, a client fetches when behind) and publishes this
// peer's block usage. It returns when ctx ends.
//
// Cost when idle: O(blocks) per membershipTick on every peer; the O(N) round (toMembers,
// Observe, Reconcile, pins) only after a mesh event or table change, every tick on the Raft
// leader and while a bootstrap is pending, and every membershipResync otherwise.
func (p *Peer) runMembership(ctx context.Context) {
	events, cancel := p.mesh.Subscribe()
	defer cancel()
	tick := time.NewTicker(membershipTick)
	defer tick.Stop()
	coalesce := time.NewTimer(membershipCoalesce)
	defer coalesce.Stop()
	var settle settleTracker
	syncWith := func(name string) {
		go func() {
			if err := p.mesh.Sync(name); err != nil {
				p.log.Debug("state sync with a returning peer failed; push/pull will repair", "peer", name, "err", err)
			}
		}()
	}
	var (
		dirty     = true // a round must run (the first one at once, via coalesce)
		armed     = true // coalesce is running
		lastRound time.Time
		lastMeta  = membershipMeta{p.cluster.InCluster(), p.cluster.ClusterID()}
	)
	markDirty := func() {
		dirty = true
		if !armed {
			coalesce.Reset(membershipCoalesce)
			armed = true
		}
	}
	for {
		light := false
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				events = nil // the mesh is closing; ctx ends next
				continue
			}
			p.peerEvent(ev, syncWith)
			markDirty()
			continue
		case <-p.cluster.TableChanged():
			p.broadcastTable()
			markDirty() // block owners changed: pins, ownership
			continue
		case <-coalesce.C:
			armed = false
		case <-tick.C:
			light = true
		}
		now := time.Now()
		meta := membershipMeta{p.cluster.InCluster(), p.cluster.ClusterID()}
		if meta != lastMeta { // joined a cluster or learnt its name: Observe filters on it
			dirty, lastMeta = true, meta
		}
		if roundDue(dirty, meta.bootstrapPending(), p.cluster.IsLeader(), now.Sub(lastRound)) {
			dirty = !p.membershipRound(ctx, now, &settle)
			lastRound = now
		}
		if light {
			p.membershipLight(ctx, now)
		}
	}
}

// membershipMeta is what this peer says of its Raft membership in its metadata.
type membershipMeta struct {
	inCluster bool
	clusterID string
}

// bootstrapPending: this peer may yet bootstrap a cluster, which needs rounds to see the
// member list settle.
func (m membershipMeta) bootstrapPending() bool { return !m.inCluster && m.clusterID == "" }

// roundDue says whether the O(N) membership round runs now: when something it reads
// changed (dirty, which a failed round keeps set, so it is retried), while a bootstrap is
// pending, on the Raft leader (its dead-voter grace, reclaims and liveness records are
// timed), and as a resync.
func roundDue(dirty, bootstrapPending, leader bool, sinceLast time.Duration) bool {
	return dirty || bootstrapPending || leader || sinceLast >= membershipResync
}

// membershipRound reads the member list and brings Raft membership, the client's view,
// this peer's metadata, the usage table and the key pins in step with it. O(N). It
// reports whether everything succeeded (else the next tick retries).
func (p *Peer) membershipRound(ctx context.Context, now time.Time, settle *settleTracker) bool {
	ok := true
	peers := p.mesh.Peers()
	members := toMembers(peers)
	if !p.cluster.InCluster() {
		if settle.settled(peers, now, p.cfg.SettleTime, len(p.cfg.Seeds) > 0, p.cfg.RaftVoters) {
			if _, err := p.cluster.MaybeBootstrap(members); err != nil {
				p.log.Error("raft bootstrap failed", "err", err)
				ok = false
			}
		}
	} else {
		if err := p.cluster.EnsureClusterID(); err != nil {
			p.log.Warn("could not name the raft cluster; will retry", "err", err)
			ok = false
		}
		if err := p.cluster.Reconcile(ctx, members, now); err != nil {
			p.log.Warn("raft membership change failed; will retry", "err", err)
			ok = false
		}
	}
	p.updateMembershipMeta()
	p.cluster.Observe(members)
	p.cluster.SyncTable(ctx, now)
	if !p.checkOwnership() {
		ok = false
	}
	p.broadcastTable()
	known := make(map[string]bool, len(peers))
	for _, pr := range peers {
		known[pr.Name] = true
	}
	p.usage.Prune(func(name string) bool { return known[name] })
	p.publishUsage()
	p.unpinRemoved(peers)
	return ok
}

// membershipLight is the per-tick work whose inputs have no event: this peer's usage
// (containers come and go), its SR-IOV capacity, a client's table fetch when gossip said it
// is behind, and blocks the table took away. O(blocks + VFs).
func (p *Peer) membershipLight(ctx context.Context, now time.Time) {
	p.updateMembershipMeta()
	p.publishSRIOVCapacity() // at most once a tick: a change is gossiped within a second
	p.cluster.SyncTable(ctx, now)
	p.checkOwnership()
	p.releaseIdleBlocks(ctx)
	p.publishUsage()
}

// updateMembershipMeta advertises whether this peer is in the Raft cluster and which. A
// client names the cluster too (learnt from the table), so that the mesh keeps other
// clusters out and the leader knows it may promote it.
func (p *Peer) updateMembershipMeta() {
	member, id := p.cluster.InCluster(), p.cluster.ClusterID()
	if md := p.mesh.Local().Meta; md.RaftMember != member || md.ClusterID != id {
		p.mesh.UpdateMetadata(func(md *mesh.Metadata) { md.RaftMember, md.ClusterID = member, id })
	}
}

// checkOwnership drops at once the blocks the table took away (rmpeer --force, a reclaim
// while partitioned) and reports the attachments left in them.
func (p *Peer) checkOwnership() bool {
	p.syncNetworks()
	p.syncPolicies()
	if err := p.alloc.CheckOwnership(); err != nil {
		p.log.Warn("could not check block ownership; will retry", "err", err)
		return false
	}
	return true
}

// unpinRemoved clears, on every peer, the key pins of peers that are down and own no block
// — after `weft rmpeer` released them, or a client that never held one — so that a
// reinstalled host (new identity, same name) is accepted again without touching each
// peer. While such a peer is down a member could take its name with another key; it gets
// the peer's name, not its blocks, names or links (those need the old key or the Raft log).
// O(blocks + pins + peers) per membership round, which runs on change, not on a timer.
func (p *Peer) unpinRemoved(peers []mesh.Peer) {
	owners := map[string]bool{}
	for _, row := range p.cluster.Status().Blocks {
		owners[row.Owner] = true
	}
	for _, name := range unpinnable(p.mesh.Pinned(), p.cfg.Name, peers, owners) {
		if err := p.mesh.Unpin(name); err != nil {
			p.log.Warn("could not clear a key pin; will retry", "peer", name, "err", err)
		}
	}
}

// unpinnable picks the pinned names that are neither this peer, nor up in the mesh, nor
// owners of a block. O(pins + peers).
func unpinnable(pinned []string, self string, peers []mesh.Peer, owners map[string]bool) []string {
	up := make(map[string]bool, len(peers))
	for _, pr := range peers {
		if pr.Up() {
			up[pr.Name] = true
		}
	}
	var out []string
	for _, name := range pinned {
		if name != self && !up[name] && !owners[name] {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// broadcastTable gossips the block-table changes this peer (as leader) has not sent yet.
func (p *Peer) broadcastTable() {
	for _, msg := range p.cluster.TableBroadcasts() {
		if err := p.mesh.Broadcast(ipam.TableChannel, msg); err != nil {
			// Clients notice the gap through push/pull and fetch the table.
			p.log.Warn("block table delta not gossiped", "err", err)
		}
	}
}

// peerEvent passes liveness changes to the parts that keep per-peer state. A joiner's state
// was exchanged by memberlist's own join push/pull with the peer it joined through; a full
// sync is started only when this peer refused some of the joiner's DNS records while it
// counted the joiner as gone (so not N syncs per join).
func (p *Peer) peerEvent(ev mesh.Event, sync func(name string)) {
	switch ev.Type {
	case mesh.EventJoin, mesh.EventAlive:
		if p.dnsRep.PeerUp(ev.Peer.Name) {
			sync(ev.Peer.Name)
		}
		p.labels.peerUp(ev.Peer.Name)
	case mesh.EventDead, mesh.EventLeave:
		p.dnsRep.PeerDown(ev.Peer.Name)
		p.labels.peerDown(ev.Peer.Name)
	}
}

// settleTracker says when the set of live peers has stopped changing.
type settleTracker struct {
	alive string
	since time.Time
}

// settled is true once membership has been unchanged for d and this peer may take part in a
// bootstrap. A peer without seeds is the first peer: it may bootstrap alone. A peer with
// seeds waits until it sees at least `voters` live peers (Consul's bootstrap-expect rule):
// a smaller group that formed while other seeds were still starting must not start a
// cluster of its own, which would split the address space when the groups merge. Two
// disjoint groups of `voters` peers each that never hear of each other would still each
// bootstrap; seeding every peer with the same list rules that out.
func (s *settleTracker) settled(peers []mesh.Peer, now time.Time, d time.Duration, hasSeeds bool, voters int) bool {
	var names []string
	for _, pr := range peers {
		if pr.Up() {
			names = append(names, pr.Name)
		}
	}
	key := strings.Join(names, ",")
	if key != s.alive {
		s.alive, s.since = key, now
	}
	switch {
	case !hasSeeds && len(names) == 1:
		return true // the first peer: nobody to wait for
	case hasSeeds && len(names) < max(voters, 2):
		return false
	}
	return now.Sub(s.since) >= d
}

func toMembers(peers []mesh.Peer) []ipam.Member {
	out := make([]ipam.Member, 0, len(peers))
	for _, pr := range peers {
		m := ipam.Member{
			Name:      pr.Name,
			Alive:     pr.Up(),
			Since:     pr.Since,
			InCluster: pr.Meta.RaftMember,
			ClusterID: pr.Meta.ClusterID,
		}
		if pr.Meta.RaftAddr.IsValid() {
			m.RaftAddr = pr.Meta.RaftAddr.String()
		}
		out = append(out, m)
	}
	return out
}

// publishUsage broadcasts this peer's block usage if it changed since the last broadcast
// (and the last report once more when it has stood a few seconds: ipam.UsageConfig.ResendAfter).
func (p *Peer) publishUsage() {
	used := map[string]int{}
	for _, n := range p.alloc.Networks() {
		for _, b := range n.Blocks {
			used[b.CIDR.String()] = b.Used
		}
	}
	msg := p.usage.Publish(p.cfg.Name, used)
	if msg == nil {
		return
	}
	if err := p.mesh.Broadcast(ipam.UsageChannel, msg); err != nil {
		// Too large for one message: the periodic push/pull carries it instead.
		p.log.Debug("usage broadcast skipped", "err", err)
	}
}

// PeerStatus is one row of `weft status peers`.
type PeerStatus struct {
	Name         string    `json:"name"`
	Address      string    `json:"address"`
	GossipAddr   string    `json:"gossip_address"`
	State        string    `json:"state"`
	Capabilities []string  `json:"capabilities"`
	Since        time.Time `json:"since"`
	Self         bool      `json:"self"`
	RaftMember   bool      `json:"raft_member"`
	// RaftRole is voter, non-voter or client, from the Raft configuration this peer knows
	// (the same one `weft status ipam` lists), else "member" when gossip only says it is in.
	RaftRole  string `json:"raft_role"`
	ClusterID string `json:"cluster_id,omitempty"`
	Version   string `json:"version"`
	// SRIOV is the peer's SR-IOV PFs and their VFs, as it announces them.
	SRIOV []PFStatus `json:"sriov"`
}

func (p *Peer) peerStatus() []PeerStatus {
	out := []PeerStatus{}
	cs := p.cluster.Status()
	for _, pr := range p.mesh.Peers() {
		caps := slices.Clone(pr.Meta.Capabilities)
		if caps == nil {
			caps = []string{}
		}
		out = append(out, PeerStatus{
			Name: pr.Name, Address: pr.Meta.Underlay.String(), GossipAddr: pr.Addr.String(),
			State: pr.State.String(), Capabilities: caps, Since: pr.Since, Self: pr.Self,
			RaftMember: pr.Meta.RaftMember, ClusterID: pr.Meta.ClusterID, Version: pr.Meta.Version,
			RaftRole: raftRole(pr.Name, pr.Meta.RaftMember, cs), SRIOV: pfStatus(pr.Meta.SRIOV),
		})
	}
	return out
}

// raftRole says what part peer plays in Raft: as the configuration in cs says when it is known
// (so `status peers` agrees with `status ipam`), else from the peer's gossip.
func raftRole(peer string, gossipMember bool, cs ipam.ClusterStatus) string {
	switch {
	case slices.Contains(cs.Voters, peer):
		return ipam.RoleVoter
	case slices.Contains(cs.Nonvoters, peer):
		return ipam.RoleNonvoter
	case len(cs.Voters) > 0 || !gossipMember:
		return ipam.RoleClient
	}
	return "member"
}

// IPAMStatus is `weft status ipam`.
type IPAMStatus struct {
	Range     string           `json:"range"`
	Leader    string           `json:"leader"`
	State     string           `json:"raft_state"`
	Voters    []string         `json:"voters"`
	Nonvoters []string         `json:"nonvoters"`
	Blocks    []IPAMBlock      `json:"blocks"`
	Peers     []IPAMPeerTotals `json:"peers"`
	// Orphaned are this peer's attachments in blocks it no longer owns (see
	// ipam.Allocator.CheckOwnership); NetworkMismatch says how its configured range differs
	// from the cluster's. Both empty when all is well.
	Orphaned        []ipam.Attachment `json:"orphaned,omitempty"`
	NetworkMismatch string            `json:"network_mismatch,omitempty"`
	// Dead are the recorded death times of peers that own blocks (--reclaim-after counts
	// from them).
	Dead map[string]time.Time `json:"dead,omitempty"`
}

// IPAMBlock is one owned block. Used is nil when the owner's usage is not known here (yet).
type IPAMBlock struct {
	Network string `json:"network"`
	CIDR    string `json:"cidr"`
	Owner   string `json:"owner"`
	Used    *int   `json:"used"`
	Free    *int   `json:"free"`
}

// IPAMPeerTotals sums one peer's blocks. Used and Free are nil until the usage of every one
// of its blocks is known here.
type IPAMPeerTotals struct {
	Name   string `json:"name"`
	Blocks int    `json:"blocks"`
	Used   *int   `json:"used"`
	Free   *int   `json:"free"`
}

func (p *Peer) ipamStatus() IPAMStatus {
	cs := p.cluster.Status()
	st := IPAMStatus{Range: p.cfg.IPAllocRange.String(), Leader: cs.Leader, State: cs.State,
		Voters: cs.Voters, Nonvoters: cs.Nonvoters, Blocks: []IPAMBlock{}, Peers: []IPAMPeerTotals{},
		Orphaned: p.alloc.Orphaned(), NetworkMismatch: p.cluster.NetworkMismatch(), Dead: cs.Dead}
	type sums struct {
		blocks, used, free int
		unknown            bool
	}
	totals := map[string]*sums{}
	for _, row := range cs.Blocks {
		blk := IPAMBlock{Network: row.Network, CIDR: row.CIDR.String(), Owner: row.Owner}
		t := totals[row.Owner]
		if t == nil {
			t = &sums{}
			totals[row.Owner] = t
		}
		t.blocks++
		if used, ok := p.usage.Used(row.Owner, blk.CIDR); ok {
			free := 0
			if n, ok := p.alloc.Network(row.Network); ok {
				free = n.Usable(row.CIDR) - used
			}
			blk.Used, blk.Free = &used, &free
			t.used += used
			t.free += free
		} else {
			t.unknown = true
		}
		st.Blocks = append(st.Blocks, blk)
	}
	for name, t := range totals {
		row := IPAMPeerTotals{Name: name, Blocks: t.blocks}
		if !t.unknown {
			row.Used, row.Free = &t.used, &t.free
		}
		st.Peers = append(st.Peers, row)
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Name < st.Peers[j].Name })
	return st
}
