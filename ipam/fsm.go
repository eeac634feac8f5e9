package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"sync"

	"github.com/hashicorp/raft"
)

// The replicated state machine: which peer owns which block of which network. Every change
// is a command in the Raft log; the FSM applies it deterministically, so every peer that has
// applied the same log holds the same table and no block is ever owned by two peers.

// Command operations.
const (
	opClaim      = "claim"
	opRemovePeer = "remove-peer"
	opInit       = "init"
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
	// ClusterID travels with init, the first command the bootstrapping leader applies.
	ClusterID string `json:"cluster_id,omitempty"`
	// Hops counts how often the command was passed on between members (at most once).
	Hops int `json:"hops,omitempty"`
}

// commandResult is what applying a command answers; Err is a string so it can cross the
// leader-forwarding RPC.
type commandResult struct {
	Block    netip.Prefix   `json:"block,omitzero"`
	Released []netip.Prefix `json:"released,omitempty"`
	Err      string         `json:"err,omitempty"`
	// Conflict/Full let the caller rebuild the sentinel on the far side of an RPC.
	Conflict bool `json:"conflict,omitempty"`
	Full     bool `json:"full,omitempty"`
}

func (r commandResult) err() error {
	switch {
	case r.Err == "":
		return nil
	case r.Full:
		return fmt.Errorf("%w: %s", ErrRangeFull, r.Err)
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
	// Version is the Raft index of the last command that changed the table: clients that
	// learn the table by gossip order tables and deltas by it.
	Version uint64 `json:"version,omitempty"`
}

func newFSMState() fsmState {
	return fsmState{Networks: map[string]Network{}, Owners: map[string]map[netip.Prefix]string{}, Removed: map[string]bool{}}
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
}

// maxRecentDeltas bounds the deltas kept for gossip; a client further behind fetches the table.
const maxRecentDeltas = 256

func newFSM() *fsm {
	return &fsm{state: newFSMState(), changed: make(chan struct{}, 1)}
}

// Apply implements raft.FSM.
func (f *fsm) Apply(l *raft.Log) any {
	var cmd command
	if err := json.Unmarshal(l.Data, &cmd); err != nil {
		return commandResult{Err: fmt.Sprintf("undecodable log entry %d: %v", l.Index, err)}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var res commandResult
	d := tableDelta{Prev: f.state.Version, Index: l.Index, Op: cmd.Op, Peer: cmd.Peer, ClusterID: f.state.ClusterID}
	switch cmd.Op {
	case opClaim:
		res = f.claim(cmd)
		if !res.Block.IsValid() {
			return res // refused: nothing changed
		}
		d.Network, d.Block = &cmd.Network, res.Block
	case opRemovePeer:
		res = f.removePeer(cmd.Peer)
	case opInit:
		if f.state.ClusterID != "" { // the first init wins; later ones are no-ops
			return commandResult{}
		}
		f.state.ClusterID = cmd.ClusterID
		d.ClusterID = cmd.ClusterID
	default:
		return commandResult{Err: fmt.Sprintf("unknown operation %q in log entry %d", cmd.Op, l.Index)}
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

// claim gives cmd.Peer the lowest block nobody owns. Caller holds mu.
func (f *fsm) claim(cmd command) commandResult {
	n := cmd.Network
	if err := n.Validate(); err != nil {
		return commandResult{Err: err.Error(), Conflict: true}
	}
	if cmd.Peer == "" {
		return commandResult{Err: "claim without a peer name", Conflict: true}
	}
	if def, ok := f.state.Networks[n.Name]; ok && def != n {
		return commandResult{Conflict: true, Err: fmt.Sprintf("network %s is %s with /%d blocks in the cluster, but peer %s asks for %s with /%d blocks",
			n.Name, def.Subnet, def.BlockBits, cmd.Peer, n.Subnet, n.BlockBits)}
	}
	f.state.Networks[n.Name] = n
	delete(f.state.Removed, cmd.Peer) // it is back
	owners := f.state.Owners[n.Name]
	if owners == nil {
		owners = map[netip.Prefix]string{}
		f.state.Owners[n.Name] = owners
	}
	for i := 0; i < n.NumBlocks(); i++ {
		b := n.Block(i)
		if _, taken := owners[b]; !taken {
			owners[b] = cmd.Peer
			return commandResult{Block: b}
		}
	}
	return commandResult{Full: true, Err: fmt.Sprintf("every block of %s (%s) is owned", n.Name, n.Subnet)}
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
	f.state.Removed[peer] = true
	return commandResult{Released: released}
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
	out.ClusterID, out.Version = st.ClusterID, st.Version
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
	if err := st.validate(); err != nil {
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
