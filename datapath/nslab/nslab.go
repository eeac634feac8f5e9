// Package nslab builds throwaway multi-host topologies out of network namespaces for the
// kernel tests of weft's link drivers (datapath/direct, datapath/vxlan,
// datapath/wireguard) and the datapath benchmark (chaos-tests/bench/datapath), and holds
// the pieces every namespace lab shares, chaos-tests/lab included: named namespaces
// (CreateNetNS, DeleteNetNS), underlay uplinks (AddBridge, AddUplink), packet capture
// (StartCapture) and the one poll helper (Poll, Eventually). It needs root.
//
// A lab is an underlay namespace and N host namespaces. Each host has an underlay interface
// "eth0" (a veth whose other end is in the underlay namespace), the bridge "weft" holding
// 10.40.0.1/16 with proxy ARP, IPv4 forwarding, and owns the block 10.40.<i+1>.0/26 (host 0
// owns 10.40.1.0/26). Containers are namespaces attached to their host's bridge with the
// real datapath.Attach and get the next address of the host's block.
//
// The underlay is either one L2 segment (a bridge in the underlay namespace; hosts
// 172.31.0.<i+1>/24) or, with Routed, an IP router (host i alone on 172.31.<i+1>.0/24 behind
// the underlay namespace at .1, which forwards), where only an overlay reaches across.
//
// Everything the lab makes is in namespaces whose names start with Config.Prefix, and Close
// deletes them all; no address outside them is ever used.
package nslab

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath"
)

// Names and addresses every lab uses.
const (
	Bridge      = "weft"
	UnderlayDev = "eth0"
)

// Gateway is the bridge address, the same on every host.
var Gateway = netip.MustParsePrefix("10.40.0.1/16")

// Config describes a lab.
type Config struct {
	// Prefix starts the name of every namespace (keep it short and unique per process,
	// e.g. "wvx-<pid>-"; names must fit in NAME_MAX but also read well).
	Prefix string
	// Hosts is the number of hosts (0..200; with 0 the lab only makes namespaces for
	// NewNS, besides the underlay one).
	Hosts int
	// Routed puts every host on its own underlay subnet behind a router (see package doc).
	Routed bool
	// UnderlayMTU is the MTU of the underlay links (default 1500).
	UnderlayMTU int
	// MTU is the MTU of bridges and container interfaces (default 1400).
	MTU int
	// NoIPv6 turns IPv6 off in every namespace before its links are made, so that links
	// carry no router solicitations or MLD (tests that capture and check every frame).
	NoIPv6 bool
}

// NS is one namespace of the lab.
type NS struct {
	Name string
	ns.NetNS
}

// Do runs fn on a locked OS thread inside the namespace.
func (n *NS) Do(fn func() error) error {
	return n.NetNS.Do(func(ns.NetNS) error { return fn() })
}

// Command is `ip netns exec <ns> name args…`.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Run runs a command in the namespace and returns its combined output; the error carries
// the output.
func (n *NS) Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := n.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %s %s: %w: %s", n.Name, name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// Host is one host of the lab.
type Host struct {
	*NS
	Index int
	// Underlay is the host's underlay address with its prefix length; UnderlayDev holds it.
	Underlay netip.Prefix
	// Block is the address block this host owns.
	Block      netip.Prefix
	Containers []*Container
	lab        *Lab
}

// Container is one container attached to a host's bridge.
type Container struct {
	*NS
	Addr       netip.Prefix // with the network's prefix length (/16)
	Attachment datapath.Attachment
}

// Lab is a running topology.
type Lab struct {
	cfg      Config
	Underlay *NS
	Hosts    []*Host
	all      []*NS
	ul       *netlink.Handle // in Underlay
	ulBridge *netlink.Bridge // the underlay's L2 segment; nil when Routed
}

// New builds the lab. On error it removes what it made.
func New(cfg Config) (l *Lab, err error) {
	if cfg.Hosts < 0 || cfg.Hosts > 200 {
		return nil, fmt.Errorf("nslab: %d hosts, want 0..200", cfg.Hosts)
	}
	if cfg.UnderlayMTU == 0 {
		cfg.UnderlayMTU = 1500
	}
	if cfg.MTU == 0 {
		cfg.MTU = 1400
	}
	l = &Lab{cfg: cfg}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	if l.Underlay, err = l.NewNS("u"); err != nil {
		return nil, err
	}
	if l.ul, err = HandleAt(l.Underlay.Path()); err != nil {
		return nil, fmt.Errorf("nslab: underlay: %w", err)
	}
	if cfg.Routed {
		err = l.Underlay.Do(func() error { return datapath.WriteSysctl("net/ipv4/ip_forward", "1") })
	} else {
		l.ulBridge, err = AddBridge(l.ul, "ul", cfg.UnderlayMTU)
	}
	if err != nil {
		return nil, fmt.Errorf("nslab: underlay: %w", err)
	}
	for i := 0; i < cfg.Hosts; i++ {
		h, err := l.addHost(i)
		if err != nil {
			return nil, fmt.Errorf("nslab: host %d: %w", i, err)
		}
		l.Hosts = append(l.Hosts, h)
	}
	return l, nil
}

// NewNS makes a namespace named Prefix+suffix with its loopback up (and IPv6 off with
// Config.NoIPv6); Close removes it.
func (l *Lab) NewNS(suffix string) (*NS, error) {
	name := l.cfg.Prefix + suffix
	p, err := CreateNetNS(name)
	if err != nil {
		return nil, fmt.Errorf("nslab (needs root): %w", err)
	}
	n, err := ns.GetNS(p)
	if err != nil {
		DeleteNetNS(name)
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	nn := &NS{Name: name, NetNS: n}
	l.all = append(l.all, nn)
	if err := nn.Do(func() error {
		if l.cfg.NoIPv6 {
			for _, key := range []string{"net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"} {
				if err := datapath.WriteSysctl(key, "1"); err != nil {
					return err
				}
			}
		}
		return setUp("lo")
	}); err != nil {
		return nil, err
	}
	return nn, nil
}

func (l *Lab) addHost(i int) (*Host, error) {
	n, err := l.NewNS(fmt.Sprintf("h%d", i))
	if err != nil {
		return nil, err
	}
	h := &Host{NS: n, Index: i, lab: l,
		Block: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 40, byte(i + 1), 0}), 26)}
	var gw netip.Prefix // the underlay namespace's end, when routed
	if l.cfg.Routed {
		h.Underlay = netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 31, byte(i + 1), 2}), 24)
		gw = netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 31, byte(i + 1), 1}), 24)
	} else {
		h.Underlay = netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 31, 0, byte(i + 1)}), 24)
	}
	// The veth is made in the underlay namespace with its peer put straight into the host.
	err = AddUplink(Uplink{
		Underlay: l.ul, Name: fmt.Sprintf("h%d", i), Bridge: l.ulBridge, Gateway: gw,
		HostPath: n.Path(), HostDev: UnderlayDev, Addr: h.Underlay, MTU: l.cfg.UnderlayMTU,
	})
	if err != nil {
		return nil, err
	}
	err = n.Do(func() error {
		link, err := netlink.LinkByName(UnderlayDev)
		if err != nil {
			return err
		}
		if l.cfg.Routed {
			def := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw.Addr().AsSlice()}
			if err := netlink.RouteAdd(def); err != nil {
				return fmt.Errorf("default route: %w", err)
			}
		}
		if _, err := datapath.EnsureBridge(datapath.BridgeConfig{Name: Bridge, Gateway: Gateway, MTU: l.cfg.MTU}); err != nil {
			return err
		}
		return datapath.EnableProxyARP(Bridge)
	})
	if err != nil {
		return nil, err
	}
	return h, nil
}

// AddContainer makes a container namespace and attaches it to the host's bridge with
// datapath.Attach; it gets the next free address of the host's block (.2, .3, …).
func (h *Host) AddContainer() (*Container, error) {
	n, err := h.lab.NewNS(fmt.Sprintf("h%dc%d", h.Index, len(h.Containers)))
	if err != nil {
		return nil, err
	}
	a4 := h.Block.Addr().As4()
	a4[3] += byte(2 + len(h.Containers))
	c := &Container{NS: n, Addr: netip.PrefixFrom(netip.AddrFrom4(a4), Gateway.Bits())}
	c.Attachment = datapath.Attachment{
		NetNS:      n.Path(),
		IfName:     "eth0",
		HostIfName: datapath.HostIfName(n.Path(), "eth0"),
		Bridge:     Bridge,
		Address:    c.Addr,
		Gateway:    Gateway.Addr(),
		MTU:        h.lab.cfg.MTU,
	}
	if err := h.Do(func() error { _, err := datapath.Attach(c.Attachment); return err }); err != nil {
		return nil, fmt.Errorf("nslab: attach %s: %w", n.Name, err)
	}
	h.Containers = append(h.Containers, c)
	return c, nil
}

// RemotePeer is the host as another host's driver sees it, with the given VTEP MAC (nil
// for modes that need none).
func (h *Host) RemotePeer(vtep net.HardwareAddr) datapath.RemotePeer {
	return datapath.RemotePeer{
		Name:     h.NS.Name,
		Underlay: h.Underlay.Addr(),
		VTEPMAC:  vtep,
		Blocks:   []netip.Prefix{h.Block},
	}
}

// Close deletes every namespace of the lab (and so everything in them). Safe twice.
func (l *Lab) Close() error {
	var errs []error
	if l.ul != nil {
		l.ul.Close()
		l.ul = nil
	}
	for i := len(l.all) - 1; i >= 0; i-- {
		n := l.all[i]
		n.NetNS.Close()
		if err := DeleteNetNS(n.Name); err != nil {
			errs = append(errs, err)
		}
	}
	l.all = nil
	return errors.Join(errs...)
}

func setUp(name string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(link)
}

// WaitPing pings to from n (one echo request a try, `ping -c1 -W1` plus extra, e.g. "-M",
// "do", "-s", "1372") until one is answered or ctx ends; the error has the last output.
func (n *NS) WaitPing(ctx context.Context, to netip.Addr, extra ...string) error {
	args := append([]string{"-c1", "-W1", "-n"}, extra...)
	args = append(args, to.String())
	err := Poll(ctx, 100*time.Millisecond, func() error {
		_, err := n.Run(ctx, "ping", args...)
		return err
	})
	if err != nil {
		return fmt.Errorf("no answer from %s within the deadline: %w", to, err)
	}
	return nil
}

// Transfer sends size bytes over one TCP connection from the container from to the
// container to (Go sockets made in their namespaces) and checks that exactly those bytes
// arrived (SHA-256). It returns the throughput seen by the receiver.
func Transfer(ctx context.Context, from, to *Container, size int64) (bitsPerSecond float64, err error) {
	var ln net.Listener
	if err := to.Do(func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(to.Addr.Addr().String(), "0"))
		return err
	}); err != nil {
		return 0, fmt.Errorf("listen in %s: %w", to.Name, err)
	}
	defer ln.Close()
	type result struct {
		n    int64
		sum  [sha256.Size]byte
		took time.Duration
		err  error
	}
	done := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer conn.Close()
		if dl, ok := ctx.Deadline(); ok {
			conn.SetDeadline(dl)
		}
		start := time.Now()
		h := sha256.New()
		n, err := io.Copy(h, conn)
		done <- result{n: n, sum: [sha256.Size]byte(h.Sum(nil)), took: time.Since(start), err: err}
	}()
	var conn net.Conn
	if err := from.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "tcp4", ln.Addr().String())
		return err
	}); err != nil {
		return 0, fmt.Errorf("dial %s from %s: %w", ln.Addr(), from.Name, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(rand.NewChaCha8([32]byte{'w', 'e', 'f', 't'}), size), h)
	if _, err := io.Copy(conn, src); err != nil {
		return 0, fmt.Errorf("send: %w", err)
	}
	conn.(*net.TCPConn).CloseWrite()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		return 0, fmt.Errorf("receive: %w", ctx.Err())
	}
	if r.err != nil {
		return 0, fmt.Errorf("receive: %w", r.err)
	}
	if r.n != size || r.sum != [sha256.Size]byte(h.Sum(nil)) {
		return 0, fmt.Errorf("received %d bytes (sha256 %x), sent %d (sha256 %x)", r.n, r.sum[:4], size, h.Sum(nil)[:4])
	}
	return float64(size*8) / r.took.Seconds(), nil
}

// SendAndReceive sends one fresh datagram from one socket to toAddr and reads it on the
// socket bound there (within timeout), so a test can check which way it went; it fails
// when the datagram does not arrive intact.
func SendAndReceive(from, to net.PacketConn, toAddr netip.AddrPort, timeout time.Duration) error {
	msg := fmt.Appendf(nil, "weft test datagram %d", rand.Uint64())
	if _, err := from.WriteTo(msg, net.UDPAddrFromAddrPort(toAddr)); err != nil {
		return err
	}
	to.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 128)
	n, _, err := to.ReadFrom(buf)
	if err != nil {
		return fmt.Errorf("%q sent to %s not received: %w", msg, toAddr, err)
	}
	if string(buf[:n]) != string(msg) {
		return fmt.Errorf("sent %q to %s, received %q", msg, toAddr, buf[:n])
	}
	return nil
}
