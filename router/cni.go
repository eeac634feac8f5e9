package router

// The CNI verbs (ADD, DEL, CHECK, GC, STATUS) apart from their transport: each takes the
// control API's request type from package cni and returns its result type, or an error that
// is a *cni.Error (the code the plugin hands to the runtime, with a message naming what is
// wrong) or an error from below that cniError classifies. api.go only decodes, calls and
// encodes.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/utils"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/sriov"
	"github.com/weftnet/weft/ipam"
)

// errCNI is a *cni.Error with a formatted message.
func errCNI(code uint, format string, args ...any) *cni.Error {
	return &cni.Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// cniError maps an error from a verb to its CNI code, keeping the message.
func cniError(err error) *cni.Error {
	var ce *cni.Error
	switch {
	case errors.As(err, &ce):
		return ce
	case errors.Is(err, ipam.ErrUnknownNetwork), errors.Is(err, ipam.ErrInvalidNetwork),
		errors.Is(err, datapath.ErrBadAttachment), errors.Is(err, datapath.ErrBadBridge):
		return errCNI(types.ErrInvalidNetworkConfig, "%v", err)
	case errors.Is(err, ipam.ErrRangeFull), errors.Is(err, ipam.ErrNoQuorum):
		return errCNI(types.ErrTryAgainLater, "%v", err)
	case errors.Is(err, datapath.ErrNotNetNS):
		return errCNI(types.ErrInvalidEnvironmentVariables, "CNI_NETNS: %v", err)
	case errors.Is(err, datapath.ErrIfNameExists):
		return errCNI(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: %v", err)
	case errors.Is(err, datapath.ErrCheckFailed):
		return errCNI(cni.CodeCheckFailed, "%v", err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return errCNI(types.ErrTryAgainLater, "%v", err)
	}
	return errCNI(cni.CodeInternal, "%v", err)
}

// checkAttach validates what every ADD, DEL and CHECK carries and fills in the default
// network.
func checkAttach(req cni.AttachRequest) (cni.AttachRequest, error) {
	if err := utils.ValidateContainerID(req.ContainerID); err != nil {
		return req, errCNI(types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID: %s", err.Msg)
	}
	if err := utils.ValidateInterfaceName(req.IfName); err != nil {
		return req, errCNI(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: %s", err.Msg)
	}
	if req.MTU != 0 && (req.MTU < 576 || req.MTU > 65535) {
		return req, errCNI(types.ErrInvalidNetworkConfig, "mtu %d must be between 576 and 65535", req.MTU)
	}
	if req.Network == "" {
		req.Network = DefaultNetwork
	}
	return req, nil
}

// cniAdd attaches a container: check what can be checked without changing anything, take an
// address (claiming a block only if none is free), build the veth, and undo the address if the
// kernel work fails, so a failed ADD leaves the peer as it was.
func (p *Peer) cniAdd(ctx context.Context, req cni.AttachRequest) (*cni.AttachResult, error) {
	arrived := time.Now()
	req, err := checkAttach(req)
	if err != nil {
		return nil, err
	}
	if req.NetNS == "" {
		return nil, errCNI(types.ErrInvalidEnvironmentVariables, "CNI_NETNS is empty")
	}
	if req.CNINetwork == "" {
		return nil, errCNI(types.ErrInvalidNetworkConfig, "the network configuration has no name")
	}
	network, err := p.servedNetwork(req.Network)
	if err != nil {
		return nil, err
	}
	key := ipam.Key{ContainerID: req.ContainerID, IfName: req.IfName}
	defer p.lockKey(key)()

	existing, existed := p.alloc.Get(key)
	switch {
	case existed && existing.NetNS != req.NetNS:
		return nil, errCNI(types.ErrInvalidEnvironmentVariables,
			"container %s interface %s is already attached in netns %s, not %s", req.ContainerID, req.IfName, existing.NetNS, req.NetNS)
	case existed && existing.Network != network.Name:
		return nil, errCNI(types.ErrInvalidEnvironmentVariables,
			"container %s interface %s is already attached to network %s, not %s", req.ContainerID, req.IfName, existing.Network, network.Name)
	}
	netMTU := networkMTU(network, p.cfg.MTU)
	mtu := netMTU
	if req.MTU != 0 {
		mtu = req.MTU
	}
	secondary := existing.Secondary
	if !existed {
		secondary = isSecondary(p.alloc.Container(req.ContainerID), req.IfName)
	}
	if network.Mode == ipam.ModeSRIOV { // a VF, not a veth (router/sriov.go)
		return p.sriovAdd(ctx, req, network, secondary, arrived)
	}
	want := datapath.Attachment{
		NetNS: req.NetNS, IfName: req.IfName, HostIfName: datapath.HostIfName(req.ContainerID, req.IfName),
		Bridge: bridgeName(network.Name), Gateway: network.Gateway(), MTU: mtu,
		Secondary: secondary, Range: network.Subnet,
	}
	if err := datapath.Preflight(want); err != nil {
		return nil, err
	}
	limits, err := shapePlan(network, req.Bandwidth, mtu) // refused before anything changes
	if err != nil {
		return nil, err
	}
	name := req.Name
	if name == "" {
		name = req.ContainerID
	}
	for _, s := range req.Services {
		if _, _, _, err := parseService(s); err != nil {
			return nil, errCNI(types.ErrInvalidEnvironmentVariables, "CNI_ARGS WEFT_SERVICES: %v", err)
		}
	}
	if err := cni.CheckLabels(req.Labels); err != nil { // the plugin checked; the socket is not only the plugin's
		return nil, errCNI(types.ErrInvalidNetworkConfig, "labels: %v", err)
	}
	// Allocate claims a new block only when the owned ones are full; that claim, and only
	// it, may wait for a Raft leader while this peer is still forming or joining its cluster
	// (leaderWait).
	rec, existed, err := p.alloc.Allocate(withArrival(ctx, arrived), ipam.Attachment{
		ContainerID: req.ContainerID, IfName: req.IfName, Network: network.Name, CNINetwork: req.CNINetwork,
		Name: name, NetNS: req.NetNS, HostIfName: want.HostIfName, MTU: mtu, Services: req.Services, Secondary: secondary,
		Labels: req.Labels,
	})
	if err != nil {
		return nil, err
	}
	want.Address = netip.PrefixFrom(rec.Address, network.Subnet.Bits())
	// Policed from its first packet: the rules hold the new endpoint before its interface
	// exists (router/netpol.go). A refused apply changed nothing; the address goes back.
	if err := p.policyAdded(arrived); err != nil {
		if !existed {
			if _, _, rerr := p.alloc.Release(key); rerr != nil {
				p.log.Error("could not undo the address of a failed ADD", "container", req.ContainerID, "err", rerr)
			}
		}
		return nil, err
	}
	// The bridge after the address: a refused ADD (unknown network, full range) leaves nothing.
	res, err := p.ensureBridge(network, netMTU)
	if err == nil {
		res, err = datapath.Attach(want)
	}
	if err == nil {
		err = p.shape.apply(want.HostIfName, limits) // before ADD returns: limited from the first packet
	}
	if err != nil {
		if !existed {
			if _, _, rerr := p.alloc.Release(key); rerr != nil {
				p.log.Error("could not undo the address of a failed ADD", "container", req.ContainerID, "err", rerr)
			}
			p.shape.remove(want.HostIfName)
			datapath.Detach(want.HostIfName)
		}
		return nil, err
	}
	p.registerName(rec.Name, rec.Address, rec.Services)
	p.publishLabels(rec)
	p.log.Info("attached", "container", req.ContainerID, "ifname", req.IfName, "network", network.Name,
		"address", want.Address, "name", rec.Name, "secondary", secondary)
	return &cni.AttachResult{
		ContainerID: req.ContainerID, IfName: req.IfName, NetNS: req.NetNS,
		HostIfName: want.HostIfName, HostMAC: res.HostMAC, ContainerMAC: res.ContainerMAC,
		Bridge: want.Bridge, BridgeMAC: res.BridgeMAC,
		Address: want.Address.String(), Gateway: want.Gateway.String(), MTU: mtu,
		DNS:     p.dnsInfo(network.Gateway()),
		Network: network.Name, Range: network.Subnet.String(), Secondary: secondary,
	}, nil
}

// servedNetwork is the network an ADD or STATUS names, as this peer's allocator serves it.
// A network the allocator does not know yet may have just been created: the allocator
// learns the cluster's networks then (syncNetworks), so an ADD right after `weft network
// create` does not wait for the next membership tick. Unknown: CNI 7 naming it.
func (p *Peer) servedNetwork(name string) (ipam.Network, error) {
	if n, ok := p.alloc.Network(name); ok {
		return n, nil
	}
	p.syncNetworks()
	if n, ok := p.alloc.Network(name); ok {
		return n, nil
	}
	return ipam.Network{}, errCNI(types.ErrInvalidNetworkConfig,
		"network %q is not defined in the cluster (peer %s; `weft network ls` lists them, `weft network create` adds one)", name, p.cfg.Name)
}

// networkMTU is the MTU of a network's bridge and interfaces: its own, else the peer's --mtu.
func networkMTU(n ipam.Network, peerMTU int) int {
	if n.MTU != 0 {
		return n.MTU
	}
	return peerMTU
}

// isSecondary says whether an interface ifname of a container whose attachments here are
// others is a secondary one: the runtime adds the primary (eth0) first, so any attachment
// under another name already there makes this one secondary. Pure; O(len(others)).
func isSecondary(others []ipam.Attachment, ifname string) bool {
	for _, rec := range others {
		if rec.IfName != ifname {
			return true
		}
	}
	return false
}

// ensureBridge converges the network's bridge (present, up, gateway, MTU; proxy ARP so that
// containers reach the range's remote addresses on-link), datapath.EnsureBridge being
// idempotent. The result is empty: Attach fills it.
func (p *Peer) ensureBridge(n ipam.Network, mtu int) (datapath.AttachResult, error) {
	name := bridgeName(n.Name)
	if _, err := datapath.EnsureBridge(datapath.BridgeConfig{Name: name, Gateway: n.GatewayPrefix(), MTU: mtu}); err != nil {
		return datapath.AttachResult{}, fmt.Errorf("network %s: %w", n.Name, err)
	}
	if err := datapath.EnableProxyARP(name); err != nil {
		return datapath.AttachResult{}, fmt.Errorf("network %s: %w", n.Name, err)
	}
	return datapath.AttachResult{}, nil
}

// cniStatus says whether an ADD can succeed now: the network exists, and either an owned
// block has a free address or a new block can be claimed (a Raft leader is reachable).
func (p *Peer) cniStatus(req cni.StatusRequest) error {
	if _, err := p.servedNetwork(req.Network); err != nil {
		return err
	}
	for _, n := range p.alloc.Networks() {
		if n.Name != req.Network {
			continue
		}
		for _, b := range n.Blocks {
			if b.Free > 0 {
				return nil
			}
		}
	}
	if p.cluster.Status().Leader == "" {
		return errCNI(cni.CodePluginNotAvailable,
			"peer %s has no free address in its blocks and no raft leader to claim another from", p.cfg.Name)
	}
	return nil
}

// cniDel detaches a container. It succeeds when there is nothing left to undo: no record, no
// netns, no interface.
func (p *Peer) cniDel(req cni.AttachRequest) error {
	req, err := checkAttach(req)
	if err != nil {
		return err
	}
	key := ipam.Key{ContainerID: req.ContainerID, IfName: req.IfName}
	defer p.lockKey(key)()
	if rec, ok := p.alloc.Get(key); ok && req.CNINetwork != "" && rec.CNINetwork != req.CNINetwork {
		// Another conflist's attachment under the same name: not this one's to undo, and
		// for this conflist there is nothing left, which DEL answers with success.
		p.log.Warn("DEL left an attachment of another network configuration alone", "container", req.ContainerID,
			"ifname", req.IfName, "attached_by", rec.CNINetwork, "del_from", req.CNINetwork)
		return nil
	}
	return p.detach(key)
}

// detach removes the veth and then the record; the caller holds the key's lock.
func (p *Peer) detach(key ipam.Key) error {
	// Its VF first, if it holds one (router/sriov.go): the address goes only once the VF is back.
	if err := p.sriovDetach(sriov.Owner{ContainerID: key.ContainerID, IfName: key.IfName}, ""); err != nil {
		return err
	}
	hostIf := datapath.HostIfName(key.ContainerID, key.IfName)
	if rec, ok := p.alloc.Get(key); ok && rec.NetNS != "" {
		// The interface's policy rule would outlive its veth in a netns that lives on; a
		// netns that is gone is success.
		if err := datapath.RemovePolicyRouting(rec.NetNS, key.IfName); err != nil {
			p.log.Warn("could not remove the policy routing of a detached interface; the next attach in that netns removes it",
				"container", key.ContainerID, "ifname", key.IfName, "err", err)
		}
	}
	if err := p.shape.remove(hostIf); err != nil { // the ifb would outlive the veth
		return err
	}
	if err := datapath.Detach(hostIf); err != nil {
		return err
	}
	// The policy without it before the address is free: a reused address must not inherit
	// this container's rights (router/netpol.go).
	if _, ok := p.alloc.Get(key); ok {
		defer p.policyLeave(key)()
	}
	rec, released, err := p.alloc.Release(key)
	if err != nil {
		return err
	}
	if released {
		p.dnsRep.RemoveContainer(rec.Name, []netip.Addr{rec.Address})
		p.unpublishLabels(rec)
		p.log.Info("detached", "container", key.ContainerID, "ifname", key.IfName, "address", rec.Address)
	}
	return nil
}

// cniCheck verifies the attachment against the kernel.
func (p *Peer) cniCheck(req cni.AttachRequest) (*cni.AttachResult, error) {
	req, err := checkAttach(req)
	if err != nil {
		return nil, err
	}
	key := ipam.Key{ContainerID: req.ContainerID, IfName: req.IfName}
	defer p.lockKey(key)()
	rec, ok := p.alloc.Get(key)
	if !ok {
		return nil, errCNI(types.ErrUnknownContainer, "container %s interface %s is not attached on peer %s", req.ContainerID, req.IfName, p.cfg.Name)
	}
	if req.CNINetwork != "" && rec.CNINetwork != req.CNINetwork || rec.Network != req.Network {
		return nil, errCNI(cni.CodeCheckFailed, "container %s interface %s is attached to network %s by configuration %q, not to %s by %q",
			req.ContainerID, req.IfName, rec.Network, rec.CNINetwork, req.Network, req.CNINetwork)
	}
	network, ok := p.alloc.Network(rec.Network)
	if !ok {
		return nil, errCNI(cni.CodeCheckFailed, "container %s is attached to network %q, which peer %s no longer serves", req.ContainerID, rec.Network, p.cfg.Name)
	}
	netnsPath := rec.NetNS
	if req.NetNS != "" {
		netnsPath = req.NetNS
	}
	if network.Mode == ipam.ModeSRIOV {
		return p.sriovCheck(rec, network, netnsPath)
	}
	a := datapath.Attachment{
		NetNS: netnsPath, IfName: rec.IfName, HostIfName: rec.HostIfName, Bridge: bridgeName(network.Name),
		Address: netip.PrefixFrom(rec.Address, network.Subnet.Bits()), Gateway: network.Gateway(), MTU: rec.MTU,
		Secondary: rec.Secondary, Range: network.Subnet,
	}
	if err := datapath.Check(a); err != nil {
		return nil, err
	}
	if plan, err := shapePlan(network, req.Bandwidth, rec.MTU); err != nil {
		return nil, err
	} else if err := p.shape.check(rec.HostIfName, plan); err != nil {
		return nil, err
	}
	return &cni.AttachResult{
		ContainerID: rec.ContainerID, IfName: rec.IfName, NetNS: netnsPath, HostIfName: rec.HostIfName,
		Bridge: a.Bridge, Address: a.Address.String(), Gateway: a.Gateway.String(), MTU: rec.MTU,
		Network: rec.Network, Range: network.Subnet.String(), Secondary: rec.Secondary,
	}, nil
}

// cniGC releases every attachment of the runtime's network that the runtime no longer lists.
// O(attachments of this peer + len(req.Valid)); nothing here grows with the number of peers.
func (p *Peer) cniGC(req cni.GCRequest) (*cni.GCResult, error) {
	if req.CNINetwork == "" {
		return nil, errCNI(types.ErrInvalidNetworkConfig, "the network configuration has no name")
	}
	valid := make(map[ipam.Key]bool, len(req.Valid))
	for _, v := range req.Valid {
		valid[ipam.Key{ContainerID: v.ContainerID, IfName: v.IfName}] = true
	}
	res := &cni.GCResult{Released: []cni.GCAttachment{}}
	var errs []error
	for _, rec := range p.alloc.Attachments() {
		if rec.CNINetwork != req.CNINetwork || valid[rec.Key()] {
			continue
		}
		unlock := p.lockKey(rec.Key())
		err := p.detach(rec.Key())
		unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("release %s: %w", rec.Key(), err))
			continue
		}
		res.Released = append(res.Released, cni.GCAttachment{ContainerID: rec.ContainerID, IfName: rec.IfName})
	}
	errs = append(errs, p.sriovGC(req, res)) // VFs whose address record is gone already
	if len(res.Released) > 0 {
		p.log.Info("garbage-collected attachments", "network", req.CNINetwork, "released", strconv.Itoa(len(res.Released)))
	}
	return res, errors.Join(errs...)
}

// leaderWait is the allocator's BlockOwner: it holds a block claim back, for at most Bound,
// until a Raft leader is known, but only while this peer is still forming or joining its
// cluster (no leader seen since start). Scripts and runtimes attach right after `weft peer`
// starts; failing those ADDs at once with "try again" only makes them retry blindly. Once a
// leader has been seen, a missing leader means a partition or an election, and a claim fails
// as the owner says (CNI 11) without waiting here. Owned never waits, so an ADD served from an
// owned block never does. Safe for concurrent use.
type leaderWait struct {
	owner ipam.BlockOwner
	cfg   leaderWaitConfig
	// formed: a leader has been seen since start; set once, never cleared.
	formed atomic.Bool
}

// leaderWaitConfig configures a leaderWait.
type leaderWaitConfig struct {
	// Peer names this peer in messages.
	Peer string
	// Leader returns the Raft leader this peer knows, "" for none. Called every Poll while a
	// claim waits (and by watch until the first leader); it must not block.
	Leader func() string
	// Bound is the longest a claim waits for a leader (--attach-wait); 0 never waits.
	Bound time.Duration
	// Poll is how often Leader is asked while waiting; default 100ms.
	Poll   time.Duration
	Logger *slog.Logger
}

func newLeaderWait(owner ipam.BlockOwner, cfg leaderWaitConfig) *leaderWait {
	if cfg.Poll <= 0 {
		cfg.Poll = 100 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &leaderWait{owner: owner, cfg: cfg}
}

// Owned implements ipam.BlockOwner; it never waits.
func (w *leaderWait) Owned(n ipam.Network, peer string) ([]netip.Prefix, error) {
	return w.owner.Owned(n, peer)
}

// Claim implements ipam.BlockOwner: wait for a leader while the cluster is forming, then
// claim through the owner.
func (w *leaderWait) Claim(ctx context.Context, n ipam.Network, peer string) (netip.Prefix, error) {
	if err := w.wait(ctx); err != nil {
		return netip.Prefix{}, err
	}
	return w.owner.Claim(ctx, n, peer)
}

// hasLeader asks for the leader and remembers having seen one.
func (w *leaderWait) hasLeader() bool {
	if w.cfg.Leader() == "" {
		return false
	}
	w.formed.Store(true)
	return true
}

// arrivalKey is the context key of the time an ADD arrived (withArrival).
type arrivalKey struct{}

// withArrival records when an ADD arrived. Its wait for a leader counts from then, so an ADD
// queued behind another's claim (the allocator serialises claims) does not wait Bound again
// after the first one gave up: every ADD fails at most Bound after it arrived.
func withArrival(ctx context.Context, t time.Time) context.Context {
	return context.WithValue(ctx, arrivalKey{}, t)
}

// wait returns nil as soon as a leader is known, at once when the cluster has formed, and
// ipam.ErrNoQuorum naming what it waited for when Bound has passed since the ADD arrived
// (or since the call, without withArrival) or ctx ends first.
func (w *leaderWait) wait(ctx context.Context) error {
	if w.cfg.Bound <= 0 || w.formed.Load() || w.hasLeader() {
		return nil
	}
	start := time.Now()
	if t, ok := ctx.Value(arrivalKey{}).(time.Time); ok && t.Before(start) {
		start = t
	}
	bound := time.NewTimer(w.cfg.Bound - time.Since(start)) // fires at once when already past
	defer bound.Stop()
	tick := time.NewTicker(w.cfg.Poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: peer %s gave up after %s waiting for its raft cluster to elect a leader (still forming or joining): %w",
				ipam.ErrNoQuorum, w.cfg.Peer, time.Since(start).Round(time.Millisecond), ctx.Err())
		case <-bound.C:
			return fmt.Errorf("%w: peer %s waited %s (--attach-wait) for its raft cluster to elect a leader "+
				"(still forming or joining) and no raft leader is reachable", ipam.ErrNoQuorum, w.cfg.Peer, w.cfg.Bound)
		case <-tick.C:
			if w.hasLeader() {
				w.cfg.Logger.Info("raft leader known; claiming a block", "waited", time.Since(start).Round(time.Millisecond))
				return nil
			}
		}
	}
}

// watch polls Leader until the first leader is seen, so that a peer whose cluster formed
// before its first claim does not wait on a later partition. It returns its stop function,
// which waits for the goroutine. Cost: one Leader call per Poll, only until the cluster forms.
func (w *leaderWait) watch(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(w.cfg.Poll)
		defer tick.Stop()
		for !w.formed.Load() && !w.hasLeader() {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	})
	return func() { cancel(); wg.Wait() }
}

// startLeaderWait wraps the cluster in a leaderWait for the allocator and starts its watch;
// the watch's stop is appended to stops. Leader reads the cluster's Status, O(blocks) for the
// block table it copies, ten times a second only while the cluster forms or a claim waits;
// nothing grows with the number of peers.
func (p *Peer) startLeaderWait(ctx context.Context, stops *[]func()) ipam.BlockOwner {
	w := newLeaderWait(p.cluster, leaderWaitConfig{
		Peer:   p.cfg.Name,
		Leader: func() string { return p.cluster.Status().Leader },
		Bound:  p.cfg.AttachWait,
		Logger: p.log.With("component", "ipam"),
	})
	*stops = append(*stops, w.watch(ctx))
	return w
}
