package router

import (
	"errors"
	"net/http"
	"net/netip"

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
	// Blocks are the owned blocks of the network (inspect only).
	Blocks []ipam.BlockOwnership `json:"blocks,omitempty"`
}

func networkInfo(n ipam.Network) NetworkInfo {
	return NetworkInfo{Name: n.Name, Subnet: n.Subnet.String(), BlockSize: n.BlockBits, Gateway: n.Gateway().String(),
		MTU: n.MTU, Encrypt: n.Encrypt, SLA: n.SLA, Isolated: n.Isolated}
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
	n := ipam.Network{Name: req.Name, Subnet: subnet, BlockBits: req.BlockSize, MTU: req.MTU, Encrypt: req.Encrypt, SLA: req.SLA, Isolated: true}
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
			return nil, networkError("network rm "+name, err)
		}
		p.log.Info("removed network", "network", name)
		return struct{}{}, nil
	}
	return nil, newAPIError(http.StatusMethodNotAllowed, types.ErrInvalidNetworkConfig, "%s %s: use GET or DELETE", r.Method, r.URL.Path)
}
