// Package sriovtest lays out a faithful SR-IOV sysfs tree under a temporary root, with real
// netdevs (macvlan children, bridge mode) standing in for the VFs, so that discovery, the
// pool and the netdev moves run against the real kernel on a host without SR-IOV hardware.
//
// The tree mirrors the kernel's layout (paths relative to Root):
//
//	devices/pci0000:00/<pf-pci>/{sriov_numvfs,sriov_totalvfs,virtfnN -> ../<vf-pci>,net/<pf>/,driver}
//	devices/pci0000:00/<pf-pci>/net/<pf>/device -> ../../../<pf-pci>
//	devices/pci0000:00/<vf-pci>/{physfn -> ../<pf-pci>,driver,iommu_group,net/<ifname>/}
//	class/net/<pf> -> ../../devices/pci0000:00/<pf-pci>/net/<pf>
//	bus/pci/devices/<pci> -> ../../../devices/pci0000:00/<pci>
//	bus/pci/drivers/<driver>/, kernel/iommu_groups/<n>/
package sriovtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// aliasPrefix marks the stand-in netdevs: the alias (IFLA_IFALIAS) travels with the device
// through renames and namespace moves, so Refresh finds each VF's netdev by it the way the
// kernel knows its own device.
const aliasPrefix = "sriovtest:"

// Config describes the fixture.
type Config struct {
	// Dir is where the temporary root is made ("" = os.TempDir()).
	Dir string
	// PF is the PF's netdev name in the tree. No PF netdev is created.
	PF string
	// Bus is the PCI bus number of the PF and its VFs (PF at 0000:<bus>:00.0).
	Bus int
	// NumVFs VFs are enabled; TotalVFs (>= NumVFs, 0 = NumVFs) is what the device allows.
	NumVFs, TotalVFs int
	// Driver is the netdev driver of the VFs ("" = iavf).
	Driver string
	// VFIO lists VF indexes bound to vfio-pci: an IOMMU group, no netdev.
	VFIO []int
	// NamePrefix names the VF netdevs <prefix><index> ("" = <PF>v).
	NamePrefix string
	// Parent is the link the macvlan stand-ins hang off, in NetNS; "" lays out the tree
	// only (net/<ifname> entries included) with no netdevs, for parsing tests.
	Parent string
	// NetNS is the path of the namespace where Parent lives and the stand-ins are made
	// ("" = the caller's namespace).
	NetNS string
}

// Fixture is one laid-out tree and its stand-in netdevs. Netdev, Rename and Refresh are safe
// for concurrent use; Close must not race them.
type Fixture struct {
	cfg  Config
	root string
	h    *netlink.Handle // nil without Parent

	mu     sync.Mutex     // guards netdev, made, mac
	netdev map[int]string // VF index -> current host netdev name ("" = not in the namespace)
	made   []string       // names of the stand-ins this fixture created
	// mac is each stand-in's first MAC: a real VF keeps its MAC when the kernel hands it
	// back to the host, so Revive gives the new stand-in the same one.
	mac map[int]net.HardwareAddr
}

// PFPCI returns the PF's PCI address.
func (f *Fixture) PFPCI() string { return pciAddr(f.cfg.Bus, 0, 0) }

// VFPCI returns VF i's PCI address.
func (f *Fixture) VFPCI(i int) string { return pciAddr(f.cfg.Bus, 2+i/8, i%8) }

// Root is the sysfs root to hand to Discover.
func (f *Fixture) Root() string { return f.root }

// Netdev returns VF i's netdev name as the tree shows it now ("" when none).
func (f *Fixture) Netdev(i int) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.netdev[i]
}

// IOMMUGroup returns the IOMMU group the fixture gives VF i when it is bound to vfio-pci.
func (f *Fixture) IOMMUGroup(i int) string { return strconv.Itoa(100 + i) }

func pciAddr(bus, dev, fn int) string { return fmt.Sprintf("0000:%02x:%02x.%x", bus, dev, fn) }

func (f *Fixture) vfio(i int) bool {
	for _, v := range f.cfg.VFIO {
		if v == i {
			return true
		}
	}
	return false
}

func (f *Fixture) devDir(pci string) string {
	return filepath.Join(f.root, "devices", "pci0000:00", pci)
}

// New lays out the tree and creates the stand-in netdevs. On error nothing is left behind.
func New(cfg Config) (_ *Fixture, err error) {
	if cfg.PF == "" || len(cfg.PF) > 15 {
		return nil, fmt.Errorf("sriovtest: bad pf name %q", cfg.PF)
	}
	if cfg.TotalVFs == 0 {
		cfg.TotalVFs = cfg.NumVFs
	}
	if cfg.NumVFs < 0 || cfg.NumVFs > 64 || cfg.TotalVFs < cfg.NumVFs {
		return nil, fmt.Errorf("sriovtest: bad vf counts %d/%d", cfg.NumVFs, cfg.TotalVFs)
	}
	if cfg.Bus < 0 || cfg.Bus > 0xff {
		return nil, fmt.Errorf("sriovtest: bad bus %d", cfg.Bus)
	}
	if cfg.Driver == "" {
		cfg.Driver = "iavf"
	}
	if cfg.NamePrefix == "" {
		cfg.NamePrefix = cfg.PF + "v"
	}
	if len(cfg.NamePrefix)+2 > 15 {
		return nil, fmt.Errorf("sriovtest: name prefix %q too long for interface names", cfg.NamePrefix)
	}
	root, err := os.MkdirTemp(cfg.Dir, "sriovsys-")
	if err != nil {
		return nil, fmt.Errorf("sriovtest: %w", err)
	}
	f := &Fixture{cfg: cfg, root: root, netdev: map[int]string{}, mac: map[int]net.HardwareAddr{}}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	if err := f.layout(); err != nil {
		return nil, fmt.Errorf("sriovtest: lay out tree: %w", err)
	}
	if cfg.Parent == "" {
		return f, nil
	}
	if cfg.NetNS == "" {
		f.h, err = netlink.NewHandle()
	} else {
		var n netns.NsHandle
		if n, err = netns.GetFromPath(cfg.NetNS); err == nil {
			f.h, err = netlink.NewHandleAt(n)
			n.Close()
		}
	}
	if err != nil {
		return nil, fmt.Errorf("sriovtest: netlink in %q: %w", cfg.NetNS, err)
	}
	parent, err := f.h.LinkByName(cfg.Parent)
	if err != nil {
		return nil, fmt.Errorf("sriovtest: parent %s: %w", cfg.Parent, err)
	}
	for i := 0; i < cfg.NumVFs; i++ {
		if f.vfio(i) {
			continue
		}
		if err := f.addStandIn(parent, i); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// layout writes the directories, attributes and links of the tree.
func (f *Fixture) layout() error {
	pf := f.PFPCI()
	pfDir := f.devDir(pf)
	steps := []func() error{
		func() error { return os.MkdirAll(filepath.Join(pfDir, "net", f.cfg.PF), 0o755) },
		func() error {
			return os.WriteFile(filepath.Join(pfDir, "sriov_numvfs"), []byte(fmt.Sprintf("%d\n", f.cfg.NumVFs)), 0o644)
		},
		func() error {
			return os.WriteFile(filepath.Join(pfDir, "sriov_totalvfs"), []byte(fmt.Sprintf("%d\n", f.cfg.TotalVFs)), 0o444)
		},
		func() error {
			return os.Symlink(filepath.Join("..", "..", "..", pf), filepath.Join(pfDir, "net", f.cfg.PF, "device"))
		},
		func() error { return f.driver(pfDir, "ice") },
		func() error { return os.MkdirAll(filepath.Join(f.root, "class", "net"), 0o755) },
		func() error {
			return os.Symlink(filepath.Join("..", "..", "devices", "pci0000:00", pf, "net", f.cfg.PF), filepath.Join(f.root, "class", "net", f.cfg.PF))
		},
		func() error { return f.busLink(pf) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	for i := 0; i < f.cfg.NumVFs; i++ {
		vf := f.VFPCI(i)
		vfDir := f.devDir(vf)
		if err := os.MkdirAll(vfDir, 0o755); err != nil {
			return err
		}
		if err := os.Symlink(filepath.Join("..", vf), filepath.Join(pfDir, fmt.Sprintf("virtfn%d", i))); err != nil {
			return err
		}
		if err := os.Symlink(filepath.Join("..", pf), filepath.Join(vfDir, "physfn")); err != nil {
			return err
		}
		if err := f.busLink(vf); err != nil {
			return err
		}
		drv := f.cfg.Driver
		if f.vfio(i) {
			drv = "vfio-pci"
			g := filepath.Join(f.root, "kernel", "iommu_groups", f.IOMMUGroup(i))
			if err := os.MkdirAll(g, 0o755); err != nil {
				return err
			}
			if err := os.Symlink(filepath.Join("..", "..", "..", "kernel", "iommu_groups", f.IOMMUGroup(i)), filepath.Join(vfDir, "iommu_group")); err != nil {
				return err
			}
		}
		if err := f.driver(vfDir, drv); err != nil {
			return err
		}
		if !f.vfio(i) {
			if err := f.setNet(i, f.name(i)); err != nil {
				return err
			}
		}
	}
	return nil
}

// name is VF i's netdev name as the fixture first makes it.
func (f *Fixture) name(i int) string { return fmt.Sprintf("%s%d", f.cfg.NamePrefix, i) }

// driver binds the device at dir to driver name: dir/driver -> bus/pci/drivers/<name>.
func (f *Fixture) driver(dir, name string) error {
	if err := os.MkdirAll(filepath.Join(f.root, "bus", "pci", "drivers", name), 0o755); err != nil {
		return err
	}
	return os.Symlink(filepath.Join("..", "..", "..", "bus", "pci", "drivers", name), filepath.Join(dir, "driver"))
}

func (f *Fixture) busLink(pci string) error {
	d := filepath.Join(f.root, "bus", "pci", "devices")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return err
	}
	return os.Symlink(filepath.Join("..", "..", "..", "devices", "pci0000:00", pci), filepath.Join(d, pci))
}

// addStandIn creates VF i's macvlan (or keeps one left by an earlier run with the same
// alias: idempotent) and records its name in the tree.
func (f *Fixture) addStandIn(parent netlink.Link, i int) error {
	name := f.name(i)
	alias := aliasPrefix + f.VFPCI(i)
	if l, err := f.h.LinkByName(name); err == nil {
		if l.Attrs().Alias != alias {
			return fmt.Errorf("sriovtest: %s exists and is not vf %d's stand-in", name, i)
		}
	} else {
		mv := &netlink.Macvlan{
			LinkAttrs: netlink.LinkAttrs{Name: name, ParentIndex: parent.Attrs().Index},
			Mode:      netlink.MACVLAN_MODE_BRIDGE,
		}
		if err := f.h.LinkAdd(mv); err != nil {
			return fmt.Errorf("sriovtest: add macvlan %s on %s: %w", name, f.cfg.Parent, err)
		}
		f.mu.Lock()
		f.made = append(f.made, name) // so Close removes it even if the alias fails
		f.mu.Unlock()
		if err := f.h.LinkSetAlias(mv, alias); err != nil {
			return fmt.Errorf("sriovtest: alias %s: %w", name, err)
		}
	}
	l, err := f.h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("sriovtest: find %s: %w", name, err)
	}
	f.mu.Lock()
	f.mac[i] = append(net.HardwareAddr(nil), l.Attrs().HardwareAddr...)
	f.mu.Unlock()
	return f.setNet(i, name)
}

// MAC returns the MAC VF i's stand-in was made with (nil for a vfio VF).
func (f *Fixture) MAC(i int) net.HardwareAddr {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append(net.HardwareAddr(nil), f.mac[i]...)
}

// Revive stands in for the kernel handing a physical VF back to the host when the
// namespace holding it dies: a macvlan stand-in dies with that namespace instead, so Revive
// makes VF i's stand-in again in the fixture's namespace under name, with the VF's first MAC
// and its alias, and records it in the tree. A stand-in of VF i still alive anywhere the
// fixture can see (its namespace) is an error: the VF cannot be in two places.
func (f *Fixture) Revive(i int, name string) error {
	if f.h == nil || i < 0 || i >= f.cfg.NumVFs || f.vfio(i) {
		return fmt.Errorf("sriovtest: vf %d has no stand-in to revive", i)
	}
	if len(name) == 0 || len(name) > 15 || filepath.Base(name) != name {
		return fmt.Errorf("sriovtest: bad interface name %q", name)
	}
	alias := aliasPrefix + f.VFPCI(i)
	links, err := f.listLinks()
	if err != nil {
		return fmt.Errorf("sriovtest: list links: %w", err)
	}
	for _, l := range links {
		if l.Attrs().Alias == alias {
			return fmt.Errorf("sriovtest: vf %d is still in the namespace as %s", i, l.Attrs().Name)
		}
	}
	parent, err := f.h.LinkByName(f.cfg.Parent)
	if err != nil {
		return fmt.Errorf("sriovtest: parent %s: %w", f.cfg.Parent, err)
	}
	mv := &netlink.Macvlan{
		LinkAttrs: netlink.LinkAttrs{Name: name, ParentIndex: parent.Attrs().Index, HardwareAddr: f.MAC(i)},
		Mode:      netlink.MACVLAN_MODE_BRIDGE,
	}
	if err := f.h.LinkAdd(mv); err != nil {
		return fmt.Errorf("sriovtest: revive vf %d as %s: %w", i, name, err)
	}
	if err := f.h.LinkSetAlias(mv, alias); err != nil {
		f.h.LinkDel(mv)
		return fmt.Errorf("sriovtest: alias %s: %w", name, err)
	}
	return f.setNet(i, name)
}

// setNet makes VF i's net/ directory hold exactly name (nothing when name is ""). A rename
// is one rename(2) of the entry, so a concurrent Discover sees the old name or the new one.
func (f *Fixture) setNet(i int, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	netDir := filepath.Join(f.devDir(f.VFPCI(i)), "net")
	entries, err := os.ReadDir(netDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	switch {
	case len(entries) == 1 && entries[0].Name() == name:
	case len(entries) == 1 && name != "":
		if err := os.Rename(filepath.Join(netDir, entries[0].Name()), filepath.Join(netDir, name)); err != nil {
			return err
		}
	default:
		if err := os.RemoveAll(netDir); err != nil {
			return err
		}
		if name != "" {
			if err := os.MkdirAll(filepath.Join(netDir, name), 0o755); err != nil {
				return err
			}
		}
	}
	f.netdev[i] = name
	return nil
}

// Rename records that VF i's netdev is now called name in the host namespace ("" = it
// left). Real sysfs renames net/<ifname> by itself; the fixture's tree is plain files, so
// code that renames or moves a stand-in calls this (or Refresh) to keep the tree in step.
func (f *Fixture) Rename(i int, name string) error {
	if i < 0 || i >= f.cfg.NumVFs || f.vfio(i) {
		return fmt.Errorf("sriovtest: vf %d has no netdev", i)
	}
	if name != "" && (len(name) > 15 || filepath.Base(name) != name || name == "." || name == "..") {
		return fmt.Errorf("sriovtest: bad interface name %q", name)
	}
	return f.setNet(i, name)
}

// VFOfAlias returns the index of the VF whose stand-in carries alias (every stand-in has one
// naming its VF), so a watcher of link events can call Rename with the event's name.
func (f *Fixture) VFOfAlias(alias string) (int, bool) {
	pci, ok := strings.CutPrefix(alias, aliasPrefix)
	if !ok {
		return 0, false
	}
	for i := 0; i < f.cfg.NumVFs; i++ {
		if f.VFPCI(i) == pci && !f.vfio(i) {
			return i, true
		}
	}
	return 0, false
}

// Refresh re-reads the fixture's namespace and sets each netdev-bound VF's net/<ifname> to
// its stand-in's current name there, or to nothing when the stand-in is elsewhere (moved
// into a container). The kernel keeps real sysfs current by itself; this is the fixture's
// stand-in for that.
func (f *Fixture) Refresh() error {
	if f.h == nil {
		return nil
	}
	links, err := f.listLinks()
	if err != nil {
		return fmt.Errorf("sriovtest: list links: %w", err)
	}
	byAlias := map[string]string{}
	for _, l := range links {
		byAlias[l.Attrs().Alias] = l.Attrs().Name
	}
	for i := 0; i < f.cfg.NumVFs; i++ {
		if f.vfio(i) {
			continue
		}
		if err := f.setNet(i, byAlias[aliasPrefix+f.VFPCI(i)]); err != nil {
			return fmt.Errorf("sriovtest: refresh vf %d: %w", i, err)
		}
	}
	return nil
}

// listLinks lists the namespace's links, again when the kernel says the dump was
// interrupted by a change (links moving while a peer attaches): a partial list would make a
// stand-in look gone.
func (f *Fixture) listLinks() ([]netlink.Link, error) {
	var err error
	for range 10 {
		var links []netlink.Link
		if links, err = f.h.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
	}
	return nil, err
}

// Close deletes the stand-ins still in the fixture's namespace and removes the tree; safe
// twice. A stand-in moved into another namespace goes when that namespace is deleted.
func (f *Fixture) Close() error {
	var errs []error
	if f.h != nil {
		if links, err := f.listLinks(); err == nil {
			for _, l := range links {
				a := l.Attrs().Alias
				if len(a) > len(aliasPrefix) && a[:len(aliasPrefix)] == aliasPrefix && f.owns(a[len(aliasPrefix):]) {
					if err := f.h.LinkDel(l); err != nil {
						errs = append(errs, fmt.Errorf("delete %s: %w", l.Attrs().Name, err))
					}
				}
			}
		}
		// Stand-ins made but not yet aliased (a failed New) are found by name.
		f.mu.Lock()
		for _, name := range f.made {
			if l, err := f.h.LinkByName(name); err == nil && l.Attrs().Alias == "" {
				if err := f.h.LinkDel(l); err != nil {
					errs = append(errs, fmt.Errorf("delete %s: %w", name, err))
				}
			}
		}
		f.made = nil
		f.mu.Unlock()
		f.h.Close()
		f.h = nil
	}
	if err := os.RemoveAll(f.root); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (f *Fixture) owns(pci string) bool {
	for i := 0; i < f.cfg.NumVFs; i++ {
		if f.VFPCI(i) == pci {
			return true
		}
	}
	return false
}

// NewTest is New for a test: it fails the test on error and closes the fixture in Cleanup.
func NewTest(t testing.TB, cfg Config) *Fixture {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	f, err := New(cfg)
	if err != nil {
		t.Fatalf("sriov fixture: %v", err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("close sriov fixture: %v", err)
		}
	})
	return f
}
