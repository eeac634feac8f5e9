package guard

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/nftables"
	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nft"
	"github.com/weftnet/weft/datapath/nslab"
)

func TestNewPlan(t *testing.T) {
	p, err := NewPlan(Config{
		Bridges: []string{"weft-b", "weft", "weft"},
		Ports: []Port{{KindRaft, TCP, 6785}, {KindMesh, UDP, 6783}, {KindMesh, TCP, 6783},
			{KindHTTP, TCP, 0}, {KindProbe, UDP, 6783}},
		DNSPort: 53,
	})
	if err != nil {
		t.Fatal(err)
	}
	want := Plan{
		Bridges: []string{"weft", "weft-b"},
		Ports:   []Port{{KindMesh, TCP, 6783}, {KindRaft, TCP, 6785}, {KindMesh, UDP, 6783}},
		Kinds:   []string{KindMesh, KindRaft},
	}
	if !slices.Equal(p.Bridges, want.Bridges) || !slices.Equal(p.Ports, want.Ports) || !slices.Equal(p.Kinds, want.Kinds) {
		t.Fatalf("plan %+v, want %+v", p, want)
	}
	if p, err := NewPlan(Config{Ports: []Port{{KindMesh, TCP, 6783}}}); err != nil || !p.Empty() {
		t.Fatalf("no bridge: %+v %v", p, err)
	}
	for name, cfg := range map[string]Config{
		"dns port guarded": {Bridges: []string{"weft"}, Ports: []Port{{KindMesh, UDP, 53}}, DNSPort: 53},
		"bad kind":         {Bridges: []string{"weft"}, Ports: []Port{{"Mesh!", UDP, 6783}}},
		"bad proto":        {Bridges: []string{"weft"}, Ports: []Port{{KindMesh, "sctp", 6783}}},
		"long bridge":      {Bridges: []string{"a-bridge-name-too-long"}},
		"empty bridge":     {Bridges: []string{""}},
		"too many ports":   {Bridges: []string{"weft"}, Ports: make([]Port, MaxPorts+1)},
		"too many ranges":  {Bridges: []string{"weft"}, Underlay: make([]netip.Prefix, MaxUnderlay+1)},
	} {
		if _, err := NewPlan(cfg); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: %v, want ErrConfig", name, err)
		}
	}
}

// Test ports, on the host (any address); the DNS server is on the gateway.
const (
	meshPort  = 16783
	raftPort  = 16785
	probePort = 16787
	httpPort  = 16782
	dnsPort   = 53
)

func testConfig() Config {
	return Config{
		Bridges: []string{nslab.Bridge},
		Ports: []Port{{KindMesh, TCP, meshPort}, {KindMesh, UDP, meshPort}, {KindRaft, TCP, raftPort},
			{KindProbe, UDP, probePort}, {KindHTTP, TCP, httpPort}},
		DNSPort: dnsPort,
	}
}

// in runs fn in namespace n (on a locked thread); sockets made there stay there.
// acceptAndClose listens on TCP port in n's namespace and closes every connection: a port
// that is reachable or not, and nothing more. Closed when the test ends.
func acceptAndClose(t *testing.T, n *nslab.NS, port int) {
	t.Helper()
	in(t, n, func() error {
		l, err := net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", port))
		if err != nil {
			return err
		}
		t.Cleanup(func() { l.Close() })
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		return nil
	})
}

func in(t *testing.T, n *nslab.NS, fn func() error) {
	t.Helper()
	if err := n.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// udpSink counts the datagrams a host socket receives.
type udpSink struct {
	conn *net.UDPConn
	n    atomic.Int64
}

func tcpReach(n *nslab.NS, addr string) bool {
	ok := false
	n.Do(func() error {
		c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		if err == nil {
			ok = true
			c.Close()
		}
		return nil
	})
	return ok
}

// mustReach waits (5 s at most: the first SYN may wait for ARP on a loaded machine) until
// n reaches addr over TCP; who says who tries, and when.
func mustReach(t *testing.T, n *nslab.NS, addr, who string) {
	t.Helper()
	nslab.Eventually(t, 5*time.Second, fmt.Sprintf("%s reaches %s", who, addr), func() error {
		if !tcpReach(n, addr) {
			return errors.New("unreachable")
		}
		return nil
	})
}

func udpSend(t *testing.T, n *nslab.NS, addr string) {
	t.Helper()
	in(t, n, func() error {
		c, err := net.Dial("udp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("hello"))
		return err
	})
}

func resolve(n *nslab.NS, netw, server string) error {
	return n.Do(func() error {
		c := &mdns.Client{Net: netw, Timeout: time.Second}
		q := new(mdns.Msg)
		q.SetQuestion("svc.weft.local.", mdns.TypeA)
		m, _, err := c.Exchange(q, server)
		if err != nil {
			return err
		}
		if len(m.Answer) != 1 {
			return fmt.Errorf("answer %v", m)
		}
		return nil
	})
}

// A container on the bridge cannot reach its host's control ports, on the gateway or on
// the underlay address, over TCP or UDP; it still resolves through the gateway DNS and
// reaches another container; applying twice changes nothing; removal removes only the
// guard's objects.
func TestGuardInNamespaces(t *testing.T) {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsgd%d-", os.Getpid()%10000), Hosts: 1, NoIPv6: true})
	h := lab.Hosts[0]
	c1, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := h.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	gw := nslab.Gateway.Addr().String()
	ul := h.Underlay.Addr().String()

	// The host's control listeners on every address, its DNS on the gateway.
	sinks := map[int]*udpSink{}
	in(t, h.NS, func() error {
		for _, p := range []int{meshPort, raftPort, httpPort} {
			l, err := net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", p))
			if err != nil {
				return err
			}
			t.Cleanup(func() { l.Close() })
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Close()
				}
			}()
		}
		for _, p := range []int{meshPort, probePort} {
			c, err := net.ListenUDP("udp", &net.UDPAddr{Port: p})
			if err != nil {
				return err
			}
			t.Cleanup(func() { c.Close() })
			s := &udpSink{conn: c}
			sinks[p] = s
			go func() {
				b := make([]byte, 64)
				for {
					if _, _, err := c.ReadFromUDP(b); err != nil {
						return
					}
					s.n.Add(1)
				}
			}()
		}
		dnsHandler := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
			m := new(mdns.Msg)
			m.SetReply(r)
			m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 30}, A: net.IPv4(10, 40, 1, 9)}}
			w.WriteMsg(m)
		})
		dnsAddr := net.JoinHostPort(gw, fmt.Sprint(dnsPort))
		pc, err := net.ListenPacket("udp", dnsAddr) // here, in the host's namespace
		if err != nil {
			return err
		}
		l, err := net.Listen("tcp", dnsAddr)
		if err != nil {
			return err
		}
		for _, srv := range []*mdns.Server{{PacketConn: pc, Handler: dnsHandler}, {Listener: l, Handler: dnsHandler}} {
			started := make(chan struct{})
			srv.NotifyStartedFunc = func() { close(started) }
			errc := make(chan error, 1)
			go func() { errc <- srv.ActivateAndServe() }()
			select {
			case <-started:
			case err := <-errc:
				return err
			}
			t.Cleanup(func() { srv.Shutdown() })
		}
		return nil
	})
	// c2 listens on the mesh port number too: between containers it is just a port.
	acceptAndClose(t, c2.NS, meshPort)
	c2addr := net.JoinHostPort(c2.Addr.Addr().String(), fmt.Sprint(meshPort))

	// Without the guard the container reaches everything: the test can fail.
	for _, a := range []string{gw, ul} {
		for _, p := range []int{meshPort, raftPort, httpPort} {
			addr := net.JoinHostPort(a, fmt.Sprint(p))
			mustReach(t, c1.NS, addr, "before the guard (else the test proves nothing)")
		}
	}
	udpSend(t, c1.NS, net.JoinHostPort(gw, fmt.Sprint(probePort)))
	nslab.Eventually(t, 5*time.Second, "an unguarded probe datagram", func() error {
		if sinks[probePort].n.Load() != 1 {
			return errors.New("not received")
		}
		return nil
	})

	reg := prometheus.NewRegistry()
	hostNS := int(h.NetNS.Fd())
	g, err := New(Deps{Registry: reg, NetNSFd: hostNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Remove() })
	if err := g.Set(testConfig()); err != nil {
		t.Fatal(err)
	}

	for _, a := range []string{gw, ul} {
		for _, p := range []int{meshPort, raftPort, httpPort} {
			if addr := net.JoinHostPort(a, fmt.Sprint(p)); tcpReach(c1.NS, addr) {
				t.Errorf("a container reaches its host's control port %s", addr)
			}
		}
	}
	for _, p := range []int{meshPort, probePort} {
		before := sinks[p].n.Load()
		udpSend(t, c1.NS, net.JoinHostPort(ul, fmt.Sprint(p)))
		udpSend(t, c1.NS, net.JoinHostPort(gw, fmt.Sprint(p)))
		kind := KindMesh
		if p == probePort {
			kind = KindProbe
		}
		nslab.Eventually(t, 5*time.Second, "udp drops counted", func() error {
			d, err := g.Dropped()
			if err != nil {
				return err
			}
			if d[kind] < 2 {
				return fmt.Errorf("dropped %v", d)
			}
			return nil
		})
		if got := sinks[p].n.Load(); got != before {
			t.Errorf("udp port %d received %d datagrams from a container", p, got-before)
		}
	}
	d, err := g.Dropped()
	if err != nil {
		t.Fatal(err)
	}
	if d[KindRaft] == 0 || d[KindHTTP] == 0 {
		t.Errorf("tcp drops not counted: %v", d)
	}
	if n, err := testutil.GatherAndCount(reg, "weft_guard_dropped_packets_total"); err != nil || n != 4 {
		t.Errorf("weft_guard_dropped_packets_total has %d kinds, want 4 (%v)", n, err)
	}
	for _, netw := range []string{"udp", "tcp"} {
		if err := resolve(c1.NS, netw, net.JoinHostPort(gw, fmt.Sprint(dnsPort))); err != nil {
			t.Errorf("dns over %s through the gateway with the guard on: %v", netw, err)
		}
	}
	mustReach(t, c1.NS, c2addr, "a container, another one on a guarded port number, with the guard on")
	// The host itself still reaches its own ports (only bridge input is guarded).
	mustReach(t, h.NS, net.JoinHostPort(ul, fmt.Sprint(raftPort)), "the host, its own raft port, with the guard on")

	// Applying twice changes nothing: same rules, same handles, counters kept.
	conn, err := nftables.New(nftables.WithNetNSFd(hostNS))
	if err != nil {
		t.Fatal(err)
	}
	handles := func() []uint64 {
		var hs []uint64
		for _, ch := range []*nftables.Chain{input, ports} {
			rules, err := conn.GetRules(table, ch)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range rules {
				hs = append(hs, r.Handle)
			}
		}
		return hs
	}
	first := handles()
	if len(first) != 1+5 {
		t.Fatalf("%d rules, want 1 jump and 5 drops", len(first))
	}
	if err := g.Set(testConfig()); err != nil {
		t.Fatal(err)
	}
	if again := handles(); !slices.Equal(first, again) {
		t.Fatalf("second Set rewrote the rules: %v then %v", first, again)
	}
	if v := testutil.ToFloat64(g.a.Applies(nft.Unchanged)); v != 1 {
		t.Fatalf("applies unchanged %v", v)
	}
	if d2, _ := g.Dropped(); d2[KindMesh] != d[KindMesh] {
		t.Fatalf("counters reset by a Set that changed nothing: %v then %v", d, d2)
	}

	// A bad config is refused, counted, and leaves the guard as it was.
	bad := testConfig()
	bad.Ports = append(bad.Ports, Port{KindMesh, UDP, dnsPort})
	if err := g.Set(bad); !errors.Is(err, ErrConfig) {
		t.Fatalf("bad config: %v", err)
	}
	if v := testutil.ToFloat64(g.a.Applies(nft.Failed)); v != 1 {
		t.Fatalf("applies error %v", v)
	}
	if again := handles(); !slices.Equal(first, again) {
		t.Fatalf("a refused Set changed the rules")
	}

	// Removal removes only the guard's objects: another chain in weft's table and another
	// table stay.
	conn.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "wbdother"})
	conn.AddChain(&nftables.Chain{Name: "policy", Table: table})
	if err := conn.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ch := range chains {
		names = append(names, ch.Table.Name+"/"+ch.Name)
	}
	if !slices.Equal(names, []string{"weft/policy"}) {
		t.Fatalf("after Remove: chains %v, want only weft/policy", names)
	}
	if objs, _ := conn.GetObjects(table); len(objs) != 0 {
		t.Fatalf("after Remove: objects %v", objs)
	}
	if _, err := conn.ListTableOfFamily("wbdother", nftables.TableFamilyINet); err != nil {
		t.Fatalf("another table went with the guard: %v", err)
	}
	mustReach(t, c1.NS, net.JoinHostPort(gw, fmt.Sprint(raftPort)), "after Remove, the container")
	if err := g.Remove(); err != nil {
		t.Fatalf("removing twice: %v", err)
	}

	// With nothing else in it, the table goes with the guard.
	conn.DelChain(&nftables.Chain{Name: "policy", Table: table})
	if err := conn.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := g.Set(testConfig()); err != nil {
		t.Fatal(err)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil {
		t.Fatalf("weft's table left behind, empty")
	}
}

func TestNewPlanUnderlay(t *testing.T) {
	p, err := NewPlan(Config{Bridges: []string{"weft"}, Ports: []Port{{KindRaft, TCP, 6785}},
		Underlay: []netip.Prefix{netip.MustParsePrefix("172.31.0.9/24"), netip.MustParsePrefix("172.31.0.0/24"), netip.MustParsePrefix("fd00::1/64")}})
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{netip.MustParsePrefix("172.31.0.0/24"), netip.MustParsePrefix("fd00::/64")}
	if !slices.Equal(p.Underlay, want) {
		t.Fatalf("underlay %v, want %v", p.Underlay, want)
	}
	for _, u := range []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), {}} {
		if _, err := NewPlan(Config{Bridges: []string{"weft"}, Ports: []Port{{KindRaft, TCP, 6785}}, Underlay: []netip.Prefix{u}}); !errors.Is(err, ErrConfig) {
			t.Errorf("underlay %v: %v, want ErrConfig", u, err)
		}
	}
}

// A container cannot reach another peer's control port through its host's forwarding
// either; the host itself still can.
func TestGuardForwardToOtherPeers(t *testing.T) {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsgf%d-", os.Getpid()%10000), Hosts: 2, NoIPv6: true})
	h0, h1 := lab.Hosts[0], lab.Hosts[1]
	c, err := h0.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	// h1 answers the container's block through h0 (the overlay's job in weft).
	in(t, h1.NS, func() error {
		link, err := netlink.LinkByName(nslab.UnderlayDev)
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: datapath.PrefixToIPNet(h0.Block), Gw: h0.Underlay.Addr().AsSlice()})
	})
	acceptAndClose(t, h1.NS, raftPort)
	remote := net.JoinHostPort(h1.Underlay.Addr().String(), fmt.Sprint(raftPort))
	mustReach(t, c.NS, remote, "before the guard (else the test proves nothing), the container")
	g, err := New(Deps{NetNSFd: int(h0.NetNS.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Remove() })
	cfg := testConfig()
	cfg.Underlay = []netip.Prefix{h0.Underlay.Masked()}
	if err := g.Set(cfg); err != nil {
		t.Fatal(err)
	}
	if tcpReach(c.NS, remote) {
		t.Fatalf("a container reaches another peer's raft port %s through its host", remote)
	}
	if d, _ := g.Dropped(); d[KindRaft] == 0 {
		t.Fatalf("forwarded drop not counted: %v", d)
	}
	mustReach(t, h0.NS, remote, "the host, another peer's raft port, with the guard on")
	// Without the underlay range the forward rule is gone: Set converged to the new plan.
	if err := g.Set(testConfig()); err != nil {
		t.Fatal(err)
	}
	mustReach(t, c.NS, remote, "without an underlay range (else the forward guard outlived it), the container")
}

// A hundred bridges (1024 is the bound) apply in one transaction: its few hundred
// acknowledgements overflow a default netlink buffer (ENOBUFS between 64 and 100 bridges
// before the guard's connection had a big one), and a second Set changes nothing.
func TestHundredBridges(t *testing.T) {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsgh%d-", os.Getpid()%10000), NoIPv6: true})
	r, err := lab.NewNS("r")
	if err != nil {
		t.Fatal(err)
	}
	g, err := New(Deps{NetNSFd: int(r.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.Bridges = nil
	for i := range 100 {
		cfg.Bridges = append(cfg.Bridges, fmt.Sprintf("weft-n%d", i))
		cfg.Underlay = append(cfg.Underlay, netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 16, byte(i), 0}), 24))
	}
	for range 2 {
		if err := g.Set(cfg); err != nil {
			t.Fatal(err)
		}
	}
	if v := testutil.ToFloat64(g.a.Applies(nft.Changed)); v != 1 {
		t.Fatalf("applies changed %v, want 1", v)
	}
	if v := testutil.ToFloat64(g.a.Applies(nft.Unchanged)); v != 1 {
		t.Fatalf("applies unchanged %v, want 1", v)
	}
	conn, err := nftables.New(nftables.WithNetNSFd(int(r.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, ch := range chains {
		rules, err := conn.GetRules(table, ch)
		if err != nil {
			t.Fatal(err)
		}
		n += len(rules)
	}
	if want := 100 + 100 + 100 + 5; n != want {
		t.Fatalf("%d rules, want %d (a jump per bridge on each hook, a jump per range, a drop per port)", n, want)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil {
		t.Fatalf("weft's table left behind, empty")
	}
}
