package ipam

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/mesh/identity"
)

// ErrNotLeader is answered to a forwarded command that reached a peer no longer leading.
var ErrNotLeader = errors.New("not the raft leader")

// ForwardFunc sends an encoded command to the leader at addr and returns its encoded result.
type ForwardFunc func(ctx context.Context, leader raft.ServerAddress, cmd []byte) ([]byte, error)

// ClusterConfig configures a Cluster.
type ClusterConfig struct {
	Name string
	// Dir holds raft.db (log and stable store) and the snapshots.
	Dir       string
	Transport raft.Transport
	// Forward reaches the leader from a follower.
	Forward ForwardFunc
	// DB is the peer's local database; the cluster keeps its own claims there too, so a
	// restarted peer knows its blocks before it has caught up with the log.
	DB *bolt.DB
	// Voters is how many peers vote (the first ones up).
	Voters int
	// Nonvoters is how many more peers follow the log without voting (spares to promote when
	// a voter dies); every other peer is a client: outside the Raft configuration, it forwards
	// writes to a member and learns the table by gossip. 0 means none.
	Nonvoters int
	// Networks are this peer's configured networks (--ipalloc-range, --ipalloc-block). The
	// bootstrapping leader pins them in the Raft state with the cluster's ID; every later
	// claim must name one of the pinned networks exactly. A peer configured otherwise than
	// the cluster says so loudly (see Observe) and gets no block. Empty: the cluster's first
	// claim defines its one network (as clusters did before pinning), within CheckNetworks.
	Networks []Network
	// FetchTable reaches a Raft member's table from a client (nil: clients rely on gossip alone).
	FetchTable FetchFunc
	// Signer (the peer's identity) signs the table deltas this node gossips as leader. Keys
	// (Mesh.PublicKey), when set, makes clients require signed deltas and proven fetch
	// servers (see table.go); nil: unsigned and unchecked (tests, --insecure).
	Signer identity.Signer
	Keys   identity.KeyLookup
	// Registerer takes the cluster's metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// SnapshotThreshold and TrailingLogs tune log compaction (defaults 256 and 128): a new
	// member installs a snapshot instead of replaying the log from index 1.
	SnapshotThreshold uint64
	TrailingLogs      uint64
	// DeadVoterGrace is how long a voter may be dead before the leader replaces it with a
	// healthy non-voter.
	DeadVoterGrace time.Duration
	// ReclaimAfter, when non-zero, returns the blocks of peers dead that long to the pool.
	ReclaimAfter time.Duration
	// ApplyTimeout bounds one command.
	ApplyTimeout time.Duration
	Logger       *slog.Logger
	// ValidatePolicy checks policy files where they arrive and again on the leader (issue
	// #15; the lead wires netpol.Parse); nil: this peer refuses policy puts.
	ValidatePolicy PolicyValidator
	// Tune adjusts raft's configuration (tests shorten the timeouts).
	Tune func(*raft.Config)
	// PeerRPC, when set, serves PeerRPCPrefix on the authenticated RPC side (the router's
	// peer-to-peer requests, e.g. `weft perf`); the caller is named by RequestPeerName.
	PeerRPC http.Handler
}

// Cluster is this peer's Raft node for IPAM: a BlockOwner backed by the replicated log.
// Safe for concurrent use.
type Cluster struct {
	cfg   ClusterConfig
	log   *slog.Logger
	raft  *raft.Raft
	fsm   *fsm
	store *raftboltdb.BoltStore
	cache *LocalOwner // this peer's own claims, kept locally
	// hadState: this node found Raft state on disk, so it is (or was) part of a cluster.
	hadState bool

	view    *tableView // the table as gossip and fetches tell it (clients read it)
	metrics *clusterMetrics

	mu           sync.Mutex // guards the fields below
	bootstrapped bool
	// raftPeers are the live Raft members of this cluster, as the mesh reports them.
	raftPeers []Member
	// alive holds the names the mesh last reported alive: the leader refuses to remove them.
	alive map[string]bool
	// lastSent is the index of the last delta this leader gossiped, lastConf the last
	// configuration hash.
	lastSent uint64
	lastConf uint64
	// fetching and lastFetch pace table fetches.
	fetching  bool
	lastFetch time.Time
	// refused remembers the foreign members already logged (name → cluster id), to log once.
	refused map[string]string
	// savedID is the cluster ID as persisted in the local database.
	savedID string
	// underlay holds the underlay addresses of the members last observed (and this peer's):
	// no network may hold one of them.
	underlay []netip.Addr
	// mismatch is the last network-configuration mismatch logged ("" when none).
	mismatch string
	// lost holds the blocks ("network/block") this peer claimed and the table took away,
	// already logged. Bounded by the blocks this peer ever claimed.
	lost map[string]bool
	// unanswered holds, per network and claimer ("network/peer"), the names of claims that
	// failed (their answer lost, the leader gone), as kept in the database (claimnames.go):
	// the next claim takes one, so it is the same request and cannot commit a second block
	// (see command.Request), even after a restart. A name is dropped once its claim is
	// answered; concurrent claims each hold their own. Bounded by the claims that failed at
	// once (the allocator makes one at a time).
	unanswered map[string][]string
}

// NewCluster opens the Raft stores under cfg.Dir and starts the node. A node with no state
// waits, as a follower with an empty configuration, until it bootstraps or a leader adds it.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if cfg.Voters <= 0 {
		cfg.Voters = 3
	}
	if cfg.ApplyTimeout <= 0 {
		cfg.ApplyTimeout = 5 * time.Second
	}
	if cfg.DeadVoterGrace <= 0 {
		cfg.DeadVoterGrace = time.Minute
	}
	if cfg.Nonvoters < 0 {
		cfg.Nonvoters = 0
	}
	if cfg.SnapshotThreshold == 0 {
		cfg.SnapshotThreshold = 256
	}
	if cfg.TrailingLogs == 0 {
		cfg.TrailingLogs = 128
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create raft dir: %w", err)
	}
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.Dir, "raft.db"), BoltOptions: &bolt.Options{Timeout: time.Second}})
	if err != nil {
		return nil, fmt.Errorf("open raft log: %w", err)
	}
	logOut := &slogWriter{log: cfg.Logger}
	snaps, err := raft.NewFileSnapshotStore(cfg.Dir, 2, logOut)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("open raft snapshots: %w", err)
	}
	hadState, err := raft.HasExistingState(store, store, snaps)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("read raft state: %w", err)
	}
	cache, err := NewLocalOwner(cfg.DB)
	if err != nil {
		store.Close()
		return nil, err
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.Name)
	rc.Logger = hclog.New(&hclog.LoggerOptions{Name: "raft", Output: logOut, Level: hclog.Info, DisableTime: true})
	// Compact: raft's defaults (8192 entries, every 2 min) keep the whole history of a small
	// cluster, so a new member replayed it from index 1. A snapshot of the table is small.
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = cfg.TrailingLogs
	rc.SnapshotInterval = 30 * time.Second
	// Idle cost on the voters. raft's defaults send each follower an
	// AppendEntries every 50–100 ms (CommitTimeout: only so that a follower
	// learns the last commit index when commits stop) plus a heartbeat every
	// 100–200 ms (HeartbeatTimeout/10): about 20 TLS round trips a second
	// per follower: measured, the leader paid 2.5 % of a core more than a
	// client at N=50, 0.5 % with the values below (mesh/SCALING.md, round 5).
	// Claims are answered by the leader, and followers' copies of the table
	// lag the last commit by at most 2 × CommitTimeout, so 500 ms costs no
	// caller anything. A 2 s heartbeat timeout halves the heartbeats and makes a
	// starved host (load 10+ in the lab) call fewer needless elections; a
	// dead leader is replaced in 2–4 s instead of 1–2 s.
	rc.CommitTimeout = 500 * time.Millisecond
	rc.HeartbeatTimeout = 2 * time.Second
	rc.ElectionTimeout = 2 * time.Second
	rc.LeaderLeaseTimeout = time.Second
	if cfg.Tune != nil {
		cfg.Tune(rc)
	}
	metrics := newClusterMetrics(cfg.Registerer)
	f := newFSM()
	f.refused = func(reason string, err error) {
		metrics.refused.WithLabelValues(reason).Inc()
		cfg.Logger.Error("raft state machine refused a command; nothing changed", "reason", reason, "err", err)
	}
	f.claimsRepeated = metrics.claimsRepeated
	r, err := raft.NewRaft(rc, f, store, store, snaps, cfg.Transport)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	savedID, err := loadClusterID(cfg.DB)
	var unanswered map[string][]string
	if err == nil {
		unanswered, err = loadClaimNames(cfg.DB)
	}
	if err != nil {
		r.Shutdown()
		store.Close()
		return nil, err
	}
	return &Cluster{cfg: cfg, log: cfg.Logger, raft: r, fsm: f, store: store, cache: cache, hadState: hadState,
		view: newTableView(), metrics: metrics, refused: map[string]string{}, savedID: savedID, lost: map[string]bool{}, unanswered: unanswered}, nil
}

// Close stops the node and closes its stores. A leader first hands leadership to another
// voter, so a graceful stop costs the cluster no election timeout. Safe twice.
func (c *Cluster) Close() error {
	if c.raft.State() == raft.Leader && len(c.configuration().Servers) > 1 {
		if err := c.raft.LeadershipTransfer().Error(); err != nil {
			c.log.Warn("could not hand over raft leadership before stopping", "err", err)
		}
	}
	err := c.raft.Shutdown().Error()
	if cerr := c.store.Close(); err == nil && cerr != nil && !errors.Is(cerr, bolt.ErrDatabaseNotOpen) {
		err = cerr
	}
	return err
}

// InCluster says whether this node belongs to a Raft cluster (it had state on disk, it
// bootstrapped, or a leader added it).
func (c *Cluster) InCluster() bool {
	c.mu.Lock()
	boot := c.bootstrapped
	c.mu.Unlock()
	if c.hadState || boot {
		return true
	}
	return len(c.configuration().Servers) > 0
}

func (c *Cluster) configuration() raft.Configuration {
	f := c.raft.GetConfiguration()
	if f.Error() != nil {
		return raft.Configuration{}
	}
	return f.Configuration()
}

// Member is what the mesh knows of one peer, as the cluster needs it.
type Member struct {
	Name     string
	RaftAddr string
	Alive    bool
	// Since is when the member's liveness last changed (for a dead member: when it died).
	Since time.Time
	// InCluster: the member says it belongs to a Raft cluster.
	InCluster bool
	// ClusterID: the cluster the member says it belongs to ("" when it does not know).
	ClusterID string
}

// admissible says whether the leader of cluster ourID may add m to its configuration: only a
// peer in no cluster at all, or one of this very cluster. A peer that says it is in a cluster
// but not which (it bootstrapped and has not named it yet) is never added: it may be another
// cluster, and adding it would replace its log and hand its addresses out twice.
func admissible(m Member, ourID string) bool {
	if m.ClusterID != "" {
		return m.ClusterID == ourID
	}
	return !m.InCluster
}

// MaybeBootstrap starts a one-voter cluster when nobody else will: this node has no state, no
// live member says it is in a cluster, and this node has the lowest name of the live members.
// The caller must only ask once the mesh has settled (joined its seeds and seen no change for
// a while), so that every starting peer sees the same members and exactly one bootstraps.
// The leader then adds the others (see Reconcile).
func (c *Cluster) MaybeBootstrap(members []Member) (bool, error) {
	// A client knows the cluster it belongs to (from the table) even when no member is alive:
	// it must wait for them rather than start a second cluster over the same range.
	if c.InCluster() || c.ClusterID() != "" {
		return false, nil
	}
	for _, m := range members {
		if m.Name == c.cfg.Name || !m.Alive {
			continue
		}
		if m.InCluster || m.ClusterID != "" || m.Name < c.cfg.Name {
			return false, nil
		}
	}
	conf := raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter, ID: raft.ServerID(c.cfg.Name), Address: c.cfg.Transport.LocalAddr(),
	}}}
	if err := c.raft.BootstrapCluster(conf).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return false, fmt.Errorf("bootstrap raft: %w", err)
	}
	c.mu.Lock()
	c.bootstrapped = true
	c.mu.Unlock()
	c.log.Info("bootstrapped the raft cluster", "voter", c.cfg.Name)
	return true, nil
}

// Reconcile is the leader's membership duty, called whenever the mesh changes and
// periodically: add live members that are not in the configuration (as voters until there
// are cfg.Voters, then as non-voters), replace a voter dead longer than the grace period with
// a healthy non-voter, and, with ReclaimAfter, release the blocks of long-dead peers.
// On a follower it does nothing.
func (c *Cluster) Reconcile(ctx context.Context, members []Member, now time.Time) error {
	if c.raft.State() != raft.Leader {
		return nil
	}
	conf := c.configuration()
	inConf := map[raft.ServerID]raft.Server{}
	voters := 0
	for _, s := range conf.Servers {
		inConf[s.ID] = s
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	// The first peers up become the voters: consider members in the order they came alive.
	members = append([]Member(nil), members...)
	sort.SliceStable(members, func(i, j int) bool {
		if !members[i].Since.Equal(members[j].Since) {
			return members[i].Since.Before(members[j].Since)
		}
		return members[i].Name < members[j].Name
	})
	byName := map[string]Member{}
	for _, m := range members {
		byName[m.Name] = m
	}
	ourID := c.fsm.clusterID()
	nonvoters := len(conf.Servers) - voters
	var errs []error
	for _, m := range members {
		if !m.Alive || m.RaftAddr == "" || m.Name == c.cfg.Name {
			continue
		}
		s, ok := inConf[raft.ServerID(m.Name)]
		if !ok && !admissible(m, ourID) {
			c.refuseForeign(m, ourID)
			continue
		}
		switch {
		case !ok && voters < c.cfg.Voters:
			if err := c.raft.AddVoter(raft.ServerID(m.Name), raft.ServerAddress(m.RaftAddr), 0, c.cfg.ApplyTimeout).Error(); err != nil {
				errs = append(errs, fmt.Errorf("add voter %s: %w", m.Name, err))
				continue
			}
			voters++
			c.log.Info("added raft voter", "peer", m.Name, "addr", m.RaftAddr)
		case !ok && nonvoters < c.cfg.Nonvoters:
			if err := c.raft.AddNonvoter(raft.ServerID(m.Name), raft.ServerAddress(m.RaftAddr), 0, c.cfg.ApplyTimeout).Error(); err != nil {
				errs = append(errs, fmt.Errorf("add non-voter %s: %w", m.Name, err))
				continue
			}
			nonvoters++
			c.log.Info("added raft non-voter", "peer", m.Name, "addr", m.RaftAddr)
		case !ok:
			// Every other peer is a client: it forwards to members and learns by gossip.
		case string(s.Address) != m.RaftAddr && (m.ClusterID == "" || m.ClusterID == ourID):
			// The peer came back on another address: same suffrage, new address.
			if s.Suffrage == raft.Voter {
				errs = append(errs, c.raft.AddVoter(s.ID, raft.ServerAddress(m.RaftAddr), 0, c.cfg.ApplyTimeout).Error())
			} else {
				errs = append(errs, c.raft.AddNonvoter(s.ID, raft.ServerAddress(m.RaftAddr), 0, c.cfg.ApplyTimeout).Error())
			}
		}
	}
	// Peers removed with rmpeer leave the configuration once they are down.
	for _, s := range conf.Servers {
		if m, known := byName[string(s.ID)]; s.ID != raft.ServerID(c.cfg.Name) && c.fsm.removed(string(s.ID)) && (!known || !m.Alive) {
			errs = append(errs, c.raft.RemoveServer(s.ID, 0, c.cfg.ApplyTimeout).Error())
			c.log.Info("removed peer left the raft configuration", "peer", s.ID)
		}
	}
	// Replace dead voters, one per round, oldest death first.
	var dead []Member
	for _, s := range conf.Servers {
		m, known := byName[string(s.ID)]
		if s.Suffrage == raft.Voter && s.ID != raft.ServerID(c.cfg.Name) && known && !m.Alive && now.Sub(m.Since) >= c.cfg.DeadVoterGrace {
			dead = append(dead, m)
		}
	}
	sort.Slice(dead, func(i, j int) bool { return dead[i].Since.Before(dead[j].Since) })
	if len(dead) > 0 {
		if spare, ok := c.healthyNonvoter(conf, byName); ok {
			if err := c.raft.AddVoter(spare.ID, spare.Address, 0, c.cfg.ApplyTimeout).Error(); err != nil {
				errs = append(errs, err)
			} else {
				errs = append(errs, c.raft.RemoveServer(raft.ServerID(dead[0].Name), 0, c.cfg.ApplyTimeout).Error())
				c.log.Info("replaced dead raft voter", "dead", dead[0].Name, "promoted", spare.ID)
			}
		}
	}
	// Fewer voters than wanted (a voter was removed): promote a healthy non-voter.
	if len(dead) == 0 && voters < c.cfg.Voters {
		if spare, ok := c.healthyNonvoter(conf, byName); ok {
			errs = append(errs, c.raft.AddVoter(spare.ID, spare.Address, 0, c.cfg.ApplyTimeout).Error())
			c.log.Info("promoted raft non-voter", "peer", spare.ID)
		}
	}
	// More voters than wanted (seen under load: a promotion that timed out on one leader and
	// a voter added on the next, whose configuration did not show it yet): demote the voter
	// that came alive last, never this leader, one per round. It stays a non-voter, still
	// replicated, so nothing it holds goes stale.
	if len(dead) == 0 && voters > c.cfg.Voters {
		if extra, ok := newestVoter(conf, members, c.cfg.Name); ok {
			errs = append(errs, c.raft.DemoteVoter(extra, 0, c.cfg.ApplyTimeout).Error())
			c.log.Info("demoted a raft voter beyond --raft-voters", "peer", extra, "voters", voters, "want", c.cfg.Voters)
		}
	}
	errs = append(errs, c.recordLiveness(byName, now))
	if c.cfg.ReclaimAfter > 0 {
		owners, dead := c.deathRecords()
		for peer, at := range dead {
			if m, known := byName[peer]; (known && m.Alive) || now.Sub(at) < c.cfg.ReclaimAfter || !owners[peer] {
				continue
			}
			released, err := c.RemovePeer(ctx, peer)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			c.log.Info("reclaimed the blocks of a dead peer", "dead_peer", peer, "dead_since", at, "dead_for", now.Sub(at).Round(time.Second), "blocks", len(released))
		}
	}
	return errors.Join(errs...)
}

// deathRecords copies the owners of blocks and the recorded death times. O(blocks).
func (c *Cluster) deathRecords() (owners map[string]bool, dead map[string]time.Time) {
	c.fsm.mu.RLock()
	defer c.fsm.mu.RUnlock()
	dead = make(map[string]time.Time, len(c.fsm.state.Dead))
	for k, v := range c.fsm.state.Dead {
		dead[k] = v
	}
	return c.fsm.state.owners(), dead
}

// livenessChanges decides what the leader records: every owner of blocks that is not alive
// and has no death record gets one (when membership saw it die, or now when this leader
// never saw it at all, e.g. it left the member list before this leader was elected); every
// recorded peer that is alive again, or owns nothing any more, is cleared. Pure; O(owners), at most maxLivenessBatch
// changes (the rest wait for the next round).
func livenessChanges(self string, owners map[string]bool, recorded map[string]time.Time, byName map[string]Member, now time.Time) (dead map[string]time.Time, alive []string) {
	names := make([]string, 0, len(owners)+len(recorded))
	for o := range owners {
		names = append(names, o)
	}
	for o := range recorded {
		if !owners[o] {
			names = append(names, o)
		}
	}
	sort.Strings(names)
	dead = map[string]time.Time{}
	for _, peer := range names {
		if len(dead)+len(alive) >= maxLivenessBatch {
			break
		}
		m, known := byName[peer]
		_, has := recorded[peer]
		switch {
		case peer == self || (known && m.Alive) || !owners[peer]:
			// Back, or owns nothing any more: nothing to reclaim, so no record to keep.
			if has {
				alive = append(alive, peer)
			}
		case !has:
			at := now
			if known && !m.Since.IsZero() && !m.Since.After(now) && m.Since.After(minDeathTime) {
				at = m.Since
			}
			dead[peer] = at.UTC()
		}
	}
	return dead, alive
}

// recordLiveness commits, on the leader, the death times of dead owners and clears those back
// alive: the record lives in the Raft state, so --reclaim-after counts from it on any later
// leader and for any duration. One command per round, only when something changed.
func (c *Cluster) recordLiveness(byName map[string]Member, now time.Time) error {
	owners, recorded := c.deathRecords()
	dead, alive := livenessChanges(c.cfg.Name, owners, recorded, byName, now)
	if len(dead) == 0 && len(alive) == 0 {
		return nil
	}
	data, err := json.Marshal(command{Op: opLiveness, Dead: dead, Alive: alive})
	if err != nil {
		return err
	}
	res, err := c.applyLocal(data)
	if err != nil {
		return fmt.Errorf("record peer liveness: %w", err)
	}
	if err := res.err(); err != nil {
		return fmt.Errorf("record peer liveness: %w", err)
	}
	for peer, at := range dead {
		c.log.Info("recorded the death of a peer that owns blocks", "dead_peer", peer, "since", at)
	}
	for _, peer := range alive {
		c.log.Info("peer that owns blocks is back; its death record is cleared", "returned_peer", peer)
	}
	return nil
}

// refuseForeign counts and logs (once per peer and cluster id) a member the leader will not add.
func (c *Cluster) refuseForeign(m Member, ourID string) {
	c.metrics.foreignRefused.Inc()
	c.mu.Lock()
	logged := c.refused[m.Name] == m.ClusterID+"/"+strconv.FormatBool(m.InCluster)
	c.refused[m.Name] = m.ClusterID + "/" + strconv.FormatBool(m.InCluster)
	if len(c.refused) > 4096 { // bound the memory a flood of names can take
		clear(c.refused)
	}
	c.mu.Unlock()
	if !logged {
		c.log.Warn("not adding a peer of another raft cluster", "peer", m.Name, "its_cluster", m.ClusterID,
			"says_in_cluster", m.InCluster, "our_cluster", ourID)
	}
}

// newestVoter is the voter of conf other than self that came alive last among members
// (sorted oldest first); voters not among members come first (nothing says they are alive).
// Pure.
func newestVoter(conf raft.Configuration, members []Member, self string) (raft.ServerID, bool) {
	voter := map[raft.ServerID]bool{}
	for _, s := range conf.Servers {
		if s.Suffrage == raft.Voter && s.ID != raft.ServerID(self) {
			voter[s.ID] = true
		}
	}
	for _, m := range members {
		delete(voter, raft.ServerID(m.Name)) // left: voters the mesh does not list
	}
	for id := range voter {
		return id, true
	}
	for i := len(members) - 1; i >= 0; i-- {
		id := raft.ServerID(members[i].Name)
		for _, s := range conf.Servers {
			if s.ID == id && s.Suffrage == raft.Voter && id != raft.ServerID(self) {
				return id, true
			}
		}
	}
	return "", false
}

func (c *Cluster) healthyNonvoter(conf raft.Configuration, byName map[string]Member) (raft.Server, bool) {
	for _, s := range conf.Servers {
		if m, ok := byName[string(s.ID)]; ok && s.Suffrage == raft.Nonvoter && m.Alive {
			return s, true
		}
	}
	return raft.Server{}, false
}

func (c *Cluster) ownedByPeer(peer string) []BlockOwnership {
	var out []BlockOwnership
	for _, row := range c.fsm.table() {
		if row.Owner == peer {
			out = append(out, row)
		}
	}
	return out
}

// apply runs cmd through the log: directly on the leader, forwarded from a follower.
func (c *Cluster) apply(ctx context.Context, cmd command) (commandResult, error) {
	data, err := json.Marshal(cmd)
	if err != nil {
		return commandResult{}, err
	}
	if c.raft.State() == raft.Leader {
		return c.leaderApply(cmd)
	}
	if c.cfg.Forward == nil {
		return commandResult{}, fmt.Errorf("%w: %s is not the leader and cannot forward", ErrNoQuorum, c.cfg.Name)
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.ApplyTimeout)
	defer cancel()
	// An election takes a moment and a leader may be stepping down: retry until one answers,
	// but no longer than one apply may take. A member asks its leader; a client (outside the
	// configuration, so it knows no leader) asks the Raft members the mesh names, the last
	// known leader first; a member that is not the leader passes it on one hop.
	var out []byte
	lastErr := fmt.Errorf("no raft leader is reachable from %s", c.cfg.Name)
	for out == nil {
		if c.raft.State() == raft.Leader {
			return c.leaderApply(cmd)
		}
		targets := c.forwardTargets()
		if leader, _ := c.raft.LeaderWithID(); leader != "" {
			targets = []raft.ServerAddress{leader}
		} else if c.isMember() {
			targets = nil // an election is under way: wait for its leader
		}
		// A client's target whose address does not answer (its underlay blocked from here)
		// must not use up the whole apply: each try gets a share, and the next round of this
		// loop sees the members the mesh reported meanwhile.
		perTry := c.cfg.ApplyTimeout
		if !c.isMember() {
			perTry /= 4
		}
		for _, t := range targets {
			var err error
			tctx, cancel := context.WithTimeout(ctx, perTry)
			out, err = c.cfg.Forward(tctx, t, data)
			cancel()
			if err == nil {
				break
			}
			out = nil
			lastErr = fmt.Errorf("forward to %s: %v", t, err)
			if ctx.Err() != nil {
				break
			}
		}
		if out != nil {
			break
		}
		select {
		case <-ctx.Done():
			return commandResult{}, fmt.Errorf("%w: %v", ErrNoQuorum, lastErr)
		case <-time.After(100 * time.Millisecond):
		}
	}
	var res commandResult
	if err := json.Unmarshal(out, &res); err != nil {
		return commandResult{}, fmt.Errorf("decode the leader's answer: %w", err)
	}
	return res, nil
}

func (c *Cluster) applyLocal(data []byte) (commandResult, error) {
	f := c.raft.Apply(data, c.cfg.ApplyTimeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return commandResult{}, fmt.Errorf("%w: %v", ErrNoQuorum, err)
		}
		return commandResult{}, fmt.Errorf("%w: raft apply: %v", ErrNoQuorum, err)
	}
	res, ok := f.Response().(commandResult)
	if !ok {
		return commandResult{}, fmt.Errorf("raft apply answered %T", f.Response())
	}
	return res, nil
}

// ApplyForwarded applies an encoded command forwarded by a follower or a client. The leader
// applies it; a member that is not the leader passes a client's command on to its leader, once
// (Hops bounds it to one hop, so two members that each think the other leads cannot loop).
func (c *Cluster) ApplyForwarded(data []byte) ([]byte, error) {
	var cmd command
	if err := json.Unmarshal(data, &cmd); err != nil {
		return nil, fmt.Errorf("decode forwarded command: %w", err)
	}
	if cmd.Op != opClaim && cmd.Op != opRemovePeer && cmd.Op != opNetworkCreate && cmd.Op != opNetworkRemove && cmd.Op != opRelease &&
		cmd.Op != opPolicyPut && cmd.Op != opPolicyRemove {
		return nil, fmt.Errorf("forwarded command has unknown operation %q", cmd.Op)
	}
	if c.raft.State() != raft.Leader {
		leader, _ := c.raft.LeaderWithID()
		if cmd.Hops > 0 || leader == "" || c.cfg.Forward == nil || !c.isMember() {
			return nil, ErrNotLeader
		}
		cmd.Hops++
		fwd, err := json.Marshal(cmd)
		if err != nil {
			return nil, err
		}
		c.metrics.forwardHops.Inc()
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ApplyTimeout)
		defer cancel()
		out, err := c.cfg.Forward(ctx, leader, fwd)
		if err != nil {
			return nil, fmt.Errorf("%w: passing on to leader %s: %v", ErrNotLeader, leader, err)
		}
		return out, nil
	}
	cmd.Hops = 0 // the log holds the command as its sender meant it
	res, err := c.leaderApply(cmd)
	if err != nil {
		return nil, err
	}
	return json.Marshal(res)
}

// leaderApply checks a claim or removal on the leader before it enters the log: the cluster
// is initialised first (so its networks are pinned before any claim), and a claim must name
// a defined network exactly. A refusal is counted, logged and answered as a conflict; the
// FSM checks again when applying, so a log replayed elsewhere cannot bring in a network.
func (c *Cluster) leaderApply(cmd command) (commandResult, error) {
	if cmd.Op == opClaim {
		if err := c.EnsureClusterID(); errors.Is(err, ErrInvalidNetwork) {
			c.refuseCommand("uninitialised", err)
			return commandResult{Err: err.Error(), Conflict: true}, nil
		} else if err != nil {
			return commandResult{}, err // no quorum right now: the caller may retry
		}
		var err error
		c.fsm.mu.RLock()
		err = c.fsm.state.checkClaim(cmd.Peer, cmd.Network)
		c.fsm.mu.RUnlock()
		if err == nil {
			err = checkRequest(cmd.Request)
		}
		if err != nil {
			c.refuseCommand("claim", err)
			return commandResult{Err: err.Error(), Conflict: true}, nil
		}
	}
	if cmd.Op == opRemovePeer {
		if err := checkPeerName(cmd.Peer); err != nil {
			c.refuseCommand("remove", err)
			return commandResult{Err: err.Error(), Conflict: true}, nil
		}
		// Removing a peer hands its blocks to whoever claims next: a member that could
		// remove a live peer could take its traffic. `rmpeer --force` overrides the view of
		// the peer it runs on, never the leader's: a peer the leader sees alive stays.
		c.mu.Lock()
		live := c.alive[cmd.Peer]
		c.mu.Unlock()
		if live {
			err := fmt.Errorf("%w: the leader sees %s alive; stop it (or wait until the mesh declares it dead) before removing it", ErrConflict, cmd.Peer)
			c.refuseCommand("remove_live", err)
			return commandResult{Err: err.Error(), Conflict: true}, nil
		}
	}
	if cmd.Op == opNetworkCreate || cmd.Op == opNetworkRemove || cmd.Op == opRelease {
		if res, refused, err := c.leaderCheckNetwork(cmd); refused {
			return res, err
		}
	}
	if cmd.Op == opPolicyPut || cmd.Op == opPolicyRemove {
		if res, refused, err := c.leaderCheckPolicy(cmd); refused {
			return res, err
		}
	}
	data, err := json.Marshal(cmd)
	if err != nil {
		return commandResult{}, err
	}
	return c.applyLocal(data)
}

// refuseCommand counts and logs a command the leader would not propose.
func (c *Cluster) refuseCommand(reason string, err error) {
	c.metrics.refused.WithLabelValues(reason).Inc()
	c.log.Error("refused a raft command; nothing changed", "reason", reason, "err", err)
}

// Owned implements BlockOwner: what the log gives peer, plus this peer's own claims recorded
// locally that the log (maybe not caught up yet) gives nobody else.
//
// Only blocks of n as the caller defines it count: a peer configured with another range than
// the cluster's must not allocate from blocks outside its own bridge's subnet. A recorded
// claim the table has seen (its version reached the claim's index) and no longer gives this
// peer was taken away (rmpeer --force, or a reclaim while this peer was partitioned): it is
// left out, so the allocator stops allocating from it. O(blocks of n).
func (c *Cluster) Owned(n Network, peer string) ([]netip.Prefix, error) {
	var owned []netip.Prefix
	var version uint64
	c.readTable(func(st *fsmState) { owned, version = st.owned(n.Name, peer), st.Version })
	owned = slices.DeleteFunc(owned, func(b netip.Prefix) bool { return !n.ContainsBlock(b) })
	if peer != c.cfg.Name {
		return owned, nil
	}
	cached, err := c.cache.Owned(n, peer)
	if err != nil {
		return nil, err
	}
	seen := map[netip.Prefix]bool{}
	for _, b := range owned {
		seen[b] = true
	}
	for _, b := range cached {
		if seen[b] {
			continue
		}
		var owner string
		var ok bool
		c.readTable(func(st *fsmState) { owner, ok = st.ownerOf(n.Name, b); version = st.Version })
		// A claim recorded before claim indexes were kept counts as seen by any table.
		seenAt := max(c.cache.claimIndex(n.Name, b), 1)
		if version >= seenAt {
			// Left out, not forgotten: the record is harmless while the table says otherwise,
			// and a table that was wrong (a forged delta on a client) cannot erase it.
			c.noteLost(n.Name, b, owner, version)
			continue
		}
		if ok && owner != peer {
			continue
		}
		owned = append(owned, b)
	}
	sort.Slice(owned, func(i, j int) bool { return owned[i].Addr().Less(owned[j].Addr()) })
	c.mu.Lock()
	for _, b := range owned {
		delete(c.lost, n.Name+"/"+b.String()) // back (claimed again)
	}
	c.mu.Unlock()
	return owned, nil
}

// noteLost logs, once per block, that the table no longer gives this peer a block it claimed.
func (c *Cluster) noteLost(network string, b netip.Prefix, owner string, version uint64) {
	key := network + "/" + b.String()
	c.mu.Lock()
	logged := c.lost[key]
	c.lost[key] = true
	c.mu.Unlock()
	if !logged {
		c.log.Error("the replicated table no longer gives this peer a block it claimed; it stops allocating from it",
			"network", network, "block", b, "owner_now", owner, "table_version", version)
	}
}

// Claim implements BlockOwner through the log. Without a reachable leader it fails with
// ErrNoQuorum.
func (c *Cluster) Claim(ctx context.Context, n Network, peer string) (netip.Prefix, error) {
	key := n.Name + "/" + peer
	request, err := c.takeClaimName(key)
	if err != nil {
		return netip.Prefix{}, err
	}
	res, err := c.apply(ctx, command{Op: opClaim, Network: n, Peer: peer, Request: request})
	if err == nil {
		err = res.err()
	}
	if err != nil {
		c.mu.Lock()
		c.unanswered[key] = append(c.unanswered[key], request)
		c.mu.Unlock()
		return netip.Prefix{}, err
	}
	if err := dropClaimName(c.cfg.DB, key, request); err != nil {
		// Left behind, the name only makes a later claim get a block this peer already owns;
		// the allocator then claims once more.
		c.log.Warn("could not forget an answered claim's name", "network", n.Name, "err", err)
	}
	if peer == c.cfg.Name {
		if err := c.cache.record(n.Name, res.Block, peer, res.Index); err != nil {
			return netip.Prefix{}, err
		}
	}
	return res.Block, nil
}

// takeClaimName returns the name for the next claim of key ("network/peer"): one that went
// unanswered, or a new one, written to the database before the claim is sent.
func (c *Cluster) takeClaimName(key string) (string, error) {
	c.mu.Lock()
	if names := c.unanswered[key]; len(names) > 0 {
		name := names[len(names)-1]
		if len(names) == 1 {
			delete(c.unanswered, key)
		} else {
			c.unanswered[key] = names[:len(names)-1]
		}
		c.mu.Unlock()
		return name, nil
	}
	c.mu.Unlock()
	name := rand.Text()
	if err := saveClaimName(c.cfg.DB, key, name); err != nil {
		return "", fmt.Errorf("record the claim's name: %w", err)
	}
	return name, nil
}

// RemovePeer returns every block of peer to the pool. Removing a peer that owns nothing
// succeeds, so it can be repeated.
func (c *Cluster) RemovePeer(ctx context.Context, peer string) ([]netip.Prefix, error) {
	if peer == "" {
		return nil, errors.New("remove peer: empty name")
	}
	res, err := c.apply(ctx, command{Op: opRemovePeer, Peer: peer})
	if err != nil {
		return nil, err
	}
	return res.Released, res.err()
}

// ClusterStatus describes the Raft side of IPAM.
type ClusterStatus struct {
	Leader    string           `json:"leader"`
	State     string           `json:"state"`
	Voters    []string         `json:"voters"`
	Nonvoters []string         `json:"nonvoters"`
	Blocks    []BlockOwnership `json:"blocks"`
	// Dead are the recorded death times of peers that own blocks (what --reclaim-after
	// counts from); on a client, as of the last table it fetched.
	Dead map[string]time.Time `json:"dead,omitempty"`
}

// Status reports leader, voters and the block table as this node knows them. A client, outside
// the configuration, reports what the last table it fetched from a member said.
func (c *Cluster) Status() ClusterStatus {
	_, leader := c.raft.LeaderWithID()
	st := ClusterStatus{Leader: string(leader), State: c.raft.State().String(), Voters: []string{}, Nonvoters: []string{}, Blocks: c.tableRows()}
	c.readTable(func(ts *fsmState) {
		for peer, at := range ts.Dead {
			if st.Dead == nil {
				st.Dead = map[string]time.Time{}
			}
			st.Dead[peer] = at
		}
	})
	conf := c.configuration()
	for _, s := range conf.Servers {
		if s.Suffrage == raft.Voter {
			st.Voters = append(st.Voters, string(s.ID))
		} else {
			st.Nonvoters = append(st.Nonvoters, string(s.ID))
		}
	}
	if !c.isMember() && !c.hadState {
		st.State = "Client"
		c.view.mu.Lock()
		if len(conf.Servers) == 0 {
			st.Leader = c.view.leader
			st.Voters = append(st.Voters, c.view.voters...)
			st.Nonvoters = append(st.Nonvoters, c.view.nonvoters...)
		}
		c.view.mu.Unlock()
	}
	sort.Strings(st.Voters)
	sort.Strings(st.Nonvoters)
	if st.Blocks == nil {
		st.Blocks = []BlockOwnership{}
	}
	return st
}

// ClusterID names the cluster this node belongs to; empty until the log (or, on a client, the
// gossiped table) says (a leader sets it with EnsureClusterID). Once known it is kept in the
// local database: a restarted peer, whose FSM is empty until the leader reaches it (or forever,
// if it was removed meanwhile), still says which cluster it is of.
func (c *Cluster) ClusterID() string {
	var id string
	c.readTable(func(st *fsmState) { id = st.ClusterID })
	c.mu.Lock()
	defer c.mu.Unlock()
	if id == "" {
		return c.savedID
	}
	if id != c.savedID {
		if err := saveClusterID(c.cfg.DB, id); err != nil {
			c.log.Warn("could not persist the cluster id", "err", err)
		} else {
			c.savedID = id
		}
	}
	return id
}

var (
	bucketCluster = []byte("ipam-cluster")
	keyClusterID  = []byte("id")
)

func loadClusterID(db *bolt.DB) (string, error) {
	var id string
	err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketCluster)
		if err != nil {
			return err
		}
		id = string(b.Get(keyClusterID))
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("read the cluster id: %w", err)
	}
	return id, nil
}

func saveClusterID(db *bolt.DB, id string) error {
	return db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketCluster).Put(keyClusterID, []byte(id))
	})
}

// EnsureClusterID gives the cluster its ID, and pins its networks (cfg.Networks), if it has
// none yet; only the leader does. Networks that fail CheckNetworks (against each other and the
// underlay addresses of the members it has observed) are not pinned and the cluster is not
// initialised: every claim is refused with this error until a leader configured with a valid
// range takes over (restart it with a corrected --ipalloc-range).
func (c *Cluster) EnsureClusterID() error {
	if c.raft.State() != raft.Leader || c.fsm.clusterID() != "" {
		return nil
	}
	c.mu.Lock()
	underlay := slices.Clone(c.underlay)
	c.mu.Unlock()
	if ap, err := netip.ParseAddrPort(string(c.cfg.Transport.LocalAddr())); err == nil {
		underlay = append(underlay, ap.Addr())
	}
	if err := CheckNetworks(c.cfg.Networks, underlay); err != nil {
		return fmt.Errorf("cannot initialise the cluster with this peer's networks: %w", err)
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return err
	}
	data, err := json.Marshal(command{Op: opInit, ClusterID: hex.EncodeToString(id), Networks: c.cfg.Networks})
	if err != nil {
		return err
	}
	res, err := c.applyLocal(data)
	if err != nil {
		return err
	}
	return res.err()
}

// Networks returns the networks the cluster defines, by name, as the table this node goes
// by says (empty until it knows). O(networks).
func (c *Cluster) Networks() []Network {
	var out []Network
	c.readTable(func(st *fsmState) {
		for _, n := range st.Networks {
			out = append(out, n)
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// networkMismatch says how this peer's configured networks differ from the cluster's ("" when
// they agree, or the cluster's are not known yet). Pure.
func networkMismatch(local []Network, st *fsmState) string {
	var diffs []string
	for _, n := range local {
		def, ok := st.Networks[n.Name]
		switch {
		case ok && def != n:
			diffs = append(diffs, fmt.Sprintf("network %s is %s with /%d blocks in the cluster, this peer is configured with %s and /%d blocks",
				n.Name, def.Subnet, def.BlockBits, n.Subnet, n.BlockBits))
		case !ok && st.Pinned:
			diffs = append(diffs, fmt.Sprintf("network %s (%s) is not defined in the cluster", n.Name, n.Subnet))
		}
	}
	return strings.Join(diffs, "; ")
}

// checkNetworkConfig logs at error level, once per change, and shows in a gauge when this
// peer's --ipalloc-range/--ipalloc-block differ from the cluster's: its claims are refused
// (it never splits the range), so it must be restarted with the cluster's values.
func (c *Cluster) checkNetworkConfig() {
	var msg string
	c.readTable(func(st *fsmState) { msg = networkMismatch(c.cfg.Networks, st) })
	c.mu.Lock()
	changed := msg != c.mismatch
	c.mismatch = msg
	c.mu.Unlock()
	if msg == "" {
		c.metrics.mismatch.Set(0)
		return
	}
	c.metrics.mismatch.Set(1)
	if changed {
		c.log.Error("this peer's network configuration differs from the cluster's; it gets no block until it is restarted "+
			"with the cluster's --ipalloc-range and --ipalloc-block", "mismatch", msg)
	}
}

// NetworkMismatch is the last mismatch checkNetworkConfig found ("" when none), for status.
func (c *Cluster) NetworkMismatch() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mismatch
}

// IsLeader says whether this node leads.
func (c *Cluster) IsLeader() bool { return c.raft.State() == raft.Leader }

// LeaderCh signals leadership changes of this node.
func (c *Cluster) LeaderCh() <-chan bool { return c.raft.LeaderCh() }

// slogWriter carries raft's hclog lines into slog at their own level.
type slogWriter struct {
	log *slog.Logger
}

func (w *slogWriter) Write(p []byte) (int, error) {
	sc := bufio.NewScanner(strings.NewReader(string(p)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		level := slog.LevelInfo
		for tag, l := range map[string]slog.Level{"[DEBUG]": slog.LevelDebug, "[TRACE]": slog.LevelDebug, "[WARN]": slog.LevelWarn, "[ERROR]": slog.LevelError} {
			if strings.HasPrefix(line, tag) {
				level = l
			}
		}
		w.log.Log(context.Background(), level, strings.TrimSpace(line[strings.Index(line, "]")+1:]), "component", "raft")
	}
	return len(p), nil
}

var _ io.Writer = (*slogWriter)(nil)
