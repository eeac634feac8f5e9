package router

// `weft trace`: the path a packet to a container or address takes from this peer, from
// state the peer already holds (attachments, the block table, the link plan and path
// choice); nothing is sent. A pure function (buildTrace) makes the answer from those inputs.

import (
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/ipam"
)

// Figures of a hop: measured by this peer's probes, published by another peer (gossiped
// link state), estimated from network coordinates, or not known.
const (
	FiguresMeasured   = "measured"
	FiguresGossiped   = "gossiped"
	FiguresEstimated  = "estimated"
	FiguresUnmeasured = "unmeasured"
)

// Trace is GET /v1/trace?dst=: where an address lives and how this peer reaches it.
type Trace struct {
	Dst       string `json:"dst"`     // as asked
	Address   string `json:"address"` // the address traced
	Container string `json:"container,omitempty"`
	Network   string `json:"network,omitempty"`
	Block     string `json:"block,omitempty"`
	// Owner is the peer owning the address's block (the Raft table); Local says it is this
	// peer (the packet goes over the bridge, no link).
	Owner string `json:"owner,omitempty"`
	Local bool   `json:"local"`
	// Path is the peers after this one, the last being Owner; Mode the link mode of the
	// first hop; Relayed when a third peer carries it.
	Path    []string   `json:"path"`
	Mode    string     `json:"mode,omitempty"`
	Relayed bool       `json:"relayed"`
	State   string     `json:"state,omitempty"` // the connection's state (established, relayed, down, none)
	Hops    []TraceHop `json:"hops"`
	// End-to-end figures of the path, and its SLA as path choice holds it.
	RTTms    float64 `json:"rtt_ms"`
	JitterMs float64 `json:"jitter_ms"`
	Loss     float64 `json:"loss"`
	Figures  string  `json:"figures"`
	SLA      string  `json:"sla,omitempty"`
	SLAOK    bool    `json:"sla_ok"`
	Reason   string  `json:"reason,omitempty"`
}

// TraceHop is one link of the path with its figures.
type TraceHop struct {
	From     string  `json:"from"`
	To       string  `json:"to"`
	Mode     string  `json:"mode,omitempty"` // known for this peer's own links
	RTTms    float64 `json:"rtt_ms"`
	JitterMs float64 `json:"jitter_ms"`
	Loss     float64 `json:"loss"`
	Up       bool    `json:"up"`
	Figures  string  `json:"figures"`
}

// traceInput is what buildTrace reads: this peer's state at one moment.
type traceInput struct {
	Self        string
	Attachments []AttachmentStatus
	Blocks      []ipam.BlockOwnership
	Routes      []Route
	Conns       []Connection
	Names       map[string][]string // DNS name → addresses, for dst given as a name
}

// resolveDst finds the address dst names: an address, a local container's ID (or a prefix
// of at least 6 characters) or name, or a DNS name. ok false when none matches.
func resolveDst(dst string, in traceInput) (addr netip.Addr, container string, ok bool) {
	if a, err := netip.ParseAddr(dst); err == nil {
		for _, at := range in.Attachments {
			if at.Address.Addr() == a {
				return a, at.ContainerID, true
			}
		}
		return a, "", true
	}
	for _, at := range in.Attachments {
		if at.Name == dst || at.ContainerID == dst || len(dst) >= 6 && strings.HasPrefix(at.ContainerID, dst) {
			return at.Address.Addr(), at.ContainerID, true
		}
	}
	if addrs := in.Names[dst]; len(addrs) > 0 {
		if a, err := netip.ParseAddr(addrs[0]); err == nil {
			return a, dst, true
		}
	}
	return netip.Addr{}, "", false
}

// buildTrace answers a trace of addr from in. Pure.
func buildTrace(dst string, addr netip.Addr, container string, in traceInput) Trace {
	t := Trace{Dst: dst, Address: addr.String(), Container: container, Path: []string{}, Hops: []TraceHop{}, Figures: FiguresUnmeasured}
	for _, b := range in.Blocks {
		if b.CIDR.Contains(addr) {
			t.Owner, t.Block, t.Network = b.Owner, b.CIDR.String(), b.Network
			break
		}
	}
	if t.Owner == "" {
		t.Reason = "no peer owns a block holding " + addr.String() + "; it is outside the mesh, or its block is not claimed"
		return t
	}
	if t.Owner == in.Self {
		t.Local, t.Figures, t.SLAOK = true, FiguresMeasured, true
		t.Reason = "a container on this host: over the network's bridge, no link"
		if t.Container == "" {
			t.Reason = "in a block of this peer, but no container here holds it"
		}
		return t
	}
	for _, c := range in.Conns {
		if c.Peer == t.Owner && (c.Network == t.Network || t.Mode == "") {
			t.Mode, t.State = c.Mode, c.State
		}
	}
	// The route row serving the network (one per SLA class), else the first for the owner.
	var r *Route
	for i := range in.Routes {
		if in.Routes[i].Peer != t.Owner {
			continue
		}
		if r == nil || slices.Contains(in.Routes[i].Networks, t.Network) {
			r = &in.Routes[i]
		}
	}
	if r == nil {
		t.Reason = "no path to " + t.Owner + " is chosen yet (the peer is new or unknown here)"
		return t
	}
	t.Path = slices.Clone(r.Path)
	t.Relayed = len(r.Path) > 1 || t.State == plan.StateRelayed
	t.RTTms, t.JitterMs, t.Loss = r.RTTms, r.JitterMs, r.Loss
	t.SLA, t.SLAOK, t.Reason = r.SLA, r.SLAOK, r.Reason
	switch {
	case r.Unmeasured:
		t.Figures = FiguresUnmeasured
	case r.Estimated:
		t.Figures = FiguresEstimated
	default:
		t.Figures = FiguresMeasured
	}
	if len(r.Hops) == 0 { // an estimate: one hop with the path's figures
		from := in.Self
		for _, to := range r.Path {
			h := TraceHop{From: from, To: to, Figures: t.Figures, Up: !r.Unmeasured}
			if len(r.Path) == 1 {
				h.RTTms, h.JitterMs, h.Loss = r.RTTms, r.JitterMs, r.Loss
			}
			t.Hops = append(t.Hops, h)
			from = to
		}
	}
	for _, h := range r.Hops {
		th := TraceHop{From: h.From, To: h.To, RTTms: h.RTTms, JitterMs: h.JitterMs, Loss: h.Loss, Up: h.Up, Figures: FiguresGossiped}
		if h.From == in.Self {
			th.Figures = FiguresMeasured
			th.Mode = r.Link
		}
		t.Hops = append(t.Hops, th)
	}
	if len(t.Hops) > 0 && t.Hops[0].Mode == "" && t.Hops[0].From == in.Self {
		t.Hops[0].Mode = t.Mode
	}
	if t.Mode == "" {
		t.Mode = r.Link
	}
	return t
}

// traceAPI is GET /v1/trace?dst=CONTAINER-or-IP.
func (p *Peer) traceAPI(r *http.Request) (any, error) {
	dst := strings.TrimSpace(r.URL.Query().Get("dst"))
	if dst == "" || len(dst) > 253 {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "trace: dst must name a container (ID or name) or an address")
	}
	in := traceInput{Self: p.cfg.Name, Attachments: p.status().Attachments, Blocks: p.cluster.Status().Blocks,
		Routes: p.routes(), Conns: p.connections(), Names: map[string][]string{}}
	if _, err := netip.ParseAddr(dst); err != nil {
		if ans, err := p.dnsLookup(dst); err == nil {
			for _, a := range ans.Addrs {
				in.Names[dst] = append(in.Names[dst], a.Addr)
			}
		}
	}
	addr, container, ok := resolveDst(dst, in)
	if !ok {
		return nil, newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig,
			"trace: %q is neither an address, a container of this peer nor a name weft DNS knows", dst)
	}
	t := buildTrace(dst, addr, container, in)
	return t, nil
}
