package nftpol

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/datapath/netpol"
	"github.com/weftnet/weft/datapath/nft"
)

// Deps are the collaborators of an Enforcer: a logger, a registry, a namespace (tests).
type Deps = nft.Deps

// Enforcer applies Rulesets to the kernel. Safe for concurrent use: its applier serialises
// Apply, Remove and Drops' reads; last is touched only inside the applier.
type Enforcer struct {
	a *nft.Applier
	// last is the Ruleset the kernel held after the last successful Apply: the next one
	// sends Diff(last, new) without reading the elements back. nil after a failure or
	// Remove: the next Apply reads the kernel's elements first.
	last *netpol.Ruleset
}

// New builds an Enforcer and registers weft_policy_applies_total{result} on deps.Registry.
// weft_policy_drops_total is DropsCollector's, for the router to register.
func New(deps Deps) (*Enforcer, error) {
	a, err := nft.NewApplier(deps, prometheus.CounterOpts{
		Name: "weft_policy_applies_total",
		Help: "Convergences of network policy (nftables), by result: changed, unchanged, error.",
	})
	if err != nil {
		return nil, err
	}
	return &Enforcer{a: a}, nil
}

// Stats is what one Apply sent to the kernel.
type Stats struct {
	RulesAdded, RulesDeleted       int
	SetsAdded, SetsDeleted         int
	ElementsAdded, ElementsDeleted int // in sets that stayed
	CountersAdded, CountersDeleted int
	ChainsAdded                    int
}

// Apply converges the kernel to rs in one transaction (see the package doc) and says what
// it sent; nothing when the kernel already holds rs. O(clauses) rules read and compared,
// O(changed elements) sent when the previous Apply succeeded, O(elements) read back
// otherwise. An error changes nothing (the transaction is refused whole) and is counted
// and logged.
func (e *Enforcer) Apply(rs netpol.Ruleset) (Stats, error) {
	var st Stats
	err := e.a.Apply("network policy not applied", func() (nft.Result, error) {
		var err error
		st, err = e.apply(rs)
		if err != nil {
			e.last = nil
			return "", err
		}
		if st == (Stats{}) {
			return nft.Unchanged, nil
		}
		return nft.Changed, nil
	})
	return st, err
}

// Reconcile is Apply reading the kernel back first instead of trusting what the last
// Apply left: it repairs objects changed by hand. O(rules + elements) read. The router may
// call it on a slow timer; Apply is enough otherwise.
func (e *Enforcer) Reconcile(rs netpol.Ruleset) (Stats, error) {
	var st Stats
	err := e.a.Apply("network policy not reconciled", func() (nft.Result, error) {
		e.last = nil
		if err := check(rs); err != nil {
			return "", err
		}
		var err error
		if st, err = e.applyFull(rs); err != nil {
			return "", err
		}
		if st == (Stats{}) {
			return nft.Unchanged, nil
		}
		return nft.Changed, nil
	})
	return st, err
}

// kernel is what the kernel holds of the enforcer's objects.
type kernel struct {
	owned nft.Owned
	sets  map[string]*nftables.Set
}

func (e *Enforcer) read(c *nftables.Conn) (kernel, error) {
	var names []string
	if _, err := c.ListTableOfFamily(TableName, table.Family); err != nil {
		if nft.IsNotFound(err) {
			return kernel{}, nil
		}
		return kernel{}, fmt.Errorf("%w: list table %s: %w", ErrKernel, TableName, err)
	}
	sets, err := c.GetSets(table) // its errors do not wrap the errno: the table is there
	if err != nil {
		return kernel{}, fmt.Errorf("%w: list sets: %w", ErrKernel, err)
	}
	for _, s := range sets {
		if strings.HasPrefix(s.Name, SetPrefix) {
			names = append(names, s.Name)
		}
	}
	o, err := nft.Read(c, mine(names))
	if err != nil {
		return kernel{}, err
	}
	return kernel{owned: o, sets: o.Sets}, nil
}

// contents returns what the kernel's set s holds: from the last Ruleset when it had the
// set (cached), else read back — for an interval set as intervals, since its single
// addresses and its CIDRs cannot be told apart there.
func (e *Enforcer) contents(c *nftables.Conn, s *nftables.Set) (have netpol.AddrSet, back []interval, cached bool, err error) {
	if e.last != nil {
		if have, ok := e.last.Sets[s.Name]; ok && have.Interval == s.Interval {
			return have, nil, true, nil
		}
	}
	elems, err := c.GetSetElements(s)
	if err != nil {
		return have, nil, false, fmt.Errorf("%w: list elements of %s: %w", ErrKernel, s.Name, err)
	}
	if s.Interval {
		return have, intervalsOf(elems), false, nil
	}
	have.Addrs = []netip.Addr{}
	for _, el := range elems {
		if a, ok := netip.AddrFromSlice(el.Key); ok && a.Is4() {
			have.Addrs = append(have.Addrs, a)
		}
	}
	slices.SortFunc(have.Addrs, netip.Addr.Compare)
	return have, nil, false, nil
}

// check refuses a Ruleset whose clauses name sets it lacks (only a hand-made one can).
func check(rs netpol.Ruleset) error {
	for _, g := range []string{netpol.GateEgress, netpol.GateIngress} {
		if _, ok := rs.Sets[g]; !ok {
			return fmt.Errorf("%w: no set %s", ErrRuleset, g)
		}
	}
	for _, c := range append(slices.Clone(rs.Egress), rs.Ingress...) {
		if _, ok := rs.Sets[c.Selected]; !ok {
			return fmt.Errorf("%w: clause %q names set %q, which it lacks", ErrRuleset, c.Key, c.Selected)
		}
		if _, ok := rs.Sets[c.Peers]; c.Peers != "" && !ok {
			return fmt.Errorf("%w: clause %q names set %q, which it lacks", ErrRuleset, c.Key, c.Peers)
		}
		if c.Action == netpol.Deny && c.Counter == "" {
			return fmt.Errorf("%w: deny clause %q has no counter", ErrRuleset, c.Key)
		}
	}
	return nil
}

func (e *Enforcer) apply(rs netpol.Ruleset) (Stats, error) {
	if err := check(rs); err != nil {
		return Stats{}, err
	}
	if e.last != nil {
		if d := netpol.Diff(*e.last, rs); elementsOnly(d) {
			st, err := e.applyElements(rs, d)
			if err == nil {
				return st, nil
			}
			// The kernel is not what the last apply left (edited by hand, or the table
			// removed): converge the slow way, reading it back.
			e.a.Log().Warn("network policy: element delta refused, reading the kernel back", "err", err)
			e.last = nil
		}
	}
	return e.applyFull(rs)
}

// elementsOnly reports whether d changes set elements and nothing else: endpoints came,
// went or changed labels.
func elementsOnly(d netpol.Delta) bool {
	return len(d.NewSets)+len(d.GoneSets)+len(d.NewClauses)+len(d.GoneClauses)+len(d.NewCounters)+len(d.GoneCounters) == 0
}

// applyElements sends d's element changes in one transaction without reading the kernel:
// the common case (an endpoint's arrival or label change), O(changed elements).
func (e *Enforcer) applyElements(rs netpol.Ruleset, d netpol.Delta) (Stats, error) {
	var st Stats
	if d.Elements() == 0 {
		e.last = &rs
		return st, nil
	}
	c, err := e.a.Conn()
	if err != nil {
		return st, err
	}
	for _, name := range slices.Sorted(maps.Keys(rs.Sets)) {
		add, del := d.Add[name], d.Del[name]
		if len(add)+len(del) == 0 {
			continue
		}
		s := &nftables.Set{Table: table, Name: name, KeyType: nftables.TypeIPAddr, Interval: rs.Sets[name].Interval}
		if err := patchSet(c, s, netpol.AddrSet{Addrs: del}, netpol.AddrSet{Addrs: add}, &st); err != nil {
			return st, err
		}
	}
	if err := c.Flush(); err != nil {
		return st, fmt.Errorf("%w: apply network policy elements: %w", ErrKernel, err)
	}
	e.last = &rs
	e.a.Log().Debug("network policy elements applied", "added", st.ElementsAdded, "deleted", st.ElementsDeleted)
	return st, nil
}

// applyFull reads the enforcer's objects back and converges them to rs in one
// transaction.
func (e *Enforcer) applyFull(rs netpol.Ruleset) (Stats, error) {
	var st Stats
	c, err := e.a.Conn()
	if err != nil {
		return st, err
	}
	k, err := e.read(c)
	if err != nil {
		return st, err
	}
	c.AddTable(table) // no-op when it exists
	for _, ch := range chains {
		if _, ok := k.owned.Rules[ch.Name]; !ok {
			c.AddChain(ch)
			st.ChainsAdded++
		}
	}
	for _, name := range rs.Counters {
		if !slices.Contains(k.owned.Counters, name) {
			c.AddObj(&nftables.CounterObj{Table: table, Name: name})
			st.CountersAdded++
		}
	}
	// Sets: new ones with their content; those that stay by element deltas.
	sets := make(map[string]*nftables.Set, len(rs.Sets))
	names := make([]string, 0, len(rs.Sets))
	for name := range rs.Sets {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		want := rs.Sets[name]
		if s, ok := k.sets[name]; ok && s.Interval == want.Interval {
			sets[name] = s
			have, back, cached, err := e.contents(c, s)
			if err != nil {
				return st, err
			}
			if s.Interval && !cached {
				// Read back (after a restart or a failure): refilled in this
				// transaction when it differs, so no packet sees it empty.
				if w := intervalsWanted(want); !slices.Equal(back, w) {
					c.FlushSet(s)
					if err := c.SetAddElements(s, elements(true, want.Addrs, want.Prefixes)); err != nil {
						return st, fmt.Errorf("%w: refill %s: %w", ErrKernel, name, err)
					}
					st.ElementsDeleted += len(back)
					st.ElementsAdded += len(w)
				}
				continue
			}
			if err := patchSet(c, s, have, want, &st); err != nil {
				return st, err
			}
			continue
		}
		if s, ok := k.sets[name]; ok { // same name, other kind: cannot happen unless edited by hand
			return st, fmt.Errorf("%w: set %s exists with another kind: remove it", ErrKernel, s.Name)
		}
		s := &nftables.Set{Table: table, Name: name, KeyType: nftables.TypeIPAddr, Interval: want.Interval}
		if err := c.AddSet(s, elements(want.Interval, want.Addrs, want.Prefixes)); err != nil {
			return st, fmt.Errorf("%w: add set %s: %w", ErrKernel, name, err)
		}
		sets[name] = s
		st.SetsAdded++
	}
	// The fixed rules: written whole when they differ (on creation).
	fix := fixed(sets)
	for _, ch := range []*nftables.Chain{forward, drop} {
		want := fix[ch.Name]
		if slices.Equal(nft.Keys(k.owned.Rules[ch.Name]), ruleKeys(want)) {
			continue
		}
		if _, ok := k.owned.Rules[ch.Name]; ok {
			c.FlushChain(ch) // only the fixed rules are in it: rewritten in this transaction
		}
		for _, r := range want {
			c.AddRule(r)
			st.RulesAdded++
		}
	}
	for _, d := range []netpol.Direction{netpol.Egress, netpol.Ingress} {
		if err := patchChain(c, chainOf(d), k.owned.Rules[chainOf(d).Name], rs.Clauses(d), sets, &st); err != nil {
			return st, err
		}
	}
	for name, s := range k.sets {
		if _, ok := rs.Sets[name]; !ok { // after the rules that used it, in this transaction
			c.DelSet(s)
			st.SetsDeleted++
		}
	}
	for _, name := range k.owned.Counters {
		if _, found := slices.BinarySearch(rs.Counters, name); !found {
			c.DeleteObject(&nftables.CounterObj{Table: table, Name: name})
			st.CountersDeleted++
		}
	}
	if st == (Stats{}) {
		e.last = &rs
		return st, nil
	}
	if err := c.Flush(); err != nil {
		return st, fmt.Errorf("%w: apply network policy (%d clauses, %d sets): %w", ErrKernel,
			len(rs.Egress)+len(rs.Ingress), len(rs.Sets), err)
	}
	e.last = &rs
	e.a.Log().Info("network policy applied", "rules_added", st.RulesAdded, "rules_deleted", st.RulesDeleted,
		"sets_added", st.SetsAdded, "sets_deleted", st.SetsDeleted,
		"elements_added", st.ElementsAdded, "elements_deleted", st.ElementsDeleted)
	return st, nil
}

func chainOf(d netpol.Direction) *nftables.Chain {
	if d == netpol.Egress {
		return egress
	}
	return ingress
}

func ruleKeys(rules []*nftables.Rule) []string {
	out := make([]string, len(rules))
	for i, r := range rules {
		out[i] = string(r.UserData)
	}
	return out
}

// patchSet queues the element changes from have to want on s: only addresses change
// under a set's name (its CIDRs come from the policy whose hash names it).
func patchSet(c *nftables.Conn, s *nftables.Set, have, want netpol.AddrSet, st *Stats) error {
	add, del := netpol.DiffAddrs(have.Addrs, want.Addrs)
	if len(del) > 0 {
		if err := c.SetDeleteElements(s, elements(s.Interval, del, nil)); err != nil {
			return fmt.Errorf("%w: delete elements of %s: %w", ErrKernel, s.Name, err)
		}
	}
	if len(add) > 0 {
		if err := c.SetAddElements(s, elements(s.Interval, add, nil)); err != nil {
			return fmt.Errorf("%w: add elements to %s: %w", ErrKernel, s.Name, err)
		}
	}
	st.ElementsAdded += len(add)
	st.ElementsDeleted += len(del)
	return nil
}

// patchChain queues the rule changes of one clause chain: rules whose key is gone (or
// repeated) are deleted, new ones inserted before the next rule that stays, so the chain
// ends in the Ruleset's order without touching the rules that stay. When the rules that
// stay are out of order (edited by hand), the chain is rewritten in this transaction.
func patchChain(c *nftables.Conn, ch *nftables.Chain, have []nft.Rule, want []netpol.Clause, sets map[string]*nftables.Set, st *Stats) error {
	wantKeys := make(map[string]bool, len(want))
	for _, cl := range want {
		wantKeys[cl.Key] = true
	}
	kept := map[string]uint64{}
	var keptOrder []string
	for _, r := range have {
		if !wantKeys[r.Key] || kept[r.Key] != 0 {
			if err := c.DelRule(&nftables.Rule{Table: table, Chain: ch, Handle: r.Handle}); err != nil {
				return fmt.Errorf("%w: delete rule %q: %w", ErrKernel, r.Key, err)
			}
			st.RulesDeleted++
			continue
		}
		kept[r.Key] = r.Handle
		keptOrder = append(keptOrder, r.Key)
	}
	var wantKept []string
	for _, cl := range want {
		if kept[cl.Key] != 0 {
			wantKept = append(wantKept, cl.Key)
		}
	}
	if !slices.Equal(keptOrder, wantKept) {
		c.FlushChain(ch)
		st.RulesDeleted += len(keptOrder)
		for _, cl := range want {
			c.AddRule(clauseRule(cl, sets))
			st.RulesAdded++
		}
		return nil
	}
	// next[i] is the handle of the first kept rule at or after i (0: none, append).
	next := make([]uint64, len(want)+1)
	for i := len(want) - 1; i >= 0; i-- {
		next[i] = next[i+1]
		if h := kept[want[i].Key]; h != 0 {
			next[i] = h
		}
	}
	for i, cl := range want {
		if kept[cl.Key] != 0 {
			continue
		}
		r := clauseRule(cl, sets)
		if next[i] != 0 {
			r.Position = next[i]
			c.InsertRule(r) // before the kept rule
		} else {
			c.AddRule(r)
		}
		st.RulesAdded++
	}
	return nil
}

// Remove deletes the enforcer's chains, sets and counters, and weft's table when nothing
// else is left in it. Removing what is already gone is success.
func (e *Enforcer) Remove() error {
	return e.a.Apply("network policy not removed", func() (nft.Result, error) {
		e.last = nil
		c, err := e.a.Conn()
		if err != nil {
			return "", err
		}
		k, err := e.read(c)
		if err != nil {
			return "", err
		}
		if !k.owned.Remove(c) {
			return nft.Unchanged, nil
		}
		if err := c.Flush(); err != nil {
			return "", fmt.Errorf("%w: remove network policy: %w", ErrKernel, err)
		}
		e.a.Log().Info("network policy removed")
		return nft.Changed, nil
	})
}

// Drops returns the packets each named counter has dropped so far, by policy, direction
// and rule (index or netpol.Default). One netlink dump, O(counters).
func (e *Enforcer) Drops() (map[netpol.Drop]uint64, error) {
	c, err := e.a.Conn()
	if err != nil {
		return nil, err
	}
	m, err := nft.Counters(c, table, CounterPrefix)
	if err != nil {
		return nil, err
	}
	out := make(map[netpol.Drop]uint64, len(m))
	for name, v := range m {
		if d, ok := netpol.ParseCounter(name); ok {
			out[d] = v
		}
	}
	return out, nil
}

// DropsCollector exports weft_policy_drops_total{policy,direction} from the kernel's
// counters on scrape (one dump, O(counters)), summing a policy's rules and default deny.
func (e *Enforcer) DropsCollector() prometheus.Collector { return dropsCollector{e} }

type dropsCollector struct{ e *Enforcer }

func (dc dropsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- dropsDesc }

func (dc dropsCollector) Collect(ch chan<- prometheus.Metric) {
	drops, err := dc.e.Drops()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(dropsDesc, err)
		return
	}
	type key struct{ policy, dir string }
	sum := map[key]uint64{}
	for d, v := range drops {
		sum[key{d.Network + "/" + d.Policy, string(d.Direction)}] += v
	}
	for k, v := range sum {
		ch <- prometheus.MustNewConstMetric(dropsDesc, prometheus.CounterValue, float64(v), k.policy, k.dir)
	}
}

// Rules counts the rules in the enforcer's chains (tests and status). One dump per chain.
func (e *Enforcer) Rules() (int, error) {
	c, err := e.a.Conn()
	if err != nil {
		return 0, err
	}
	k, err := e.read(c)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, rules := range k.owned.Rules {
		n += len(rules)
	}
	return n, nil
}

// interval is [first, last] of an interval set.
type interval struct{ first, last netip.Addr }

// intervalsWanted are the intervals of an interval set's content, sorted.
func intervalsWanted(s netpol.AddrSet) []interval {
	out := make([]interval, 0, len(s.Prefixes)+len(s.Addrs))
	for _, p := range s.Prefixes {
		out = append(out, interval{p.Addr(), lastAddr(p)})
	}
	for _, a := range s.Addrs {
		out = append(out, interval{a, a})
	}
	slices.SortFunc(out, func(x, y interval) int { return x.first.Compare(y.first) })
	return out
}

// intervalsOf reads an IPv4 interval set's elements back: each start element up to the
// end element that follows it (exclusive), or to the last address when none follows. The
// kernel lists them in any order, and may hold a leading end element at 0.0.0.0.
func intervalsOf(elems []nftables.SetElement) []interval {
	type edge struct {
		a   netip.Addr
		end bool
	}
	var edges []edge
	for _, e := range elems {
		if a, ok := netip.AddrFromSlice(e.Key); ok && a.Is4() {
			edges = append(edges, edge{a, e.IntervalEnd})
		}
	}
	slices.SortFunc(edges, func(x, y edge) int {
		if c := x.a.Compare(y.a); c != 0 {
			return c
		}
		switch {
		case x.end == y.end:
			return 0
		case x.end: // an end closes the previous interval before a start opens the next
			return -1
		}
		return 1
	})
	out := []interval{}
	for i, e := range edges {
		if e.end {
			continue
		}
		last := netip.AddrFrom4([4]byte{255, 255, 255, 255})
		if i+1 < len(edges) && edges[i+1].end {
			last = edges[i+1].a.Prev()
		}
		out = append(out, interval{e.a, last})
	}
	return out
}
