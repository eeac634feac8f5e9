package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"slices"
	"time"

	"github.com/hashicorp/raft"
)

// The client side of bounded Raft: a peer outside the Raft configuration forwards its writes to
// a Raft member (the last leader it heard of first) and learns the block table from gossip and
// fetches (see table.go).

// FetchFunc fetches the encoded block table from the Raft member at addr, and names the
// server as its transport certificate proved it ("" when the transport proved no name).
type FetchFunc func(ctx context.Context, member raft.ServerAddress) (body []byte, server string, err error)

// fetchInterval spaces table fetches: a client behind fetches at most this often.
const fetchInterval = time.Second

// Observe tells the cluster what the mesh knows of its members; a client picks the Raft
// members it forwards to and fetches from among them. O(N) per call, called once per
// membership round.
func (c *Cluster) Observe(members []Member) {
	ourID := c.ClusterID()
	var raftPeers []Member
	for _, m := range members {
		if m.Name == c.cfg.Name || !m.Alive || !m.InCluster || m.RaftAddr == "" {
			continue
		}
		if m.ClusterID == "" || (ourID != "" && m.ClusterID != ourID) {
			continue // a member of another cluster, or one that does not say which
		}
		raftPeers = append(raftPeers, m)
	}
	underlay := make([]netip.Addr, 0, len(members))
	alive := make(map[string]bool, len(members))
	for _, m := range members {
		if ap, err := netip.ParseAddrPort(m.RaftAddr); err == nil {
			underlay = append(underlay, ap.Addr())
		}
		if m.Alive {
			alive[m.Name] = true
		}
	}
	alive[c.cfg.Name] = true // the leader itself is alive, whatever the list says
	c.mu.Lock()
	c.raftPeers = raftPeers
	c.alive = alive
	c.underlay = underlay
	c.mu.Unlock()
	c.checkNetworkConfig()
}

// forwardTargets lists where a client sends a write: the leader the last fetched table named,
// then the other Raft members in random order.
func (c *Cluster) forwardTargets() []raft.ServerAddress {
	c.mu.Lock()
	peers := slices.Clone(c.raftPeers)
	c.mu.Unlock()
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	c.view.mu.Lock()
	leader := c.view.leader
	c.view.mu.Unlock()
	slices.SortStableFunc(peers, func(a, b Member) int {
		switch {
		case a.Name == leader && b.Name != leader:
			return -1
		case b.Name == leader && a.Name != leader:
			return 1
		}
		return 0
	})
	out := make([]raft.ServerAddress, 0, len(peers))
	for _, m := range peers {
		out = append(out, raft.ServerAddress(m.RaftAddr))
	}
	return out
}

// isMember says whether this node is in the Raft configuration it knows.
func (c *Cluster) isMember() bool {
	for _, s := range c.configuration().Servers {
		if s.ID == raft.ServerID(c.cfg.Name) {
			return true
		}
	}
	return false
}

// Role is this peer's part in Raft: "voter", "non-voter" or "client".
func (c *Cluster) Role() string {
	for _, s := range c.configuration().Servers {
		if s.ID == raft.ServerID(c.cfg.Name) {
			if s.Suffrage == raft.Voter {
				return RoleVoter
			}
			return RoleNonvoter
		}
	}
	return RoleClient
}

// Raft roles as status shows them.
const (
	RoleVoter    = "voter"
	RoleNonvoter = "non-voter"
	RoleClient   = "client"
)

// readTable runs fn on the table this node goes by: a Raft member's own FSM, never gossip (a
// peer of another cluster in the same mesh must not lend it its table or its ID); on a client
// the gossiped view, or the FSM if that is ahead. fn must not keep st.
func (c *Cluster) readTable(fn func(st *fsmState)) {
	if c.InCluster() {
		c.fsm.mu.RLock()
		defer c.fsm.mu.RUnlock()
		fn(&c.fsm.state)
		return
	}
	c.view.mu.Lock()
	vv := c.view.state.Version
	c.view.mu.Unlock()
	c.fsm.mu.RLock()
	if c.fsm.state.Version >= vv {
		defer c.fsm.mu.RUnlock()
		fn(&c.fsm.state)
		return
	}
	c.fsm.mu.RUnlock()
	c.view.mu.Lock()
	defer c.view.mu.Unlock()
	fn(&c.view.state)
}

func (c *Cluster) tableRows() []BlockOwnership {
	var rows []BlockOwnership
	c.readTable(func(st *fsmState) { rows = st.table() })
	return rows
}

// TableChanged is signalled after the FSM applied a table change; the router then calls
// TableBroadcasts.
func (c *Cluster) TableChanged() <-chan struct{} { return c.fsm.changed }

// TableBroadcasts returns the encoded deltas the leader has not gossiped yet (nil on any
// other node). O(changes) per call: leader cost does not depend on N.
func (c *Cluster) TableBroadcasts() [][]byte {
	leader := c.IsLeader()
	var conf uint64
	if leader {
		conf = c.confHash()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !leader {
		// A node that becomes leader gossips only what it applies from then on.
		c.lastSent, c.lastConf = c.fsm.version(), 0
		return nil
	}
	var out [][]byte
	if conf != c.lastConf {
		// The configuration or the leader changed: tell clients to refetch (a few bytes).
		if b, err := c.signDelta(tableDelta{Op: opConf, Conf: conf, ClusterID: c.fsm.clusterID()}); err == nil {
			out = append(out, b)
			c.lastConf = conf
		}
	}
	for _, d := range c.fsm.deltasAfter(c.lastSent) {
		b, err := c.signDelta(d)
		if err != nil {
			continue
		}
		out = append(out, b)
		c.lastSent = d.Index
	}
	return out
}

// signDelta encodes d for gossip, signed by this node's identity (unsigned without a
// Signer). One signature per delta: O(1), whatever N.
func (c *Cluster) signDelta(d tableDelta) ([]byte, error) {
	raw, err := json.Marshal(stripPolicySpec(d))
	if err != nil {
		return nil, err
	}
	env := signedDelta{Delta: raw}
	if c.cfg.Signer != nil {
		env.Signer = c.cfg.Name
		env.Sig = c.cfg.Signer.Sign(deltaSignDomain, deltaSignMessage(c.cfg.Name, raw))
	}
	return json.Marshal(env)
}

// TableHandler is the gossip handler of TableChannel (structurally a mesh.ChannelHandler).
type TableHandler struct{ c *Cluster }

// TableHandler returns the handler to register on the mesh under TableChannel.
func (c *Cluster) TableHandler() *TableHandler { return &TableHandler{c: c} }

// NotifyMsg takes one gossiped delta; it does not block (a fetch, if needed, is only marked).
func (h *TableHandler) NotifyMsg(msg []byte) {
	c := h.c
	if len(msg) > maxDeltaBytes {
		c.rejectTable("oversize", fmt.Errorf("%w: delta of %d bytes, at most %d", ErrBadTable, len(msg), maxDeltaBytes))
		return
	}
	var env signedDelta
	if err := json.Unmarshal(msg, &env); err != nil {
		c.rejectTable("malformed", fmt.Errorf("%w: delta does not decode: %v", ErrBadTable, err))
		return
	}
	raw := []byte(env.Delta)
	if len(raw) == 0 {
		raw = msg // a bare, unsigned delta
	}
	var d tableDelta
	if err := json.Unmarshal(raw, &d); err != nil {
		c.rejectTable("malformed", fmt.Errorf("%w: delta does not decode: %v", ErrBadTable, err))
		return
	}
	c.view.mu.Lock()
	defer c.view.mu.Unlock()
	if d.Op != opConf && d.Index <= c.view.state.Version {
		return // old news: not worth a signature check
	}
	if c.cfg.Keys != nil {
		switch reason, err := verifyDelta(env, c.view.membersLocked(), c.cfg.Keys); {
		case errors.Is(err, errUnverified):
			// Not a refusal: this client has not fetched a configuration yet; the fetch brings
			// the table this delta is part of.
			c.view.wantFetch = true
			c.log.Debug("block table delta deferred until the first fetch", "signer", env.Signer, "index", d.Index)
			return
		case err != nil:
			c.rejectTable(reason, err)
			return
		}
	}
	if d.Op == opConf {
		if ours := c.view.state.ClusterID; ours != "" && d.ClusterID != ours {
			c.rejectTable("foreign", fmt.Errorf("%w: configuration hint of cluster %q, ours is %q", ErrBadTable, d.ClusterID, ours))
			return
		}
		if d.Conf != c.view.confHash {
			c.view.wantFetch = true
		}
		return
	}
	// Validate on a copy-free path: applyDelta changes nothing when it fails.
	switch err := applyDelta(&c.view.state, d); {
	case errors.Is(err, errTableGap):
		c.view.wantFetch = true
		c.view.wantIndex = max(c.view.wantIndex, d.Index)
	case errors.Is(err, errFuture):
		c.rejectTable("future", err)
	case errors.Is(err, errForeign):
		c.rejectTable("foreign", err)
	case err != nil:
		c.rejectTable("invalid", err)
	default:
		c.metrics.tableDeltas.Inc()
	}
}

// LocalState is the push/pull state: only the indexes, so push/pull stays O(1) in table size.
func (h *TableHandler) LocalState(bool) []byte {
	c := h.c
	hint := tableHint{Index: c.fsm.version()}
	c.view.mu.Lock()
	hint.Index = max(hint.Index, c.view.state.Version)
	hint.Conf = c.view.confHash
	c.view.mu.Unlock()
	if c.isMember() {
		hint.Conf = c.confHash()
	}
	b, _ := json.Marshal(hint)
	return b
}

// MergeRemoteState marks a fetch when the other peer's table or configuration is ahead.
func (h *TableHandler) MergeRemoteState(buf []byte, _ bool) {
	c := h.c
	if len(buf) > maxHintBytes {
		c.rejectTable("oversize", fmt.Errorf("%w: state of %d bytes, at most %d", ErrBadTable, len(buf), maxHintBytes))
		return
	}
	var hint tableHint
	if err := json.Unmarshal(buf, &hint); err != nil {
		c.rejectTable("malformed", fmt.Errorf("%w: state does not decode: %v", ErrBadTable, err))
		return
	}
	if c.isMember() {
		return // the log is this node's source
	}
	c.view.mu.Lock()
	defer c.view.mu.Unlock()
	if hint.Index > c.view.state.Version || (hint.Conf != 0 && hint.Conf != c.view.confHash) {
		// Only a mark: the fetch goes to a Raft member, whose answer is authoritative; a hint
		// from the future is caught when the fetched table does not reach it.
		c.view.wantFetch = true
		c.view.wantIndex = max(c.view.wantIndex, hint.Index)
	}
}

// SyncTable fetches the table from a random Raft member when gossip said this peer is behind,
// at most once per fetchInterval, in the background. Call it from the membership loop.
func (c *Cluster) SyncTable(ctx context.Context, now time.Time) {
	if c.cfg.FetchTable == nil || c.isMember() {
		return
	}
	c.view.mu.Lock()
	// A client that never fetched knows no configuration (voters, leader): it fetches once
	// even if gossip gave it the whole table.
	want, wantIndex := c.view.wantFetch || c.view.confHash == 0, c.view.wantIndex
	held, lastBoot := c.view.membersLocked(), c.view.bootServer
	c.view.mu.Unlock()
	c.mu.Lock()
	if !want || c.fetching || now.Sub(c.lastFetch) < fetchInterval || len(c.raftPeers) == 0 {
		c.mu.Unlock()
		return
	}
	// Ask a member of the held configuration when one is alive: only those may serve a table
	// (fetchFrom); any Raft member the mesh names otherwise (bootstrap).
	targets := fetchTargets(c.raftPeers, held)
	if !anyHeld(c.raftPeers, held) {
		// Bootstrapping: the next table must come from another member than the last one.
		if others := slices.DeleteFunc(slices.Clone(targets), func(m Member) bool { return m.Name == lastBoot }); len(others) > 0 {
			targets = others
		}
	}
	target := targets[rand.IntN(len(targets))]
	c.fetching, c.lastFetch = true, now
	c.mu.Unlock()
	go func() {
		defer func() {
			c.mu.Lock()
			c.fetching = false
			c.mu.Unlock()
		}()
		fctx, cancel := context.WithTimeout(ctx, c.cfg.ApplyTimeout)
		defer cancel()
		if err := c.fetchFrom(fctx, raft.ServerAddress(target.RaftAddr), wantIndex); err != nil {
			c.log.Debug("block table fetch failed; will retry", "member", target.Name, "err", err)
		}
	}()
}

// fetchTargets are the live Raft members (per the mesh) that belong to the held
// configuration, or all of them when none does. O(N·M), M members held (a few).
func fetchTargets(live []Member, held []string) []Member {
	var in []Member
	for _, m := range live {
		if slices.Contains(held, m.Name) {
			in = append(in, m)
		}
	}
	if len(in) == 0 {
		return live
	}
	return in
}

// anyHeld says whether a live Raft member (per the mesh) belongs to the held configuration.
// O(N·M).
func anyHeld(live []Member, held []string) bool {
	for _, m := range live {
		if slices.Contains(held, m.Name) {
			return true
		}
	}
	return false
}

// checkServer says whether a table that server (the name its certificate proved) sent may be
// installed: server must be a member of the configuration held, or, when no held member is
// alive (bootstrap; see table.go for what that proves), of the configuration the table names.
// Returns the metric reason of a refusal. Pure.
func checkServer(server string, held []string, heldAlive bool, t *servedTable) (reason string, err error) {
	if server == "" {
		return "unproven", fmt.Errorf("%w: the server's transport proved no name", ErrBadTable)
	}
	if heldAlive {
		if !slices.Contains(held, server) {
			return "server", fmt.Errorf("%w: table served by %q, not a raft member of the table held (%v)", ErrBadTable, server, held)
		}
		return "", nil
	}
	if !slices.Contains(t.Voters, server) && !slices.Contains(t.Nonvoters, server) {
		return "server", fmt.Errorf("%w: table served by %q, which its own configuration (voters %v, non-voters %v) does not name", ErrBadTable, server, t.Voters, t.Nonvoters)
	}
	return "", nil
}

// fetchFrom installs the table of the member at addr if it is valid and newer.
func (c *Cluster) fetchFrom(ctx context.Context, addr raft.ServerAddress, wantIndex uint64) error {
	c.metrics.tableFetches.Inc()
	b, server, err := c.cfg.FetchTable(ctx, addr)
	if err != nil {
		return err
	}
	var t servedTable
	if err := json.Unmarshal(b, &t); err != nil {
		c.rejectTable("malformed", fmt.Errorf("%w: table from %s does not decode: %v", ErrBadTable, addr, err))
		return err
	}
	if t.State.Networks == nil {
		t.State.Networks = map[string]Network{}
	}
	if t.State.Owners == nil {
		t.State.Owners = map[string]map[netip.Prefix]string{}
	}
	if t.State.Removed == nil {
		t.State.Removed = map[string]bool{}
	}
	if t.State.Policies == nil { // a member from before policies
		t.State.Policies = map[string]PolicyObject{}
	}
	if err := t.State.validate(); err != nil {
		c.rejectTable("invalid", fmt.Errorf("table from %s: %w", addr, err))
		return err
	}
	if ours := c.ClusterID(); ours != "" && t.State.ClusterID != ours {
		err := fmt.Errorf("%w: table from %s is of cluster %q, ours is %q", ErrBadTable, addr, t.State.ClusterID, ours)
		c.rejectTable("foreign", err)
		return err
	}
	c.mu.Lock()
	live := slices.Clone(c.raftPeers)
	c.mu.Unlock()
	c.view.mu.Lock()
	defer c.view.mu.Unlock()
	if c.cfg.Keys != nil {
		held := c.view.membersLocked()
		heldAlive := anyHeld(live, held)
		reason, err := checkServer(server, held, heldAlive, &t)
		if err != nil {
			c.rejectTable(reason, fmt.Errorf("table from %s: %w", addr, err))
			return err
		}
		if !heldAlive {
			conf := confKey(t.Voters, t.Nonvoters)
			if len(live) >= 2 && (c.view.bootServer == "" || c.view.bootServer == server || c.view.bootConf != conf) {
				// Wait for a second member to report the same configuration (see table.go).
				c.view.bootServer, c.view.bootConf, c.view.wantFetch = server, conf, true
				c.log.Debug("block table: first configuration heard, waiting for a second member to confirm it", "server", server, "voters", t.Voters)
				return nil
			}
			c.log.Info("block table taken with no configuration held yet", "server", server, "confirmed_by", c.view.bootServer, "voters", t.Voters, "nonvoters", t.Nonvoters)
			c.view.bootServer, c.view.bootConf = "", ""
		}
	}
	if wantIndex > t.State.Version+maxIndexAhead {
		// Some peer claimed an index no member has: count it, and stop chasing it.
		c.rejectTable("future", fmt.Errorf("%w: %w: index %d heard by gossip, member %s is at %d", ErrBadTable, errFuture, wantIndex, addr, t.State.Version))
	}
	if t.State.Version >= c.view.state.Version {
		c.view.state = t.State
	}
	c.view.leader, c.view.voters, c.view.nonvoters, c.view.confHash = t.Leader, t.Voters, t.Nonvoters, t.Conf
	c.view.wantFetch = c.view.state.Version < c.view.wantIndex && c.view.wantIndex <= c.view.state.Version+maxIndexAhead
	if !c.view.wantFetch {
		c.view.wantIndex = 0
	}
	return nil
}

func (c *Cluster) rejectTable(reason string, err error) {
	c.metrics.tableRejected.WithLabelValues(reason).Inc()
	c.log.Warn("rejected block table input", "reason", reason, "err", err)
}

// confHash identifies the Raft configuration and leader this member knows (raft does not
// expose the configuration's index cheaply); a client refetches when a member's hash differs
// from its own. O(members).
func (c *Cluster) confHash() uint64 {
	h := fnv.New64a()
	servers := c.configuration().Servers
	ids := make([]string, 0, len(servers))
	for _, s := range servers {
		ids = append(ids, fmt.Sprintf("%s/%d", s.ID, s.Suffrage))
	}
	slices.Sort(ids)
	// The leader too: a client's status then names the new leader after an election.
	_, leader := c.raft.LeaderWithID()
	ids = append(ids, "leader="+string(leader))
	for _, id := range ids {
		h.Write([]byte(id + ","))
	}
	return h.Sum64()
}

// serveTable answers GET /v1/raft/table on a Raft member. O(table) per request; requests come
// from clients that are behind, spread over all members.
func (c *Cluster) serveTable(w http.ResponseWriter, _ *http.Request) {
	if !c.isMember() {
		http.Error(w, "not a raft member", http.StatusServiceUnavailable)
		return
	}
	st := c.Status()
	out := servedTable{State: c.fsm.copyState(), Leader: st.Leader, Voters: st.Voters, Nonvoters: st.Nonvoters, Conf: c.confHash()}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}
