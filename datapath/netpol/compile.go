package netpol

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Endpoint is one attachment of a container to a network, as policy sees it: its address
// there and the container's labels. Key names it (e.g. container ID and interface).
type Endpoint struct {
	Key     string            `json:"key"`
	Network string            `json:"network"`
	Addr    netip.Addr        `json:"addr"` // IPv4; others are left out (Ruleset.Skipped)
	Labels  map[string]string `json:"labels,omitempty"`
}

// Names of the sets every Ruleset has: the endpoints some policy selects in a direction.
// The kernel jumps to a direction's chain only for them, so unselected traffic costs one
// lookup per direction.
const (
	GateIngress = "netpol_gate_ingress"
	GateEgress  = "netpol_gate_egress"
)

// Gate is the gate set of d.
func Gate(d Direction) string {
	if d == Egress {
		return GateEgress
	}
	return GateIngress
}

// CounterPrefix starts the name of every named counter of a Ruleset:
// netpol_<network>_<policy>_<direction>_<rule index | "default">.
const CounterPrefix = "netpol_"

// Default is the rule part of a default deny's counter name.
const Default = "default"

// Clause is one nftables rule of a direction's chain, matching
//
//	<selected side> @Selected  [<peer side> @Peers]  [l4proto Proto [dport From-To]]
//
// where the selected side is the source for egress and the destination for ingress. Its
// verdict: Deny drops (counted by Counter and logged); Allow passes the direction (egress
// returns to the ingress check, ingress accepts). A policy's default deny is a Deny
// clause with Index -1, no peers and no ports, after every rule of the direction.
type Clause struct {
	// Key names the clause in the kernel (the rule's user data): it holds the policy's
	// content hash and the clause's place in it, so an unchanged policy keeps its rules.
	Key       string
	Direction Direction
	Policy    string // network/name
	Index     int    // the rule's index in the policy's direction; -1: the default deny
	Action    Action
	Selected  string // set of the endpoints the policy selects
	Peers     string // set of the peers; "": any peer
	PeersCIDR bool   // Peers is an interval set (the rule names CIDRs)
	Proto     Proto  // "": any protocol
	From, To  uint16 // destination ports, both included; 0: any (and for ICMP)
	Counter   string // deny clauses: the named counter (without the table)
	Text      string // the rule, described
}

// AddrSet is the content of one set: endpoint addresses and, in an interval set, the
// CIDRs of a rule's peers (merged; no address is inside one). The CIDRs come from the
// policy, whose hash names the set, so only Addrs change under a name.
type AddrSet struct {
	Interval bool
	Addrs    []netip.Addr   // sorted, unique
	Prefixes []netip.Prefix // Interval only: sorted, disjoint
}

// Ruleset is the compiled policy: the two chains' clauses in order, the sets they refer
// to, and the named counters. The number of clauses depends on the policies only; the
// endpoints are set elements.
type Ruleset struct {
	Egress   []Clause
	Ingress  []Clause
	Sets     map[string]AddrSet
	Counters []string // sorted
	// Skipped are the policies and endpoints left out, each with why (invalid, duplicate,
	// not IPv4): nothing is dropped silently.
	Skipped []string
}

// Clauses is the chain of d.
func (rs Ruleset) Clauses(d Direction) []Clause {
	if d == Egress {
		return rs.Egress
	}
	return rs.Ingress
}

// Elements counts the sets' elements (an interval counts once).
func (rs Ruleset) Elements() int {
	n := 0
	for _, s := range rs.Sets {
		n += len(s.Addrs) + len(s.Prefixes)
	}
	return n
}

// policyHash is a short hash of p's content: the names of its sets and the keys of its
// clauses carry it, so a changed policy gets new rules and sets and an unchanged one keeps
// its own (and their counters) untouched.
func policyHash(p Policy) string {
	b, _ := json.Marshal(p) // a Policy always marshals; map keys come sorted
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:6])
}

// CounterName is the named counter of a policy's rule (index) or default deny (-1).
func CounterName(network, policy string, d Direction, index int) string {
	r := Default
	if index >= 0 {
		r = fmt.Sprint(index)
	}
	return fmt.Sprintf("%s%s_%s_%s_%s", CounterPrefix, network, policy, d, r)
}

// Drop names the packets one named counter counts.
type Drop struct {
	Network   string
	Policy    string
	Direction Direction
	Rule      string // the rule's index, or Default
}

// ParseCounter reads a counter name (with or without CounterPrefix) back.
func ParseCounter(name string) (Drop, bool) {
	parts := strings.Split(strings.TrimPrefix(name, CounterPrefix), "_")
	if len(parts) != 4 || (parts[2] != string(Ingress) && parts[2] != string(Egress)) {
		return Drop{}, false
	}
	return Drop{Network: parts[0], Policy: parts[1], Direction: Direction(parts[2]), Rule: parts[3]}, true
}

// compiler memoizes selector results during one Compile.
type compiler struct {
	byNet map[string][]Endpoint // sorted by address
	memo  map[string][]netip.Addr
}

// selected are the addresses of network's endpoints that s matches, sorted. O(endpoints
// of the network) the first time a (network, selector) pair is asked, O(1) after.
func (c *compiler) selected(network string, s *Selector) []netip.Addr {
	key := network
	if s != nil {
		key += "\x00" + s.key()
	}
	if out, ok := c.memo[key]; ok {
		return out
	}
	// The labels as a slice: iterating a map per endpoint costs more than the check.
	type pair struct{ k, v string }
	var pairs []pair
	var exprs Selector
	if s != nil {
		for k, v := range s.MatchLabels {
			pairs = append(pairs, pair{k, v})
		}
		exprs.MatchExpressions = s.MatchExpressions
	}
	out := []netip.Addr{}
next:
	for _, e := range c.byNet[network] {
		for _, p := range pairs {
			if v, ok := e.Labels[p.k]; !ok || v != p.v {
				continue next
			}
		}
		if exprs.Matches(e.Labels) {
			out = append(out, e.Addr)
		}
	}
	out = slices.Compact(out) // two endpoints on one address: one element
	c.memo[key] = out
	return out
}

// Compile computes the Ruleset of policies over endpoints: pure. A policy that does not
// Validate, or repeats a network/name already seen, is left out and listed in Skipped, as
// is an endpoint without an IPv4 address. Cost: O(P log P + E log E) to sort, plus one
// selector evaluation per endpoint of the network per distinct (network, selector) among
// the policies and peers, O(S × E) — 1000 endpoints and 200 policies compile in a few
// tens of milliseconds (BenchmarkCompile).
func Compile(policies []Policy, endpoints []Endpoint) Ruleset {
	rs := Ruleset{Sets: map[string]AddrSet{}}
	c := &compiler{byNet: map[string][]Endpoint{}, memo: map[string][]netip.Addr{}}
	for _, e := range endpoints {
		if !e.Addr.Is4() {
			rs.Skipped = append(rs.Skipped, fmt.Sprintf("endpoint %s: address %v is not IPv4", e.Key, e.Addr))
			continue
		}
		c.byNet[e.Network] = append(c.byNet[e.Network], e)
	}
	for _, eps := range c.byNet {
		slices.SortFunc(eps, func(a, b Endpoint) int { return a.Addr.Compare(b.Addr) })
	}
	ps := make([]Policy, 0, len(policies))
	seen := map[string]bool{}
	for _, p := range policies {
		if err := p.Validate(); err != nil {
			rs.Skipped = append(rs.Skipped, fmt.Sprintf("policy %s: %v", p.ID(), err))
			continue
		}
		if seen[p.ID()] {
			rs.Skipped = append(rs.Skipped, fmt.Sprintf("policy %s: listed twice", p.ID()))
			continue
		}
		seen[p.ID()] = true
		ps = append(ps, p)
	}
	slices.SortFunc(ps, func(a, b Policy) int {
		return cmp.Or(cmp.Compare(a.Order, b.Order), strings.Compare(a.Network, b.Network), strings.Compare(a.Name, b.Name))
	})
	gates := map[Direction][]netip.Addr{}
	var defaults []Clause
	for _, p := range ps {
		h := policyHash(p)
		sel := fmt.Sprintf("netpol_%s_sel", h)
		selAddrs := c.selected(p.Network, &p.Selector)
		rs.Sets[sel] = AddrSet{Addrs: selAddrs}
		for _, d := range p.Directions() {
			gates[d] = append(gates[d], selAddrs...)
			base := Clause{Direction: d, Policy: p.ID(), Selected: sel}
			for i, r := range p.Rules(d) {
				rs.addRule(c, p, h, base, i, r)
			}
			def := base
			def.Key = fmt.Sprintf("netpol %s %s %s default", h, p.ID(), d)
			def.Index, def.Action = -1, Deny
			def.Counter = CounterName(p.Network, p.Name, d, -1)
			def.Text = "default deny"
			defaults = append(defaults, def)
			rs.Counters = append(rs.Counters, def.Counter)
		}
	}
	for _, def := range defaults { // after every rule: only what no rule decided
		if def.Direction == Egress {
			rs.Egress = append(rs.Egress, def)
		} else {
			rs.Ingress = append(rs.Ingress, def)
		}
	}
	for _, d := range []Direction{Ingress, Egress} {
		g := gates[d]
		slices.SortFunc(g, netip.Addr.Compare)
		rs.Sets[Gate(d)] = AddrSet{Addrs: slices.Compact(g)}
	}
	slices.Sort(rs.Counters)
	rs.Counters = slices.Compact(rs.Counters)
	return rs
}

// addRule appends the clauses of rule i of p in direction base.Direction: one per kind of
// peer (addresses, CIDRs; or any) and port range (or any), with their sets.
func (rs *Ruleset) addRule(c *compiler, p Policy, h string, base Clause, i int, r Rule) {
	d := base.Direction
	var addrs []netip.Addr
	var cidrs []netip.Prefix
	for _, pe := range r.Peers {
		if pe.CIDR.IsValid() {
			cidrs = append(cidrs, pe.CIDR)
			continue
		}
		network := pe.Network
		if network == "" {
			network = p.Network
		}
		addrs = append(addrs, c.selected(network, pe.Selector)...)
	}
	if !slices.IsSortedFunc(addrs, netip.Addr.Compare) { // one peer's are already
		slices.SortFunc(addrs, netip.Addr.Compare)
	}
	addrs = slices.Compact(addrs) // two peers may name one endpoint
	peers := ""
	if len(r.Peers) > 0 {
		// One set per rule: an interval set when the rule names CIDRs (its endpoints are
		// single-address intervals beside them), a plain one otherwise. So a rule is one
		// clause per port range whatever its peers.
		peers = fmt.Sprintf("netpol_%s_%c%d", h, d[0], i)
		set := AddrSet{Addrs: addrs}
		if len(cidrs) > 0 {
			set = AddrSet{Interval: true, Prefixes: mergePrefixes(cidrs)}
			set.Addrs = slices.DeleteFunc(addrs, func(a netip.Addr) bool { return inPrefixes(set.Prefixes, a) })
		}
		rs.Sets[peers] = set
	}
	ports := r.Ports
	if len(ports) == 0 {
		ports = []PortRange{{}}
	}
	cl := base
	cl.Index, cl.Action, cl.Text = i, r.Action, r.String()
	if r.Action == Deny {
		cl.Counter = CounterName(p.Network, p.Name, d, i)
		rs.Counters = append(rs.Counters, cl.Counter)
	}
	for pi, pr := range ports {
		x := cl
		x.Peers, x.PeersCIDR, x.Proto = peers, rs.Sets[peers].Interval, pr.Proto
		if pr.Proto != ICMP && pr.Proto != "" {
			x.From, x.To = pr.Bounds()
		}
		x.Key = fmt.Sprintf("netpol %s %s %s %d.%d", h, p.ID(), d, i, pi)
		if d == Egress {
			rs.Egress = append(rs.Egress, x)
		} else {
			rs.Ingress = append(rs.Ingress, x)
		}
	}
}

// inPrefixes reports whether a is in one of ps.
func inPrefixes(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// mergePrefixes sorts prefixes and drops those inside another, so that the intervals of
// an nftables interval set never overlap. O(n log n).
func mergePrefixes(ps []netip.Prefix) []netip.Prefix {
	ps = slices.Clone(ps)
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	var out []netip.Prefix
	for _, p := range ps {
		if n := len(out); n > 0 && out[n-1].Contains(p.Addr()) && out[n-1].Bits() <= p.Bits() {
			continue // inside the previous one (sorted: a wider one comes first)
		}
		out = append(out, p)
	}
	return out
}

// Delta is what changes from one Ruleset to another: whole sets (new ones are created
// with their content), elements of the address sets both hold, clauses (by key) and
// counters. An endpoint's arrival or label change is elements only.
type Delta struct {
	NewSets, GoneSets         []string // sorted
	Add, Del                  map[string][]netip.Addr
	NewClauses, GoneClauses   []string // keys; the order of new ones is the new Ruleset's
	NewCounters, GoneCounters []string
}

// Empty reports whether nothing changes.
func (d Delta) Empty() bool {
	return len(d.NewSets)+len(d.GoneSets)+len(d.Add)+len(d.Del)+len(d.NewClauses)+
		len(d.GoneClauses)+len(d.NewCounters)+len(d.GoneCounters) == 0
}

// Elements counts the elements added to and deleted from existing sets.
func (d Delta) Elements() int {
	n := 0
	for _, a := range d.Add {
		n += len(a)
	}
	for _, a := range d.Del {
		n += len(a)
	}
	return n
}

// Diff computes the Delta from old to new: pure, O(elements + clauses). A set whose name
// is in both is compared address by address; its CIDRs are the same (the policy's hash
// names the set), so they are never patched.
func Diff(old, new Ruleset) Delta {
	d := Delta{Add: map[string][]netip.Addr{}, Del: map[string][]netip.Addr{}}
	for name, ns := range new.Sets {
		os, ok := old.Sets[name]
		if !ok {
			d.NewSets = append(d.NewSets, name)
			continue
		}
		add, del := DiffAddrs(os.Addrs, ns.Addrs)
		if len(add) > 0 {
			d.Add[name] = add
		}
		if len(del) > 0 {
			d.Del[name] = del
		}
	}
	for name := range old.Sets {
		if _, ok := new.Sets[name]; !ok {
			d.GoneSets = append(d.GoneSets, name)
		}
	}
	slices.Sort(d.NewSets)
	slices.Sort(d.GoneSets)
	keys := func(rs Ruleset) map[string]bool {
		m := make(map[string]bool, len(rs.Egress)+len(rs.Ingress))
		for _, chain := range [][]Clause{rs.Egress, rs.Ingress} {
			for i := range chain {
				m[chain[i].Key] = true
			}
		}
		return m
	}
	ok, nk := keys(old), keys(new)
	for _, chain := range [][]Clause{new.Egress, new.Ingress} {
		for i := range chain {
			if !ok[chain[i].Key] {
				d.NewClauses = append(d.NewClauses, chain[i].Key)
			}
		}
	}
	for _, chain := range [][]Clause{old.Egress, old.Ingress} {
		for i := range chain {
			if !nk[chain[i].Key] {
				d.GoneClauses = append(d.GoneClauses, chain[i].Key)
			}
		}
	}
	d.NewCounters, d.GoneCounters = sortedDiffStrings(old.Counters, new.Counters)
	return d
}

// DiffAddrs returns what is in b and not a (add), and in a and not b (del), for two sorted
// address lists; both results sorted. O(len(a)+len(b)).
func DiffAddrs(a, b []netip.Addr) (add, del []netip.Addr) {
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && a[i].Less(b[j])):
			del = append(del, a[i])
			i++
		case i == len(a) || b[j].Less(a[i]):
			add = append(add, b[j])
			j++
		default:
			i++
			j++
		}
	}
	return add, del
}

func sortedDiffStrings(a, b []string) (add, del []string) {
	for _, s := range b {
		if _, found := slices.BinarySearch(a, s); !found {
			add = append(add, s)
		}
	}
	for _, s := range a {
		if _, found := slices.BinarySearch(b, s); !found {
			del = append(del, s)
		}
	}
	return add, del
}

// key is a canonical text of s: equal selectors have equal keys (labels sorted; values
// cannot hold NUL, which separates the parts).
func (s Selector) key() string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(s.MatchLabels)) {
		b.WriteString(k + "=" + s.MatchLabels[k] + "\x00")
	}
	for _, r := range s.MatchExpressions {
		b.WriteString("\x01" + r.Key + " " + r.Operator + " " + strings.Join(r.Values, ",") + "\x00")
	}
	return b.String()
}
