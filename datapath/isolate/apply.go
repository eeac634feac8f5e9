package isolate

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Deps are the collaborators of an Isolator.
type Deps struct {
	Logger   *slog.Logger          // nil: discard
	Registry prometheus.Registerer // nil: metrics not exported
	// NetNSFd is a network namespace to work in (tests); 0 means the current one.
	NetNSFd int
}

// Isolator applies plans to the kernel. Its methods are safe for concurrent use (one mutex
// serialises them: each is a read of the isolator's objects and at most one transaction).
type Isolator struct {
	log     *slog.Logger
	netns   int
	applies *prometheus.CounterVec // result
	mu      sync.Mutex             // serialises Set and Remove
}

// Results of weft_isolation_applies_total.
const (
	resultChanged   = "changed"
	resultUnchanged = "unchanged"
	resultError     = "error"
)

// New builds an Isolator and registers its metrics: weft_isolation_applies_total{result}
// and weft_isolation_drops_total{network,direction}, read from the kernel's named counters
// on scrape.
func New(deps Deps) (*Isolator, error) {
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	iso := &Isolator{log: log, netns: deps.NetNSFd,
		applies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_isolation_applies_total",
			Help: "Convergences of the isolation between networks (nftables), by result: changed, unchanged, error.",
		}, []string{"result"}),
	}
	if deps.Registry != nil {
		for _, c := range []prometheus.Collector{iso.applies, dropsCollector{iso}} {
			if err := deps.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("isolation metrics: %w", err)
			}
		}
	}
	return iso, nil
}

// ackBuffer is the receive buffer of the isolator's netlink socket. The kernel acknowledges
// every message of a transaction before the first ack is read, and a change among 64
// networks is a few hundred messages: more than the default buffer (rmem_default, 208 KiB)
// holds, which fails the transaction with ENOBUFS. nft sizes its buffer the same way.
const ackBuffer = 8 << 20

// bigAckBuffer sets ackBuffer with SO_RCVBUFFORCE (weft runs with CAP_NET_ADMIN), falling
// back to SO_RCVBUF, which the kernel caps at rmem_max.
func bigAckBuffer(c *netlink.Conn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return c.SetReadBuffer(ackBuffer)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, ackBuffer)
	}); err != nil || serr != nil {
		return c.SetReadBuffer(ackBuffer)
	}
	return nil
}

func (iso *Isolator) conn() (*nftables.Conn, error) {
	opts := []nftables.ConnOption{nftables.WithSockOptions(bigAckBuffer)}
	if iso.netns != 0 {
		opts = append(opts, nftables.WithNetNSFd(iso.netns))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: connect: %w", ErrKernel, err)
	}
	return c, nil
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

// chains are every chain of the isolator, groups first (a base chain jumps to them).
func chains() []*nftables.Chain {
	var out []*nftables.Chain
	for _, g := range groups {
		out = append(out, groupChain[g.chain])
	}
	return append(out, bases...)
}

func mine(chain string) bool {
	return slices.ContainsFunc(chains(), func(c *nftables.Chain) bool { return c.Name == chain })
}

// state is what the kernel holds of the isolator's objects.
type state struct {
	table    bool
	rules    map[string]map[string][]uint64 // chain → rule key → handles; a missing chain is absent
	order    map[string][]string            // chain → rule keys in order (for the base chains)
	set      *nftables.Set                  // nil: absent
	ranges   []Interval                     // the set's elements
	counters []string                       // named counters with CounterPrefix, sorted
	foreign  bool                           // the table holds objects that are not the isolator's
}

func isNotFound(err error) bool { return errors.Is(err, unix.ENOENT) || errors.Is(err, os.ErrNotExist) }

// read returns the isolator's objects as the kernel holds them; the guard's (and anyone
// else's) objects in the table are only noted as foreign. O(rules + networks).
func read(c *nftables.Conn) (state, error) {
	var s state
	if _, err := c.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if isNotFound(err) {
			return s, nil
		}
		return s, fmt.Errorf("%w: list table %s: %w", ErrKernel, TableName, err)
	}
	s.table = true
	s.rules = make(map[string]map[string][]uint64)
	s.order = make(map[string][]string)
	all, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return s, fmt.Errorf("%w: list chains: %w", ErrKernel, err)
	}
	for _, ch := range all {
		if ch.Table.Name != TableName {
			continue
		}
		if !mine(ch.Name) {
			s.foreign = true
			continue
		}
		rules, err := c.GetRules(table, ch)
		if err != nil {
			return s, fmt.Errorf("%w: list rules of %s: %w", ErrKernel, ch.Name, err)
		}
		keys := make(map[string][]uint64, len(rules))
		for _, r := range rules {
			keys[string(r.UserData)] = append(keys[string(r.UserData)], r.Handle)
			s.order[ch.Name] = append(s.order[ch.Name], string(r.UserData))
		}
		s.rules[ch.Name] = keys
	}
	objs, err := c.GetObjects(table)
	if err != nil && !isNotFound(err) {
		return s, fmt.Errorf("%w: list objects: %w", ErrKernel, err)
	}
	for _, o := range objs {
		if co, ok := o.(*nftables.CounterObj); ok && strings.HasPrefix(co.Name, CounterPrefix) {
			s.counters = append(s.counters, co.Name)
		} else {
			s.foreign = true
		}
	}
	slices.Sort(s.counters)
	sets, err := c.GetSets(table)
	if err != nil && !isNotFound(err) {
		return s, fmt.Errorf("%w: list sets: %w", ErrKernel, err)
	}
	for _, set := range sets {
		if set.Name != RangesSet {
			s.foreign = true
			continue
		}
		s.set = set
		elems, err := c.GetSetElements(set)
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
	iso.mu.Lock()
	defer iso.mu.Unlock()
	err := iso.set(nets)
	if err != nil {
		iso.applies.WithLabelValues(resultError).Inc()
		iso.log.Error("isolation between networks not applied", "err", err)
	}
	return err
}

func (iso *Isolator) set(nets []Network) error {
	p, err := NewPlan(nets)
	if err != nil {
		return err
	}
	if p.Empty() {
		return iso.remove()
	}
	c, err := iso.conn()
	if err != nil {
		return err
	}
	cur, err := read(c)
	if err != nil {
		return err
	}
	if cur.matches(p) {
		iso.applies.WithLabelValues(resultUnchanged).Inc()
		return nil
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
			return fmt.Errorf("%w: add set %s: %w", ErrKernel, RangesSet, err)
		}
	} else if !slices.Equal(cur.ranges, p.Ranges) {
		// Flushed and refilled in the same transaction: no packet sees the set empty.
		c.FlushSet(set)
		if err := c.SetAddElements(set, p.elements()); err != nil {
			return fmt.Errorf("%w: fill set %s: %w", ErrKernel, RangesSet, err)
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
					return fmt.Errorf("%w: delete rule %q: %w", ErrKernel, k, err)
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
		return fmt.Errorf("%w: apply isolation of %v among %d networks: %w", ErrKernel, isolated, len(p.Networks), err)
	}
	iso.applies.WithLabelValues(resultChanged).Inc()
	iso.log.Info("isolation between networks applied", "isolated", isolated, "networks", len(p.Networks),
		"rules_added", added, "rules_deleted", deleted)
	return nil
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
	mask := net4Mask(r.Subnet.Bits())
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
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.Bridge)})
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

// ifname is an interface name as the kernel compares it (IFNAMSIZ bytes, NUL-padded).
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

// net4Mask is the IPv4 netmask of a prefix length.
func net4Mask(bits int) []byte {
	m := make([]byte, 4)
	for i := 0; i < bits; i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// Remove deletes the isolator's chains, set and counters, and weft's table when nothing
// else is left in it; the guard's objects stay. Removing what is already gone is success.
func (iso *Isolator) Remove() error {
	iso.mu.Lock()
	defer iso.mu.Unlock()
	err := iso.remove()
	if err != nil {
		iso.applies.WithLabelValues(resultError).Inc()
		iso.log.Error("isolation between networks not removed", "err", err)
	}
	return err
}

func (iso *Isolator) remove() error {
	c, err := iso.conn()
	if err != nil {
		return err
	}
	cur, err := read(c)
	if err != nil {
		return err
	}
	if !cur.table || (len(cur.rules) == 0 && cur.set == nil && len(cur.counters) == 0) {
		return nil // nothing of ours
	}
	if !cur.foreign {
		c.DelTable(table) // everything in it is the isolator's
	} else {
		// Rules first (they refer to the chains, the set and the counters), then the
		// chains, base chains before the chains they jump to.
		all := chains()
		for _, ch := range all {
			if _, ok := cur.rules[ch.Name]; ok {
				c.FlushChain(ch)
			}
		}
		for i := len(all) - 1; i >= 0; i-- {
			if _, ok := cur.rules[all[i].Name]; ok {
				c.DelChain(all[i])
			}
		}
		if cur.set != nil {
			c.DelSet(cur.set)
		}
		for _, name := range cur.counters {
			c.DeleteObject(&nftables.CounterObj{Table: table, Name: name})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("%w: remove isolation: %w", ErrKernel, err)
	}
	iso.applies.WithLabelValues(resultChanged).Inc()
	iso.log.Info("isolation between networks removed")
	return nil
}

// Drop names one counter: the packets of a network dropped in one direction.
type Drop struct {
	Network   string
	Direction string // Spoofed, Egress or Ingress
}

// Dropped returns the packets dropped so far, from the kernel's named counters (forward
// and input together). O(counters) = O(networks).
func (iso *Isolator) Dropped() (map[Drop]uint64, error) {
	c, err := iso.conn()
	if err != nil {
		return nil, err
	}
	objs, err := c.GetObjects(table)
	if err != nil {
		if isNotFound(err) {
			return map[Drop]uint64{}, nil
		}
		return nil, fmt.Errorf("%w: read counters: %w", ErrKernel, err)
	}
	out := make(map[Drop]uint64)
	for _, o := range objs {
		co, ok := o.(*nftables.CounterObj)
		if !ok || !strings.HasPrefix(co.Name, CounterPrefix) {
			continue
		}
		rest := strings.TrimPrefix(co.Name, CounterPrefix)
		i := strings.LastIndexByte(rest, '_')
		if i <= 0 {
			continue
		}
		out[Drop{Network: rest[:i], Direction: rest[i+1:]}] = co.Packets
	}
	return out, nil
}

// dropsCollector exports the kernel's counters on scrape (one netlink dump, O(networks)).
type dropsCollector struct{ iso *Isolator }

var dropsDesc = prometheus.NewDesc("weft_isolation_drops_total",
	"Packets between weft networks dropped by the isolation of a network, by network and direction (egress: from it; ingress: into it; spoofed: arrived on its bridge from a source it may not use).",
	[]string{"network", "direction"}, nil)

func (d dropsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- dropsDesc }

func (d dropsCollector) Collect(ch chan<- prometheus.Metric) {
	m, err := d.iso.Dropped()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(dropsDesc, err)
		return
	}
	for k, v := range m {
		ch <- prometheus.MustNewConstMetric(dropsDesc, prometheus.CounterValue, float64(v), k.Network, k.Direction)
	}
}
