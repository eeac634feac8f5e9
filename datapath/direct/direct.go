// Package direct is weft's "direct" link mode: plain routing between peers that share an
// L2 underlay subnet, no encapsulation. For every block of every remote peer it installs
//
//	<block> via <peer underlay IP> dev <underlay dev> proto 87
//
// and nothing else: the remote host forwards the packet from its underlay interface to its
// bridge like any router. It is the fastest mode and only works when both ends are on the
// same L2 segment (SameL2 tells the router when that holds).
//
// The package also holds the kernel helpers every routed mode shares (the vxlan driver uses
// them too): RouteProtocol, SyncRoutes, UnderlayPrefix and EnableProxyARP.
//
// All functions act on the network namespace of the calling OS thread, like package
// datapath: run them on a locked thread (ns.NetNS.Do) to act on another namespace.
package direct

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
)

// RouteProtocol is datapath.RouteProtocol, the mark of every route a weft driver installs.
const RouteProtocol = datapath.RouteProtocol

// Sentinel errors.
var (
	// ErrNoUnderlay: no interface holds the configured underlay address.
	ErrNoUnderlay = errors.New("no interface holds the underlay address")
	// ErrNotUp: Set was called before Up, or the driver's device has gone.
	ErrNotUp = errors.New("driver is not up")
	// ErrBadPeer: a remote peer cannot be served by this driver (missing or unusable fields).
	ErrBadPeer = errors.New("bad remote peer")
)

// Config configures the direct driver.
type Config struct {
	// Underlay is this host's underlay address. Required.
	Underlay netip.Addr
	// UnderlayDev is the interface holding Underlay; found from Underlay when empty.
	UnderlayDev string
	// Logger receives one line per change; nil discards.
	Logger *slog.Logger
}

// Driver is the direct link mode; it implements datapath.Driver. Methods must be called
// from one goroutine at a time (the router's datapath loop), on a thread in the host's
// network namespace.
type Driver struct {
	cfg Config
	log *slog.Logger
}

var _ datapath.Driver = (*Driver)(nil)

// New checks cfg and returns a driver; it touches nothing in the kernel.
func New(cfg Config) (*Driver, error) {
	if !cfg.Underlay.IsValid() {
		return nil, errors.New("direct: underlay address is required")
	}
	cfg.Underlay = cfg.Underlay.Unmap()
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Driver{cfg: cfg, log: log.With("driver", datapath.ModeDirect)}, nil
}

// Mode is "direct".
func (d *Driver) Mode() string { return datapath.ModeDirect }

// Up resolves the underlay interface (and remembers its name); direct mode creates no
// device. It fails with ErrNoUnderlay when no interface holds the underlay address.
func (d *Driver) Up(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err := d.underlayLink()
	return err
}

// underlayLink returns the underlay interface: by name when configured, else the one
// holding the underlay address (whose name is then kept for Close).
func (d *Driver) underlayLink() (netlink.Link, error) {
	if d.cfg.UnderlayDev == "" {
		_, dev, err := UnderlayPrefix(d.cfg.Underlay)
		if err != nil {
			return nil, err
		}
		d.cfg.UnderlayDev = dev
	}
	link, err := netlink.LinkByName(d.cfg.UnderlayDev)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNoUnderlay, d.cfg.UnderlayDev, err)
	}
	return link, nil
}

// Set converges the routes on the underlay interface to exactly one route per block of
// peers: missing routes are added, wrong ones replaced, weft routes of blocks no longer in
// the set removed. A peer that cannot be served (no underlay address, another family than
// ours, not on our L2 subnet as the kernel sees it) is reported in the returned error and
// the others are still converged.
func (d *Driver) Set(peers []datapath.RemotePeer) error {
	link, err := d.underlayLink()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotUp, err)
	}
	var errs []error
	var want []netlink.Route
	seen := map[netip.Prefix]string{}
	for _, p := range peers {
		if !p.Underlay.IsValid() || p.Underlay.Unmap().Is4() != d.cfg.Underlay.Is4() {
			errs = append(errs, fmt.Errorf("%w: %s: underlay %v unusable from %v", ErrBadPeer, p.Name, p.Underlay, d.cfg.Underlay))
			continue
		}
		gw := p.Underlay.Unmap()
		for _, b := range p.Blocks {
			b = b.Masked()
			if owner, dup := seen[b]; dup {
				errs = append(errs, fmt.Errorf("%w: %s: block %s already routed to %s", ErrBadPeer, p.Name, b, owner))
				continue
			}
			if b.Addr().Is4() != gw.Is4() {
				errs = append(errs, fmt.Errorf("%w: %s: block %s and underlay %s differ in family", ErrBadPeer, p.Name, b, gw))
				continue
			}
			seen[b] = p.Name
			want = append(want, netlink.Route{
				LinkIndex: link.Attrs().Index,
				Dst:       prefixToIPNet(b),
				Gw:        gw.AsSlice(),
			})
		}
	}
	if err := SyncRoutes(link.Attrs().Index, want, d.log); err != nil {
		errs = append(errs, fmt.Errorf("direct: %w", err))
	}
	return errors.Join(errs...)
}

// Close removes every weft route on the underlay interface. Safe to call twice, and
// before Up.
func (d *Driver) Close() error {
	link, err := d.underlayLink()
	if err != nil {
		return nil // no underlay interface, so no routes through it
	}
	return SyncRoutes(link.Attrs().Index, nil, d.log)
}

// SyncRoutes is datapath.SyncRoutes on the main table, in the calling thread's namespace.
func SyncRoutes(linkIndex int, want []netlink.Route, log *slog.Logger) error {
	return datapath.SyncRoutes(nil, unix.RT_TABLE_MAIN, linkIndex, want, log)
}

// ListRoutes lists the weft routes of the main table that leave through linkIndex.
func ListRoutes(linkIndex int) ([]netlink.Route, error) {
	return datapath.ListRoutes(nil, unix.RT_TABLE_MAIN, linkIndex)
}

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
		p, ok := ipNetToPrefix(a.IPNet)
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
// L2 segment and direct mode can reach it. It is pure; the kernel has the last word (Set
// reports a gateway it cannot reach). A host route (/32, /128) never shares its subnet.
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
	if err := writeSysctl("net/ipv4/conf/"+bridge+"/proxy_arp", "1"); err != nil {
		return err
	}
	return writeSysctl("net/ipv4/neigh/"+bridge+"/proxy_delay", "0")
}

func writeSysctl(key, value string) error {
	path := "/proc/sys/" + key
	if cur, err := os.ReadFile(path); err == nil && string(cur) == value+"\n" {
		return nil
	}
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipNetToPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(addr.Unmap(), ones), true
}
