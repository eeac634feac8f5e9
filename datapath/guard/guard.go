// Package guard closes the peer's own control ports to its containers: an nftables rule on
// the input hook drops what arrives on a weft bridge for the mesh, Raft, probe, WireGuard,
// VXLAN and HTTP ports — on any of the host's addresses, since the input hook sees every
// packet addressed to the host — while DNS on the gateway, and traffic between containers
// (bridged or forwarded, never input), keep working. A rule on the forward hook does the
// same for what a container sends through its host to those ports on the underlay ranges
// (Config.Underlay), so that other peers' control ports are closed to it too.
//
// Everything lives in weft's own table (inet "weft"): four chains and one named counter per
// dropped kind, all named "guard…". Set converges them to the desired state in one
// transaction, and does nothing when they already match (each rule carries its key in its
// user data, so the comparison needs no decoding of expressions); Remove deletes only these
// objects, and the table only when nothing else is left in it. Nothing is ever flushed
// beyond the guard's own chains.
//
// Plan is the pure part (desired state from bridges and ports); Guard is the thin applier.
package guard

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath/nft"
)

// Table, chains and counter prefix the guard owns.
const (
	TableName     = "weft"
	InputChain    = "guard_input"    // base chain, hook input: one jump per bridge
	PortsChain    = "guard_ports"    // one drop per guarded port
	ForwardChain  = "guard_forward"  // base chain, hook forward: one jump per bridge
	UnderlayChain = "guard_underlay" // one jump to guard_ports per underlay range
	CounterPrefix = "guard_"         // + kind: the named counter of each dropped kind
)

// Kinds of the ports a peer guards, the names of their counters.
const (
	KindMesh      = "mesh"       // memberlist, TCP and UDP
	KindRaft      = "raft"       // Raft and leader forwarding, TCP
	KindProbe     = "probe"      // RTT probes, UDP
	KindLinkProbe = "link_probe" // probes of the link in use, UDP
	KindWireGuard = "wireguard"  // UDP
	KindVXLAN     = "vxlan"      // UDP: a container must not inject encapsulated frames
	KindHTTP      = "http"       // metrics and status, TCP
)

// Proto is a transport protocol of a guarded port.
type Proto string

// Protocols.
const (
	TCP Proto = "tcp"
	UDP Proto = "udp"
)

// Port is one port of the peer's own that containers must not reach.
type Port struct {
	Kind  string // names the counter; lower-case letters, digits and '_'
	Proto Proto
	Port  uint16
}

// Config is the desired guard.
type Config struct {
	// Bridges are the weft bridges (one per network); traffic arriving on them is guarded.
	Bridges []string
	// Ports are dropped when they arrive on a bridge for the host itself.
	Ports []Port
	// DNSPort is served on each gateway and must stay open: a guarded port equal to it
	// is an error rather than a silent loss of DNS.
	DNSPort uint16
	// Underlay are the ranges the peers' underlay addresses are in (at least this host's
	// underlay subnet): container traffic the host forwards to a guarded port in them is
	// dropped too, so that a container cannot reach other peers' control ports through
	// its host. Traffic to those ports elsewhere (the internet, other containers) passes.
	Underlay []netip.Prefix
}

// Bounds of a Config: a transaction stays small (rules are O(bridges + ranges + ports)).
const (
	MaxBridges  = 1024 // one per network
	MaxPorts    = 64
	MaxUnderlay = 1024
)

// Sentinel errors.
var (
	// ErrConfig wraps every error of Plan: nothing is changed.
	ErrConfig = errors.New("invalid guard config")
	// ErrKernel wraps errors of nftables; it is nft.ErrKernel (isolate's too).
	ErrKernel = nft.ErrKernel
)

// Plan is the guard's desired state, sorted and without duplicates.
type Plan struct {
	Bridges  []string
	Ports    []Port
	Kinds    []string       // the counters, one per kind
	Underlay []netip.Prefix // masked
}

// Empty reports whether the plan guards nothing (no bridge or no port).
func (p Plan) Empty() bool { return len(p.Bridges) == 0 || len(p.Ports) == 0 }

// bridgeKey and portKey are the user data of the guard's rules: what the rule does, so
// that Set compares the kernel's rules with the plan's without decoding expressions.
func bridgeKey(b string) string  { return "weft-guard bridge " + b }
func portKey(p Port) string      { return fmt.Sprintf("weft-guard drop %s %d %s", p.Proto, p.Port, p.Kind) }
func forwardKey(b string) string { return "weft-guard forward " + b }
func underlayKey(u netip.Prefix) string {
	return "weft-guard underlay " + u.String()
}

// inputKeys and portKeys are the rule keys of each chain, in order.
func (p Plan) inputKeys() []string {
	keys := make([]string, len(p.Bridges))
	for i, b := range p.Bridges {
		keys[i] = bridgeKey(b)
	}
	return keys
}

func (p Plan) underlayKeys() []string {
	keys := make([]string, len(p.Underlay))
	for i, u := range p.Underlay {
		keys[i] = underlayKey(u)
	}
	return keys
}

func (p Plan) forwardKeys() []string {
	keys := make([]string, len(p.Bridges))
	for i, b := range p.Bridges {
		keys[i] = forwardKey(b)
	}
	return keys
}

func (p Plan) portKeys() []string {
	keys := make([]string, len(p.Ports))
	for i, port := range p.Ports {
		keys[i] = portKey(port)
	}
	return keys
}

// NewPlan checks cfg and computes the desired state: pure. O(B log B + P log P) for B
// bridges and P ports (both small: one bridge per network, about ten ports).
func NewPlan(cfg Config) (Plan, error) {
	var p Plan
	if len(cfg.Bridges) > MaxBridges || len(cfg.Ports) > MaxPorts || len(cfg.Underlay) > MaxUnderlay {
		return Plan{}, fmt.Errorf("%w: %d bridges, %d ports, %d underlay ranges: at most %d, %d, %d",
			ErrConfig, len(cfg.Bridges), len(cfg.Ports), len(cfg.Underlay), MaxBridges, MaxPorts, MaxUnderlay)
	}
	for _, b := range cfg.Bridges {
		if b == "" || len(b) >= unix.IFNAMSIZ || strings.ContainsAny(b, "/ \x00") {
			return Plan{}, fmt.Errorf("%w: bridge name %q", ErrConfig, b)
		}
		p.Bridges = append(p.Bridges, b)
	}
	slices.Sort(p.Bridges)
	p.Bridges = slices.Compact(p.Bridges)
	for _, port := range cfg.Ports {
		switch {
		case !validKind(port.Kind):
			return Plan{}, fmt.Errorf("%w: port kind %q: want 1-24 of [a-z0-9_]", ErrConfig, port.Kind)
		case port.Proto != TCP && port.Proto != UDP:
			return Plan{}, fmt.Errorf("%w: %s port %d: protocol %q is neither tcp nor udp", ErrConfig, port.Kind, port.Port, port.Proto)
		case port.Port == 0:
			// A port of 0 is one the peer does not use (e.g. HTTP off): nothing to guard.
			continue
		case port.Port == cfg.DNSPort:
			return Plan{}, fmt.Errorf("%w: %s port %d/%s is the DNS port, which containers must reach", ErrConfig, port.Kind, port.Port, port.Proto)
		}
		p.Ports = append(p.Ports, port)
	}
	slices.SortFunc(p.Ports, func(a, b Port) int {
		if c := strings.Compare(string(a.Proto), string(b.Proto)); c != 0 {
			return c
		}
		if a.Port != b.Port {
			return int(a.Port) - int(b.Port)
		}
		return strings.Compare(a.Kind, b.Kind)
	})
	// One rule per protocol and port: a port listed under two kinds counts under the first.
	p.Ports = slices.CompactFunc(p.Ports, func(a, b Port) bool { return a.Proto == b.Proto && a.Port == b.Port })
	for _, port := range p.Ports {
		p.Kinds = append(p.Kinds, port.Kind)
	}
	slices.Sort(p.Kinds)
	p.Kinds = slices.Compact(p.Kinds)
	for _, u := range cfg.Underlay {
		if !u.IsValid() || u.Bits() == 0 {
			// 0.0.0.0/0 would guard the ports everywhere, the internet included.
			return Plan{}, fmt.Errorf("%w: underlay range %v: want a valid prefix narrower than /0", ErrConfig, u)
		}
		p.Underlay = append(p.Underlay, u.Masked())
	}
	slices.SortFunc(p.Underlay, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	p.Underlay = slices.Compact(p.Underlay)
	if p.Empty() {
		return Plan{}, nil
	}
	return p, nil
}

func validKind(k string) bool {
	if k == "" || len(k) > 24 {
		return false
	}
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}
