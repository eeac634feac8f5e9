// Package ipam hands out container addresses. A network's range is split into fixed-size
// blocks; a peer owns whole blocks (who owns which is decided behind BlockOwner, so the
// single-peer owner here can be replaced by a replicated one) and allocates addresses from
// its own blocks locally, persisting every attachment so a restart neither loses nor reuses
// an address.
package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"

	"github.com/weftnet/weft/mesh/pathsel"
)

// Sentinel errors; wrapped with detail, matched with errors.Is.
var (
	ErrRangeFull      = errors.New("address range is full")
	ErrUnknownNetwork = errors.New("unknown network")
	ErrInvalidNetwork = errors.New("invalid network definition")
	ErrNotFound       = errors.New("attachment not found")
	ErrNoQuorum       = errors.New("no raft quorum")
)

// DefaultBlockBits is the prefix length of one block: a /26 holds 64 addresses.
const DefaultBlockBits = 26

var networkNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)

// Network is one address range that containers attach to. The fields after BlockBits came
// with networks created at run time (issue #13); each one's zero value is what a network
// meant before them, so a snapshot or log entry without them decodes to the old meaning, and
// `omitempty` keeps the encoding of such a network byte-for-byte as it was.
type Network struct {
	Name      string       `json:"name"`
	Subnet    netip.Prefix `json:"subnet"`
	BlockBits int          `json:"block_bits"`
	// MTU of the network's bridge and container interfaces; 0: the peer's --mtu.
	MTU int `json:"mtu,omitempty"`
	// Encrypt is the network's link encryption policy (never, auto, always); "": the peer's
	// --encrypt.
	Encrypt string `json:"encrypt,omitempty"`
	// SLA is the network's class as pathsel.ParseSLA reads it ("gold: rtt<=5ms"); "": the
	// peer's --sla.
	SLA string `json:"sla,omitempty"`
	// Isolated: containers on other networks may not reach this one, nor it them (enforced
	// by datapath/isolate). false is a routed range reachable from the other non-isolated
	// networks, which is what the network pinned at bootstrap is; `weft network create`
	// defaults it to true.
	Isolated bool `json:"isolated,omitempty"`

	// Mode is how containers attach (issue #14): "" is a veth on the network's bridge,
	// forwarded between hosts by weft; ModeSRIOV moves a virtual function of PF into the
	// container (or hands a userspace-bound one over by PCI address), and the physical
	// network carries its traffic between hosts: weft builds no bridge, tunnel or route
	// for it.
	Mode string `json:"mode,omitempty"`
	// PF is the physical function whose VFs an SR-IOV network hands out: a netdev name,
	// the same on every host that serves the network.
	PF string `json:"pf,omitempty"`
	// VLAN tags an SR-IOV network's VFs on the PF; 0 is untagged.
	VLAN int `json:"vlan,omitempty"`
	// DPDK says which VFs an SR-IOV network hands out: DPDKAuto ("" too) either kind,
	// DPDKOn only VFs bound to a userspace driver (by PCI address), DPDKOff only netdevs.
	DPDK string `json:"dpdk,omitempty"`

	// Default per-container rates (issue #15), shaped on the host side of each attachment:
	// bits per second and bits of burst, as the reference bandwidth plugin counts them; 0
	// is unlimited. A container's own bandwidth capability overrides them.
	IngressRate  uint64 `json:"ingress_rate,omitempty"`
	IngressBurst uint64 `json:"ingress_burst,omitempty"`
	EgressRate   uint64 `json:"egress_rate,omitempty"`
	EgressBurst  uint64 `json:"egress_burst,omitempty"`
}

// Attachment modes of a network.
const (
	ModeBridge = ""
	ModeSRIOV  = "sriov"
)

// DPDK choices of an SR-IOV network.
const (
	DPDKAuto = "auto"
	DPDKOn   = "on"
	DPDKOff  = "off"
)

// MaxRate bounds a network's default rates (bits per second): 1 Tbit/s is beyond any link a
// peer has, and keeps rate arithmetic far from overflow.
const MaxRate = 1_000_000_000_000

// MinRate is the slowest default rate (bits per second), as datapath/shape allows.
const MinRate = 8_000

var pfNameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$`)

// Bounds of the fields that came with run-time networks.
const (
	// MinMTU and MaxMTU bound a network's MTU (as --mtu is bounded).
	MinMTU = 576
	MaxMTU = 65535
	// maxSLALen bounds the SLA class string, which travels in every gossiped delta of the
	// network (a delta is at most maxDeltaBytes).
	maxSLALen = 160
)

// Encryption policies of a network ("" is the peer's --encrypt).
const (
	EncryptNever  = "never"
	EncryptAuto   = "auto"
	EncryptAlways = "always"
)

// Validate reports what is wrong with the definition, naming the field.
func (n Network) Validate() error {
	if !networkNameRE.MatchString(n.Name) {
		return fmt.Errorf("%w: name %q must be 1-32 lower-case letters, digits or '-'", ErrInvalidNetwork, n.Name)
	}
	if !n.Subnet.IsValid() || !n.Subnet.Addr().Is4() {
		return fmt.Errorf("%w: subnet %q of network %s must be an IPv4 CIDR", ErrInvalidNetwork, n.Subnet, n.Name)
	}
	if n.Subnet.Masked() != n.Subnet {
		return fmt.Errorf("%w: subnet %s of network %s has host bits set (did you mean %s?)", ErrInvalidNetwork, n.Subnet, n.Name, n.Subnet.Masked())
	}
	if n.Subnet.Bits() > 24 {
		return fmt.Errorf("%w: subnet %s of network %s is smaller than a /24", ErrInvalidNetwork, n.Subnet, n.Name)
	}
	if n.Subnet.Bits() < MinSubnetBits {
		return fmt.Errorf("%w: subnet %s of network %s is wider than a /%d", ErrInvalidNetwork, n.Subnet, n.Name, MinSubnetBits)
	}
	for _, sp := range specialRanges {
		if sp.Overlaps(n.Subnet) {
			return fmt.Errorf("%w: subnet %s of network %s overlaps %s, which is never routed to containers", ErrInvalidNetwork, n.Subnet, n.Name, sp)
		}
	}
	if n.BlockBits < n.Subnet.Bits() || n.BlockBits > 30 {
		return fmt.Errorf("%w: block size /%d of network %s must be between /%d and /30", ErrInvalidNetwork, n.BlockBits, n.Name, n.Subnet.Bits())
	}
	if n.BlockBits-n.Subnet.Bits() > maxBlockBitsSpan {
		return fmt.Errorf("%w: network %s splits %s into /%d blocks, more than %d; choose larger blocks",
			ErrInvalidNetwork, n.Name, n.Subnet, n.BlockBits, 1<<maxBlockBitsSpan)
	}
	if n.MTU != 0 && (n.MTU < MinMTU || n.MTU > MaxMTU) {
		return fmt.Errorf("%w: MTU %d of network %s must be between %d and %d (or 0 for the peer's --mtu)", ErrInvalidNetwork, n.MTU, n.Name, MinMTU, MaxMTU)
	}
	switch n.Encrypt {
	case "", EncryptNever, EncryptAuto, EncryptAlways:
	default:
		return fmt.Errorf("%w: encrypt %q of network %s must be never, auto or always", ErrInvalidNetwork, n.Encrypt, n.Name)
	}
	if len(n.SLA) > maxSLALen {
		return fmt.Errorf("%w: SLA class of network %s is %d bytes, at most %d", ErrInvalidNetwork, n.Name, len(n.SLA), maxSLALen)
	}
	if n.SLA != "" {
		if _, err := pathsel.ParseSLA(n.SLA); err != nil {
			return fmt.Errorf("%w: SLA class of network %s: %v", ErrInvalidNetwork, n.Name, err)
		}
	}
	if err := n.validateMode(); err != nil {
		return err
	}
	return n.validateRates()
}

// validateMode checks the SR-IOV fields: set only with ModeSRIOV, and then a PF name.
func (n Network) validateMode() error {
	switch n.Mode {
	case ModeBridge:
		if n.PF != "" || n.VLAN != 0 || n.DPDK != "" {
			return fmt.Errorf("%w: network %s sets pf, vlan or dpdk without mode %s", ErrInvalidNetwork, n.Name, ModeSRIOV)
		}
		return nil
	case ModeSRIOV:
	default:
		return fmt.Errorf("%w: mode %q of network %s must be empty (bridge) or %s", ErrInvalidNetwork, n.Mode, n.Name, ModeSRIOV)
	}
	if !pfNameRE.MatchString(n.PF) {
		return fmt.Errorf("%w: pf %q of SR-IOV network %s must be an interface name (1-15 letters, digits, '_', '.', '-')", ErrInvalidNetwork, n.PF, n.Name)
	}
	if n.VLAN < 0 || n.VLAN > 4094 {
		return fmt.Errorf("%w: vlan %d of network %s must be between 0 (untagged) and 4094", ErrInvalidNetwork, n.VLAN, n.Name)
	}
	switch n.DPDK {
	case "", DPDKAuto, DPDKOn, DPDKOff:
	default:
		return fmt.Errorf("%w: dpdk %q of network %s must be auto, on or off", ErrInvalidNetwork, n.DPDK, n.Name)
	}
	return nil
}

// validateRates checks the default rates: bounded, and a burst only with its rate.
func (n Network) validateRates() error {
	for _, r := range []struct {
		dir         string
		rate, burst uint64
	}{{"ingress", n.IngressRate, n.IngressBurst}, {"egress", n.EgressRate, n.EgressBurst}} {
		if r.rate != 0 && r.rate < MinRate {
			return fmt.Errorf("%w: %s rate %d bit/s of network %s is below %d (tc cannot shape slower)", ErrInvalidNetwork, r.dir, r.rate, n.Name, MinRate)
		}
		if r.rate > MaxRate {
			return fmt.Errorf("%w: %s rate %d bit/s of network %s is above %d", ErrInvalidNetwork, r.dir, r.rate, n.Name, uint64(MaxRate))
		}
		if r.burst != 0 && r.rate == 0 {
			return fmt.Errorf("%w: network %s sets an %s burst without an %s rate", ErrInvalidNetwork, n.Name, r.dir, r.dir)
		}
		if r.burst > MaxRate {
			return fmt.Errorf("%w: %s burst %d bits of network %s is above %d", ErrInvalidNetwork, r.dir, r.burst, n.Name, uint64(MaxRate))
		}
	}
	if n.Mode == ModeSRIOV && (n.IngressRate != 0 || n.EgressRate != 0) {
		return fmt.Errorf("%w: SR-IOV network %s cannot shape on the host side (its VFs bypass the host); set no rates", ErrInvalidNetwork, n.Name)
	}
	return nil
}

// Describe is the definition for messages: range, blocks and the fields set. (Not String:
// NetworkStatus embeds Network, and a promoted String would hide its blocks when printed.)
func (n Network) Describe() string {
	s := fmt.Sprintf("%s (%s, /%d blocks", n.Name, n.Subnet, n.BlockBits)
	if n.MTU != 0 {
		s += fmt.Sprintf(", mtu %d", n.MTU)
	}
	if n.Encrypt != "" {
		s += ", encrypt " + n.Encrypt
	}
	if n.SLA != "" {
		s += fmt.Sprintf(", sla %q", n.SLA)
	}
	if n.Isolated {
		s += ", isolated"
	}
	if n.Mode == ModeSRIOV {
		s += fmt.Sprintf(", sriov pf %s", n.PF)
		if n.VLAN != 0 {
			s += fmt.Sprintf(" vlan %d", n.VLAN)
		}
		if n.DPDK != "" {
			s += " dpdk " + n.DPDK
		}
	}
	if n.IngressRate != 0 {
		s += fmt.Sprintf(", ingress %d bit/s", n.IngressRate)
	}
	if n.EgressRate != 0 {
		s += fmt.Sprintf(", egress %d bit/s", n.EgressRate)
	}
	return s + ")"
}

// Bounds on a network definition. A network's range is routed to its blocks' owners on every
// host, so a definition is a claim on every host's routing table: these keep one from taking
// traffic that is not the containers'.
const (
	// MinSubnetBits: no range wider than a /8. The widest private range (10/8) is a /8; a
	// wider one covers public space the hosts reach through their default route, and the
	// audit's 0.0.0.0/0 with /1 blocks would take every host's traffic.
	MinSubnetBits = 8
	// maxBlockBitsSpan: at most 2^18 blocks per network (a /8 in /26 blocks), so a claim's
	// scan for a free block and the replicated table stay bounded.
	maxBlockBitsSpan = 18
	// MaxNetworks bounds how many networks the cluster defines.
	MaxNetworks = 64
)

// specialRanges are IPv4 ranges no network may overlap: "this network" (which holds the
// default route 0.0.0.0), loopback, link-local, and multicast, reserved and broadcast space.
var specialRanges = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("224.0.0.0/3"),
}

// CheckNetworks reports what is wrong with a set of networks defined together: each must be
// valid (see Validate), names unique, no two ranges may overlap, at most MaxNetworks, and
// none may hold one of the underlay addresses (those the caller knows; none is fine).
// Pure; O(k² + k·u) for k networks and u underlay addresses, k ≤ MaxNetworks.
func CheckNetworks(nets []Network, underlay []netip.Addr) error {
	if len(nets) > MaxNetworks {
		return fmt.Errorf("%w: %d networks, at most %d", ErrInvalidNetwork, len(nets), MaxNetworks)
	}
	for i, n := range nets {
		if err := n.Validate(); err != nil {
			return err
		}
		for _, m := range nets[:i] {
			if m.Name == n.Name {
				return fmt.Errorf("%w: network %s defined twice", ErrInvalidNetwork, n.Name)
			}
			if m.Subnet.Overlaps(n.Subnet) {
				return fmt.Errorf("%w: network %s (%s) overlaps network %s (%s)", ErrInvalidNetwork, n.Name, n.Subnet, m.Name, m.Subnet)
			}
		}
		for _, u := range underlay {
			if n.Subnet.Contains(u) {
				return fmt.Errorf("%w: network %s (%s) holds the underlay address %s of a peer", ErrInvalidNetwork, n.Name, n.Subnet, u)
			}
		}
	}
	return nil
}

// Gateway is the first host address of the subnet. Every peer's bridge for this network holds
// it, so a container's default route and DNS server are the same wherever it runs.
func (n Network) Gateway() netip.Addr { return n.Subnet.Addr().Next() }

// GatewayPrefix is the gateway address with the subnet's length, as set on the bridge.
func (n Network) GatewayPrefix() netip.Prefix { return netip.PrefixFrom(n.Gateway(), n.Subnet.Bits()) }

// reserved says whether addr may never be handed out: the subnet's network address, the
// gateway and the broadcast address.
func (n Network) reserved(addr netip.Addr) bool {
	return addr == n.Subnet.Addr() || addr == n.Gateway() || addr == lastAddr(n.Subnet)
}

// NumBlocks is how many blocks the subnet splits into.
func (n Network) NumBlocks() int { return 1 << (n.BlockBits - n.Subnet.Bits()) }

// Block returns the i-th block of the subnet.
func (n Network) Block(i int) netip.Prefix {
	base := addrToUint32(n.Subnet.Addr()) + uint32(i)<<(32-n.BlockBits)
	return netip.PrefixFrom(uint32ToAddr(base), n.BlockBits)
}

// ContainsBlock says whether b is one of the subnet's blocks.
func (n Network) ContainsBlock(b netip.Prefix) bool {
	return b.Bits() == n.BlockBits && b.Masked() == b && n.Subnet.Contains(b.Addr())
}

// Usable is the number of addresses of block b that may be handed out.
func (n Network) Usable(b netip.Prefix) int {
	count := 0
	for a := b.Addr(); b.Contains(a); a = a.Next() {
		if !n.reserved(a) {
			count++
		}
	}
	return count
}

func lastAddr(p netip.Prefix) netip.Addr {
	return uint32ToAddr(addrToUint32(p.Addr()) | (1<<(32-p.Bits()) - 1))
}

func addrToUint32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func uint32ToAddr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
