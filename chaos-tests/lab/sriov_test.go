package lab

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/datapath/sriov"
)

// The stand-in NIC: the peer gets --sysfs-root, discovery finds the PF's VFs (one bound to
// vfio-pci), the stand-ins hang off each host's eth0, the tree follows a VF moved into a
// container, and VFs moved into containers on two hosts reach each other over the lab's L2.
func TestLabSRIOV(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("lab tests need root (network namespaces)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := New(ctx, Config{Prefix: "wslself", Hosts: 2, BinDir: fakeBinDir(t),
		SRIOV: &SRIOVConfig{VFs: 2, VFIO: 1, RefreshInterval: time.Hour}}) // link events alone keep the tree
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if _, err := New(ctx, Config{Prefix: "wslbad", Hosts: 1, BinDir: fakeBinDir(t), SRIOV: &SRIOVConfig{}}); err == nil {
		t.Fatal("a lab with 0 VFs per host was made")
	}

	var ctrAddr []string
	var ctrs []*Container
	for i, h := range l.Hosts() {
		f := h.SRIOV()
		if f == nil {
			t.Fatalf("%s has no stand-in NIC", h.Name)
		}
		args := h.PeerArgs()
		if k := slices.Index(args, "--sysfs-root"); k < 0 || args[k+1] != f.Root() {
			t.Fatalf("peer args %v lack --sysfs-root %s", args, f.Root())
		}
		if !slices.Contains(args, "--sriov-pf-config=record") || !slices.Contains(args, h.DeviceInfoDir()) {
			t.Fatalf("peer args %v lack the recording pf or the device-info dir", args)
		}
		info, err := sriov.Discover(f.Root(), "wslselfpf0")
		if err != nil {
			t.Fatal(err)
		}
		if len(info.VFs) != 3 || !info.VFs[2].DPDK() || info.VFs[2].IOMMUGroup == "" || info.VFs[2].Netdev != "" {
			t.Fatalf("%s: discovered %+v, want 2 netdev vfs and a vfio one", h.Name, info.VFs)
		}
		link, err := h.Link(info.VFs[0].Netdev)
		if err != nil {
			t.Fatal(err)
		}
		eth0, err := h.Link("eth0")
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := link.(*netlink.Macvlan); !ok || link.Attrs().ParentIndex != eth0.Attrs().Index {
			t.Fatalf("%s: %s is %T on parent %d, want a macvlan on eth0 (%d)", h.Name, link.Attrs().Name, link, link.Attrs().ParentIndex, eth0.Attrs().Index)
		}

		// Into a container by hand, as a plugin would, and the tree follows.
		c, err := h.NewContainer()
		if err != nil {
			t.Fatal(err)
		}
		ctrs = append(ctrs, c)
		addr := fmt.Sprintf("10.88.0.%d/24", 10+i)
		ctrAddr = append(ctrAddr, addr[:len(addr)-3])
		name := info.VFs[0].Netdev
		if out, err := h.Exec(ctx, "ip", "link", "set", name, "netns", c.Name); err != nil {
			t.Fatalf("move %s: %v %s", name, err, out)
		}
		for _, cmd := range [][]string{{"ip", "link", "set", name, "name", "net1"}, {"ip", "addr", "add", addr, "dev", "net1"}, {"ip", "link", "set", "net1", "up"}} {
			if out, err := c.Exec(ctx, cmd[0], cmd[1:]...); err != nil {
				t.Fatalf("%v: %v %s", cmd, err, out)
			}
		}
		nslab.Eventually(t, 5*time.Second, "tree drops the moved vf", func() error {
			vf, err := sriov.FindVF(f.Root(), f.VFPCI(0))
			if err != nil || vf.Netdev != "" {
				return fmt.Errorf("vf 0: %+v, %v", vf, err)
			}
			return nil
		})
	}
	if err := Poll(ctx, 100*time.Millisecond, func() error {
		_, err := ctrs[0].Exec(ctx, "ping", "-c", "1", "-W", "1", ctrAddr[1])
		return err
	}); err != nil {
		t.Fatalf("stand-in vfs on two hosts do not reach each other: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}
