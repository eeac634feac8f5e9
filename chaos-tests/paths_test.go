package chaostest

import (
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

func routeTo(t *testing.T, h *lab.Host, dest string) router.Route {
	t.Helper()
	var routes []router.Route
	if err := cliJSON(testCtx(t, 10*time.Second), h, &routes, "status", "routes"); err != nil {
		t.Fatalf("status routes on %s: %v", h.Name, err)
	}
	for _, r := range routes {
		if r.Peer == dest {
			return r
		}
	}
	return router.Route{}
}

// A blocked or slow direct link sends traffic through a third peer, and back when it heals.
func TestRelays(t *testing.T) {
	l := newMeshLab(t, "wpthrel", 3, "--no-direct", "--probe-interval", "200ms", "--sla", "gold: rtt<=20ms")
	ctx := testCtx(t, 5*time.Minute)
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	pathIs := func(want ...string) func() error {
		return func() error {
			r := routeTo(t, a, c.Name)
			if !slices.Equal(r.Path, want) {
				return fmt.Errorf("path %v (%s)", r.Path, r.Reason)
			}
			return nil
		}
	}
	waitFor(t, ctx, 30*time.Second, "a measured direct path A → C", pathIs(c.Name))

	t.Run("a blocked direct link goes through the third peer", func(t *testing.T) {
		blockedLinkRelays(t, l, cs, pathIs)
	})

	t.Run("a broken VXLAN tunnel goes through the third peer while the underlay works", func(t *testing.T) {
		brokenTunnelRelays(t, l, cs, pathIs, 6784, "vxlan")
	})

	t.Run("a direct link slower than the SLA goes through the third peer", func(t *testing.T) {
		base := routeTo(t, a, c.Name).Direct.RTTms
		// The kernel has no netem: the lab's delay line is a TUN in a router namespace. The
		// underlay namespace becomes that router for A↔C only (198.18.0.1 on its bridge, A and
		// C route to each other's underlay address through it); B keeps its plain L2 links.
		ul := "/run/netns/" + l.UnderlayNetNS()
		router := "198.18.0.1"
		for _, cmd := range [][]string{
			{"ip", "-n", l.UnderlayNetNS(), "addr", "add", router + "/24", "dev", l.Prefix() + "br"},
			{"ip", "netns", "exec", l.UnderlayNetNS(), "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf." + l.Prefix() + "br.send_redirects=0"},
			{"ip", "-n", a.Name, "route", "add", c.Addr.Addr().String() + "/32", "via", router},
			{"ip", "-n", c.Name, "route", "add", a.Addr.Addr().String() + "/32", "via", router},
		} {
			if out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v %s", cmd, err, out)
			}
		}
		dl, err := lab.NewDelayLine(lab.DelayConfig{
			NSPath: ul, Name: "wrdl0", Delay: 30 * time.Millisecond,
			Routes: []netip.Prefix{netip.PrefixFrom(a.Addr.Addr(), 32), netip.PrefixFrom(c.Addr.Addr(), 32)},
		})
		if err != nil {
			t.Fatalf("delay line: %v", err)
		}
		t.Cleanup(func() { dl.Close() })
		waitFor(t, ctx, 30*time.Second, "A's path to C through B under the SLA", pathIs(b.Name, c.Name))
		r := routeTo(t, a, c.Name)
		if !r.SLAOK || r.RTTms >= 20 {
			t.Fatalf("relayed path %v: rtt %.2fms, sla_ok %v; want under 20ms", r.Path, r.RTTms, r.SLAOK)
		}
		// The measured direct RTT agrees with the delay line (30 ms each way, so 60 ms round
		// trip) within 20%, plus the base RTT.
		waitFor(t, ctx, 20*time.Second, "the direct RTT to settle near 60ms", func() error {
			got := routeTo(t, a, c.Name).Direct.RTTms
			if got < 48+base || got > 72+base {
				return fmt.Errorf("direct RTT %.2fms, base %.2fms", got, base)
			}
			return nil
		})
		waitPing(t, ctx, cs[0].ctr, cs[2].addr)
		if err := dl.SetParams(0, 0, 0); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 30*time.Second, "back to the direct path without the delay", pathIs(c.Name))
	})
}

// blockedLinkRelays cuts A↔C on the underlay while A↔B and B↔C work: A and C must keep
// talking through B, and go back to the direct link once it heals.
func blockedLinkRelays(t *testing.T, l *lab.Lab, cs []placed, pathIs func(...string) func() error) {
	ctx := testCtx(t, 2*time.Minute)
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	if err := l.Partition([]*lab.Host{a}, []*lab.Host{c}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 20*time.Second, "A's path to C through B", pathIs(b.Name, c.Name))
	waitPing(t, ctx, cs[0].ctr, cs[2].addr)
	waitPing(t, ctx, cs[2].ctr, cs[0].addr)
	found := false
	for _, conn := range connectionsOf(t, ctx, a) {
		if conn.Peer == c.Name && conn.State == "relayed" {
			found = true
		}
	}
	if !found {
		t.Fatalf("status connections on A does not show C relayed: %+v", connectionsOf(t, ctx, a))
	}
	if err := l.Heal(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 30*time.Second, "back to the direct path", pathIs(c.Name))
	waitPing(t, ctx, cs[0].ctr, cs[2].addr)
}

// brokenTunnelRelays breaks only the tunnel between A and C (its UDP port), so that gossip
// and underlay probes still work: the link probes through the tunnel must notice, A and C
// must keep talking through B, `status routes` must say why, and traffic must go back to the
// direct link once the tunnel works again.
func brokenTunnelRelays(t *testing.T, l *lab.Lab, cs []placed, pathIs func(...string) func() error, port uint16, mode string) {
	ctx := testCtx(t, 2*time.Minute)
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	if err := l.BreakTunnel(port, []*lab.Host{a}, []*lab.Host{c}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 20*time.Second, "A's path to C through B", pathIs(b.Name, c.Name))
	waitPing(t, ctx, cs[0].ctr, cs[2].addr)
	waitPing(t, ctx, cs[2].ctr, cs[0].addr)
	// The path can move to the relay on loss before the third lost probe marks the link
	// down, so the status may take a probe timeout more to say why.
	waitFor(t, ctx, 10*time.Second, "A's route to C to show the link down and the underlay up", func() error {
		r := routeTo(t, a, c.Name)
		if !r.Underlay.Up || r.Direct.Up || r.Link != mode || !strings.Contains(r.Reason, "broken while the underlay answers") {
			return fmt.Errorf("underlay up %v, %s link up %v (%q); want the underlay up, the link down and the reason given",
				r.Underlay.Up, r.Link, r.Direct.Up, r.Reason)
		}
		return nil
	})
	var peers []router.PeerStatus
	if err := cliJSON(ctx, a, &peers, "status", "peers"); err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if p.Name == c.Name && p.State != "alive" {
			t.Fatalf("gossip to C should still work with only the tunnel broken: %+v", p)
		}
	}
	if err := l.Heal(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 40*time.Second, "back to the direct path once the tunnel works", pathIs(c.Name))
	waitPing(t, ctx, cs[0].ctr, cs[2].addr)
}

// The same over WireGuard: the relay's AllowedIPs must take over C's blocks.
func TestRelaysOverWireGuard(t *testing.T) {
	pw := passwordFile(t, "relay test password, long enough")
	l := newMeshLab(t, "wpthrwg", 3, "--password-file", pw, "--encrypt", "always", "--probe-interval", "200ms")
	ctx := testCtx(t, 3*time.Minute)
	a, c := l.Host(0), l.Host(2)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	pathIs := func(want ...string) func() error {
		return func() error {
			if r := routeTo(t, a, c.Name); !slices.Equal(r.Path, want) {
				return fmt.Errorf("path %v (%s)", r.Path, r.Reason)
			}
			return nil
		}
	}
	waitFor(t, ctx, 30*time.Second, "a measured direct path A → C", pathIs(c.Name))
	t.Run("a blocked direct link goes through the third peer", func(t *testing.T) {
		blockedLinkRelays(t, l, cs, pathIs)
	})
	t.Run("a broken WireGuard tunnel goes through the third peer while the underlay works", func(t *testing.T) {
		brokenTunnelRelays(t, l, cs, pathIs, 6786, "wireguard")
	})
}
