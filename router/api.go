package router

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/cni"
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

// classify maps an error to its API answer: an *apiError of the operator endpoints as it is,
// anything else (the CNI verbs' errors) by its CNI code (cniError) with the HTTP status that
// code implies.
func classify(err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	ce := cniError(err)
	return &apiError{status: httpStatus(ce.Code), body: *ce}
}

// httpStatus is the HTTP status of an answer with CNI error code code. The plugin reads only
// the code; the status is for people reading the socket with curl.
func httpStatus(code uint) int {
	switch code {
	case types.ErrUnknownContainer:
		return http.StatusNotFound
	case types.ErrTryAgainLater, cni.CodePluginNotAvailable:
		return http.StatusServiceUnavailable
	case cni.CodeCheckFailed:
		return http.StatusConflict
	case cni.CodeInternal:
		return http.StatusInternalServerError
	}
	return http.StatusBadRequest
}

func (p *Peer) apiHandler() http.Handler {
	mux := http.NewServeMux()
	route := func(method, path, verb string, h func(*http.Request) (any, error)) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			var body any
			var err error
			if method != "" && r.Method != method { // "": the handler dispatches on the method
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
	route(http.MethodGet, "/v1/rates", "rates", func(*http.Request) (any, error) { return p.rates(), nil })
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
	route("", "/v1/networks", "networks", p.networksEndpoint)
	route("", "/v1/networks/{name}", "network", p.networkEndpoint)
	route(http.MethodGet, "/v1/capacity", "capacity", p.capacityEndpoint)
	route("", "/v1/policies", "policies", p.policiesEndpoint)
	route(http.MethodPost, "/v1/labels", "labels", func(r *http.Request) (any, error) {
		var req LabelRequest
		if err := decode(r, &req); err != nil {
			return nil, err
		}
		return p.setLabels(req)
	})
	route("", "/v1/policies/{name}", "policy", p.policyEndpoint)
	route(http.MethodGet, "/v1/policy/explain", "policy_explain", p.policyExplain) // router/netpol.go
	route(http.MethodGet, "/v1/segments", "segments", p.segmentsEndpoint)
	route(http.MethodPost, "/v1/segments/measure", "segments_measure", p.segmentsMeasure)
	route("", "/v1/perf", "perf", p.perfAPI)                // router/perf.go
	route(http.MethodGet, "/v1/trace", "trace", p.traceAPI) // router/trace.go
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, cni.Error{Code: types.ErrInvalidNetworkConfig, Message: fmt.Sprintf("no API endpoint %s %s", r.Method, r.URL.Path)})
	})
	return limitBody(mux)
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

// decodeAttach reads an ADD, DEL or CHECK; the verbs validate it (checkAttach).
func decodeAttach(r *http.Request) (cni.AttachRequest, error) {
	var req cni.AttachRequest
	return req, decode(r, &req)
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
	if pr, ok := p.mesh.Peer(req.Name); ok && !req.Force && pr.Up() {
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
	p.labels.forgetPeer(req.Name) // its containers are gone with it
	// A removed name may come back on a reinstalled host with a new identity key.
	if err := p.mesh.Unpin(req.Name); err != nil {
		p.log.Warn("rmpeer: key pin not cleared", "peer", req.Name, "err", err)
	}
	return res, nil
}
