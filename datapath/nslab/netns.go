package nslab

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/weftnet/weft/datapath"
)

// NetNSDir is where iproute2 keeps named network namespaces (datapath.NetNSDir).
const NetNSDir = datapath.NetNSDir

// NetNSPath returns the bind-mount path of the named namespace.
func NetNSPath(name string) string { return datapath.NetNSPath(name) }

// CreateNetNS creates a persistent named network namespace (datapath.CreateNetNS).
func CreateNetNS(name string) (string, error) { return datapath.CreateNetNS(name) }

// DeleteNetNS removes a named namespace (datapath.DeleteNetNS).
func DeleteNetNS(name string) error { return datapath.DeleteNetNS(name) }

// HandleAt opens a netlink handle inside the namespace at path; no thread switches.
func HandleAt(path string) (*netlink.Handle, error) {
	n, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer n.Close()
	h, err := netlink.NewHandleAt(n)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", path, err)
	}
	return h, nil
}

// LinkUp sets a link up through h.
func LinkUp(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// AddBridge makes a bridge through h and sets it up (the underlay's L2 segment).
func AddBridge(h *netlink.Handle, name string, mtu int) (*netlink.Bridge, error) {
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu, TxQLen: -1}}
	if err := h.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("add bridge %s: %w", name, err)
	}
	if err := h.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	return br, nil
}

// Uplink joins a host namespace to the underlay namespace with a veth pair.
type Uplink struct {
	// Underlay is the underlay namespace's handle; Name the veth end made there.
	Underlay *netlink.Handle
	Name     string
	// Bridge, when not nil, gets the underlay end as a port; else the underlay end gets
	// Gateway (a routed underlay).
	Bridge  *netlink.Bridge
	Gateway netip.Prefix
	// HostPath is the host namespace's path; HostDev the veth end there, holding Addr.
	HostPath string
	HostDev  string
	Addr     netip.Prefix
	// MTU of both ends (0: the kernel's default).
	MTU int
}

// AddUplink makes the veth pair of u, addresses both ends as u says and sets them (and
// the host's lo) up.
func AddUplink(u Uplink) error {
	hostNS, err := netns.GetFromPath(u.HostPath)
	if err != nil {
		return fmt.Errorf("open %s: %w", u.HostPath, err)
	}
	ve := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: u.Name, MTU: u.MTU, TxQLen: -1},
		PeerName:      u.HostDev,
		PeerNamespace: netlink.NsFd(int(hostNS)),
	}
	if u.Bridge != nil {
		ve.MasterIndex = u.Bridge.Index
	}
	err = u.Underlay.LinkAdd(ve)
	hostNS.Close()
	if err != nil {
		return fmt.Errorf("add veth %s: %w", u.Name, err)
	}
	if u.Bridge == nil && u.Gateway.IsValid() {
		if err := u.Underlay.AddrAdd(ve, &netlink.Addr{IPNet: datapath.PrefixToIPNet(u.Gateway)}); err != nil {
			return fmt.Errorf("add %s to %s: %w", u.Gateway, u.Name, err)
		}
	}
	if err := u.Underlay.LinkSetUp(ve); err != nil {
		return fmt.Errorf("set %s up: %w", u.Name, err)
	}
	h, err := HandleAt(u.HostPath)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := LinkUp(h, "lo"); err != nil {
		return err
	}
	eth, err := h.LinkByName(u.HostDev)
	if err != nil {
		return fmt.Errorf("find %s: %w", u.HostDev, err)
	}
	if u.MTU > 0 {
		if err := h.LinkSetMTU(eth, u.MTU); err != nil {
			return fmt.Errorf("set MTU %d on %s: %w", u.MTU, u.HostDev, err)
		}
	}
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: datapath.PrefixToIPNet(u.Addr)}); err != nil {
		return fmt.Errorf("add %s to %s: %w", u.Addr, u.HostDev, err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return fmt.Errorf("set %s up: %w", u.HostDev, err)
	}
	return nil
}
