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
// Not yet (later items of #13): claims of a created network's blocks by attachments, so a
// network's blocks are owned only through Cluster.Claim; a command that returns an emptied
// block, without which `network rm` stays refused once any peer has claimed a block of it
// until that peer is removed (rmpeer).

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
		return fmt.Errorf("%w: network %s has %d blocks owned by %s; detach their containers first", ErrNetworkInUse, name, len(owners), strings.Join(names, ", "))
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
	return nil
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
	if d.Op == opNetworkCreate {
		err = st.createNetwork(*d.Network, nil)
	} else {
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
	if cmd.Op == opNetworkCreate {
		err = c.fsm.state.checkCreate(cmd.Network, underlay)
	} else {
		err = c.fsm.state.checkRemove(cmd.Network.Name)
	}
	c.fsm.mu.RUnlock()
	if err != nil {
		c.refuseCommand(strings.ReplaceAll(cmd.Op, "-", "_"), err)
		return networkResult(err), true, nil
	}
	return commandResult{}, false, nil
}
