package mesh

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// DefaultAdvertiseAddr returns the address other hosts most likely reach this
// one at: the preferred source address of the default route (IPv4 first,
// then IPv6), else the first global unicast address of the default route's
// interface. Without a default route it falls back to the first global
// unicast address of any up, non-loopback interface. It sends no traffic.
func DefaultAdvertiseAddr() (netip.Addr, error) {
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if a, err := defaultRouteAddr(family); err == nil {
			return a, nil
		}
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("mesh: list interfaces: %w", err)
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if p, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(p.IP); ok && ip.Unmap().IsGlobalUnicast() {
					return ip.Unmap(), nil
				}
			}
		}
	}
	return netip.Addr{}, errors.New("mesh: no default route and no global unicast address: set the advertise address")
}

func defaultRouteAddr(family int) (netip.Addr, error) {
	routes, err := netlink.RouteList(nil, family)
	if err != nil {
		return netip.Addr{}, err
	}
	var best *netlink.Route
	for i := range routes {
		r := &routes[i]
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if best == nil || r.Priority < best.Priority {
			best = r
		}
	}
	if best == nil {
		return netip.Addr{}, errors.New("no default route")
	}
	if src, ok := netip.AddrFromSlice(best.Src); ok && src.Unmap().IsGlobalUnicast() {
		return src.Unmap(), nil
	}
	link, err := netlink.LinkByIndex(best.LinkIndex)
	if err != nil {
		return netip.Addr{}, err
	}
	addrs, err := netlink.AddrList(link, family)
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap().IsGlobalUnicast() {
			return ip.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("default route interface %s has no global unicast address", link.Attrs().Name)
}
