package datapath_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
)

// The kernel tests of network planes: namespaces named wda-<pid>-…, removed by the lab.

// planesLab is one container with eth0 on bridge A (host namespace ha, network 10.70.0.0/16,
// MTU 1400) and net1 on bridge B (host namespace hb, 10.80.1.0/24 of the range
// 10.80.0.0/16, MTU 1300). The two bridges are in two host namespaces so that only bridge
// B's side can reach the "remote" namespace r (192.168.80.2, behind hb): a reply to r
// sent by eth0 is lost, which is what makes a ping from r fail without policy routing.
type planesLab struct {
	lab          *nslab.Lab
	ha, hb, r, c *nslab.NS
	eth0, net1   datapath.Attachment
}

var remote = netip.MustParseAddr("192.168.80.2")

func newPlanesLab(t *testing.T) *planesLab {
	t.Helper()
	l := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wda-%d-", os.Getpid()%100000), NoIPv6: true})
	p := &planesLab{lab: l}
	for _, n := range []struct {
		ns   **nslab.NS
		name string
	}{{&p.ha, "ha"}, {&p.hb, "hb"}, {&p.r, "r"}, {&p.c, "c"}} {
		var err error
		if *n.ns, err = l.NewNS(n.name); err != nil {
			t.Fatal(err)
		}
	}
	must(t, p.ha.Do(func() error {
		_, err := datapath.EnsureBridge(datapath.BridgeConfig{Name: "weft-a", Gateway: netip.MustParsePrefix("10.70.0.1/16"), MTU: 1400})
		return err
	}))
	must(t, p.hb.Do(func() error {
		_, err := datapath.EnsureBridge(datapath.BridgeConfig{Name: "weft-b", Gateway: netip.MustParsePrefix("10.80.1.1/24"), MTU: 1300})
		return err
	}))
	// r hangs off hb on its own link, with a default route via hb and nothing else.
	hbh, err := nslab.HandleAt(p.hb.Path())
	must(t, err)
	defer hbh.Close()
	must(t, nslab.AddUplink(nslab.Uplink{Underlay: hbh, Name: "tor", Gateway: netip.MustParsePrefix("192.168.80.1/24"),
		HostPath: p.r.Path(), HostDev: "eth0", Addr: netip.MustParsePrefix("192.168.80.2/24")}))
	rh, err := nslab.HandleAt(p.r.Path())
	must(t, err)
	defer rh.Close()
	eth, err := rh.LinkByName("eth0")
	must(t, err)
	must(t, rh.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: netip.MustParseAddr("192.168.80.1").AsSlice()}))

	p.eth0 = datapath.Attachment{
		NetNS: p.c.Path(), IfName: "eth0", HostIfName: datapath.HostIfName(p.c.Path(), "eth0"), Bridge: "weft-a",
		Address: netip.MustParsePrefix("10.70.0.2/16"), Gateway: netip.MustParseAddr("10.70.0.1"), MTU: 1400,
		Range: netip.MustParsePrefix("10.70.0.0/16"),
	}
	p.net1 = datapath.Attachment{
		NetNS: p.c.Path(), IfName: "net1", HostIfName: datapath.HostIfName(p.c.Path(), "net1"), Bridge: "weft-b",
		Address: netip.MustParsePrefix("10.80.1.2/24"), Gateway: netip.MustParseAddr("10.80.1.1"), MTU: 1300,
		Secondary: true, Range: netip.MustParsePrefix("10.80.0.0/16"),
	}
	return p
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// attach attaches a from the host namespace h (where its bridge is).
func attach(h *nslab.NS, a datapath.Attachment) error {
	return h.Do(func() error {
		_, err := datapath.Attach(a)
		if err != nil {
			return fmt.Errorf("attach %s: %w", a.IfName, err)
		}
		return nil
	})
}

func check(h *nslab.NS, a datapath.Attachment) error {
	return h.Do(func() error { return datapath.Check(a) })
}

// sourceRules lists the container's weft source rules as "from SRC lookup TABLE".
func sourceRules(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	rules, err := h.RuleList(netlink.FAMILY_V4)
	must(t, err)
	var out []string
	for _, r := range rules {
		if r.Priority == datapath.ContainerRulePriority && r.Src != nil {
			out = append(out, fmt.Sprintf("from %s lookup %d", r.Src, r.Table))
		}
	}
	return out
}

func defaultRoutes(t *testing.T, h *netlink.Handle) []netlink.Route {
	t.Helper()
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	must(t, err)
	var out []netlink.Route
	for _, r := range routes {
		if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
			out = append(out, r)
		}
	}
	return out
}

func tableRoutes(t *testing.T, h *netlink.Handle, table int) []string {
	t.Helper()
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	must(t, err)
	var out []string
	for _, r := range routes {
		out = append(out, fmt.Sprintf("%v via %v", r.Dst, r.Gw))
	}
	return out
}

func TestSecondaryPlaneRoutesAndReplies(t *testing.T) {
	p := newPlanesLab(t)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	// Twice each: the second converges on what the first made.
	for i := 0; i < 2; i++ {
		must(t, attach(p.ha, p.eth0))
		must(t, attach(p.hb, p.net1))
	}
	must(t, check(p.ha, p.eth0))
	must(t, check(p.hb, p.net1))

	ch, err := nslab.HandleAt(p.c.Path())
	must(t, err)
	defer ch.Close()
	eth0, err := ch.LinkByName("eth0")
	must(t, err)
	net1, err := ch.LinkByName("net1")
	must(t, err)
	if eth0.Attrs().MTU != 1400 || net1.Attrs().MTU != 1300 {
		t.Errorf("MTUs eth0=%d net1=%d, want 1400 and 1300", eth0.Attrs().MTU, net1.Attrs().MTU)
	}

	// Only eth0 holds the default route of the main table.
	defs := defaultRoutes(t, ch)
	if len(defs) != 1 || defs[0].LinkIndex != eth0.Attrs().Index {
		t.Errorf("default routes = %v, want exactly one, through eth0 (index %d)", defs, eth0.Attrs().Index)
	}
	// net1 holds the range route.
	rangeRoutes, err := ch.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{LinkIndex: net1.Attrs().Index, Table: unix.RT_TABLE_MAIN, Dst: datapath.PrefixToIPNet(p.net1.Range)},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
	must(t, err)
	if len(rangeRoutes) != 1 || !rangeRoutes[0].Gw.Equal(p.net1.Gateway.AsSlice()) {
		t.Errorf("range routes on net1 = %v, want one to 10.80.0.0/16 via 10.80.1.1", rangeRoutes)
	}
	// One rule and one table per interface, after two attaches.
	t0, t1 := datapath.ContainerTable(eth0.Attrs().Index), datapath.ContainerTable(net1.Attrs().Index)
	wantRules := []string{fmt.Sprintf("from 10.70.0.2/32 lookup %d", t0), fmt.Sprintf("from 10.80.1.2/32 lookup %d", t1)}
	if got := sourceRules(t, ch); !sameSet(got, wantRules) {
		t.Errorf("rules = %v, want %v", got, wantRules)
	}
	if got := tableRoutes(t, ch, t1); len(got) != 2 {
		t.Errorf("table %d = %v, want the on-link subnet and the default route", t1, got)
	}

	// Replies from net1's address leave by net1; everything else by eth0.
	out, err := p.c.Run(ctx, "ip", "-4", "route", "get", remote.String(), "from", "10.80.1.2")
	if err != nil || !strings.Contains(out, "dev net1") {
		t.Errorf("route to %s from net1's address: %q, %v; want dev net1", remote, out, err)
	}
	out, err = p.c.Run(ctx, "ip", "-4", "route", "get", remote.String())
	if err != nil || !strings.Contains(out, "dev eth0") {
		t.Errorf("route to %s: %q, %v; want dev eth0", remote, out, err)
	}
	// A real ping from r, which only hb's side can reach.
	if err := p.r.WaitPing(ctx, p.net1.Address.Addr()); err != nil {
		t.Fatalf("ping from r to net1: %v", err)
	}
	// eth0's plane has no way to r: without net1's rule the reply is lost.
	rule := fmt.Sprintf("from 10.80.1.2/32 lookup %d", t1)
	must(t, delRule(ch, rule))
	if _, err := p.r.Run(ctx, "ping", "-c1", "-W1", "-n", p.net1.Address.Addr().String()); err == nil {
		t.Error("ping from r answered without net1's policy rule: the test does not show the rule at work")
	}
	if err := check(p.hb, p.net1); !errors.Is(err, datapath.ErrCheckFailed) || !strings.Contains(err.Error(), "policy rule") {
		t.Errorf("check without the rule = %v, want ErrCheckFailed naming the policy rule", err)
	}
	must(t, attach(p.hb, p.net1))
	must(t, check(p.hb, p.net1))
	if err := p.r.WaitPing(ctx, p.net1.Address.Addr()); err != nil {
		t.Fatalf("ping from r to net1 after repair: %v", err)
	}

	// CHECK catches a deleted range route, and a default route on the secondary.
	must(t, ch.RouteDel(&rangeRoutes[0]))
	if err := check(p.hb, p.net1); !errors.Is(err, datapath.ErrCheckFailed) || !strings.Contains(err.Error(), "range route 10.80.0.0/16") {
		t.Errorf("check without the range route = %v, want ErrCheckFailed naming it", err)
	}
	must(t, attach(p.hb, p.net1))
	must(t, check(p.hb, p.net1))
	must(t, ch.RouteAdd(&netlink.Route{LinkIndex: net1.Attrs().Index, Gw: p.net1.Gateway.AsSlice(), Priority: 500}))
	if err := check(p.hb, p.net1); !errors.Is(err, datapath.ErrCheckFailed) || !strings.Contains(err.Error(), "default route") {
		t.Errorf("check with a default route on net1 = %v, want ErrCheckFailed naming it", err)
	}
	must(t, attach(p.hb, p.net1))
	if defs := defaultRoutes(t, ch); len(defs) != 1 || defs[0].LinkIndex != eth0.Attrs().Index {
		t.Errorf("after re-attach, default routes = %v, want only eth0's", defs)
	}
	// The primary's CHECK names its missing default route.
	must(t, ch.RouteDel(&defs[0]))
	if err := check(p.ha, p.eth0); !errors.Is(err, datapath.ErrCheckFailed) || !strings.Contains(err.Error(), "default route via 10.70.0.1") {
		t.Errorf("check of eth0 without its default route = %v", err)
	}
	must(t, attach(p.ha, p.eth0))
	must(t, check(p.ha, p.eth0))

	// A new address for net1 replaces its rule, and leaves no stale address.
	moved := p.net1
	moved.Address = netip.MustParsePrefix("10.80.1.3/24")
	must(t, attach(p.hb, moved))
	must(t, check(p.hb, moved))
	wantRules[1] = fmt.Sprintf("from 10.80.1.3/32 lookup %d", t1)
	if got := sourceRules(t, ch); !sameSet(got, wantRules) {
		t.Errorf("rules after the address moved = %v, want %v", got, wantRules)
	}
	if addrs, _ := ch.AddrList(net1, netlink.FAMILY_V4); len(addrs) != 1 || addrs[0].IPNet.String() != "10.80.1.3/24" {
		t.Errorf("net1 addresses = %v, want only 10.80.1.3/24", addrs)
	}

	// DEL of net1, veth first: its rule dangles until RemovePolicyRouting.
	must(t, p.hb.Do(func() error { return datapath.Detach(moved.HostIfName) }))
	if got := sourceRules(t, ch); len(got) != 2 {
		t.Fatalf("rules after the veth went = %v, want net1's still there (that is what RemovePolicyRouting is for)", got)
	}
	for i := 0; i < 2; i++ {
		must(t, datapath.RemovePolicyRouting(p.c.Path(), "net1"))
	}
	if got := sourceRules(t, ch); !sameSet(got, wantRules[:1]) {
		t.Errorf("rules after net1's DEL = %v, want only eth0's %v", got, wantRules[:1])
	}
	// DEL of eth0, policy first: the rule and table go while the interface still exists.
	must(t, datapath.RemovePolicyRouting(p.c.Path(), "eth0"))
	if got := sourceRules(t, ch); len(got) != 0 {
		t.Errorf("rules after eth0's DEL = %v, want none", got)
	}
	if got := tableRoutes(t, ch, t0); len(got) != 0 {
		t.Errorf("table %d after eth0's DEL = %v, want empty", t0, got)
	}
	must(t, p.ha.Do(func() error { return datapath.Detach(p.eth0.HostIfName) }))
	// A namespace that is gone is success.
	must(t, nslab.DeleteNetNS(p.c.Name))
	must(t, datapath.RemovePolicyRouting(p.c.Path(), "eth0"))
}

// A secondary whose on-link subnet is its whole range (weft's usual case: the address has
// the network's prefix length) keeps the kernel's subnet route as its range route, and an
// interface that was primary loses its default route when attached as secondary.
func TestSecondaryWithOnLinkRange(t *testing.T) {
	p := newPlanesLab(t)
	a := p.net1
	a.Secondary = false
	must(t, attach(p.hb, a))
	ch, err := nslab.HandleAt(p.c.Path())
	must(t, err)
	defer ch.Close()
	if len(defaultRoutes(t, ch)) != 1 {
		t.Fatalf("a primary net1 has no default route: %v", defaultRoutes(t, ch))
	}
	a.Secondary = true
	a.Range = netip.MustParsePrefix("10.80.1.0/24")
	must(t, attach(p.hb, a))
	must(t, check(p.hb, a))
	if defs := defaultRoutes(t, ch); len(defs) != 0 {
		t.Errorf("default routes after attaching net1 as secondary = %v, want none", defs)
	}
	net1, err := ch.LinkByName("net1")
	must(t, err)
	routes, err := ch.RouteList(net1, netlink.FAMILY_V4)
	must(t, err)
	if len(routes) != 1 || routes[0].Dst.String() != "10.80.1.0/24" || routes[0].Protocol != unix.RTPROT_KERNEL {
		t.Errorf("main routes of net1 = %v, want only the kernel's on-link 10.80.1.0/24", routes)
	}
	// Without it CHECK names the range route; re-attach restores it.
	must(t, ch.RouteDel(&routes[0]))
	if err := check(p.hb, a); !errors.Is(err, datapath.ErrCheckFailed) || !strings.Contains(err.Error(), "range route 10.80.1.0/24") {
		t.Errorf("check without the on-link route = %v", err)
	}
	// The kernel puts the subnet route back only with the address: re-attach must too.
	must(t, ch.AddrDel(net1, &netlink.Addr{IPNet: datapath.PrefixToIPNet(a.Address)}))
	must(t, attach(p.hb, a))
	must(t, check(p.hb, a))
	// The zero Range is the same: the on-link route only.
	a.Range = netip.Prefix{}
	must(t, attach(p.hb, a))
	must(t, check(p.hb, a))
	if err := p.r.WaitPing(t.Context(), a.Address.Addr()); err != nil {
		t.Fatalf("ping from r to net1: %v", err)
	}
}

// EnsureBridge serves any network: a bridge of another name, subnet and MTU converges, a
// stale gateway of an earlier definition goes, and a bad config creates nothing.
func TestEnsureBridgePerNetwork(t *testing.T) {
	p := newPlanesLab(t)
	err := p.hb.Do(func() error {
		media := datapath.BridgeConfig{Name: "weft-media", Gateway: netip.MustParsePrefix("10.50.0.1/16"), MTU: 9000}
		if _, err := datapath.EnsureBridge(media); err != nil {
			return err
		}
		media.Gateway = netip.MustParsePrefix("10.51.0.1/16") // the network was recreated elsewhere
		media.MTU = 1450
		for i := 0; i < 2; i++ {
			if _, err := datapath.EnsureBridge(media); err != nil {
				return err
			}
		}
		br, err := netlink.LinkByName("weft-media")
		if err != nil {
			return err
		}
		addrs, _ := netlink.AddrList(br, netlink.FAMILY_V4)
		if len(addrs) != 1 || addrs[0].IPNet.String() != "10.51.0.1/16" || br.Attrs().MTU != 1450 {
			return fmt.Errorf("bridge addresses %v MTU %d, want only 10.51.0.1/16 and 1450", addrs, br.Attrs().MTU)
		}
		bad := datapath.BridgeConfig{Name: "weft-bad", Gateway: netip.MustParsePrefix("10.52.0.1/16"), MTU: -5}
		if _, err := datapath.EnsureBridge(bad); !errors.Is(err, datapath.ErrBadBridge) {
			return fmt.Errorf("bad MTU: %v, want ErrBadBridge", err)
		}
		if _, err := netlink.LinkByName("weft-bad"); err == nil {
			return errors.New("a bad config created its bridge")
		}
		return nil
	})
	must(t, err)
}

func delRule(h *netlink.Handle, want string) error {
	rules, err := h.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for _, r := range rules {
		if r.Priority == datapath.ContainerRulePriority && r.Src != nil && fmt.Sprintf("from %s lookup %d", r.Src, r.Table) == want {
			return h.RuleDel(&r)
		}
	}
	return fmt.Errorf("no rule %q", want)
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	m := map[string]int{}
	for _, s := range a {
		m[s]++
	}
	for _, s := range b {
		if m[s] == 0 {
			return false
		}
		m[s]--
	}
	return true
}
