package sriovtest_test

import (
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/datapath/sriov"
	"github.com/weftnet/weft/datapath/sriov/sriovtest"
)

// testNS creates a named namespace wsj-<pid>-<suffix>, deleted in Cleanup, and a netlink
// handle in it.
func testNS(t testing.TB, suffix string) (string, *netlink.Handle) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	name := fmt.Sprintf("wsj-%d-%s", os.Getpid(), suffix)
	path, err := nslab.CreateNetNS(name)
	if err != nil {
		t.Fatal(err)
	}
	h, err := nslab.HandleAt(path)
	if err != nil {
		nslab.DeleteNetNS(name)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.Close()
		if err := nslab.DeleteNetNS(name); err != nil {
			t.Errorf("delete %s: %v", name, err)
		}
	})
	return path, h
}

func moveTo(t *testing.T, from *netlink.Handle, name, nsPath string) {
	t.Helper()
	l, err := from.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	n, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := from.LinkSetNsFd(l, int(n)); err != nil {
		t.Fatalf("move %s to %s: %v", name, nsPath, err)
	}
}

func TestStandInsFoundByDiscover(t *testing.T) {
	hostPath, host := testNS(t, "host")
	ctrPath, ctr := testNS(t, "ctr")
	if _, err := nslab.AddBridge(host, "wsjbr0", 1500); err != nil {
		t.Fatal(err)
	}
	f, err := sriovtest.New(sriovtest.Config{
		Dir: t.TempDir(), PF: "wsjpf0", Bus: 0x3b, NumVFs: 4, VFIO: []int{3},
		Parent: "wsjbr0", NetNS: hostPath,
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			f.Close()
		}
	})

	info, err := sriov.Discover(f.Root(), "wsjpf0")
	if err != nil {
		t.Fatal(err)
	}
	if len(info.VFs) != 4 {
		t.Fatalf("Discover found %d VFs, want 4", len(info.VFs))
	}
	for _, vf := range info.VFs[:3] {
		l, err := host.LinkByName(vf.Netdev)
		if err != nil {
			t.Fatalf("vf %d: netdev %q from sysfs is not a real link: %v", vf.Index, vf.Netdev, err)
		}
		mv, ok := l.(*netlink.Macvlan)
		if !ok || mv.Mode != netlink.MACVLAN_MODE_BRIDGE {
			t.Fatalf("vf %d: %s is %T, want a bridge-mode macvlan", vf.Index, vf.Netdev, l)
		}
	}
	if vf := info.VFs[3]; vf.Netdev != "" || vf.Driver != "vfio-pci" || vf.IOMMUGroup == "" {
		t.Fatalf("vfio vf: %+v, want no netdev and an iommu group", vf)
	}
	if _, err := host.LinkByName("wsjpf0v3"); err == nil {
		t.Fatal("the vfio-bound vf has a netdev")
	}

	// Into a "container": the tree loses the netdev, as real sysfs would.
	moveTo(t, host, "wsjpf0v1", ctrPath)
	if err := f.Refresh(); err != nil {
		t.Fatal(err)
	}
	if vf, err := sriov.FindVF(f.Root(), f.VFPCI(1)); err != nil || vf.Netdev != "" {
		t.Fatalf("after the move out: %+v, %v; want no host netdev", vf, err)
	}
	// Back under another name: the tree follows the stand-in.
	l, err := ctr.LinkByName("wsjpf0v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := ctr.LinkSetName(l, "wsjback1"); err != nil {
		t.Fatal(err)
	}
	moveTo(t, ctr, "wsjback1", hostPath)
	if err := f.Refresh(); err != nil {
		t.Fatal(err)
	}
	if vf, err := sriov.FindVF(f.Root(), f.VFPCI(1)); err != nil || vf.Netdev != "wsjback1" || vf.Index != 1 {
		t.Fatalf("after the move back: %+v, %v; want wsjback1", vf, err)
	}
	if got := f.Netdev(1); got != "wsjback1" {
		t.Fatalf("Netdev(1) = %q", got)
	}

	root := f.Root()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if err := f.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	for _, name := range []string{"wsjpf0v0", "wsjback1", "wsjpf0v2"} {
		if _, err := host.LinkByName(name); err == nil {
			t.Errorf("%s survives Close", name)
		}
	}
	if _, err := host.LinkByName("wsjbr0"); err != nil {
		t.Errorf("Close removed the parent: %v", err)
	}
	if _, err := os.Stat(root); !os.IsNotExist(err) {
		t.Errorf("tree %s survives Close: %v", root, err)
	}
}

func TestNewRefusesForeignLinkAndLeavesNothing(t *testing.T) {
	hostPath, host := testNS(t, "foreign")
	if _, err := nslab.AddBridge(host, "wsjbr0", 1500); err != nil {
		t.Fatal(err)
	}
	// Someone else's link holds VF 1's name.
	if _, err := nslab.AddBridge(host, "wsjpf0v1", 1500); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, err := sriovtest.New(sriovtest.Config{Dir: dir, PF: "wsjpf0", NumVFs: 3, Parent: "wsjbr0", NetNS: hostPath})
	if err == nil {
		t.Fatal("New over a foreign link succeeded")
	}
	if _, err := host.LinkByName("wsjpf0v0"); err == nil {
		t.Error("the failed New left vf 0's stand-in")
	}
	if _, err := host.LinkByName("wsjpf0v1"); err != nil {
		t.Errorf("the failed New removed the foreign link: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("the failed New left %d entries in %s", len(entries), dir)
	}
}

// A stand-in that died with its container's namespace comes back, like a real VF, with its
// MAC under the name asked, and the tree shows it; a live one cannot be revived twice.
func TestReviveAfterNamespaceDies(t *testing.T) {
	hostPath, host := testNS(t, "rhost")
	if _, err := nslab.AddBridge(host, "wsjbr1", 1500); err != nil {
		t.Fatal(err)
	}
	f := sriovtest.NewTest(t, sriovtest.Config{PF: "wsjpf1", Bus: 0x3c, NumVFs: 2, Parent: "wsjbr1", NetNS: hostPath})
	mac := f.MAC(0)
	if len(mac) != 6 {
		t.Fatalf("MAC(0) = %v", mac)
	}
	if err := f.Revive(0, "wsjdev0"); err == nil {
		t.Fatal("Revive of a live stand-in succeeded")
	}
	ctrName := fmt.Sprintf("wsj-%d-rctr", os.Getpid())
	ctrPath, err := nslab.CreateNetNS(ctrName)
	if err != nil {
		t.Fatal(err)
	}
	moveTo(t, host, "wsjpf1v0", ctrPath)
	if err := nslab.DeleteNetNS(ctrName); err != nil {
		t.Fatal(err)
	}
	if err := f.Revive(0, "wsjdev0"); err != nil {
		t.Fatal(err)
	}
	l, err := host.LinkByName("wsjdev0")
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().HardwareAddr.String() != mac.String() {
		t.Fatalf("revived mac %s, want %s", l.Attrs().HardwareAddr, mac)
	}
	if vf, err := sriov.FindVF(f.Root(), f.VFPCI(0)); err != nil || vf.Netdev != "wsjdev0" {
		t.Fatalf("tree after Revive: %+v, %v", vf, err)
	}
	if err := f.Revive(1, "bad/name"); err == nil {
		t.Fatal("Revive took a bad name")
	}
}

// BenchmarkMoveInOut is the kernel part of one SR-IOV attachment on a stand-in, without the
// peer: SaveState, MoveIn (rename, move into the container, rename, MTU, address, up) and
// MoveOut (back under the saved name, MAC and MTU). Set beside the chaos bench's ADD+DEL to
// see how much of an attachment is the netdev work.
func BenchmarkMoveInOut(b *testing.B) {
	hostPath, host := testNS(b, "bhost")
	ctrPath, _ := testNS(b, "bctr")
	if _, err := nslab.AddBridge(host, "wsjbr2", 1500); err != nil {
		b.Fatal(err)
	}
	f := sriovtest.NewTest(b, sriovtest.Config{PF: "wsjpf2", Bus: 0x3d, NumVFs: 1, Parent: "wsjbr2", NetNS: hostPath})
	saved, err := sriov.SaveState(hostPath, "wsjpf2v0", nil, "", 0)
	if err != nil {
		b.Fatal(err)
	}
	addr := netip.MustParsePrefix("10.77.0.2/24")
	var in, out time.Duration
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if _, err := sriov.SaveState(hostPath, "wsjpf2v0", nil, "", 0); err != nil {
			b.Fatal(err)
		}
		if _, err := sriov.MoveIn(sriov.MoveRequest{HostNS: hostPath, NetNS: ctrPath, IfName: "net1", Saved: saved,
			MTU: 1400, Address: addr, Secondary: true, Range: addr.Masked()}); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := sriov.MoveOut(sriov.MoveOutRequest{HostNS: hostPath, NetNS: ctrPath, IfName: "net1", Saved: saved}); err != nil {
			b.Fatal(err)
		}
		in, out = in+t1.Sub(t0), out+time.Since(t1)
	}
	b.StopTimer()
	b.ReportMetric(float64(in.Microseconds())/float64(b.N), "µs-in/op")
	b.ReportMetric(float64(out.Microseconds())/float64(b.N), "µs-out/op")
	if f.MAC(0).String() != saved.MAC.String() {
		b.Fatal("the stand-in's mac changed")
	}
}
