package chaostest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/datapath/sriov/sriovtest"
)

// SR-IOV attachments (#14) on real peers, libcni and the real plugin. Every lab host has a
// stand-in NIC (lab.SRIOVConfig): a sysfs tree under the host's directory with a PF named
// <prefix>pf0, 4 VFs whose netdevs are macvlan children of the host's eth0 (so two hosts'
// VFs share the lab's L2) and one VF bound to vfio-pci; the peer reads the tree through
// --sysfs-root and programs the "PF" through the recording configurator.

// sriovVFs is the number of netdev VFs per host; VF sriovVFs is the vfio-bound one.
const sriovVFs = 4

// ctrMTU is the MTU the DEL tests ask for in the container, below the stand-ins' 1500.
const ctrMTU = 1400

var (
	fastSubnet = netip.MustParsePrefix("10.77.0.0/24")
	dpdkSubnet = netip.MustParsePrefix("10.78.0.0/24")
)

// newSRIOVLab is newMeshLab with a stand-in NIC on every host.
func newSRIOVLab(t *testing.T, prefix string, n int) *lab.Lab {
	t.Helper()
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: prefix, Hosts: n, NoStart: true,
		SRIOV: &lab.SRIOVConfig{VFs: sriovVFs, VFIO: 1},
		PeerArgs: func(i int) []string {
			// A 2 s rescan (30 s in production) so a VF back in the host is found within
			// seconds; it also runs discovery during the tests' ADDs and DELs, as it would.
			args := []string{"--raft-voters", fmt.Sprint(min(n, 3)), "--sriov-rescan", "2s"}
			if i > 0 {
				args = append(args, "--peers", l.Host(0).Addr.Addr().String())
			}
			return args
		}})
	ctx := testCtx(t, time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 45*time.Second, "the mesh", func() error { return aliveEverywhere(ctx, l.Hosts()) })
	waitLeader(t, ctx, l.Hosts())
	return l
}

// createSRIOVNetwork creates an SR-IOV network on l's PF and waits until every host lists it.
func createSRIOVNetwork(t *testing.T, ctx context.Context, l *lab.Lab, name string, subnet netip.Prefix, dpdk string) {
	t.Helper()
	out, err := l.Host(0).CLI(ctx, "network", "create", name, "--subnet", subnet.String(),
		"--mode", "sriov", "--pf", l.Host(0).SRIOVPF(), "--dpdk", dpdk)
	if err != nil {
		t.Fatalf("network create %s: %v %s", name, err, out)
	}
	waitFor(t, ctx, 10*time.Second, "every host to list "+name, func() error {
		for _, h := range l.Hosts() {
			out, err := h.CLI(ctx, "network", "ls")
			if err != nil {
				return err
			}
			if !strings.Contains(string(out), name) {
				return fmt.Errorf("%s does not list %s:\n%s", h.Name, name, out)
			}
		}
		return nil
	})
}

// vfLink is where one stand-in VF's netdev is now.
type vfLink struct {
	ns   string // namespace name (host or container)
	name string
	mac  net.HardwareAddr
	mtu  int
	up   bool
}

// vfLinks finds every VF stand-in of fix in the namespaces at paths (by the alias that
// travels with the netdev): VF index -> where it is. A VF seen twice fails the test.
func vfLinks(t *testing.T, fix *sriovtest.Fixture, nss map[string]string) map[int]vfLink {
	t.Helper()
	byAlias := map[string]int{}
	for i := 0; i < sriovVFs; i++ {
		byAlias["sriovtest:"+fix.VFPCI(i)] = i
	}
	out := map[int]vfLink{}
	for name, path := range nss {
		h, err := nslab.HandleAt(path)
		if err != nil {
			continue // a deleted container
		}
		var links []netlink.Link
		for range 10 { // again while links moving elsewhere interrupt the dump
			if links, err = h.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
				break
			}
		}
		h.Close()
		if err != nil {
			t.Fatalf("links of %s: %v", name, err)
		}
		for _, l := range links {
			i, ok := byAlias[l.Attrs().Alias]
			if !ok {
				continue
			}
			if prev, dup := out[i]; dup {
				t.Fatalf("vf %d is in %s as %s and in %s as %s", i, prev.ns, prev.name, name, l.Attrs().Name)
			}
			a := l.Attrs()
			out[i] = vfLink{ns: name, name: a.Name, mac: a.HardwareAddr, mtu: a.MTU, up: a.Flags&net.FlagUp != 0}
		}
	}
	return out
}

// namespaces maps the names of h and its containers to their paths.
func namespaces(h *lab.Host, ctrs ...*lab.Container) map[string]string {
	m := map[string]string{h.Name: h.NSPath}
	for _, c := range ctrs {
		m[c.Name] = c.NSPath
	}
	return m
}

// hostMTU is the MTU of the stand-ins as made (their parent's, eth0's).
func hostMTU(t *testing.T, h *lab.Host) int {
	t.Helper()
	l, err := h.Link("eth0")
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().MTU
}

// assertHome checks that VF i is in h's namespace under its original name, MAC and MTU.
func assertHome(h *lab.Host, where map[int]vfLink, i, mtu int) error {
	fix := h.SRIOV()
	w, ok := where[i]
	switch {
	case !ok:
		return fmt.Errorf("vf %d is nowhere in sight", i)
	case w.ns != h.Name:
		return fmt.Errorf("vf %d is in %s as %s, not in the host", i, w.ns, w.name)
	case w.name != fmt.Sprintf("%sv%d", h.SRIOVPF(), i):
		return fmt.Errorf("vf %d is back as %s, not its own name", i, w.name)
	case w.mac.String() != fix.MAC(i).String():
		return fmt.Errorf("vf %d is back with mac %s, not its own %s", i, w.mac, fix.MAC(i))
	case w.mtu != mtu:
		return fmt.Errorf("vf %d is back with mtu %d, not %d", i, w.mtu, mtu)
	}
	return nil
}

// vfOf returns the index of the VF whose MAC is mac.
func vfOf(fix *sriovtest.Fixture, mac string) (int, bool) {
	for i := 0; i < sriovVFs; i++ {
		if fix.MAC(i).String() == mac {
			return i, true
		}
	}
	return 0, false
}

// sriovAttached checks an ADD result for ifname on an SR-IOV network and the container's
// netdev: the interface is a VF of h (by MAC), in the container under ifname with the
// result's MAC, MTU mtu (0: the VF's own) and address, up, and not in the host. It returns the VF index and the
// address.
func sriovAttached(t *testing.T, h *lab.Host, ctr *lab.Container, res types.Result, ifname string, subnet netip.Prefix, mtu int) (int, netip.Prefix) {
	t.Helper()
	r, err := current.GetResult(res)
	if err != nil {
		t.Fatal(err)
	}
	addr, err := lab.ResultAddress(res)
	if err != nil || !subnet.Contains(addr.Addr()) {
		t.Fatalf("%s %s: address %s (%v), want one in %s", ctr.Name, ifname, addr, err, subnet)
	}
	var rif *current.Interface
	for _, x := range r.Interfaces {
		if x.Name == ifname && x.Sandbox != "" {
			rif = x
		}
	}
	if rif == nil {
		t.Fatalf("%s: result interfaces %+v lack %s in the sandbox", ctr.Name, r.Interfaces, ifname)
	}
	fix := h.SRIOV()
	i, ok := vfOf(fix, rif.Mac)
	if !ok {
		t.Fatalf("%s %s: result mac %s is no VF's of %s", ctr.Name, ifname, rif.Mac, h.Name)
	}
	where := vfLinks(t, fix, namespaces(h, ctr))
	w := where[i]
	if w.ns != ctr.Name || w.name != ifname || !w.up {
		t.Fatalf("%s %s: vf %d is %+v, want %s up in the container", ctr.Name, ifname, i, w, ifname)
	}
	if rif.Mtu != 0 && rif.Mtu != w.mtu {
		t.Fatalf("%s %s: result mtu %d, netdev mtu %d", ctr.Name, ifname, rif.Mtu, w.mtu)
	}
	if mtu == 0 {
		mtu = hostMTU(t, h)
	}
	if w.mtu != mtu {
		t.Fatalf("%s %s: mtu %d, want %d", ctr.Name, ifname, w.mtu, mtu)
	}
	nh, err := nslab.HandleAt(ctr.NSPath)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	link, err := nh.LinkByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := nh.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range addrs {
		got = append(got, a.IPNet.String())
	}
	if !slices.Contains(got, addr.String()) {
		t.Fatalf("%s %s holds %v, not the result's %s", ctr.Name, ifname, got, addr)
	}
	// The netdev exists in the container only: not in the host under any name.
	if names, err := h.LinkNames(); err != nil || slices.Contains(names, fmt.Sprintf("%sv%d", h.SRIOVPF(), i)) {
		t.Fatalf("vf %d's netdev still in %s (links %v, %v)", i, h.Name, names, err)
	}
	return i, addr
}

// Two hosts, 4 stand-in VFs each: a container on each gets eth0 on the default network and
// its VF as net1 on `fast`, with the VF's MAC, MTU and the result's address; the two reach
// each other over net1 across hosts (the lab's L2, as VFs on one switch); CHECK passes; DEL
// returns each VF to its host under its name, MAC and MTU.
func TestSRIOVAttachAcrossHosts(t *testing.T) {
	l := newSRIOVLab(t, "wsrx", 2)
	ctx := testCtx(t, 3*time.Minute)
	createSRIOVNetwork(t, ctx, l, "fast", fastSubnet, "off")

	type placed struct {
		h    *lab.Host
		ctr  *lab.Container
		fast *lab.CNI
		vf   int
		addr netip.Prefix
	}
	var ps []placed
	for _, h := range l.Hosts() {
		ctr := mustContainer(t, h)
		mustAdd(t, ctx, mustCNI(t, h, lab.CNIOptions{}), ctr)
		fast := mustCNI(t, h, lab.CNIOptions{Name: "weft-fast", Network: "fast"})
		res, err := fast.Add(ctx, ctr.RuntimeConf("net1"))
		if err != nil {
			t.Fatalf("ADD net1 on fast on %s: %v", h.Name, err)
		}
		vf, addr := sriovAttached(t, h, ctr, res, "net1", fastSubnet, 0)
		names, _ := ctr.LinkNames()
		if !slices.Contains(names, "eth0") || !slices.Contains(names, "net1") {
			t.Fatalf("%s links %v, want eth0 and net1", ctr.Name, names)
		}
		t.Logf("%s: vf %d as net1 with %s", h.Name, vf, addr)
		ps = append(ps, placed{h, ctr, fast, vf, addr})
	}
	waitPing(t, ctx, ps[0].ctr, ps[1].addr.Addr())
	waitPing(t, ctx, ps[1].ctr, ps[0].addr.Addr())
	for _, p := range ps {
		if err := p.fast.Check(ctx, p.ctr.RuntimeConf("net1")); err != nil {
			t.Fatalf("CHECK net1 on %s: %v", p.h.Name, err)
		}
	}
	mtu := hostMTU(t, ps[0].h)
	for _, p := range ps {
		if err := p.fast.Del(ctx, p.ctr.RuntimeConf("net1")); err != nil {
			t.Fatalf("DEL net1 on %s: %v", p.h.Name, err)
		}
		if err := assertHome(p.h, vfLinks(t, p.h.SRIOV(), namespaces(p.h, p.ctr)), p.vf, mtu); err != nil {
			t.Fatalf("after DEL on %s: %v", p.h.Name, err)
		}
		if names, _ := p.ctr.LinkNames(); slices.Contains(names, "net1") {
			t.Fatalf("%s still has net1 after DEL: %v", p.ctr.Name, names)
		}
	}
}

// fastUsed is the number of addresses the host's blocks of network fast hold.
func fastUsed(t *testing.T, ctx context.Context, h *lab.Host) int {
	t.Helper()
	n := 0
	for _, nw := range mustStatus(t, ctx, h).Networks {
		if nw.Name == "fast" {
			for _, b := range nw.Blocks {
				n += b.Used
			}
		}
	}
	return n
}

// Five concurrent ADDs on a host with 4 VFs: four get a VF each, the fifth gets CNI error 11
// (try again later) and changes nothing: no netdev in its container, no attachment, no
// address. Then the DEL cases: DEL restores name, MAC and MTU; a stale DEL (of a container
// whose VF went to a new owner) leaves the new owner alone; a DEL after the netns is gone
// succeeds and the VF comes back (quarantine, then found once the kernel hands it back);
// GC releases a VF leaked by a runtime that forgot its container.
func TestSRIOVExhaustionAndDel(t *testing.T) {
	l := newSRIOVLab(t, "wsre", 1)
	ctx := testCtx(t, 4*time.Minute)
	h := l.Host(0)
	fix := h.SRIOV()
	createSRIOVNetwork(t, ctx, l, "fast", fastSubnet, "off")
	// The container's MTU differs from the VF's, so that DEL has an MTU to restore.
	fast := mustCNI(t, h, lab.CNIOptions{Name: "weft-fast", Network: "fast", MTU: ctrMTU})
	mtu := hostMTU(t, h)

	ctrs := make([]*lab.Container, sriovVFs+1)
	for k := range ctrs {
		ctrs[k] = mustContainer(t, h)
	}
	results := make([]types.Result, len(ctrs))
	errs := make([]error, len(ctrs))
	var wg sync.WaitGroup
	for k, c := range ctrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[k], errs[k] = fast.Add(ctx, c.RuntimeConf("net1"))
		}()
	}
	wg.Wait()
	var failed []int
	owner := map[int]*lab.Container{} // vf -> container
	for k, err := range errs {
		if err != nil {
			failed = append(failed, k)
			if code, ok := lab.ErrorCode(err); !ok || code != 11 {
				t.Fatalf("ADD %d failed with %v (code %d, %t), want CNI error 11", k, err, code, ok)
			}
			continue
		}
		vf, _ := sriovAttached(t, h, ctrs[k], results[k], "net1", fastSubnet, ctrMTU)
		if prev, dup := owner[vf]; dup {
			t.Fatalf("vf %d handed to %s and %s", vf, prev.Name, ctrs[k].Name)
		}
		owner[vf] = ctrs[k]
	}
	if len(failed) != 1 {
		t.Fatalf("%d of 5 concurrent ADDs failed (%v), want exactly 1", len(failed), errs)
	}
	loser := ctrs[failed[0]]
	if names, _ := loser.LinkNames(); !slices.Equal(names, []string{"lo"}) {
		t.Fatalf("the refused container has links %v, want only lo", names)
	}
	st := mustStatus(t, ctx, h)
	if _, ok := st.Attachment(loser.ID, "net1"); ok {
		t.Fatal("the refused ADD left an attachment")
	}
	if got := fastUsed(t, ctx, h); got != sriovVFs {
		t.Fatalf("fast holds %d addresses, want %d (the refused ADD took one?)", got, sriovVFs)
	}
	if where := vfLinks(t, fix, namespaces(h, ctrs...)); len(where) != sriovVFs {
		t.Fatalf("vfs seen %v, want all %d", where, sriovVFs)
	}
	t.Logf("5 concurrent ADDs on 4 VFs: 4 attached, %s refused with CNI 11", loser.Name)

	// DEL restores name, MAC and MTU in the host.
	vfA := 0
	a := owner[vfA]
	if err := fast.Del(ctx, a.RuntimeConf("net1")); err != nil {
		t.Fatalf("DEL %s: %v", a.Name, err)
	}
	if err := assertHome(h, vfLinks(t, fix, namespaces(h, ctrs...)), vfA, mtu); err != nil {
		t.Fatalf("after DEL: %v", err)
	}

	// Stale DEL: the VF goes to the refused container; a second DEL of the old owner (a
	// runtime retrying, sriov-cni #219) succeeds and leaves the new owner's VF where it is.
	res, err := fast.Add(ctx, loser.RuntimeConf("net1"))
	if err != nil {
		t.Fatalf("ADD after a VF was freed: %v", err)
	}
	if vf, _ := sriovAttached(t, h, loser, res, "net1", fastSubnet, ctrMTU); vf != vfA {
		t.Fatalf("new owner got vf %d, want the freed vf %d", vf, vfA)
	}
	if err := fast.Del(ctx, a.RuntimeConf("net1")); err != nil {
		t.Fatalf("stale DEL: %v", err)
	}
	if w := vfLinks(t, fix, namespaces(h, ctrs...))[vfA]; w.ns != loser.Name || w.name != "net1" || !w.up {
		t.Fatalf("stale DEL moved the new owner's vf: %+v", w)
	}
	if err := fast.Check(ctx, loser.RuntimeConf("net1")); err != nil {
		t.Fatalf("CHECK of the new owner after the stale DEL: %v", err)
	}
	owner[vfA] = loser

	// DEL after the netns is gone: the stand-in dies with the namespace (a real VF would
	// return to the host); DEL succeeds, the VF is quarantined, and when it shows up in the
	// host again (Revive, under the name it had inside) the peer restores and frees it at its
	// next rescan (--sriov-rescan, 2s in these labs).
	vfB := 1
	b := owner[vfB]
	if err := b.Delete(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 10*time.Second, "the stand-in to die with its namespace", func() error {
		if w, ok := vfLinks(t, fix, namespaces(h))[vfB]; ok {
			return fmt.Errorf("vf %d still at %+v", vfB, w)
		}
		return nil
	})
	if err := fast.Del(ctx, b.RuntimeConf("net1")); err != nil {
		t.Fatalf("DEL after the netns is gone: %v", err)
	}
	if _, ok := mustStatus(t, ctx, h).Attachment(b.ID, "net1"); ok {
		t.Fatal("attachment survives its DEL")
	}
	// Quarantined, the VF is nobody's to take: with the other three held, an ADD waits (11).
	c2 := mustContainer(t, h)
	ctrs = append(ctrs, c2)
	if _, err := fast.Add(ctx, c2.RuntimeConf("net1")); err == nil {
		t.Fatal("an ADD got a VF while the only one not held was quarantined")
	} else if code, _ := lab.ErrorCode(err); code != 11 {
		t.Fatalf("ADD while the free VF is quarantined: %v, want CNI error 11", err)
	}
	if err := fix.Revive(vfB, "net1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 20*time.Second, "the quarantined vf restored once back in the host", func() error {
		return assertHome(h, vfLinks(t, fix, namespaces(h)), vfB, mtu)
	})
	waitFor(t, ctx, 45*time.Second, "the found vf handed out again", func() error {
		res, err := fast.Add(ctx, c2.RuntimeConf("net1"))
		if err != nil {
			return err
		}
		if vf, _ := sriovAttached(t, h, c2, res, "net1", fastSubnet, ctrMTU); vf != vfB {
			t.Fatalf("ADD got vf %d, want the found vf %d", vf, vfB)
		}
		return nil
	})
	owner[vfB] = c2

	// GC: a runtime with its own cache attached nothing the main one knows; the main one's
	// GC lists every container but the one holding vf 2 as valid, and the VF comes home.
	vfC := 2
	leak := owner[vfC]
	var valid []types.GCAttachment
	for vf, c := range owner {
		if vf != vfC {
			valid = append(valid, types.GCAttachment{ContainerID: c.ID, IfName: "net1"})
		}
	}
	other := mustCNI(t, h, lab.CNIOptions{Name: "weft-fast", Network: "fast", MTU: ctrMTU, CacheDir: t.TempDir()})
	if err := other.GC(ctx, valid); err != nil {
		t.Fatalf("GC: %v", err)
	}
	waitFor(t, ctx, 10*time.Second, "GC to bring the leaked vf home", func() error {
		return assertHome(h, vfLinks(t, fix, namespaces(h, ctrs...)), vfC, mtu)
	})
	if _, ok := mustStatus(t, ctx, h).Attachment(leak.ID, "net1"); ok {
		t.Fatal("GC left the leaked attachment")
	}
	for vf, c := range owner {
		if vf == vfC {
			continue
		}
		if err := fast.Check(ctx, c.RuntimeConf("net1")); err != nil {
			t.Fatalf("GC hurt the valid attachment of vf %d: %v", vf, err)
		}
	}
}

// kill -9 of the peer in the middle of ADDs: 4 concurrent ADDs race a SIGKILL timed to land
// inside them (half the median ADD measured first). After the restart, without any DEL,
// every VF is either home (own name, MAC, MTU) or in a container as net1 whose attachment
// the peer lists: no VF is lost, half moved or held by a dead ADD. The runtime then DELs the
// failed ADDs, and all four VFs can be attached again. Repeated for several kill offsets
// (more rounds while no kill has yet caught a VF outside the host with its ADD unfinished).
func TestSRIOVKillMidAdd(t *testing.T) {
	l := newSRIOVLab(t, "wsrk", 1)
	ctx := testCtx(t, 5*time.Minute)
	h := l.Host(0)
	fix := h.SRIOV()
	createSRIOVNetwork(t, ctx, l, "fast", fastSubnet, "off")
	// The container's MTU differs from the VF's, so that DEL has an MTU to restore.
	fast := mustCNI(t, h, lab.CNIOptions{Name: "weft-fast", Network: "fast", MTU: ctrMTU})
	mtu := hostMTU(t, h)

	// Median time of one ADD, to aim the kills: four concurrent ADDs take up to about four
	// times as long, so the kills land from half a median to four medians after the start.
	var ds []time.Duration
	for range 3 {
		c := mustContainer(t, h)
		start := time.Now()
		if _, err := fast.Add(ctx, c.RuntimeConf("net1")); err != nil {
			t.Fatalf("warm-up ADD: %v", err)
		}
		ds = append(ds, time.Since(start))
		if err := fast.Del(ctx, c.RuntimeConf("net1")); err != nil {
			t.Fatalf("warm-up DEL: %v", err)
		}
	}
	slices.Sort(ds)
	med := ds[1]
	t.Logf("median ADD %s", med)

	// At least 4 rounds; up to 8 until some kill caught a VF in the middle of its move.
	landed, caught, rounds := 0, 0, 0
	for round, frac := range []float64{0.5, 1.5, 2.5, 3.5, 1, 2, 3, 4} {
		if round >= 4 && caught > 0 {
			break
		}
		rounds++
		ctrs := make([]*lab.Container, sriovVFs)
		for k := range ctrs {
			ctrs[k] = mustContainer(t, h)
		}
		errs := make([]error, len(ctrs))
		var wg sync.WaitGroup
		for k, c := range ctrs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[k] = fast.Add(ctx, c.RuntimeConf("net1"))
			}()
		}
		time.Sleep(time.Duration(frac * float64(med))) // aims the kill; not a wait for state
		if err := h.Kill(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		// Inside an ADD's kernel work: a VF out of place whose ADD did not succeed.
		where := vfLinks(t, fix, namespaces(h, ctrs...))
		midKernel := 0
		for i := 0; i < sriovVFs; i++ {
			w, ok := where[i]
			if !ok || assertHome(h, where, i, mtu) == nil {
				continue
			}
			if k := slices.IndexFunc(ctrs, func(c *lab.Container) bool { return c.Name == w.ns }); k < 0 || errs[k] != nil {
				midKernel++
			}
		}
		nFailed := 0
		for _, err := range errs {
			if err != nil {
				nFailed++
			}
		}
		if nFailed > 0 {
			landed++
		}
		caught += midKernel
		if err := h.Start(ctx); err != nil {
			t.Fatal(err)
		}
		waitLeader(t, ctx, l.Hosts())

		// Repaired on restart, before any DEL.
		waitFor(t, ctx, 20*time.Second, "every vf home or attached after the restart", func() error {
			st, err := h.Status(ctx)
			if err != nil {
				return err
			}
			where := vfLinks(t, fix, namespaces(h, ctrs...))
			for i := 0; i < sriovVFs; i++ {
				w, ok := where[i]
				if !ok {
					return fmt.Errorf("vf %d lost", i)
				}
				if w.ns == h.Name {
					if err := assertHome(h, where, i, mtu); err != nil {
						return err
					}
					continue
				}
				if _, ok := st.Attachment(w.ns, "net1"); !ok || w.name != "net1" {
					return fmt.Errorf("vf %d is in %s as %s, and the peer lists no attachment for it", i, w.ns, w.name)
				}
			}
			return nil
		})
		t.Logf("round %d: kill at %.1f×median, %d of %d ADDs failed, %d VFs caught mid-move; repaired",
			round, frac, nFailed, len(ctrs), midKernel)

		// The runtime DELs every container (the failed ADDs too, as CNI asks); all VFs home.
		for _, c := range ctrs {
			if err := fast.Del(ctx, c.RuntimeConf("net1")); err != nil {
				t.Fatalf("DEL %s after the restart: %v", c.Name, err)
			}
		}
		where = vfLinks(t, fix, namespaces(h, ctrs...))
		for i := 0; i < sriovVFs; i++ {
			if err := assertHome(h, where, i, mtu); err != nil {
				t.Fatalf("round %d after DELs: %v", round, err)
			}
		}
		if got := fastUsed(t, ctx, h); got != 0 {
			t.Fatalf("round %d: fast holds %d addresses after every DEL", round, got)
		}
		for _, c := range ctrs {
			c.Delete()
		}
	}
	t.Logf("the kill cut short some ADD in %d of %d rounds and caught %d VFs mid-move", landed, rounds, caught)
	if landed == 0 {
		t.Fatal("every ADD finished before its kill in every round; the test proved nothing")
	}

	// The pool is whole: four ADDs take the four VFs.
	var ctrs []*lab.Container
	for range sriovVFs {
		c := mustContainer(t, h)
		ctrs = append(ctrs, c)
		if _, err := fast.Add(ctx, c.RuntimeConf("net1")); err != nil {
			t.Fatalf("ADD after the kills: %v", err)
		}
	}
	if where := vfLinks(t, fix, namespaces(h, ctrs...)); len(where) != sriovVFs {
		t.Fatalf("after the kills 4 ADDs placed %v", where)
	}
}

// The vfio-bound VF on a network with --dpdk on: ADD returns an interface with the VF's
// pciID (CNI 1.1) and an address from the network, writes a device-info file naming the PCI
// address, and moves no netdev (the host's and the container's links are unchanged). DEL
// removes the file and frees the VF for the next ADD.
func TestSRIOVDPDK(t *testing.T) {
	l := newSRIOVLab(t, "wsrd", 1)
	ctx := testCtx(t, 2*time.Minute)
	h := l.Host(0)
	fix := h.SRIOV()
	createSRIOVNetwork(t, ctx, l, "dp", dpdkSubnet, "on")
	dp := mustCNI(t, h, lab.CNIOptions{Name: "weft-dp", Network: "dp"})

	hostBefore, err := h.LinkNames()
	if err != nil {
		t.Fatal(err)
	}
	ctr := mustContainer(t, h)
	res, err := dp.Add(ctx, ctr.RuntimeConf("net1"))
	if err != nil {
		t.Fatalf("ADD on the dpdk network: %v", err)
	}
	r, err := current.GetResult(res)
	if err != nil {
		t.Fatal(err)
	}
	wantPCI := fix.VFPCI(sriovVFs)
	var pci []string
	for _, x := range r.Interfaces {
		if x.PciID != "" {
			pci = append(pci, x.PciID)
		}
	}
	if !slices.Equal(pci, []string{wantPCI}) {
		t.Fatalf("result interfaces %+v: pciIDs %v, want [%s]", r.Interfaces, pci, wantPCI)
	}
	addr, err := lab.ResultAddress(res)
	if err != nil || !dpdkSubnet.Contains(addr.Addr()) {
		t.Fatalf("result address %s (%v), want one in %s", addr, err, dpdkSubnet)
	}
	if names, _ := ctr.LinkNames(); !slices.Equal(names, []string{"lo"}) {
		t.Fatalf("container links %v after a dpdk ADD, want only lo", names)
	}
	if hostAfter, _ := h.LinkNames(); !slices.Equal(hostAfter, hostBefore) {
		t.Fatalf("host links changed by a dpdk ADD: %v -> %v", hostBefore, hostAfter)
	}
	file := deviceInfoFile(t, h, ctr.ID)
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var di struct {
		Type string `json:"type"`
		PCI  struct {
			Address string `json:"pci-address"`
		} `json:"pci"`
	}
	if err := json.Unmarshal(b, &di); err != nil || di.Type != "pci" || di.PCI.Address != wantPCI {
		t.Fatalf("device-info %s = %s (%v), want type pci and pci-address %s", file, b, err, wantPCI)
	}
	t.Logf("dpdk ADD: pciID %s, address %s, %s", wantPCI, addr, filepath.Base(file))

	// One vfio VF: a second container must wait (11) until the first is deleted.
	ctr2 := mustContainer(t, h)
	if _, err := dp.Add(ctx, ctr2.RuntimeConf("net1")); err == nil {
		t.Fatal("a second dpdk ADD got a VF the host does not have")
	} else if code, _ := lab.ErrorCode(err); code != 11 {
		t.Fatalf("second dpdk ADD: %v, want CNI error 11", err)
	}
	if err := dp.Del(ctx, ctr.RuntimeConf("net1")); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("device-info file survives DEL: %v", err)
	}
	res, err = dp.Add(ctx, ctr2.RuntimeConf("net1"))
	if err != nil {
		t.Fatalf("ADD after DEL: %v", err)
	}
	r, _ = current.GetResult(res)
	if len(r.Interfaces) == 0 || r.Interfaces[len(r.Interfaces)-1].PciID != wantPCI {
		t.Fatalf("ADD after DEL: interfaces %+v, want pciID %s", r.Interfaces, wantPCI)
	}
}

// deviceInfoFile returns the one device-info file of container id in h's directory.
func deviceInfoFile(t *testing.T, h *lab.Host, id string) string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(h.DeviceInfoDir(), "*"+id+"*"))
	if err != nil || len(files) != 1 {
		all, _ := os.ReadDir(h.DeviceInfoDir())
		t.Fatalf("device-info files for %s: %v (%v); the directory holds %v", id, files, err, all)
	}
	return files[0]
}
