package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// The replicated state machine: which peer owns which block of which network. Every change
// is a command in the Raft log; the FSM applies it deterministically, so every peer that has
// applied the same log holds the same table and no block is ever owned by two peers.

// Command operations.
const (
	opClaim      = "claim"
	opRemovePeer = "remove-peer"
	opInit       = "init"
	// opLiveness records peers' death times and clears those of peers back alive; the
	// leader commits it when membership changes, so --reclaim-after counts from a time every
	// member holds, across leader changes and for as long as it takes.
	opLiveness = "liveness"
	// opNetworkCreate adds a network at run time (`weft network create`, issue #13): it
	// passes the same checks as init's (CheckNetworks over the defined set plus the new one,
	// through defineNetworks) and the creation rules of checkCreate. opNetworkRemove takes
	// one away while no block of it is owned. See networks.go.
	opNetworkCreate = "network-create"
	opNetworkRemove = "network-rm"
	// opRelease returns one emptied block of a created network to the pool (its owner holds
	// no attachment in it any more), so that `weft network rm` succeeds once every container
	// is detached. See networks.go.
	opRelease = "release"
	// opPolicyPut stores a policy (`weft policy apply`, issue #15); opPolicyRemove takes one
	// away. See policies.go.
	opPolicyPut    = "policy-put"
	opPolicyRemove = "policy-rm"
)

// maxLivenessBatch bounds the peers one liveness command names.
const maxLivenessBatch = 256

// Death times outside [minDeathTime, maxDeathTime] are refused: the FSM must be deterministic,
// so it cannot compare with its own clock; the leader checks against now before proposing.
var (
	minDeathTime = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	maxDeathTime = time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC)
)

// ErrConflict means a command disagrees with the replicated state (e.g. a network defined with
// another range); the message says how.
var ErrConflict = errors.New("conflicts with the cluster's state")

// command is one Raft log entry.
type command struct {
	Op string `json:"op"`
	// Network travels with every claim: the first claim defines it in the cluster; a later
	// claim with a different definition is refused rather than silently merged.
	Network Network `json:"network,omitzero"`
	Peer    string  `json:"peer"`
	// Block travels with release: the block of Network that Peer returns.
	Block netip.Prefix `json:"block,omitzero"`
	// ClusterID travels with init, the first command the bootstrapping leader applies.
	ClusterID string `json:"cluster_id,omitempty"`
	// Networks travel with init: the cluster's networks as the bootstrapping leader was
	// configured (--ipalloc-range, --ipalloc-block). From then on a claim names one of them.
	Networks []Network `json:"networks,omitempty"`
	// Dead (peer → when it died) and Alive (peers back) travel with liveness.
	Dead  map[string]time.Time `json:"dead,omitempty"`
	Alive []string             `json:"alive,omitempty"`
	// Policy travels with policy-put (the whole object) and policy-rm (its name).
	Policy *PolicyObject `json:"policy,omitempty"`
	// Hops counts how often the command was passed on between members (at most once).
	Hops int `json:"hops,omitempty"`
	// Request names one claim however often it is sent: a claimer whose answer was lost (the
	// leader committed, then stepped down or the forward timed out) sends the same claim again
	// under the same name, and the FSM answers with the block it already gave, instead of a
	// second one. Empty (older peers): every claim is new.
	Request string `json:"request,omitempty"`
}

// maxRequestLen bounds command.Request (a claimer sends 26 characters: crypto/rand.Text).
const maxRequestLen = 64

// claimRecord is the last claim a peer made in a network: its request name, the block it got
// and the log index that gave it.
type claimRecord struct {
	Request string       `json:"request"`
	Block   netip.Prefix `json:"block"`
	Index   uint64       `json:"index"`
}

// commandResult is what applying a command answers; Err is a string so it can cross the
// leader-forwarding RPC.
type commandResult struct {
	Block netip.Prefix `json:"block,omitzero"`
	// Index is the log index of a claim: the claimer keeps it with the block, so it can tell
	// a table that has not seen the claim yet from one that saw it and later took it away.
	Index    uint64         `json:"index,omitempty"`
	Released []netip.Prefix `json:"released,omitempty"`
	Err      string         `json:"err,omitempty"`
	// Conflict/Full let the caller rebuild the sentinel on the far side of an RPC.
	Conflict bool `json:"conflict,omitempty"`
	Full     bool `json:"full,omitempty"`
	// Unknown/InUse: a network command named no network, or one whose blocks are owned.
	// Invalid: a network definition that breaks the bounds.
	Unknown bool `json:"unknown,omitempty"`
	InUse   bool `json:"in_use,omitempty"`
	Invalid bool `json:"invalid,omitempty"`
	// NoPolicy, PolicyFull, BadPolicy: a policy command named no policy, found the table
	// full, or carried a policy that breaks the bounds.
	NoPolicy   bool `json:"no_policy,omitempty"`
	PolicyFull bool `json:"policy_full,omitempty"`
	BadPolicy  bool `json:"bad_policy,omitempty"`
}

func (r commandResult) err() error {
	switch {
	case r.Err == "":
		return nil
	case r.Full:
		return fmt.Errorf("%w: %s", ErrRangeFull, r.Err)
	case r.Unknown:
		return fmt.Errorf("%w: %s", ErrUnknownNetwork, r.Err)
	case r.InUse:
		return fmt.Errorf("%w: %s", ErrNetworkInUse, r.Err)
	case r.Invalid:
		return fmt.Errorf("%w: %s", ErrInvalidNetwork, r.Err)
	case r.NoPolicy:
		return fmt.Errorf("%w: %s", ErrUnknownPolicy, r.Err)
	case r.PolicyFull:
		return fmt.Errorf("%w: %s", ErrPolicyLimit, r.Err)
	case r.BadPolicy:
		return fmt.Errorf("%w: %s", ErrInvalidPolicy, r.Err)
	case r.Conflict:
		return fmt.Errorf("%w: %s", ErrConflict, r.Err)
	}
	return errors.New(r.Err)
}

// fsmState is the whole replicated table; it is also the snapshot format.
type fsmState struct {
	// ClusterID names this cluster; peers gossip it so two clusters never merge.
	ClusterID string             `json:"cluster_id,omitempty"`
	Networks  map[string]Network `json:"networks"`
	// Owners maps network name → block → owning peer.
	Owners map[string]map[netip.Prefix]string `json:"owners"`
	// Removed lists peers removed with rmpeer (or reclaimed) and not back since; the
	// leader takes them out of the Raft configuration.
	Removed map[string]bool `json:"removed,omitempty"`
	// Pinned: the networks were set by init (from the bootstrapping leader's configuration)
	// and no claim may define one. A cluster whose log predates pinning has it false: its
	// first claim defined its one network, and no later claim may define another.
	Pinned bool `json:"pinned,omitempty"`
	// Dead maps a peer that owns blocks and is dead to when it died, as the leader's
	// membership saw it; cleared when it comes back, claims, or is removed. Bounded by the
	// number of block owners.
	Dead map[string]time.Time `json:"dead,omitempty"`
	// Version is the Raft index of the last command that changed the table: clients that
	// learn the table by gossip order tables and deltas by it.
	Version uint64 `json:"version,omitempty"`
	// Policies are the replicated policies by name (issue #15; absent from older snapshots),
	// PolicyIndex the Raft index of the last policy change (watchers compare it).
	Policies    map[string]PolicyObject `json:"policies,omitempty"`
	PolicyIndex uint64                  `json:"policy_index,omitempty"`
	// Claims holds each peer's last claim per network (network → peer → record), so that a
	// claim sent again after its answer was lost gets the same block (command.Request). Only
	// Raft members need it: the table served to clients leaves it out (clone). One record per
	// peer and network that claimed; rmpeer and network removal drop theirs.
	Claims map[string]map[string]claimRecord `json:"claims,omitempty"`
}

func newFSMState() fsmState {
	return fsmState{Networks: map[string]Network{}, Owners: map[string]map[netip.Prefix]string{}, Removed: map[string]bool{}, Dead: map[string]time.Time{},
		Policies: map[string]PolicyObject{}}
}

// fsm implements raft.FSM. Apply runs on raft's single FSM goroutine; reads come from any
// goroutine, so mu guards state.
type fsm struct {
	mu    sync.RWMutex // guards state and recent
	state fsmState
	// recent holds the last maxRecentDeltas table changes, oldest first, for the leader to
	// gossip to clients (see table.go).
	recent []tableDelta
	// changed is signalled (without blocking) after every table change.
	changed chan struct{}
	// refused counts and logs a command the FSM refused (set before raft starts; never nil).
	refused func(reason string, err error)
	// claimsRepeated counts claims answered with the block an earlier send of the same
	// request got (set before raft starts; never nil).
	claimsRepeated prometheus.Counter
}

// maxRecentDeltas bounds the deltas kept for gossip; a client further behind fetches the table.
const maxRecentDeltas = 256

func newFSM() *fsm {
	return &fsm{state: newFSMState(), changed: make(chan struct{}, 1), refused: func(string, error) {},
		claimsRepeated: prometheus.NewCounter(prometheus.CounterOpts{Name: "unregistered"})}
}

// Apply implements raft.FSM.
func (f *fsm) Apply(l *raft.Log) any {
	var cmd command
	if err := json.Unmarshal(l.Data, &cmd); err != nil {
		err = fmt.Errorf("undecodable log entry %d: %v", l.Index, err)
		f.refused("malformed", err)
		return commandResult{Err: err.Error()}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var res commandResult
	d := tableDelta{Prev: f.state.Version, Index: l.Index, Op: cmd.Op, Peer: cmd.Peer, ClusterID: f.state.ClusterID}
	switch cmd.Op {
	case opClaim:
		var again bool
		res, again = f.claim(cmd, l.Index)
		if !res.Block.IsValid() {
			if !res.Full {
				f.refused("claim", errors.New(res.Err))
			}
			return res // refused: nothing changed
		}
		if again {
			f.claimsRepeated.Inc()
			return res // the same claim sent again: its block, nothing changed
		}
		d.Network, d.Block = &cmd.Network, res.Block
	case opRemovePeer:
		if err := checkPeerName(cmd.Peer); err != nil {
			f.refused("remove", err)
			return commandResult{Err: err.Error(), Conflict: true}
		}
		res = f.removePeer(cmd.Peer)
	case opInit:
		if f.state.ClusterID != "" { // the first init wins; later ones are no-ops
			return commandResult{}
		}
		if !clusterIDRE.MatchString(cmd.ClusterID) {
			err := fmt.Errorf("init in log entry %d has cluster id %q", l.Index, cmd.ClusterID)
			f.refused("init", err)
			return commandResult{Err: err.Error(), Conflict: true}
		}
		// The networks first: an init whose networks fail the checks changes nothing, and
		// the leader (which checked its own before proposing) tries again.
		if err := f.state.defineNetworks(cmd.Networks); err != nil {
			f.refused("init", err)
			return commandResult{Err: err.Error(), Conflict: true}
		}
		f.state.ClusterID = cmd.ClusterID
		f.state.Pinned = len(cmd.Networks) > 0
		d.ClusterID, d.Networks, d.Pinned = cmd.ClusterID, cmd.Networks, f.state.Pinned
	case opLiveness:
		// Not a block-table change: the version and the gossiped deltas stay as they are.
		if err := f.state.liveness(cmd.Dead, cmd.Alive); err != nil {
			f.refused("liveness", err)
			return commandResult{Err: err.Error(), Conflict: true}
		}
		return commandResult{}
	case opNetworkCreate:
		if err := f.state.createNetwork(cmd.Network, nil); err != nil {
			f.refused("network_create", err)
			return networkResult(err)
		}
		n := cmd.Network
		d.Network = &n
	case opNetworkRemove:
		if err := f.state.removeNetwork(cmd.Network.Name); err != nil {
			f.refused("network_rm", err)
			return networkResult(err)
		}
		d.Network = &Network{Name: cmd.Network.Name}
	case opRelease:
		if err := f.state.releaseBlock(cmd.Peer, cmd.Network.Name, cmd.Block); err != nil {
			f.refused("release", err)
			return networkResult(err)
		}
		d.Network, d.Block = &Network{Name: cmd.Network.Name}, cmd.Block
		res.Released = []netip.Prefix{cmd.Block}
	case opPolicyPut:
		if cmd.Policy == nil {
			err := fmt.Errorf("%w: policy put in log entry %d without a policy", ErrInvalidPolicy, l.Index)
			f.refused("policy_put", err)
			return policyResult(err)
		}
		p, changed, err := f.state.putPolicy(*cmd.Policy, l.Index)
		if err != nil {
			f.refused("policy_put", err)
			return policyResult(err)
		}
		if !changed { // a retried apply: not a table change
			return commandResult{Index: p.Version}
		}
		d.Policy, res.Index = &p, p.Version
	case opPolicyRemove:
		if cmd.Policy == nil {
			err := fmt.Errorf("%w: policy rm in log entry %d without a policy", ErrInvalidPolicy, l.Index)
			f.refused("policy_rm", err)
			return policyResult(err)
		}
		if err := f.state.removePolicy(cmd.Policy.Name, l.Index); err != nil {
			f.refused("policy_rm", err)
			return policyResult(err)
		}
		d.Policy = &PolicyObject{Name: cmd.Policy.Name}
	default:
		err := fmt.Errorf("unknown operation %q in log entry %d", cmd.Op, l.Index)
		f.refused("unknown", err)
		return commandResult{Err: err.Error()}
	}
	f.state.Version = l.Index
	f.recent = append(f.recent, d)
	if len(f.recent) > maxRecentDeltas {
		f.recent = append(f.recent[:0:0], f.recent[len(f.recent)-maxRecentDeltas:]...)
	}
	select {
	case f.changed <- struct{}{}:
	default:
	}
	return res
}

// claim gives cmd.Peer the lowest block nobody owns, at log index. The FSM picks the block,
// so it is always one of the network's, of its block size. A claim whose request the peer's
// last claim in the network already carried gets that claim's block and index again, with
// again set, as long as the peer still owns the block. Caller holds mu. O(blocks of the
// network).
func (f *fsm) claim(cmd command, index uint64) (res commandResult, again bool) {
	n := cmd.Network
	if err := f.state.checkClaim(cmd.Peer, n); err != nil {
		return commandResult{Err: err.Error(), Conflict: true}, false
	}
	if err := checkRequest(cmd.Request); err != nil {
		return commandResult{Err: err.Error(), Conflict: true}, false
	}
	if rec, ok := f.state.Claims[n.Name][cmd.Peer]; ok && cmd.Request != "" && rec.Request == cmd.Request {
		if owner, _ := f.state.ownerOf(n.Name, rec.Block); owner == cmd.Peer {
			return commandResult{Block: rec.Block, Index: rec.Index}, true
		}
	}
	if _, ok := f.state.Networks[n.Name]; !ok {
		f.state.Networks[n.Name] = n // an unpinned (pre-pinning) cluster's first claim
	}
	delete(f.state.Removed, cmd.Peer) // it is back
	delete(f.state.Dead, cmd.Peer)
	owners := f.state.Owners[n.Name]
	if owners == nil {
		owners = map[netip.Prefix]string{}
		f.state.Owners[n.Name] = owners
	}
	for i := 0; i < n.NumBlocks(); i++ {
		b := n.Block(i)
		if _, taken := owners[b]; !taken {
			owners[b] = cmd.Peer
			if cmd.Request != "" {
				f.state.recordClaim(n.Name, cmd.Peer, claimRecord{Request: cmd.Request, Block: b, Index: index})
			}
			return commandResult{Block: b, Index: index}, false
		}
	}
	return commandResult{Full: true, Err: fmt.Sprintf("every block of %s (%s) is owned", n.Name, n.Subnet)}, false
}

// checkRequest refuses a claim request name longer than maxRequestLen.
func checkRequest(request string) error {
	if len(request) > maxRequestLen {
		return fmt.Errorf("%w: claim request name of %d bytes, at most %d", ErrConflict, len(request), maxRequestLen)
	}
	return nil
}

// recordClaim keeps rec as peer's last claim in network. Caller holds the state's lock.
func (st *fsmState) recordClaim(network, peer string, rec claimRecord) {
	if st.Claims == nil {
		st.Claims = map[string]map[string]claimRecord{}
	}
	if st.Claims[network] == nil {
		st.Claims[network] = map[string]claimRecord{}
	}
	st.Claims[network][peer] = rec
}

// removePeer returns every block of peer to the pool. Removing a peer that owns nothing is
// success, so `weft rmpeer` can be repeated. Caller holds mu.
func (f *fsm) removePeer(peer string) commandResult {
	var released []netip.Prefix
	for _, owners := range f.state.Owners {
		for b, owner := range owners {
			if owner == peer {
				delete(owners, b)
				released = append(released, b)
			}
		}
	}
	sort.Slice(released, func(i, j int) bool { return released[i].Addr().Less(released[j].Addr()) })
	for network, recs := range f.state.Claims {
		delete(recs, peer)
		if len(recs) == 0 {
			delete(f.state.Claims, network)
		}
	}
	f.state.Removed[peer] = true
	delete(f.state.Dead, peer)
	return commandResult{Released: released}
}

// checkPeerName refuses an empty or oversized peer name.
func checkPeerName(peer string) error {
	if peer == "" || len(peer) > maxNameLen {
		return fmt.Errorf("%w: peer name %q must be 1-%d bytes", ErrConflict, peer, maxNameLen)
	}
	return nil
}

// checkClaim says whether peer may claim a block of n: n must be a network the cluster
// defines, exactly as defined. Only a cluster whose log predates pinning, and has no network
// yet, lets a claim define its network, and then only one that passes CheckNetworks. Pure
// over st; the leader runs it before proposing and the FSM again when applying, so neither a
// forwarded command nor a replayed log can bring in a network.
func (st *fsmState) checkClaim(peer string, n Network) error {
	if err := checkPeerName(peer); err != nil {
		return err
	}
	def, ok := st.Networks[n.Name]
	switch {
	case ok && def != n:
		return fmt.Errorf("%w: network %s is %s with /%d blocks in the cluster, but peer %s asks for %s with /%d blocks",
			ErrConflict, n.Name, def.Subnet, def.BlockBits, peer, n.Subnet, n.BlockBits)
	case ok:
		return nil
	case st.Pinned || len(st.Networks) > 0:
		return fmt.Errorf("%w: peer %s claims a block of network %q (%s), which the cluster does not define",
			ErrConflict, peer, n.Name, n.Subnet)
	}
	if err := CheckNetworks([]Network{n}, nil); err != nil {
		return fmt.Errorf("%w: peer %s defines a network by claim: %w", ErrConflict, peer, err)
	}
	return nil
}

// defineNetworks adds nets to the defined networks if the whole set passes CheckNetworks;
// otherwise it changes nothing. A network already defined identically is kept as it is.
func (st *fsmState) defineNetworks(nets []Network) error {
	all := make([]Network, 0, len(st.Networks)+len(nets))
	for _, n := range st.Networks {
		all = append(all, n)
	}
	for _, n := range nets {
		if def, ok := st.Networks[n.Name]; ok {
			if def != n {
				return fmt.Errorf("%w: network %s is already %s with /%d blocks, not %s with /%d",
					ErrConflict, n.Name, def.Subnet, def.BlockBits, n.Subnet, n.BlockBits)
			}
			continue
		}
		all = append(all, n)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	if err := CheckNetworks(all, nil); err != nil {
		return fmt.Errorf("%w: %w", ErrConflict, err)
	}
	for _, n := range nets {
		st.Networks[n.Name] = n
	}
	return nil
}

// liveness records deaths and clears returns, all or nothing. Only owners of blocks get a
// death record (reclaim is about their blocks), which bounds Dead by the owners.
// O(batch + blocks) to find the owners.
func (st *fsmState) liveness(dead map[string]time.Time, alive []string) error {
	if len(dead)+len(alive) > maxLivenessBatch {
		return fmt.Errorf("%w: liveness names %d peers, at most %d", ErrConflict, len(dead)+len(alive), maxLivenessBatch)
	}
	owners := st.owners()
	for peer, at := range dead {
		if err := checkPeerName(peer); err != nil {
			return err
		}
		if at.Before(minDeathTime) || at.After(maxDeathTime) {
			return fmt.Errorf("%w: death time %s of peer %s is out of range", ErrConflict, at.Format(time.RFC3339), peer)
		}
	}
	for _, peer := range alive {
		if err := checkPeerName(peer); err != nil {
			return err
		}
	}
	for peer, at := range dead {
		if _, known := st.Dead[peer]; !known && owners[peer] {
			st.Dead[peer] = at.UTC()
		}
	}
	for _, peer := range alive {
		delete(st.Dead, peer)
	}
	return nil
}

// owners is the set of peers that own at least one block. O(blocks).
func (st *fsmState) owners() map[string]bool {
	out := map[string]bool{}
	for _, owners := range st.Owners {
		for _, o := range owners {
			out[o] = true
		}
	}
	return out
}

// owned lists the blocks of network owned by peer, in address order.
func (st *fsmState) owned(network, peer string) []netip.Prefix {
	var out []netip.Prefix
	for b, owner := range st.Owners[network] {
		if owner == peer {
			out = append(out, b)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr().Less(out[j].Addr()) })
	return out
}

// ownerOf says who owns block b of network.
func (st *fsmState) ownerOf(network string, b netip.Prefix) (string, bool) {
	owner, ok := st.Owners[network][b]
	return owner, ok
}

func (f *fsm) clusterID() string {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.ClusterID
}

// removed says whether peer was removed and has not claimed since.
func (f *fsm) removed(peer string) bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Removed[peer]
}

// BlockOwnership is one row of the replicated table.
type BlockOwnership struct {
	Network string       `json:"network"`
	CIDR    netip.Prefix `json:"cidr"`
	Owner   string       `json:"owner"`
}

// table returns every owned block, ordered by network and address.
func (f *fsm) table() []BlockOwnership {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.table()
}

// version is the Raft index of the last table change applied here.
func (f *fsm) version() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Version
}

// copyState returns a deep copy of the table (to serve it to a client).
func (f *fsm) copyState() fsmState {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.clone()
}

// deltasAfter returns the recent deltas with an index above after, oldest first.
func (f *fsm) deltasAfter(after uint64) []tableDelta {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []tableDelta
	for _, d := range f.recent {
		if d.Index > after {
			out = append(out, d)
		}
	}
	return out
}

func (st *fsmState) clone() fsmState {
	out := newFSMState()
	out.ClusterID, out.Version, out.Pinned, out.PolicyIndex = st.ClusterID, st.Version, st.Pinned, st.PolicyIndex
	for k, v := range st.Policies {
		out.Policies[k] = v // the spec is never changed in place, so it may be shared
	}
	for k, v := range st.Dead {
		out.Dead[k] = v
	}
	for k, v := range st.Networks {
		out.Networks[k] = v
	}
	for k, v := range st.Removed {
		out.Removed[k] = v
	}
	for n, owners := range st.Owners {
		m := make(map[netip.Prefix]string, len(owners))
		for b, o := range owners {
			m[b] = o
		}
		out.Owners[n] = m
	}
	return out
}

// table lists every owned block, ordered by network and address.
func (st *fsmState) table() []BlockOwnership {
	var out []BlockOwnership
	for network, owners := range st.Owners {
		for b, owner := range owners {
			out = append(out, BlockOwnership{Network: network, CIDR: b, Owner: owner})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Network != out[j].Network {
			return out[i].Network < out[j].Network
		}
		return out[i].CIDR.Addr().Less(out[j].CIDR.Addr())
	})
	return out
}

// Snapshot implements raft.FSM.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	data, err := json.Marshal(f.state)
	if err != nil {
		return nil, err
	}
	return fsmSnapshot(data), nil
}

// Restore implements raft.FSM. A snapshot that does not decode or validate leaves the state
// as it was.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var st fsmState
	if err := json.NewDecoder(rc).Decode(&st); err != nil {
		return fmt.Errorf("decode ipam snapshot: %w", err)
	}
	if st.Networks == nil {
		st.Networks = map[string]Network{}
	}
	if st.Owners == nil {
		st.Owners = map[string]map[netip.Prefix]string{}
	}
	if st.Removed == nil {
		st.Removed = map[string]bool{}
	}
	if st.Dead == nil {
		st.Dead = map[string]time.Time{}
	}
	if st.Policies == nil {
		st.Policies = map[string]PolicyObject{}
	}
	if err := st.validate(); err != nil {
		f.refused("snapshot", err)
		return fmt.Errorf("ipam snapshot: %w", err)
	}
	f.mu.Lock()
	f.state = st
	f.recent = nil // a restored table is not reachable by the deltas kept before it
	f.mu.Unlock()
	return nil
}

type fsmSnapshot []byte

func (s fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s fsmSnapshot) Release() {}
