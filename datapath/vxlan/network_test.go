package vxlan

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
)

// vxlanPacket is one VXLAN-encapsulated IPv4 packet seen on the underlay.
type vxlanPacket struct {
	vni      uint32
	src, dst netip.Addr // of the inner IPv4 packet
}

// decodeVXLAN picks the VXLAN packets (UDP to port) out of captured Ethernet frames.
func decodeVXLAN(frames [][]byte, port int) []vxlanPacket {
	var out []vxlanPacket
	for _, f := range frames {
		if len(f) < 14+20 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
			continue
		}
		ip := f[14:]
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] != 17 || len(ip) < ihl+8+8+14+20 {
			continue
		}
		udp := ip[ihl:]
		if int(binary.BigEndian.Uint16(udp[2:4])) != port {
			continue
		}
		vx := udp[8:]
		inner := vx[8+14:]
		if binary.BigEndian.Uint16(vx[8+12:8+14]) != 0x0800 {
			continue
		}
		out = append(out, vxlanPacket{
			vni: uint32(vx[4])<<16 | uint32(vx[5])<<8 | uint32(vx[6]),
			src: netip.AddrFrom4([4]byte(inner[12:16])), dst: netip.AddrFrom4([4]byte(inner[16:20])),
		})
	}
	return out
}

// Two networks side by side: on each of two hosts the default device (VNI 4242) and a
// network's own device (another VNI, same UDP port) run together; each carries its own
// containers' traffic, with its own VNI on the wire, and the other's packets never.
func TestTwoVNIsSideBySide(t *testing.T) {
	l := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wpf-%d-vni-", os.Getpid()%100000), Hosts: 2, Routed: true})
	ctx := deadline(t, 40*time.Second)
	const vni2 = 0x57abcd
	type pair struct{ def, net *Driver }
	drivers := make([]pair, 2)
	for i, h := range l.Hosts {
		def, err := New(Config{Underlay: h.Underlay.Addr(), LinkProbes: true})
		if err != nil {
			t.Fatal(err)
		}
		other, err := New(Config{Underlay: h.Underlay.Addr(), Name: DeviceName(vni2), VNI: vni2, LinkProbes: true})
		if err != nil {
			t.Fatal(err)
		}
		if other.Name() != "weftvx57abcd" || other.MAC().String() != DeriveMAC(h.Underlay.Addr(), vni2).String() || other.MAC().String() == def.MAC().String() {
			t.Fatalf("network device %s MAC %s (default's %s)", other.Name(), other.MAC(), def.MAC())
		}
		drivers[i] = pair{def, other}
		for _, d := range []*Driver{def, other} {
			if err := h.Do(func() error { return d.Up(ctx) }); err != nil {
				t.Fatalf("%s: up %s: %v", h.Name, d.Name(), err)
			}
			t.Cleanup(func() { h.Do(d.Close) })
		}
		// Container 0 stands for the default network, container 1 for the other one.
		for range 2 {
			if _, err := h.AddContainer(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, h := range l.Hosts {
		j := 1 - i
		remote := l.Hosts[j]
		c0, c1 := remote.Containers[0].Addr.Addr(), remote.Containers[1].Addr.Addr()
		def := datapath.RemotePeer{Name: remote.Name, Underlay: remote.Underlay.Addr(), VTEPMAC: drivers[j].def.MAC(),
			Blocks: []netip.Prefix{netip.PrefixFrom(c0, 32)}}
		// The network's device: the remote MAC derived from (underlay, VNI), as plan does;
		// the probes to the peer go through the default device only.
		other := datapath.RemotePeer{Name: remote.Name, Underlay: remote.Underlay.Addr(), VTEPMAC: DeriveMAC(remote.Underlay.Addr(), vni2),
			Blocks: []netip.Prefix{netip.PrefixFrom(c1, 32)}, NoProbe: true}
		if err := h.Do(func() error { return drivers[i].def.Set([]datapath.RemotePeer{def}) }); err != nil {
			t.Fatalf("%s: set default: %v", h.Name, err)
		}
		if err := h.Do(func() error { return drivers[i].net.Set([]datapath.RemotePeer{other}) }); err != nil {
			t.Fatalf("%s: set network: %v", h.Name, err)
		}
	}
	h0, h1 := l.Hosts[0], l.Hosts[1]
	capture, err := nslab.StartCapture(h1.Path(), nslab.UnderlayDev)
	if err != nil {
		t.Fatal(err)
	}
	defer capture.Stop()
	if err := h0.Containers[0].WaitPing(ctx, h1.Containers[0].Addr.Addr()); err != nil {
		t.Fatalf("default network: %v", err)
	}
	if err := h0.Containers[1].WaitPing(ctx, h1.Containers[1].Addr.Addr()); err != nil {
		t.Fatalf("second network: %v", err)
	}
	seen := map[string]uint32{}
	for _, p := range decodeVXLAN(capture.Stop(), DefaultPort) {
		key := p.src.String() + ">" + p.dst.String()
		if vni, dup := seen[key]; dup && vni != p.vni {
			t.Fatalf("%s seen with VNIs %d and %d", key, vni, p.vni)
		}
		seen[key] = p.vni
	}
	c00, c01 := h0.Containers[0].Addr.Addr(), h0.Containers[1].Addr.Addr()
	c10, c11 := h1.Containers[0].Addr.Addr(), h1.Containers[1].Addr.Addr()
	for key, want := range map[string]uint32{
		c00.String() + ">" + c10.String(): DefaultVNI, c10.String() + ">" + c00.String(): DefaultVNI,
		c01.String() + ">" + c11.String(): vni2, c11.String() + ">" + c01.String(): vni2,
	} {
		if got, ok := seen[key]; !ok || got != want {
			t.Errorf("%s: VNI %d (seen %v), want %d; all: %v", key, got, ok, want, seen)
		}
	}

	// Only the default device routes the probes to the peer.
	probes := func(dev string) int {
		var n int
		h0.Do(func() error {
			link, err := netlink.LinkByName(dev)
			if err != nil {
				return err
			}
			routes, err := datapath.ListRoutes(nil, datapath.ProbeTable, link.Attrs().Index)
			n = len(routes)
			return err
		})
		return n
	}
	if a, b := probes(DefaultName), probes(DeviceName(vni2)); a != 1 || b != 0 {
		t.Fatalf("probe routes: %d through the default device, %d through the network's; want 1 and 0", a, b)
	}

	// Removing the network's device leaves the default network working, and RemoveStale
	// removes a network device nobody keeps but nothing else.
	if err := h0.Do(func() error { return RemoveStale([]string{DefaultName}, nil) }); err != nil {
		t.Fatal(err)
	}
	var names []string
	h0.Do(func() error {
		links, err := netlink.LinkList()
		for _, l := range links {
			names = append(names, l.Attrs().Name)
		}
		return err
	})
	if slices.Contains(names, DeviceName(vni2)) || !slices.Contains(names, DefaultName) || !slices.Contains(names, nslab.Bridge) {
		t.Fatalf("after RemoveStale: %v", names)
	}
	if err := h0.Containers[0].WaitPing(ctx, h1.Containers[0].Addr.Addr()); err != nil {
		t.Fatalf("default network after the other's device went: %v", err)
	}
}

func TestDeviceName(t *testing.T) {
	if DeviceName(DefaultVNI) != DefaultName || DeviceName(0x570001) != "weftvx570001" || !isNetworkDevice("weftvx570001") ||
		isNetworkDevice("weft-vxlan") || isNetworkDevice("weftvx57000g") || isNetworkDevice("weftvx5700011") {
		t.Fatal("device names")
	}
}
