package router

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/datapath/sriov"
	"github.com/weftnet/weft/datapath/sriov/sriovtest"
	"github.com/weftnet/weft/ipam"
)

// The SR-IOV tests run in the test binary's own network namespace (TestMain) with the
// sriovtest fixture: a sysfs tree under a temporary root and macvlan stand-ins for the VFs,
// hanging off a veth. Names start with "wsc".

// wscParent makes the link the stand-ins hang off: a veth (this kernel has no dummy).
func wscParent(t *testing.T, name string) {
	t.Helper()
	d := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: 1500}, PeerName: name + "x"}
	if err := netlink.LinkAdd(d); err != nil {
		t.Fatalf("add %s: %v", name, err)
	}
	if err := netlink.LinkSetUp(d); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.LinkDel(d) })
}

// wscContainer makes a network namespace standing in for a container; it returns its path
// and a function deleting it early.
func wscContainer(t *testing.T, n int) (string, func()) {
	t.Helper()
	name := fmt.Sprintf("wsc-%d-c%d", os.Getpid(), n)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	var once sync.Once
	del := func() { once.Do(func() { exec.Command("ip", "netns", "del", name).Run() }) }
	t.Cleanup(del)
	return "/var/run/netns/" + name, del
}

type sriovLab struct {
	*testPeer
	fix     *sriovtest.Fixture
	pf      *sriov.FakePF
	devinfo string
	data    string
	orig    map[int]netlink.Link // the stand-ins as the fixture made them
}

// startSRIOVPeer starts peer p1 on dataDir with the fixture's sysfs root and a recording PF.
func startSRIOVPeer(t *testing.T, dataDir, root, devinfo string, pf sriov.PFConfig) *testPeer {
	t.Helper()
	return startWiredPeer(t, dataDir, func(cfg *Config) {
		cfg.SysfsRoot, cfg.SRIOVDeviceInfoDir, cfg.SRIOVPF = root, devinfo, pf
	}, nil)
}

// newSRIOVLab lays out PF pf with n VFs (vfio ones bound to vfio-pci), starts the peer and
// creates network name on the PF.
func newSRIOVLab(t *testing.T, pf string, bus, n int, vfio []int, network string) *sriovLab {
	t.Helper()
	parent := pf + "p"
	wscParent(t, parent)
	fix := sriovtest.NewTest(t, sriovtest.Config{PF: pf, Bus: bus, NumVFs: n, VFIO: vfio, Parent: parent})
	l := &sriovLab{fix: fix, pf: sriov.NewFakePF(), devinfo: t.TempDir(), data: t.TempDir(), orig: map[int]netlink.Link{}}
	for i := 0; i < n; i++ {
		if name := fix.Netdev(i); name != "" {
			link, err := netlink.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			l.orig[i] = link
		}
	}
	l.testPeer = startSRIOVPeer(t, l.data, fix.Root(), l.devinfo, l.pf)
	waitUntil(t, "the cluster to define its networks", 10*time.Second, func() error {
		if len(l.cluster.Networks()) == 0 {
			return fmt.Errorf("none")
		}
		return nil
	})
	if code, msg := apiCall(t, l.apiHandler(), "POST", "/v1/networks", network, nil); code != 200 {
		t.Fatalf("create %s: %d %s", network, code, msg)
	}
	return l
}

func sriovReq(id, netns string) cni.AttachRequest {
	return cni.AttachRequest{ContainerID: id, IfName: "net1", NetNS: netns, CNINetwork: "conf-fast", Network: "fast", Name: id}
}

// inNS returns the link name in the netns at path, or an error.
func inNS(path, name string) (netlink.Link, error) {
	h, err := netns.GetFromPath(path)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	l, err := nh.LinkByName(name)
	if err != nil {
		return nil, err
	}
	addrs, _ := nh.AddrList(l, netlink.FAMILY_V4)
	if len(addrs) > 0 {
		l.Attrs().Alias = addrs[0].IPNet.String() // the first address, for the caller
	}
	return l, nil
}

// assertHome checks that VF i's stand-in is in the host under its original name, MAC and MTU.
func (l *sriovLab) assertHome(t *testing.T, i int) {
	t.Helper()
	o := l.orig[i].Attrs()
	h, err := netlink.LinkByName(o.Name)
	if err != nil {
		t.Fatalf("vf %d not back in the host as %s: %v", i, o.Name, err)
	}
	if !bytes.Equal(h.Attrs().HardwareAddr, o.HardwareAddr) || h.Attrs().MTU != o.MTU {
		t.Fatalf("vf %d back as %s with mac %s mtu %d, want %s %d", i, o.Name, h.Attrs().HardwareAddr, h.Attrs().MTU, o.HardwareAddr, o.MTU)
	}
}

// ADD moves a stand-in VF in with its MAC, the asked MTU and an address of the network; a
// 5th ADD on 4 VFs is CNI 11 and changes nothing; DEL restores; a stale DEL leaves the new
// owner alone; a DEL after the netns died quarantines the VF until it is found back in the
// host; GC releases leaked VFs of its conflist only.
func TestSRIOVAttachLifecycle(t *testing.T) {
	l := newSRIOVLab(t, "wscpf0", 0x30, 4, nil, `{"name":"fast","subnet":"10.80.0.0/16","mode":"sriov","pf":"wscpf0","vlan":12,"dpdk":"off","mtu":1400}`)
	ctx := context.Background()
	nets := map[int]string{}
	dels := map[int]func(){}
	for c := 1; c <= 5; c++ {
		nets[c], dels[c] = wscContainer(t, c)
	}
	for c := 1; c <= 4; c++ {
		res, err := l.client.Add(ctx, sriovReq(fmt.Sprintf("c%d", c), nets[c]))
		if err != nil {
			t.Fatalf("ADD c%d: %v", c, err)
		}
		vf := c - 1 // the lowest free index first
		o := l.orig[vf].Attrs()
		if res.Kind != cni.KindSRIOV || res.PCIID != l.fix.VFPCI(vf) || res.ContainerMAC != o.HardwareAddr.String() ||
			res.MTU != 1400 || res.HostIfName != "" || res.Gateway != "" || res.Bridge != "" {
			t.Fatalf("ADD c%d: %+v", c, res)
		}
		addr := netip.MustParsePrefix(res.Address)
		if addr.Bits() != 16 || !netip.MustParsePrefix("10.80.0.0/16").Contains(addr.Addr()) {
			t.Fatalf("ADD c%d: address %s", c, addr)
		}
		cl, err := inNS(nets[c], "net1")
		if err != nil {
			t.Fatalf("c%d has no net1: %v", c, err)
		}
		if !bytes.Equal(cl.Attrs().HardwareAddr, o.HardwareAddr) || cl.Attrs().MTU != 1400 || cl.Attrs().Alias != addr.String() {
			t.Fatalf("net1 of c%d: mac %s mtu %d address %s", c, cl.Attrs().HardwareAddr, cl.Attrs().MTU, cl.Attrs().Alias)
		}
		if _, err := netlink.LinkByName(o.Name); err == nil {
			t.Fatalf("%s still in the host after ADD c%d", o.Name, c)
		}
		// The PF got the network's VLAN.
		if s, _ := l.pf.VF("wscpf0", vf); s.VLAN == nil || *s.VLAN != 12 {
			t.Fatalf("vf %d vlan on the pf: %v", vf, s.VLAN)
		}
	}
	if _, err := l.client.Check(ctx, sriovReq("c1", nets[1])); err != nil {
		t.Fatalf("CHECK c1: %v", err)
	}
	// A repeated ADD converges to the same answer.
	if again, err := l.client.Add(ctx, sriovReq("c1", nets[1])); err != nil || again.PCIID != l.fix.VFPCI(0) {
		t.Fatalf("repeated ADD c1: %+v %v", again, err)
	}

	// The fifth: CNI 11, nothing changed.
	before := len(l.alloc.Attachments())
	_, err := l.client.Add(ctx, sriovReq("c5", nets[5]))
	if codeOf(err) != types.ErrTryAgainLater {
		t.Fatalf("5th ADD: %v (code %d), want CNI 11", err, codeOf(err))
	}
	if _, err := inNS(nets[5], "net1"); err == nil {
		t.Fatal("the refused ADD left net1 in c5")
	}
	if got := len(l.alloc.Attachments()); got != before {
		t.Fatalf("the refused ADD left an address: %d attachments, want %d", got, before)
	}
	if got := len(l.sriov.pool.Owned()); got != 4 {
		t.Fatalf("%d VFs owned after the refused ADD, want 4", got)
	}

	// DEL restores name, MAC and MTU in the host; the PF's VLAN goes back.
	if err := l.client.Del(ctx, sriovReq("c1", nets[1])); err != nil {
		t.Fatalf("DEL c1: %v", err)
	}
	l.assertHome(t, 0)
	if _, err := inNS(nets[1], "net1"); err == nil {
		t.Fatal("net1 still in c1 after DEL")
	}
	if s, _ := l.pf.VF("wscpf0", 0); s.VLAN == nil || *s.VLAN != 0 {
		t.Fatalf("vf 0 vlan after DEL: %v", s.VLAN)
	}
	if _, ok := l.alloc.Get(ipam.Key{ContainerID: "c1", IfName: "net1"}); ok {
		t.Fatal("c1's address outlived its DEL")
	}

	// c5 now gets VF 0; a stale DEL of c1 leaves it alone.
	if res, err := l.client.Add(ctx, sriovReq("c5", nets[5])); err != nil || res.PCIID != l.fix.VFPCI(0) {
		t.Fatalf("ADD c5 after DEL c1: %+v %v", res, err)
	}
	if err := l.client.Del(ctx, sriovReq("c1", nets[1])); err != nil {
		t.Fatalf("stale DEL c1: %v", err)
	}
	if _, err := inNS(nets[5], "net1"); err != nil {
		t.Fatalf("the stale DEL took c5's VF: %v", err)
	}

	// c2's netns dies with VF 1 inside: DEL succeeds and quarantines it.
	dels[2]()
	gone := sriovReq("c2", "")
	if err := l.client.Del(ctx, gone); err != nil {
		t.Fatalf("DEL c2 after its netns died: %v", err)
	}
	r, ok := l.sriov.pool.Lookup(sriov.Owner{ContainerID: "c2", IfName: "net1"})
	if !ok || r.State != sriov.StateQuarantined {
		t.Fatalf("vf of c2: %+v %v, want quarantined", r, ok)
	}
	if err := l.client.Del(ctx, gone); err != nil {
		t.Fatalf("repeated DEL c2: %v", err)
	}
	// A real VF falls back into the host as dev<N> with the container's MAC; stand in for
	// that with a macvlan carrying the stand-in's alias, then let a scan find it.
	o := l.orig[1].Attrs()
	back := &netlink.Macvlan{LinkAttrs: netlink.LinkAttrs{Name: "dev7", ParentIndex: o.ParentIndex, HardwareAddr: o.HardwareAddr, MTU: 1400},
		Mode: netlink.MACVLAN_MODE_BRIDGE}
	if err := netlink.LinkAdd(back); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetAlias(back, o.Alias); err != nil {
		t.Fatal(err)
	}
	if err := l.fix.Rename(1, "dev7"); err != nil {
		t.Fatal(err)
	}
	l.sriov.scan("wscpf0")
	l.assertHome(t, 1)
	if _, ok := l.sriov.pool.Lookup(sriov.Owner{ContainerID: "c2", IfName: "net1"}); ok {
		t.Fatal("the found vf is still c2's")
	}
	if got := l.sriov.pool.FreeCount("wscpf0"); got != 1 {
		t.Fatalf("%d free VFs after the quarantined one was found, want 1", got)
	}

	// GC of another conflist changes nothing; GC of conf-fast keeping c3 releases c4 and c5.
	if res, err := l.client.GC(ctx, cni.GCRequest{CNINetwork: "other"}); err != nil || len(res.Released) != 0 {
		t.Fatalf("GC of another conflist: %+v %v", res, err)
	}
	res, err := l.client.GC(ctx, cni.GCRequest{CNINetwork: "conf-fast", Valid: []cni.GCAttachment{{ContainerID: "c3", IfName: "net1"}}})
	if err != nil || len(res.Released) != 2 {
		t.Fatalf("GC: %+v %v", res, err)
	}
	l.assertHome(t, 0)
	l.assertHome(t, 3)
	if _, err := inNS(nets[3], "net1"); err != nil {
		t.Fatalf("GC took c3's VF: %v", err)
	}
	if got := l.sriov.pool.FreeCount("wscpf0"); got != 3 {
		t.Fatalf("%d free VFs after GC, want 3", got)
	}
	caps := l.sriovCapacity()
	if len(caps) != 1 || caps[0] != (SRIOVCapacity{PF: "wscpf0", Free: 3, Total: 4}) {
		t.Fatalf("capacity %+v", caps)
	}
	// No bridge, no VXLAN device for the SR-IOV network.
	if _, err := netlink.LinkByName(bridgeName("fast")); err == nil {
		t.Fatal("a bridge was made for the sr-iov network")
	}
}

// A peer killed in the middle of ADDs — one after moving its VF into the container (with
// another MAC and MTU), one before touching its VF — returns both VFs to the host with their
// saved state on restart and frees them.
func TestSRIOVRestartRepairsInterruptedAdd(t *testing.T) {
	l := newSRIOVLab(t, "wscpf2", 0x32, 2, nil, `{"name":"fast","subnet":"10.81.0.0/16","mode":"sriov","pf":"wscpf2"}`)
	netnsPath, _ := wscContainer(t, 20)
	l.stop()

	// What the killed ADD left: a reservation with its saved state, the VF in the container.
	db, err := bolt.Open(filepath.Join(l.data, "weft.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := sriov.NewPool(sriov.PoolConfig{DB: db})
	if err != nil {
		t.Fatal(err)
	}
	info, err := sriov.Discover(l.fix.Root(), "wscpf2")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Sync("wscpf2", info.VFs); err != nil {
		t.Fatal(err)
	}
	owner := sriov.Owner{ContainerID: "k1", IfName: "net1", CNINetwork: "conf-fast", NetNS: netnsPath}
	vf, err := pool.Reserve(owner, "wscpf2", false)
	if err != nil {
		t.Fatal(err)
	}
	st, err := sriov.SaveState("", vf.Netdev, l.pf, "wscpf2", vf.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := pool.SaveState(vf.PCI, st); err != nil {
		t.Fatal(err)
	}
	mac, _ := net.ParseMAC("02:00:00:00:aa:01")
	if _, err := sriov.MoveIn(sriov.MoveRequest{NetNS: netnsPath, IfName: "net1", Saved: st, MAC: mac, MTU: 1300,
		Address: netip.MustParsePrefix("10.81.0.9/16")}); err != nil {
		t.Fatal(err)
	}
	// A second ADD killed after saving its VF's state, before touching it.
	owner2 := sriov.Owner{ContainerID: "k2", IfName: "net1", CNINetwork: "conf-fast", NetNS: netnsPath}
	vf2, err := pool.Reserve(owner2, "wscpf2", false)
	if err != nil {
		t.Fatal(err)
	}
	st2, err := sriov.SaveState("", vf2.Netdev, l.pf, "wscpf2", vf2.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := pool.SaveState(vf2.PCI, st2); err != nil {
		t.Fatal(err)
	}
	if got := len(pool.Pending()); got != 2 {
		t.Fatalf("%d pending before the restart, want 2", got)
	}
	db.Close()

	p := startSRIOVPeer(t, l.data, l.fix.Root(), l.devinfo, l.pf)
	l.assertHome(t, vf2.Index)
	l.assertHome(t, vf.Index)
	if _, err := inNS(netnsPath, "net1"); err == nil {
		t.Fatal("the interrupted ADD's VF is still in the container")
	}
	if got := len(p.sriov.pool.Pending()); got != 0 {
		t.Fatalf("%d reservations pending after the restart", got)
	}
	if got := p.sriov.pool.FreeCount("wscpf2"); got != 2 {
		t.Fatalf("%d free VFs after the repair, want 2", got)
	}
}

// A DPDK network hands out the vfio-bound VF: pciID, an address and a device-info file, no
// netdev moved; DEL removes the file.
func TestSRIOVDPDK(t *testing.T) {
	l := newSRIOVLab(t, "wscpf1", 0x31, 2, []int{1}, `{"name":"fast","subnet":"10.82.0.0/16","mode":"sriov","pf":"wscpf1","dpdk":"on"}`)
	ctx := context.Background()
	netnsPath, _ := wscContainer(t, 10)
	res, err := l.client.Add(ctx, sriovReq("d1", netnsPath))
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if res.Kind != cni.KindDPDK || res.PCIID != l.fix.VFPCI(1) || res.DeviceInfo == "" || res.ContainerMAC != "" ||
		!netip.MustParsePrefix("10.82.0.0/16").Contains(netip.MustParsePrefix(res.Address).Addr()) {
		t.Fatalf("ADD: %+v", res)
	}
	di, err := sriov.DeviceInfoFiles{Dir: l.devinfo}.Read("conf-fast", "d1", "net1")
	if err != nil || di.PCI == nil || di.PCI.PCIAddress != l.fix.VFPCI(1) || di.PCI.PFPCIAddress != l.fix.PFPCI() {
		t.Fatalf("device info: %+v %v", di, err)
	}
	if _, err := inNS(netnsPath, "net1"); err == nil {
		t.Fatal("a netdev was moved for a dpdk vf")
	}
	l.assertHome(t, 0)
	if _, err := l.client.Check(ctx, sriovReq("d1", netnsPath)); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	// The only DPDK VF is taken: CNI 11.
	other, _ := wscContainer(t, 11)
	if _, err := l.client.Add(ctx, sriovReq("d2", other)); codeOf(err) != types.ErrTryAgainLater {
		t.Fatalf("second dpdk ADD: %v, want CNI 11", err)
	}
	if err := l.client.Del(ctx, sriovReq("d1", netnsPath)); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, err := os.Stat(res.DeviceInfo); !os.IsNotExist(err) {
		t.Fatalf("device info file after DEL: %v", err)
	}
	if caps := l.sriovCapacity(); len(caps) != 1 || caps[0] != (SRIOVCapacity{PF: "wscpf1", Free: 2, Total: 2, FreeDPDK: 1}) {
		t.Fatalf("capacity %+v", caps)
	}
}

func TestChangedSettings(t *testing.T) {
	i := func(v int) *int { return &v }
	b := func(v bool) *bool { return &v }
	s := func(v string) *string { return &v }
	saved := sriov.VFSettings{VLAN: i(0), QoS: i(0), SpoofChk: b(true), Trust: b(false), LinkState: s("auto"), MinTxRate: i(0), MaxTxRate: i(0)}
	cur := saved
	cur.VLAN, cur.MaxTxRate = i(12), i(100)
	got := changedSettings(cur, saved)
	if got.VLAN == nil || *got.VLAN != 0 || got.QoS == nil || got.MaxTxRate == nil || *got.MaxTxRate != 0 ||
		got.SpoofChk != nil || got.Trust != nil || got.LinkState != nil {
		t.Fatalf("changed %+v", got)
	}
	if got := changedSettings(saved, saved); got != (sriov.VFSettings{}) {
		t.Fatalf("nothing changed gives %+v", got)
	}
}

func TestSRIOVKindsAndSettings(t *testing.T) {
	yes, no := true, false
	for _, tt := range []struct {
		dpdk string
		held *bool
		want []bool
	}{
		{"", nil, []bool{false, true}}, {ipam.DPDKAuto, nil, []bool{false, true}},
		{ipam.DPDKOn, nil, []bool{true}}, {ipam.DPDKOff, nil, []bool{false}},
		{ipam.DPDKOff, &yes, []bool{true}}, {ipam.DPDKAuto, &no, []bool{false}},
	} {
		if got := sriovKinds(tt.dpdk, tt.held); fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("sriovKinds(%q, %v) = %v, want %v", tt.dpdk, tt.held, got, tt.want)
		}
	}
	s := sriovSettings(ipam.Network{VLAN: 7}, &cni.Bandwidth{EgressRate: 1_500_000})
	if *s.VLAN != 7 || s.MaxTxRate == nil || *s.MaxTxRate != 2 || s.SpoofChk != nil {
		t.Fatalf("settings %s", fmtVFSettings(s))
	}
}

// An SR-IOV network has no bridge here: no isolation chain, no DNS listener even if its
// gateway address were local, and the plan routes it nowhere.
func TestSRIOVNetworkSkipsHostSide(t *testing.T) {
	def := ipam.Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), BlockBits: 26}
	fast := ipam.Network{Name: "fast", Subnet: netip.MustParsePrefix("10.80.0.0/16"), BlockBits: 26, Mode: ipam.ModeSRIOV, PF: "ens1f0"}
	nets := []ipam.Network{def, fast}
	if iso := isolationNetworks(nets); len(iso) != 1 || iso[0].Name != "default" {
		t.Fatalf("isolation networks %+v", iso)
	}
	local := map[netip.Addr]bool{def.Gateway(): true, fast.Gateway(): true}
	if got := dnsListenAddrs(nets, local, 53); len(got) != 1 || got[0].Addr() != def.Gateway() {
		t.Fatalf("dns listens on %v", got)
	}
	if pn := planNetworks(nets); pn[0].Fabric || !pn[1].Fabric {
		t.Fatalf("plan networks %+v", pn)
	}
}

// Five concurrent ADDs on 4 VFs: four get a VF each (no VF twice), one gets CNI 11 and its
// container is left as it was.
func TestSRIOVConcurrentAddsNeverShareAVF(t *testing.T) {
	l := newSRIOVLab(t, "wscpf3", 0x33, 4, nil, `{"name":"fast","subnet":"10.83.0.0/16","mode":"sriov","pf":"wscpf3"}`)
	ctx := context.Background()
	type out struct {
		c   int
		res *cni.AttachResult
		err error
	}
	nets := map[int]string{}
	for c := 1; c <= 5; c++ {
		nets[c], _ = wscContainer(t, 30+c)
	}
	results := make(chan out, 5)
	var wg sync.WaitGroup
	for c := 1; c <= 5; c++ {
		wg.Go(func() {
			res, err := l.client.Add(ctx, sriovReq(fmt.Sprintf("k%d", c), nets[c]))
			results <- out{c, res, err}
		})
	}
	wg.Wait()
	close(results)
	pcis := map[string]bool{}
	refused := 0
	for o := range results {
		switch {
		case o.err == nil:
			if pcis[o.res.PCIID] {
				t.Fatalf("vf %s handed out twice", o.res.PCIID)
			}
			pcis[o.res.PCIID] = true
			if _, err := inNS(nets[o.c], "net1"); err != nil {
				t.Fatalf("k%d got %s but has no net1: %v", o.c, o.res.PCIID, err)
			}
		case codeOf(o.err) == types.ErrTryAgainLater:
			refused++
			if _, err := inNS(nets[o.c], "net1"); err == nil {
				t.Fatalf("refused k%d has a net1", o.c)
			}
			if _, ok := l.alloc.Get(ipam.Key{ContainerID: fmt.Sprintf("k%d", o.c), IfName: "net1"}); ok {
				t.Fatalf("refused k%d kept an address", o.c)
			}
		default:
			t.Fatalf("ADD k%d: %v", o.c, o.err)
		}
	}
	if len(pcis) != 4 || refused != 1 {
		t.Fatalf("%d attached, %d refused; want 4 and 1", len(pcis), refused)
	}
}

func TestSRIOVConfig(t *testing.T) {
	base := testConfig(t.TempDir())
	if err := base.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*Config){
		"--sriov-pf-config":       func(c *Config) { c.SRIOVPFConfig = "nic" },
		"--sysfs-root":            func(c *Config) { c.SysfsRoot = "sys" },
		"--sriov-device-info-dir": func(c *Config) { c.SRIOVDeviceInfoDir = "devinfo" },
		"rescan":                  func(c *Config) { c.SRIOVRescan = -time.Second },
	} {
		c := base
		mut(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v", name, err)
		}
	}
	log := slog.New(slog.DiscardHandler)
	if _, ok := base.pfConfig(log).(sriov.NetlinkPF); !ok {
		t.Errorf("default pf config %T, want NetlinkPF", base.pfConfig(log))
	}
	rec := base
	rec.SRIOVPFConfig = SRIOVPFRecord
	pf := rec.pfConfig(log)
	vlan := 9
	if err := pf.SetVF("ens1f0", 2, sriov.VFSettings{VLAN: &vlan}); err != nil {
		t.Fatal(err)
	}
	if s, err := pf.VF("ens1f0", 2); err != nil || s.VLAN == nil || *s.VLAN != 9 {
		t.Fatalf("record pf remembers %+v %v", s, err)
	}
}

func TestSRIOVScanDue(t *testing.T) {
	for _, tc := range []struct {
		pfs, last []string
		periodic  bool
		want      bool
	}{
		{[]string{"a"}, []string{"a"}, false, false}, // a kick with no new PF: nothing to scan
		{[]string{"a", "b"}, []string{"a"}, false, true},
		{nil, []string{"a"}, false, true},
		{[]string{"a"}, []string{"a"}, true, true}, // the periodic rescan always scans
	} {
		if got := sriovScanDue(tc.pfs, tc.last, tc.periodic); got != tc.want {
			t.Errorf("sriovScanDue(%v, %v, %v) = %v, want %v", tc.pfs, tc.last, tc.periodic, got, tc.want)
		}
	}
	var none *sriovPart
	none.networksChanged() // a peer without SR-IOV: no panic
	s := &sriovPart{kick: make(chan struct{}, 1)}
	s.networksChanged()
	s.networksChanged() // does not block when a kick is pending
	if len(s.kick) != 1 {
		t.Fatalf("kicks pending = %d, want 1", len(s.kick))
	}
}

// A network created after start gets its PF scanned when the datapath loop sees the network
// table change, without waiting for the periodic rescan (30 s) or a container.
func TestSRIOVNewNetworkScannedAtOnce(t *testing.T) {
	l := newSRIOVLab(t, "wtmpf0", 0x3a, 2, nil, `{"name":"fast","subnet":"10.89.0.0/16","mode":"sriov","pf":"wtmpf0"}`)
	start := time.Now()
	waitUntil(t, "the new network's PF to be scanned", 10*time.Second, func() error {
		l.sriov.mu.Lock()
		defer l.sriov.mu.Unlock()
		if _, ok := l.sriov.pfs["wtmpf0"]; !ok {
			return fmt.Errorf("not scanned")
		}
		return nil
	})
	if d := time.Since(start); d >= DefaultSRIOVRescan/2 {
		t.Fatalf("scanned after %v", d)
	}
}
