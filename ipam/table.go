package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"sync"

	"github.com/weftnet/weft/mesh/identity"
)

// How a client (a peer outside the Raft configuration) learns the block table without
// burdening the leader as N grows:
//
//   - Every change the FSM applies is one tableDelta (prev index → index, what changed). Only
//     the leader gossips it, once, on TableChannel; the mesh passes each message on epidemically
//     (O(log N) rounds, O(1) sends per peer per delta). Leader cost per change: O(1), whatever N.
//   - Push/pull state on TableChannel is only {index, conf index}: a few bytes, O(1) per exchange.
//   - A peer that sees a gap (a delta whose prev is not its index, or a remote index above its
//     own) fetches the whole table from a random Raft member over the authenticated transport
//     (GET /v1/raft/table), at most once per fetch interval. Fetches land on voters and
//     non-voters alike, so the leader serves about 1/M of them (M members, bounded by flags).
//
// Everything received is untrusted: deltas and tables are validated (networks well formed,
// blocks inside their network, owners named, indexes that move forward and not absurdly far)
// and a bad one is rejected, counted and logged without changing the table.
//
// Who may speak for the table (with ClusterConfig.Keys set, i.e. a cluster key): gossip and
// the transport prove only the cluster key, which every member holds, so a member could feed
// clients a forged delta (routes to its own host). So:
//
//   - The leader signs each delta it gossips with its identity, its name inside the signed
//     message (signedDelta). A client applies a delta only if the signer is a voter or
//     non-voter of the configuration its table holds (learnt by fetches) and the signature
//     verifies against the key the mesh pinned for that name. Non-voters too: a non-voter
//     promoted and elected before this client refetched is still in the held set.
//   - A fetched table is accepted only from a server whose transport certificate proved its
//     name (the leaf key is the pinned identity; see transport.go), and that name must be a
//     member of the configuration the client holds.
//   - Bootstrap: a client with no configuration yet (its first fetch, or every member it
//     knew is gone) accepts a table from a server that proved a name the table itself lists
//     as a voter or non-voter, once a second such server, of another name, reported the same
//     configuration (one server is enough when the mesh names a single Raft member). This
//     proves two distinct identities pinned by the mesh, each holding the cluster key, name
//     the same configuration with themselves in it: a lone rogue key holder cannot make a
//     client trust a configuration of its own (an honest member would report another), but
//     two colluding ones can, and so can a rogue when it is the only member the mesh names.
//     Voters only would prove nothing more, since the servers name the set either way.
//
// Cost: the leader signs each delta once (O(1), whatever N); each peer verifies each delta
// once (one ed25519 verification, tens of µs, and O(M) name comparisons).

// TableChannel is the gossip channel of the block table; the router registers the handler
// returned by Cluster.TableHandler under this name.
const TableChannel = "ipam-table"

// Bounds on untrusted table input.
const (
	// maxDeltaBytes bounds one gossiped delta (a real one is ~200 bytes, ~400 signed).
	maxDeltaBytes = 1536
	// maxHintBytes bounds one push/pull state of the channel.
	maxHintBytes = 128
	// maxTableBytes bounds a fetched table.
	maxTableBytes = 16 << 20
	// maxIndexAhead: a delta more than this many Raft indexes ahead of this peer's table is
	// from the future (no cluster commits that much between two gossip rounds). A peer with
	// no table yet accepts only fetched tables, which come from Raft members.
	maxIndexAhead = 1 << 16
	// maxNameLen bounds peer names inside table entries.
	maxNameLen = 128
)

// ErrBadTable marks a gossiped delta or fetched table that was rejected.
var ErrBadTable = errors.New("bad block table")

// errForeign marks a delta of another cluster.
var errForeign = errors.New("of another cluster")

// errFuture marks an index too far ahead of this peer's table to be real.
var errFuture = errors.New("index from the future")

// errTableGap means a delta does not follow this peer's table: fetch the whole table.
var errTableGap = errors.New("block table delta does not follow the local table")

var clusterIDRE = regexp.MustCompile(`^[a-z0-9._-]{1,32}$`)

// tableDelta is one change of the block table, as applied at Raft index Index; Prev is the
// index of the change before it, so a receiver knows whether it missed one.
type tableDelta struct {
	Prev  uint64 `json:"prev"`
	Index uint64 `json:"index"`
	Op    string `json:"op"`
	Peer  string `json:"peer,omitempty"`
	// Network and Block: a claim gave Block of Network to Peer.
	Network *Network     `json:"network,omitempty"`
	Block   netip.Prefix `json:"block,omitzero"`
	// ClusterID is the cluster whose table changed (for an init: the ID it takes).
	ClusterID string `json:"cluster_id,omitempty"`
	// Networks and Pinned: an init defined these networks (see fsmState.Pinned).
	Networks []Network `json:"networks,omitempty"`
	Pinned   bool      `json:"pinned,omitempty"`
	// Policy: a policy-put stored it (its spec left out when too large to gossip: see
	// stripPolicySpec); a policy-rm names it.
	Policy *PolicyObject `json:"policy,omitempty"`
	// Conf, with Op opConf, is the leader's confHash: not a table change, a hint to refetch.
	Conf uint64 `json:"conf,omitempty"`
}

// signedDelta is the gossiped form of a tableDelta: the delta's encoding, the name of the
// node that signed it (the leader) and its identity signature over both
// (deltaSignMessage). A message without "d" is a bare tableDelta, unsigned (accepted only
// without ClusterConfig.Keys).
type signedDelta struct {
	Delta  json.RawMessage `json:"d"`
	Signer string          `json:"by,omitempty"`
	Sig    []byte          `json:"sig,omitempty"`
}

// deltaSignDomain separates table-delta signatures from every other identity signature.
const deltaSignDomain = "weft table delta v1"

// deltaSignMessage is what the leader signs: its name, a zero byte, the delta's encoding; the
// name inside stops a signature from being replayed under another signer's name.
func deltaSignMessage(signer string, delta []byte) []byte {
	b := make([]byte, 0, len(signer)+1+len(delta))
	b = append(b, signer...)
	b = append(b, 0)
	return append(b, delta...)
}

// errUnverified: a signed delta reached a client that holds no configuration to check the
// signer against yet; it fetches instead.
var errUnverified = errors.New("no configuration to verify the signer against yet")

// verifyDelta checks that env is signed by a member of members (voters and non-voters of
// the configuration the client holds) whose pinned key verifies the signature, and returns
// the metric reason of a failure. O(members). Pure but for keys.
func verifyDelta(env signedDelta, members []string, keys identity.KeyLookup) (reason string, err error) {
	if env.Signer == "" || len(env.Sig) == 0 {
		return "unsigned", fmt.Errorf("%w: delta without a signature", ErrBadTable)
	}
	if len(members) == 0 {
		return "", errUnverified
	}
	if !slices.Contains(members, env.Signer) {
		return "signer", fmt.Errorf("%w: delta signed by %q, not a raft member of the table held (%v)", ErrBadTable, env.Signer, members)
	}
	pub, ok := keys(env.Signer)
	if !ok {
		return "signature", fmt.Errorf("%w: delta signed by %q, whose key is not pinned", ErrBadTable, env.Signer)
	}
	if !identity.Verify(pub, deltaSignDomain, deltaSignMessage(env.Signer, env.Delta), env.Sig) {
		return "signature", fmt.Errorf("%w: delta signed by %q does not verify against its pinned key", ErrBadTable, env.Signer)
	}
	return "", nil
}

// opConf marks a gossiped hint that the Raft configuration or leader changed.
const opConf = "conf"

// validate checks a whole table received from elsewhere (a snapshot or a fetch).
func (st *fsmState) validate() error {
	if st.ClusterID != "" && !clusterIDRE.MatchString(st.ClusterID) {
		return fmt.Errorf("%w: cluster id %q", ErrBadTable, st.ClusterID)
	}
	nets := make([]Network, 0, len(st.Networks))
	for name, n := range st.Networks {
		if err := n.Validate(); err != nil {
			return fmt.Errorf("%w: network %q: %v", ErrBadTable, name, err)
		}
		if n.Name != name {
			return fmt.Errorf("%w: network %q is filed under %q", ErrBadTable, n.Name, name)
		}
		nets = append(nets, n)
	}
	sort.Slice(nets, func(i, j int) bool { return nets[i].Name < nets[j].Name })
	if err := CheckNetworks(nets, nil); err != nil {
		return fmt.Errorf("%w: %v", ErrBadTable, err)
	}
	if !st.Pinned && len(st.Networks) > 1 {
		return fmt.Errorf("%w: %d networks defined by claims; a table without pinned networks has at most one", ErrBadTable, len(st.Networks))
	}
	if err := st.validatePolicies(); err != nil {
		return err
	}
	for peer, at := range st.Dead {
		if checkPeerName(peer) != nil || at.Before(minDeathTime) || at.After(maxDeathTime) {
			return fmt.Errorf("%w: death record %q at %s", ErrBadTable, peer, at)
		}
	}
	for name, owners := range st.Owners {
		n, ok := st.Networks[name]
		if !ok {
			return fmt.Errorf("%w: blocks of undefined network %q", ErrBadTable, name)
		}
		for b, owner := range owners {
			if !n.ContainsBlock(b) {
				return fmt.Errorf("%w: %s is not a block of %s", ErrBadTable, b, name)
			}
			if owner == "" || len(owner) > maxNameLen {
				return fmt.Errorf("%w: block %s has owner %q", ErrBadTable, b, owner)
			}
		}
	}
	for name, recs := range st.Claims {
		n, ok := st.Networks[name]
		if !ok {
			return fmt.Errorf("%w: claim records of undefined network %q", ErrBadTable, name)
		}
		for peer, rec := range recs {
			if checkPeerName(peer) != nil || rec.Request == "" || len(rec.Request) > maxRequestLen || !n.ContainsBlock(rec.Block) {
				return fmt.Errorf("%w: claim record of peer %q in %s: request %q, block %s", ErrBadTable, peer, name, rec.Request, rec.Block)
			}
		}
	}
	return nil
}

// applyDelta applies d to st, or changes nothing and says why: errTableGap when d does not
// follow st, ErrBadTable when d is malformed or contradicts st.
func applyDelta(st *fsmState, d tableDelta) error {
	if d.Index <= d.Prev {
		return fmt.Errorf("%w: delta index %d not above its previous %d", ErrBadTable, d.Index, d.Prev)
	}
	if st.Version != 0 && d.Index > st.Version+maxIndexAhead {
		return fmt.Errorf("%w: %w: delta index %d, table at %d", ErrBadTable, errFuture, d.Index, st.Version)
	}
	if d.ClusterID != "" && st.ClusterID != "" && d.ClusterID != st.ClusterID {
		return fmt.Errorf("%w: %w: delta %d of cluster %q, the table is of %q", ErrBadTable, errForeign, d.Index, d.ClusterID, st.ClusterID)
	}
	if d.Prev != st.Version {
		return errTableGap
	}
	switch d.Op {
	case opClaim:
		if d.Network == nil {
			return fmt.Errorf("%w: claim delta %d without a network", ErrBadTable, d.Index)
		}
		n := *d.Network
		if err := n.Validate(); err != nil {
			return fmt.Errorf("%w: claim delta %d: %v", ErrBadTable, d.Index, err)
		}
		if d.Peer == "" || len(d.Peer) > maxNameLen {
			return fmt.Errorf("%w: claim delta %d names owner %q", ErrBadTable, d.Index, d.Peer)
		}
		if !n.ContainsBlock(d.Block) {
			return fmt.Errorf("%w: claim delta %d: %s is not a block of %s", ErrBadTable, d.Index, d.Block, n.Subnet)
		}
		if err := st.checkClaim(d.Peer, n); err != nil {
			return fmt.Errorf("%w: claim delta %d: %v", ErrBadTable, d.Index, err)
		}
		if owner, ok := st.Owners[n.Name][d.Block]; ok && owner != d.Peer {
			return fmt.Errorf("%w: claim delta %d gives %s to %s, owned by %s", ErrBadTable, d.Index, d.Block, d.Peer, owner)
		}
		st.Networks[n.Name] = n
		if st.Owners[n.Name] == nil {
			st.Owners[n.Name] = map[netip.Prefix]string{}
		}
		st.Owners[n.Name][d.Block] = d.Peer
		delete(st.Removed, d.Peer)
		delete(st.Dead, d.Peer)
	case opRemovePeer:
		if d.Peer == "" || len(d.Peer) > maxNameLen {
			return fmt.Errorf("%w: remove delta %d names peer %q", ErrBadTable, d.Index, d.Peer)
		}
		for _, owners := range st.Owners {
			for b, owner := range owners {
				if owner == d.Peer {
					delete(owners, b)
				}
			}
		}
		st.Removed[d.Peer] = true
	case opInit:
		if !clusterIDRE.MatchString(d.ClusterID) {
			return fmt.Errorf("%w: init delta %d has cluster id %q", ErrBadTable, d.Index, d.ClusterID)
		}
		if st.ClusterID != "" {
			return fmt.Errorf("%w: init delta %d for a table that is already initialised", ErrBadTable, d.Index)
		}
		if err := st.defineNetworks(d.Networks); err != nil {
			return fmt.Errorf("%w: init delta %d: %v", ErrBadTable, d.Index, err)
		}
		st.ClusterID, st.Pinned = d.ClusterID, d.Pinned || len(d.Networks) > 0
	case opNetworkCreate, opNetworkRemove, opRelease: // see networks.go
		if err := applyNetworkDelta(st, d); err != nil {
			return err
		}
	case opPolicyPut, opPolicyRemove: // see policies.go
		if err := applyPolicyDelta(st, d); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: delta %d has unknown operation %q", ErrBadTable, d.Index, d.Op)
	}
	st.Version = d.Index
	return nil
}

// tableHint is a peer's push/pull state on TableChannel: how far its table and its view of
// the Raft configuration are.
type tableHint struct {
	Index uint64 `json:"i"`
	// Conf identifies the Raft configuration the peer knows (see confHash).
	Conf uint64 `json:"c,omitempty"`
}

// servedTable is what a Raft member answers to GET /v1/raft/table.
type servedTable struct {
	State     fsmState `json:"state"`
	Leader    string   `json:"leader"`
	Voters    []string `json:"voters"`
	Nonvoters []string `json:"nonvoters"`
	Conf      uint64   `json:"conf"`
}

// members lists the voters and non-voters of the held configuration. v.mu is held.
func (v *tableView) membersLocked() []string {
	return append(slices.Clone(v.voters), v.nonvoters...)
}

// confKey identifies a configuration by its voters and non-voters, in any order. O(M log M).
func confKey(voters, nonvoters []string) string {
	v, n := slices.Clone(voters), slices.Clone(nonvoters)
	slices.Sort(v)
	slices.Sort(n)
	return fmt.Sprintf("%q/%q", v, n)
}

// tableView is a client's copy of the block table and of the Raft configuration, learnt by
// gossip and fetches. Members keep it too (it is cheap) but read their FSM while it is newer.
type tableView struct {
	mu    sync.Mutex // guards the fields below
	state fsmState
	// conf is the configuration as the last fetched table reported it.
	leader            string
	voters, nonvoters []string
	confHash          uint64
	// bootServer and bootConf: a bootstrap fetch's server and configuration (confKey), waiting
	// for a second member to confirm them.
	bootServer string
	bootConf   string
	// wantFetch: a gap or a newer remote index was seen; wantIndex is the highest index heard.
	wantFetch bool
	wantIndex uint64
}

func newTableView() *tableView { return &tableView{state: newFSMState()} }
