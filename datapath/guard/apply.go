package guard

import (
	"fmt"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath/nft"
)

// Deps are the collaborators of a Guard: a logger, a registry, a namespace (tests).
type Deps = nft.Deps

// Guard applies plans to the kernel. Its methods are safe for concurrent use (its applier
// serialises them: each is a read of the guard's objects and at most one transaction).
type Guard struct{ a *nft.Applier }

// New builds a Guard and registers its metrics: weft_guard_applies_total{result} and
// weft_guard_dropped_packets_total{kind}, read from the kernel's named counters on scrape.
func New(deps Deps) (*Guard, error) {
	g := &Guard{}
	dropped := nft.CounterCollector{Desc: droppedDesc, Read: g.Dropped,
		Labels: func(kind string) ([]string, bool) { return []string{kind}, true }}
	a, err := nft.NewApplier(deps, prometheus.CounterOpts{
		Name: "weft_guard_applies_total",
		Help: "Convergences of the container guard (nftables), by result: changed, unchanged, error.",
	}, dropped)
	if err != nil {
		return nil, err
	}
	g.a = a
	return g, nil
}

var (
	table  = &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	policy = nftables.ChainPolicyAccept
	input  = &nftables.Chain{Name: InputChain, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &policy}
	ports   = &nftables.Chain{Name: PortsChain, Table: table}
	forward = &nftables.Chain{Name: ForwardChain, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &policy}
	underlay = &nftables.Chain{Name: UnderlayChain, Table: table}
	// chains are the guard's chains, base chains (which jump) first.
	chains = []*nftables.Chain{input, forward, ports, underlay}
	// mine is what the guard owns in weft's table: no set.
	mine = nft.Mine{Table: table, Chains: chains, CounterPrefix: CounterPrefix}
)

// state is what the kernel holds of the guard.
type state struct {
	table    bool                // the table exists
	rules    map[string][]string // rule keys by chain, in order; a missing chain is absent
	counters []string            // kinds with a counter, sorted
}

// read returns the guard's objects as the kernel holds them.
func read(c *nftables.Conn) (state, error) {
	o, err := nft.Read(c, mine)
	if err != nil {
		return state{}, err
	}
	s := state{table: o.Table, rules: make(map[string][]string, len(o.Rules))}
	for ch, rules := range o.Rules {
		s.rules[ch] = nft.Keys(rules)
	}
	for _, name := range o.Counters {
		s.counters = append(s.counters, strings.TrimPrefix(name, CounterPrefix))
	}
	return s, nil
}

// matches reports whether the kernel holds exactly the plan.
func (s state) matches(p Plan) bool {
	if !s.table || !slices.Equal(s.counters, p.Kinds) {
		return false
	}
	for name, want := range p.keys() {
		have, ok := s.rules[name]
		if !ok || !slices.Equal(have, want) {
			return false
		}
	}
	return true
}

// keys are the plan's rule keys by chain.
func (p Plan) keys() map[string][]string {
	return map[string][]string{
		InputChain: p.inputKeys(), ForwardChain: p.forwardKeys(),
		PortsChain: p.portKeys(), UnderlayChain: p.underlayKeys(),
	}
}

// Set converges the kernel to cfg: nothing is done when it already matches; otherwise one
// transaction rewrites the guard's two chains and adds or deletes its counters (counters
// that stay keep their values). An empty plan (no bridge or no port) removes the guard. A
// bad cfg is refused, counted and logged, and changes nothing.
func (g *Guard) Set(cfg Config) error {
	return g.a.Apply("container guard not applied", func() (nft.Result, error) { return g.set(cfg) })
}

func (g *Guard) set(cfg Config) (nft.Result, error) {
	p, err := NewPlan(cfg)
	if err != nil {
		return "", err
	}
	if p.Empty() {
		return g.remove()
	}
	c, err := g.a.Conn() // a big ack buffer: 100 bridges ack a few hundred messages
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
	for _, ch := range chains {
		c.AddChain(ch)
		c.FlushChain(ch)
	}
	for _, k := range p.Kinds {
		if !slices.Contains(cur.counters, k) {
			c.AddObj(&nftables.CounterObj{Table: table, Name: CounterPrefix + k})
		}
	}
	for _, b := range p.Bridges {
		c.AddRule(&nftables.Rule{Table: table, Chain: input, UserData: []byte(bridgeKey(b)), Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nft.IfName(b)},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: PortsChain},
		}})
	}
	for _, b := range p.Bridges {
		c.AddRule(&nftables.Rule{Table: table, Chain: forward, UserData: []byte(forwardKey(b)), Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nft.IfName(b)},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: UnderlayChain},
		}})
	}
	for _, u := range p.Underlay {
		proto, offset := byte(unix.NFPROTO_IPV4), uint32(16) // ip daddr
		if u.Addr().Is6() {
			proto, offset = unix.NFPROTO_IPV6, 24 // ip6 daddr
		}
		n := uint32(u.Addr().BitLen() / 8)
		c.AddRule(&nftables.Rule{Table: table, Chain: underlay, UserData: []byte(underlayKey(u)), Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: n},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: nft.PrefixMask(u), Xor: make([]byte, n)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: u.Addr().AsSlice()},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: PortsChain},
		}})
	}
	for _, port := range p.Ports {
		proto := byte(unix.IPPROTO_TCP)
		if port.Proto == UDP {
			proto = unix.IPPROTO_UDP
		}
		c.AddRule(&nftables.Rule{Table: table, Chain: ports, UserData: []byte(portKey(port)), Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port.Port)},
			&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: CounterPrefix + port.Kind},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}})
	}
	for _, k := range cur.counters {
		if !slices.Contains(p.Kinds, k) { // after the flush: no rule refers to it any more
			c.DeleteObject(&nftables.CounterObj{Table: table, Name: CounterPrefix + k})
		}
	}
	if err := c.Flush(); err != nil {
		return "", fmt.Errorf("%w: apply guard (%d bridges, %d ports): %w", ErrKernel, len(p.Bridges), len(p.Ports), err)
	}
	g.a.Log().Info("container guard applied", "bridges", p.Bridges, "ports", len(p.Ports))
	return nft.Changed, nil
}

// Remove deletes the guard's chains and counters, and weft's table when nothing else is
// left in it. Removing what is already gone is success.
func (g *Guard) Remove() error {
	return g.a.Apply("container guard not removed", g.remove)
}

// remove deletes the objects of the guard (inside Apply).
func (g *Guard) remove() (nft.Result, error) { return g.a.Clear(mine, "container guard") }

// Dropped returns the packets dropped so far, by kind, from the kernel's counters.
func (g *Guard) Dropped() (map[string]uint64, error) {
	c, err := g.a.Conn()
	if err != nil {
		return nil, err
	}
	return nft.Counters(c, table, CounterPrefix)
}

// droppedDesc is exported by an nft.CounterCollector on scrape (one netlink dump, O(kinds)).
var droppedDesc = prometheus.NewDesc("weft_guard_dropped_packets_total",
	"Packets from containers to the peer's own control ports dropped by the container guard, by kind of port.",
	[]string{"kind"}, nil)
