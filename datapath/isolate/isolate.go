// Package isolate keeps containers on different weft networks apart: a packet whose source
// is in one network's range and whose destination is in another's is dropped when either
// network is isolated, on the forward hook (between two bridges of one host, and between a
// bridge and a tunnel or direct route for traffic across hosts) and on the input hook (a
// container reaching another network's gateway address on its host). Non-isolated
// networks reach each other as routed ranges, as the single network did before #13; the
// network pinned at bootstrap (default) is not isolated, so it keeps reaching the other
// non-isolated networks and is cut from the isolated ones.
//
// The rules are written in weft's own nftables table (inet "weft", shared with
// datapath/guard), in two base chains of this package's own and one interval set:
//
//	set   isolate_ranges   every network's range (merged where adjacent)
//	chain isolate_fwd      hook forward, priority filter, policy accept
//	chain isolate_in       hook input,   priority filter, policy accept
//
// and, for each isolated network N, in each of the two chains:
//
//	ip saddr N ip daddr != N ip daddr @isolate_ranges counter name isolate_N_egress drop
//	ip daddr N ip saddr != N ip saddr @isolate_ranges counter name isolate_N_ingress drop
//
// So the rule count is 4 per isolated network, whatever the number of containers or of
// non-isolated networks (those are only elements of the set); one set lookup per rule
// replaces a rule per pair of networks, which would grow with networks squared. Traffic to
// or from addresses outside every weft range (the internet, the underlay, the host's own
// addresses) is never touched.
//
// A packet between two isolated networks matches the egress rule of its source and the
// ingress rule of its destination; it is counted once, by the egress counter of its source:
// every egress rule comes before every ingress rule in a chain (the applier inserts egress
// rules at the head and appends ingress rules, so the order holds across changes).
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
)

// Table, chains, set and counter prefix this package owns in weft's table.
const (
	TableName     = "weft"
	ForwardChain  = "isolate_fwd"    // base chain, hook forward
	InputChain    = "isolate_in"     // base chain, hook input
	RangesSet     = "isolate_ranges" // interval set of every network's range
	CounterPrefix = "isolate_"       // + network + "_" + direction
)

// Directions of a drop, the label of weft_isolation_drops_total.
const (
	Egress  = "egress"  // from this network to another one
	Ingress = "ingress" // from another network to this one
)

// Hooks a rule is in.
const (
	HookForward = "forward"
	HookInput   = "input"
)

// MaxNetworks bounds a plan: a transaction stays small (4 rules per isolated network).
// ipam allows 64 networks; the slack is for future growth, not a target.
const MaxNetworks = 1024

// Sentinel errors.
var (
	// ErrConfig wraps every error of NewPlan: nothing is changed.
	ErrConfig = errors.New("invalid isolation config")
	// ErrKernel wraps errors of nftables.
	ErrKernel = errors.New("nftables")
)

// Network is what isolation needs of a weft network.
type Network struct {
	Name     string
	Subnet   netip.Prefix // IPv4, masked
	Isolated bool
}

// Rule is one drop rule of the plan.
type Rule struct {
	Hook      string // HookForward or HookInput
	Network   string
	Subnet    netip.Prefix
	Direction string // Egress: saddr in Subnet; Ingress: daddr in Subnet
}

// Key is the rule's user data in the kernel: what the rule does, so that Set compares
// the kernel's rules with the plan's without decoding expressions. It names the subnet,
// so a network re-created with another range gets a new rule.
func (r Rule) Key() string {
	return fmt.Sprintf("weft-isolate %s %s %s %s", r.Hook, r.Direction, r.Network, r.Subnet)
}

// Counter is the name of the rule's named counter: one per network and direction, shared
// by the forward and input rules.
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
	Rules    []Rule // forward rules, then input rules; per hook egress, then ingress, by network
}

// Empty reports whether the plan drops nothing (no isolated network).
func (p Plan) Empty() bool { return len(p.Rules) == 0 }

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
	out := map[string][]string{ForwardChain: {}, InputChain: {}}
	for _, r := range p.Rules {
		ch := ForwardChain
		if r.Hook == HookInput {
			ch = InputChain
		}
		out[ch] = append(out[ch], r.Key())
	}
	return out
}

// nameRE is what a network name may be in a counter name (ipam's rule for names).
var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// NewPlan checks the networks and computes the desired isolation: pure. Bad input (a bad
// name, a range that is not a masked IPv4 prefix, a duplicate name, overlapping ranges,
// too many networks) is an ErrConfig naming what is wrong. O(N log N) for N networks; the
// overlap check is on the sorted ranges, O(N).
func NewPlan(nets []Network) (Plan, error) {
	if len(nets) > MaxNetworks {
		return Plan{}, fmt.Errorf("%w: %d networks, at most %d", ErrConfig, len(nets), MaxNetworks)
	}
	var p Plan
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
	for _, hook := range []string{HookForward, HookInput} {
		for _, dir := range []string{Egress, Ingress} {
			for _, n := range p.Networks {
				if n.Isolated {
					p.Rules = append(p.Rules, Rule{Hook: hook, Network: n.Name, Subnet: n.Subnet, Direction: dir})
				}
			}
		}
	}
	if p.Empty() {
		return Plan{}, nil
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

// Drops reports whether the plan drops a packet from src to dst, and which counter
// counts it; the same decision the kernel rules make, for tests and for explaining a drop.
// O(rules).
func (p Plan) Drops(src, dst netip.Addr) (counter string, drop bool) {
	inRanges := func(a netip.Addr) bool {
		for _, r := range p.Ranges {
			if r.First.Compare(a) <= 0 && a.Compare(r.Last) <= 0 {
				return true
			}
		}
		return false
	}
	for _, r := range p.Rules { // in kernel order: egress before ingress
		if r.Hook != HookForward {
			continue // the input rules are the same matches
		}
		own, other := src, dst
		if r.Direction == Ingress {
			own, other = dst, src
		}
		if r.Subnet.Contains(own) && !r.Subnet.Contains(other) && inRanges(other) {
			return r.Counter(), true
		}
	}
	return "", false
}
