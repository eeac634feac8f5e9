// Package vxlan is weft's "vxlan" link mode: one kernel VXLAN device per host, with static
// forwarding state only — no multicast group, no learning, no flooding of unknown
// destinations. For every remote peer it installs, on the device:
//
//	bridge fdb replace <peer VTEP MAC> dev weft-vxlan dst <peer underlay IP> self permanent
//	ip neigh replace <peer underlay IP> lladdr <peer VTEP MAC> dev weft-vxlan nud permanent
//	ip route replace <block> via <peer underlay IP> dev weft-vxlan onlink src <our underlay IP> proto 87
//
// (one route per block of the peer), and with Config.LinkProbes one more in the link-probe
// table (datapath.ProbeTable): <peer underlay IP>/32 via itself on the device. A packet to a remote block is routed to the peer's
// underlay address "on link" on the VXLAN device; the neighbour entry gives that next hop
// the peer's VTEP MAC without ARP, and the FDB entry tells the device which underlay address
// to send frames for that MAC to. The peer's underlay address is only a label here: the
// encapsulated packet itself is routed by the underlay routing table, so VXLAN works between
// peers on different underlay subnets (unlike package direct).
//
// Choices:
//   - VNI 4242 and UDP port 6784 (DESIGN.md) by default; every peer of a cluster must agree.
//   - One device per network, each with its own VNI (the router derives them with
//     plan.VNIs), so networks are separate on the wire: the default network keeps
//     weft-vxlan and VNI 4242, every other network's device is DeviceName(VNI). The kernel
//     shares one UDP socket between devices on the same port and demultiplexes by VNI.
//   - The VTEP MAC, unless configured, is derived from the underlay address and the VNI
//     (SHA-256, locally administered unicast): stable across restarts and reboots, so the
//     MAC the other peers hold in their FDB stays right even before gossip catches up, and
//     distinct between hosts as long as their underlay addresses are.
//   - Routes carry weft's route protocol (datapath.RouteProtocol, "proto 87"); only weft routes
//     through the VXLAN device are ever deleted. The FDB and neighbour entries on the device
//     are all the driver's: the device is weft's.
//   - Routes set src to our underlay address, so that traffic the host itself sends to a
//     remote container (probes, the host's own connections) leaves with an address unique
//     to this host rather than the gateway address every host shares. Replies come back over
//     the underlay; a remote host with strict rp_filter (=1) on its underlay would drop
//     such host-originated packets (loose, =2, is fine). Container traffic is unaffected.
//
// All functions act on the network namespace of the calling OS thread, like package
// datapath: run them on a locked thread (ns.NetNS.Do) to act on another namespace.
package vxlan

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
)

// Defaults.
const (
	DefaultName = "weft-vxlan"
	DefaultVNI  = 4242
	DefaultPort = 6784
	// Overhead is what VXLAN over IPv4 adds to every packet: outer IPv4 (20) + UDP (8) +
	// VXLAN (8) + inner Ethernet (14). Over IPv6 it is 20 more.
	Overhead = 50
)

// Config configures the VXLAN driver. Zero fields take the defaults.
type Config struct {
	// Name of the VXLAN device (default "weft-vxlan").
	Name string
	// VNI is the VXLAN network identifier (default 4242); the same on every peer.
	VNI uint32
	// Port is the UDP destination port (default 6784); the same on every peer.
	Port int
	// Underlay is this host's underlay address: the VXLAN source address. Required.
	Underlay netip.Addr
	// UnderlayDev is the interface holding Underlay; found from Underlay when empty.
	UnderlayDev string
	// MTU of the device; 0 means the underlay interface's MTU less the encapsulation
	// overhead (50 over IPv4, 70 over IPv6). Containers' MTU must not exceed it.
	MTU int
	// MAC is the device's (VTEP) MAC; nil derives a stable one (see the package doc).
	MAC net.HardwareAddr
	// LinkProbes also routes every peer's underlay address through the device in
	// datapath.ProbeTable, so that link probes travel through the tunnel (see
	// datapath.EnsureProbeRule).
	LinkProbes bool
	// Logger receives one line per change; nil discards.
	Logger *slog.Logger
	// Metrics counts bad peers; nil counts nothing.
	Metrics *datapath.Metrics
}

// Driver is the VXLAN link mode; it implements datapath.Driver. Methods must be called from
// one goroutine at a time (the router's datapath loop), on a thread in the host's network
// namespace.
type Driver struct {
	cfg Config
	mac net.HardwareAddr
	log *slog.Logger
}

var _ datapath.Driver = (*Driver)(nil)

// New checks cfg, fills in the defaults and returns a driver; it touches nothing in the
// kernel, so MAC is known (and can be gossiped) before Up.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if len(cfg.Name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("vxlan: device name %q is longer than %d", cfg.Name, unix.IFNAMSIZ-1)
	}
	if cfg.VNI == 0 {
		cfg.VNI = DefaultVNI
	}
	if cfg.VNI >= 1<<24 {
		return nil, fmt.Errorf("vxlan: VNI %d does not fit in 24 bits", cfg.VNI)
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Port < 0 || cfg.Port > 65535 {
		return nil, fmt.Errorf("vxlan: bad UDP port %d", cfg.Port)
	}
	if !cfg.Underlay.IsValid() || cfg.Underlay.IsUnspecified() {
		return nil, errors.New("vxlan: underlay address is required")
	}
	cfg.Underlay = cfg.Underlay.Unmap()
	if cfg.MTU < 0 || (cfg.MTU > 0 && cfg.MTU < 68) {
		return nil, fmt.Errorf("vxlan: bad MTU %d", cfg.MTU)
	}
	mac := cfg.MAC
	if mac == nil {
		mac = DeriveMAC(cfg.Underlay, cfg.VNI)
	} else if err := checkMAC(mac); err != nil {
		return nil, fmt.Errorf("vxlan: MAC %s: %w", mac, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Driver{cfg: cfg, mac: mac, log: log.With("driver", datapath.ModeVXLAN, "dev", cfg.Name)}, nil
}

// DeviceName is the name of the device of a VNI: DefaultName for DefaultVNI, else
// "weftvx" and the VNI in 6 hex digits (12 characters: no bridge, "weft-…", nor container
// veth, "weft" and 11 hex digits, nor WireGuard device, "weftwg…", is named so).
func DeviceName(vni uint32) string {
	if vni == DefaultVNI {
		return DefaultName
	}
	return fmt.Sprintf("weftvx%06x", vni&0xffffff)
}

// DeriveMAC is the VTEP MAC weft uses when none is configured: the first 6 bytes of
// SHA-256("weft-vtep" | underlay | VNI), made a locally administered unicast address.
func DeriveMAC(underlay netip.Addr, vni uint32) net.HardwareAddr {
	h := sha256.New()
	h.Write([]byte("weft-vtep"))
	b, _ := underlay.Unmap().MarshalBinary()
	h.Write(b)
	binary.Write(h, binary.BigEndian, vni)
	mac := net.HardwareAddr(h.Sum(nil)[:6])
	mac[0] = mac[0]&0xfe | 0x02
	return mac
}

func checkMAC(mac net.HardwareAddr) error {
	switch {
	case len(mac) != 6:
		return errors.New("not a 6-byte Ethernet address")
	case mac[0]&1 != 0:
		return errors.New("multicast")
	case [6]byte(mac) == [6]byte{}:
		return errors.New("all zeros")
	}
	return nil
}

// Mode is "vxlan".
func (d *Driver) Mode() string { return datapath.ModeVXLAN }

// MAC is the VTEP MAC of this host's device, to gossip to the other peers (their
// RemotePeer.VTEPMAC for us).
func (d *Driver) MAC() net.HardwareAddr { return append(net.HardwareAddr(nil), d.mac...) }

// Name is the device's name.
func (d *Driver) Name() string { return d.cfg.Name }

// Up ensures the VXLAN device: created when missing; kept when it exists with the same
// VNI, port, source address, underlay interface and no learning (its MTU and MAC are
// corrected in place); deleted and created again when it is a VXLAN device configured
// otherwise. A link of that name that is not VXLAN is an error
// (datapath.ErrIncompatibleLink), never replaced. The device is brought up.
func (d *Driver) Up(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var ul netlink.Link
	var err error
	if d.cfg.UnderlayDev == "" {
		_, dev, err := datapath.UnderlayPrefix(d.cfg.Underlay)
		if err != nil {
			return fmt.Errorf("vxlan: %w", err)
		}
		d.cfg.UnderlayDev = dev
	}
	if ul, err = netlink.LinkByName(d.cfg.UnderlayDev); err != nil {
		return fmt.Errorf("vxlan: %w: %s: %v", datapath.ErrNoUnderlay, d.cfg.UnderlayDev, err)
	}
	mtu := d.cfg.MTU
	if mtu == 0 {
		mtu = ul.Attrs().MTU - Overhead
		if d.cfg.Underlay.Is6() {
			mtu -= 20
		}
	}
	want := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: d.cfg.Name, MTU: mtu, HardwareAddr: d.mac, TxQLen: -1},
		VxlanId:      int(d.cfg.VNI),
		VtepDevIndex: ul.Attrs().Index,
		SrcAddr:      d.cfg.Underlay.AsSlice(),
		Port:         d.cfg.Port,
		Learning:     false,
	}
	link, err := d.ensureLink(want)
	if err != nil {
		return err
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("vxlan: bring up %s: %w", d.cfg.Name, err)
		}
	}
	return nil
}

// ensureLink is flannel's ensureLink: create; on EEXIST keep a compatible device (fixing
// MTU and MAC), replace an incompatible VXLAN device.
func (d *Driver) ensureLink(want *netlink.Vxlan) (*netlink.Vxlan, error) {
	err := netlink.LinkAdd(want)
	if errors.Is(err, os.ErrExist) {
		existing, lerr := netlink.LinkByName(want.Name)
		if lerr != nil {
			return nil, fmt.Errorf("vxlan: look up %s: %w", want.Name, lerr)
		}
		have, ok := existing.(*netlink.Vxlan)
		if !ok {
			return nil, fmt.Errorf("%w: %s is a %s, want vxlan", datapath.ErrIncompatibleLink, want.Name, existing.Type())
		}
		if why := incompatible(have, want); why != "" {
			d.log.Warn("replacing incompatible VXLAN device", "reason", why)
			if err := netlink.LinkDel(have); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("vxlan: delete incompatible %s: %w", want.Name, err)
			}
			err = netlink.LinkAdd(want)
		} else {
			err = nil
			if have.MTU != want.MTU {
				if err := netlink.LinkSetMTU(have, want.MTU); err != nil {
					return nil, fmt.Errorf("vxlan: set MTU %d on %s: %w", want.MTU, want.Name, err)
				}
			}
			if have.HardwareAddr.String() != want.HardwareAddr.String() {
				if err := netlink.LinkSetHardwareAddr(have, want.HardwareAddr); err != nil {
					return nil, fmt.Errorf("vxlan: set MAC %s on %s: %w", want.HardwareAddr, want.Name, err)
				}
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("vxlan: create %s (VNI %d, port %d, local %s): %w", want.Name, want.VxlanId, want.Port, want.SrcAddr, err)
	}
	link, err := netlink.LinkByName(want.Name)
	if err != nil {
		return nil, fmt.Errorf("vxlan: look up %s: %w", want.Name, err)
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		return nil, fmt.Errorf("%w: %s is a %s, want vxlan", datapath.ErrIncompatibleLink, want.Name, link.Type())
	}
	return vx, nil
}

// incompatible names the first attribute in which have differs from want and that cannot
// be changed in place, or returns "".
func incompatible(have, want *netlink.Vxlan) string {
	switch {
	case have.VxlanId != want.VxlanId:
		return fmt.Sprintf("VNI %d, want %d", have.VxlanId, want.VxlanId)
	case have.Port != want.Port:
		return fmt.Sprintf("port %d, want %d", have.Port, want.Port)
	case !have.SrcAddr.Equal(want.SrcAddr):
		return fmt.Sprintf("local %s, want %s", have.SrcAddr, want.SrcAddr)
	case have.VtepDevIndex != want.VtepDevIndex:
		return fmt.Sprintf("underlay ifindex %d, want %d", have.VtepDevIndex, want.VtepDevIndex)
	case have.Learning:
		return "learning on"
	case len(have.Group) > 0 && !have.Group.IsUnspecified():
		return fmt.Sprintf("group/remote %s", have.Group)
	case have.FlowBased:
		return "external (flow-based)"
	case have.L2miss || have.L3miss:
		return "l2miss/l3miss on"
	}
	return ""
}

// peerState is what Set wants on the device for one peer.
type peerState struct {
	name string
	mac  net.HardwareAddr
	ip   netip.Addr
}

// Set converges the device's FDB, neighbour entries and weft routes to exactly peers: for
// each peer a permanent FDB entry (VTEP MAC → underlay address) and neighbour entry
// (underlay address → VTEP MAC), and one route per block; entries and routes of peers no
// longer in the set are removed; what is already right is not touched, so calling Set
// again with the same peers changes nothing. A peer that cannot be served (no or bad VTEP
// MAC, unusable underlay address, a MAC, address or block another peer of the set has) is
// left out by the rule on datapath.Driver; the others still converge.
func (d *Driver) Set(peers []datapath.RemotePeer) error {
	link, err := netlink.LinkByName(d.cfg.Name)
	if err != nil {
		return fmt.Errorf("vxlan: %w: %s: %v", datapath.ErrNotUp, d.cfg.Name, err)
	}
	idx := link.Attrs().Index
	var errs []error
	var want []peerState
	var routes, probeRoutes []netlink.Route
	macs := map[string]string{}
	ips := map[netip.Addr]string{}
	var claims datapath.BlockClaims
	for _, p := range peers {
		ip := p.Underlay.Unmap()
		switch {
		case checkMAC(p.VTEPMAC) != nil:
			errs = append(errs, d.reject(p.Name, "VTEP MAC %q: %v", p.VTEPMAC, checkMAC(p.VTEPMAC)))
			continue
		case !ip.IsValid() || ip.IsUnspecified() || ip.Is4() != d.cfg.Underlay.Is4() || ip == d.cfg.Underlay:
			errs = append(errs, d.reject(p.Name, "underlay %v unusable from %s", p.Underlay, d.cfg.Underlay))
			continue
		case macs[p.VTEPMAC.String()] != "" || p.VTEPMAC.String() == d.mac.String():
			errs = append(errs, d.reject(p.Name, "VTEP MAC %s is not unique", p.VTEPMAC))
			continue
		case ips[ip] != "":
			errs = append(errs, d.reject(p.Name, "underlay %s is %s's too", ip, ips[ip]))
			continue
		}
		macs[p.VTEPMAC.String()], ips[ip] = p.Name, p.Name
		want = append(want, peerState{name: p.Name, mac: p.VTEPMAC, ip: ip})
		if d.cfg.LinkProbes && !p.NoProbe {
			probeRoutes = append(probeRoutes, datapath.ProbeRoute(idx, ip, true))
		}
		for _, b := range p.Blocks {
			b, why := claims.Claim(p.Name, b, ip)
			if why != "" {
				errs = append(errs, d.reject(p.Name, "%s", why))
				continue
			}
			routes = append(routes, netlink.Route{
				LinkIndex: idx,
				Dst:       datapath.PrefixToIPNet(b),
				Gw:        ip.AsSlice(),
				Src:       d.cfg.Underlay.AsSlice(),
				Flags:     unix.RTNH_F_ONLINK,
			})
		}
	}
	// Order: neighbour and FDB entries before the routes that need them, stale routes
	// before the entries they used (SyncRoutes does both route steps at once; a stale
	// route left for a moment without its neighbour entry only drops packets that would
	// go to a peer that is no longer ours anyway).
	if err := d.syncFDB(idx, want); err != nil {
		errs = append(errs, err)
	}
	if err := d.syncNeigh(idx, want); err != nil {
		errs = append(errs, err)
	}
	if err := datapath.SyncRoutes(nil, unix.RT_TABLE_MAIN, idx, routes, d.log); err != nil {
		errs = append(errs, fmt.Errorf("vxlan: %w", err))
	}
	if err := datapath.SyncRoutes(nil, datapath.ProbeTable, idx, probeRoutes, d.log); err != nil {
		errs = append(errs, fmt.Errorf("vxlan: link-probe routes: %w", err))
	}
	return errors.Join(errs...)
}

// reject leaves one peer out (the rule on datapath.Driver).
func (d *Driver) reject(peer, format string, args ...any) error {
	return datapath.RejectPeer(d.log, d.cfg.Metrics, datapath.ModeVXLAN, peer, format, args...)
}

// syncFDB converges the device's FDB to one permanent entry per peer. Every entry on the
// device is the driver's; entries that are not exactly wanted are deleted.
func (d *Driver) syncFDB(idx int, want []peerState) error {
	have, err := netlink.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return fmt.Errorf("vxlan: list FDB of %s: %w", d.cfg.Name, err)
	}
	wantIP := make(map[string]netip.Addr, len(want))
	for _, p := range want {
		wantIP[p.mac.String()] = p.ip
	}
	ok := map[string]bool{}
	var errs []error
	for _, n := range have {
		ip, _ := netip.AddrFromSlice(n.IP)
		mac := n.HardwareAddr.String()
		if w, found := wantIP[mac]; found && w == ip.Unmap() && n.State&netlink.NUD_PERMANENT != 0 && !ok[mac] {
			ok[mac] = true
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !datapath.IsGone(err) {
			errs = append(errs, fmt.Errorf("vxlan: delete FDB %s dst %s: %w", mac, n.IP, err))
			continue
		}
		d.log.Info("FDB entry removed", "mac", mac, "dst", n.IP.String())
	}
	for _, p := range want {
		if ok[p.mac.String()] {
			continue
		}
		fdb := &netlink.Neigh{
			LinkIndex:    idx,
			Family:       unix.AF_BRIDGE,
			State:        netlink.NUD_PERMANENT,
			Flags:        netlink.NTF_SELF,
			IP:           p.ip.AsSlice(),
			HardwareAddr: p.mac,
		}
		if err := netlink.NeighSet(fdb); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: FDB %s dst %s (peer %s): %w", p.mac, p.ip, p.name, err))
			continue
		}
		d.log.Info("FDB entry installed", "peer", p.name, "mac", p.mac.String(), "dst", p.ip.String())
	}
	return errors.Join(errs...)
}

// syncNeigh converges the device's neighbour entries (of the underlay's family) to one
// permanent entry per peer. Entries the kernel makes itself without resolution
// (NUD_NOARP, e.g. multicast) are left alone.
func (d *Driver) syncNeigh(idx int, want []peerState) error {
	family := netlink.FAMILY_V4
	if d.cfg.Underlay.Is6() {
		family = netlink.FAMILY_V6
	}
	have, err := netlink.NeighList(idx, family)
	if err != nil {
		return fmt.Errorf("vxlan: list neighbours of %s: %w", d.cfg.Name, err)
	}
	wantMAC := make(map[netip.Addr]string, len(want))
	for _, p := range want {
		wantMAC[p.ip] = p.mac.String()
	}
	ok := map[netip.Addr]bool{}
	var errs []error
	for _, n := range have {
		ip, valid := netip.AddrFromSlice(n.IP)
		ip = ip.Unmap()
		if !valid || n.State&netlink.NUD_NOARP != 0 {
			continue
		}
		if mac, found := wantMAC[ip]; found && mac == n.HardwareAddr.String() && n.State&netlink.NUD_PERMANENT != 0 {
			ok[ip] = true
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !datapath.IsGone(err) {
			errs = append(errs, fmt.Errorf("vxlan: delete neighbour %s: %w", ip, err))
			continue
		}
		d.log.Info("neighbour entry removed", "ip", ip.String(), "mac", n.HardwareAddr.String())
	}
	for _, p := range want {
		if ok[p.ip] {
			continue
		}
		n := &netlink.Neigh{
			LinkIndex:    idx,
			Family:       family,
			State:        netlink.NUD_PERMANENT,
			IP:           p.ip.AsSlice(),
			HardwareAddr: p.mac,
		}
		if err := netlink.NeighSet(n); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: neighbour %s lladdr %s (peer %s): %w", p.ip, p.mac, p.name, err))
			continue
		}
		d.log.Info("neighbour entry installed", "peer", p.name, "ip", p.ip.String(), "mac", p.mac.String())
	}
	return errors.Join(errs...)
}

// Close deletes the device, and with it its FDB and neighbour entries and the routes
// through it. Safe to call twice, and before Up.
// A link of that name that is not VXLAN is not ours and is left alone.
func (d *Driver) Close() error {
	link, err := netlink.LinkByName(d.cfg.Name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vxlan: look up %s: %w", d.cfg.Name, err)
	}
	if _, ok := link.(*netlink.Vxlan); !ok {
		return fmt.Errorf("%w: %s is a %s, not weft's VXLAN device; left alone", datapath.ErrIncompatibleLink, d.cfg.Name, link.Type())
	}
	if err := netlink.LinkDel(link); err != nil && !datapath.IsGone(err) {
		return fmt.Errorf("vxlan: delete %s: %w", d.cfg.Name, err)
	}
	d.log.Info("device deleted")
	return nil
}

// RemoveStale deletes the VXLAN devices named like a network's (DeviceName: "weftvx" and
// six hex digits) that keep does not list: devices of networks removed while the peer was
// down, or whose VNI moved. Other links are never touched. O(links on the host).
func RemoveStale(keep []string, log *slog.Logger) error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("vxlan: list links: %w", err)
	}
	var errs []error
	for _, link := range links {
		name := link.Attrs().Name
		if _, ok := link.(*netlink.Vxlan); !ok || !isNetworkDevice(name) || slices.Contains(keep, name) {
			continue
		}
		if err := netlink.LinkDel(link); err != nil && !datapath.IsGone(err) {
			errs = append(errs, fmt.Errorf("vxlan: delete stale %s: %w", name, err))
			continue
		}
		if log != nil {
			log.Info("removed a stale network VXLAN device", "dev", name)
		}
	}
	return errors.Join(errs...)
}

// isNetworkDevice says whether name is one DeviceName gives a network's VNI.
func isNetworkDevice(name string) bool {
	hex, ok := strings.CutPrefix(name, "weftvx")
	if !ok || len(hex) != 6 {
		return false
	}
	for _, c := range hex {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}
