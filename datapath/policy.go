package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Routing inside a container with several network planes (eth0 on default, net1 on
// control, …). Only the primary interface holds the default route of the main table; a
// secondary one routes its network's range only. So that a reply to a request that came in
// on net1 also leaves by net1 (and not by eth0's default route, whose network has no route
// back), every interface also gets source-based policy routing: the rule
// "from <its address>/32 lookup T" and its own table T holding the on-link subnet and a
// default route via its gateway. Every rule and route weft puts in a container carries
// RouteProtocol; of the others, weft removes only default routes through a secondary
// interface (they would pull the container's traffic onto that plane).
const (
	// ContainerRulePriority is the priority of the source rules inside containers: before
	// the main table's rule (32766), after the local table's (0).
	ContainerRulePriority = 1000
	// ContainerTableBase + ifindex is the table of one container interface. Interface
	// indexes start at 1, so tables start at 10001: clear of the unspecified table 0, the
	// kernel's 253–255 and the small numbers other software tends to pick.
	ContainerTableBase = 10000
)

// ErrBadAttachment: an Attachment whose fields cannot describe a working interface.
var ErrBadAttachment = errors.New("bad attachment")

// ContainerTable is the routing table, inside a container's namespace, of the interface
// with index ifindex.
func ContainerTable(ifindex int) int { return ContainerTableBase + ifindex }

// validate says what is wrong with a, naming the field, or nil. Preflight runs before the
// address is known and does not call it.
func (a Attachment) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s in %s: %s", ErrBadAttachment, a.IfName, a.NetNS, fmt.Sprintf(format, args...))
	}
	switch {
	case a.IfName == "" || len(a.IfName) > unix.IFNAMSIZ-1:
		return bad("interface name %q is empty or longer than %d bytes", a.IfName, unix.IFNAMSIZ-1)
	case !a.Address.IsValid() || !a.Address.Addr().Is4():
		return bad("address %s is not an IPv4 prefix", a.Address)
	case a.Address.Bits() == 32:
		return bad("address %s has no on-link subnet (/32)", a.Address)
	case !a.Gateway.Is4() || !a.Address.Masked().Contains(a.Gateway) || a.Gateway == a.Address.Addr():
		return bad("gateway %s is not another address of the subnet %s", a.Gateway, a.Address.Masked())
	case a.MTU != 0 && (a.MTU < 68 || a.MTU > 65535):
		return bad("MTU %d is outside 68..65535", a.MTU)
	case a.Range.IsValid() && (!a.Range.Addr().Is4() || !a.Range.Contains(a.Address.Addr())):
		return bad("range %s does not hold the address %s", a.Range, a.Address.Addr())
	}
	return nil
}

// containerPlan is the routing one attachment needs inside its container.
type containerPlan struct {
	// main: the weft routes of the main table through the interface.
	main []netlink.Route
	// table is the interface's own table; own its routes (on-link subnet first, so the
	// gateway of the default route is reachable when it is added).
	table int
	own   []netlink.Route
	// src is the source the rule selects table with.
	src netip.Prefix
}

// planContainer decides the routing of the attachment a whose container interface has the
// index ifindex. Pure: Attach applies it, Check compares against it.
func planContainer(a Attachment, ifindex int) containerPlan {
	def := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	gw := a.Gateway.AsSlice()
	onlink := a.Address.Masked()
	p := containerPlan{
		table: ContainerTable(ifindex),
		src:   netip.PrefixFrom(a.Address.Addr(), 32),
		own: []netlink.Route{
			{LinkIndex: ifindex, Dst: PrefixToIPNet(onlink), Scope: netlink.SCOPE_LINK, Src: a.Address.Addr().AsSlice()},
			{LinkIndex: ifindex, Dst: def, Gw: gw},
		},
	}
	switch {
	case !a.Secondary:
		p.main = []netlink.Route{{LinkIndex: ifindex, Dst: def, Gw: gw}}
	case rangeRoute(a):
		p.main = []netlink.Route{{LinkIndex: ifindex, Dst: PrefixToIPNet(a.Range.Masked()), Gw: gw}}
	}
	return p
}

// rangeRoute says whether a secondary attachment needs a route to its Range via the gateway:
// not when Range is unset, nor when the kernel's on-link route of the address already covers
// it (weft's usual case: the address has the network's prefix length). A via-gateway route of
// the on-link prefix itself would replace the kernel's route, and with it the gateway's
// reachability.
func rangeRoute(a Attachment) bool {
	if !a.Range.IsValid() {
		return false
	}
	onlink := a.Address.Masked()
	return !(onlink.Bits() <= a.Range.Bits() && onlink.Contains(a.Range.Addr()))
}

// ensureContainerRouting converges the container's routing for the attachment a whose
// interface is cont, through cnh (a handle in the container): the main table's weft routes
// through cont, cont's own table, and its source rule. O(interfaces and rules of the
// container); nothing here grows with the number of peers.
func ensureContainerRouting(cnh *netlink.Handle, a Attachment, cont netlink.Link) error {
	idx := cont.Attrs().Index
	p := planContainer(a, idx)
	if a.Secondary {
		// A default route through a secondary interface (left by an earlier primary attach
		// or by other software) would pull the container's traffic onto this plane.
		if err := deleteDefaultRoutes(cnh, idx); err != nil {
			return fmt.Errorf("%s in %s: %w", a.IfName, a.NetNS, err)
		}
	}
	if err := SyncRoutes(cnh, unix.RT_TABLE_MAIN, idx, p.main, nil); err != nil {
		return fmt.Errorf("routes of %s in %s: %w", a.IfName, a.NetNS, err)
	}
	if err := SyncRoutes(cnh, p.table, idx, p.own, nil); err != nil {
		return fmt.Errorf("table %d of %s in %s: %w", p.table, a.IfName, a.NetNS, err)
	}
	return ensureSourceRule(cnh, p.src, p.table)
}

// deleteDefaultRoutes removes every default route of the main table through ifindex.
func deleteDefaultRoutes(h *netlink.Handle, ifindex int) error {
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{LinkIndex: ifindex, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if isDefaultRoute(r) {
			if err := h.RouteDel(&r); err != nil && !IsGone(err) {
				return fmt.Errorf("delete default route via %s: %w", r.Gw, err)
			}
		}
	}
	return nil
}

func isDefaultRoute(r netlink.Route) bool {
	return r.Dst == nil || (r.Dst.IP.IsUnspecified() && maskBits(r.Dst) == 0)
}

// isSourceRule says whether r is a container source rule weft made.
func isSourceRule(r netlink.Rule) bool {
	return r.Priority == ContainerRulePriority && r.Table > ContainerTableBase &&
		r.Protocol == uint8(RouteProtocol) && r.Src != nil
}

// ensureSourceRule leaves exactly one rule "from src lookup table" among weft's source rules
// of the namespace, and removes the stale ones: another source for this table (the
// interface's address changed), this source for another table (the address moved to another
// interface), and rules whose interface is gone (their table emptied with it).
// O(rules + interfaces of the container).
func ensureSourceRule(h *netlink.Handle, src netip.Prefix, table int) error {
	rules, err := h.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	links, err := linkIndexes(h)
	if err != nil {
		return err
	}
	found := false
	for _, r := range rules {
		if !isSourceRule(r) {
			continue
		}
		rsrc, _ := IPNetToPrefix(r.Src)
		keep := false
		switch {
		case r.Table == table && rsrc == src:
			keep = !found // a duplicate goes
			found = true
		case r.Table == table || rsrc == src:
		default:
			keep = links[r.Table-ContainerTableBase]
		}
		if keep {
			continue
		}
		if err := h.RuleDel(&r); err != nil && !IsGone(err) {
			return fmt.Errorf("delete stale rule from %s lookup %d: %w", rsrc, r.Table, err)
		}
	}
	if found {
		return nil
	}
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Priority = ContainerRulePriority
	r.Table = table
	r.Src = PrefixToIPNet(src)
	r.Protocol = uint8(RouteProtocol)
	if err := h.RuleAdd(r); err != nil {
		return fmt.Errorf("add rule from %s lookup %d: %w", src, table, err)
	}
	return nil
}

// linkIndexes is the set of interface indexes in h's namespace.
func linkIndexes(h *netlink.Handle) (map[int]bool, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	m := make(map[int]bool, len(links))
	for _, l := range links {
		m[l.Attrs().Index] = true
	}
	return m, nil
}

// checkContainerRouting verifies the routing of the attachment a whose interface is cont,
// and names the first thing missing (wrapping ErrCheckFailed).
func checkContainerRouting(cnh *netlink.Handle, a Attachment, cont netlink.Link) error {
	idx := cont.Attrs().Index
	p := planContainer(a, idx)
	main, err := cnh.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{LinkIndex: idx, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list routes of %s: %w", a.IfName, err)
	}
	hasDefault := hasRoute(main, netip.Prefix{}, a.Gateway)
	switch {
	case !a.Secondary && !hasDefault:
		return fmt.Errorf("%w: default route via %s on %s missing in %s", ErrCheckFailed, a.Gateway, a.IfName, a.NetNS)
	case a.Secondary && anyDefault(main):
		return fmt.Errorf("%w: secondary interface %s holds a default route in %s", ErrCheckFailed, a.IfName, a.NetNS)
	case a.Secondary && rangeRoute(a) && !hasRoute(main, a.Range.Masked(), a.Gateway):
		return fmt.Errorf("%w: range route %s via %s on %s missing in %s", ErrCheckFailed, a.Range.Masked(), a.Gateway, a.IfName, a.NetNS)
	case a.Secondary && !rangeRoute(a) && !hasRoute(main, a.Address.Masked(), netip.Addr{}):
		return fmt.Errorf("%w: range route %s on %s (on link) missing in %s", ErrCheckFailed, a.Address.Masked(), a.IfName, a.NetNS)
	}
	rules, err := cnh.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list rules in %s: %w", a.NetNS, err)
	}
	ruled := false
	for _, r := range rules {
		if rsrc, ok := IPNetToPrefix(r.Src); ok && isSourceRule(r) && rsrc == p.src && r.Table == p.table {
			ruled = true
		}
	}
	if !ruled {
		return fmt.Errorf("%w: policy rule from %s lookup %d (for %s) missing in %s", ErrCheckFailed, p.src, p.table, a.IfName, a.NetNS)
	}
	own, err := cnh.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{LinkIndex: idx, Table: p.table}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list table %d of %s: %w", p.table, a.IfName, err)
	}
	if !hasRoute(own, netip.Prefix{}, a.Gateway) {
		return fmt.Errorf("%w: default route via %s in table %d (for %s) missing in %s", ErrCheckFailed, a.Gateway, p.table, a.IfName, a.NetNS)
	}
	return nil
}

// hasRoute says whether routes hold one to dst (the zero prefix: the default route) with the
// gateway gw (the zero address: on link, no gateway).
func hasRoute(routes []netlink.Route, dst netip.Prefix, gw netip.Addr) bool {
	for _, r := range routes {
		var d netip.Prefix
		if !isDefaultRoute(r) {
			d, _ = IPNetToPrefix(r.Dst)
		}
		g, _ := netip.AddrFromSlice(r.Gw)
		if d == dst && g.Unmap() == gw {
			return true
		}
	}
	return false
}

func anyDefault(routes []netlink.Route) bool {
	for _, r := range routes {
		if isDefaultRoute(r) {
			return true
		}
	}
	return false
}

// RemovePolicyRouting removes, inside the container's namespace at netnsPath, the source
// rule and the table of the interface ifName, and every weft source rule whose interface is
// gone. Deleting the veth drops the interface's routes but not its rule, which would dangle;
// call this on DEL, before or after Detach. A namespace that is gone (or no longer a
// namespace) and an interface that is gone are success. O(rules + interfaces of the
// container).
func RemovePolicyRouting(netnsPath, ifName string) error {
	nsh, cnh, err := containerHandle(netnsPath)
	if errors.Is(err, ErrNotNetNS) {
		return nil
	}
	if err != nil {
		return err
	}
	defer nsh.Close()
	defer cnh.Close()
	table := -1
	if l, err := cnh.LinkByName(ifName); err == nil {
		table = ContainerTable(l.Attrs().Index)
		if err := SyncRoutes(cnh, table, l.Attrs().Index, nil, nil); err != nil {
			return fmt.Errorf("empty table %d of %s in %s: %w", table, ifName, netnsPath, err)
		}
	} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
		return fmt.Errorf("look up %s in %s: %w", ifName, netnsPath, err)
	}
	rules, err := cnh.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list rules in %s: %w", netnsPath, err)
	}
	links, err := linkIndexes(cnh)
	if err != nil {
		return err
	}
	for _, r := range rules {
		if !isSourceRule(r) || (r.Table != table && links[r.Table-ContainerTableBase]) {
			continue
		}
		if err := cnh.RuleDel(&r); err != nil && !IsGone(err) {
			return fmt.Errorf("delete rule lookup %d in %s: %w", r.Table, netnsPath, err)
		}
	}
	return nil
}
