package direct_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/direct"
	"github.com/weftnet/weft/datapath/nslab"
)

// The kernel tests need root and a kernel with netns, veth and bridge. They build labs of
// namespaces named wdr-<pid>-<test>-…, never touch the machine's own namespace, and remove
// them. Not being root is a failure, not a skip: CI runs as root.

func newLab(t *testing.T, tag string, hosts int, routed bool) *nslab.Lab {
	t.Helper()
	return nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wdr-%d-%s-", os.Getpid()%100000, tag), Hosts: hosts, Routed: routed})
}

func deadline(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func peersOf(l *nslab.Lab, i int) []datapath.RemotePeer {
	var peers []datapath.RemotePeer
	for j, h := range l.Hosts {
		if j != i {
			peers = append(peers, h.RemotePeer(nil))
		}
	}
	return peers
}

// routesOn lists every route of the main table through the host's underlay interface
// that is not the kernel's own, as sorted "dst via gw proto N".
func routesOn(h *nslab.Host) ([]string, error) {
	var out []string
	err := h.Do(func() error {
		link, err := netlink.LinkByName(nslab.UnderlayDev)
		if err != nil {
			return err
		}
		routes, err := netlink.RouteList(link, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Protocol == unix.RTPROT_KERNEL {
				continue
			}
			out = append(out, fmt.Sprintf("%s via %s proto %d", r.Dst, r.Gw, r.Protocol))
		}
		return nil
	})
	slices.Sort(out)
	return out, err
}

func wantRoutes(peers []datapath.RemotePeer, extra ...string) []string {
	out := append([]string(nil), extra...)
	for _, p := range peers {
		for _, b := range p.Blocks {
			out = append(out, fmt.Sprintf("%s via %s proto 87", b, p.Underlay))
		}
	}
	slices.Sort(out)
	return out
}

// TestMesh runs three hosts on one L2 underlay with direct routes: traffic, exact routes,
// idempotence, convergence after a peer leaves, Close, and an operator's route on the
// same interface that weft must never touch.
func TestMesh(t *testing.T) {
	l := newLab(t, "m", 3, false)
	ctx := deadline(t, 40*time.Second)
	const foreign = "10.99.0.0/24 via 172.31.0.2 proto 4" // proto static, made by "the operator"
	drivers := make([]*direct.Driver, len(l.Hosts))
	for i, h := range l.Hosts {
		d, err := direct.New(direct.Config{Underlay: h.Underlay.Addr()})
		if err != nil {
			t.Fatal(err)
		}
		drivers[i] = d
		t.Cleanup(func() { h.Do(d.Close) })
		if _, err := h.AddContainer(); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			if _, err := h.Run(ctx, "ip", "route", "add", "10.99.0.0/24", "via", "172.31.0.2", "proto", "static"); err != nil {
				t.Fatal(err)
			}
		}
		err = h.Do(func() error {
			if err := d.Up(ctx); err != nil {
				return err
			}
			return d.Set(peersOf(l, i))
		})
		if err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
	}
	h0, h1, h2 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	c0, c1, c2 := h0.Containers[0], h1.Containers[0], h2.Containers[0]
	for _, pair := range [][2]*nslab.Container{{c0, c1}, {c0, c2}, {c1, c2}, {c2, c0}} {
		if err := pair[0].WaitPing(ctx, pair[1].Addr.Addr()); err != nil {
			t.Fatalf("%s → %s: %v", pair[0].Name, pair[1].Name, err)
		}
	}
	if err := c0.WaitPing(ctx, c2.Addr.Addr(), "-M", "do", "-s", "1372"); err != nil {
		t.Fatalf("1400-byte DF ping: %v", err)
	}
	if bps, err := nslab.Transfer(ctx, c1, c0, 32<<20); err != nil {
		t.Fatalf("TCP transfer c1 → c0: %v", err)
	} else {
		t.Logf("TCP transfer over direct routes: %.0f Mbit/s", bps/1e6)
	}

	before := make([][]string, len(l.Hosts))
	for i, h := range l.Hosts {
		got, err := routesOn(h)
		if err != nil {
			t.Fatal(err)
		}
		var extra []string
		if i == 0 {
			extra = []string{foreign}
		}
		if want := wantRoutes(peersOf(l, i), extra...); !slices.Equal(got, want) {
			t.Fatalf("%s routes %q, want %q", h.Name, got, want)
		}
		before[i] = got
	}
	// Up and Set again: nothing changes.
	for i, h := range l.Hosts {
		if err := h.Do(func() error {
			if err := drivers[i].Up(ctx); err != nil {
				return err
			}
			return drivers[i].Set(peersOf(l, i))
		}); err != nil {
			t.Fatal(err)
		}
		if got, _ := routesOn(h); !slices.Equal(got, before[i]) {
			t.Fatalf("%s: second Set changed routes: %q, was %q", h.Name, got, before[i])
		}
	}
	// Host 0 loses host 2.
	only1 := []datapath.RemotePeer{h1.RemotePeer(nil)}
	if err := h0.Do(func() error { return drivers[0].Set(only1) }); err != nil {
		t.Fatal(err)
	}
	if got, _ := routesOn(h0); !slices.Equal(got, wantRoutes(only1, foreign)) {
		t.Fatalf("after removing %s: %q", h2.Name, got)
	}
	if _, err := c0.Run(ctx, "ping", "-c1", "-W1", c2.Addr.Addr().String()); err == nil {
		t.Error("c0 still reaches c2 after host 2 was removed from host 0's peers")
	}
	// Close removes weft's routes only; twice is fine.
	for i := 0; i < 2; i++ {
		if err := h0.Do(drivers[0].Close); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := routesOn(h0); !slices.Equal(got, []string{foreign}) {
		t.Fatalf("after Close: %q, want only the operator's route", got)
	}
}

// TestSetReportsUnreachablePeer: on a routed underlay the other host is not on our subnet;
// SameL2 says so and the kernel refuses the route, which Set reports, naming the block.
func TestSetReportsUnreachablePeer(t *testing.T) {
	l := newLab(t, "r", 2, true)
	h0, h1 := l.Hosts[0], l.Hosts[1]
	ctx := deadline(t, 10*time.Second)
	if datapath.SameL2(h0.Underlay, h1.Underlay.Addr()) {
		t.Fatalf("SameL2(%s, %s) = true on a routed underlay", h0.Underlay, h1.Underlay.Addr())
	}
	err := h0.Do(func() error {
		d, err := direct.New(direct.Config{Underlay: h0.Underlay.Addr()})
		if err != nil {
			return err
		}
		if err := d.Up(ctx); err != nil {
			return err
		}
		bad := []datapath.RemotePeer{h1.RemotePeer(nil), {Name: "nounderlay", Blocks: []netip.Prefix{netip.MustParsePrefix("10.40.50.0/26")}}}
		err = d.Set(bad)
		if err == nil || !strings.Contains(err.Error(), h1.Block.String()) || !errors.Is(err, datapath.ErrBadPeer) {
			return fmt.Errorf("Set with an off-link peer and a peer without underlay = %v", err)
		}
		t.Logf("Set reported: %v", err)
		return d.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestUnderlayPrefixAndProxyARP(t *testing.T) {
	l := newLab(t, "u", 1, false)
	h := l.Hosts[0]
	err := h.Do(func() error {
		p, dev, err := datapath.UnderlayPrefix(h.Underlay.Addr())
		if err != nil || p != h.Underlay || dev != nslab.UnderlayDev {
			return fmt.Errorf("UnderlayPrefix = %s %s %v, want %s %s", p, dev, err, h.Underlay, nslab.UnderlayDev)
		}
		if _, _, err := datapath.UnderlayPrefix(netip.MustParseAddr("192.0.2.99")); !errors.Is(err, datapath.ErrNoUnderlay) {
			return fmt.Errorf("UnderlayPrefix of an absent address = %v, want ErrNoUnderlay", err)
		}
		d, _ := direct.New(direct.Config{Underlay: netip.MustParseAddr("192.0.2.99")})
		if err := d.Up(context.Background()); !errors.Is(err, datapath.ErrNoUnderlay) {
			return fmt.Errorf("Up without the underlay address = %v, want ErrNoUnderlay", err)
		}
		// nslab enabled proxy ARP through EnableProxyARP; read it back, in this namespace.
		for key, want := range map[string]string{"conf/weft/proxy_arp": "1", "neigh/weft/proxy_delay": "0"} {
			b, err := os.ReadFile("/proc/sys/net/ipv4/" + key)
			if err != nil || strings.TrimSpace(string(b)) != want {
				return fmt.Errorf("%s = %q (%v), want %s", key, b, err, want)
			}
		}
		if err := datapath.EnableProxyARP("../all"); err == nil {
			return errors.New("EnableProxyARP accepted a path")
		}
		if err := datapath.EnableProxyARP("nosuchdev"); err == nil {
			return errors.New("EnableProxyARP of a missing interface succeeded")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestSameL2(t *testing.T) {
	for _, tc := range []struct {
		local, remote string
		want          bool
	}{
		{"192.0.2.10/24", "192.0.2.20", true},
		{"192.0.2.10/24", "192.0.3.20", false},
		{"192.0.2.10/24", "192.0.2.10", false}, // ourselves
		{"192.0.2.10/32", "192.0.2.11", false}, // host route
		{"10.1.0.5/16", "10.1.255.1", true},
		{"192.0.2.10/24", "2001:db8::1", false},
		{"2001:db8::1/64", "2001:db8::2", true},
		{"2001:db8::1/64", "2001:db9::2", false},
		{"192.0.2.10/24", "::ffff:192.0.2.20", true}, // v4-mapped is the v4 address
	} {
		got := datapath.SameL2(netip.MustParsePrefix(tc.local), netip.MustParseAddr(tc.remote))
		if got != tc.want {
			t.Errorf("SameL2(%s, %s) = %v, want %v", tc.local, tc.remote, got, tc.want)
		}
	}
	if datapath.SameL2(netip.Prefix{}, netip.MustParseAddr("192.0.2.1")) {
		t.Error("SameL2 of an invalid prefix")
	}
}

func TestModeAndNew(t *testing.T) {
	if _, err := direct.New(direct.Config{}); err == nil {
		t.Fatal("New without an underlay address accepted")
	}
	d, err := direct.New(direct.Config{Underlay: netip.MustParseAddr("192.0.2.1")})
	if err != nil || d.Mode() != "direct" {
		t.Fatalf("New = %v, %v", d, err)
	}
	var _ datapath.Driver = d
}
