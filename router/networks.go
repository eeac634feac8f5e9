package router

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh/pathsel"
)

// The network endpoints of the control API (issue #13): networks are replicated objects in
// the Raft state; this file only decodes, hands over to ipam.Cluster (which forwards a write
// to the leader, like claims and rmpeer) and maps its errors to answers.
//
//	POST   /v1/networks        NetworkRequest → NetworkInfo (create)
//	GET    /v1/networks        → []NetworkInfo (every network the cluster defines)
//	GET    /v1/networks/{name} → NetworkInfo with its blocks (inspect)
//	DELETE /v1/networks/{name} → {} (remove; refused while blocks of it are owned)

// NetworkRequest is the body of POST /v1/networks.
type NetworkRequest struct {
	Name   string `json:"name"`
	Subnet string `json:"subnet"`
	// BlockSize is the prefix length of the blocks peers claim; 0: ipam.DefaultBlockBits.
	BlockSize int `json:"block_size,omitempty"`
	// MTU of the network's interfaces; 0: each peer's --mtu.
	MTU int `json:"mtu,omitempty"`
	// Encrypt is never, auto or always; "": each peer's --encrypt.
	Encrypt string `json:"encrypt,omitempty"`
	// SLA is a class as --sla reads it ("gold: rtt<=5ms,loss<=0.1%"); "": each peer's --sla.
	SLA string `json:"sla,omitempty"`
	// Isolated defaults to true: containers on other networks may not reach this one.
	Isolated *bool `json:"isolated,omitempty"`
	// Mode "" (bridge) or "sriov"; PF, VLAN and DPDK only with sriov (issue #14).
	Mode string `json:"mode,omitempty"`
	PF   string `json:"pf,omitempty"`
	VLAN int    `json:"vlan,omitempty"`
	DPDK string `json:"dpdk,omitempty"`
	// Default per-container rates, bits per second and bits of burst (issue #15).
	IngressRate  uint64 `json:"ingress_rate,omitempty"`
	IngressBurst uint64 `json:"ingress_burst,omitempty"`
	EgressRate   uint64 `json:"egress_rate,omitempty"`
	EgressBurst  uint64 `json:"egress_burst,omitempty"`
}

// NetworkInfo is one network as the API shows it.
type NetworkInfo struct {
	Name      string `json:"name"`
	Subnet    string `json:"subnet"`
	BlockSize int    `json:"block_size"`
	Gateway   string `json:"gateway"`
	// MTU 0, Encrypt "" and SLA "" mean: each peer's own flag.
	MTU      int    `json:"mtu"`
	Encrypt  string `json:"encrypt"`
	SLA      string `json:"sla"`
	Isolated bool   `json:"isolated"`
	Mode     string `json:"mode,omitempty"`
	PF       string `json:"pf,omitempty"`
	VLAN     int    `json:"vlan,omitempty"`
	DPDK     string `json:"dpdk,omitempty"`
	// Default per-container rates (bit/s, bits); 0 is unlimited.
	IngressRate  uint64 `json:"ingress_rate,omitempty"`
	IngressBurst uint64 `json:"ingress_burst,omitempty"`
	EgressRate   uint64 `json:"egress_rate,omitempty"`
	EgressBurst  uint64 `json:"egress_burst,omitempty"`
	// Blocks are the owned blocks of the network (inspect only).
	Blocks []ipam.BlockOwnership `json:"blocks,omitempty"`
}

func networkInfo(n ipam.Network) NetworkInfo {
	return NetworkInfo{Name: n.Name, Subnet: n.Subnet.String(), BlockSize: n.BlockBits, Gateway: n.Gateway().String(),
		MTU: n.MTU, Encrypt: n.Encrypt, SLA: n.SLA, Isolated: n.Isolated,
		Mode: n.Mode, PF: n.PF, VLAN: n.VLAN, DPDK: n.DPDK,
		IngressRate: n.IngressRate, IngressBurst: n.IngressBurst, EgressRate: n.EgressRate, EgressBurst: n.EgressBurst}
}

// networkFromRequest builds and validates the definition a create asks for: a 400 naming the
// field when it is wrong. The SLA is stored in its canonical form, so two peers asking for the
// same class in other spellings define the same network. Pure.
func networkFromRequest(req NetworkRequest) (ipam.Network, error) {
	bad := func(format string, args ...any) (ipam.Network, error) {
		return ipam.Network{}, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "network create: "+format, args...)
	}
	if req.Name == "" {
		return bad("no name")
	}
	subnet, err := netip.ParsePrefix(req.Subnet)
	if err != nil {
		return bad("subnet %q of network %s is not a CIDR: %v", req.Subnet, req.Name, err)
	}
	n := ipam.Network{Name: req.Name, Subnet: subnet, BlockBits: req.BlockSize, MTU: req.MTU, Encrypt: req.Encrypt, SLA: req.SLA, Isolated: true,
		Mode: req.Mode, PF: req.PF, VLAN: req.VLAN, DPDK: req.DPDK,
		IngressRate: req.IngressRate, IngressBurst: req.IngressBurst, EgressRate: req.EgressRate, EgressBurst: req.EgressBurst}
	if n.BlockBits == 0 {
		n.BlockBits = ipam.DefaultBlockBits
	}
	if req.Isolated != nil {
		n.Isolated = *req.Isolated
	}
	if len(n.Name) > ipam.MaxCreatedNameLen {
		return bad("name %q is %d bytes, at most %d (its bridge is named after it)", n.Name, len(n.Name), ipam.MaxCreatedNameLen)
	}
	if err := n.Validate(); err != nil {
		return bad("%v", err)
	}
	if n.SLA != "" {
		sla, err := pathsel.ParseSLA(n.SLA) // Validate parsed it already
		if err != nil {
			return bad("%v", err)
		}
		n.SLA = sla.String()
	}
	return n, nil
}

// networkError maps a cluster error to its answer: a bad definition 400, an unknown network
// 404, a conflict (exists otherwise, in use, default) 409, no leader 503 (try again).
func networkError(verb string, err error) error {
	switch {
	case errors.Is(err, ipam.ErrInvalidNetwork):
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrUnknownNetwork):
		return newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrNetworkInUse), errors.Is(err, ipam.ErrConflict):
		return newAPIError(http.StatusConflict, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrNoQuorum):
		return newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "%s: %v", verb, err)
	}
	return newAPIError(http.StatusInternalServerError, cni.CodeInternal, "%s: %v", verb, err)
}

// networksEndpoint serves /v1/networks: GET lists, POST creates.
func (p *Peer) networksEndpoint(r *http.Request) (any, error) {
	switch r.Method {
	case http.MethodGet:
		out := []NetworkInfo{}
		for _, n := range p.cluster.Networks() {
			out = append(out, networkInfo(n))
		}
		return out, nil
	case http.MethodPost:
		var req NetworkRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		n, err := networkFromRequest(req)
		if err != nil {
			return nil, err
		}
		if err := p.cluster.CreateNetwork(r.Context(), n); err != nil {
			return nil, networkError("network create "+n.Name, err)
		}
		p.log.Info("created network", "network", n.Describe())
		return networkInfo(n), nil
	}
	return nil, newAPIError(http.StatusMethodNotAllowed, types.ErrInvalidNetworkConfig, "%s %s: use GET or POST", r.Method, r.URL.Path)
}

// networkEndpoint serves /v1/networks/{name}: GET inspects, DELETE removes.
func (p *Peer) networkEndpoint(r *http.Request) (any, error) {
	name := r.PathValue("name")
	switch r.Method {
	case http.MethodGet:
		n, ok := p.cluster.Network(name)
		if !ok {
			return nil, newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig, "network inspect: %v: %q", ipam.ErrUnknownNetwork, name)
		}
		info := networkInfo(n)
		info.Blocks = p.cluster.NetworkBlocks(name)
		return info, nil
	case http.MethodDelete:
		if err := p.cluster.RemoveNetwork(r.Context(), name); err != nil {
			if errors.Is(err, ipam.ErrNetworkInUse) {
				err = fmt.Errorf("%w; %s", err, p.attachmentsOn(name))
			}
			return nil, networkError("network rm "+name, err)
		}
		p.log.Info("removed network", "network", name)
		return struct{}{}, nil
	}
	return nil, newAPIError(http.StatusMethodNotAllowed, types.ErrInvalidNetworkConfig, "%s %s: use GET or DELETE", r.Method, r.URL.Path)
}

// attachmentsOn names what holds network name's blocks, for a refused `network rm`: this
// peer's attachments on it by container and interface, and every other owner's addresses in
// use as its gossiped usage reports say (or "usage not known yet"). O(attachments + blocks
// of the network).
func (p *Peer) attachmentsOn(name string) string {
	var here []string
	for _, rec := range p.alloc.Attachments() {
		if rec.Network == name {
			here = append(here, fmt.Sprintf("%s/%s (%s)", rec.ContainerID, rec.IfName, rec.Address))
		}
	}
	used := map[string]int{}
	known := map[string]bool{}
	var owners []string
	for _, row := range p.cluster.NetworkBlocks(name) {
		if row.Owner == p.cfg.Name {
			continue
		}
		if _, seen := known[row.Owner]; !seen {
			owners = append(owners, row.Owner)
			known[row.Owner] = true
		}
		if n, ok := p.usage.Used(row.Owner, row.CIDR.String()); ok {
			used[row.Owner] += n
		} else {
			known[row.Owner] = false
		}
	}
	slices.Sort(owners)
	var parts []string
	if len(here) > 0 {
		parts = append(parts, fmt.Sprintf("attached on %s: %s", p.cfg.Name, strings.Join(here, ", ")))
	}
	for _, o := range owners {
		if known[o] {
			parts = append(parts, fmt.Sprintf("%s: addresses in use %d", o, used[o]))
		} else {
			parts = append(parts, o+": usage not known yet")
		}
	}
	if len(parts) == 0 {
		return "no attachment left: its owners release the emptied blocks within seconds, try again"
	}
	return strings.Join(parts, "; ")
}

// syncNetworks makes the allocator serve the networks the cluster defines (created ones
// included; a removed one goes once nothing here is attached to it) and logs what changed.
// Called from every membership round and tick (checkOwnership), so a table change reaches
// the allocator within a membership tick, and from an ADD or STATUS naming a network the
// allocator does not know yet (servedNetwork). O(networks) when nothing changed.
func (p *Peer) syncNetworks() {
	added, dropped, err := p.alloc.SetNetworks(p.cluster.Networks())
	for _, name := range added {
		p.log.Info("serving a network the cluster defines", "network", name)
	}
	for _, name := range dropped {
		p.log.Info("no longer serving a network the cluster removed", "network", name)
	}
	if err != nil {
		p.log.Warn("some networks of the cluster are not served here", "err", err)
	}
}

// releaseTimeout bounds one round of block releases, so that a missing quorum does not hold
// the membership loop up for long (the allocator tries a failed block again 10 s later).
const releaseTimeout = 2 * time.Second

// releaseIdleBlocks hands the emptied blocks of created networks back to the pool through
// Raft (ipam.Allocator.ReleaseIdleBlocks), so that `network rm` succeeds once every
// container on the network is detached. Called every membership tick; O(blocks) when
// nothing is to release, one Raft command per block released.
func (p *Peer) releaseIdleBlocks(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, releaseTimeout)
	defer cancel()
	if _, err := p.alloc.ReleaseIdleBlocks(ctx, p.cluster); err != nil {
		p.log.Warn("could not release an emptied block; will retry", "err", err)
	}
}
