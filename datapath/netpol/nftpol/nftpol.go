// Package nftpol enforces a netpol.Ruleset with nftables, in weft's own table (inet
// "weft", shared with datapath/guard and datapath/isolate), in chains and sets of its own:
//
//	chain netpol_fwd      hook forward, priority filter+10 (after isolation), policy accept:
//	    ct state established,related accept
//	    meta nfproto ipv4 ip saddr @netpol_gate_egress  jump netpol_egress
//	    meta nfproto ipv4 ip daddr @netpol_gate_ingress jump netpol_ingress
//	chain netpol_egress   the Ruleset's egress clauses, in order:
//	    ip saddr @<selected> [ip daddr @<peers>] [meta l4proto P [th dport A-B]]
//	        return                                  (allow: on to the ingress check)
//	        counter name <deny counter> jump netpol_drop                      (deny)
//	chain netpol_ingress  the same with the sides swapped; allow is accept
//	chain netpol_drop     limit rate 10/second burst 20 log prefix "weft-policy drop: "
//	                      drop
//
// So the rules are 5 fixed ones plus one per clause (the policies' rules × port ranges and
// one default deny per policy and direction), whatever the number of endpoints: endpoints
// are elements of the sets. Every Apply is one netlink transaction; when only endpoints
// change it holds only set-element additions and deletions, and a changed policy only
// adds and deletes its own rules and sets (inserted at their place by handle). Nothing is
// ever flushed and rebuilt, so no packet sees a half-applied state, and the established
// rule first keeps open connections whatever the policies do.
//
// Same-bridge traffic (container to container on one host) is bridged, not routed: the
// forward hook sees it only through br_netfilter with bridge-nf-call-iptables on
// (CheckBridged). The kernels weft targets have it built in and on in every namespace;
// a bridge-family table is no substitute here because the kernel lacks
// nf_conntrack_bridge, without which "established" could not be told apart there.
// Traffic across hosts (direct, VXLAN, WireGuard) is routed through the forward hook.
package nftpol

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath/netpol"
	"github.com/weftnet/weft/datapath/nft"
)

// Table, chains and prefixes this package owns in weft's table.
const (
	TableName    = "weft"
	ForwardChain = "netpol_fwd"     // base chain, hook forward
	EgressChain  = "netpol_egress"  // the egress clauses
	IngressChain = "netpol_ingress" // the ingress clauses
	DropChain    = "netpol_drop"    // rate-limited log, then drop
	// SetPrefix starts the names of the sets (netpol's names); CounterPrefix the named
	// counters' (netpol.CounterPrefix).
	SetPrefix     = "netpol_"
	CounterPrefix = netpol.CounterPrefix
	// LogPrefix starts the kernel log line of a dropped packet (at most LogRate a second).
	LogPrefix = "weft-policy drop: "
	LogRate   = 10
	LogBurst  = 20
	// Priority of the forward chain: after isolation (and the guard) at filter, so a
	// packet isolation drops is counted there, not as a policy drop.
	Priority = 10
)

// ErrKernel wraps errors of nftables; it is nft.ErrKernel.
var ErrKernel = nft.ErrKernel

// ErrRuleset refuses a Ruleset that does not hang together (not one of Compile's).
var ErrRuleset = errors.New("invalid ruleset")

// ErrNotBridged says the forward hook does not see bridged traffic in this namespace.
var ErrNotBridged = errors.New("same-bridge traffic bypasses the forward hook")

// CheckBridged reports, with ErrNotBridged, when bridged IPv4 traffic does not reach the
// forward hook in the calling thread's network namespace (br_netfilter missing, or
// net.bridge.bridge-nf-call-iptables 0): then containers on one bridge are not policed.
// The router calls it at start and logs (or sets the sysctl, as kube-proxy requires).
func CheckBridged() error {
	const path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: %s is missing (no br_netfilter)", ErrNotBridged, path)
	case err != nil:
		return fmt.Errorf("%w: %w", ErrNotBridged, err)
	case strings.TrimSpace(string(b)) != "1":
		return fmt.Errorf("%w: %s is %s", ErrNotBridged, path, strings.TrimSpace(string(b)))
	}
	return nil
}

var (
	table   = &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName}
	accept  = nftables.ChainPolicyAccept
	forward = &nftables.Chain{Name: ForwardChain, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityRef(Priority), Policy: &accept}
	egress  = &nftables.Chain{Name: EgressChain, Table: table}
	ingress = &nftables.Chain{Name: IngressChain, Table: table}
	drop    = &nftables.Chain{Name: DropChain, Table: table}
	// chains in the order they are made: a chain before the chains that jump to it.
	chains = []*nftables.Chain{drop, egress, ingress, forward}
)

// mine is what the enforcer owns, with the sets found; chains in the order Remove deletes
// them (the base chain, which jumps, first).
func mine(sets []string) nft.Mine {
	return nft.Mine{Table: table, Chains: []*nftables.Chain{forward, egress, ingress, drop},
		CounterPrefix: CounterPrefix, Sets: sets}
}

// Keys of the fixed rules.
const (
	keyEstablished = "netpol established"
	keyGateEgress  = "netpol gate egress"
	keyGateIngress = "netpol gate ingress"
	keyLog         = "netpol log"
	keyDrop        = "netpol drop"
)

// fixed are the fixed rules of the forward and drop chains.
func fixed(sets map[string]*nftables.Set) map[string][]*nftables.Rule {
	ipv4 := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
	}
	gate := func(key string, off uint32, set *nftables.Set, to string) *nftables.Rule {
		return &nftables.Rule{Table: table, Chain: forward, UserData: []byte(key), Exprs: append(slices.Clone(ipv4),
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: to})}
	}
	return map[string][]*nftables.Rule{
		ForwardChain: {
			{Table: table, Chain: forward, UserData: []byte(keyEstablished), Exprs: []expr.Any{
				&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
				&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
					Xor:  binaryutil.NativeEndian.PutUint32(0)},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
				&expr.Verdict{Kind: expr.VerdictAccept},
			}},
			gate(keyGateEgress, saddrOffset, sets[netpol.GateEgress], EgressChain),
			gate(keyGateIngress, daddrOffset, sets[netpol.GateIngress], IngressChain),
		},
		DropChain: {
			{Table: table, Chain: drop, UserData: []byte(keyLog), Exprs: []expr.Any{
				&expr.Limit{Type: expr.LimitTypePkts, Rate: LogRate, Unit: expr.LimitTimeSecond, Burst: LogBurst},
				&expr.Log{Key: 1 << unix.NFTA_LOG_PREFIX, Data: []byte(LogPrefix)},
			}},
			{Table: table, Chain: drop, UserData: []byte(keyDrop), Exprs: []expr.Any{
				&expr.Verdict{Kind: expr.VerdictDrop},
			}},
		},
	}
}

// IPv4 header offsets of the addresses.
const (
	saddrOffset = 12
	daddrOffset = 16
)

// clauseRule is one clause as a rule of its direction's chain (see the package doc).
func clauseRule(c netpol.Clause, sets map[string]*nftables.Set) *nftables.Rule {
	self, peer, ch := uint32(saddrOffset), uint32(daddrOffset), egress
	if c.Direction == netpol.Ingress {
		self, peer, ch = daddrOffset, saddrOffset, ingress
	}
	lookup := func(off uint32, name string) []expr.Any {
		s := sets[name]
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID},
		}
	}
	exprs := lookup(self, c.Selected)
	if c.Peers != "" {
		exprs = append(exprs, lookup(peer, c.Peers)...)
	}
	if c.Proto != "" {
		exprs = append(exprs,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{c.Proto.Number()}})
		if c.From != 0 {
			exprs = append(exprs, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
			if c.From == c.To {
				exprs = append(exprs, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(c.From)})
			} else {
				exprs = append(exprs, &expr.Range{Op: expr.CmpOpEq, Register: 1,
					FromData: binaryutil.BigEndian.PutUint16(c.From), ToData: binaryutil.BigEndian.PutUint16(c.To)})
			}
		}
	}
	switch {
	case c.Action == netpol.Deny:
		exprs = append(exprs,
			&expr.Objref{Type: int(nftables.ObjTypeCounter), Name: c.Counter},
			&expr.Verdict{Kind: expr.VerdictJump, Chain: DropChain})
	case c.Direction == netpol.Egress:
		exprs = append(exprs, &expr.Verdict{Kind: expr.VerdictReturn}) // on to ingress
	default:
		exprs = append(exprs, &expr.Verdict{Kind: expr.VerdictAccept})
	}
	return &nftables.Rule{Table: table, Chain: ch, UserData: []byte(c.Key), Exprs: exprs}
}

// elements are the set elements of addresses (and, for an interval set, prefixes): an
// interval set holds a start and an exclusive end for each, the end left out when the
// interval runs to the last address.
func elements(interval bool, addrs []netip.Addr, prefixes []netip.Prefix) []nftables.SetElement {
	var out []nftables.SetElement
	if !interval {
		for _, a := range addrs {
			out = append(out, nftables.SetElement{Key: a.AsSlice()})
		}
		return out
	}
	add := func(first, last netip.Addr) {
		out = append(out, nftables.SetElement{Key: first.AsSlice()})
		if next := last.Next(); next.IsValid() {
			out = append(out, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	for _, p := range prefixes {
		add(p.Addr(), lastAddr(p))
	}
	for _, a := range addrs {
		add(a, a)
	}
	return out
}

// lastAddr is the last address of a masked IPv4 prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		a[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom4(a)
}

// dropsDesc is the drops metric; the router registers it (DropsCollector).
var dropsDesc = prometheus.NewDesc("weft_policy_drops_total",
	"Packets dropped by network policy, by policy (network/name) and direction (ingress: into the selected endpoints; egress: from them), deny rules and default denies together.",
	[]string{"policy", "direction"}, nil)
