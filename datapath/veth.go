package datapath

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Attachment is the desired state of one container interface.
type Attachment struct {
	NetNS      string // path of the container's network namespace
	IfName     string // interface name inside the container
	HostIfName string // host end of the veth pair (see HostIfName)
	Bridge     string
	Address    netip.Prefix // container address with the network's prefix length
	Gateway    netip.Addr
	MTU        int
	// Secondary marks an interface that is not the container's primary one (a second
	// network plane, e.g. net1): it gets no default route, only a route to Range via
	// Gateway. The zero value is today's primary attachment.
	Secondary bool
	// Range is the whole range of the attachment's network (all its hosts' blocks).
	Range netip.Prefix
}

// AttachResult describes what Attach set up.
type AttachResult struct {
	HostMAC      string
	ContainerMAC string
	BridgeMAC    string
}

// HostIfName derives the host end's name from the attachment's key, so DEL can find it
// without the container's namespace (which may be gone by then). 4 + 11 hex fits IFNAMSIZ.
func HostIfName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifName))
	return "weft" + hex.EncodeToString(sum[:])[:11]
}

// openNetNS opens path and checks it is a network namespace.
func openNetNS(path string) (netns.NsHandle, error) {
	nsh, err := ns.GetNS(path)
	if err != nil {
		var notNS ns.NSPathNotNSErr
		var notExist ns.NSPathNotExistErr
		if errors.As(err, &notNS) || errors.As(err, &notExist) {
			return 0, fmt.Errorf("%w: %s: %v", ErrNotNetNS, path, err)
		}
		return 0, fmt.Errorf("open netns %s: %w", path, err)
	}
	// ns.GetNS gives an *os.File-backed handle; keep our own dup so its lifetime is ours.
	fd, err := unix.Dup(int(nsh.Fd()))
	nsh.Close()
	if err != nil {
		return 0, fmt.Errorf("dup netns fd %s: %w", path, err)
	}
	return netns.NsHandle(fd), nil
}

// containerHandle opens the container's namespace and a netlink handle inside it, so the
// container side is configured without moving any thread into the namespace.
func containerHandle(path string) (netns.NsHandle, *netlink.Handle, error) {
	nsh, err := openNetNS(path)
	if err != nil {
		return 0, nil, err
	}
	cnh, err := netlink.NewHandleAt(nsh)
	if err != nil {
		nsh.Close()
		return 0, nil, fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	return nsh, cnh, nil
}

// Attach converges one container interface: a veth pair whose host end is on the bridge
// (hairpin on, up) and whose container end is named IfName, up, with the address and MTU;
// a primary interface gets the default route via the gateway, a secondary one a route to
// Range via the gateway (none when its on-link subnet already covers Range); both get
// source-based policy routing, so replies leave by the interface the request came in on
// (see policy.go). If IfName already exists in the container and is not the peer of our
// host end, it fails with ErrIfNameExists and touches nothing; fields that cannot work fail
// with ErrBadAttachment before anything is touched.
func Attach(a Attachment) (AttachResult, error) {
	if err := a.validate(); err != nil {
		return AttachResult{}, err
	}
	nsh, cnh, err := containerHandle(a.NetNS)
	if err != nil {
		return AttachResult{}, err
	}
	defer nsh.Close()
	defer cnh.Close()

	br, err := netlink.LinkByName(a.Bridge)
	if err != nil {
		return AttachResult{}, fmt.Errorf("look up bridge %s: %w", a.Bridge, err)
	}

	host, cont, err := ensureVethPair(a, nsh, cnh)
	if err != nil {
		return AttachResult{}, err
	}
	if host.Attrs().MasterIndex != br.Attrs().Index {
		if err := netlink.LinkSetMaster(host, br); err != nil {
			return AttachResult{}, fmt.Errorf("put %s on %s: %w", a.HostIfName, a.Bridge, err)
		}
	}
	// Hairpin lets a container reach itself through a service address that is NATed back.
	if err := netlink.LinkSetHairpin(host, true); err != nil {
		return AttachResult{}, fmt.Errorf("hairpin on %s: %w", a.HostIfName, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return AttachResult{}, fmt.Errorf("bring up %s: %w", a.HostIfName, err)
	}
	if err := cnh.LinkSetUp(cont); err != nil {
		return AttachResult{}, fmt.Errorf("bring up %s in %s: %w", a.IfName, a.NetNS, err)
	}
	if err := ensureOnlyAddress(cnh, cont, a.Address); err != nil {
		return AttachResult{}, fmt.Errorf("%s in %s: %w", a.IfName, a.NetNS, err)
	}
	if err := ensureContainerRouting(cnh, a, cont); err != nil {
		return AttachResult{}, err
	}
	return AttachResult{
		HostMAC:      host.Attrs().HardwareAddr.String(),
		ContainerMAC: cont.Attrs().HardwareAddr.String(),
		BridgeMAC:    br.Attrs().HardwareAddr.String(),
	}, nil
}

// ensureVethPair returns our veth pair, creating it when missing and keeping it when it is
// already there and right.
func ensureVethPair(a Attachment, nsh netns.NsHandle, cnh *netlink.Handle) (host, cont netlink.Link, err error) {
	host, hostErr := netlink.LinkByName(a.HostIfName)
	cont, contErr := cnh.LinkByName(a.IfName)
	var notFound netlink.LinkNotFoundError
	if hostErr != nil && !errors.As(hostErr, &notFound) {
		return nil, nil, fmt.Errorf("look up %s: %w", a.HostIfName, hostErr)
	}
	if contErr != nil && !errors.As(contErr, &notFound) {
		return nil, nil, fmt.Errorf("look up %s in %s: %w", a.IfName, a.NetNS, contErr)
	}
	if contErr == nil {
		// Something named IfName is in the container: ours only if it is our host end's peer.
		if hostErr == nil && isPeerOf(cont, host) {
			if cont.Attrs().MTU != a.MTU && a.MTU > 0 {
				if err := cnh.LinkSetMTU(cont, a.MTU); err != nil {
					return nil, nil, fmt.Errorf("set MTU on %s: %w", a.IfName, err)
				}
				if err := netlink.LinkSetMTU(host, a.MTU); err != nil {
					return nil, nil, fmt.Errorf("set MTU on %s: %w", a.HostIfName, err)
				}
			}
			return host, cont, nil
		}
		return nil, nil, fmt.Errorf("%w: %s in %s", ErrIfNameExists, a.IfName, a.NetNS)
	}
	if hostErr == nil {
		// A host end without its container end is left over from an interrupted attach
		// whose namespace went away: replace it.
		if err := netlink.LinkDel(host); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("delete stale %s: %w", a.HostIfName, err)
		}
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a.HostIfName, MTU: a.MTU},
		PeerName:      a.IfName,
		PeerNamespace: netlink.NsFd(int(nsh)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, nil, fmt.Errorf("%w: %s in %s (created concurrently)", ErrIfNameExists, a.IfName, a.NetNS)
		}
		return nil, nil, fmt.Errorf("create veth %s/%s: %w", a.HostIfName, a.IfName, err)
	}
	if host, err = netlink.LinkByName(a.HostIfName); err != nil {
		return nil, nil, fmt.Errorf("look up new %s: %w", a.HostIfName, err)
	}
	if cont, err = cnh.LinkByName(a.IfName); err != nil {
		return nil, nil, fmt.Errorf("look up new %s in %s: %w", a.IfName, a.NetNS, err)
	}
	return host, cont, nil
}

// isPeerOf says whether cont is the other end of the veth host. A veth's ParentIndex is its
// peer's ifindex (in the peer's namespace).
func isPeerOf(cont, host netlink.Link) bool {
	if _, ok := cont.(*netlink.Veth); !ok {
		return false
	}
	return cont.Attrs().ParentIndex == host.Attrs().Index && host.Attrs().ParentIndex == cont.Attrs().Index
}

// Detach removes the attachment's veth pair by its host end; deleting one end deletes both.
// Already gone is success.
func Detach(hostIfName string) error {
	return DeleteLink(hostIfName)
}

// Check verifies that the attachment is in place: the container interface exists, is our
// veth peer, is up, holds the address; the host end is on the bridge; the routes are those
// of its kind (a primary holds the default route, a secondary holds its range route and no
// default route) and its policy rule and table are there. The error wraps ErrCheckFailed
// and names the first thing missing.
func Check(a Attachment) error {
	if err := a.validate(); err != nil {
		return err
	}
	nsh, cnh, err := containerHandle(a.NetNS)
	if err != nil {
		return err
	}
	defer nsh.Close()
	defer cnh.Close()

	cont, err := cnh.LinkByName(a.IfName)
	if err != nil {
		return fmt.Errorf("%w: interface %s missing in %s", ErrCheckFailed, a.IfName, a.NetNS)
	}
	host, err := netlink.LinkByName(a.HostIfName)
	if err != nil {
		return fmt.Errorf("%w: host interface %s missing", ErrCheckFailed, a.HostIfName)
	}
	if !isPeerOf(cont, host) {
		return fmt.Errorf("%w: %s in %s is not the peer of %s", ErrCheckFailed, a.IfName, a.NetNS, a.HostIfName)
	}
	br, err := netlink.LinkByName(a.Bridge)
	if err != nil || host.Attrs().MasterIndex != br.Attrs().Index {
		return fmt.Errorf("%w: %s is not on bridge %s", ErrCheckFailed, a.HostIfName, a.Bridge)
	}
	if cont.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("%w: %s in %s is down", ErrCheckFailed, a.IfName, a.NetNS)
	}
	addrs, err := cnh.AddrList(cont, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", a.IfName, err)
	}
	found := false
	for _, addr := range addrs {
		if p, ok := IPNetToPrefix(addr.IPNet); ok && p == a.Address {
			found = true
		}
	}
	if !found {
		return fmt.Errorf("%w: address %s missing on %s in %s", ErrCheckFailed, a.Address, a.IfName, a.NetNS)
	}
	return checkContainerRouting(cnh, a, cont)
}

// ensureOnlyAddress leaves exactly the IPv4 address addr on cont (ours: our veth's peer),
// so that a re-attach with another address leaves no stale one behind. Stale ones go first:
// deleting a subnet's primary address also deletes the secondary ones of that subnet.
func ensureOnlyAddress(cnh *netlink.Handle, cont netlink.Link, addr netip.Prefix) error {
	addrs, err := cnh.AddrList(cont, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	for _, old := range addrs {
		if p, ok := IPNetToPrefix(old.IPNet); ok && p != addr {
			if err := cnh.AddrDel(cont, &old); err != nil && !IsGone(err) {
				return fmt.Errorf("delete stale address %s: %w", p, err)
			}
		}
	}
	if err := cnh.AddrReplace(cont, &netlink.Addr{IPNet: PrefixToIPNet(addr)}); err != nil {
		return fmt.Errorf("address %s: %w", addr, err)
	}
	return nil
}

func maskBits(n *net.IPNet) int {
	ones, _ := n.Mask.Size()
	return ones
}

// Preflight checks, changing nothing, that Attach can succeed: NetNS is a network namespace
// and IfName is free in it, or already is our host end's peer.
func Preflight(a Attachment) error {
	nsh, cnh, err := containerHandle(a.NetNS)
	if err != nil {
		return err
	}
	defer nsh.Close()
	defer cnh.Close()
	cont, err := cnh.LinkByName(a.IfName)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s in %s: %w", a.IfName, a.NetNS, err)
	}
	if host, err := netlink.LinkByName(a.HostIfName); err == nil && isPeerOf(cont, host) {
		return nil
	}
	return fmt.Errorf("%w: %s in %s", ErrIfNameExists, a.IfName, a.NetNS)
}
