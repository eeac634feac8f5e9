package sriov_test

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/weftnet/weft/datapath/sriov"
	"github.com/weftnet/weft/datapath/sriov/sriovtest"
)

func treeOnly(t *testing.T) *sriovtest.Fixture {
	t.Helper()
	return sriovtest.NewTest(t, sriovtest.Config{PF: "wsjpf0", Bus: 3, NumVFs: 4, TotalVFs: 8, VFIO: []int{3}})
}

func TestDiscoverFixtureTree(t *testing.T) {
	f := treeOnly(t)
	got, err := sriov.Discover(f.Root(), "wsjpf0")
	if err != nil {
		t.Fatal(err)
	}
	want := sriov.PFInfo{Name: "wsjpf0", PCI: "0000:03:00.0", NumVFs: 4, TotalVFs: 8, VFs: []sriov.VF{
		{PF: "wsjpf0", Index: 0, PCI: "0000:03:02.0", Driver: "iavf", Netdev: "wsjpf0v0"},
		{PF: "wsjpf0", Index: 1, PCI: "0000:03:02.1", Driver: "iavf", Netdev: "wsjpf0v1"},
		{PF: "wsjpf0", Index: 2, PCI: "0000:03:02.2", Driver: "iavf", Netdev: "wsjpf0v2"},
		{PF: "wsjpf0", Index: 3, PCI: "0000:03:02.3", Driver: "vfio-pci", IOMMUGroup: "103"},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Discover:\n got %+v\nwant %+v", got, want)
	}
	if !got.VFs[3].DPDK() || got.VFs[0].DPDK() {
		t.Fatalf("DPDK(): vf3 %v vf0 %v, want true false", got.VFs[3].DPDK(), got.VFs[0].DPDK())
	}
}

func TestDiscoverZeroVFs(t *testing.T) {
	f := sriovtest.NewTest(t, sriovtest.Config{PF: "wsjpf0", NumVFs: 0, TotalVFs: 8})
	got, err := sriov.Discover(f.Root(), "wsjpf0")
	if err != nil {
		t.Fatal(err)
	}
	if got.NumVFs != 0 || got.TotalVFs != 8 || len(got.VFs) != 0 {
		t.Fatalf("got %+v, want 0 of 8 VFs", got)
	}
}

func TestDiscoverHostileTrees(t *testing.T) {
	pfDir := func(f *sriovtest.Fixture) string {
		return filepath.Join(f.Root(), "devices", "pci0000:00", f.PFPCI())
	}
	vfDir := func(f *sriovtest.Fixture, i int) string {
		return filepath.Join(f.Root(), "devices", "pci0000:00", f.VFPCI(i))
	}
	write := func(t *testing.T, p, s string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	relink := func(t *testing.T, link, target string) {
		t.Helper()
		if err := os.Remove(link); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name    string
		pf      string
		mutate  func(t *testing.T, f *sriovtest.Fixture)
		wantErr error
		inMsg   string // a fragment the message must hold: the path or the value at fault
	}{
		{"missing numvfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Remove(filepath.Join(pfDir(f), "sriov_numvfs"))
		}, sriov.ErrSysfs, "sriov_numvfs"},
		{"garbage numvfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			write(t, filepath.Join(pfDir(f), "sriov_numvfs"), "four\n")
		}, sriov.ErrSysfs, `"four"`},
		{"negative numvfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			write(t, filepath.Join(pfDir(f), "sriov_numvfs"), "-1\n")
		}, sriov.ErrSysfs, "sriov_numvfs"},
		{"empty totalvfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			write(t, filepath.Join(pfDir(f), "sriov_totalvfs"), "")
		}, sriov.ErrSysfs, "sriov_totalvfs"},
		{"huge numvfs file", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			write(t, filepath.Join(pfDir(f), "sriov_numvfs"), strings.Repeat("9", 1<<20))
		}, sriov.ErrSysfs, "sriov_numvfs"},
		{"numvfs a fifo", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			p := filepath.Join(pfDir(f), "sriov_numvfs")
			os.Remove(p)
			if err := syscall.Mkfifo(p, 0o644); err != nil {
				t.Fatal(err)
			}
		}, sriov.ErrSysfs, "sriov_numvfs is not a regular file"},
		{"numvfs a device", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "sriov_numvfs"), "/dev/zero")
		}, sriov.ErrSysfs, "outside the sysfs root"},
		{"numvfs over totalvfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			write(t, filepath.Join(pfDir(f), "sriov_numvfs"), "9\n")
		}, sriov.ErrSysfs, "more than sriov_totalvfs 8"},
		{"over 256 vfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			write(t, filepath.Join(pfDir(f), "sriov_totalvfs"), "300\n")
		}, sriov.ErrSysfs, "more than 256"},
		{"no sr-iov", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Remove(filepath.Join(pfDir(f), "sriov_totalvfs"))
		}, sriov.ErrNotSRIOV, "sriov_totalvfs"},
		{"unknown pf", "wsjnope", nil, sriov.ErrSysfs, "wsjnope"},
		{"pf name escaping", "../../..", nil, sriov.ErrSysfs, "bad pf name"},
		{"pf device outside root", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "net", "wsjpf0", "device"), "/")
		}, sriov.ErrSysfs, "outside the sysfs root"},
		{"virtfn missing", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Remove(filepath.Join(pfDir(f), "virtfn2"))
		}, sriov.ErrSysfs, "4 but 3 virtfn links"},
		{"virtfn beyond numvfs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Symlink("../"+f.VFPCI(0), filepath.Join(pfDir(f), "virtfn7"))
		}, sriov.ErrSysfs, "virtfn7"},
		{"virtfn with leading zero", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Symlink("../"+f.VFPCI(1), filepath.Join(pfDir(f), "virtfn01"))
		}, sriov.ErrSysfs, "appears twice"},
		{"virtfn escaping root", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "virtfn1"), "../../../../../../../../../../etc")
		}, sriov.ErrSysfs, "virtfn1 leads to /etc, outside the sysfs root"},
		{"virtfn absolute escape", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "virtfn1"), "/tmp")
		}, sriov.ErrSysfs, "outside the sysfs root"},
		{"virtfn dangling", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "virtfn1"), "../0000:03:09.0")
		}, sriov.ErrSysfs, "virtfn1"},
		{"virtfn loop", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "virtfn1"), "virtfn1")
		}, sriov.ErrSysfs, "virtfn1"},
		{"two virtfn to one vf", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "virtfn1"), "../"+f.VFPCI(0))
		}, sriov.ErrSysfs, "same vf 0000:03:02.0"},
		{"virtfn to a non-pci dir", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(pfDir(f), "virtfn1"), "../../../bus")
		}, sriov.ErrSysfs, "not named by a pci address"},
		{"vf with two netdevs", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Mkdir(filepath.Join(vfDir(f, 2), "net", "wsjextra"), 0o755)
		}, sriov.ErrSysfs, "holds 2 netdevs"},
		{"vf driver escaping root", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			relink(t, filepath.Join(vfDir(f, 0), "driver"), "/usr")
		}, sriov.ErrSysfs, "driver leads to /usr"},
		{"vf iommu group garbage", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Mkdir(filepath.Join(f.Root(), "kernel", "iommu_groups", "x1"), 0o755)
			relink(t, filepath.Join(vfDir(f, 3), "iommu_group"), "../../../kernel/iommu_groups/x1")
		}, sriov.ErrSysfs, `"x1"`},
		{"vf netdev name too long", "wsjpf0", func(t *testing.T, f *sriovtest.Fixture) {
			os.Rename(filepath.Join(vfDir(f, 0), "net", "wsjpf0v0"), filepath.Join(vfDir(f, 0), "net", "a-name-far-too-long"))
		}, sriov.ErrSysfs, "not an interface name"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := treeOnly(t)
			if c.mutate != nil {
				c.mutate(t, f)
			}
			got, err := sriov.Discover(f.Root(), c.pf)
			if !errors.Is(err, c.wantErr) {
				t.Fatalf("Discover = %+v, %v; want %v", got, err, c.wantErr)
			}
			if !strings.Contains(err.Error(), c.inMsg) {
				t.Fatalf("error %q does not name %q", err, c.inMsg)
			}
			if !reflect.DeepEqual(got, sriov.PFInfo{}) {
				t.Fatalf("Discover returned %+v with its error", got)
			}
		})
	}
}

func TestFindVF(t *testing.T) {
	f := treeOnly(t)
	vf, err := sriov.FindVF(f.Root(), f.VFPCI(2))
	if err != nil {
		t.Fatal(err)
	}
	want := sriov.VF{PF: "wsjpf0", Index: 2, PCI: "0000:03:02.2", Driver: "iavf", Netdev: "wsjpf0v2"}
	if vf != want {
		t.Fatalf("FindVF = %+v, want %+v", vf, want)
	}
	// The netdev leaves (moved into a container) and comes back under another name.
	if err := f.Rename(2, ""); err != nil {
		t.Fatal(err)
	}
	if vf, err = sriov.FindVF(f.Root(), f.VFPCI(2)); err != nil || vf.Netdev != "" {
		t.Fatalf("after the netdev left: %+v, %v; want no netdev", vf, err)
	}
	if err := f.Rename(2, "wsjback"); err != nil {
		t.Fatal(err)
	}
	if vf, err = sriov.FindVF(f.Root(), f.VFPCI(2)); err != nil || vf.Netdev != "wsjback" {
		t.Fatalf("after the netdev came back: %+v, %v; want wsjback", vf, err)
	}
	if vf, err = sriov.FindVF(f.Root(), f.VFPCI(3)); err != nil || vf.Driver != "vfio-pci" || vf.IOMMUGroup != "103" || vf.Index != 3 {
		t.Fatalf("FindVF(vfio vf) = %+v, %v", vf, err)
	}

	for _, bad := range []string{"0000:03:07.0", f.PFPCI(), "../../etc", "", "0000:03:02.2/../.."} {
		if vf, err := sriov.FindVF(f.Root(), bad); !errors.Is(err, sriov.ErrNoVF) {
			t.Errorf("FindVF(%q) = %+v, %v; want ErrNoVF", bad, vf, err)
		}
	}
	// A bus link that escapes the root is refused, not followed.
	link := filepath.Join(f.Root(), "bus", "pci", "devices", f.VFPCI(1))
	os.Remove(link)
	if err := os.Symlink("/sys/bus/pci/devices", link); err != nil {
		t.Fatal(err)
	}
	if _, err := sriov.FindVF(f.Root(), f.VFPCI(1)); !errors.Is(err, sriov.ErrSysfs) || !strings.Contains(err.Error(), "outside the sysfs root") {
		t.Fatalf("FindVF through an escaping link: %v", err)
	}
}

func TestListPFs(t *testing.T) {
	f := treeOnly(t)
	// A netdev without SR-IOV (a bare class/net entry) is not listed.
	if err := os.MkdirAll(filepath.Join(f.Root(), "class", "net", "lo"), 0o755); err != nil {
		t.Fatal(err)
	}
	pfs, err := sriov.ListPFs(f.Root(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(pfs) != 1 || pfs[0].Name != "wsjpf0" || len(pfs[0].VFs) != 4 {
		t.Fatalf("ListPFs(all) = %+v, want wsjpf0 with 4 VFs", pfs)
	}
	if pfs, err = sriov.ListPFs(f.Root(), []string{"wsjpf0"}); err != nil || len(pfs) != 1 {
		t.Fatalf("ListPFs(wsjpf0) = %+v, %v", pfs, err)
	}
	if pfs, err := sriov.ListPFs(f.Root(), []string{"wsjpf0", "lo"}); !errors.Is(err, sriov.ErrSysfs) || pfs != nil {
		t.Fatalf("ListPFs(wsjpf0, lo) = %+v, %v; want an error naming lo", pfs, err)
	}
	if _, err := sriov.ListPFs(filepath.Join(f.Root(), "nothing"), nil); !errors.Is(err, sriov.ErrSysfs) {
		t.Fatalf("ListPFs on a missing root: %v", err)
	}
}

// Discover racing a netdev that leaves, comes back and is renamed never errors and sees the
// old name, the new one or none.
func TestDiscoverWhileRenaming(t *testing.T) {
	f := treeOnly(t)
	done := make(chan struct{})
	var renames int
	go func() {
		defer close(done)
		for _, n := range []string{"", "wsjx", "wsjy", "", "wsjpf0v1"} {
			for k := 0; k < 50; k++ {
				if err := f.Rename(1, n); err != nil {
					t.Errorf("rename: %v", err)
					return
				}
				renames++
			}
		}
	}()
	valid := map[string]bool{"": true, "wsjx": true, "wsjy": true, "wsjpf0v1": true}
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		info, err := sriov.Discover(f.Root(), "wsjpf0")
		if err != nil {
			t.Fatalf("Discover during renames: %v", err)
		}
		if n := info.VFs[1].Netdev; !valid[n] {
			t.Fatalf("Discover saw %q", n)
		}
	}
	if renames != 250 {
		t.Fatalf("%d renames", renames)
	}
}

// On the real /sys (symlinked class/net entries, virtual netdevs) listing finds no PF where
// there is no SR-IOV device, and errors on none; lo is not a PF.
func TestRealSysfs(t *testing.T) {
	if _, err := os.Stat("/sys/class/net/lo"); err != nil {
		t.Skip("no sysfs")
	}
	pfs, err := sriov.ListPFs("", nil)
	if err != nil {
		t.Fatalf("ListPFs on /sys: %v", err)
	}
	t.Logf("%d PFs on this host", len(pfs))
	if _, err := sriov.Discover("", "lo"); !errors.Is(err, sriov.ErrSysfs) {
		t.Fatalf("Discover(lo) on /sys: %v, want ErrSysfs (no device)", err)
	}
}
