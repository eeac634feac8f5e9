package sriov

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// DefaultDeviceInfoDir is where CNI plugins put device-info files: the "cni" subdirectory of
// the Network Plumbing WG base /var/run/k8s.cni.cncf.io/devinfo (device plugins use "dp").
// See k8snetworkplumbingwg/network-attachment-definition-client pkg/utils/net-attach-def.go
// (baseDevInfoPath, cniDevInfoSubDir, GetCNIDeviceInfoPath).
const DefaultDeviceInfoDir = "/var/run/k8s.cni.cncf.io/devinfo/cni"

// DeviceInfoVersion is the version of the "Device Information Specification" written.
const DeviceInfoVersion = "1.1.0"

// ErrDeviceInfo is a device-info request or file that is not valid.
var ErrDeviceInfo = errors.New("bad device info")

// DeviceInfo is the Network Plumbing WG device-info document for a PCI device; the member
// names follow the spec and the reference type (network-attachment-definition-client
// pkg/apis/k8s.cni.cncf.io/v1/types.go, DeviceInfo and PciDevice).
type DeviceInfo struct {
	Type    string     `json:"type"` // "pci"
	Version string     `json:"version"`
	PCI     *PCIDevice `json:"pci,omitempty"`
}

// PCIDevice is the "pci" member of a device-info document.
type PCIDevice struct {
	PCIAddress string `json:"pci-address"`
	// PFPCIAddress is the parent PF's address; optional in the spec.
	PFPCIAddress string `json:"pf-pci-address,omitempty"`
}

// DeviceInfoFiles writes, reads and removes device-info files under one directory.
type DeviceInfoFiles struct {
	Dir string // "" means DefaultDeviceInfoDir
}

func (d DeviceInfoFiles) dir() string {
	if d.Dir == "" {
		return DefaultDeviceInfoDir
	}
	return d.Dir
}

// Path returns the file for one attachment: <networkName>-<containerID>-<ifName>-device.json.
// The spec leaves the CNI file name to the caller (GetCNIDeviceInfoPath takes a free name;
// Multus, when it picks one, uses "<network>-<containerID>_<ifName>"); this form mirrors the
// device plugin's "<resource>-<deviceID>-device.json". "/" becomes "-" as in
// GetCNIDeviceInfoPath, so a namespaced network name stays in the directory.
func (d DeviceInfoFiles) Path(networkName, containerID, ifName string) (string, error) {
	for _, p := range [][2]string{{"network name", networkName}, {"container id", containerID}, {"interface name", ifName}} {
		if v := p[1]; v == "" || strings.ContainsAny(v, "\x00\n") || v == "." || v == ".." {
			return "", fmt.Errorf("%w: %s %q", ErrDeviceInfo, p[0], v)
		}
	}
	name := strings.ReplaceAll(fmt.Sprintf("%s-%s-%s-device.json", networkName, containerID, ifName), "/", "-")
	if len(name) > 255 {
		return "", fmt.Errorf("%w: file name %d bytes long, over 255", ErrDeviceInfo, len(name))
	}
	return filepath.Join(d.dir(), name), nil
}

// Write writes the device-info file for a VF at PCI address pci, atomically: a temporary
// file in the same directory, synced, then renamed over the final name, so a reader (the
// DPDK app) sees the whole old file, the whole new one, or none. Writing again replaces it.
func (d DeviceInfoFiles) Write(networkName, containerID, ifName, pci, pfPCI string) (string, error) {
	if !pciAddrRE.MatchString(pci) {
		return "", fmt.Errorf("%w: vf pci address %q", ErrDeviceInfo, pci)
	}
	if pfPCI != "" && !pciAddrRE.MatchString(pfPCI) {
		return "", fmt.Errorf("%w: pf pci address %q", ErrDeviceInfo, pfPCI)
	}
	path, err := d.Path(networkName, containerID, ifName)
	if err != nil {
		return "", err
	}
	doc, err := json.Marshal(DeviceInfo{Type: "pci", Version: DeviceInfoVersion, PCI: &PCIDevice{PCIAddress: pci, PFPCIAddress: pfPCI}})
	if err != nil {
		return "", fmt.Errorf("encode device info: %w", err)
	}
	if err := os.MkdirAll(d.dir(), 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", d.dir(), err)
	}
	tmp, err := os.CreateTemp(d.dir(), ".tmp-*")
	if err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	// 0444 like the reference implementation: readers in the pod, nobody edits it.
	if err := tmp.Chmod(0o444); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(doc); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	return path, nil
}

// Read reads and checks the device-info file of one attachment. A missing file is an error
// wrapping os.ErrNotExist.
func (d DeviceInfoFiles) Read(networkName, containerID, ifName string) (DeviceInfo, error) {
	path, err := d.Path(networkName, containerID, ifName)
	if err != nil {
		return DeviceInfo{}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return DeviceInfo{}, fmt.Errorf("read device info: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return DeviceInfo{}, fmt.Errorf("read %s: %w", path, err)
	}
	var di DeviceInfo
	if err := json.Unmarshal(b, &di); err != nil {
		return DeviceInfo{}, fmt.Errorf("%w: %s: %v", ErrDeviceInfo, path, err)
	}
	if di.Type != "pci" || di.PCI == nil || !pciAddrRE.MatchString(di.PCI.PCIAddress) {
		return DeviceInfo{}, fmt.Errorf("%w: %s: not a pci device info with a pci address", ErrDeviceInfo, path)
	}
	return di, nil
}

// Remove deletes the device-info file of one attachment; a file already gone is success.
func (d DeviceInfoFiles) Remove(networkName, containerID, ifName string) error {
	path, err := d.Path(networkName, containerID, ifName)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}
