package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol marks every route a weft driver installs (rtm_protocol 0x57, 'W'; shown by
// `ip route` as "proto 87"). Drivers only ever delete routes that carry it and leave via
// their own device, so routes made by the operator or other software are never touched.
const RouteProtocol netlink.RouteProtocol = 0x57

// Link probes. The router measures each peer twice: over the underlay (--probe-port) and
// through the link that carries the peer's containers' traffic (--link-probe-port), so that
// a broken VXLAN or WireGuard path is noticed while the underlay and gossip still work.
// Link probes go from and to the link-probe port; a policy rule sends exactly those packets
// (UDP, that source and destination port) to ProbeTable, where each tunnel driver routes
// every peer's underlay address through its own device. Tunnel traffic itself (VXLAN,
// WireGuard) never has both ports equal to the probe port, so it cannot loop back into the
// tunnel. A peer reached by direct routing has no entry there and falls through to the main
// table: its link is the underlay. The peer at the other end replies from the same port,
// so the reply comes back through its own tunnel, and its strict rp_filter (which looks the
// reversed flow up with the ports) accepts the probe.
const (
	// ProbeTable is the routing table of link probes.
	ProbeTable = 0x5746
	// ProbeRulePriority is the priority of the rule that selects ProbeTable: before the
	// main table (32766).
	ProbeRulePriority = 1000
)

// EnsureProbeRule installs, in the calling thread's network namespace, the policy rule
// "ipproto udp sport port dport port lookup ProbeTable" for one address family
// (netlink.FAMILY_V4 or FAMILY_V6), replacing a weft probe rule for another port. Calling it
// again changes nothing.
func EnsureProbeRule(family, port int) error {
	if port <= 0 || port > 65535 {
		return fmt.Errorf("probe rule: bad port %d", port)
	}
	rules, err := netlink.RuleListFiltered(family, &netlink.Rule{Table: ProbeTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("probe rule: list rules: %w", err)
	}
	found := false
	for _, r := range rules {
		ok := r.Priority == ProbeRulePriority && r.IPProto == unix.IPPROTO_UDP &&
			r.Sport != nil && r.Sport.Start == uint16(port) && r.Sport.End == uint16(port) &&
			r.Dport != nil && r.Dport.Start == uint16(port) && r.Dport.End == uint16(port)
		if ok && !found {
			found = true
			continue
		}
		if err := netlink.RuleDel(&r); err != nil && !IsGone(err) {
			return fmt.Errorf("probe rule: delete stale rule (priority %d): %w", r.Priority, err)
		}
	}
	if found {
		return nil
	}
	r := netlink.NewRule()
	r.Family = family
	r.Priority = ProbeRulePriority
	r.Table = ProbeTable
	r.IPProto = unix.IPPROTO_UDP
	r.Sport = netlink.NewRulePortRange(uint16(port), uint16(port))
	r.Dport = netlink.NewRulePortRange(uint16(port), uint16(port))
	if err := netlink.RuleAdd(r); err != nil {
		return fmt.Errorf("probe rule: add (udp port %d → table %d): %w", port, ProbeTable, err)
	}
	return nil
}

// ProbeRoute is the route in ProbeTable that sends link probes to a peer's underlay address
// through a device: a host route, with via (the same address) on link when the device needs
// a next hop (VXLAN), else a plain device route (WireGuard).
func ProbeRoute(linkIndex int, peer netip.Addr, onlinkVia bool) netlink.Route {
	peer = peer.Unmap()
	r := netlink.Route{
		LinkIndex: linkIndex,
		Dst:       PrefixToIPNet(netip.PrefixFrom(peer, peer.BitLen())),
		Table:     ProbeTable,
	}
	if onlinkVia {
		r.Gw, r.Flags = peer.AsSlice(), unix.RTNH_F_ONLINK
	} else if peer.Is4() {
		r.Scope = netlink.SCOPE_LINK
	}
	return r
}

// SyncRoutes converges the weft routes (RouteProtocol) of one table leaving through the
// interface linkIndex to want, through h (nil: the calling thread's namespace): each route
// of want is installed (RouteReplace, so a route of the same destination and table installed
// by anyone else is taken over) unless an identical one is there, and every other weft route
// of that table through linkIndex is deleted. Want's routes need Dst and LinkIndex; Gw,
// Flags, Scope and Src are kept; Protocol and Table are set here. Deleting a route that is
// already gone is success. Errors of single routes are joined; the others still converge.
func SyncRoutes(h *netlink.Handle, table, linkIndex int, want []netlink.Route, log *slog.Logger) error {
	if h == nil {
		h = &netlink.Handle{} // the package's own default: sockets in the thread's namespace
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	have, err := ListRoutes(h, table, linkIndex)
	if err != nil {
		return err
	}
	byDst := make(map[netip.Prefix]netlink.Route, len(have))
	for _, r := range have {
		if p, ok := IPNetToPrefix(r.Dst); ok {
			byDst[p] = r
		}
	}
	var errs []error
	keep := map[netip.Prefix]bool{}
	for _, r := range want {
		r.Protocol = RouteProtocol
		r.Table = table
		dst, ok := IPNetToPrefix(r.Dst)
		if !ok {
			errs = append(errs, fmt.Errorf("route without a destination through ifindex %d", linkIndex))
			continue
		}
		keep[dst] = true
		if cur, ok := byDst[dst]; ok && sameRoute(cur, r) {
			continue
		}
		if err := h.RouteReplace(&r); err != nil {
			errs = append(errs, fmt.Errorf("route %s via %s table %d: %w", dst, r.Gw, table, err))
			continue
		}
		log.Info("route installed", "dst", dst.String(), "via", r.Gw.String(), "table", table)
	}
	for dst, r := range byDst {
		if keep[dst] {
			continue
		}
		if err := h.RouteDel(&r); err != nil && !IsGone(err) {
			errs = append(errs, fmt.Errorf("delete route %s via %s table %d: %w", dst, r.Gw, table, err))
			continue
		}
		log.Info("stale route removed", "dst", dst.String(), "via", r.Gw.String(), "table", table)
	}
	return errors.Join(errs...)
}

// ListRoutes lists the weft routes (RouteProtocol, both families) of one table that leave
// through the interface linkIndex, through h (nil: the calling thread's namespace).
func ListRoutes(h *netlink.Handle, table, linkIndex int) ([]netlink.Route, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	filter := &netlink.Route{LinkIndex: linkIndex, Protocol: RouteProtocol, Table: table}
	mask := netlink.RT_FILTER_OIF | netlink.RT_FILTER_PROTOCOL | netlink.RT_FILTER_TABLE
	routes, err := h.RouteListFiltered(netlink.FAMILY_ALL, filter, mask)
	if err != nil {
		return nil, fmt.Errorf("list weft routes of table %d: %w", table, err)
	}
	return routes, nil
}

// sameRoute says whether the installed route cur already is r.
func sameRoute(cur, r netlink.Route) bool {
	const onlink = unix.RTNH_F_ONLINK
	return cur.LinkIndex == r.LinkIndex && cur.Gw.Equal(r.Gw) &&
		cur.Flags&onlink == r.Flags&onlink &&
		(r.Src == nil || cur.Src.Equal(r.Src)) && len(cur.MultiPath) == 0
}
