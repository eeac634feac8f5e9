package chaostest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/wireguard"
)

// underlayTraffic classifies captured frames: WireGuard (UDP 6786) frames, and any frame
// that carries a container's packet in the clear (an IPv4 header with a 10.40/16 address,
// or VXLAN) or the marker.
func underlayTraffic(frames [][]byte, marker []byte) (wg int, leaks []string) {
	for _, f := range frames {
		if bytes.Contains(f, marker) {
			leaks = append(leaks, "the marker")
			continue
		}
		if len(f) < 34 || binary.BigEndian.Uint16(f[12:14]) != 0x0800 {
			continue
		}
		ip := f[14:]
		src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		if defaultRange.Contains(src) || defaultRange.Contains(dst) {
			leaks = append(leaks, fmt.Sprintf("a plaintext container packet %s → %s", src, dst))
			continue
		}
		ihl := int(ip[0]&0x0f) * 4
		if ip[9] != 17 || len(ip) < ihl+4 {
			continue
		}
		sport, dport := binary.BigEndian.Uint16(ip[ihl:]), binary.BigEndian.Uint16(ip[ihl+2:])
		switch {
		case sport == 6786 || dport == 6786:
			wg++
		case sport == 6784 || dport == 6784:
			leaks = append(leaks, "a VXLAN packet")
		}
	}
	return wg, leaks
}

// sendMarker sends marker from src to dst's address over TCP and UDP.
func sendMarker(t *testing.T, src, dst placed, marker []byte) {
	t.Helper()
	var ln net.Listener
	var pc net.PacketConn
	if err := inNetNS(dst.ctr, func() (err error) {
		if ln, err = net.Listen("tcp", net.JoinHostPort(dst.addr.String(), "5003")); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", net.JoinHostPort(dst.addr.String(), "5003"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	defer pc.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- b
	}()
	var tc net.Conn
	var uc net.Conn
	if err := inNetNS(src.ctr, func() (err error) {
		if tc, err = net.DialTimeout("tcp", net.JoinHostPort(dst.addr.String(), "5003"), 5*time.Second); err != nil {
			return err
		}
		uc, err = net.Dial("udp", net.JoinHostPort(dst.addr.String(), "5003"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	tc.Write(marker)
	tc.Close()
	uc.Write(marker)
	uc.Close()
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 2048)
	if n, _, err := pc.ReadFrom(buf); err != nil || !bytes.Equal(buf[:n], marker) {
		t.Fatalf("UDP marker did not arrive: %v", err)
	}
	if b := <-got; !bytes.Equal(b, marker) {
		t.Fatalf("TCP marker did not arrive: %q", b)
	}
}

func passwordFile(t *testing.T, pw string) string {
	f := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(f, []byte(pw), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestEncryptedLinks(t *testing.T) {
	pw := passwordFile(t, "a long cluster password for the test")
	l := newMeshLab(t, "wenc", 3, "--password-file", pw, "--encrypt", "always")
	ctx := testCtx(t, 4*time.Minute)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	for _, h := range l.Hosts() {
		waitFor(t, ctx, 30*time.Second, h.Name+"'s links established over wireguard", func() error {
			for _, c := range connectionsOf(t, ctx, h) {
				if c.Mode != "wireguard" || c.State != "established" || !strings.Contains(c.Reason, "encrypted") {
					return fmt.Errorf("%s: %+v; want an established wireguard link that says why", h.Name, c)
				}
			}
			return nil
		})
	}

	t.Run("the underlay carries only WireGuard, never the payload", func(t *testing.T) {
		capture, err := l.Host(1).Capture("eth0")
		if err != nil {
			t.Fatal(err)
		}
		marker := []byte("weft-plaintext-marker-" + fmt.Sprint(time.Now().UnixNano()))
		sendMarker(t, cs[0], cs[1], marker)
		wg, leaks := underlayTraffic(capture.Stop(), marker)
		if len(leaks) > 0 {
			t.Fatalf("the underlay carried %s", leaks[0])
		}
		if wg == 0 {
			t.Fatal("no WireGuard packet seen on the underlay while containers talked")
		}
	})

	t.Run("full-size packets and bulk TCP", func(t *testing.T) {
		if out, err := cs[0].ctr.Exec(ctx, "ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1372", cs[2].addr.String()); err != nil {
			t.Fatalf("1400-byte ping with DF over wireguard: %v\n%s", err, out)
		}
		if n, err := bulkTransfer(cs[0].ctr, cs[2].ctr, cs[2].addr, 16<<20); err != nil || n != 16<<20 {
			t.Fatalf("bulk TCP over wireguard: %d bytes, %v", n, err)
		}
	})

	t.Run("weft rotate-key: peers switch to the new key and traffic goes on", func(t *testing.T) {
		h1 := l.Host(1)
		st := startStream(t, cs[0], cs[1], "5004")
		st.flowing(ctx, "before the rotation")
		out, err := h1.CLI(ctx, "rotate-key")
		if err != nil {
			t.Fatalf("rotate-key: %v %s", err, out)
		}
		newKey := strings.TrimSpace(strings.TrimPrefix(string(out), "new public key"))
		waitFor(t, ctx, 15*time.Second, "host 0 to configure host 1's new key", func() error {
			keys, err := wgPeerKeys(l.Host(0))
			if err != nil {
				return err
			}
			if !strings.Contains(strings.Join(keys, " "), newKey) {
				return fmt.Errorf("host 0 has %v, want %s among them", keys, newKey)
			}
			return nil
		})
		st.flowing(ctx, "after the rotation")
		st.finish()
		waitPing(t, ctx, cs[0].ctr, cs[1].addr)
	})
}

// wgPeerKeys lists the public keys of the WireGuard peers configured on h's device.
func wgPeerKeys(h *lab.Host) ([]string, error) {
	_, keys, err := wgDevice(h)
	return keys, err
}

// wgDevice reads h's WireGuard device: its public key and its peers' keys.
func wgDevice(h *lab.Host) (string, []string, error) {
	c, err := wgctrl.New()
	if err != nil {
		return "", nil, err
	}
	defer c.Close()
	dev, err := c.Device(wireguard.DeriveName(h.Name))
	if err != nil {
		return "", nil, err
	}
	var keys []string
	for _, p := range dev.Peers {
		keys = append(keys, p.PublicKey.String())
	}
	return dev.PublicKey.String(), keys, nil
}

// Weave's rule: a link is plaintext only when each end trusts the other's underlay address.
// A and C trust each other; B trusts nobody and nobody trusts B.
func TestMixedTrust(t *testing.T) {
	pw := passwordFile(t, "another long cluster password")
	var l *lab.Lab
	addr := func(i int) string { return fmt.Sprintf("198.18.0.%d/32", 10+i) }
	l = newLab(t, lab.Config{Prefix: "wmix", Hosts: 4, NoStart: true, PeerArgs: func(i int) []string {
		// --encrypt auto (the lab would pass never): encrypt except where both ends trust.
		args := []string{"--raft-voters", "3", "--password-file", pw, "--encrypt", "auto"}
		switch i {
		case 0:
			args = append(args, "--trusted-subnets", addr(2))
		case 2:
			args = append(args, "--trusted-subnets", addr(0))
		case 3: // a stranger: wrong password, but a WireGuard key in its gossip
			args = []string{"--raft-voters", "3", "--password-file", passwordFile(t, "wrong password"), "--encrypt", "auto"}
		}
		if i > 0 {
			args = append(args, "--peers", l.Host(0).Addr.Addr().String())
		}
		return args
	}})
	ctx := testCtx(t, 4*time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	waitFor(t, ctx, 45*time.Second, "the mesh of A, B and C", func() error { return aliveEverywhere(ctx, []*lab.Host{a, b, c}) })
	waitLeader(t, ctx, []*lab.Host{a, b, c})
	var cs []placed
	for _, h := range []*lab.Host{a, b, c} {
		ctr := mustContainer(t, h)
		cs = append(cs, placed{ctr, mustAdd(t, ctx, mustCNI(t, h, lab.CNIOptions{}), ctr).Addr()})
	}
	pingAll(t, ctx, cs)
	want := map[string]map[string]string{
		a.Name: {b.Name: "wireguard", c.Name: "direct"},
		b.Name: {a.Name: "wireguard", c.Name: "wireguard"},
		c.Name: {a.Name: "direct", b.Name: "wireguard"},
	}
	for _, h := range []*lab.Host{a, b, c} {
		conns := connectionsOf(t, ctx, h)
		if len(conns) != 2 {
			t.Fatalf("%s has connections %+v; the stranger with the wrong password must not be one", h.Name, conns)
		}
		for _, conn := range conns {
			if conn.Mode != want[h.Name][conn.Peer] || conn.Reason == "" {
				t.Fatalf("%s → %s: %+v; want %s with a reason", h.Name, conn.Peer, conn, want[h.Name][conn.Peer])
			}
		}
	}
	// Every mode carries full-size packets and bulk TCP.
	for _, pair := range [][2]int{{0, 1}, {0, 2}, {1, 2}} {
		src, dst := cs[pair[0]], cs[pair[1]]
		if out, err := src.ctr.Exec(ctx, "ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1372", dst.addr.String()); err != nil {
			t.Fatalf("1400-byte DF ping %s → %s: %v\n%s", src.ctr.Name, dst.ctr.Name, err, out)
		}
		if n, err := bulkTransfer(src.ctr, dst.ctr, dst.addr, 8<<20); err != nil || n != 8<<20 {
			t.Fatalf("bulk TCP %s → %s: %d, %v", src.ctr.Name, dst.ctr.Name, n, err)
		}
	}
	// The stranger's WireGuard key never reaches a device.
	stranger, _, err := wgDevice(l.Host(3))
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*lab.Host{a, b, c} {
		_, keys, err := wgDevice(h)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(strings.Join(keys, " "), stranger) {
			t.Fatalf("%s configured the stranger's key %s", h.Name, stranger)
		}
	}
}
