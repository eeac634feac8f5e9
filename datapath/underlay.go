package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// UnderlayPrefix finds the interface holding addr and returns addr with that interface's
// prefix length (e.g. 192.0.2.10/24) and the interface's name. It fails with ErrNoUnderlay
// when no interface holds addr.
func UnderlayPrefix(addr netip.Addr) (netip.Prefix, string, error) {
	addr = addr.Unmap()
	family := netlink.FAMILY_V4
	if addr.Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(nil, family)
	if err != nil {
		return netip.Prefix{}, "", fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		p, ok := IPNetToPrefix(a.IPNet)
		if !ok || p.Addr() != addr {
			continue
		}
		link, err := netlink.LinkByIndex(a.LinkIndex)
		if err != nil {
			return netip.Prefix{}, "", fmt.Errorf("look up interface %d holding %s: %w", a.LinkIndex, addr, err)
		}
		return p, link.Attrs().Name, nil
	}
	return netip.Prefix{}, "", fmt.Errorf("%w: %s", ErrNoUnderlay, addr)
}

// SameL2 says whether remote is on the subnet of local (this host's underlay address with
// its prefix length, as UnderlayPrefix returns it), so that it is one hop away on the same
// L2 segment and direct mode can reach it. It is pure; the kernel has the last word (the
// direct driver reports a gateway it cannot reach). A host route (/32, /128) never shares
// its subnet.
func SameL2(local netip.Prefix, remote netip.Addr) bool {
	remote = remote.Unmap()
	la := local.Addr().Unmap()
	if !local.IsValid() || !remote.IsValid() || la.Is4() != remote.Is4() || remote == la {
		return false
	}
	if local.Bits() == la.BitLen() {
		return false
	}
	return netip.PrefixFrom(la, local.Bits()).Masked().Contains(remote)
}

// EnableProxyARP makes the bridge answer ARP requests for addresses routed through another
// interface (net.ipv4.conf.<bridge>.proxy_arp=1), which is how a container that sees the
// whole network on-link reaches a container on another host: its host answers and routes.
// It also sets net.ipv4.neigh.<bridge>.proxy_delay=0: by default the kernel delays proxied
// replies to broadcast requests by up to 0.8 s, which every new flow would wait for.
// Sysctls under /proc/sys/net belong to the network namespace of the writing thread.
func EnableProxyARP(bridge string) error {
	if bridge == "" || bridge == "." || bridge == ".." || strings.Contains(bridge, "/") {
		return fmt.Errorf("enable proxy ARP: bad interface name %q", bridge)
	}
	if err := WriteSysctl("net/ipv4/conf/"+bridge+"/proxy_arp", "1"); err != nil {
		return err
	}
	return WriteSysctl("net/ipv4/neigh/"+bridge+"/proxy_delay", "0")
}

// WriteSysctl sets a sysctl (key as a path under /proc/sys, e.g. "net/ipv4/ip_forward") of
// the calling thread's network namespace, writing only when the value differs.
func WriteSysctl(key, value string) error {
	path := "/proc/sys/" + key
	if cur, err := os.ReadFile(path); err == nil && string(cur) == value+"\n" {
		return nil
	}
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// PrefixToIPNet converts a prefix to netlink's form.
func PrefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// IPNetToPrefix converts netlink's form back, IPv4-mapped addresses (and their 128-bit
// masks) to plain IPv4. The address keeps its host bits: an interface address stays one.
func IPNetToPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if addr.Is4In6() && bits == 128 {
		ones -= 96
	}
	p := netip.PrefixFrom(addr.Unmap(), ones)
	return p, p.IsValid()
}

// IsGone says whether err means the object to delete is already gone, which deleting
// treats as success.
func IsGone(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV)
}

// BlockClaims gives each block of one Set to the first peer of the set that has it (the
// bad-peer rule on Driver). The zero value is ready; O(1) per block.
type BlockClaims struct {
	owner map[netip.Prefix]string
}

// Claim masks b and gives it to peer. It returns why not instead ("" when claimed): b is
// not a prefix, another peer of the set has it, or it is not of the family of underlay
// (unless underlay is the zero Addr: a tunnel may carry either family).
func (c *BlockClaims) Claim(peer string, b netip.Prefix, underlay netip.Addr) (netip.Prefix, string) {
	if !b.IsValid() {
		return b, fmt.Sprintf("block %v is not a prefix", b)
	}
	b = b.Masked()
	if owner, dup := c.owner[b]; dup {
		return b, fmt.Sprintf("block %s already routed to %s", b, owner)
	}
	if underlay.IsValid() && b.Addr().Is4() != underlay.Unmap().Is4() {
		return b, fmt.Sprintf("block %s and underlay %s differ in family", b, underlay)
	}
	if c.owner == nil {
		c.owner = map[netip.Prefix]string{}
	}
	c.owner[b] = peer
	return b, ""
}
