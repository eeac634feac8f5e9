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

// A network with an SLA class of its own is relayed by that class while the peers' own
// class keeps the direct link: the direct A↔C link is cheap but jittery (it breaks gold's
// jitter bound), the relay through B is slower but steady. The peers run without --sla
// (no bounds, cheapest path wins), so default stays direct and media (gold) goes through B
// — at both ends, a mirror path per network — and comes back when the jitter goes.
func TestSLAClassPerNetwork(t *testing.T) {
	l := newMeshLab(t, "wpnsla", 3, "--no-direct", "--probe-interval", "200ms")
	ctx := testCtx(t, 4*time.Minute)
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	const gold = "gold: rtt<=100ms,jitter<=9ms"
	if out, err := a.CLI(ctx, "network", "create", "media", "--subnet", "10.50.0.0/16", "--sla", gold); err != nil {
		t.Fatalf("create media: %v %s", err, out)
	}
	// rows: the routes of h to dest, by class name.
	rows := func(h *lab.Host, dest string) map[string]router.Route {
		var routes []router.Route
		if err := cliJSON(testCtx(t, 10*time.Second), h, &routes, "status", "routes"); err != nil {
			t.Fatalf("status routes on %s: %v", h.Name, err)
		}
		out := map[string]router.Route{}
		for _, r := range routes {
			if r.Peer == dest {
				class, _, _ := strings.Cut(r.SLA, ":")
				out[class] = r
			}
		}
		return out
	}
	paths := func(h, dest *lab.Host, wantGold, wantDefault []string) func() error {
		return func() error {
			rs := rows(h, dest.Name)
			g, d := rs["gold"], rs["default"]
			if !slices.Equal(g.Path, wantGold) || !slices.Equal(d.Path, wantDefault) {
				toB := rows(h, b.Name)["default"].Direct // the first hop of the relayed path
				return fmt.Errorf("gold %v (%s; networks %v), default %v (%s; networks %v); direct rtt %.1fms jitter %.1fms; to %s rtt %.1fms jitter %.1fms",
					g.Path, g.Reason, g.Networks, d.Path, d.Reason, d.Networks, d.Direct.RTTms, d.Direct.JitterMs, b.Name, toB.RTTms, toB.JitterMs)
			}
			return nil
		}
	}
	waitFor(t, ctx, 40*time.Second, "a row per class from A to C, both direct", paths(a, c, []string{c.Name}, []string{c.Name}))

	// The underlay namespace routes A↔C through a jittery delay line (10 ms ± 14 ms each
	// way) and A→B, C→B through a steady one (15 ms): direct ≈ 20 ms with ≈ 15 ms jitter,
	// through B ≈ 30 ms with next to none. B answers on its plain L2 links. The margins are
	// wide (gold allows 9 ms) because the lines are userspace: on a loaded machine the
	// steady one jitters by ~3.5 ms per hop too, ~7 ms on the relayed path (with ±6 ms and
	// a 2.5 ms bound, neither path met gold at a load average of 40).
	ul := "/run/netns/" + l.UnderlayNetNS()
	gw := "198.18.0.1"
	for _, cmd := range [][]string{
		{"ip", "-n", l.UnderlayNetNS(), "addr", "add", gw + "/24", "dev", l.Prefix() + "br"},
		{"ip", "netns", "exec", l.UnderlayNetNS(), "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf." + l.Prefix() + "br.send_redirects=0"},
		{"ip", "-n", a.Name, "route", "add", c.Addr.Addr().String() + "/32", "via", gw},
		{"ip", "-n", c.Name, "route", "add", a.Addr.Addr().String() + "/32", "via", gw},
		{"ip", "-n", a.Name, "route", "add", b.Addr.Addr().String() + "/32", "via", gw},
		{"ip", "-n", c.Name, "route", "add", b.Addr.Addr().String() + "/32", "via", gw},
	} {
		if out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", cmd, err, out)
		}
	}
	jittery, err := lab.NewDelayLine(lab.DelayConfig{NSPath: ul, Name: l.Prefix() + "dj", Delay: 10 * time.Millisecond, Jitter: 14 * time.Millisecond, Seed: 1,
		Routes: []netip.Prefix{netip.PrefixFrom(a.Addr.Addr(), 32), netip.PrefixFrom(c.Addr.Addr(), 32)}})
	if err != nil {
		t.Fatalf("delay line: %v", err)
	}
	t.Cleanup(func() { jittery.Close() })
	steady, err := lab.NewDelayLine(lab.DelayConfig{NSPath: ul, Name: l.Prefix() + "ds", Delay: 15 * time.Millisecond,
		Routes: []netip.Prefix{netip.PrefixFrom(b.Addr.Addr(), 32)}})
	if err != nil {
		t.Fatalf("delay line: %v", err)
	}
	t.Cleanup(func() { steady.Close() })
	// B answers A and C on its L2 links, so the underlay sees only one direction of those
	// flows; the lines' loose reverse-path filter drops that (the reverse lookup of A from
	// the steady line's TUN fails): off on both TUNs (the namespace's default is off too).
	for _, dev := range []string{"dj", "ds"} {
		if out, err := exec.CommandContext(ctx, "ip", "netns", "exec", l.UnderlayNetNS(), "sysctl", "-qw", "net.ipv4.conf."+l.Prefix()+dev+".rp_filter=0").CombinedOutput(); err != nil {
			t.Fatalf("rp_filter on %s: %v %s", dev, err, out)
		}
	}

	for _, end := range [][2]*lab.Host{{a, c}, {c, a}} {
		from, to := end[0], end[1]
		waitFor(t, ctx, 60*time.Second, from.Name+": gold through B, default direct", paths(from, to, []string{b.Name, to.Name}, []string{to.Name}))
		rs := rows(from, to.Name)
		if g := rs["gold"]; !g.SLAOK || !slices.Equal(g.Networks, []string{"media"}) {
			t.Fatalf("%s: gold row %+v: want the SLA held and the networks [media]", from.Name, g)
		}
		if d := rs["default"]; !slices.Contains(d.Networks, "default") || slices.Contains(d.Networks, "media") {
			t.Fatalf("%s: default row serves %v", from.Name, d.Networks)
		}
		states := map[string]string{}
		for _, conn := range connectionsOf(t, ctx, from) {
			if conn.Peer == to.Name {
				states[conn.Network] = conn.State + " " + conn.Reason
			}
		}
		if !strings.HasPrefix(states["media"], "relayed via "+b.Name) || !strings.HasPrefix(states["default"], "established") {
			t.Fatalf("%s's connections to %s: %v; want media relayed via %s, default established", from.Name, to.Name, states, b.Name)
		}
	}

	if err := jittery.SetParams(0, 0, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 60*time.Second, "gold back on the direct link without the jitter", paths(a, c, []string{c.Name}, []string{c.Name}))

	// The class goes with the last network that uses it.
	if out, err := a.CLI(ctx, "network", "rm", "media"); err != nil {
		t.Fatalf("rm media: %v %s", err, out)
	}
	waitFor(t, ctx, 20*time.Second, "no gold row once media is gone", func() error {
		if g, ok := rows(c, a.Name)["gold"]; ok {
			return fmt.Errorf("gold row %+v", g)
		}
		return nil
	})
}
