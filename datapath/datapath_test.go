package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// These tests need root and a kernel with netns, veth and bridge; CI runs as root. They make
// namespaces named wdp-<test>-…, never touch the machine's own namespace, and remove them.

func newNetNS(t *testing.T, name string) ns.NetNS {
	t.Helper()
	name = fmt.Sprintf("wdp-%d-%s", os.Getpid()%100000, name)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s (needs root): %v: %s", name, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	n, err := ns.GetNS(filepath.Join("/var/run/netns", name))
	if err != nil {
		t.Fatalf("open netns %s: %v", name, err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// inHost runs fn on a thread inside the test's host namespace.
func inHost(t *testing.T, host ns.NetNS, fn func() error) error {
	t.Helper()
	return host.Do(func(ns.NetNS) error { return fn() })
}

func testAttachment(cont ns.NetNS, ifname, addr string) Attachment {
	return Attachment{
		NetNS:      cont.Path(),
		IfName:     ifname,
		HostIfName: HostIfName(cont.Path(), ifname),
		Bridge:     "weft",
		Address:    netip.MustParsePrefix(addr),
		Gateway:    netip.MustParseAddr("10.40.0.1"),
		MTU:        1400,
	}
}

var testBridge = BridgeConfig{Name: "weft", Gateway: netip.MustParsePrefix("10.40.0.1/16"), MTU: 1400}

func TestEnsureBridgeIsIdempotent(t *testing.T) {
	host := newNetNS(t, "br")
	err := inHost(t, host, func() error {
		for i := 0; i < 3; i++ {
			if _, err := EnsureBridge(testBridge); err != nil {
				return fmt.Errorf("round %d: %w", i, err)
			}
		}
		br, err := netlink.LinkByName("weft")
		if err != nil {
			return err
		}
		addrs, _ := netlink.AddrList(br, netlink.FAMILY_V4)
		if len(addrs) != 1 || addrs[0].IPNet.String() != "10.40.0.1/16" {
			return fmt.Errorf("bridge addresses = %v, want exactly 10.40.0.1/16", addrs)
		}
		if br.Attrs().HardwareAddr[0]&0x02 == 0 {
			return fmt.Errorf("bridge MAC %s is not the locally administered one weft sets", br.Attrs().HardwareAddr)
		}
		if br.Attrs().MTU != 1400 || br.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("bridge mtu=%d flags=%v", br.Attrs().MTU, br.Attrs().Flags)
		}
		fwd, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		if strings.TrimSpace(string(fwd)) != "1" {
			return fmt.Errorf("ip_forward = %q", fwd)
		}
		// A different MTU converges instead of failing.
		changed := testBridge
		changed.MTU = 1300
		if _, err := EnsureBridge(changed); err != nil {
			return err
		}
		br, _ = netlink.LinkByName("weft")
		if br.Attrs().MTU != 1300 {
			return fmt.Errorf("MTU not converged: %d", br.Attrs().MTU)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestEnsureBridgeRefusesNonBridge(t *testing.T) {
	host := newNetNS(t, "nonbr")
	err := inHost(t, host, func() error {
		// This kernel has no dummy links: a veth stands in for "something else named weft".
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "weft"}, PeerName: "weftother"}); err != nil {
			return err
		}
		_, err := EnsureBridge(testBridge)
		if !errors.Is(err, ErrIncompatibleLink) {
			return fmt.Errorf("err = %v, want ErrIncompatibleLink", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestAttachCheckDetach(t *testing.T) {
	host := newNetNS(t, "h")
	c1 := newNetNS(t, "c1")
	c2 := newNetNS(t, "c2")
	a1 := testAttachment(c1, "eth0", "10.40.0.2/16")
	a2 := testAttachment(c2, "eth0", "10.40.0.3/16")
	err := inHost(t, host, func() error {
		if _, err := EnsureBridge(testBridge); err != nil {
			return err
		}
		for _, a := range []Attachment{a1, a2} {
			// Twice: the second converges on what the first made.
			for i := 0; i < 2; i++ {
				res, err := Attach(a)
				if err != nil {
					return fmt.Errorf("attach %s round %d: %w", a.NetNS, i, err)
				}
				if res.ContainerMAC == "" || res.HostMAC == "" {
					return fmt.Errorf("attach result without MACs: %+v", res)
				}
			}
			if err := Check(a); err != nil {
				return fmt.Errorf("check after attach: %w", err)
			}
		}
		host, _ := netlink.LinkByName(a1.HostIfName)
		if pi, err := netlink.LinkGetProtinfo(host); err != nil || !pi.Hairpin {
			return fmt.Errorf("hairpin on %s: %+v, %v", a1.HostIfName, pi, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Real traffic: c1 pings c2 across the bridge.
	if out, err := exec.Command("ip", "netns", "exec", filepath.Base(c1.Path()), "ping", "-c1", "-W2", "10.40.0.3").CombinedOutput(); err != nil {
		t.Fatalf("ping c1→c2: %v\n%s", err, out)
	}
	err = inHost(t, host, func() error {
		// Remove the route inside c1: Check must name it.
		c1h, _ := netlink.NewHandleAt(mustNsHandle(t, c1))
		defer c1h.Close()
		link, _ := c1h.LinkByName("eth0")
		routes, _ := c1h.RouteList(link, netlink.FAMILY_V4)
		for _, r := range routes {
			if r.Gw != nil {
				c1h.RouteDel(&r)
			}
		}
		if err := Check(a1); !errors.Is(err, ErrCheckFailed) || !strings.Contains(err.Error(), "default route") {
			return fmt.Errorf("check without route = %v, want a missing default route", err)
		}
		// Attach again repairs it.
		if _, err := Attach(a1); err != nil {
			return err
		}
		if err := Check(a1); err != nil {
			return fmt.Errorf("check after repair: %w", err)
		}
		// Delete the container's interface: Check must fail naming it.
		c1h.LinkDel(link)
		if err := Check(a1); !errors.Is(err, ErrCheckFailed) || !strings.Contains(err.Error(), "eth0") {
			return fmt.Errorf("check without interface = %v", err)
		}
		// Detach twice succeeds, and leaves nothing behind.
		for i := 0; i < 2; i++ {
			if err := Detach(a2.HostIfName); err != nil {
				return fmt.Errorf("detach round %d: %w", i, err)
			}
		}
		if _, err := netlink.LinkByName(a2.HostIfName); err == nil {
			return fmt.Errorf("%s still there after detach", a2.HostIfName)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestAttachRefusesForeignIfName(t *testing.T) {
	host := newNetNS(t, "fh")
	cont := newNetNS(t, "fc")
	a := testAttachment(cont, "eth0", "10.40.0.2/16")
	err := inHost(t, host, func() error {
		if _, err := EnsureBridge(testBridge); err != nil {
			return err
		}
		ch, _ := netlink.NewHandleAt(mustNsHandle(t, cont))
		defer ch.Close()
		if err := ch.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}}); err != nil {
			return err
		}
		if _, err := Attach(a); !errors.Is(err, ErrIfNameExists) {
			return fmt.Errorf("attach over a foreign eth0: %v, want ErrIfNameExists", err)
		}
		// Nothing was left behind on the host, and the dummy is untouched.
		if _, err := netlink.LinkByName(a.HostIfName); err == nil {
			return fmt.Errorf("host end %s created despite the error", a.HostIfName)
		}
		if l, err := ch.LinkByName("eth0"); err != nil || l.Type() != "bridge" {
			return fmt.Errorf("foreign eth0 changed: %v %v", l, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestAttachRejectsNonNetNS(t *testing.T) {
	host := newNetNS(t, "nh")
	file := filepath.Join(t.TempDir(), "not-a-netns")
	os.WriteFile(file, nil, 0o600)
	err := inHost(t, host, func() error {
		if _, err := EnsureBridge(testBridge); err != nil {
			return err
		}
		for _, path := range []string{file, "/nonexistent/netns"} {
			a := Attachment{NetNS: path, IfName: "eth0", HostIfName: "weftx", Bridge: "weft",
				Address: netip.MustParsePrefix("10.40.0.9/16"), Gateway: netip.MustParseAddr("10.40.0.1")}
			if _, err := Attach(a); !errors.Is(err, ErrNotNetNS) {
				return fmt.Errorf("attach to %s: %v, want ErrNotNetNS", path, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestHostIfNameFitsAndIsStable(t *testing.T) {
	a, b := HostIfName("abc", "eth0"), HostIfName("abc", "eth0")
	if a != b || len(a) > 15 || !strings.HasPrefix(a, "weft") {
		t.Fatalf("HostIfName = %q, %q", a, b)
	}
	if HostIfName("abc", "eth1") == a {
		t.Fatal("different ifnames share a host name")
	}
}

func mustNsHandle(t *testing.T, n ns.NetNS) netns.NsHandle {
	t.Helper()
	h, err := openNetNS(n.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}
