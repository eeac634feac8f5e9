package sriov

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// DefaultSysfsRoot is where the kernel mounts sysfs; tests point the root at a fixture tree.
const DefaultSysfsRoot = "/sys"

// MaxVFs bounds the VFs read from one PF: PCIe allows more, but no NIC weft knows of
// exposes over 256, and a hostile tree must not make discovery unbounded.
const MaxVFs = 256

var (
	// ErrSysfs is a sysfs tree that cannot be read as SR-IOV state: missing files, garbage
	// numbers, links that leave the root, contradictions.
	ErrSysfs = errors.New("bad sysfs tree")
	// ErrNotSRIOV is a netdev whose device has no SR-IOV capability (no sriov_totalvfs).
	ErrNotSRIOV = errors.New("not an sr-iov physical function")
	// ErrNoVF is a PCI address that is not a VF under the root.
	ErrNoVF = errors.New("no such virtual function")
)

// PFInfo is one physical function and its VFs as sysfs shows them.
type PFInfo struct {
	Name     string // the PF's netdev name
	PCI      string // the PF's PCI address
	NumVFs   int    // sriov_numvfs: VFs enabled now
	TotalVFs int    // sriov_totalvfs: VFs the device can enable
	VFs      []VF   // ordered by Index, len(VFs) == NumVFs
}

var (
	pciAddrRE = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)
	virtfnRE  = regexp.MustCompile(`^virtfn([0-9]+)$`)
)

// sysfs reads one tree; every path it follows is resolved and must stay under root.
type sysfs struct {
	root string // absolute, symlinks resolved
}

func openSysfs(root string) (sysfs, error) {
	if root == "" {
		root = DefaultSysfsRoot
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return sysfs{}, fmt.Errorf("%w: sysfs root %s: %v", ErrSysfs, root, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return sysfs{}, fmt.Errorf("%w: sysfs root %s: %v", ErrSysfs, root, err)
	}
	return sysfs{root: real}, nil
}

// resolve follows the symlinks of p and checks that the result stays under the root: a
// link such as virtfn0 -> /etc must not make weft read, or later act on, something else.
func (s sysfs) resolve(p string) (string, error) {
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(s.root, real)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("%w: %s leads to %s, outside the sysfs root %s", ErrSysfs, p, real, s.root)
	}
	return real, nil
}

// readInt reads a small decimal sysfs attribute in [0, MaxVFs]. It must be a regular file
// under the root (a FIFO would block discovery, a device could be anything) and the read is
// bounded so a huge file cannot exhaust memory.
func (s sysfs) readInt(p string) (int, error) {
	real, err := s.resolve(p)
	if err != nil {
		if errors.Is(err, ErrSysfs) {
			return 0, err
		}
		return 0, fmt.Errorf("%w: read %s: %v", ErrSysfs, p, err)
	}
	if st, err := os.Stat(real); err != nil || !st.Mode().IsRegular() {
		return 0, fmt.Errorf("%w: %s is not a regular file", ErrSysfs, p)
	}
	f, err := os.OpenFile(real, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return 0, fmt.Errorf("%w: read %s: %v", ErrSysfs, p, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 32))
	if err != nil {
		return 0, fmt.Errorf("%w: read %s: %v", ErrSysfs, p, err)
	}
	text := strings.TrimSpace(string(b))
	n, err := strconv.Atoi(text)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: %s holds %q, not a count", ErrSysfs, p, text)
	}
	if n > MaxVFs {
		return 0, fmt.Errorf("%w: %s holds %d, more than %d VFs", ErrSysfs, p, n, MaxVFs)
	}
	return n, nil
}

// validIfname reports whether name can be a Linux interface name (IFNAMSIZ 16 with NUL).
func validIfname(name string) bool {
	return name != "" && len(name) <= 15 && name != "." && name != ".." &&
		!strings.ContainsAny(name, "/ \t\n:")
}

// Discover reads the PF pf and its VFs under the sysfs root ("" means /sys):
// class/net/<pf>/device/{sriov_numvfs,sriov_totalvfs,virtfnN}, and for each VF its
// driver, iommu_group and net/<ifname>. O(VFs) directory reads.
func Discover(root, pf string) (PFInfo, error) {
	s, err := openSysfs(root)
	if err != nil {
		return PFInfo{}, err
	}
	return s.discover(pf)
}

func (s sysfs) discover(pf string) (PFInfo, error) {
	if !validIfname(pf) {
		return PFInfo{}, fmt.Errorf("%w: bad pf name %q", ErrSysfs, pf)
	}
	devLink := filepath.Join(s.root, "class", "net", pf, "device")
	dev, err := s.resolve(devLink)
	if err != nil {
		if errors.Is(err, ErrSysfs) {
			return PFInfo{}, err
		}
		return PFInfo{}, fmt.Errorf("%w: pf %s: %s: %v", ErrSysfs, pf, devLink, err)
	}
	info := PFInfo{Name: pf, PCI: filepath.Base(dev)}
	if !pciAddrRE.MatchString(info.PCI) {
		return PFInfo{}, fmt.Errorf("%w: %s leads to %s, not a pci address", ErrSysfs, devLink, info.PCI)
	}
	totalPath := filepath.Join(dev, "sriov_totalvfs")
	if _, err := os.Lstat(totalPath); errors.Is(err, os.ErrNotExist) {
		return PFInfo{}, fmt.Errorf("%w: pf %s: no %s", ErrNotSRIOV, pf, totalPath)
	}
	if info.TotalVFs, err = s.readInt(totalPath); err != nil {
		return PFInfo{}, err
	}
	numPath := filepath.Join(dev, "sriov_numvfs")
	if info.NumVFs, err = s.readInt(numPath); err != nil {
		return PFInfo{}, err
	}
	if info.NumVFs > info.TotalVFs {
		return PFInfo{}, fmt.Errorf("%w: %s is %d, more than sriov_totalvfs %d", ErrSysfs, numPath, info.NumVFs, info.TotalVFs)
	}

	entries, err := os.ReadDir(dev)
	if err != nil {
		return PFInfo{}, fmt.Errorf("%w: read %s: %v", ErrSysfs, dev, err)
	}
	links := map[int]string{}
	for _, e := range entries {
		m := virtfnRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		idx, err := strconv.Atoi(m[1])
		if err != nil || idx >= info.NumVFs {
			return PFInfo{}, fmt.Errorf("%w: %s: index beyond sriov_numvfs %d", ErrSysfs, filepath.Join(dev, e.Name()), info.NumVFs)
		}
		if _, dup := links[idx]; dup {
			// virtfn1 and virtfn01 parse alike; the kernel never writes leading zeros.
			return PFInfo{}, fmt.Errorf("%w: %s: index %d appears twice", ErrSysfs, filepath.Join(dev, e.Name()), idx)
		}
		links[idx] = filepath.Join(dev, e.Name())
	}
	if len(links) != info.NumVFs {
		return PFInfo{}, fmt.Errorf("%w: %s: sriov_numvfs is %d but %d virtfn links exist", ErrSysfs, dev, info.NumVFs, len(links))
	}
	info.VFs = make([]VF, 0, info.NumVFs)
	seen := map[string]string{} // VF PCI address -> its virtfn link
	for idx := 0; idx < info.NumVFs; idx++ {
		link := links[idx]
		vfDir, err := s.resolve(link)
		if err != nil {
			if errors.Is(err, ErrSysfs) {
				return PFInfo{}, err
			}
			return PFInfo{}, fmt.Errorf("%w: %s: %v", ErrSysfs, link, err)
		}
		vf, err := s.readVF(vfDir)
		if err != nil {
			return PFInfo{}, err
		}
		if other, dup := seen[vf.PCI]; dup {
			return PFInfo{}, fmt.Errorf("%w: %s and %s lead to the same vf %s", ErrSysfs, other, link, vf.PCI)
		}
		seen[vf.PCI] = link
		vf.PF, vf.Index = pf, idx
		info.VFs = append(info.VFs, vf)
	}
	return info, nil
}

// readVF reads a VF's PCI device directory (resolved): its address, driver, IOMMU group and
// netdev. PF and Index are left to the caller.
func (s sysfs) readVF(dir string) (VF, error) {
	vf := VF{PCI: filepath.Base(dir)}
	if !pciAddrRE.MatchString(vf.PCI) {
		return VF{}, fmt.Errorf("%w: %s is not named by a pci address", ErrSysfs, dir)
	}
	var err error
	if vf.Driver, err = s.linkBase(filepath.Join(dir, "driver")); err != nil {
		return VF{}, err
	}
	if vf.IOMMUGroup, err = s.linkBase(filepath.Join(dir, "iommu_group")); err != nil {
		return VF{}, err
	}
	if vf.IOMMUGroup != "" {
		if _, err := strconv.ParseUint(vf.IOMMUGroup, 10, 32); err != nil {
			return VF{}, fmt.Errorf("%w: %s leads to %q, not a group number", ErrSysfs, filepath.Join(dir, "iommu_group"), vf.IOMMUGroup)
		}
	}
	netDir := filepath.Join(dir, "net")
	names, err := os.ReadDir(netDir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		// No netdev on the host: a userspace driver, unbound, or moved into a container.
	case err != nil:
		return VF{}, fmt.Errorf("%w: read %s: %v", ErrSysfs, netDir, err)
	case len(names) > 1:
		// sriov-cni takes the first name here; picking one at random could hand out the
		// wrong netdev, so weft refuses the VF instead.
		return VF{}, fmt.Errorf("%w: %s holds %d netdevs, a vf has at most one", ErrSysfs, netDir, len(names))
	case len(names) == 1:
		if !validIfname(names[0].Name()) {
			return VF{}, fmt.Errorf("%w: %s holds %q, not an interface name", ErrSysfs, netDir, names[0].Name())
		}
		vf.Netdev = names[0].Name()
	}
	return vf, nil
}

// linkBase returns the basename of the symlink p's target, "" when p does not exist. The
// target must resolve inside the root.
func (s sysfs) linkBase(p string) (string, error) {
	if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	real, err := s.resolve(p)
	if err != nil {
		if errors.Is(err, ErrSysfs) {
			return "", err
		}
		return "", fmt.Errorf("%w: %s: %v", ErrSysfs, p, err)
	}
	return filepath.Base(real), nil
}

// FindVF re-reads the VF at PCI address pci under the root ("" means /sys), e.g. to see
// whether its netdev came back to the host namespace. It follows bus/pci/devices/<pci>, the
// VF's physfn link to its PF, and the PF's virtfnN links for the index.
func FindVF(root, pci string) (VF, error) {
	if !pciAddrRE.MatchString(pci) {
		return VF{}, fmt.Errorf("%w: bad pci address %q", ErrNoVF, pci)
	}
	s, err := openSysfs(root)
	if err != nil {
		return VF{}, err
	}
	devLink := filepath.Join(s.root, "bus", "pci", "devices", pci)
	if _, err := os.Lstat(devLink); errors.Is(err, os.ErrNotExist) {
		return VF{}, fmt.Errorf("%w: %s: no %s", ErrNoVF, pci, devLink)
	}
	dir, err := s.resolve(devLink)
	if err != nil {
		if errors.Is(err, ErrSysfs) {
			return VF{}, err
		}
		return VF{}, fmt.Errorf("%w: %s: %v", ErrSysfs, devLink, err)
	}
	physfn := filepath.Join(dir, "physfn")
	if _, err := os.Lstat(physfn); errors.Is(err, os.ErrNotExist) {
		return VF{}, fmt.Errorf("%w: %s: no %s, not a vf", ErrNoVF, pci, physfn)
	}
	pfDir, err := s.resolve(physfn)
	if err != nil {
		if errors.Is(err, ErrSysfs) {
			return VF{}, err
		}
		return VF{}, fmt.Errorf("%w: %s: %v", ErrSysfs, physfn, err)
	}
	vf, err := s.readVF(dir)
	if err != nil {
		return VF{}, err
	}
	// The PF's netdev name: the single entry of its net/ directory.
	pfNet := filepath.Join(pfDir, "net")
	names, err := os.ReadDir(pfNet)
	if err != nil {
		return VF{}, fmt.Errorf("%w: read %s: %v", ErrSysfs, pfNet, err)
	}
	if len(names) != 1 || !validIfname(names[0].Name()) {
		return VF{}, fmt.Errorf("%w: %s should hold the pf's one netdev, holds %d entries", ErrSysfs, pfNet, len(names))
	}
	vf.PF = names[0].Name()
	entries, err := os.ReadDir(pfDir)
	if err != nil {
		return VF{}, fmt.Errorf("%w: read %s: %v", ErrSysfs, pfDir, err)
	}
	for _, e := range entries {
		m := virtfnRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		link := filepath.Join(pfDir, e.Name())
		target, err := s.resolve(link)
		if err != nil || target != dir {
			continue // another VF's link, or a broken one: not this VF's index
		}
		idx, err := strconv.Atoi(m[1])
		if err != nil || idx >= MaxVFs {
			return VF{}, fmt.Errorf("%w: %s: bad index", ErrSysfs, link)
		}
		vf.Index = idx
		return vf, nil
	}
	return VF{}, fmt.Errorf("%w: %s: no virtfn link of pf %s leads to it", ErrSysfs, pci, vf.PF)
}

// ListPFs discovers the named PFs under the root ("" means /sys), in the order given; with
// no names it lists every netdev in class/net whose device has sriov_totalvfs, by name.
func ListPFs(root string, names []string) ([]PFInfo, error) {
	s, err := openSysfs(root)
	if err != nil {
		return nil, err
	}
	if len(names) == 0 {
		classNet := filepath.Join(s.root, "class", "net")
		entries, err := os.ReadDir(classNet)
		if err != nil {
			return nil, fmt.Errorf("%w: read %s: %v", ErrSysfs, classNet, err)
		}
		for _, e := range entries {
			if _, err := os.Stat(filepath.Join(classNet, e.Name(), "device", "sriov_totalvfs")); err == nil {
				names = append(names, e.Name())
			}
		}
		sort.Strings(names)
	}
	out := make([]PFInfo, 0, len(names))
	for _, n := range names {
		info, err := s.discover(n)
		if err != nil {
			return nil, err
		}
		out = append(out, info)
	}
	return out, nil
}
