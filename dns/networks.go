package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Networks: a container attached to several weft networks has one address
// per network under one name. The network of an address is the one whose
// range holds it, derived here from the network list rather than carried
// in the gossiped records, so the record wire format is unchanged.
//
//   - NAME.NETWORK.<domain> answers NAME's addresses inside NETWORK's range:
//     NODATA when NAME exists but has none there, NXDOMAIN when NAME is
//     unknown. A registered name always wins over this reading: "db.web" is
//     the container "db.web" if there is one, else "db" on network "web"
//     (so that creating a network never changes what an existing name
//     answers).
//   - NETWORK.<domain>, when no container has that name, is an empty
//     non-terminal: NODATA, never NXDOMAIN, so that a resolver minimising
//     its queries (RFC 7816) or cutting at NXDOMAIN (RFC 8020) still asks
//     for NAME.NETWORK.
//   - NAME.<domain> answers every address of NAME, those in the asker's own
//     network (the one whose range holds the query's source address) first;
//     a source in no network keeps the plain order (round robin, nearest
//     first).

// NetworkRange is one weft network as DNS needs it: its name, a DNS label,
// and its address range. The router builds the list from its own network
// definitions; this package never reads them itself.
type NetworkRange struct {
	Name   string
	Prefix netip.Prefix
}

// ErrInvalidNetworks is wrapped by every error about a network list.
var ErrInvalidNetworks = errors.New("invalid dns network list")

// maxNetworks bounds the list: the asker's network is found by a scan of it
// on every query that needs an order.
const maxNetworks = 1024

// netTable is one immutable network list. The zone swaps it whole
// (SetNetworks); readers load it once per query.
type netTable struct {
	gen    uint64 // bumped by every SetNetworks: the fast path's caches depend on it
	list   []NetworkRange
	byName map[string]int // lower-case name → index in list
}

// newNetTable checks list and builds its table: every name a DNS label (it
// is lower-cased), every range valid and masked, no name twice, no ranges
// overlapping (the asker's network must be one). Nothing is kept on error.
func newNetTable(list []NetworkRange, gen uint64) (*netTable, error) {
	if len(list) > maxNetworks {
		return nil, fmt.Errorf("%w: %d networks, at most %d", ErrInvalidNetworks, len(list), maxNetworks)
	}
	t := &netTable{gen: gen, list: make([]NetworkRange, 0, len(list)), byName: make(map[string]int, len(list))}
	for _, n := range list {
		name := strings.ToLower(n.Name)
		if err := checkLabel("network name", name); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidNetworks, err)
		}
		if !n.Prefix.IsValid() || n.Prefix != n.Prefix.Masked() {
			return nil, fmt.Errorf("%w: network %s: range %v is not a masked prefix", ErrInvalidNetworks, name, n.Prefix)
		}
		if _, dup := t.byName[name]; dup {
			return nil, fmt.Errorf("%w: network %s listed twice", ErrInvalidNetworks, name)
		}
		for _, o := range t.list {
			if o.Prefix.Overlaps(n.Prefix) {
				return nil, fmt.Errorf("%w: network %s (%v) overlaps network %s (%v)", ErrInvalidNetworks, name, n.Prefix, o.Name, o.Prefix)
			}
		}
		t.byName[name] = len(t.list)
		t.list = append(t.list, NetworkRange{Name: name, Prefix: n.Prefix})
	}
	return t, nil
}

// of returns the index of the network whose range holds a, -1 for none.
// O(networks), no allocation.
func (t *netTable) of(a netip.Addr) int {
	if !a.IsValid() {
		return -1
	}
	a = a.Unmap()
	for i := range t.list {
		if t.list[i].Prefix.Contains(a) {
			return i
		}
	}
	return -1
}

// named returns the index of the network called label (lower case), -1
// for none.
func (t *netTable) named(label string) int {
	if i, ok := t.byName[label]; ok {
		return i
	}
	return -1
}

// prefixes returns the ranges, for reverse lookups.
func (t *netTable) prefixes() []netip.Prefix {
	out := make([]netip.Prefix, len(t.list))
	for i, n := range t.list {
		out[i] = n.Prefix
	}
	return out
}

// resolve says what rel (a name under the zone, lower case, without the
// domain) names, by the rules at the top of this file: the addresses to
// answer, and whether the name exists (false: NXDOMAIN). O(addresses of
// the name + labels).
func (z *zone) resolve(nt *netTable, rel string) (targets []Target, known bool) {
	if targets, known = z.records.LookupName(rel); known {
		return targets, true
	}
	dot := strings.LastIndexByte(rel, '.')
	if dot < 0 {
		return nil, nt.named(rel) >= 0 // NETWORK alone: an empty non-terminal
	}
	ni := nt.named(rel[dot+1:])
	if ni < 0 {
		return nil, false
	}
	all, known := z.records.LookupName(rel[:dot])
	if !known {
		return nil, false
	}
	p := nt.list[ni].Prefix
	return slices.DeleteFunc(all, func(t Target) bool { return !p.Contains(t.Addr) }), true
}

// askerFirst moves the targets inside network asker (an index of nt, -1:
// none) to the front, keeping the order within both groups. The fast path
// does the same on indexes (answerCache.askerFirst).
func askerFirst(ts []Target, nt *netTable, asker int) {
	if asker < 0 || len(ts) < 2 {
		return
	}
	p := nt.list[asker].Prefix
	var rest []Target
	k := 0
	for _, t := range ts {
		if p.Contains(t.Addr) {
			ts[k] = t
			k++
		} else {
			rest = append(rest, t)
		}
	}
	copy(ts[k:], rest)
}
