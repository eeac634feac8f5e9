package wireguard

// A small lab for the driver's tests: an underlay namespace holding a bridge, and per host
// a namespace joined to it by veth (eth0, 192.168.77.<i>/24), a weft bridge 10.40.0.1/16
// with proxy ARP, one container namespace attached with datapath.Attach
// (10.40.<i>.2/16), the block 10.40.<i>.0/26 and a wireguard driver brought up inside the
// host namespace. Namespaces are named wwg-<pid>-…; tests need root and fail without it.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
)

type lab struct {
	t      *testing.T
	prefix string
	ul     string // underlay namespace name
	hosts  []*host
	// linkProbes turns on Config.LinkProbes in every host's driver.
	linkProbes bool
}

type host struct {
	idx      int
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

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("these tests need root (network namespaces, TUN, netlink); run them as root")
	}
}

func run(args ...string) (string, error) {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func (l *lab) must(args ...string) {
	l.t.Helper()
	if _, err := run(args...); err != nil {
		l.t.Fatal(err)
	}
}

func (l *lab) addNS(name string) ns.NetNS {
	l.t.Helper()
	l.must("ip", "netns", "add", name)
	l.t.Cleanup(func() { run("ip", "netns", "del", name) })
	n, err := ns.GetNS(filepath.Join("/var/run/netns", name))
	if err != nil {
		l.t.Fatalf("open netns %s: %v", name, err)
	}
	l.t.Cleanup(func() { n.Close() })
	return n
}

// noIPv6 turns IPv6 off in a namespace before its links are made: the underlay then carries
// nothing but ARP and WireGuard (no router solicitations or MLD), which the capture test
// checks strictly.
func (l *lab) noIPv6(name string) {
	l.t.Helper()
	l.must("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
}

// newLab makes the underlay and n hosts with drivers that are up but have no peers.
// userspace[i] forces userspace WireGuard on host i (otherwise the kernel is tried first).
func newLab(t *testing.T, n int, forceUserspace func(i int) bool) *lab {
	t.Helper()
	return newLabWith(t, n, forceUserspace, false)
}

func newLabWith(t *testing.T, n int, forceUserspace func(i int) bool, linkProbes bool) *lab {
	t.Helper()
	requireRoot(t)
	l := &lab{t: t, prefix: fmt.Sprintf("wwg-%d-", os.Getpid()), linkProbes: linkProbes}
	l.ul = l.prefix + "ul"
	l.addNS(l.ul)
	l.noIPv6(l.ul)
	l.must("ip", "-n", l.ul, "link", "add", "br0", "type", "bridge")
	l.must("ip", "-n", l.ul, "link", "set", "br0", "up")
	for i := 1; i <= n; i++ {
		l.hosts = append(l.hosts, l.addHost(i, forceUserspace(i)))
	}
	return l
}

func (l *lab) addHost(i int, forceUserspace bool) *host {
	t := l.t
	h := &host{
		idx:      i,
		name:     fmt.Sprintf("%sh%d", l.prefix, i),
		underlay: netip.AddrFrom4([4]byte{192, 168, 77, byte(i)}),
		block:    netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 40, byte(i), 0}), 26),
		contAddr: netip.AddrFrom4([4]byte{10, 40, byte(i), 2}),
		keyFile:  filepath.Join(t.TempDir(), "wireguard.key"),
		contName: fmt.Sprintf("%sc%d", l.prefix, i),
	}
	h.ns = l.addNS(h.name)
	h.contNS = l.addNS(h.contName)
	l.noIPv6(h.name)
	uplink := fmt.Sprintf("h%d", i)
	l.must("ip", "-n", l.ul, "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", h.name)
	l.must("ip", "-n", l.ul, "link", "set", uplink, "master", "br0", "up")
	l.must("ip", "-n", h.name, "addr", "add", h.underlay.String()+"/24", "dev", "eth0")
	l.must("ip", "-n", h.name, "link", "set", "eth0", "up")
	l.must("ip", "-n", h.name, "link", "set", "lo", "up")
	l.must("ip", "-n", h.contName, "link", "set", "lo", "up")

	err := h.ns.Do(func(ns.NetNS) error {
		if _, err := datapath.EnsureBridge(datapath.BridgeConfig{
			Name: "weft", Gateway: netip.MustParsePrefix("10.40.0.1/16"), MTU: 1400,
		}); err != nil {
			return err
		}
		// Containers see the whole /16 on link; the host answers ARP for remote blocks
		// (routed through the WireGuard device) on the bridge.
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/weft/proxy_arp", []byte("1"), 0o644); err != nil {
			return err
		}
		if _, err := datapath.Attach(datapath.Attachment{
			NetNS:      h.contNS.Path(),
			IfName:     "eth0",
			HostIfName: datapath.HostIfName(h.contNS.Path(), "eth0"),
			Bridge:     "weft",
			Address:    netip.PrefixFrom(h.contAddr, 16),
			Gateway:    netip.MustParseAddr("10.40.0.1"),
			MTU:        1400,
		}); err != nil {
			return err
		}
		drv, err := New(Config{
			PeerName: h.name, KeyFile: h.keyFile, Underlay: h.underlay,
			Logger: testLogger(t, h.name), ForceUserspace: forceUserspace, LinkProbes: l.linkProbes,
		})
		if err != nil {
			return err
		}
		h.drv = drv
		t.Cleanup(func() { drv.Close() })
		return drv.Up(t.Context())
	})
	if err != nil {
		t.Fatalf("host %d: %v", i, err)
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

// waitFor polls cond until it returns nil or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// capture records every frame on an interface of a namespace (AF_PACKET, both directions).
type capture struct {
	fd     int
	stop   atomic.Bool
	done   chan struct{}
	mu     sync.Mutex
	frames [][]byte
}

func startCapture(t *testing.T, n ns.NetNS, ifname string) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{})}
	proto := int(htons(unix.ETH_P_ALL))
	err := n.Do(func(ns.NetNS) error {
		ifi, err := netInterfaceIndex(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		c.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi}); err != nil {
			unix.Close(fd)
			return err
		}
		tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		t.Fatalf("capture on %s: %v", ifname, err)
	}
	go func() {
		defer close(c.done)
		buf := make([]byte, 1<<17)
		for {
			n, _, err := unix.Recvfrom(c.fd, buf, 0)
			if err != nil {
				// A timeout: the queue is empty. Once stopped, that is the end; frames
				// queued before Stop are all read first.
				if c.stop.Load() {
					return
				}
				continue
			}
			c.mu.Lock()
			c.frames = append(c.frames, append([]byte(nil), buf[:n]...))
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.Stop() })
	return c
}

// Stop ends the capture and returns the frames.
func (c *capture) Stop() [][]byte {
	if !c.stop.Swap(true) {
		<-c.done
		unix.Close(c.fd)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

func netInterfaceIndex(name string) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("index of %s: %w", name, err)
	}
	return int(ifr.Uint32()), nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

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
