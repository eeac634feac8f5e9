// Package isolate keeps containers on different weft networks apart: a packet whose source
// is in one network's range and whose destination is in another's is dropped when either
// network is isolated, on the forward hook (between two bridges of one host, and between a
// bridge and a tunnel or direct route for traffic across hosts) and on the input hook (a
// container reaching another network's gateway address on its host). Non-isolated
// networks reach each other as routed ranges, as the single network did before #13; the
// network pinned at bootstrap (default) is not isolated, so it keeps reaching the other
// non-isolated networks and is cut from the isolated ones.
//
// Addresses alone could be forged: a container on default sending from a control address
// would pass as control. So what arrives on a network's bridge must come from its own range:
// from an isolated network's bridge, any other source is dropped; from a non-isolated one,
// a source in another weft range is (sources outside weft, such as a container routing
// another subnet, pass as before). Across hosts, each host checks its own bridges.
//
// The rules are written in weft's own nftables table (inet "weft", shared with
// datapath/guard), in chains and one interval set of this package's own:
//
//	set   isolate_ranges   every network's range (merged where adjacent)
//	chain isolate_fwd      hook forward, priority filter, policy accept: the 3 jumps below
//	chain isolate_in       hook input,   priority filter, policy accept: the same 3 jumps
//	chain isolate_spoof    per network M with bridge B:
//	    iifname B ip saddr != M [ip saddr @isolate_ranges]  counter isolate_M_spoofed drop
//	    (the bracket only for a non-isolated M)
//	chain isolate_egress   per isolated network N:
//	    ip saddr N ip daddr != N ip daddr @isolate_ranges   counter isolate_N_egress drop
//	chain isolate_ingress  per isolated network N:
//	    ip daddr N ip saddr != N ip saddr @isolate_ranges   counter isolate_N_ingress drop
//
// So the rule count is 6 fixed jumps, plus 1 per network and 2 per isolated network,
// whatever the number of containers; the two hooks share the rules, and one set lookup per
// rule replaces a rule per pair of networks, which would grow with networks squared. Traffic
// to or from addresses outside every weft range (the internet, the underlay, the host's own
// addresses) is never dropped for isolation.
//
// Within each of the three chains the rules match disjoint packets (by bridge, by source
// range, by destination range), so their order does not matter; the chains are visited in
// the order spoof, egress, ingress, so a drop is counted once: a forged source by the bridge
// it came in on, a packet between two isolated networks by its source's egress counter.
//
// NewPlan is the pure part; Isolator (apply.go) is the thin applier.
package isolate

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath/nft"
)

// Table, chains, set and counter prefix this package owns in weft's table.
const (
	TableName     = "weft"
	ForwardChain  = "isolate_fwd"     // base chain, hook forward: the jumps
	InputChain    = "isolate_in"      // base chain, hook input: the same jumps
	SpoofChain    = "isolate_spoof"   // one rule per network with a bridge
	EgressChain   = "isolate_egress"  // one rule per isolated network
	IngressChain  = "isolate_ingress" // one rule per isolated network
	RangesSet     = "isolate_ranges"  // interval set of every network's range
	CounterPrefix = "isolate_"        // + network + "_" + direction
)

// Directions of a drop, the label of weft_isolation_drops_total.
const (
	Spoofed = "spoofed" // arrived on this network's bridge from a source it may not use
	Egress  = "egress"  // from this network to another one
	Ingress = "ingress" // from another network to this one
)

// groups are the chains the base chains jump to, in order, and the direction of each.
var groups = []struct{ chain, direction string }{
	{SpoofChain, Spoofed}, {EgressChain, Egress}, {IngressChain, Ingress},
}

// MaxNetworks bounds a plan: a transaction stays small (at most 3 rules per network).
// ipam allows 64 networks; the slack is for future growth, not a target.
const MaxNetworks = 1024

// Sentinel errors.
var (
	// ErrConfig wraps every error of NewPlan: nothing is changed.
	ErrConfig = errors.New("invalid isolation config")
	// ErrKernel wraps errors of nftables; it is nft.ErrKernel (the guard's too).
	ErrKernel = nft.ErrKernel
)

// Network is what isolation needs of a weft network.
type Network struct {
	Name     string       `json:"name"`
	Subnet   netip.Prefix `json:"subnet"` // IPv4, masked
	Isolated bool         `json:"isolated,omitempty"`
	// Bridge is the network's bridge on this host (whether it exists yet or not); "": no
	// check of the sources arriving on it.
	Bridge string `json:"bridge,omitempty"`
}

// Rule is one drop rule of the plan.
type Rule struct {
	Direction string // Spoofed, Egress or Ingress: also says the chain
	Network   string
	Subnet    netip.Prefix
	Bridge    string // Spoofed only
	Isolated  bool   // Spoofed only: any other source is dropped, not only weft's
}

// Chain is the chain the rule is in.
func (r Rule) Chain() string {
	for _, g := range groups {
		if g.direction == r.Direction {
			return g.chain
		}
	}
	return ""
}

// Key is the rule's user data in the kernel: what the rule does, so that Set compares the
// kernel's rules with the plan's without decoding expressions. It names everything the
// rule matches on, so a network re-created with another range is another rule.
func (r Rule) Key() string {
	k := fmt.Sprintf("weft-isolate %s %s %s", r.Direction, r.Network, r.Subnet)
	if r.Direction == Spoofed {
		k += " on " + r.Bridge
		if r.Isolated {
			k += " any"
		}
	}
	return k
}

// jumpKey is the user data of a base chain's jump to chain.
func jumpKey(chain string) string { return "weft-isolate jump " + chain }

// Counter is the name of the rule's named counter: one per network and direction, shared
// by the forward and input hooks.
func (r Rule) Counter() string { return CounterName(r.Network, r.Direction) }

// CounterName is the named counter of a network and direction.
func CounterName(network, direction string) string {
	return CounterPrefix + network + "_" + direction
}

// Interval is one element of the ranges set: [First, Last], both included.
type Interval struct {
	First, Last netip.Addr
}

// Plan is the desired isolation, sorted; the zero Plan isolates nothing.
type Plan struct {
	Networks []Network // by name
	Ranges   []Interval
	Rules    []Rule // spoof, then egress, then ingress rules; each by network
}

// Empty reports whether the plan isolates nothing (no isolated network): then nothing is
// applied, not even the checks of sources, and weft's datapath is as before #13.
func (p Plan) Empty() bool {
	return !slices.ContainsFunc(p.Networks, func(n Network) bool { return n.Isolated })
}

// Counters are the named counters the plan's rules use, sorted.
func (p Plan) Counters() []string {
	var out []string
	for _, r := range p.Rules {
		out = append(out, r.Counter())
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// ChainKeys are the rule keys of each chain, in order.
func (p Plan) ChainKeys() map[string][]string {
	out := map[string][]string{}
	for _, g := range groups {
		out[ForwardChain] = append(out[ForwardChain], jumpKey(g.chain))
		out[InputChain] = append(out[InputChain], jumpKey(g.chain))
		out[g.chain] = []string{}
	}
	for _, r := range p.Rules {
		out[r.Chain()] = append(out[r.Chain()], r.Key())
	}
	return out
}

// nameRE is what a network name may be in a counter name (ipam's rule for names).
var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// NewPlan checks the networks and computes the desired isolation: pure. Bad input (a bad
// name or bridge name, a range that is not a masked IPv4 prefix, a duplicate name or bridge,
// overlapping ranges, too many networks) is an ErrConfig naming what is wrong. O(N log N)
// for N networks; the overlap check is on the sorted ranges, O(N).
func NewPlan(nets []Network) (Plan, error) {
	if len(nets) > MaxNetworks {
		return Plan{}, fmt.Errorf("%w: %d networks, at most %d", ErrConfig, len(nets), MaxNetworks)
	}
	var p Plan
	bridges := map[string]string{}
	for _, n := range nets {
		switch {
		case !nameRE.MatchString(n.Name):
			return Plan{}, fmt.Errorf("%w: network name %q: want 1-32 of [a-z0-9-]", ErrConfig, n.Name)
		case !n.Subnet.IsValid() || !n.Subnet.Addr().Is4():
			return Plan{}, fmt.Errorf("%w: network %s: subnet %v is not an IPv4 prefix", ErrConfig, n.Name, n.Subnet)
		case n.Subnet.Masked() != n.Subnet:
			return Plan{}, fmt.Errorf("%w: network %s: subnet %v has host bits set", ErrConfig, n.Name, n.Subnet)
		case n.Subnet.Bits() == 0:
			// 0.0.0.0/0 would isolate the internet too.
			return Plan{}, fmt.Errorf("%w: network %s: subnet %v covers every address", ErrConfig, n.Name, n.Subnet)
		case !lastAddr(n.Subnet).Next().IsValid():
			// The set's interval ends one past the range; 240.0.0.0/4 is reserved anyway.
			return Plan{}, fmt.Errorf("%w: network %s: subnet %v reaches the end of the IPv4 space", ErrConfig, n.Name, n.Subnet)
		case n.Bridge != "" && (len(n.Bridge) >= unix.IFNAMSIZ || strings.ContainsAny(n.Bridge, "/ \x00")):
			return Plan{}, fmt.Errorf("%w: network %s: bridge name %q", ErrConfig, n.Name, n.Bridge)
		case n.Bridge != "" && bridges[n.Bridge] != "":
			return Plan{}, fmt.Errorf("%w: networks %s and %s share the bridge %s", ErrConfig, bridges[n.Bridge], n.Name, n.Bridge)
		}
		if n.Bridge != "" {
			bridges[n.Bridge] = n.Name
		}
		p.Networks = append(p.Networks, n)
	}
	slices.SortFunc(p.Networks, func(a, b Network) int { return strings.Compare(a.Name, b.Name) })
	for i := 1; i < len(p.Networks); i++ {
		if p.Networks[i].Name == p.Networks[i-1].Name {
			return Plan{}, fmt.Errorf("%w: network %s listed twice", ErrConfig, p.Networks[i].Name)
		}
	}
	byAddr := slices.Clone(p.Networks)
	slices.SortFunc(byAddr, func(a, b Network) int { return a.Subnet.Addr().Compare(b.Subnet.Addr()) })
	for i, n := range byAddr {
		first, last := n.Subnet.Addr(), lastAddr(n.Subnet)
		if i > 0 && byAddr[i-1].Subnet.Overlaps(n.Subnet) {
			return Plan{}, fmt.Errorf("%w: networks %s (%v) and %s (%v) overlap", ErrConfig,
				byAddr[i-1].Name, byAddr[i-1].Subnet, n.Name, n.Subnet)
		}
		// Sorted and disjoint: n extends the last interval when adjacent to it.
		if k := len(p.Ranges); k > 0 && p.Ranges[k-1].Last.Next() == first {
			p.Ranges[k-1].Last = last
			continue
		}
		p.Ranges = append(p.Ranges, Interval{First: first, Last: last})
	}
	if p.Empty() {
		return Plan{}, nil
	}
	for _, n := range p.Networks {
		if n.Bridge != "" {
			p.Rules = append(p.Rules, Rule{Direction: Spoofed, Network: n.Name, Subnet: n.Subnet, Bridge: n.Bridge, Isolated: n.Isolated})
		}
	}
	for _, dir := range []string{Egress, Ingress} {
		for _, n := range p.Networks {
			if n.Isolated {
				p.Rules = append(p.Rules, Rule{Direction: dir, Network: n.Name, Subnet: n.Subnet})
			}
		}
	}
	return p, nil
}

// lastAddr is the last address of a masked prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		a[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom4(a)
}

// Drops reports whether the plan drops a packet from src to dst that arrived on interface
// iif, and which counter counts it; the same decision the kernel rules make, in their
// order, for tests and for explaining a drop. O(rules).
func (p Plan) Drops(iif string, src, dst netip.Addr) (counter string, drop bool) {
	inRanges := func(a netip.Addr) bool {
		for _, r := range p.Ranges {
			if r.First.Compare(a) <= 0 && a.Compare(r.Last) <= 0 {
				return true
			}
		}
		return false
	}
	for _, r := range p.Rules { // spoof, egress, ingress: the kernel's order
		var match bool
		switch r.Direction {
		case Spoofed:
			match = iif == r.Bridge && !r.Subnet.Contains(src) && (r.Isolated || inRanges(src))
		case Egress:
			match = r.Subnet.Contains(src) && !r.Subnet.Contains(dst) && inRanges(dst)
		case Ingress:
			match = r.Subnet.Contains(dst) && !r.Subnet.Contains(src) && inRanges(src)
		}
		if match {
			return r.Counter(), true
		}
	}
	return "", false
}
