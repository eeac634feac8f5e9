package isolate

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/datapath/guard"
	"github.com/weftnet/weft/datapath/nft"
	"github.com/weftnet/weft/datapath/nslab"
)

// kernelNet is one network of the kernel test: a bridge in the router namespace holding
// the gateway.
type kernelNet struct {
	Network
	gw netip.Addr
}

// testLab is a router namespace with one bridge per network and container namespaces
// attached to them (a host of weft, reduced to what isolation sees: bridges and routing).
type testLab struct {
	t      *testing.T
	lab    *nslab.Lab
	router *nslab.NS
}

func newTestLab(t *testing.T) *testLab {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsis%d-", os.Getpid()%10000), NoIPv6: true})
	r, err := lab.NewNS("r")
	if err != nil {
		t.Fatal(err)
	}
	l := &testLab{t: t, lab: lab, router: r}
	l.run(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	return l
}

func (l *testLab) run(n *nslab.NS, name string, args ...string) {
	l.t.Helper()
	if _, err := n.Run(context.Background(), name, args...); err != nil {
		l.t.Fatal(err)
	}
}

func (l *testLab) addBridge(n kernelNet) { l.addBridgeIn(l.router, n) }

// addBridgeIn makes n's bridge, holding its gateway, in the namespace of host.
func (l *testLab) addBridgeIn(host *nslab.NS, n kernelNet) {
	l.t.Helper()
	l.run(host, "ip", "link", "add", n.Bridge, "type", "bridge")
	l.run(host, "ip", "addr", "add", netip.PrefixFrom(n.gw, n.Subnet.Bits()).String(), "dev", n.Bridge)
	l.run(host, "ip", "link", "set", n.Bridge, "up")
}

// addContainer makes a container namespace on n's bridge with address a.
func (l *testLab) addContainer(suffix string, n kernelNet, a netip.Addr) *nslab.NS {
	return l.addContainerIn(l.router, suffix, n, a)
}

// addContainerIn makes a container namespace on n's bridge in host with address a.
func (l *testLab) addContainerIn(host *nslab.NS, suffix string, n kernelNet, a netip.Addr) *nslab.NS {
	l.t.Helper()
	c, err := l.lab.NewNS(suffix)
	if err != nil {
		l.t.Fatal(err)
	}
	hostIf := "v" + suffix
	l.run(host, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", c.Name)
	l.run(host, "ip", "link", "set", hostIf, "master", n.Bridge, "up")
	l.run(c, "ip", "addr", "add", netip.PrefixFrom(a, n.Subnet.Bits()).String(), "dev", "eth0")
	l.run(c, "ip", "link", "set", "eth0", "up")
	l.run(c, "ip", "route", "add", "default", "via", n.gw.String())
	return c
}

// pings reports whether one echo request from n to a is answered within a second.
func pings(n *nslab.NS, a netip.Addr, extra ...string) bool {
	args := append([]string{"-c1", "-W1", "-n"}, extra...)
	_, err := n.Run(context.Background(), "ping", append(args, a.String())...)
	return err == nil
}

func (l *testLab) mustPing(from *nslab.NS, to netip.Addr) {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := from.WaitPing(ctx, to); err != nil {
		l.t.Fatalf("%s → %s: %v", from.Name, to, err)
	}
}

func (l *testLab) mustNotPing(from *nslab.NS, to netip.Addr) {
	l.t.Helper()
	if pings(from, to) {
		l.t.Fatalf("%s reaches %s across an isolated network", from.Name, to)
	}
}

// handles are the handles of the isolator's rules, by rule key (the base chains' jumps
// under the chain's name).
func handles(t *testing.T, c *nftables.Conn) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for _, ch := range chains() {
		rules, err := c.GetRules(table, ch)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			k := string(r.UserData)
			if slices.Contains(bases, ch) {
				k = ch.Name + " " + k
			}
			out[k] = r.Handle
		}
	}
	return out
}

// Two isolated networks (media, control) and two open ones (default, open) on one host:
// the isolated ones cannot reach each other, the open ones, or each other's gateways, in
// either direction; containers reach their own network and the open networks reach each
// other; every drop is counted; re-applying changes nothing; removing a network removes
// its rules and nothing else; the guard's chains and the isolator's coexist.
func TestIsolationInNamespaces(t *testing.T) {
	l := newTestLab(t)
	media := kernelNet{Network: mediaNet, gw: addr("10.50.0.1")}
	ctrl := kernelNet{Network: ctrlNet, gw: addr("10.60.0.1")}
	def := kernelNet{Network: defNet, gw: addr("10.40.0.1")}
	open := kernelNet{Network: openNet, gw: addr("10.70.0.1")}
	for _, n := range []kernelNet{media, ctrl, def, open} {
		l.addBridge(n)
	}
	m1 := l.addContainer("m1", media, addr("10.50.1.2"))
	m2 := l.addContainer("m2", media, addr("10.50.1.3"))
	c1 := l.addContainer("c1", ctrl, addr("10.60.1.2"))
	d1 := l.addContainer("d1", def, addr("10.40.1.2"))
	o1 := l.addContainer("o1", open, addr("10.70.1.2"))

	// Without isolation everything reaches everything: the test can fail.
	l.mustPing(m1, addr("10.60.1.2"))
	l.mustPing(c1, ctrl.gw)
	l.mustPing(d1, addr("10.50.1.2"))

	hostNS := int(l.router.Fd())
	// The guard is there first, as on a peer (it starts before the isolator).
	g, err := guard.New(guard.Deps{NetNSFd: hostNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Remove() })
	guardCfg := guard.Config{Bridges: []string{"weft", "wmedia", "wcontrol", "wopen"},
		Ports: []guard.Port{{Kind: guard.KindRaft, Proto: guard.TCP, Port: 16785}}, DNSPort: 53}
	if err := g.Set(guardCfg); err != nil {
		t.Fatal(err)
	}

	reg := prometheus.NewRegistry()
	iso, err := New(Deps{Registry: reg, NetNSFd: hostNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { iso.Remove() })
	nets := []Network{def.Network, media.Network, ctrl.Network, open.Network}
	if err := iso.Set(nets); err != nil {
		t.Fatal(err)
	}

	// Forward, both ways, between the isolated ones and from and to the open ones.
	l.mustNotPing(m1, addr("10.60.1.2"))
	l.mustNotPing(c1, addr("10.50.1.2"))
	l.mustNotPing(d1, addr("10.50.1.2"))
	l.mustNotPing(m1, addr("10.70.1.2"))
	// Input: another network's gateway on this host.
	l.mustNotPing(m1, ctrl.gw)
	l.mustNotPing(o1, media.gw)
	// Within a network, to the own gateway, and between the two open networks.
	l.mustPing(m1, addr("10.50.1.3"))
	l.mustPing(m2, media.gw)
	l.mustPing(d1, addr("10.70.1.2"))
	l.mustPing(o1, addr("10.40.1.2"))
	l.mustPing(o1, def.gw)

	// Forged sources: a default container sending from a control address to control, and
	// a media container from a default address to default, are dropped on the bridge they
	// came in on (no answer can come back either way: only the counters tell).
	l.run(d1, "ip", "addr", "add", "10.60.1.99/32", "dev", "eth0")
	l.run(m2, "ip", "addr", "add", "10.40.1.99/32", "dev", "eth0")
	pings(d1, addr("10.60.1.2"), "-I", "10.60.1.99")
	pings(m2, addr("10.40.1.2"), "-I", "10.40.1.99")

	// Every drop is counted: m1 → control and → open and → control's gateway by media's
	// egress; c1 → media by control's egress; d1 → media and o1 → media's gateway by
	// media's ingress; the forged ones by the bridge they came in on.
	d, err := iso.Dropped()
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[Drop]uint64{
		{"media", Egress}: 3, {"control", Egress}: 1, {"media", Ingress}: 2, {"control", Ingress}: 0,
		{"default", Spoofed}: 1, {"media", Spoofed}: 1, {"control", Spoofed}: 0, {"open", Spoofed}: 0,
	} {
		if d[k] < want || (want == 0 && d[k] != 0) {
			t.Errorf("drops %v: %d, want %d (all: %v)", k, d[k], want, d)
		}
	}
	if n, err := testutil.GatherAndCount(reg, "weft_isolation_drops_total"); err != nil || n != 8 {
		t.Errorf("weft_isolation_drops_total has %d series, want 8 (%v)", n, err)
	}

	conn, err := nftables.New(nftables.WithNetNSFd(hostNS))
	if err != nil {
		t.Fatal(err)
	}
	h1 := handles(t, conn)
	if len(h1) != 6+8 {
		t.Fatalf("%d rules, want 6 jumps and 8 drops: %v", len(h1), h1)
	}

	// Re-applying the same networks, in another order, changes nothing.
	slices.Reverse(nets)
	if err := iso.Set(nets); err != nil {
		t.Fatal(err)
	}
	if h2 := handles(t, conn); !mapsEqual(h1, h2) {
		t.Fatalf("a second Set rewrote the rules: %v then %v", h1, h2)
	}
	if v := testutil.ToFloat64(iso.a.Applies(nft.Unchanged)); v != 1 {
		t.Fatalf("applies unchanged %v, want 1", v)
	}

	// Bad input is refused, counted, and changes nothing.
	bad := append(slices.Clone(nets), Network{Name: "evil", Subnet: netip.MustParsePrefix("10.50.0.0/24")})
	if err := iso.Set(bad); !errors.Is(err, ErrConfig) {
		t.Fatalf("overlapping networks: %v, want ErrConfig", err)
	}
	if v := testutil.ToFloat64(iso.a.Applies(nft.Failed)); v != 1 {
		t.Fatalf("applies error %v, want 1", v)
	}
	if h2 := handles(t, conn); !mapsEqual(h1, h2) {
		t.Fatalf("a refused Set changed the rules")
	}

	// The guard re-applying its own state leaves the isolator's alone, and the reverse.
	guardCfg.Bridges = append(guardCfg.Bridges, "wextra")
	if err := g.Set(guardCfg); err != nil {
		t.Fatal(err)
	}
	if h2 := handles(t, conn); !mapsEqual(h1, h2) {
		t.Fatalf("the guard's Set changed the isolator's rules")
	}
	l.mustNotPing(m1, addr("10.60.1.2"))

	// Removing control removes its 3 rules and 3 counters and nothing else: every other
	// rule keeps its handle, every other counter its value, and control is reachable again
	// from the open networks while media stays cut from them.
	before, _ := iso.Dropped()
	if err := iso.Set([]Network{def.Network, media.Network, open.Network}); err != nil {
		t.Fatal(err)
	}
	h3 := handles(t, conn)
	for k, h := range h1 {
		isCtrl := ruleNetwork(k) == "control"
		if got, ok := h3[k]; isCtrl == ok || (ok && got != h) {
			t.Errorf("rule %q: handle %d then %d (present %v)", k, h, got, ok)
		}
	}
	if len(h3) != 6+5 {
		t.Errorf("%d rules left, want 6 jumps and 5 drops: %v", len(h3), h3)
	}
	after, _ := iso.Dropped()
	if _, ok := after[Drop{"control", Egress}]; ok {
		t.Errorf("control's counter outlived its network: %v", after)
	}
	if after[Drop{"media", Egress}] < before[Drop{"media", Egress}] {
		t.Errorf("media's counter reset: %v then %v", before, after)
	}
	// (control's range is no weft network's now, so media's rules leave it alone.)
	l.mustPing(d1, addr("10.60.1.2"))
	l.mustNotPing(m1, addr("10.70.1.2"))

	// The guard's chains survived all of it.
	for _, name := range []string{guard.InputChain, guard.ForwardChain, guard.PortsChain} {
		if _, err := conn.ListChain(table, name); err != nil {
			t.Errorf("guard chain %s gone: %v", name, err)
		}
	}

	// Nothing isolated any more: the isolator's objects go, the guard's and the table stay.
	if err := iso.Set([]Network{def.Network, open.Network}); err != nil {
		t.Fatal(err)
	}
	l.mustPing(m1, addr("10.40.1.2"))
	st, err := read(conn)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.rules) != 0 || st.set != nil || len(st.counters) != 0 || !st.foreign {
		t.Fatalf("after isolating nothing: %+v", st)
	}
	if err := iso.Remove(); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil {
		t.Fatalf("weft's table left behind, empty")
	}

	// Alone in the table, the isolator removes the table with its objects.
	if err := iso.Set([]Network{media.Network, def.Network}); err != nil {
		t.Fatal(err)
	}
	l.mustNotPing(d1, addr("10.50.1.2"))
	if err := iso.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil {
		t.Fatalf("weft's table left behind by the isolator alone")
	}
	l.mustPing(d1, addr("10.50.1.2"))
}

// ruleNetwork is the network a rule key names ("weft-isolate DIRECTION NETWORK …").
func ruleNetwork(key string) string {
	var dir, network string
	fmt.Sscanf(key, "weft-isolate %s %s", &dir, &network)
	return network
}

func mapsEqual(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// Across hosts the receiving host enforces the isolation alone: a container on default on
// host 0, which isolates nothing, cannot reach a container on an isolated network on host
// 1, nor the reverse; host 1 counts both. (The underlay routes stand in for weft's
// overlay: the packets arrive on the underlay interface, not on a bridge.)
func TestIsolationAcrossHosts(t *testing.T) {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsix%d-", os.Getpid()%10000), Hosts: 2, NoIPv6: true})
	l := &testLab{t: t, lab: lab}
	h0, h1 := lab.Hosts[0], lab.Hosts[1]
	c0, err := h0.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	media := kernelNet{Network: mediaNet, gw: addr("10.50.0.1")}
	l.addBridgeIn(h1.NS, media)
	m1 := l.addContainerIn(h1.NS, "m1", media, addr("10.50.1.2"))
	l.run(h0.NS, "ip", "route", "add", media.Subnet.String(), "via", h1.Underlay.Addr().String())
	l.run(h1.NS, "ip", "route", "add", h0.Block.String(), "via", h0.Underlay.Addr().String())
	l.mustPing(c0.NS, addr("10.50.1.2"))

	iso, err := New(Deps{NetNSFd: int(h1.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { iso.Remove() })
	def := defNet // the lab's bridge "weft" holds 10.40.0.1/16
	if err := iso.Set([]Network{def, media.Network}); err != nil {
		t.Fatal(err)
	}
	l.mustNotPing(c0.NS, addr("10.50.1.2"))
	l.mustNotPing(m1, c0.Addr.Addr())
	d, err := iso.Dropped()
	if err != nil {
		t.Fatal(err)
	}
	if d[Drop{"media", Ingress}] == 0 || d[Drop{"media", Egress}] == 0 {
		t.Fatalf("drops across hosts not counted: %v", d)
	}
	// A non-isolated media is a routed range again.
	open := media.Network
	open.Isolated = false
	if err := iso.Set([]Network{def, open}); err != nil {
		t.Fatal(err)
	}
	l.mustPing(c0.NS, addr("10.50.1.2"))
	l.mustPing(m1, c0.Addr.Addr())
}

// The set of ranges reads back as it was written, adjacent ranges merged.
func TestIntervalsRoundTrip(t *testing.T) {
	p, err := NewPlan([]Network{mediaNet, defNet, {Name: "b", Subnet: netip.MustParsePrefix("10.51.0.0/16")}})
	if err != nil {
		t.Fatal(err)
	}
	elems := p.elements()
	slices.Reverse(elems) // the kernel lists them in its own order
	elems = append(elems, nftables.SetElement{Key: []byte{0, 0, 0, 0}, IntervalEnd: true})
	if got := intervalsOf(elems); !slices.Equal(got, p.Ranges) {
		t.Fatalf("intervals %v, want %v", got, p.Ranges)
	}
}

// benchNets are n networks of /16 from 10.64.0.0 on, every other one isolated.
func benchNets(n int) []Network {
	var out []Network
	for i := range n {
		out = append(out, Network{Name: fmt.Sprintf("n%d", i), Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(64 + i), 0, 0}), 16),
			Isolated: i%2 == 0, Bridge: fmt.Sprintf("weft-n%d", i)})
	}
	return out
}

// BenchmarkSetOneChange is the cost of one network appearing among 64 (ipam's maximum):
// one transaction adding its rules, the others untouched.
func BenchmarkSetOneChange(b *testing.B) {
	lab := nslab.NewTest(b, nslab.Config{Prefix: fmt.Sprintf("wnsib%d-", os.Getpid()%10000), NoIPv6: true})
	r, err := lab.NewNS("r")
	if err != nil {
		b.Fatal(err)
	}
	iso, err := New(Deps{NetNSFd: int(r.Fd())})
	if err != nil {
		b.Fatal(err)
	}
	all := benchNets(64)
	if err := iso.Set(all[:63]); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := range b.N {
		nets := all[:63+(i+1)%2] // 64, 63, 64, …: n62 (isolated) comes and goes
		if err := iso.Set(nets); err != nil {
			b.Fatal(err)
		}
	}
}

// ipam's largest cluster (64 networks, half of them isolated) applies in one transaction:
// its few hundred acknowledgements overflow a default netlink buffer (ENOBUFS).
func TestSixtyFourNetworks(t *testing.T) {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnsiq%d-", os.Getpid()%10000), NoIPv6: true})
	r, err := lab.NewNS("r")
	if err != nil {
		t.Fatal(err)
	}
	iso, err := New(Deps{NetNSFd: int(r.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	nets := benchNets(64)
	for range 2 {
		if err := iso.Set(nets); err != nil {
			t.Fatal(err)
		}
	}
	if v := testutil.ToFloat64(iso.a.Applies(nft.Changed)); v != 1 {
		t.Fatalf("applies changed %v, want 1", v)
	}
	conn, err := nftables.New(nftables.WithNetNSFd(int(r.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(handles(t, conn)); n != 6+64+2*32 {
		t.Fatalf("%d rules, want %d", n, 6+64+2*32)
	}
}
