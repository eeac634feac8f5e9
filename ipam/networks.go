package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
)

// Networks as replicated objects (issue #13, item 1): `weft network create` and `weft network
// rm` are Raft commands. The leader checks one before proposing it (against the defined
// networks and the underlay addresses it has observed) and the FSM checks it again when
// applying it (against the defined networks; it cannot know the underlay deterministically),
// so neither a forwarded command nor a replayed log brings in a network that breaks the
// bounds. Clients learn the change with the block table: the FSM's delta carries the network
// (applyNetworkDelta).
//
// Attachments claim a created network's blocks as they claim the default network's (the
// allocator learns the cluster's networks, Allocator.SetNetworks). A peer returns a block of
// a created network once it holds no attachment in it (opRelease, Allocator.ReleaseIdleBlocks),
// so `network rm` is refused exactly while some peer holds a block, and a block is held only
// while an attachment lives in it or for the second or so until its owner releases it. The
// refusal is decided on the Raft table, not on gossiped usage: the table is what every peer
// agrees on, while a usage report may be stale, and removing a network under a live
// attachment is worse than asking the operator to retry a second later. The default
// network keeps its blocks as before (only rmpeer or a reclaim return them).

// DefaultNetwork is the network every cluster has from bootstrap; it cannot be removed.
const DefaultNetwork = "default"

// MaxCreatedNameLen bounds the name of a network created at run time: the per-network bridge
// of a later step is named after it and a Linux interface name has at most 15 bytes.
const MaxCreatedNameLen = 15

// ErrNetworkInUse: a network cannot be removed while peers own blocks of it.
var ErrNetworkInUse = errors.New("network in use")

// checkCreate says whether n may be created on st: the cluster is initialised, its first
// network is known (a log from before pinning defines it by the first claim), the name is a
// short DNS label, and the defined networks plus n pass CheckNetworks (bounds, no overlap,
// none holding one of underlay). Creating a network exactly as it is already defined is
// allowed (a retried command); the same name with another definition is a conflict. Pure;
// O(k² + k·u) for k networks and u underlay addresses (CheckNetworks), k ≤ MaxNetworks.
func (st *fsmState) checkCreate(n Network, underlay []netip.Addr) error {
	if st.ClusterID == "" {
		return fmt.Errorf("%w: the cluster is not initialised yet; create network %s once it has a leader", ErrConflict, n.Name)
	}
	if !st.Pinned && len(st.Networks) == 0 {
		return fmt.Errorf("%w: the cluster's first network is not defined yet (attach a container first); network %s is not created", ErrConflict, n.Name)
	}
	if len(n.Name) > MaxCreatedNameLen {
		return fmt.Errorf("%w: name %q is %d bytes, at most %d (its bridge is named after it)", ErrInvalidNetwork, n.Name, len(n.Name), MaxCreatedNameLen)
	}
	if def, ok := st.Networks[n.Name]; ok {
		if def == n {
			return nil
		}
		return fmt.Errorf("%w: network %s already exists as %s", ErrConflict, n.Name, def.Describe())
	}
	all := make([]Network, 0, len(st.Networks)+1)
	for _, m := range st.Networks {
		all = append(all, m)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	all = append(all, n) // last, so an overlap names the new network first
	if err := CheckNetworks(all, underlay); err != nil {
		return err
	}
	return nil
}

// createNetwork defines n if checkCreate allows it, or changes nothing. A created network
// pins the set: from then on no claim may define a network (see fsmState.Pinned). Caller
// holds the state's lock.
func (st *fsmState) createNetwork(n Network, underlay []netip.Addr) error {
	if err := st.checkCreate(n, underlay); err != nil {
		return err
	}
	st.Networks[n.Name] = n
	st.Pinned = true
	return nil
}

// checkRemove says whether network name may be removed: it exists, is not the default, and
// no peer owns a block of it (attachments imply blocks); the error names the owners.
// Pure; O(blocks of the network).
func (st *fsmState) checkRemove(name string) error {
	if name == DefaultNetwork {
		return fmt.Errorf("%w: network %s exists from bootstrap and cannot be removed", ErrConflict, name)
	}
	if _, ok := st.Networks[name]; !ok {
		return fmt.Errorf("%w: %q", ErrUnknownNetwork, name)
	}
	if owners := st.Owners[name]; len(owners) > 0 {
		blocks := map[string]int{}
		for _, o := range owners {
			blocks[o]++
		}
		names := make([]string, 0, len(blocks))
		for o, k := range blocks {
			names = append(names, fmt.Sprintf("%s (%d)", o, k))
		}
		sort.Strings(names)
		return fmt.Errorf("%w: network %s has %d blocks owned by %s, each holding attachments (a peer returns a block "+
			"within seconds of detaching its last container); detach their containers first", ErrNetworkInUse, name, len(owners), strings.Join(names, ", "))
	}
	return nil
}

// removeNetwork takes network name away if checkRemove allows it, or changes nothing.
func (st *fsmState) removeNetwork(name string) error {
	if err := st.checkRemove(name); err != nil {
		return err
	}
	delete(st.Networks, name)
	delete(st.Owners, name)
	delete(st.Claims, name)
	return nil
}

// checkRelease says whether peer may return block b of network: the network is defined and
// is not the default one (whose blocks stay with their owner until rmpeer or a reclaim, as
// before networks could be created), and peer owns b. Pure; O(1).
func (st *fsmState) checkRelease(peer, network string, b netip.Prefix) error {
	if err := checkPeerName(peer); err != nil {
		return err
	}
	if network == DefaultNetwork {
		return fmt.Errorf("%w: blocks of network %s are not released (rmpeer returns them)", ErrConflict, network)
	}
	if _, ok := st.Networks[network]; !ok {
		return fmt.Errorf("%w: %q", ErrUnknownNetwork, network)
	}
	owner, ok := st.Owners[network][b]
	switch {
	case !ok:
		return fmt.Errorf("%w: peer %s releases block %s of network %s, which nobody owns", ErrConflict, peer, b, network)
	case owner != peer:
		return fmt.Errorf("%w: peer %s releases block %s of network %s, which %s owns", ErrConflict, peer, b, network, owner)
	}
	return nil
}

// releaseBlock returns block b of network to the pool if checkRelease allows it, or changes
// nothing. Caller holds the state's lock.
func (st *fsmState) releaseBlock(peer, network string, b netip.Prefix) error {
	if err := st.checkRelease(peer, network, b); err != nil {
		return err
	}
	delete(st.Owners[network], b)
	if len(st.Owners[network]) == 0 {
		delete(st.Owners, network)
	}
	return nil
}

// ReleaseBlock returns block b of network n, owned by peer, to the pool through the log
// (the allocator calls it for a block it emptied; see Allocator.ReleaseIdleBlocks). This
// peer's local record of the claim goes first, so that no later read of it takes the
// release for a block taken away. Errors: ErrConflict (not peer's, or the default network),
// ErrUnknownNetwork, ErrNoQuorum.
func (c *Cluster) ReleaseBlock(ctx context.Context, n Network, b netip.Prefix, peer string) error {
	if peer == c.cfg.Name {
		if err := c.cache.forget(n.Name, b); err != nil {
			return err
		}
	}
	res, err := c.apply(ctx, command{Op: opRelease, Network: Network{Name: n.Name}, Peer: peer, Block: b})
	if err != nil {
		return err
	}
	return res.err()
}

// networkResult is the answer to a refused network command: the sentinel travels as a flag
// so it survives the forwarding RPC (commandResult.err rebuilds it).
func networkResult(err error) commandResult {
	var res commandResult
	sentinel := ErrConflict
	switch {
	case errors.Is(err, ErrUnknownNetwork):
		res.Unknown, sentinel = true, ErrUnknownNetwork
	case errors.Is(err, ErrNetworkInUse):
		res.InUse, sentinel = true, ErrNetworkInUse
	case errors.Is(err, ErrInvalidNetwork):
		res.Invalid, sentinel = true, ErrInvalidNetwork
	default:
		res.Conflict = true
	}
	// err() puts the sentinel back in front: do not say it twice.
	res.Err = strings.TrimPrefix(err.Error(), sentinel.Error()+": ")
	return res
}

// applyNetworkDelta applies a gossiped network-create or network-rm to a client's view, with
// the FSM's own checks; a delta they refuse is a bad table (and changes nothing).
func applyNetworkDelta(st *fsmState, d tableDelta) error {
	if d.Network == nil {
		return fmt.Errorf("%w: %s delta %d without a network", ErrBadTable, d.Op, d.Index)
	}
	var err error
	switch d.Op {
	case opNetworkCreate:
		err = st.createNetwork(*d.Network, nil)
	case opRelease:
		err = st.releaseBlock(d.Peer, d.Network.Name, d.Block)
	default:
		err = st.removeNetwork(d.Network.Name)
	}
	if err != nil {
		return fmt.Errorf("%w: %s delta %d: %v", ErrBadTable, d.Op, d.Index, err)
	}
	return nil
}

// CreateNetwork defines n in the cluster through the log: on the leader directly, forwarded
// from any other peer. The leader checks it before proposing (checkCreate, with the underlay
// addresses it has observed) and the FSM again when applying. Creating a network exactly as
// it exists succeeds. Errors: ErrInvalidNetwork (bad definition, overlap), ErrConflict
// (exists otherwise, cluster not ready), ErrNoQuorum.
func (c *Cluster) CreateNetwork(ctx context.Context, n Network) error {
	if err := n.Validate(); err != nil {
		return err
	}
	res, err := c.apply(ctx, command{Op: opNetworkCreate, Network: n})
	if err != nil {
		return err
	}
	return res.err()
}

// RemoveNetwork takes network name out of the cluster through the log, refused while any
// peer owns a block of it and for the default network. Errors: ErrUnknownNetwork,
// ErrNetworkInUse (naming the owners), ErrConflict, ErrNoQuorum.
func (c *Cluster) RemoveNetwork(ctx context.Context, name string) error {
	if name == "" || len(name) > maxNameLen {
		return fmt.Errorf("%w: network name %q must be 1-%d bytes", ErrInvalidNetwork, name, maxNameLen)
	}
	res, err := c.apply(ctx, command{Op: opNetworkRemove, Network: Network{Name: name}})
	if err != nil {
		return err
	}
	return res.err()
}

// Network returns the definition of network name as the table this node goes by says.
func (c *Cluster) Network(name string) (Network, bool) {
	var n Network
	var ok bool
	c.readTable(func(st *fsmState) { n, ok = st.Networks[name] })
	return n, ok
}

// NetworkBlocks lists the owned blocks of network name, in address order. O(blocks of it).
func (c *Cluster) NetworkBlocks(name string) []BlockOwnership {
	out := []BlockOwnership{}
	c.readTable(func(st *fsmState) {
		for b, owner := range st.Owners[name] {
			out = append(out, BlockOwnership{Network: name, CIDR: b, Owner: owner})
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].CIDR.Addr().Less(out[j].CIDR.Addr()) })
	return out
}

// leaderCheckNetwork checks a network command on the leader before it enters the log: the
// cluster is initialised first (EnsureClusterID, as for claims), then checkCreate with the
// underlay addresses of the observed members and this peer, or checkRemove. refused is true
// when the command must not be proposed; res (or err, when there is no quorum) is the answer.
func (c *Cluster) leaderCheckNetwork(cmd command) (res commandResult, refused bool, err error) {
	if err := c.EnsureClusterID(); errors.Is(err, ErrInvalidNetwork) {
		c.refuseCommand("uninitialised", err)
		return commandResult{Err: err.Error(), Conflict: true}, true, nil
	} else if err != nil {
		return commandResult{}, true, err
	}
	c.mu.Lock()
	underlay := slices.Clone(c.underlay)
	c.mu.Unlock()
	if ap, err := netip.ParseAddrPort(string(c.cfg.Transport.LocalAddr())); err == nil {
		underlay = append(underlay, ap.Addr())
	}
	c.fsm.mu.RLock()
	switch cmd.Op {
	case opNetworkCreate:
		err = c.fsm.state.checkCreate(cmd.Network, underlay)
	case opRelease:
		err = c.fsm.state.checkRelease(cmd.Peer, cmd.Network.Name, cmd.Block)
	default:
		err = c.fsm.state.checkRemove(cmd.Network.Name)
	}
	c.fsm.mu.RUnlock()
	if err != nil {
		c.refuseCommand(strings.ReplaceAll(cmd.Op, "-", "_"), err)
		return networkResult(err), true, nil
	}
	return commandResult{}, false, nil
}
