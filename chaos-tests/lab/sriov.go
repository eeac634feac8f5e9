package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath/sriov/sriovtest"
)

// SRIOVConfig gives every lab host a stand-in SR-IOV NIC (#14): a sysfs tree under the
// host's own directory with a PF and its VFs, the netdev-bound VFs being macvlan children
// (bridge mode) of the host's eth0 inside its namespace, so two hosts' VFs share the lab's
// L2 the way VFs of NICs on one switch do. The PF has no netdev: it stands in for eth0.
type SRIOVConfig struct {
	// PF is the PF's name in every host's tree (one network names one PF for all hosts).
	// Default "<prefix>pf0".
	PF string
	// VFs is the number of netdev-bound VFs per host (at least 1).
	VFs int
	// VFIO is the number of further VFs bound to vfio-pci, with an IOMMU group and no
	// netdev (VF indexes VFs…VFs+VFIO-1).
	VFIO int
	// PeerArgs replaces the SR-IOV flags the lab gives the peer beyond --sysfs-root
	// (default: --sriov-device-info-dir <host dir>/devinfo --sriov-pf-config=record).
	PeerArgs []string
	// RefreshInterval is how often the lab brings each tree in step with the stand-ins'
	// names and namespaces besides on every link event of the host namespace (the kernel
	// keeps real sysfs current). Default 1s.
	RefreshInterval time.Duration
}

// validate fills in defaults; prefix is the lab's.
func (c *SRIOVConfig) validate(prefix string) error {
	if c.PF == "" {
		c.PF = prefix + "pf0"
	}
	if len(c.PF)+3 > 15 {
		return fmt.Errorf("lab: sriov pf name %q too long for its vf names", c.PF)
	}
	if c.VFs < 1 || c.VFIO < 0 || c.VFs+c.VFIO > 64 {
		return fmt.Errorf("lab: sriov vfs %d + vfio %d out of range (1..64 in all)", c.VFs, c.VFIO)
	}
	if c.RefreshInterval <= 0 {
		c.RefreshInterval = time.Second
	}
	return nil
}

// hostSRIOV is one host's stand-in NIC and the loop keeping its tree current.
type hostSRIOV struct {
	fix     *sriovtest.Fixture
	devInfo string
	stop    chan struct{}
	done    chan struct{}
}

// setupSRIOV lays out h's tree and stand-ins; eth0 must exist in h's namespace.
func (h *Host) setupSRIOV(c SRIOVConfig) error {
	vfio := make([]int, c.VFIO)
	for k := range vfio {
		vfio[k] = c.VFs + k
	}
	devInfo := filepath.Join(h.Dir, "devinfo")
	if err := os.MkdirAll(devInfo, 0o755); err != nil {
		return err
	}
	fix, err := sriovtest.New(sriovtest.Config{
		Dir: h.Dir, PF: c.PF, Bus: 0x3b, NumVFs: c.VFs + c.VFIO, VFIO: vfio,
		Parent: "eth0", NetNS: h.NSPath,
	})
	if err != nil {
		return fmt.Errorf("lab: sriov on %s: %w", h.Name, err)
	}
	s := &hostSRIOV{fix: fix, devInfo: devInfo,
		stop: make(chan struct{}), done: make(chan struct{})}
	// The kernel keeps real sysfs current at once; the tree follows every link event of the
	// host namespace (a rename, a move in or out) as it comes, so the peer does not read a
	// name the kernel has already left, and a slow full Refresh backs the events up.
	nsh, err := netns.GetFromPath(h.NSPath)
	if err != nil {
		fix.Close()
		return fmt.Errorf("lab: sriov on %s: %w", h.Name, err)
	}
	updates := make(chan netlink.LinkUpdate, 64)
	err = netlink.LinkSubscribeWithOptions(updates, s.stop, netlink.LinkSubscribeOptions{Namespace: &nsh})
	nsh.Close()
	if err != nil {
		fix.Close()
		return fmt.Errorf("lab: sriov on %s: subscribe to links: %w", h.Name, err)
	}
	go func() {
		defer close(s.done)
		t := time.NewTicker(c.RefreshInterval)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case u, ok := <-updates:
				if !ok {
					updates = nil // the subscription ended; the tick carries on
					continue
				}
				// One event, one entry: a full Refresh per event falls behind a burst of
				// moves, and a peer's rescan would read names the kernel has left.
				i, ok := fix.VFOfAlias(u.Attrs().Alias)
				if !ok {
					continue
				}
				name := u.Attrs().Name
				if u.Header.Type == unix.RTM_DELLINK {
					name = "" // moved out (or deleted)
				}
				if err := fix.Rename(i, name); err != nil {
					h.log.Warn("sriov tree update", "vf", i, "err", err)
				}
				continue
			case <-t.C:
			}
			if err := fix.Refresh(); err != nil {
				h.log.Warn("sriov tree refresh", "err", err)
			}
		}
	}()
	h.mu.Lock()
	h.sriov = s
	h.mu.Unlock()
	return nil
}

// sriovArgsLocked is the peer flags for h's stand-in NIC (none without one); h.mu is held.
func (h *Host) sriovArgsLocked() []string {
	if h.sriov == nil {
		return nil
	}
	args := []string{"--sysfs-root", h.sriov.fix.Root()}
	if c := h.lab.cfg.SRIOV; c != nil && c.PeerArgs != nil {
		return append(args, c.PeerArgs...)
	}
	return append(args, "--sriov-device-info-dir", h.sriov.devInfo, "--sriov-pf-config=record")
}

// closeSRIOV stops the refresh loop and deletes the stand-ins still in the host namespace
// and the tree. Safe when h has none, and twice.
func (h *Host) closeSRIOV() error {
	h.mu.Lock()
	s := h.sriov
	h.sriov = nil
	h.mu.Unlock()
	if s == nil {
		return nil
	}
	close(s.stop)
	<-s.done
	return s.fix.Close()
}

// errNoSRIOV: the lab was made without Config.SRIOV.
var errNoSRIOV = errors.New("lab: host has no sriov stand-in (Config.SRIOV is nil)")

// SRIOV returns h's stand-in NIC (nil without Config.SRIOV): its tree, VF PCI addresses,
// stand-in names and MACs, and Revive.
func (h *Host) SRIOV() *sriovtest.Fixture {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sriov == nil {
		return nil
	}
	return h.sriov.fix
}

// DeviceInfoDir is the peer's --sriov-device-info-dir ("" without Config.SRIOV).
func (h *Host) DeviceInfoDir() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sriov == nil {
		return ""
	}
	return h.sriov.devInfo
}

// RefreshSRIOV brings h's tree in step with its stand-ins now, rather than at the next tick.
func (h *Host) RefreshSRIOV() error {
	f := h.SRIOV()
	if f == nil {
		return errNoSRIOV
	}
	return f.Refresh()
}

// SRIOVPF is the stand-in PF's name ("" without Config.SRIOV); VF i's netdev is first
// called <pf>v<i>.
func (h *Host) SRIOVPF() string {
	if c := h.lab.cfg.SRIOV; c != nil {
		return c.PF
	}
	return ""
}
