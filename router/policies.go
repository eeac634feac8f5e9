package router

import (
	"encoding/json"
	"errors"
	"net/http"
	"sync"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
)

// The policy endpoints of the control API (issue #15): policies are replicated objects in the
// Raft state (ipam/policies.go); this file only decodes, hands over to ipam.Cluster (which
// validates the file with Config.ValidatePolicy and forwards the write to the leader) and
// maps its errors to answers. Every peer learns a change with the table and calls
// Config.OnPolicies (syncPolicies).
//
//	POST   /v1/policies        PolicyRequest → PolicyInfo (apply: create or replace)
//	GET    /v1/policies        → []PolicyInfo without specs
//	GET    /v1/policies/{name} → PolicyInfo with its canonical spec
//	DELETE /v1/policies/{name} → {}

// PolicyRequest is the body of POST /v1/policies: the policy's name and its file as the
// operator wrote it (YAML or JSON; base64 in the request's JSON, so any bytes travel exactly).
type PolicyRequest struct {
	Name string `json:"name"`
	File []byte `json:"file"`
}

// PolicyInfo is one policy as the API shows it. Version is the Raft index of the apply that
// last changed it.
type PolicyInfo struct {
	Name    string          `json:"name"`
	Network string          `json:"network"`
	Version uint64          `json:"version"`
	Spec    json.RawMessage `json:"spec,omitempty"`
}

func policyInfo(p ipam.PolicyObject, withSpec bool) PolicyInfo {
	info := PolicyInfo{Name: p.Name, Network: p.Network, Version: p.Version}
	if withSpec {
		info.Spec = p.Spec
	}
	return info
}

// policyError maps a cluster error to its answer: a bad file (the validator's reason and
// position) or an unknown network 400, an unknown policy 404, a full table 507, no leader 503.
func policyError(verb string, err error) error {
	switch {
	case errors.Is(err, ipam.ErrInvalidPolicy), errors.Is(err, ipam.ErrUnknownNetwork):
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrUnknownPolicy):
		return newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrPolicyLimit):
		return newAPIError(http.StatusInsufficientStorage, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrConflict):
		return newAPIError(http.StatusConflict, types.ErrInvalidNetworkConfig, "%s: %v", verb, err)
	case errors.Is(err, ipam.ErrNoQuorum):
		return newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "%s: %v", verb, err)
	}
	return newAPIError(http.StatusInternalServerError, cni.CodeInternal, "%s: %v", verb, err)
}

// policiesEndpoint serves /v1/policies: GET lists, POST applies.
func (p *Peer) policiesEndpoint(r *http.Request) (any, error) {
	switch r.Method {
	case http.MethodGet:
		list, _ := p.cluster.Policies()
		out := make([]PolicyInfo, 0, len(list))
		for _, pol := range list {
			out = append(out, policyInfo(pol, false))
		}
		return out, nil
	case http.MethodPost:
		var req PolicyRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		if len(req.File) == 0 {
			return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "policy apply %s: empty file", req.Name)
		}
		pol, err := p.cluster.PutPolicy(r.Context(), req.Name, req.File)
		if err != nil {
			return nil, policyError("policy apply "+req.Name, err)
		}
		p.log.Info("applied policy", "policy", pol.Name, "network", pol.Network, "version", pol.Version)
		return policyInfo(pol, false), nil
	}
	return nil, newAPIError(http.StatusMethodNotAllowed, types.ErrInvalidNetworkConfig, "%s %s: use GET or POST", r.Method, r.URL.Path)
}

// policyEndpoint serves /v1/policies/{name}: GET shows, DELETE removes.
func (p *Peer) policyEndpoint(r *http.Request) (any, error) {
	name := r.PathValue("name")
	switch r.Method {
	case http.MethodGet:
		pol, ok := p.cluster.Policy(name)
		if !ok {
			return nil, newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig, "policy show: %v: %q", ipam.ErrUnknownPolicy, name)
		}
		return policyInfo(pol, true), nil
	case http.MethodDelete:
		if err := p.cluster.RemovePolicy(r.Context(), name); err != nil {
			return nil, policyError("policy rm "+name, err)
		}
		p.log.Info("removed policy", "policy", name)
		return struct{}{}, nil
	}
	return nil, newAPIError(http.StatusMethodNotAllowed, types.ErrInvalidNetworkConfig, "%s %s: use GET or DELETE", r.Method, r.URL.Path)
}

// policyWatch remembers which policy change Config.OnPolicies last saw.
type policyWatch struct {
	mu    sync.Mutex // serialises syncPolicies; guards index
	index uint64
}

// syncPolicies hands the whole policy table to Config.OnPolicies when it changed since the
// last call (the table's policy index moved). Called every membership tick (1 s), like
// syncNetworks, so a change reaches every peer within a tick of its table learning it.
// O(1) when nothing changed; O(policies) to list them when something did.
func (p *Peer) syncPolicies() {
	if p.cfg.OnPolicies == nil && p.policy == nil {
		return
	}
	p.polWatch.mu.Lock()
	defer p.polWatch.mu.Unlock()
	if p.cluster.PolicyIndex() == p.polWatch.index {
		return
	}
	list, index := p.cluster.Policies()
	p.policyTable(list) // router/netpol.go
	if p.cfg.OnPolicies != nil {
		p.cfg.OnPolicies(list)
	}
	p.polWatch.index = index
}
