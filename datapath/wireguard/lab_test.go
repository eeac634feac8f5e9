package wireguard

// The driver's tests run on nslab's topology (datapath/nslab): an underlay namespace
// holding a bridge, and per host a namespace joined to it by veth (eth0,
// 172.31.0.<i+1>/24), the weft bridge 10.40.0.1/16 with proxy ARP, the block
// 10.40.<i+1>.0/26, one container attached with datapath.Attach (10.40.<i+1>.2/16) and
// here a wireguard driver brought up inside the host namespace. IPv6 is off everywhere,
// so the underlay carries nothing but ARP and WireGuard, which the capture test checks
// strictly. Namespaces are named wwg-<pid>-…; tests need root and fail without it.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
)

type lab struct {
	t     *testing.T
	hosts []*host
}

type host struct {
	*nslab.Host
	name     string // peer name
	ns       ns.NetNS
	contNS   ns.NetNS
	contName string // container namespace name (for ip netns exec)
	underlay netip.Addr
	block    netip.Prefix
	contAddr netip.Addr
	keyFile  string
	drv      *Driver
}

func run(args ...string) (string, error) {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// newLab makes the underlay and n hosts with drivers that are up but have no peers.
// forceUserspace(i) forces userspace WireGuard on host i (1-based; otherwise the kernel is
// tried first).
func newLab(t *testing.T, n int, forceUserspace func(i int) bool) *lab {
	t.Helper()
	return newLabWith(t, n, forceUserspace, false)
}

func newLabWith(t *testing.T, n int, forceUserspace func(i int) bool, linkProbes bool) *lab {
	t.Helper()
	nl := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wwg-%d-", os.Getpid()), Hosts: n, NoIPv6: true})
	l := &lab{t: t}
	for i, nh := range nl.Hosts {
		l.hosts = append(l.hosts, l.addHost(nh, forceUserspace(i+1), linkProbes))
	}
	return l
}

func (l *lab) addHost(nh *nslab.Host, forceUserspace, linkProbes bool) *host {
	t := l.t
	c, err := nh.AddContainer()
	if err != nil {
		t.Fatal(err)
	}
	h := &host{
		Host:     nh,
		name:     nh.Name,
		ns:       nh.NetNS,
		contNS:   c.NetNS,
		contName: c.Name,
		underlay: nh.Underlay.Addr(),
		block:    nh.Block,
		contAddr: c.Addr.Addr(),
		keyFile:  filepath.Join(t.TempDir(), "wireguard.key"),
	}
	err = nh.Do(func() error {
		drv, err := New(Config{
			PeerName: h.name, KeyFile: h.keyFile, Underlay: h.underlay,
			Logger: testLogger(t, h.name), ForceUserspace: forceUserspace, LinkProbes: linkProbes,
		})
		if err != nil {
			return err
		}
		h.drv = drv
		t.Cleanup(func() { drv.Close() })
		return drv.Up(t.Context())
	})
	if err != nil {
		t.Fatalf("host %s: %v", h.name, err)
	}
	return h
}

// peer is h as another host's driver sees it.
func (h *host) peer() datapath.RemotePeer {
	return datapath.RemotePeer{
		Name:          h.name,
		Underlay:      h.underlay,
		WireGuardKey:  h.drv.PublicKey(),
		WireGuardPort: h.drv.Port(),
		Blocks:        []netip.Prefix{h.block},
	}
}

// setMesh gives every host all the others as peers.
func (l *lab) setMesh() {
	l.t.Helper()
	for _, h := range l.hosts {
		if err := h.drv.Set(l.others(h)); err != nil {
			l.t.Fatalf("Set on %s: %v", h.name, err)
		}
	}
}

func (l *lab) others(h *host) []datapath.RemotePeer {
	var ps []datapath.RemotePeer
	for _, o := range l.hosts {
		if o != h {
			ps = append(ps, o.peer())
		}
	}
	return ps
}

// ping pings dst once from h's container.
func (h *host) ping(dst netip.Addr, extra ...string) error {
	args := append([]string{"ip", "netns", "exec", h.contName, "ping", "-n", "-c1", "-W1"}, extra...)
	_, err := run(append(args, dst.String())...)
	return err
}

// startCapture records every frame on an interface of h's namespace until the test ends
// (or Stop).
func startCapture(t *testing.T, h *host, ifname string) *nslab.Capture {
	t.Helper()
	c, err := nslab.StartCapture(h.Path(), ifname)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Stop() })
	return c
}

// classify says what an Ethernet frame is: "arp", "igmp", "wireguard" (IPv4 UDP from or
// to DefaultPort) or an error describing anything else.
func classify(frame []byte) (string, error) {
	if len(frame) < 14 {
		return "", errors.New("runt frame")
	}
	switch et := binary.BigEndian.Uint16(frame[12:14]); et {
	case unix.ETH_P_ARP:
		return "arp", nil
	case unix.ETH_P_IP:
		ip := frame[14:]
		if len(ip) < 20 {
			return "", errors.New("short IPv4 packet")
		}
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] == unix.IPPROTO_IGMP {
			// Multicast membership reports the kernel sends on its own (seen once in CI);
			// they carry no payload. The marker check still catches any leak.
			return "igmp", nil
		}
		if ip[9] != unix.IPPROTO_UDP || len(ip) < ihl+8 {
			return "", fmt.Errorf("IPv4 protocol %d on the underlay", ip[9])
		}
		sport := binary.BigEndian.Uint16(ip[ihl:])
		dport := binary.BigEndian.Uint16(ip[ihl+2:])
		if sport != DefaultPort && dport != DefaultPort {
			return "", fmt.Errorf("UDP %d -> %d on the underlay", sport, dport)
		}
		return "wireguard", nil
	default:
		return "", fmt.Errorf("ethertype %#04x on the underlay", et)
	}
}
