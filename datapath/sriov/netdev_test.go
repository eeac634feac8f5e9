package sriov

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath/nslab"
)

// moveLab is a host netns with a veth parent and three macvlan (bridge mode) stand-ins for
// VF netdevs, ens1f0v0..2, and an empty container netns. Prefix wsk.
type moveLab struct {
	hostPath, contPath, contName string
	host, cont                   *netlink.Handle
	pf                           *FakePF
	others                       int
}

const labPF = "ens1f0"

func newMoveLab(t testing.TB) *moveLab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it builds network namespaces and macvlans")
	}
	id := fmt.Sprintf("%d%d", os.Getpid()%10000, time.Now().UnixNano()%100000)
	l := &moveLab{pf: NewFakePF()}
	hostName, contName := "wsk-h"+id, "wsk-c"+id
	var err error
	if l.hostPath, err = nslab.CreateNetNS(hostName); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nslab.DeleteNetNS(hostName) })
	if l.contPath, err = nslab.CreateNetNS(contName); err != nil {
		t.Fatal(err)
	}
	l.contName = contName
	t.Cleanup(func() { nslab.DeleteNetNS(contName) })
	if l.host, err = nslab.HandleAt(l.hostPath); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.host.Close)
	if l.cont, err = nslab.HandleAt(l.contPath); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l.cont != nil {
			l.cont.Close()
		}
	})
	// The kernel here has no dummy driver: a veth pair is the parent.
	parent := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: labPF, MTU: 1500}, PeerName: "wskpeer"}
	if err := l.host.LinkAdd(parent); err != nil {
		t.Fatal(err)
	}
	p, err := l.host.LinkByName(labPF)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.host.LinkSetUp(p); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		mv := &netlink.Macvlan{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("%sv%d", labPF, i),
			ParentIndex: p.Attrs().Index}, Mode: netlink.MACVLAN_MODE_BRIDGE}
		if err := l.host.LinkAdd(mv); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// addOther adds a link named name through h (a veth pair: this kernel has no dummy
// driver), to hold a name the VF might want.
func (l *moveLab) addOther(t testing.TB, h *netlink.Handle, name string) {
	t.Helper()
	l.others++
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: fmt.Sprintf("wskother%d", l.others)}
	if err := h.LinkAdd(v); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
}

func (l *moveLab) save(t testing.TB, vf int) NetdevState {
	t.Helper()
	st, err := SaveState(l.hostPath, fmt.Sprintf("%sv%d", labPF, vf), l.pf, labPF, vf)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (l *moveLab) request(st NetdevState, vf int) MoveRequest {
	return MoveRequest{HostNS: l.hostPath, NetNS: l.contPath, IfName: "net1", Saved: st,
		PF: l.pf, PFName: labPF, VFIndex: vf,
		VF:  VFSettings{VLAN: settingPtr(100), SpoofChk: settingPtr(false), Trust: settingPtr(true)},
		MAC: net.HardwareAddr{0x02, 0x77, 0, 0, 0, byte(vf + 1)}, MTU: 1400,
		Address: netip.MustParsePrefix("10.9.0.5/24"), Gateway: netip.MustParseAddr("10.9.0.1")}
}

func (l *moveLab) outRequest(req MoveRequest) MoveOutRequest {
	return MoveOutRequest{HostNS: req.HostNS, NetNS: req.NetNS, IfName: req.IfName, Saved: req.Saved,
		PF: req.PF, PFName: req.PFName, VFIndex: req.VFIndex, VF: req.VF}
}

// assertHome fails unless the VF is in the host under its saved name, MAC and MTU, down, not
// in the container under ifname, and its PF settings are the saved ones.
func (l *moveLab) assertHome(t *testing.T, st NetdevState, vf int, ifname string) {
	t.Helper()
	hl, err := l.host.LinkByName(st.Name)
	if err != nil {
		t.Fatalf("%s not back in the host: %v", st.Name, err)
	}
	a := hl.Attrs()
	if !bytes.Equal(a.HardwareAddr, st.MAC) || a.MTU != st.MTU {
		t.Errorf("%s in the host: mac %s mtu %d, want %s %d", st.Name, a.HardwareAddr, a.MTU, st.MAC, st.MTU)
	}
	if a.Flags&net.FlagUp != 0 {
		t.Errorf("%s in the host is up, want down", st.Name)
	}
	if l.cont != nil { // nil once the container's netns is deleted
		if _, err := l.cont.LinkByName(ifname); err == nil {
			t.Errorf("%s still in the container", ifname)
		}
	}
	got, _ := l.pf.VF(labPF, vf)
	if want := SettingsOf(st); !sameSettings(got, want) {
		t.Errorf("pf settings of vf %d: %s, want %s", vf, fmtSettings(got), fmtSettings(want))
	}
}

func sameSettings(a, b VFSettings) bool { return fmtSettings(a) == fmtSettings(b) }

func fmtSettings(s VFSettings) string {
	f := func(p any) string {
		switch v := p.(type) {
		case *int:
			if v != nil {
				return fmt.Sprint(*v)
			}
		case *bool:
			if v != nil {
				return fmt.Sprint(*v)
			}
		case *string:
			if v != nil {
				return *v
			}
		}
		return "-"
	}
	return fmt.Sprintf("vlan=%s qos=%s spoofchk=%s trust=%s state=%s rate=%s..%s", f(s.VLAN), f(s.QoS),
		f(s.SpoofChk), f(s.Trust), f(s.LinkState), f(s.MinTxRate), f(s.MaxTxRate))
}

func TestMoveInOutRoundTrip(t *testing.T) {
	l := newMoveLab(t)
	st := l.save(t, 1)
	req := l.request(st, 1)
	res, err := MoveIn(req)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(res.MAC, req.MAC) || res.MTU != 1400 {
		t.Errorf("result mac %s mtu %d, want %s 1400", res.MAC, res.MTU, req.MAC)
	}
	if err := Check(req); err != nil {
		t.Fatalf("check after MoveIn: %v", err)
	}
	if _, err := l.host.LinkByName(st.Name); err == nil {
		t.Errorf("%s still in the host after MoveIn", st.Name)
	}
	routes, err := l.cont.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(routes, func(r netlink.Route) bool {
		return (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == "10.9.0.1"
	}) {
		t.Errorf("no default route via 10.9.0.1 in the container: %v", routes)
	}
	got, _ := l.pf.VF(labPF, 1)
	if *got.VLAN != 100 || *got.SpoofChk || !*got.Trust || *got.QoS != 0 {
		t.Errorf("pf settings after MoveIn: %s", fmtSettings(got))
	}
	calls := len(l.pf.Calls())

	// Idempotent: the same MoveIn again converges and succeeds, no PF call.
	res2, err := MoveIn(req)
	if err != nil {
		t.Fatalf("second MoveIn: %v", err)
	}
	if res2.Index != res.Index {
		t.Errorf("second MoveIn: index %d, first %d", res2.Index, res.Index)
	}
	if n := len(l.pf.Calls()); n != calls {
		t.Errorf("second MoveIn made %d pf calls", n-calls)
	}

	if err := MoveOut(l.outRequest(req)); err != nil {
		t.Fatal(err)
	}
	l.assertHome(t, st, 1, "net1")
	if err := Check(req); !errors.Is(err, ErrNetdevNotFound) {
		t.Errorf("check after MoveOut: %v, want ErrNetdevNotFound", err)
	}
	// Idempotent: already home is success.
	if err := MoveOut(l.outRequest(req)); err != nil {
		t.Errorf("second MoveOut: %v", err)
	}
	l.assertHome(t, st, 1, "net1")
}

func TestSecondaryRoutes(t *testing.T) {
	l := newMoveLab(t)
	st := l.save(t, 0)
	req := l.request(st, 0)
	req.PF, req.Secondary, req.Range = nil, true, netip.MustParsePrefix("10.0.0.0/8")
	if _, err := MoveIn(req); err != nil {
		t.Fatal(err)
	}
	routes, err := l.cont.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var rangeRoute bool
	for _, r := range routes {
		if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
			t.Errorf("secondary interface got a default route: %v", r)
		}
		if r.Dst != nil && r.Dst.String() == "10.0.0.0/8" && r.Gw.String() == "10.9.0.1" {
			rangeRoute = true
		}
	}
	if !rangeRoute {
		t.Errorf("no route to 10.0.0.0/8 via 10.9.0.1: %v", routes)
	}
	out := l.outRequest(req)
	if err := MoveOut(out); err != nil {
		t.Fatal(err)
	}
	l.assertHome(t, st, 0, "net1")
}

func TestNameClashes(t *testing.T) {
	l := newMoveLab(t)
	st := l.save(t, 2)
	// The container already holds the VF's host name, and the host holds the container name:
	// both moves go through the temporary name and succeed.
	l.addOther(t, l.cont, st.Name)
	l.addOther(t, l.host, "net1")
	req := l.request(st, 2)
	if _, err := MoveIn(req); err != nil {
		t.Fatalf("MoveIn with %s taken in the container: %v", st.Name, err)
	}
	if err := Check(req); err != nil {
		t.Fatal(err)
	}

	// The host name taken while the VF was away: MoveOut brings it home under its temporary
	// name with its MAC and MTU restored and says so; a retry after the clash clears wins.
	l.addOther(t, l.host, st.Name)
	err := MoveOut(l.outRequest(req))
	if !errors.Is(err, ErrNameTaken) {
		t.Fatalf("MoveOut with %s taken in the host: %v, want ErrNameTaken", st.Name, err)
	}
	tl, err := l.host.LinkByName(vfTempName(st.Name))
	if err != nil {
		t.Fatalf("vf not in the host under %s: %v", vfTempName(st.Name), err)
	}
	if !bytes.Equal(tl.Attrs().HardwareAddr, st.MAC) || tl.Attrs().MTU != st.MTU {
		t.Errorf("vf under its temporary name: mac %s mtu %d, want %s %d",
			tl.Attrs().HardwareAddr, tl.Attrs().MTU, st.MAC, st.MTU)
	}
	other, err := l.host.LinkByName(st.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.host.LinkDel(other); err != nil {
		t.Fatal(err)
	}
	if err := MoveOut(l.outRequest(req)); err != nil {
		t.Fatalf("MoveOut retry: %v", err)
	}
	l.assertHome(t, st, 2, "net1")

	// The container's interface name held by another link: refused, nothing changed.
	l.addOther(t, l.cont, "net1")
	calls := len(l.pf.Calls())
	if _, err := MoveIn(req); !errors.Is(err, ErrNameTaken) {
		t.Fatalf("MoveIn onto a taken ifname: %v, want ErrNameTaken", err)
	}
	l.assertHome(t, st, 2, "eth-none")
	if n := len(l.pf.Calls()); n != calls {
		t.Errorf("refused MoveIn made %d pf calls", n-calls)
	}
}

func TestMoveInClearsAltNames(t *testing.T) {
	l := newMoveLab(t)
	st := l.save(t, 0)
	hl, err := l.host.LinkByName(st.Name)
	if err != nil {
		t.Fatal(err)
	}
	const alt = "wskaltv0"
	if err := l.host.LinkAddAltName(hl, alt); err != nil {
		t.Fatalf("add altname: %v", err)
	}
	// The container already uses the altname as a name: an altname carried along would make
	// the move fail with EEXIST (sriov-cni #445).
	l.addOther(t, l.cont, alt)
	req := l.request(st, 0)
	if _, err := MoveIn(req); err != nil {
		t.Fatal(err)
	}
	cl, err := l.cont.LinkByName("net1")
	if err != nil {
		t.Fatal(err)
	}
	if len(cl.Attrs().AltNames) != 0 {
		t.Errorf("altnames in the container: %v", cl.Attrs().AltNames)
	}
	if err := MoveOut(l.outRequest(req)); err != nil {
		t.Fatal(err)
	}
	l.assertHome(t, st, 0, "net1")
}

// Each failure leaves the VF at home unchanged: name, MAC, MTU, down, PF settings, altname.
func TestMoveInFailureRestores(t *testing.T) {
	cases := []struct {
		name   string
		change func(*MoveRequest, *FakePF)
		want   error // nil: any error
	}{
		{"pf fails on vlan", func(_ *MoveRequest, f *FakePF) { f.FailOn = 1 }, ErrInjected},
		{"pf fails on spoofchk", func(_ *MoveRequest, f *FakePF) { f.FailOn = 2 }, ErrInjected},
		{"pf fails on trust", func(_ *MoveRequest, f *FakePF) { f.FailOn = 3 }, ErrInjected},
		{"mtu above the parent's", func(r *MoveRequest, _ *FakePF) { r.MTU = 9000 }, nil},
		{"gateway off link", func(r *MoveRequest, _ *FakePF) { r.Gateway = netip.MustParseAddr("10.99.0.1") }, nil},
		{"no address", func(r *MoveRequest, _ *FakePF) { r.Address = netip.Prefix{} }, ErrBadMove},
		{"bad vlan", func(r *MoveRequest, _ *FakePF) { r.VF.VLAN = settingPtr(5000) }, ErrBadMove},
		{"multicast mac", func(r *MoveRequest, _ *FakePF) { r.MAC = net.HardwareAddr{1, 0, 0x5e, 0, 0, 1} }, ErrBadMove},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := newMoveLab(t)
			st := l.save(t, 1)
			hl, err := l.host.LinkByName(st.Name)
			if err != nil {
				t.Fatal(err)
			}
			const alt = "wsk-alt-v1"
			if err := l.host.LinkAddAltName(hl, alt); err != nil {
				t.Fatal(err)
			}
			req := l.request(st, 1)
			c.change(&req, l.pf)
			_, err = MoveIn(req)
			if err == nil || (c.want != nil && !errors.Is(err, c.want)) {
				t.Fatalf("MoveIn: %v, want failure %v", err, c.want)
			}
			t.Logf("MoveIn failed as asked: %v", err)
			l.assertHome(t, st, 1, "net1")
			if _, err := l.cont.LinkByName(vfTempName(st.Name)); err == nil {
				t.Errorf("vf left in the container under its temporary name")
			}
			hl, err = l.host.LinkByName(st.Name)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(hl.Attrs().AltNames, alt) {
				t.Errorf("altname %s not given back: %v", alt, hl.Attrs().AltNames)
			}
			// Every PF call after the failed one restores, in reverse.
			calls := l.pf.Calls()
			for i, cl := range calls {
				if cl.Err != nil && i+1 != l.pf.FailOn && c.want == ErrInjected {
					t.Errorf("pf call %d failed: %v", i+1, cl.Err)
				}
			}
			// And the VF works afterwards: the failure left nothing in the way.
			l.pf.FailOn = 0
			if _, err := MoveIn(l.request(st, 1)); err != nil {
				t.Fatalf("MoveIn after the failure: %v", err)
			}
		})
	}
}

func TestMoveOutNetNSGone(t *testing.T) {
	l := newMoveLab(t)
	st := l.save(t, 0)
	req := l.request(st, 0)
	if _, err := MoveIn(req); err != nil {
		t.Fatal(err)
	}
	// Our handle's socket would keep the netns alive.
	l.cont.Close()
	l.cont = nil
	if err := nslab.DeleteNetNS(l.contName); err != nil {
		t.Fatal(err)
	}
	// Real kernel behaviour: a virtual netdev (macvlan) in a dying netns is destroyed with
	// it. A real VF netdev is not: the kernel moves it to the initial netns, with the
	// container's MAC, under its container name or dev<N>, which is why MoveOut reports ErrNetNSGone and
	// the caller quarantines the VF instead of handing it out again.
	nslab.Eventually(t, 5*time.Second, "the macvlan destroyed with its netns", func() error {
		links, err := l.host.LinkList()
		if err != nil {
			return err
		}
		for _, hl := range links {
			if bytes.Equal(hl.Attrs().HardwareAddr, req.MAC) {
				return fmt.Errorf("%s with the container's mac is in the host", hl.Attrs().Name)
			}
		}
		return nil
	})
	// MoveIn into the dead netns: refused, the VF untouched.
	st1 := l.save(t, 1)
	if _, err := MoveIn(l.request(st1, 1)); !errors.Is(err, ErrNetNSGone) {
		t.Errorf("MoveIn into a deleted netns: %v, want ErrNetNSGone", err)
	}
	l.assertHome(t, st1, 1, "net1")
	out := l.outRequest(req)
	if err := MoveOut(out); !errors.Is(err, ErrNetNSGone) {
		t.Fatalf("MoveOut after the netns died: %v, want ErrNetNSGone", err)
	}
	if _, err := l.host.LinkByName(st.Name); err == nil {
		t.Errorf("a macvlan came back as %s; the kernel destroys it", st.Name)
	}
	// The PF side is restored all the same.
	got, _ := l.pf.VF(labPF, 0)
	if !sameSettings(got, SettingsOf(st)) {
		t.Errorf("pf settings after MoveOut: %s, want %s", fmtSettings(got), fmtSettings(SettingsOf(st)))
	}
}

// Three VFs moved into one container at once, then out at once: each temporary name is its
// own, so concurrent moves do not collide.
func TestConcurrentMoves(t *testing.T) {
	l := newMoveLab(t)
	var reqs []MoveRequest
	for vf := 0; vf < 3; vf++ {
		r := l.request(l.save(t, vf), vf)
		r.IfName = fmt.Sprintf("net%d", vf+1)
		r.Address = netip.MustParsePrefix(fmt.Sprintf("10.9.%d.5/24", vf))
		r.Gateway, r.PF = netip.Addr{}, nil
		reqs = append(reqs, r)
	}
	errc := make(chan error, len(reqs))
	for _, r := range reqs {
		go func() { _, err := MoveIn(r); errc <- err }()
	}
	for range reqs {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range reqs {
		if err := Check(r); err != nil {
			t.Error(err)
		}
	}
	for _, r := range reqs {
		go func() { errc <- MoveOut(l.outRequest(r)) }()
	}
	for range reqs {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	for vf, r := range reqs {
		l.assertHome(t, r.Saved, vf, r.IfName)
	}
}

// A VF saved with an all-zero MAC (mlx5 VFs before one is set) is never found by MAC: lo
// has that MAC too, and MoveOut must not rename it.
func TestFindInHostIgnoresZeroMAC(t *testing.T) {
	l := newMoveLab(t)
	if l2, ok := findInHost(l.host, NetdevState{Name: "wsk-gone", MAC: make(net.HardwareAddr, 6), MTU: 1500}); ok {
		t.Errorf("found %s by an all-zero mac", l2.Attrs().Name)
	}
	st := l.save(t, 0)
	if got, ok := findInHost(l.host, NetdevState{Name: "wsk-renamed", MAC: st.MAC, MTU: 1500}); !ok || got.Attrs().Name != st.Name {
		t.Errorf("not found by its mac under another name: %v", ok)
	}
}

// An altname the VF picked up in the container, equal to a name in the host, would make the
// move home fail (the kernel checks altnames on a netns change) and follow the VF to its
// next container: MoveOut drops it.
func TestMoveOutClearsAltNames(t *testing.T) {
	l := newMoveLab(t)
	st := l.save(t, 0)
	req := l.request(st, 0)
	if _, err := MoveIn(req); err != nil {
		t.Fatal(err)
	}
	const alt = "wskhostname"
	l.addOther(t, l.host, alt)
	cl, err := l.cont.LinkByName(req.IfName)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.cont.LinkAddAltName(cl, alt); err != nil {
		t.Fatal(err)
	}
	if err := MoveOut(l.outRequest(req)); err != nil {
		t.Fatal(err)
	}
	l.assertHome(t, st, 0, req.IfName)
	hl, err := l.host.LinkByName(st.Name)
	if err != nil {
		t.Fatal(err)
	}
	if len(hl.Attrs().AltNames) != 0 {
		t.Errorf("altnames after MoveOut: %v", hl.Attrs().AltNames)
	}
}

// BenchmarkMoveInOut is one ADD and DEL of a VF netdev on the stand-ins: MoveIn with MAC,
// MTU, address, default route and three PF settings (on the fake), then MoveOut.
func BenchmarkMoveInOut(b *testing.B) {
	l := newMoveLab(b)
	req := l.request(l.save(b, 0), 0)
	out := l.outRequest(req)
	for b.Loop() {
		if _, err := MoveIn(req); err != nil {
			b.Fatal(err)
		}
		if err := MoveOut(out); err != nil {
			b.Fatal(err)
		}
	}
}
