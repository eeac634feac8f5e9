package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/utils"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

const maxRequestBytes = 1 << 20

// apiError is a failed API call: the CNI code for the plugin and the HTTP status.
type apiError struct {
	status int
	body   cni.Error
}

func (e *apiError) Error() string { return e.body.Error() }

func newAPIError(status int, code uint, format string, args ...any) *apiError {
	return &apiError{status: status, body: cni.Error{Code: code, Message: fmt.Sprintf(format, args...)}}
}

// classify maps an error from below to its CNI code, keeping the message.
func classify(err error) *apiError {
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, ipam.ErrUnknownNetwork), errors.Is(err, ipam.ErrInvalidNetwork):
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "%v", err)
	case errors.Is(err, ipam.ErrRangeFull), errors.Is(err, ipam.ErrNoQuorum):
		return newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "%v", err)
	case errors.Is(err, datapath.ErrNotNetNS):
		return newAPIError(http.StatusBadRequest, types.ErrInvalidEnvironmentVariables, "CNI_NETNS: %v", err)
	case errors.Is(err, datapath.ErrIfNameExists):
		return newAPIError(http.StatusConflict, types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: %v", err)
	case errors.Is(err, datapath.ErrCheckFailed):
		return newAPIError(http.StatusConflict, cni.CodeCheckFailed, "%v", err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "%v", err)
	}
	return newAPIError(http.StatusInternalServerError, cni.CodeInternal, "%v", err)
}

func (p *Peer) apiHandler() http.Handler {
	mux := http.NewServeMux()
	route := func(method, path, verb string, h func(*http.Request) (any, error)) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			var body any
			var err error
			if r.Method != method {
				err = newAPIError(http.StatusMethodNotAllowed, types.ErrInvalidNetworkConfig, "%s %s: use %s", r.Method, path, method)
			} else {
				body, err = h(r)
			}
			code := uint(0)
			if err != nil {
				ae := classify(err)
				code = ae.body.Code
				p.log.Warn("api request failed", "verb", verb, "code", code, "err", err)
				writeJSON(w, ae.status, ae.body)
			} else {
				writeJSON(w, http.StatusOK, body)
			}
			p.metrics.observe(verb, code, time.Since(start))
		})
	}
	route(http.MethodGet, "/v1/status", "status", func(*http.Request) (any, error) { return p.status(), nil })
	route(http.MethodPost, cni.PathAdd, "add", func(r *http.Request) (any, error) {
		req, err := decodeAttach(r)
		if err != nil {
			return nil, err
		}
		return p.cniAdd(r.Context(), req)
	})
	route(http.MethodPost, cni.PathDel, "del", func(r *http.Request) (any, error) {
		req, err := decodeAttach(r)
		if err != nil {
			return nil, err
		}
		return struct{}{}, p.cniDel(req)
	})
	route(http.MethodPost, cni.PathCheck, "check", func(r *http.Request) (any, error) {
		req, err := decodeAttach(r)
		if err != nil {
			return nil, err
		}
		return p.cniCheck(req)
	})
	route(http.MethodPost, cni.PathGC, "gc", func(r *http.Request) (any, error) {
		var req cni.GCRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return p.cniGC(req)
	})
	route(http.MethodPost, cni.PathStatus, "cni_status", func(r *http.Request) (any, error) {
		var req cni.StatusRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return struct{}{}, p.cniStatus(req)
	})
	route(http.MethodGet, "/v1/peers", "peers", func(*http.Request) (any, error) { return p.peerStatus(), nil })
	route(http.MethodGet, "/v1/ipam", "ipam", func(*http.Request) (any, error) { return p.ipamStatus(), nil })
	route(http.MethodPost, "/v1/rotate-key", "rotate_key", func(*http.Request) (any, error) {
		pub, err := p.rotateKey()
		return map[string]string{"public_key": pub}, err
	})
	route(http.MethodGet, "/v1/routes", "routes", func(*http.Request) (any, error) { return p.routes(), nil })
	route(http.MethodGet, "/v1/connections", "connections", func(*http.Request) (any, error) { return p.connections(), nil })
	route(http.MethodPost, "/v1/connect", "connect", func(r *http.Request) (any, error) {
		var req AddressRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		if err := p.mesh.Connect(req.Address); err != nil {
			return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "connect %q: %v", req.Address, err)
		}
		return struct{}{}, nil
	})
	route(http.MethodPost, "/v1/forget", "forget", func(r *http.Request) (any, error) {
		var req AddressRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		if err := p.mesh.Forget(req.Address); err != nil {
			return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "forget %q: %v", req.Address, err)
		}
		return struct{}{}, nil
	})
	route(http.MethodPost, "/v1/dns/add", "dns_add", func(r *http.Request) (any, error) {
		var req DNSRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return struct{}{}, p.dnsAdd(req)
	})
	route(http.MethodPost, "/v1/dns/remove", "dns_remove", func(r *http.Request) (any, error) {
		var req DNSRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return struct{}{}, p.dnsRemove(req)
	})
	route(http.MethodGet, "/v1/dns/lookup", "dns_lookup", func(r *http.Request) (any, error) {
		return p.dnsLookup(r.URL.Query().Get("name"))
	})
	route(http.MethodPost, "/v1/rmpeer", "rmpeer", func(r *http.Request) (any, error) {
		var req RemovePeerRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return p.removePeer(r.Context(), req)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, cni.Error{Code: types.ErrInvalidNetworkConfig, Message: fmt.Sprintf("no API endpoint %s %s", r.Method, r.URL.Path)})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// decode reads one JSON object, refusing unknown fields and trailing data.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, maxRequestBytes))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return newAPIError(http.StatusBadRequest, types.ErrDecodingFailure, "decode %s request: %v", r.URL.Path, err)
	}
	if dec.More() {
		return newAPIError(http.StatusBadRequest, types.ErrDecodingFailure, "decode %s request: trailing data after the JSON object", r.URL.Path)
	}
	return nil
}

func decodeAttach(r *http.Request) (cni.AttachRequest, error) {
	var req cni.AttachRequest
	if err := decode(r, &req); err != nil {
		return req, err
	}
	if err := utils.ValidateContainerID(req.ContainerID); err != nil {
		return req, newAPIError(http.StatusBadRequest, types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID: %s", err.Msg)
	}
	if err := utils.ValidateInterfaceName(req.IfName); err != nil {
		return req, newAPIError(http.StatusBadRequest, types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: %s", err.Msg)
	}
	if req.MTU != 0 && (req.MTU < 576 || req.MTU > 65535) {
		return req, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "mtu %d must be between 576 and 65535", req.MTU)
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
	if req.NetNS == "" {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidEnvironmentVariables, "CNI_NETNS is empty")
	}
	if req.CNINetwork == "" {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "the network configuration has no name")
	}
	network, ok := p.alloc.Network(req.Network)
	if !ok {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "network %q is not defined on peer %s", req.Network, p.cfg.Name)
	}
	key := ipam.Key{ContainerID: req.ContainerID, IfName: req.IfName}
	defer p.lockKey(key)()

	if existing, ok := p.alloc.Get(key); ok && existing.NetNS != req.NetNS {
		return nil, newAPIError(http.StatusConflict, types.ErrInvalidEnvironmentVariables,
			"container %s interface %s is already attached in netns %s, not %s", req.ContainerID, req.IfName, existing.NetNS, req.NetNS)
	}
	mtu := p.cfg.MTU
	if req.MTU != 0 {
		mtu = req.MTU
	}
	want := datapath.Attachment{
		NetNS: req.NetNS, IfName: req.IfName, HostIfName: datapath.HostIfName(req.ContainerID, req.IfName),
		Bridge: bridgeName(network.Name), Gateway: network.Gateway(), MTU: mtu,
	}
	if err := datapath.Preflight(want); err != nil {
		return nil, err
	}
	name := req.Name
	if name == "" {
		name = req.ContainerID
	}
	for _, s := range req.Services {
		if _, _, _, err := parseService(s); err != nil {
			return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidEnvironmentVariables, "CNI_ARGS WEFT_SERVICES: %v", err)
		}
	}
	rec, existed, err := p.alloc.Allocate(ctx, ipam.Attachment{
		ContainerID: req.ContainerID, IfName: req.IfName, Network: network.Name, CNINetwork: req.CNINetwork,
		Name: name, NetNS: req.NetNS, HostIfName: want.HostIfName, MTU: mtu, Services: req.Services,
	})
	if err != nil {
		return nil, err
	}
	want.Address = netip.PrefixFrom(rec.Address, network.Subnet.Bits())
	res, err := datapath.Attach(want)
	if err != nil {
		if !existed {
			if _, _, rerr := p.alloc.Release(key); rerr != nil {
				p.log.Error("could not undo the address of a failed ADD", "container", req.ContainerID, "err", rerr)
			}
			datapath.Detach(want.HostIfName)
		}
		return nil, err
	}
	p.registerName(rec.Name, rec.Address, rec.Services)
	p.log.Info("attached", "container", req.ContainerID, "ifname", req.IfName, "address", want.Address, "name", rec.Name)
	return &cni.AttachResult{
		ContainerID: req.ContainerID, IfName: req.IfName, NetNS: req.NetNS,
		HostIfName: want.HostIfName, HostMAC: res.HostMAC, ContainerMAC: res.ContainerMAC,
		Bridge: want.Bridge, BridgeMAC: res.BridgeMAC,
		Address: want.Address.String(), Gateway: want.Gateway.String(), MTU: mtu,
		DNS: p.dnsInfo(network.Gateway()),
	}, nil
}

// cniStatus says whether an ADD can succeed now: the network exists, and either an owned
// block has a free address or a new block can be claimed (a Raft leader is reachable).
func (p *Peer) cniStatus(req cni.StatusRequest) error {
	if _, ok := p.alloc.Network(req.Network); !ok {
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "network %q is not defined on peer %s", req.Network, p.cfg.Name)
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
		return newAPIError(http.StatusServiceUnavailable, cni.CodePluginNotAvailable,
			"peer %s has no free address in its blocks and no raft leader to claim another from", p.cfg.Name)
	}
	return nil
}

// AddressRequest names a seed address for connect and forget.
type AddressRequest struct {
	Address string `json:"address"`
}

// RemovePeerRequest asks to return a gone peer's blocks to the pool.
type RemovePeerRequest struct {
	Name string `json:"name"`
	// Force removes a peer the mesh still sees alive (its addresses may then be handed out
	// twice: only for a peer that is gone for good but not yet declared dead).
	Force bool `json:"force"`
}

// RemovePeerResult lists the blocks returned to the pool.
type RemovePeerResult struct {
	Released []string `json:"released"`
}

func (p *Peer) removePeer(ctx context.Context, req RemovePeerRequest) (*RemovePeerResult, error) {
	if req.Name == "" {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "rmpeer: no peer name")
	}
	if req.Name == p.cfg.Name {
		return nil, newAPIError(http.StatusConflict, types.ErrInvalidNetworkConfig, "rmpeer: %s is this peer; run it on another", req.Name)
	}
	if pr, ok := p.mesh.Peer(req.Name); ok && !req.Force && (pr.State == mesh.StateAlive || pr.State == mesh.StateSuspect) {
		return nil, newAPIError(http.StatusConflict, types.ErrInvalidNetworkConfig,
			"rmpeer: %s is %s in the mesh; stop it first (or --force if it is gone for good)", req.Name, pr.State)
	}
	released, err := p.cluster.RemovePeer(ctx, req.Name)
	if err != nil {
		return nil, err
	}
	res := &RemovePeerResult{Released: []string{}}
	for _, b := range released {
		res.Released = append(res.Released, b.String())
	}
	p.log.Info("removed peer", "peer", req.Name, "released", len(released))
	return res, nil
}

// cniDel detaches a container. It succeeds when there is nothing left to undo: no record, no
// netns, no interface.
func (p *Peer) cniDel(req cni.AttachRequest) error {
	key := ipam.Key{ContainerID: req.ContainerID, IfName: req.IfName}
	defer p.lockKey(key)()
	return p.detach(key)
}

// detach removes the veth and then the record; the caller holds the key's lock.
func (p *Peer) detach(key ipam.Key) error {
	hostIf := datapath.HostIfName(key.ContainerID, key.IfName)
	if err := datapath.Detach(hostIf); err != nil {
		return err
	}
	rec, released, err := p.alloc.Release(key)
	if err != nil {
		return err
	}
	if released {
		p.dnsRep.RemoveContainer(rec.Name, []netip.Addr{rec.Address})
		p.log.Info("detached", "container", key.ContainerID, "ifname", key.IfName, "address", rec.Address)
	}
	return nil
}

// cniCheck verifies the attachment against the kernel.
func (p *Peer) cniCheck(req cni.AttachRequest) (*cni.AttachResult, error) {
	key := ipam.Key{ContainerID: req.ContainerID, IfName: req.IfName}
	defer p.lockKey(key)()
	rec, ok := p.alloc.Get(key)
	if !ok {
		return nil, newAPIError(http.StatusNotFound, types.ErrUnknownContainer, "container %s interface %s is not attached on peer %s", req.ContainerID, req.IfName, p.cfg.Name)
	}
	network, ok := p.alloc.Network(rec.Network)
	if !ok {
		return nil, newAPIError(http.StatusConflict, cni.CodeCheckFailed, "container %s is attached to network %q, which peer %s no longer serves", req.ContainerID, rec.Network, p.cfg.Name)
	}
	netnsPath := rec.NetNS
	if req.NetNS != "" {
		netnsPath = req.NetNS
	}
	a := datapath.Attachment{
		NetNS: netnsPath, IfName: rec.IfName, HostIfName: rec.HostIfName, Bridge: bridgeName(network.Name),
		Address: netip.PrefixFrom(rec.Address, network.Subnet.Bits()), Gateway: network.Gateway(), MTU: rec.MTU,
	}
	if err := datapath.Check(a); err != nil {
		return nil, err
	}
	return &cni.AttachResult{
		ContainerID: rec.ContainerID, IfName: rec.IfName, NetNS: netnsPath, HostIfName: rec.HostIfName,
		Bridge: a.Bridge, Address: a.Address.String(), Gateway: a.Gateway.String(), MTU: rec.MTU,
	}, nil
}

// cniGC releases every attachment of the runtime's network that the runtime no longer lists.
func (p *Peer) cniGC(req cni.GCRequest) (*cni.GCResult, error) {
	if req.CNINetwork == "" {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "the network configuration has no name")
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
	if len(res.Released) > 0 {
		p.log.Info("garbage-collected attachments", "network", req.CNINetwork, "released", strconv.Itoa(len(res.Released)))
	}
	return res, errors.Join(errs...)
}
