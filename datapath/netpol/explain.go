package netpol

import (
	"fmt"
	"net/netip"
	"slices"
)

// Verdict is the decision of one direction.
type Verdict struct {
	Allowed bool
	// Selected: some policy selects the endpoint in this direction; false is the default
	// allow of a network's members.
	Selected bool
	Policy   string // network/name of the deciding policy ("" when not selected)
	Index    int    // the deciding rule's index; -1: the policy's default deny
	Counter  string // the named counter a drop rises (without the table)
	Reason   string
}

// Decision is what the Ruleset does with one packet: both directions' verdicts, and a
// sentence naming the rule that decides.
type Decision struct {
	Allowed bool
	Egress  Verdict // at the source
	Ingress Verdict // at the destination
	Reason  string
}

// Explain evaluates a new connection's first packet from src to dst (proto, destination
// port; 0 for ICMP) the way the kernel's chains do, in their order: egress at the source,
// then ingress at the destination, each first match wins. O(clauses × log elements).
func (rs Ruleset) Explain(src, dst netip.Addr, proto Proto, port uint16) Decision {
	eg := rs.verdict(Egress, src, dst, proto, port)
	dec := Decision{Egress: eg}
	if !eg.Allowed {
		dec.Reason = eg.Reason
		return dec
	}
	in := rs.verdict(Ingress, dst, src, proto, port)
	dec.Ingress, dec.Allowed = in, in.Allowed
	switch {
	case !in.Allowed, !eg.Selected:
		dec.Reason = in.Reason
	case in.Selected:
		dec.Reason = eg.Reason + "; " + in.Reason
	default:
		dec.Reason = eg.Reason
	}
	return dec
}

// verdict walks direction d's chain for a packet whose endpoint on the selected side is
// self and whose other side is peer.
func (rs Ruleset) verdict(d Direction, self, peer netip.Addr, proto Proto, port uint16) Verdict {
	if !rs.contains(Gate(d), self) {
		return Verdict{Allowed: true, Index: -1,
			Reason: fmt.Sprintf("default allow: no policy selects %v for %s", self, d)}
	}
	for _, c := range rs.Clauses(d) {
		if !rs.contains(c.Selected, self) {
			continue
		}
		if c.Peers != "" && !rs.contains(c.Peers, peer) {
			continue
		}
		if c.Proto != "" && (c.Proto != proto || (c.From != 0 && (port < c.From || port > c.To))) {
			continue
		}
		v := Verdict{Allowed: c.Action == Allow, Selected: true, Policy: c.Policy, Index: c.Index, Counter: c.Counter}
		if c.Index < 0 {
			v.Reason = fmt.Sprintf("default deny of policy %s (%s of %v): no rule matches", c.Policy, d, self)
		} else {
			v.Reason = fmt.Sprintf("%s rule %d of policy %s (%s)", d, c.Index, c.Policy, c.Text)
		}
		return v
	}
	// Unreachable for a compiled Ruleset: a gated endpoint has a selecting policy, whose
	// default deny matches it.
	return Verdict{Allowed: true, Index: -1, Reason: fmt.Sprintf("no clause matches %v for %s", self, d)}
}

// contains reports whether the set called name holds a. O(log elements).
func (rs Ruleset) contains(name string, a netip.Addr) bool {
	s, ok := rs.Sets[name]
	if !ok {
		return false
	}
	if inPrefixes(s.Prefixes, a) {
		return true
	}
	_, found := slices.BinarySearchFunc(s.Addrs, a, netip.Addr.Compare)
	return found
}
