// Package datapath is the kernel side of weft: the bridge of each network, one veth pair
// per container attachment with its routes and source policy inside the container
// (policy.go), and (in subpackages) one driver per link mode between hosts
// (direct, vxlan, wireguard). What the drivers share lives here — the Driver contract and
// its bad-peer rule, the route sync, the sentinels, the underlay and sysctl helpers — so
// that the drivers stand side by side and none imports another (deps_test.go checks).
// Package datapath/plan decides what each driver gets; datapath/nslab builds the network
// namespaces the kernel tests run in.
// Every operation is idempotent: called again, it converges to the same state and treats
// "already exists" as success when what exists is right.
package datapath

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Sentinel errors.
var (
	ErrIncompatibleLink = errors.New("link exists with an incompatible type")
	ErrIfNameExists     = errors.New("interface name already exists in the container")
	ErrNotNetNS         = errors.New("not a network namespace")
	ErrCheckFailed      = errors.New("attachment check failed")
	ErrBadBridge        = errors.New("bad bridge config")

	// Shared by the link drivers, so that a caller matches one error whichever driver
	// returned it.

	// ErrNoUnderlay: no interface holds the configured underlay address.
	ErrNoUnderlay = errors.New("no interface holds the underlay address")
	// ErrNotUp: Set was called before Up, or the driver's device has gone.
	ErrNotUp = errors.New("driver is not up")
	// ErrBadPeer: a remote peer cannot be served by a driver (missing or unusable fields,
	// or fields another peer of the same set has). See Driver for the rule.
	ErrBadPeer = errors.New("bad remote peer")
)

// BridgeConfig is the desired state of one network's bridge on this host.
type BridgeConfig struct {
	Name string
	// Gateway is the gateway address with the network's prefix length, e.g. 10.40.0.1/16.
	Gateway netip.Prefix
	MTU     int
}

// Validate says what is wrong with cfg (wrapping ErrBadBridge), or nil.
func (cfg BridgeConfig) Validate() error {
	switch {
	case cfg.Name == "" || len(cfg.Name) > unix.IFNAMSIZ-1 || strings.ContainsAny(cfg.Name, "/ \t\n:") ||
		cfg.Name == "." || cfg.Name == "..":
		return fmt.Errorf("%w: name %q is not an interface name of 1..%d bytes", ErrBadBridge, cfg.Name, unix.IFNAMSIZ-1)
	case !cfg.Gateway.IsValid() || !cfg.Gateway.Addr().Is4() || cfg.Gateway.Bits() == 32 ||
		cfg.Gateway.Addr() == cfg.Gateway.Masked().Addr():
		return fmt.Errorf("%w: %s: gateway %s is not a host address of an IPv4 subnet", ErrBadBridge, cfg.Name, cfg.Gateway)
	case cfg.MTU != 0 && (cfg.MTU < 68 || cfg.MTU > 65535):
		return fmt.Errorf("%w: %s: MTU %d is outside 68..65535", ErrBadBridge, cfg.Name, cfg.MTU)
	}
	return nil
}

// EnsureBridge converges the bridge of one network (default or any other) to cfg: present,
// up, holding exactly the gateway address as its IPv4 address (a stale one, e.g. of an
// earlier network of the same name, would keep routing that subnet here), with the MTU (0:
// the kernel's). It also turns on IPv4 forwarding, which the host needs to route for
// containers. A link of that name that is not a bridge is an error, never silently
// replaced; a cfg that cannot work fails with ErrBadBridge and changes nothing. Call it for
// every network before its first Attach, and again whenever the network's definition may
// have changed: it changes nothing when the bridge already is right.
func EnsureBridge(cfg BridgeConfig) (*netlink.Bridge, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	link, err := netlink.LinkByName(cfg.Name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		br := &netlink.Bridge{LinkAttrs: netlink.NewLinkAttrs()}
		br.Name = cfg.Name
		br.MTU = cfg.MTU
		// Without a MAC of its own a bridge takes its lowest port's, which changes as
		// containers come and go and breaks neighbours' ARP caches.
		br.HardwareAddr = randomMAC()
		if err := netlink.LinkAdd(br); err != nil && !errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("create bridge %s: %w", cfg.Name, err)
		}
		if link, err = netlink.LinkByName(cfg.Name); err != nil {
			return nil, fmt.Errorf("look up bridge %s: %w", cfg.Name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("look up bridge %s: %w", cfg.Name, err)
	}
	br, ok := link.(*netlink.Bridge)
	if !ok {
		return nil, fmt.Errorf("%w: %s is a %s, want a bridge", ErrIncompatibleLink, cfg.Name, link.Type())
	}
	if cfg.MTU > 0 && br.MTU != cfg.MTU {
		if err := netlink.LinkSetMTU(br, cfg.MTU); err != nil {
			return nil, fmt.Errorf("set MTU %d on %s: %w", cfg.MTU, cfg.Name, err)
		}
	}
	if err := netlink.AddrReplace(br, &netlink.Addr{IPNet: PrefixToIPNet(cfg.Gateway)}); err != nil {
		return nil, fmt.Errorf("set gateway %s on %s: %w", cfg.Gateway, cfg.Name, err)
	}
	addrs, err := netlink.AddrList(br, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", cfg.Name, err)
	}
	for _, a := range addrs {
		if p, ok := IPNetToPrefix(a.IPNet); ok && p != cfg.Gateway {
			if err := netlink.AddrDel(br, &a); err != nil && !IsGone(err) {
				return nil, fmt.Errorf("delete stale address %s of %s: %w", p, cfg.Name, err)
			}
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("bring up %s: %w", cfg.Name, err)
	}
	if err := WriteSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return nil, err
	}
	return br, nil
}

// EnableRelaying prepares the host to forward for other peers: no ICMP redirects (a relay
// would otherwise tell senders to go around it, straight into the broken link) and loose
// reverse-path filtering (a relayed packet may arrive on another interface than the route
// back to its source uses).
func EnableRelaying(underlayDev string) error {
	for key, value := range map[string]string{
		"net/ipv4/conf/all/send_redirects":                 "0",
		"net/ipv4/conf/" + underlayDev + "/send_redirects": "0",
		"net/ipv4/conf/all/rp_filter":                      "2",
		"net/ipv4/conf/" + underlayDev + "/rp_filter":      "2",
	} {
		if err := WriteSysctl(key, value); err != nil {
			return err
		}
	}
	return nil
}

// DeleteLink removes a link by name; a link that is already gone is success.
func DeleteLink(name string) error {
	link, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	// The link can vanish between the lookup and the delete (a veth goes with its peer when
	// the container's netns is removed): ENODEV then means done.
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// randomMAC is a random unicast, locally administered MAC address.
func randomMAC() net.HardwareAddr {
	mac := make(net.HardwareAddr, 6)
	rand.Read(mac)
	mac[0] = mac[0]&0xfe | 0x02
	return mac
}
