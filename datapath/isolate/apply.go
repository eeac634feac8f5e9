package isolate

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath/nft"
)

// Deps are the collaborators of an Isolator: a logger, a registry, a namespace (tests).
type Deps = nft.Deps

// Isolator applies plans to the kernel. Its methods are safe for concurrent use (its
// applier serialises them: each is a read of the isolator's objects and at most one
// transaction).
type Isolator struct{ a *nft.Applier }

// New builds an Isolator and registers its metrics: weft_isolation_applies_total{result}
// and weft_isolation_drops_total{network,direction}, read from the kernel's named counters
// on scrape.
func New(deps Deps) (*Isolator, error) {
	iso := &Isolator{}
	drops := nft.CounterCollector{Desc: dropsDesc, Read: iso.counters,
		Labels: func(name string) ([]string, bool) {
			d, ok := dropOf(name)
			return []string{d.Network, d.Direction}, ok
		}}
	a, err := nft.NewApplier(deps, prometheus.CounterOpts{
		Name: "weft_isolation_applies_total",
		Help: "Convergences of the isolation between networks (nftables), by result: changed, unchanged, error.",
	}, drops)
	if err != nil {
		return nil, err
	}
	iso.a = a
	return iso, nil
}

var (
	table   = &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	policy  = nftables.ChainPolicyAccept
	forward = &nftables.Chain{Name: ForwardChain, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy}
	input = &nftables.Chain{Name: InputChain, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &policy}
	// bases are the base chains, groups the chains they jump to (made first).
	bases      = []*nftables.Chain{forward, input}
	groupChain = map[string]*nftables.Chain{
		SpoofChain:   {Name: SpoofChain, Table: table},
		EgressChain:  {Name: EgressChain, Table: table},
		IngressChain: {Name: IngressChain, Table: table},
	}
)

// groupChains are the chains the base chains jump to, in the order of groups.
func groupChains() []*nftables.Chain {
	out := make([]*nftables.Chain, 0, len(groups))
	for _, g := range groups {
		out = append(out, groupChain[g.chain])
	}
	return out
}

// chains are every chain of the isolator, groups first (a base chain jumps to them).
func chains() []*nftables.Chain { return append(groupChains(), bases...) }

// mine is what the isolator owns in weft's table, its chains in the order they are
// deleted: the base chains before the chains they jump to.
var mine = nft.Mine{Table: table, Chains: append(slices.Clone(bases), groupChains()...),
	CounterPrefix: CounterPrefix, Sets: []string{RangesSet}}

// state is what the kernel holds of the isolator's objects.
type state struct {
	table    bool                           // the table exists
	foreign  bool                           // the table holds others' objects too
	rules    map[string]map[string][]uint64 // chain → rule key → handles; a missing chain is absent
	order    map[string][]string            // chain → rule keys in order (for the base chains)
	set      *nftables.Set                  // nil: absent
	ranges   []Interval                     // the set's elements
	counters []string                       // named counters with CounterPrefix, sorted
}

// read returns the isolator's objects as the kernel holds them; the guard's (and anyone
// else's) objects in the table are only noted as foreign. O(rules + networks).
func read(c *nftables.Conn) (state, error) {
	o, err := nft.Read(c, mine)
	if err != nil {
		return state{}, err
	}
	s := state{table: o.Table, foreign: o.Foreign, counters: o.Counters, set: o.Sets[RangesSet],
		rules: make(map[string]map[string][]uint64, len(o.Rules)), order: make(map[string][]string, len(o.Rules))}
	for ch, rules := range o.Rules {
		keys := make(map[string][]uint64, len(rules))
		for _, r := range rules {
			keys[r.Key] = append(keys[r.Key], r.Handle)
		}
		s.rules[ch] = keys
		s.order[ch] = nft.Keys(rules)
	}
	if s.set != nil {
		elems, err := c.GetSetElements(s.set)
		if err != nil {
			return s, fmt.Errorf("%w: list elements of %s: %w", ErrKernel, RangesSet, err)
		}
		s.ranges = intervalsOf(elems)
	}
	return s, nil
}

// intervalsOf reads an IPv4 interval set's elements back as intervals: each start element
// up to the end element that follows it (exclusive). The kernel may list them in any order
// and may hold a leading end element at 0.0.0.0, which belongs to no interval.
func intervalsOf(elems []nftables.SetElement) []Interval {
	type edge struct {
		a   netip.Addr
		end bool
	}
	var edges []edge
	for _, e := range elems {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok || !a.Is4() {
			continue
		}
		edges = append(edges, edge{a, e.IntervalEnd})
	}
	slices.SortFunc(edges, func(x, y edge) int {
		if c := x.a.Compare(y.a); c != 0 {
			return c
		}
		if x.end == y.end {
			return 0
		}
		if x.end { // an end closes the previous interval before a start opens the next
			return -1
		}
		return 1
	})
	var out []Interval
	for i, e := range edges {
		if e.end {
			continue
		}
		last := netip.AddrFrom4([4]byte{255, 255, 255, 255})
		if i+1 < len(edges) && edges[i+1].end {
			last = edges[i+1].a.Prev()
		}
		out = append(out, Interval{First: e.a, Last: last})
	}
	return out
}

// elements are the set elements of the plan's ranges: a start and an exclusive end each.
func (p Plan) elements() []nftables.SetElement {
	var out []nftables.SetElement
	for _, r := range p.Ranges {
		out = append(out,
			nftables.SetElement{Key: r.First.AsSlice()},
			nftables.SetElement{Key: r.Last.Next().AsSlice(), IntervalEnd: true})
	}
	return out
}

// matches reports whether the kernel holds exactly the plan: the base chains' jumps in
// order, the same rule keys in each group chain (each once, in any order), the same ranges,
// the same counters.
func (s state) matches(p Plan) bool {
	if !s.table || s.set == nil || !slices.Equal(s.ranges, p.Ranges) || !slices.Equal(s.counters, p.Counters()) {
		return false
	}
	for name, want := range p.ChainKeys() {
		have, ok := s.rules[name]
		if !ok || len(have) != len(want) {
			return false
		}
		if slices.ContainsFunc(bases, func(b *nftables.Chain) bool { return b.Name == name }) {
			if !slices.Equal(s.order[name], want) {
				return false
			}
			continue
		}
		for _, k := range want {
			if len(have[k]) != 1 {
				return false
			}
		}
	}
	return true
}

// Set converges the kernel to the isolation of nets: nothing is done when it already
// matches; otherwise one transaction deletes the rules the plan no longer has, adds the
// ones it lacks (rules that stay keep their handles and counters), rewrites the set of
// ranges if it changed, and adds or deletes named counters. A plan with no isolated network
// removes the isolator's objects. A bad input is refused, counted and logged, and changes
// nothing. O(networks) rules and elements.
func (iso *Isolator) Set(nets []Network) error {
	return iso.a.Apply("isolation between networks not applied", func() (nft.Result, error) { return iso.set(nets) })
}

func (iso *Isolator) set(nets []Network) (nft.Result, error) {
	p, err := NewPlan(nets)
	if err != nil {
		return "", err
	}
	if p.Empty() {
		return iso.remove()
	}
	c, err := iso.a.Conn() // a big ack buffer: 64 networks ack a few hundred messages
	if err != nil {
		return "", err
	}
	cur, err := read(c)
	if err != nil {
		return "", err
	}
	if cur.matches(p) {
		return nft.Unchanged, nil
	}
	c.AddTable(table) // no-op when it exists
	for _, ch := range chains() {
		if _, ok := cur.rules[ch.Name]; !ok {
			c.AddChain(ch)
		}
	}
	set := cur.set
	if set == nil {
		set = &nftables.Set{Table: table, Name: RangesSet, KeyType: nftables.TypeIPAddr, Interval: true}
		if err := c.AddSet(set, p.elements()); err != nil {
			return "", fmt.Errorf("%w: add set %s: %w", ErrKernel, RangesSet, err)
		}
	} else if !slices.Equal(cur.ranges, p.Ranges) {
		// Flushed and refilled in the same transaction: no packet sees the set empty.
		c.FlushSet(set)
		if err := c.SetAddElements(set, p.elements()); err != nil {
			return "", fmt.Errorf("%w: fill set %s: %w", ErrKernel, RangesSet, err)
		}
	}
	want := p.Counters()
	for _, name := range want {
		if !slices.Contains(cur.counters, name) {
			c.AddObj(&nftables.CounterObj{Table: table, Name: name})
		}
	}
	keys := p.ChainKeys()
	// The base chains hold only the fixed jumps: rewritten whole when they differ.
	for _, ch := range bases {
		if slices.Equal(cur.order[ch.Name], keys[ch.Name]) {
			continue
		}
		if _, ok := cur.rules[ch.Name]; ok {
			c.FlushChain(ch)
		}
		for _, g := range groups {
			c.AddRule(&nftables.Rule{Table: table, Chain: ch, UserData: []byte(jumpKey(g.chain)), Exprs: []expr.Any{
				&expr.Verdict{Kind: expr.VerdictJump, Chain: g.chain},
			}})
		}
	}
	var added, deleted int
	for _, g := range groups {
		ch := groupChain[g.chain]
		for k, handles := range cur.rules[ch.Name] {
			keep := 0
			if slices.Contains(keys[ch.Name], k) {
				keep = 1 // one of each; duplicates go
			}
			for _, h := range handles[keep:] {
				if err := c.DelRule(&nftables.Rule{Table: table, Chain: ch, Handle: h}); err != nil {
					return "", fmt.Errorf("%w: delete rule %q: %w", ErrKernel, k, err)
				}
				deleted++
			}
		}
	}
	for _, r := range p.Rules {
		ch := groupChain[r.Chain()]
		if len(cur.rules[ch.Name][r.Key()]) > 0 {
			continue
		}
		// Appended: the rules of one chain match disjoint packets, so order is free.
		c.AddRule(&nftables.Rule{Table: table, Chain: ch, UserData: []byte(r.Key()), Exprs: ruleExprs(r, set)})
		added++
	}
	for _, name := range cur.counters {
		if !slices.Contains(want, name) { // after its rules' deletion, in the same transaction
			c.DeleteObject(&nftables.CounterObj{Table: table, Name: name})
		}
	}
	var isolated []string
	for _, n := range p.Networks {
		if n.Isolated {
			isolated = append(isolated, n.Name)
		}
	}
	if err := c.Flush(); err != nil {
		return "", fmt.Errorf("%w: apply isolation of %v among %d networks: %w", ErrKernel, isolated, len(p.Networks), err)
	}
	iso.a.Log().Info("isolation between networks applied", "isolated", isolated, "networks", len(p.Networks),
		"rules_added", added, "rules_deleted", deleted)
	return nft.Changed, nil
}

// IPv4 header offsets of the addresses.
const (
	saddrOffset = 12
	daddrOffset = 16
)

// ruleExprs is one drop rule (see the package doc): `meta nfproto ipv4`, then
//
//	spoofed:  iifname B ip saddr != M [ip saddr @isolate_ranges]
//	egress:   ip saddr N ip daddr != N ip daddr @isolate_ranges
//	ingress:  ip daddr N ip saddr != N ip saddr @isolate_ranges
//
// then `counter name isolate_<network>_<direction> drop`.
func ruleExprs(r Rule, set *nftables.Set) []expr.Any {
	mask := nft.PrefixMask(r.Subnet)
	network := r.Subnet.Addr().AsSlice()
	inSubnet := func(off uint32, op expr.CmpOp) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
			&expr.Cmp{Op: op, Register: 1, Data: network},
		}
	}
	inRanges := func(off uint32) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		}
	}
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
	switch r.Direction {
	case Spoofed:
		exprs = append(exprs,
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nft.IfName(r.Bridge)})
		exprs = append(exprs, inSubnet(saddrOffset, expr.CmpOpNeq)...)
		if !r.Isolated {
			exprs = append(exprs, inRanges(saddrOffset)...)
		}
	case Egress:
		exprs = append(exprs, inSubnet(saddrOffset, expr.CmpOpEq)...)
		exprs = append(exprs, inSubnet(daddrOffset, expr.CmpOpNeq)...)
		exprs = append(exprs, inRanges(daddrOffset)...)
	case Ingress:
		exprs = append(exprs, inSubnet(daddrOffset, expr.CmpOpEq)...)
		exprs = append(exprs, inSubnet(saddrOffset, expr.CmpOpNeq)...)
		exprs = append(exprs, inRanges(saddrOffset)...)
	}
	return append(exprs,
		&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: r.Counter()},
		&expr.Verdict{Kind: expr.VerdictDrop},
	)
}

// Remove deletes the isolator's chains, set and counters, and weft's table when nothing
// else is left in it; the guard's objects stay. Removing what is already gone is success.
func (iso *Isolator) Remove() error {
	return iso.a.Apply("isolation between networks not removed", iso.remove)
}

// remove deletes the objects of the isolator (inside Apply).
func (iso *Isolator) remove() (nft.Result, error) {
	return iso.a.Clear(mine, "isolation between networks")
}

// Drop names one counter: the packets of a network dropped in one direction.
type Drop struct {
	Network   string
	Direction string // Spoofed, Egress or Ingress
}

// Dropped returns the packets dropped so far, from the kernel's named counters (forward
// and input together). O(counters) = O(networks).
func (iso *Isolator) Dropped() (map[Drop]uint64, error) {
	m, err := iso.counters()
	if err != nil {
		return nil, err
	}
	out := make(map[Drop]uint64, len(m))
	for name, v := range m {
		if d, ok := dropOf(name); ok {
			out[d] = v
		}
	}
	return out, nil
}

// counters are the packets of the isolator's named counters by name without CounterPrefix
// (network_direction). O(counters) = O(networks).
func (iso *Isolator) counters() (map[string]uint64, error) {
	c, err := iso.a.Conn()
	if err != nil {
		return nil, err
	}
	return nft.Counters(c, table, CounterPrefix)
}

// dropOf is the drop a counter counts, from its name without CounterPrefix.
func dropOf(name string) (Drop, bool) {
	i := strings.LastIndexByte(name, '_')
	if i <= 0 {
		return Drop{}, false
	}
	return Drop{Network: name[:i], Direction: name[i+1:]}, true
}

// dropsDesc is exported by an nft.CounterCollector on scrape (one netlink dump, O(networks)).
var dropsDesc = prometheus.NewDesc("weft_isolation_drops_total",
	"Packets between weft networks dropped by the isolation of a network, by network and direction (egress: from it; ingress: into it; spoofed: arrived on its bridge from a source it may not use).",
	[]string{"network", "direction"}, nil)
