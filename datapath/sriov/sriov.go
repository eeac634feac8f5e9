// Package sriov is weft's SR-IOV attachment mode (#14): the virtual functions (VFs) a
// physical function (PF) exposes, found in sysfs; a pool that hands each VF to at most one
// container and remembers it across restarts; and the kernel work of moving a VF's netdev
// into a container and back, with the PF-side VF settings behind a small interface.
//
// Hosts without SR-IOV hardware test it on a faithful sysfs tree under a temporary root with
// real netdevs (macvlan children) standing in for the VFs: that proves the bookkeeping, the
// sysfs parsing, the netns handling, restore and concurrency, not that settings reach a NIC.
package sriov

import "net"

// VF is one virtual function of a PF, as sysfs shows it.
type VF struct {
	PF    string // the PF's netdev name, e.g. ens1f0
	Index int    // N of the PF's virtfnN link
	PCI   string // the VF's PCI address, e.g. 0000:03:02.0
	// Driver is the bound driver's name: a netdev driver (iavf, mlx5_core, …), a userspace
	// one (vfio-pci, uio_pci_generic, igb_uio), or "" when unbound.
	Driver string
	// Netdev is the VF's netdev name in the host namespace ("" when it has none there:
	// bound to a userspace driver, unbound, or moved into a container).
	Netdev string
	// IOMMUGroup is the VF's IOMMU group number ("" when none).
	IOMMUGroup string
}

// UserspaceDrivers are the drivers that make a VF a DPDK device rather than a netdev.
var UserspaceDrivers = []string{"vfio-pci", "uio_pci_generic", "igb_uio"}

// DPDK reports whether v is bound to a userspace (DPDK) driver.
func (v VF) DPDK() bool {
	for _, d := range UserspaceDrivers {
		if v.Driver == d {
			return true
		}
	}
	return false
}

// NetdevState is what a VF's netdev and its PF-side settings were before weft touched them,
// saved before the first change so that DEL and a failed ADD can put everything back.
type NetdevState struct {
	Name     string           `json:"name"`
	MAC      net.HardwareAddr `json:"mac"`
	MTU      int              `json:"mtu"`
	VLAN     int              `json:"vlan"`
	QoS      int              `json:"qos"`
	SpoofChk bool             `json:"spoofchk"`
	Trust    bool             `json:"trust"`
	// LinkState is the VF's administrative link state on the PF: "auto", "enable" or
	// "disable".
	LinkState string `json:"link_state"`
	MinTxRate int    `json:"min_tx_rate"` // Mbit/s, 0: none
	MaxTxRate int    `json:"max_tx_rate"` // Mbit/s, 0: none
}
