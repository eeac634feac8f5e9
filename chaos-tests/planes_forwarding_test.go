package chaostest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/router"
)

// underlayPlanes sorts captured underlay frames by what carries container traffic: VXLAN
// packets (UDP 6784) by VNI with the network of their inner destination, WireGuard packets
// (UDP 6786), and container packets or the marker seen in the clear outside VXLAN.
func underlayPlanes(frames [][]byte, marker []byte, ranges map[string]netip.Prefix) (vxlan map[uint32]map[string]int, wg int, clear []string) {
	vxlan = map[uint32]map[string]int{}
	netOf := func(a netip.Addr) string {
		for name, r := range ranges {
			if r.Contains(a) {
				return name
			}
		}
		return ""
	}
	for _, f := range frames {
		if len(f) < 34 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
			continue
		}
		ip := f[14:]
		ihl := int(ip[0]&0x0f) * 4
		src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		if n := netOf(src) + netOf(dst); n != "" {
			clear = append(clear, fmt.Sprintf("a plaintext %s packet %s → %s", n, src, dst))
			continue
		}
		if ip[9] != 17 || len(ip) < ihl+8 {
			continue
		}
		udp := ip[ihl:]
		sport, dport := binary.BigEndian.Uint16(udp), binary.BigEndian.Uint16(udp[2:])
		switch {
		case sport == 6786 || dport == 6786:
			wg++
			if bytes.Contains(f, marker) {
				clear = append(clear, "the marker inside a WireGuard packet")
			}
		case dport == 6784 && len(udp) >= 8+8+14+20:
			vx := udp[8:]
			vni := uint32(vx[4])<<16 | uint32(vx[5])<<8 | uint32(vx[6])
			inner := vx[8+14:]
			if vxlan[vni] == nil {
				vxlan[vni] = map[string]int{}
			}
			vxlan[vni][netOf(netip.AddrFrom4([4]byte(inner[16:20])))]++
			if bytes.Contains(f, marker) {
				vxlan[vni]["marker"]++
			}
		default:
			if bytes.Contains(f, marker) {
				clear = append(clear, "the marker in another packet")
			}
		}
	}
	return vxlan, wg, clear
}

// Forwarding per network (#13 item 3) on two real peers. They keep WireGuard available
// (--encrypt auto with the cluster key: the lab's default --encrypt never would turn
// WireGuard off, and media could then not be routed at all) but trust the underlay
// (--trusted-subnets), so the pair's own link is plaintext; --no-direct makes that VXLAN
// (the lab's hosts share one L2 segment, where plaintext would otherwise be plain routing).
// default (no policy of its own) then rides VXLAN VNI 4242, control (--encrypt never) VXLAN
// with its own VNI, and media (--encrypt always) WireGuard. A container on each host is
// attached to all three; each plane carries pings and a marker, and a capture on the
// underlay shows each plane's traffic where it belongs; status connections shows each
// network's mode.
func TestPlanesForwardingPerNetwork(t *testing.T) {
	// The lab's underlay (lab.Config's default): the hosts trust each other's addresses.
	l := newMeshLab(t, "wpf", 2, "--encrypt", "auto", "--trusted-subnets", "198.18.0.0/24", "--no-direct")
	ctx := testCtx(t, 4*time.Minute)
	a, b := l.Host(0), l.Host(1)
	ranges := planeRanges
	policy := map[string]string{"control": "never", "media": "always"}
	for _, name := range []string{"control", "media"} {
		if out, err := a.CLI(ctx, "network", "create", name, "--subnet", ranges[name].String(), "--encrypt", policy[name]); err != nil {
			t.Fatalf("create %s: %v %s", name, err, out)
		}
	}
	vnis := plan.VNIs([]string{"default", "control", "media"})
	if vnis["default"] != 4242 || vnis["control"] == 4242 {
		t.Fatalf("VNIs %v", vnis)
	}

	planes := []struct{ ifname, network string }{{"eth0", "default"}, {"net1", "control"}, {"net2", "media"}}
	attach := func(h *lab.Host) (*lab.Container, map[string]netip.Addr) {
		ctr, addrs := mustContainer(t, h), map[string]netip.Addr{}
		for _, p := range planes {
			res, err := planeCNI(t, h, p.network).Add(ctx, ctr.RuntimeConf(p.ifname))
			if err != nil {
				t.Fatalf("ADD %s on %s on %s: %v", p.ifname, p.network, h.Name, err)
			}
			addr, err := lab.ResultAddress(res)
			if err != nil || !ranges[p.network].Contains(addr.Addr()) {
				t.Fatalf("ADD %s on %s: address %s (%v), want one in %s", p.ifname, p.network, addr, err, ranges[p.network])
			}
			addrs[p.network] = addr.Addr()
		}
		return ctr, addrs
	}
	ctrA, onA := attach(a)
	ctrB, onB := attach(b)
	for _, p := range planes {
		waitPing(t, ctx, ctrA, onB[p.network])
		waitPing(t, ctx, ctrB, onA[p.network])
	}

	// status connections: one row per network, each with its mode, on both hosts.
	wantMode := map[string]string{"default": "vxlan", "control": "vxlan", "media": "wireguard"}
	for _, h := range l.Hosts() {
		waitFor(t, ctx, 20*time.Second, h.Name+"'s connections per network", func() error {
			var conns []router.Connection
			if err := cliJSON(ctx, h, &conns, "status", "connections"); err != nil {
				return err
			}
			seen := map[string]string{}
			for _, c := range conns {
				if c.State != "established" {
					return fmt.Errorf("%+v not established", c)
				}
				seen[c.Network] = c.Mode
			}
			if fmt.Sprint(seen) != fmt.Sprint(wantMode) {
				return fmt.Errorf("modes per network %v, want %v", seen, wantMode)
			}
			return nil
		})
		out, err := h.CLI(ctx, "status", "connections")
		if err != nil || !bytes.Contains(out, []byte("NETWORK")) || !bytes.Contains(out, []byte("media")) {
			t.Fatalf("status connections on %s: %v\n%s", h.Name, err, out)
		}
		t.Logf("status connections on %s:\n%s", h.Name, out)
	}

	// On the underlay: each plane's pings and marker where its policy puts them.
	for _, p := range planes {
		capture, err := b.Capture("eth0")
		if err != nil {
			t.Fatal(err)
		}
		marker := []byte(fmt.Sprintf("weft-%s-marker-%d", p.network, time.Now().UnixNano()))
		waitPing(t, ctx, ctrA, onB[p.network])
		sendMarker(t, placed{ctrA, onA[p.network]}, placed{ctrB, onB[p.network]}, marker)
		vx, wg, clear := underlayPlanes(capture.Stop(), marker, ranges)
		t.Logf("%s: VXLAN by VNI %v, %d WireGuard packets, in the clear %v", p.network, vx, wg, clear)
		if len(clear) > 0 {
			t.Errorf("%s: container traffic in the clear on the underlay: %v", p.network, clear)
		}
		for vni, nets := range vx {
			for n := range nets {
				if n == "marker" {
					n = p.network
				}
				if n != "" && vnis[n] != vni {
					t.Errorf("%s traffic in VXLAN with VNI %d, want %d (its network's)", n, vni, vnis[n])
				}
			}
		}
		switch p.network {
		case "media":
			if wg == 0 || len(vx[vnis["media"]]) > 0 || vx[4242]["media"] > 0 || vx[vnis["control"]]["media"] > 0 {
				t.Errorf("media must travel in WireGuard only: %d WireGuard packets, VXLAN %v", wg, vx)
			}
		default:
			if vx[vnis[p.network]][p.network] == 0 || vx[vnis[p.network]]["marker"] == 0 {
				t.Errorf("%s's pings and marker must travel in VXLAN with VNI %d: %v", p.network, vnis[p.network], vx)
			}
		}
	}

	// status routes names the networks the path to the other host serves.
	waitFor(t, ctx, 30*time.Second, "status routes naming the networks", func() error {
		var routes []router.Route
		if err := cliJSON(ctx, a, &routes, "status", "routes"); err != nil {
			return err
		}
		for _, r := range routes {
			if r.Peer == b.Name {
				if got := fmt.Sprint(r.Networks); got != "[control default media]" {
					return fmt.Errorf("route to %s serves %s", b.Name, got)
				}
				return nil
			}
		}
		return fmt.Errorf("no route to %s: %+v", b.Name, routes)
	})

	// While A's peer is down its kernel datapath stays: control (its own device) keeps
	// forwarding; after the restart every plane works again, control's device kept.
	dev := vxlanDevice(vnis["control"])
	if err := a.Kill(); err != nil {
		t.Fatal(err)
	}
	waitPing(t, ctx, ctrB, onA["control"])
	waitPing(t, ctx, ctrB, onA["default"])
	if err := a.Start(ctx); err != nil {
		t.Fatalf("restart %s: %v", a.Name, err)
	}
	waitLeader(t, ctx, l.Hosts())
	for _, p := range planes {
		waitPing(t, ctx, ctrA, onB[p.network])
		waitPing(t, ctx, ctrB, onA[p.network])
	}

	// A network that goes takes its VXLAN device with it on every host; default stays.
	for _, at := range []struct {
		h   *lab.Host
		ctr *lab.Container
	}{{a, ctrA}, {b, ctrB}} {
		if names, _ := at.h.LinkNames(); !slices.Contains(names, dev) {
			t.Fatalf("%s has no %s: %v", at.h.Name, dev, names)
		}
		if err := mustCNI(t, at.h, lab.CNIOptions{Name: "weft-control", Network: "control"}).Del(ctx, at.ctr.RuntimeConf("net1")); err != nil {
			t.Fatalf("DEL net1 on %s: %v", at.h.Name, err)
		}
	}
	waitFor(t, ctx, 30*time.Second, "rm control", func() error {
		if out, err := a.CLI(ctx, "network", "rm", "control"); err != nil {
			return fmt.Errorf("%v %s", err, out)
		}
		return nil
	})
	for _, h := range l.Hosts() {
		waitFor(t, ctx, 20*time.Second, h.Name+" without control's device", func() error {
			names, err := h.LinkNames()
			if err != nil {
				return err
			}
			if slices.Contains(names, dev) || !slices.Contains(names, "weft-vxlan") {
				return fmt.Errorf("links %v", names)
			}
			return nil
		})
	}
	waitPing(t, ctx, ctrA, onB["default"])
	waitPing(t, ctx, ctrA, onB["media"])
}

// vxlanDevice is vxlan.DeviceName (the chaos tests import no driver).
func vxlanDevice(vni uint32) string { return fmt.Sprintf("weftvx%06x", vni) }
