// Package netpol is weft's network policy, pure: the model (Policy, Rule, Peer, Selector),
// its parser (YAML or JSON, errors at file positions), the compiler from policies and
// labelled endpoints to a Ruleset shaped for nftables sets, the element deltas between two
// Rulesets, and Explain, which names the rule that decides a packet. The kernel side is
// datapath/netpol/nftpol.
//
// # Semantics (the NetworkPolicy model, ordered like Calico)
//
// A policy belongs to one network and selects that network's endpoints whose labels match
// its Selector (an empty selector selects every endpoint of the network). It applies in the
// directions of Types (default: ingress, plus egress when it lists egress rules, as
// Kubernetes does).
//
//   - An endpoint that no policy selects in a direction is open in that direction: members
//     of a network reach each other as before (isolation between networks is
//     datapath/isolate's business, and runs first).
//   - An endpoint selected in a direction is default-deny in it. The policies selecting it
//     are visited in ascending Order (ties by network, then name), each policy's rules in
//     the order written; the first rule whose peer, protocol and port match the packet
//     decides: allow or deny. When none matches, the packet is dropped and counted as the
//     default deny of the first (lowest-order) policy that selects the endpoint.
//   - A packet passes when both the egress decision at its source and the ingress decision
//     at its destination allow it. Replies and related packets of an allowed connection
//     (conntrack established/related) always pass, also after the policy changes: a
//     policy change never cuts a connection that is already open.
//
// So allows are a union (any allow of any selecting policy lets the packet through), and a
// deny wins over allows only when it comes first: a lower Order, or earlier in the same
// policy. Peers are endpoints chosen by a label selector in a network (the policy's own by
// default), every endpoint of a network, or a CIDR; a rule without peers matches any peer,
// a rule without ports any protocol and port. Addresses are IPv4, as weft's networks are.
package netpol

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
)

// Sentinel errors.
var (
	// ErrPolicy wraps every refusal of a policy: its file position (Parse) or field, and why.
	ErrPolicy = errors.New("invalid policy")
)

// Action is what a rule does with the packets it matches.
type Action string

// Actions.
const (
	Allow Action = "allow"
	Deny  Action = "deny"
)

// Direction is the side of an endpoint a policy guards.
type Direction string

// Directions.
const (
	Ingress Direction = "ingress" // packets to the selected endpoints
	Egress  Direction = "egress"  // packets from the selected endpoints
)

// Proto is a protocol a port range is of.
type Proto string

// Protocols.
const (
	TCP  Proto = "tcp"
	UDP  Proto = "udp"
	SCTP Proto = "sctp"
	ICMP Proto = "icmp" // no ports
)

// Number is the IP protocol number of p (0 for an unknown one).
func (p Proto) Number() uint8 {
	switch p {
	case TCP:
		return 6
	case UDP:
		return 17
	case SCTP:
		return 132
	case ICMP:
		return 1
	}
	return 0
}

// Bounds of one policy: a policy is an operator's file, so these are far above any real
// one, and keep a bad file from costing the compiler (and the kernel) much.
const (
	MaxFileBytes   = 256 << 10
	MaxRules       = 64  // per direction
	MaxPeers       = 64  // per rule
	MaxPorts       = 32  // per rule
	MaxLabels      = 32  // matchLabels plus matchExpressions of one selector
	MaxValues      = 64  // values of one expression
	MaxLabelLength = 63  // a label key or value, in bytes
	MaxOrder       = 1e6 // Order is in [0, MaxOrder]
)

// Policy selects endpoints of one network by label and lists the rules for their traffic.
type Policy struct {
	Name     string      `json:"name" yaml:"name"`
	Network  string      `json:"network" yaml:"network"`
	Selector Selector    `json:"selector" yaml:"selector"`
	Order    int         `json:"order,omitempty" yaml:"order"`
	Types    []Direction `json:"types,omitempty" yaml:"types"` // empty: see Directions
	Ingress  []Rule      `json:"ingress,omitempty" yaml:"ingress"`
	Egress   []Rule      `json:"egress,omitempty" yaml:"egress"`

	pos position // where the policy starts in its file (Parse), for errors
}

// Rule matches packets by peer and port and allows or denies them.
type Rule struct {
	Action Action      `json:"action" yaml:"action"`
	Peers  []Peer      `json:"peers,omitempty" yaml:"peers"` // none: any peer
	Ports  []PortRange `json:"ports,omitempty" yaml:"ports"` // none: any protocol and port

	pos position
}

// Peer is the other side of a packet: endpoints by label (Selector, in Network or the
// policy's network), every endpoint of Network, or an address range (CIDR, alone).
type Peer struct {
	Selector *Selector    `json:"selector,omitempty" yaml:"selector"`
	Network  string       `json:"network,omitempty" yaml:"network"`
	CIDR     netip.Prefix `json:"cidr,omitzero" yaml:"cidr"`

	pos position
}

// PortRange is a protocol and its destination ports From..To (both included). From 0 is
// every port; To 0 is From alone. ICMP has no ports.
type PortRange struct {
	Proto Proto  `json:"proto" yaml:"proto"`
	From  uint16 `json:"from,omitempty" yaml:"from"`
	To    uint16 `json:"to,omitempty" yaml:"to"`

	pos position
}

// Bounds returns the first and last port of r (1 and 65535 for every port).
func (r PortRange) Bounds() (uint16, uint16) {
	switch {
	case r.From == 0:
		return 1, 65535
	case r.To == 0:
		return r.From, r.From
	}
	return r.From, r.To
}

// Selector chooses endpoints by their labels: all of MatchLabels and all of
// MatchExpressions must hold. The empty selector chooses every endpoint.
type Selector struct {
	MatchLabels      map[string]string `json:"matchLabels,omitempty" yaml:"matchLabels"`
	MatchExpressions []Requirement     `json:"matchExpressions,omitempty" yaml:"matchExpressions"`
}

// Operators of a Requirement.
const (
	OpIn           = "In"
	OpNotIn        = "NotIn"
	OpExists       = "Exists"
	OpDoesNotExist = "DoesNotExist"
)

// Requirement is one expression of a selector: Key's value In (or NotIn) Values, or Key
// Exists (DoesNotExist) with no values.
type Requirement struct {
	Key      string   `json:"key" yaml:"key"`
	Operator string   `json:"operator" yaml:"operator"`
	Values   []string `json:"values,omitempty" yaml:"values"`

	pos position
}

// Matches reports whether labels satisfy s. O(labels of s).
func (s Selector) Matches(labels map[string]string) bool {
	for k, v := range s.MatchLabels {
		if have, ok := labels[k]; !ok || have != v {
			return false
		}
	}
	for _, r := range s.MatchExpressions {
		v, ok := labels[r.Key]
		switch r.Operator {
		case OpIn:
			if !ok || !slices.Contains(r.Values, v) {
				return false
			}
		case OpNotIn:
			if ok && slices.Contains(r.Values, v) {
				return false
			}
		case OpExists:
			if !ok {
				return false
			}
		case OpDoesNotExist:
			if ok {
				return false
			}
		default:
			return false // Validate refuses it; never select on an unknown operator
		}
	}
	return true
}

// Directions are the directions p applies in: Types, or by default ingress, plus egress
// when p has egress rules.
func (p Policy) Directions() []Direction {
	if len(p.Types) > 0 {
		var out []Direction
		for _, d := range []Direction{Ingress, Egress} {
			if slices.Contains(p.Types, d) {
				out = append(out, d)
			}
		}
		return out
	}
	if len(p.Egress) > 0 {
		return []Direction{Ingress, Egress}
	}
	return []Direction{Ingress}
}

// Rules are p's rules of direction d.
func (p Policy) Rules(d Direction) []Rule {
	if d == Egress {
		return p.Egress
	}
	return p.Ingress
}

// ID names p among all policies: network/name.
func (p Policy) ID() string { return p.Network + "/" + p.Name }

// position is a place in a policy file (1-based); the zero position is unknown.
type position struct{ line, col int }

// at prefixes a field's path with its file position when it is known.
func (p position) at(path string) string {
	if p.line == 0 {
		return path
	}
	return fmt.Sprintf("line %d column %d: %s", p.line, p.col, path)
}

// nameRE is what policy and network names may be: ipam's rule for network names. It keeps
// names free of '_', which separates them in counter names.
var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// labelRE is what label keys and values may be (Kubernetes' name part: no '=' or ',',
// which the CNI_ARGS convention of #15 cannot carry).
var labelRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_./-]*[A-Za-z0-9])?$`)

// Validate checks p and names the first thing wrong (with its file position when p was
// parsed) in an ErrPolicy. O(size of p).
func (p Policy) Validate() error {
	bad := func(pos position, path, format string, args ...any) error {
		return fmt.Errorf("%w %q: %s: %s", ErrPolicy, p.Name, pos.at(path), fmt.Sprintf(format, args...))
	}
	if !nameRE.MatchString(p.Name) {
		return bad(p.pos, "name", "%q: want 1-32 of [a-z0-9-], not starting or ending with '-'", p.Name)
	}
	if !nameRE.MatchString(p.Network) {
		return bad(p.pos, "network", "%q: want a network name", p.Network)
	}
	if p.Order < 0 || p.Order > MaxOrder {
		return bad(p.pos, "order", "%d: want 0 to %d", p.Order, int(MaxOrder))
	}
	if err := validSelector(p.Selector, func(pos position, path, reason string) error {
		return bad(pos, "selector"+path, "%s", reason)
	}, p.pos); err != nil {
		return err
	}
	seen := map[Direction]bool{}
	for i, d := range p.Types {
		if d != Ingress && d != Egress {
			return bad(p.pos, fmt.Sprintf("types[%d]", i), "%q: want ingress or egress", d)
		}
		if seen[d] {
			return bad(p.pos, fmt.Sprintf("types[%d]", i), "%q listed twice", d)
		}
		seen[d] = true
	}
	for _, d := range []Direction{Ingress, Egress} {
		rules := p.Rules(d)
		if len(rules) > MaxRules {
			return bad(p.pos, string(d), "%d rules, at most %d", len(rules), MaxRules)
		}
		if len(rules) > 0 && !slices.Contains(p.Directions(), d) {
			return bad(p.pos, string(d), "rules listed but types %v leave %s out", p.Types, d)
		}
		for i, r := range rules {
			path := fmt.Sprintf("%s[%d]", d, i)
			if err := validRule(r, func(pos position, sub, reason string) error {
				return bad(pos, path+sub, "%s", reason)
			}); err != nil {
				return err
			}
		}
	}
	return nil
}

// complaint builds the error for the field at path (relative) and position.
type complaint func(pos position, path, reason string) error

func validRule(r Rule, bad complaint) error {
	if r.Action != Allow && r.Action != Deny {
		return bad(r.pos, ".action", fmt.Sprintf("%q: want allow or deny", r.Action))
	}
	if len(r.Peers) > MaxPeers {
		return bad(r.pos, ".peers", fmt.Sprintf("%d peers, at most %d", len(r.Peers), MaxPeers))
	}
	if len(r.Ports) > MaxPorts {
		return bad(r.pos, ".ports", fmt.Sprintf("%d port ranges, at most %d", len(r.Ports), MaxPorts))
	}
	for i, pe := range r.Peers {
		path := fmt.Sprintf(".peers[%d]", i)
		switch {
		case pe.CIDR.IsValid() && (pe.Selector != nil || pe.Network != ""):
			return bad(pe.pos, path, "a cidr stands alone: no selector or network with it")
		case pe.CIDR.IsValid() && !pe.CIDR.Addr().Is4():
			return bad(pe.pos, path+".cidr", fmt.Sprintf("%v: want an IPv4 prefix", pe.CIDR))
		case pe.CIDR.IsValid() && pe.CIDR.Masked() != pe.CIDR:
			return bad(pe.pos, path+".cidr", fmt.Sprintf("%v has host bits set (want %v)", pe.CIDR, pe.CIDR.Masked()))
		case !pe.CIDR.IsValid() && pe.Selector == nil && pe.Network == "":
			return bad(pe.pos, path, "empty: want a selector, a network or a cidr")
		case pe.Network != "" && !nameRE.MatchString(pe.Network):
			return bad(pe.pos, path+".network", fmt.Sprintf("%q: want a network name", pe.Network))
		}
		if pe.Selector != nil {
			if err := validSelector(*pe.Selector, func(pos position, sub, reason string) error {
				return bad(pos, path+".selector"+sub, reason)
			}, pe.pos); err != nil {
				return err
			}
		}
	}
	for i, pr := range r.Ports {
		path := fmt.Sprintf(".ports[%d]", i)
		switch {
		case pr.Proto.Number() == 0:
			return bad(pr.pos, path+".proto", fmt.Sprintf("%q: want tcp, udp, sctp or icmp", pr.Proto))
		case pr.Proto == ICMP && (pr.From != 0 || pr.To != 0):
			return bad(pr.pos, path, "icmp has no ports")
		case pr.From == 0 && pr.To != 0:
			return bad(pr.pos, path+".to", fmt.Sprintf("%d without from", pr.To))
		case pr.To != 0 && pr.To < pr.From:
			return bad(pr.pos, path+".to", fmt.Sprintf("%d is below from %d", pr.To, pr.From))
		}
	}
	return nil
}

func validSelector(s Selector, bad complaint, pos position) error {
	if n := len(s.MatchLabels) + len(s.MatchExpressions); n > MaxLabels {
		return bad(pos, "", fmt.Sprintf("%d labels and expressions, at most %d", n, MaxLabels))
	}
	keys := make([]string, 0, len(s.MatchLabels))
	for k := range s.MatchLabels {
		keys = append(keys, k)
	}
	slices.Sort(keys) // the first bad label is always the same one
	for _, k := range keys {
		if err := validLabel(k); err != nil {
			return bad(pos, ".matchLabels", fmt.Sprintf("key %.80q: %v", k, err))
		}
		if err := validLabel(s.MatchLabels[k]); err != nil {
			return bad(pos, ".matchLabels."+k, fmt.Sprintf("value %.80q: %v", s.MatchLabels[k], err))
		}
	}
	for i, r := range s.MatchExpressions {
		path := fmt.Sprintf(".matchExpressions[%d]", i)
		if err := validLabel(r.Key); err != nil {
			return bad(r.pos, path+".key", fmt.Sprintf("%.80q: %v", r.Key, err))
		}
		switch r.Operator {
		case OpIn, OpNotIn:
			if len(r.Values) == 0 {
				return bad(r.pos, path+".values", r.Operator+" needs values")
			}
		case OpExists, OpDoesNotExist:
			if len(r.Values) != 0 {
				return bad(r.pos, path+".values", r.Operator+" takes no values")
			}
		default:
			return bad(r.pos, path+".operator", fmt.Sprintf("%q: want In, NotIn, Exists or DoesNotExist", r.Operator))
		}
		if len(r.Values) > MaxValues {
			return bad(r.pos, path+".values", fmt.Sprintf("%d values, at most %d", len(r.Values), MaxValues))
		}
		for _, v := range r.Values {
			if err := validLabel(v); err != nil {
				return bad(r.pos, path+".values", fmt.Sprintf("%.80q: %v", v, err))
			}
		}
	}
	return nil
}

// ValidLabel checks a label key or value, as selectors and endpoints carry them.
func ValidLabel(s string) error { return validLabel(s) }

func validLabel(s string) error {
	switch {
	case len(s) == 0:
		return errors.New("empty")
	case len(s) > MaxLabelLength:
		return fmt.Errorf("%d bytes, at most %d", len(s), MaxLabelLength)
	case !labelRE.MatchString(s):
		return errors.New("want letters, digits and _./- inside")
	}
	return nil
}

// String is a short description of a rule for logs and Explain.
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString(string(r.Action))
	if len(r.Peers) > 0 {
		fmt.Fprintf(&b, " %d peers", len(r.Peers))
	}
	for _, p := range r.Ports {
		if p.Proto == ICMP {
			b.WriteString(" icmp")
			continue
		}
		lo, hi := p.Bounds()
		if lo == hi {
			fmt.Fprintf(&b, " %s/%d", p.Proto, lo)
		} else {
			fmt.Fprintf(&b, " %s/%d-%d", p.Proto, lo, hi)
		}
	}
	return b.String()
}
