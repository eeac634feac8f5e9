package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
)

// The kernel tests need root and a kernel with netns, veth, bridge and VXLAN. They build
// labs of namespaces named wvx-<pid>-<test>-…, never touch the machine's own namespace, and
// remove them. Not being root is a failure, not a skip: CI runs as root.

func newLab(t *testing.T, tag string, hosts int, routed bool) *nslab.Lab {
	t.Helper()
	return nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wvx-%d-%s-", os.Getpid()%100000, tag), Hosts: hosts, Routed: routed})
}

func deadline(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// kernelState is what a driver made on one host, as sorted strings, to compare whole.
type kernelState struct {
	Ifindex int
	FDB     []string // "mac dst ip"
	Neigh   []string // "ip mac"
	Routes  []string // "dst via gw src onlink"
}

func snapshot(h *nslab.Host, name string) (kernelState, error) {
	var s kernelState
	err := h.Do(func() error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		s.Ifindex = link.Attrs().Index
		fdb, err := netlink.NeighList(s.Ifindex, unix.AF_BRIDGE)
		if err != nil {
			return err
		}
		for _, n := range fdb {
			if n.State&netlink.NUD_PERMANENT == 0 || n.Flags&netlink.NTF_SELF == 0 {
				return fmt.Errorf("FDB entry %s not permanent+self: state %#x flags %#x", n.HardwareAddr, n.State, n.Flags)
			}
			s.FDB = append(s.FDB, fmt.Sprintf("%s dst %s", n.HardwareAddr, n.IP))
		}
		neigh, err := netlink.NeighList(s.Ifindex, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, n := range neigh {
			if n.State&netlink.NUD_PERMANENT == 0 {
				return fmt.Errorf("neighbour %s not permanent: state %#x", n.IP, n.State)
			}
			s.Neigh = append(s.Neigh, fmt.Sprintf("%s %s", n.IP, n.HardwareAddr))
		}
		routes, err := datapath.ListRoutes(nil, unix.RT_TABLE_MAIN, s.Ifindex)
		if err != nil {
			return err
		}
		for _, r := range routes {
			s.Routes = append(s.Routes, fmt.Sprintf("%s via %s src %s onlink=%v", r.Dst, r.Gw, r.Src, r.Flags&unix.RTNH_F_ONLINK != 0))
		}
		return nil
	})
	slices.Sort(s.FDB)
	slices.Sort(s.Neigh)
	slices.Sort(s.Routes)
	return s, err
}

// expected is the state a host should have for peers.
func expected(self *nslab.Host, peers []datapath.RemotePeer) kernelState {
	var s kernelState
	for _, p := range peers {
		s.FDB = append(s.FDB, fmt.Sprintf("%s dst %s", p.VTEPMAC, p.Underlay))
		s.Neigh = append(s.Neigh, fmt.Sprintf("%s %s", p.Underlay, p.VTEPMAC))
		for _, b := range p.Blocks {
			s.Routes = append(s.Routes, fmt.Sprintf("%s via %s src %s onlink=true", b, p.Underlay, self.Underlay.Addr()))
		}
	}
	slices.Sort(s.FDB)
	slices.Sort(s.Neigh)
	slices.Sort(s.Routes)
	return s
}

func sameState(a, b kernelState) bool {
	return slices.Equal(a.FDB, b.FDB) && slices.Equal(a.Neigh, b.Neigh) && slices.Equal(a.Routes, b.Routes)
}

// mesh brings up one VXLAN driver per host and one container per host, and gives every
// driver all the other hosts.
func mesh(t *testing.T, l *nslab.Lab) []*Driver {
	t.Helper()
	ctx := deadline(t, 10*time.Second)
	drivers := make([]*Driver, len(l.Hosts))
	for i, h := range l.Hosts {
		d, err := New(Config{Underlay: h.Underlay.Addr()})
		if err != nil {
			t.Fatal(err)
		}
		drivers[i] = d
		if err := h.Do(func() error { return d.Up(ctx) }); err != nil {
			t.Fatalf("%s: up: %v", h.Name, err)
		}
		t.Cleanup(func() { h.Do(d.Close) })
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
	}
	for i, h := range l.Hosts {
		if err := h.Do(func() error { return drivers[i].Set(peersOf(l, drivers, i)) }); err != nil {
			t.Fatalf("%s: set: %v", h.Name, err)
		}
	}
	return drivers
}

// peersOf is every host but i, as host i's driver gets them.
func peersOf(l *nslab.Lab, drivers []*Driver, i int) []datapath.RemotePeer {
	var peers []datapath.RemotePeer
	for j, h := range l.Hosts {
		if j != i {
			peers = append(peers, h.RemotePeer(drivers[j].MAC()))
		}
	}
	return peers
}

// TestMesh runs three hosts on a routed underlay (each on its own subnet, so only an
// overlay connects their containers) and checks traffic, the exact kernel state,
// idempotence, convergence after a peer leaves, and Close.
func TestMesh(t *testing.T) {
	l := newLab(t, "m", 3, true)
	drivers := mesh(t, l)
	ctx := deadline(t, 40*time.Second)
	h0, h1, h2 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	c0, c1, c2 := h0.Containers[0], h1.Containers[0], h2.Containers[0]

	// Every pair of containers across hosts.
	for _, pair := range [][2]*nslab.Container{{c0, c1}, {c0, c2}, {c1, c2}, {c2, c0}} {
		if err := pair[0].WaitPing(ctx, pair[1].Addr.Addr()); err != nil {
			t.Fatalf("%s → %s: %v", pair[0].Name, pair[1].Name, err)
		}
	}
	// A full 1400-byte packet (the containers' MTU) with DF set fits through the tunnel.
	if err := c0.WaitPing(ctx, c2.Addr.Addr(), "-M", "do", "-s", "1372"); err != nil {
		t.Fatalf("1400-byte DF ping: %v", err)
	}
	// The host itself reaches a remote container (routes carry src = underlay address).
	if err := h0.WaitPing(ctx, c1.Addr.Addr()); err != nil {
		t.Fatalf("host → remote container: %v", err)
	}
	// Some MBs over TCP: MSS and MTU agree end to end, nothing is lost or corrupted.
	if bps, err := nslab.Transfer(ctx, c0, c2, 32<<20); err != nil {
		t.Fatalf("TCP transfer c0 → c2: %v", err)
	} else {
		t.Logf("TCP transfer over vxlan: %.0f Mbit/s", bps/1e6)
	}

	// The device as configured: no learning, our VNI, port, source address, MTU.
	out, err := h0.Run(ctx, "ip", "-d", "link", "show", DefaultName)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"nolearning", "vxlan id 4242", "dstport 6784", "local " + h0.Underlay.Addr().String(), "mtu 1450", "dev eth0", drivers[0].MAC().String()} {
		if !strings.Contains(out, want) {
			t.Errorf("ip -d link show %s lacks %q:\n%s", DefaultName, want, out)
		}
	}
	if _, vx, _ := strings.Cut(out, "vxlan id"); strings.Contains(vx, " group ") || strings.Contains(vx, " remote ") {
		t.Errorf("device has a multicast group or default remote:\n%s", out)
	}

	// Exactly the expected FDB, neighbour entries and routes on every host.
	states := make([]kernelState, len(l.Hosts))
	for i, h := range l.Hosts {
		s, err := snapshot(h, DefaultName)
		if err != nil {
			t.Fatal(err)
		}
		if want := expected(h, peersOf(l, drivers, i)); !sameState(s, want) {
			t.Fatalf("%s: kernel state\n%+v\nwant\n%+v", h.Name, s, want)
		}
		states[i] = s
	}

	// A restarted peer (a new driver, same configuration) runs Up and Set again with the
	// same peers: nothing changes, the device included (same ifindex, same derived MAC),
	// so containers keep their connectivity across restarts.
	for i, h := range l.Hosts {
		err := h.Do(func() error {
			d, err := New(Config{Underlay: h.Underlay.Addr()})
			if err != nil {
				return err
			}
			if err := d.Up(ctx); err != nil {
				return err
			}
			return d.Set(peersOf(l, drivers, i))
		})
		if err != nil {
			t.Fatal(err)
		}
		s, err := snapshot(h, DefaultName)
		if err != nil {
			t.Fatal(err)
		}
		if !sameState(s, states[i]) || s.Ifindex != states[i].Ifindex {
			t.Fatalf("%s: second Up+Set changed the state:\n%+v\nwas\n%+v", h.Name, s, states[i])
		}
	}

	// Host 0 loses host 2: its FDB, neighbour entry and route go, host 1's stay.
	only1 := []datapath.RemotePeer{h1.RemotePeer(drivers[1].MAC())}
	if err := h0.Do(func() error { return drivers[0].Set(only1) }); err != nil {
		t.Fatal(err)
	}
	if s, _ := snapshot(h0, DefaultName); !sameState(s, expected(h0, only1)) {
		t.Fatalf("after removing %s: %+v, want %+v", h2.Name, s, expected(h0, only1))
	}
	if _, err := c0.Run(ctx, "ping", "-c1", "-W1", c2.Addr.Addr().String()); err == nil {
		t.Errorf("c0 still reaches c2 after host 2 was removed from host 0's peers")
	}
	if err := c0.WaitPing(ctx, c1.Addr.Addr()); err != nil {
		t.Fatalf("c0 → c1 after removing host 2: %v", err)
	}

	// A peer whose VTEP MAC changed (restart with another MAC) is updated in place.
	moved := h1.RemotePeer(net.HardwareAddr{0x02, 0, 0, 0, 0, 0x11})
	if err := h0.Do(func() error { return drivers[0].Set([]datapath.RemotePeer{moved}) }); err != nil {
		t.Fatal(err)
	}
	if s, _ := snapshot(h0, DefaultName); !sameState(s, expected(h0, []datapath.RemotePeer{moved})) {
		t.Fatalf("after MAC change: %+v", s)
	}

	// Close deletes the device and with it its routes; twice is fine.
	for i := 0; i < 2; i++ {
		if err := h0.Do(drivers[0].Close); err != nil {
			t.Fatalf("close %d: %v", i, err)
		}
	}
	err = h0.Do(func() error {
		if _, err := netlink.LinkByName(DefaultName); err == nil {
			return errors.New("device still there after Close")
		}
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: datapath.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err != nil || len(routes) != 0 {
			return fmt.Errorf("weft routes after Close: %v %v", routes, err)
		}
		if err := drivers[0].Set(only1); !errors.Is(err, datapath.ErrNotUp) {
			return fmt.Errorf("Set after Close = %v, want ErrNotUp", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestUpConverges checks flannel-style ensureLink: a compatible device is kept (its MTU and
// MAC corrected), an incompatible VXLAN device is replaced, a foreign link is refused.
func TestUpConverges(t *testing.T) {
	l := newLab(t, "up", 1, false)
	h := l.Hosts[0]
	ctx := deadline(t, 10*time.Second)
	err := h.Do(func() error {
		d, err := New(Config{Underlay: h.Underlay.Addr(), UnderlayDev: nslab.UnderlayDev})
		if err != nil {
			return err
		}
		if err := d.Up(ctx); err != nil {
			return err
		}
		first, _ := netlink.LinkByName(DefaultName)
		// Drift: another MTU and MAC and down. Up corrects them in place.
		netlink.LinkSetMTU(first, 1300)
		netlink.LinkSetHardwareAddr(first, net.HardwareAddr{2, 1, 2, 3, 4, 5})
		netlink.LinkSetDown(first)
		if err := d.Up(ctx); err != nil {
			return err
		}
		again, _ := netlink.LinkByName(DefaultName)
		if again.Attrs().Index != first.Attrs().Index {
			return errors.New("compatible device was recreated")
		}
		if again.Attrs().MTU != 1450 || again.Attrs().HardwareAddr.String() != d.MAC().String() || again.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("not converged: mtu %d mac %s flags %v", again.Attrs().MTU, again.Attrs().HardwareAddr, again.Attrs().Flags)
		}
		// Another VNI: the device is replaced.
		d2, _ := New(Config{Underlay: h.Underlay.Addr(), VNI: 77, MTU: 1400})
		if err := d2.Up(ctx); err != nil {
			return err
		}
		third, _ := netlink.LinkByName(DefaultName)
		vx, ok := third.(*netlink.Vxlan)
		if !ok || vx.VxlanId != 77 || vx.Learning || third.Attrs().MTU != 1400 {
			return fmt.Errorf("incompatible device not replaced right: %+v", third)
		}
		if err := d2.Close(); err != nil {
			return err
		}
		// A foreign link of our name is refused and left alone, by Up and by Close.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: DefaultName}, PeerName: "other"}); err != nil {
			return err
		}
		if err := d.Up(ctx); !errors.Is(err, datapath.ErrIncompatibleLink) {
			return fmt.Errorf("Up over a veth = %v, want ErrIncompatibleLink", err)
		}
		if err := d.Close(); !errors.Is(err, datapath.ErrIncompatibleLink) {
			return fmt.Errorf("Close of a veth = %v, want ErrIncompatibleLink", err)
		}
		if _, err := netlink.LinkByName(DefaultName); err != nil {
			return errors.New("foreign link was deleted")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSetReportsBadPeers checks that unusable peers are named in the error while the good
// ones still converge.
func TestSetReportsBadPeers(t *testing.T) {
	l := newLab(t, "bad", 1, false)
	h := l.Hosts[0]
	ctx := deadline(t, 10*time.Second)
	err := h.Do(func() error {
		d, err := New(Config{Underlay: h.Underlay.Addr()})
		if err != nil {
			return err
		}
		if err := d.Up(ctx); err != nil {
			return err
		}
		t.Cleanup(func() { h.Do(d.Close) })
		good := datapath.RemotePeer{Name: "good", Underlay: netip.MustParseAddr("172.31.0.50"),
			VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, Blocks: []netip.Prefix{netip.MustParsePrefix("10.40.9.0/26")}}
		bad := []datapath.RemotePeer{
			{Name: "nomac", Underlay: netip.MustParseAddr("172.31.0.51"), Blocks: []netip.Prefix{netip.MustParsePrefix("10.40.10.0/26")}},
			{Name: "dupmac", Underlay: netip.MustParseAddr("172.31.0.52"), VTEPMAC: good.VTEPMAC},
			{Name: "self", Underlay: h.Underlay.Addr(), VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 3}},
			{Name: "v6", Underlay: netip.MustParseAddr("2001:db8::1"), VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 4}},
			{Name: "dupblock", Underlay: netip.MustParseAddr("172.31.0.55"), VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 5}, Blocks: good.Blocks},
		}
		err = d.Set(append([]datapath.RemotePeer{good}, bad...))
		if !errors.Is(err, datapath.ErrBadPeer) {
			return fmt.Errorf("Set = %v, want ErrBadPeer", err)
		}
		for _, p := range bad {
			if !strings.Contains(err.Error(), p.Name+":") {
				return fmt.Errorf("error does not name %s: %v", p.Name, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	s, err := snapshot(h, DefaultName)
	if err != nil {
		t.Fatal(err)
	}
	// dupblock is served (its FDB and neighbour entry) but its duplicate block is not routed.
	want := kernelState{
		FDB:    []string{"02:00:00:00:00:01 dst 172.31.0.50", "02:00:00:00:00:05 dst 172.31.0.55"},
		Neigh:  []string{"172.31.0.50 02:00:00:00:00:01", "172.31.0.55 02:00:00:00:00:05"},
		Routes: []string{"10.40.9.0/26 via 172.31.0.50 src 172.31.0.1 onlink=true"},
	}
	if !sameState(s, want) {
		t.Fatalf("state %+v, want %+v", s, want)
	}
}

func TestNewDefaultsAndMAC(t *testing.T) {
	u := netip.MustParseAddr("192.0.2.10")
	d, err := New(Config{Underlay: u})
	if err != nil {
		t.Fatal(err)
	}
	if d.Name() != "weft-vxlan" || d.cfg.VNI != 4242 || d.cfg.Port != 6784 || d.Mode() != "vxlan" {
		t.Fatalf("defaults: %+v", d.cfg)
	}
	mac := d.MAC()
	if mac.String() != DeriveMAC(u, 4242).String() || mac[0]&1 != 0 || mac[0]&2 == 0 {
		t.Fatalf("derived MAC %s is not stable, unicast and locally administered", mac)
	}
	if DeriveMAC(netip.MustParseAddr("192.0.2.11"), 4242).String() == mac.String() {
		t.Fatal("two underlay addresses derive the same MAC")
	}
	mac[0] = 0xff // MAC returns a copy
	if d.MAC()[0] == 0xff {
		t.Fatal("MAC exposes the driver's own slice")
	}
	given := net.HardwareAddr{2, 9, 9, 9, 9, 9}
	if d, _ := New(Config{Underlay: u, MAC: given}); d.MAC().String() != given.String() {
		t.Fatal("configured MAC not used")
	}
	for _, bad := range []Config{
		{},
		{Underlay: u, VNI: 1 << 24},
		{Underlay: u, Port: 70000},
		{Underlay: u, MAC: net.HardwareAddr{1, 0, 0, 0, 0, 1}},
		{Underlay: u, Name: "a-very-long-device-name"},
		{Underlay: u, MTU: 10},
	} {
		if _, err := New(bad); err == nil {
			t.Errorf("New(%+v) accepted", bad)
		}
	}
}

// TestLinkProbesGoThroughTheTunnel checks the link-probe contract on the kernel: with
// LinkProbes, a UDP packet from and to the probe port travels through the VXLAN device both
// ways (so a broken tunnel is measured as broken), while every other packet between the
// hosts' underlay addresses stays on the underlay; the rule is installed once however often
// it is ensured, and the routes follow the peer set.
func TestLinkProbesGoThroughTheTunnel(t *testing.T) {
	const port = 6788
	l := newLab(t, "p", 2, true)
	ctx := deadline(t, 20*time.Second)
	drivers := make([]*Driver, len(l.Hosts))
	for i, h := range l.Hosts {
		d, err := New(Config{Underlay: h.Underlay.Addr(), LinkProbes: true})
		if err != nil {
			t.Fatal(err)
		}
		drivers[i] = d
		if err := h.Do(func() error { return d.Up(ctx) }); err != nil {
			t.Fatalf("%s: up: %v", h.Name, err)
		}
		t.Cleanup(func() { h.Do(d.Close) })
		for range 2 {
			if err := h.Do(func() error { return datapath.EnsureProbeRule(netlink.FAMILY_V4, port) }); err != nil {
				t.Fatal(err)
			}
		}
		var rules []netlink.Rule
		h.Do(func() (err error) {
			rules, err = netlink.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Table: datapath.ProbeTable}, netlink.RT_FILTER_TABLE)
			return err
		})
		if len(rules) != 1 || rules[0].Priority != datapath.ProbeRulePriority || rules[0].Sport == nil || rules[0].Sport.Start != port {
			t.Fatalf("%s: probe rules %+v, want one for port %d", h.Name, rules, port)
		}
	}
	for i, h := range l.Hosts {
		if err := h.Do(func() error { return drivers[i].Set(peersOf(l, drivers, i)) }); err != nil {
			t.Fatalf("%s: set: %v", h.Name, err)
		}
	}
	h0, h1 := l.Hosts[0], l.Hosts[1]
	probeRoutes := func(h *nslab.Host) []string {
		var out []string
		err := h.Do(func() error {
			link, err := netlink.LinkByName(DefaultName)
			if err != nil {
				return err
			}
			routes, err := datapath.ListRoutes(nil, datapath.ProbeTable, link.Attrs().Index)
			for _, r := range routes {
				out = append(out, fmt.Sprintf("%s via %s onlink=%v", r.Dst, r.Gw, r.Flags&unix.RTNH_F_ONLINK != 0))
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	want := fmt.Sprintf("%s/32 via %s onlink=true", h1.Underlay.Addr(), h1.Underlay.Addr())
	if got := probeRoutes(h0); !slices.Equal(got, []string{want}) {
		t.Fatalf("h0's link-probe routes %v, want [%s]", got, want)
	}

	listen := func(h *nslab.Host, port int) net.PacketConn {
		var c net.PacketConn
		if err := h.Do(func() (err error) {
			c, err = net.ListenPacket("udp4", netip.AddrPortFrom(h.Underlay.Addr(), uint16(port)).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	counters := func(h *nslab.Host) (tx, rx uint64) {
		h.Do(func() error {
			link, err := netlink.LinkByName(DefaultName)
			if err == nil {
				tx, rx = link.Attrs().Statistics.TxPackets, link.Attrs().Statistics.RxPackets
			}
			return err
		})
		return tx, rx
	}
	exchange := func(from, to net.PacketConn, toAddr netip.AddrPort) {
		t.Helper()
		if err := nslab.SendAndReceive(from, to, toAddr, 3*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	p0, p1 := listen(h0, port), listen(h1, port)
	tx0, _ := counters(h0)
	_, rx1 := counters(h1)
	exchange(p0, p1, netip.AddrPortFrom(h1.Underlay.Addr(), port))
	exchange(p1, p0, netip.AddrPortFrom(h0.Underlay.Addr(), port))
	tx0b, rx0b := counters(h0)
	tx1b, rx1b := counters(h1)
	if tx0b <= tx0 || rx1b <= rx1 || rx0b == 0 || tx1b == 0 {
		t.Fatalf("probe-port packets did not cross the VXLAN device: h0 tx %d→%d rx %d, h1 rx %d→%d tx %d", tx0, tx0b, rx0b, rx1, rx1b, tx1b)
	}
	// Another source port to the probe port stays on the underlay.
	other := listen(h0, port+1)
	exchange(other, p1, netip.AddrPortFrom(h1.Underlay.Addr(), port))
	if tx, _ := counters(h0); tx != tx0b {
		t.Fatalf("a packet from port %d went through the VXLAN device (tx %d→%d)", port+1, tx0b, tx)
	}

	// The routes follow the peer set.
	if err := h0.Do(func() error { return drivers[0].Set(nil) }); err != nil {
		t.Fatal(err)
	}
	if got := probeRoutes(h0); len(got) != 0 {
		t.Fatalf("link-probe routes left after the peer went: %v", got)
	}
}
