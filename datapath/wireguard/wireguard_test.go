package wireguard

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
)

// testLogger logs through t until the test's cleanups are over; wireguard-go logs from its
// own goroutines, which must not call t.Log after the test has completed.
func testLogger(t *testing.T, host string) *slog.Logger {
	var mu sync.Mutex
	done := false
	t.Cleanup(func() { mu.Lock(); done = true; mu.Unlock() })
	w := writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		if !done {
			t.Log(strings.TrimSpace(string(p)))
		}
		return len(p), nil
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo})).With("host", host)
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// checkLeaks registers, first, a cleanup that runs last: no goroutine of the test remains.
func checkLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

func wgDevice(t *testing.T, name string) *wgtypes.Device {
	t.Helper()
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dev, err := c.Device(name)
	if err != nil {
		t.Fatalf("wgctrl device %s: %v", name, err)
	}
	return dev
}

// peerConfigs is the comparable part of a device's peers: key, endpoint, allowed IPs,
// keepalive and last handshake (which a reconfiguration of the peer would reset).
func peerConfigs(dev *wgtypes.Device) map[wgtypes.Key]string {
	out := map[wgtypes.Key]string{}
	for _, p := range dev.Peers {
		var ips []string
		for _, n := range p.AllowedIPs {
			ips = append(ips, n.String())
		}
		slices.Sort(ips)
		out[p.PublicKey] = strings.Join([]string{p.Endpoint.String(), strings.Join(ips, ","),
			p.PersistentKeepaliveInterval.String(), p.LastHandshakeTime.Format(time.RFC3339Nano)}, " ")
	}
	return out
}

// routes lists the driver's routes (protocol RouteProtocol) in h's namespace.
func (h *host) routes(t *testing.T) []string {
	t.Helper()
	nh, err := netlink.NewHandleAt(nsHandle(h.ns))
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	link, err := nh.LinkByName(h.drv.Name())
	if err != nil {
		t.Fatal(err)
	}
	rs, err := nh.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{LinkIndex: link.Attrs().Index, Protocol: datapath.RouteProtocol},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rs {
		out = append(out, r.Dst.String())
	}
	slices.Sort(out)
	return out
}

func hasLink(t *testing.T, n ns.NetNS, name string) bool {
	t.Helper()
	nh, err := netlink.NewHandleAt(nsHandle(n))
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	_, err = nh.LinkByName(name)
	return err == nil
}

func TestNewKeyFileAndNames(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "sub", "wireguard.key")
	d, err := New(Config{PeerName: "a", KeyFile: keyFile})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(keyFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, mode %v; want 0600", err, st.Mode())
	}
	if d.Name() != DeriveName("a") || len(d.Name()) > 15 || !strings.HasPrefix(d.Name(), "weftwg") {
		t.Fatalf("derived name %q", d.Name())
	}
	if DeriveName("a") == DeriveName("b") {
		t.Fatal("two peers derive the same interface name")
	}
	if d.Port() != DefaultPort || d.Mode() != datapath.ModeWireGuard {
		t.Fatalf("port %d mode %s", d.Port(), d.Mode())
	}
	again, err := New(Config{PeerName: "a", KeyFile: keyFile})
	if err != nil || again.PublicKey() != d.PublicKey() {
		t.Fatalf("reloaded key differs (err %v)", err)
	}

	// Rotation before Up persists the new key atomically with the same mode.
	pub, err := d.RotateKey()
	if err != nil || pub == again.PublicKey() || pub != d.PublicKey() {
		t.Fatalf("RotateKey: %v", err)
	}
	if st, _ := os.Stat(keyFile); st.Mode().Perm() != 0o600 {
		t.Fatalf("rotated key file mode %v", st.Mode())
	}
	if entries, _ := os.ReadDir(filepath.Dir(keyFile)); len(entries) != 1 {
		t.Fatalf("key dir holds %d files, want only the key", len(entries))
	}
	if reloaded, _ := New(Config{PeerName: "a", KeyFile: keyFile}); reloaded.PublicKey() != pub {
		t.Fatal("rotated key was not persisted")
	}

	// A key file readable by others is tightened.
	os.Chmod(keyFile, 0o644)
	if _, err := New(Config{PeerName: "a", KeyFile: keyFile}); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(keyFile); st.Mode().Perm() != 0o600 {
		t.Fatalf("loose key file left at %v", st.Mode())
	}

	// A bad key file is an error that does not echo the content.
	bad := filepath.Join(dir, "bad.key")
	os.WriteFile(bad, []byte("not-a-key-SECRETISH"), 0o600)
	if _, err := New(Config{PeerName: "a", KeyFile: bad}); !errors.Is(err, ErrKeyFile) || strings.Contains(err.Error(), "SECRETISH") {
		t.Fatalf("bad key file: %v", err)
	}

	for _, cfg := range []Config{
		{KeyFile: keyFile},
		{PeerName: "a"},
		{Name: "../../etc/x", KeyFile: keyFile},
		{Name: "waytoolonginterface", KeyFile: keyFile},
		{Name: "wg0", KeyFile: keyFile, Port: 70000},
		{Name: "wg0", KeyFile: keyFile, MTU: 100},
	} {
		if _, err := New(cfg); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("New(%+v) = %v, want ErrInvalidConfig", cfg, err)
		}
	}

	if err := d.Set(nil); !errors.Is(err, datapath.ErrNotUp) {
		t.Fatalf("Set before Up = %v, want ErrNotUp", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Up(t.Context()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Up after Close = %v", err)
	}
}

// TestTwoHosts covers one tunnel end to end: fallback to userspace, connectivity, what the
// underlay sees, idempotent Set, MTU, bulk transfer, key rotation under a live TCP stream,
// and Close.
func TestTwoHosts(t *testing.T) {
	checkLeaks(t)
	// Host 1 tries the kernel first (and falls back here); host 2 is forced to userspace.
	l := newLab(t, 2, func(i int) bool { return i == 2 })
	h1, h2 := l.hosts[0], l.hosts[1]

	// Distinct per-peer names and UAPI sockets, even though both live on one machine.
	if h1.drv.Name() == h2.drv.Name() {
		t.Fatalf("both drivers are named %s", h1.drv.Name())
	}
	for _, h := range l.hosts {
		if h.drv.Kernel() {
			t.Logf("%s uses kernel WireGuard", h.name)
			continue
		}
		if _, err := os.Stat(socketPath(h.drv.Name())); err != nil {
			t.Fatalf("UAPI socket of %s: %v", h.name, err)
		}
	}

	// The UDP sockets are in the hosts' namespaces (see netns.go), not the process's.
	for _, h := range l.hosts {
		err := h.ns.Do(func(ns.NetNS) error {
			pc, err := net.ListenPacket("udp4", ":6786")
			if err == nil {
				pc.Close()
				return errors.New("port 6786 is free in the host namespace")
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s: %v", h.name, err)
		}
	}
	l.setMesh()
	nslab.Eventually(t, 15*time.Second, "ping h1 -> h2", func() error { return h1.ping(h2.contAddr) })
	nslab.Eventually(t, 5*time.Second, "ping h2 -> h1", func() error { return h2.ping(h1.contAddr) })

	t.Run("wgctrl shows the peer", func(t *testing.T) {
		dev := wgDevice(t, h1.drv.Name())
		if dev.ListenPort != DefaultPort || dev.PublicKey != wgtypes.Key(h1.drv.PublicKey()) || len(dev.Peers) != 1 {
			t.Fatalf("device: port %d, %d peers", dev.ListenPort, len(dev.Peers))
		}
		p := dev.Peers[0]
		if p.PublicKey != wgtypes.Key(h2.drv.PublicKey()) || len(p.AllowedIPs) != 1 || p.AllowedIPs[0].String() != "10.40.2.0/26" ||
			p.Endpoint.String() != netip.AddrPortFrom(h2.underlay, DefaultPort).String() || p.PersistentKeepaliveInterval != PersistentKeepalive {
			t.Fatalf("peer %+v", p)
		}
		if got := h1.routes(t); !slices.Equal(got, []string{"10.40.2.0/26"}) {
			t.Fatalf("routes %v", got)
		}
		if _, err := exec.LookPath("wg"); err == nil {
			out, err := run("wg", "show", h1.drv.Name(), "allowed-ips")
			if err != nil || !strings.Contains(out, "10.40.2.0/26") || !strings.Contains(out, p.PublicKey.String()) {
				t.Fatalf("wg show: %v: %s", err, out)
			}
		} else {
			t.Log("wg(8) not installed; checked through wgctrl only")
		}
	})

	t.Run("MTU is underlay minus 80", func(t *testing.T) {
		err := h1.ns.Do(func(ns.NetNS) error {
			link, err := netlink.LinkByName(h1.drv.Name())
			if err == nil && link.Attrs().MTU != 1500-Overhead {
				t.Errorf("MTU %d, want %d", link.Attrs().MTU, 1500-Overhead)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("underlay carries only WireGuard", func(t *testing.T) {
		marker := []byte("weft-marker-" + hex.EncodeToString(randBytes(8)))
		ln := listenTCP(t, h2)
		udp := listenUDP(t, h2)
		capt := startCapture(t, h1, "eth0")

		conn := dialTCP(t, h1, ln.Addr().String())
		if _, err := conn.Write(marker); err != nil {
			t.Fatal(err)
		}
		conn.Close()
		srv := acceptOne(t, ln)
		got, err := io.ReadAll(srv)
		srv.Close()
		if err != nil || !bytes.Equal(got, marker) {
			t.Fatalf("TCP marker: got %q, %v", got, err)
		}
		nslab.Eventually(t, 5*time.Second, "UDP marker", func() error {
			if err := sendUDP(h1, udp.LocalAddr().String(), marker); err != nil {
				return err
			}
			buf := make([]byte, 200)
			udp.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, _, err := udp.ReadFrom(buf)
			if err == nil && !bytes.Equal(buf[:n], marker) {
				err = errors.New("wrong UDP payload")
			}
			return err
		})

		frames := capt.Stop()
		wg := 0
		for _, f := range frames {
			if bytes.Contains(f, marker) {
				t.Fatal("the marker crossed the underlay in clear")
			}
			kind, err := classify(f)
			if err != nil {
				t.Fatalf("unexpected frame on the underlay: %v", err)
			}
			if kind == "wireguard" {
				wg++
			}
		}
		if wg == 0 {
			t.Fatalf("captured %d frames, none WireGuard", len(frames))
		}
		t.Logf("underlay: %d frames, %d WireGuard, no marker", len(frames), wg)
	})

	t.Run("Set again changes nothing", func(t *testing.T) {
		before := peerConfigs(wgDevice(t, h1.drv.Name()))
		for _, s := range before {
			if strings.HasSuffix(s, "0001-01-01T00:00:00Z") {
				t.Fatal("no handshake yet")
			}
		}
		routes := h1.routes(t)
		l.setMesh()
		if after := peerConfigs(wgDevice(t, h1.drv.Name())); !mapsEqual(before, after) {
			t.Fatalf("Set changed the device:\n%v\n%v", before, after)
		}
		if got := h1.routes(t); !slices.Equal(got, routes) {
			t.Fatalf("routes %v, were %v", got, routes)
		}
		if err := h1.drv.Up(t.Context()); err != nil {
			t.Fatalf("Up again: %v", err)
		}
		if err := h1.ping(h2.contAddr); err != nil {
			t.Fatalf("after Up again: %v", err)
		}
	})

	t.Run("1400-byte DF ping and bulk TCP", func(t *testing.T) {
		if err := h1.ping(h2.contAddr, "-M", "do", "-s", "1372"); err != nil {
			t.Fatal(err)
		}
		const size = 8 << 20
		ln := listenTCP(t, h2)
		conn := dialTCP(t, h1, ln.Addr().String())
		done := make(chan error, 1)
		go func() {
			_, err := io.Copy(conn, io.LimitReader(rand.Reader, size))
			conn.Close()
			done <- err
		}()
		srv := acceptOne(t, ln)
		srv.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := io.Copy(io.Discard, srv)
		srv.Close()
		if err := <-done; err != nil {
			t.Fatalf("send: %v", err)
		}
		if err != nil || n != size {
			t.Fatalf("received %d of %d bytes: %v", n, size, err)
		}
	})

	t.Run("RotateKey under a live TCP stream", func(t *testing.T) {
		s := startStream(t, h1, h2)
		nslab.Eventually(t, 5*time.Second, "stream flowing", func() error { return s.grew(64 << 10) })

		oldKey := h2.drv.PublicKey()
		newKey, err := h2.drv.RotateKey()
		if err != nil || newKey == oldKey || newKey != h2.drv.PublicKey() {
			t.Fatalf("RotateKey: %v", err)
		}
		if dev := wgDevice(t, h2.drv.Name()); dev.PublicKey != wgtypes.Key(newKey) {
			t.Fatal("new key not applied to the device")
		}
		rotated := time.Now()
		// The router gossips the new key; h1 learns it.
		if err := h1.drv.Set(l.others(h1)); err != nil {
			t.Fatal(err)
		}
		nslab.Eventually(t, 20*time.Second, "ping after rotation", func() error { return h1.ping(h2.contAddr) })
		s.grew(0) // count from here
		nslab.Eventually(t, 30*time.Second, "stream resumes", func() error { return s.grew(256 << 10) })
		if err := s.stop(); err != nil {
			t.Fatalf("the TCP stream broke across the rotation: %v", err)
		}
		dev := wgDevice(t, h1.drv.Name())
		if len(dev.Peers) != 1 || dev.Peers[0].PublicKey != wgtypes.Key(newKey) || dev.Peers[0].LastHandshakeTime.Before(rotated.Add(-time.Second)) {
			t.Fatalf("h1 peers after rotation: %+v", dev.Peers)
		}
		t.Logf("stream carried %d bytes across the rotation", s.received.Load())
	})

	t.Run("Close twice leaves nothing", func(t *testing.T) {
		for _, h := range l.hosts {
			name := h.drv.Name()
			if err := h.drv.Close(); err != nil {
				t.Fatal(err)
			}
			if err := h.drv.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			if _, err := os.Stat(socketPath(name)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("socket file of %s: %v", name, err)
			}
			if hasLink(t, h.ns, name) {
				t.Fatalf("device %s still exists", name)
			}
			if err := h.drv.Set(nil); !errors.Is(err, ErrClosed) {
				t.Fatalf("Set after Close = %v", err)
			}
		}
	})
}

// TestThreeHosts covers a mesh of three and removing a peer.
func TestThreeHosts(t *testing.T) {
	checkLeaks(t)
	l := newLab(t, 3, func(int) bool { return true })
	l.setMesh()
	for _, a := range l.hosts {
		for _, b := range l.hosts {
			if a != b {
				nslab.Eventually(t, 15*time.Second, a.name+" -> "+b.name, func() error { return a.ping(b.contAddr) })
			}
		}
	}
	h1, h2, h3 := l.hosts[0], l.hosts[1], l.hosts[2]
	if got := h1.routes(t); !slices.Equal(got, []string{"10.40.2.0/26", "10.40.3.0/26"}) {
		t.Fatalf("h1 routes %v", got)
	}
	if dev := wgDevice(t, h1.drv.Name()); len(dev.Peers) != 2 {
		t.Fatalf("h1 has %d peers", len(dev.Peers))
	}

	// h3 leaves h1's set: its WireGuard peer and its route go; h2 is untouched.
	before := peerConfigs(wgDevice(t, h1.drv.Name()))
	if err := h1.drv.Set([]datapath.RemotePeer{h2.peer()}); err != nil {
		t.Fatal(err)
	}
	after := peerConfigs(wgDevice(t, h1.drv.Name()))
	if len(after) != 1 || after[wgtypes.Key(h2.drv.PublicKey())] != before[wgtypes.Key(h2.drv.PublicKey())] {
		t.Fatalf("after removing h3: %v (before %v)", after, before)
	}
	if got := h1.routes(t); !slices.Equal(got, []string{"10.40.2.0/26"}) {
		t.Fatalf("h1 routes after removing h3: %v", got)
	}
	if err := h1.ping(h3.contAddr); err == nil {
		t.Fatal("h1 still reaches h3 after removing it")
	}
	if err := h1.ping(h2.contAddr); err != nil {
		t.Fatal(err)
	}

	// A block that moves from h3 to h2 follows it; a peer without a key is left out and
	// reported (the bad-peer rule of datapath.Driver), and the good one still converges.
	moved := h2.peer()
	moved.Blocks = append(moved.Blocks, h3.block)
	noKey := h3.peer()
	noKey.WireGuardKey = [32]byte{}
	if err := h1.drv.Set([]datapath.RemotePeer{moved, noKey}); !errors.Is(err, datapath.ErrBadPeer) || !strings.Contains(err.Error(), noKey.Name) {
		t.Fatalf("Set with a keyless peer = %v, want ErrBadPeer naming %s", err, noKey.Name)
	}
	dev := wgDevice(t, h1.drv.Name())
	if len(dev.Peers) != 1 || len(dev.Peers[0].AllowedIPs) != 2 {
		t.Fatalf("h1 peers %+v", dev.Peers)
	}
	if got := h1.routes(t); !slices.Equal(got, []string{"10.40.2.0/26", "10.40.3.0/26"}) {
		t.Fatalf("h1 routes %v", got)
	}

	// Back to the full mesh.
	l.setMesh()
	nslab.Eventually(t, 15*time.Second, "h1 -> h3 again", func() error { return h1.ping(h3.contAddr) })
	for _, h := range l.hosts {
		if err := h.drv.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func mapsEqual(a, b map[wgtypes.Key]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func nsHandle(n ns.NetNS) netns.NsHandle { return netns.NsHandle(n.Fd()) }

// listenTCP listens on h's container address (the socket is created inside the container's
// namespace and stays there).
func listenTCP(t *testing.T, h *host) net.Listener {
	t.Helper()
	var ln net.Listener
	err := h.contNS.Do(func(ns.NetNS) (err error) {
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(h.contAddr, 0).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func listenUDP(t *testing.T, h *host) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	err := h.contNS.Do(func(ns.NetNS) (err error) {
		pc, err = net.ListenPacket("udp4", netip.AddrPortFrom(h.contAddr, 0).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

func dialTCP(t *testing.T, h *host, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	err := h.contNS.Do(func(ns.NetNS) (err error) {
		c, err = net.DialTimeout("tcp4", addr, 10*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func sendUDP(h *host, addr string, payload []byte) error {
	return h.contNS.Do(func(ns.NetNS) error {
		c, err := net.Dial("udp4", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(payload)
		return err
	})
}

func acceptOne(t *testing.T, ln net.Listener) net.Conn {
	t.Helper()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// stream is a long-running TCP flow from one container to another at about 2 MB/s.
type stream struct {
	received atomic.Int64
	mark     int64 // received at the last grew that succeeded
	quit     chan struct{}
	wg       sync.WaitGroup
	mu       sync.Mutex
	err      error
}

func startStream(t *testing.T, from, to *host) *stream {
	t.Helper()
	ln := listenTCP(t, to)
	client := dialTCP(t, from, ln.Addr().String())
	server := acceptOne(t, ln)
	s := &stream{quit: make(chan struct{})}
	fail := func(err error) {
		s.mu.Lock()
		if s.err == nil {
			s.err = err
		}
		s.mu.Unlock()
	}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		chunk := bytes.Repeat([]byte("weft"), 4096)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.quit:
				client.(*net.TCPConn).CloseWrite()
				return
			case <-tick.C:
			}
			client.SetWriteDeadline(time.Now().Add(time.Minute))
			if _, err := client.Write(chunk); err != nil {
				fail(err)
				return
			}
		}
	}()
	go func() {
		defer s.wg.Done()
		defer server.Close()
		buf := make([]byte, 64<<10)
		for {
			server.SetReadDeadline(time.Now().Add(time.Minute))
			n, err := server.Read(buf)
			s.received.Add(int64(n))
			if err == io.EOF {
				return
			}
			if err != nil {
				fail(err)
				return
			}
		}
	}()
	t.Cleanup(func() { s.stop() })
	return s
}

// grew succeeds once n more bytes arrived since the last success.
func (s *stream) grew(n int64) error {
	if got := s.received.Load(); got-s.mark >= n {
		s.mark = got
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	return errors.New("stream stalled")
}

// stop ends the stream cleanly and reports the first error either side saw.
func (s *stream) stop() error {
	select {
	case <-s.quit:
	default:
		close(s.quit)
	}
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// TestLinkProbesGoThroughTheTunnel: with LinkProbes each peer's underlay address is in its
// AllowedIPs and routed through the device in the link-probe table only, so UDP packets from
// and to the probe port cross the tunnel both ways while everything else between the
// underlay addresses (WireGuard's own packets first of all) stays on the underlay.
func TestLinkProbesGoThroughTheTunnel(t *testing.T) {
	checkLeaks(t)
	const port = 6788
	l := newLabWith(t, 2, func(int) bool { return true }, true)
	for _, h := range l.hosts {
		if err := h.ns.Do(func(ns.NetNS) error { return datapath.EnsureProbeRule(netlink.FAMILY_V4, port) }); err != nil {
			t.Fatal(err)
		}
	}
	l.setMesh()
	h1, h2 := l.hosts[0], l.hosts[1]
	nslab.Eventually(t, 15*time.Second, "h1 -> h2", func() error { return h1.ping(h2.contAddr) })

	peer := peerConfigs(wgDevice(t, h1.drv.Name()))[wgtypes.Key(h2.drv.PublicKey())]
	if !strings.Contains(peer, h2.block.String()+","+h2.underlay.String()+"/32") {
		t.Fatalf("h1's peer h2 is %q, want AllowedIPs %s and %s/32", peer, h2.block, h2.underlay)
	}
	if got := h1.routes(t); !slices.Equal(got, []string{h2.block.String()}) {
		t.Fatalf("h1's main-table routes through WireGuard %v: the underlay address must not be there", got)
	}
	var probeRoutes []string
	h1.ns.Do(func(ns.NetNS) error {
		link, err := netlink.LinkByName(h1.drv.Name())
		if err != nil {
			t.Fatal(err)
		}
		rs, err := datapath.ListRoutes(nil, datapath.ProbeTable, link.Attrs().Index)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rs {
			probeRoutes = append(probeRoutes, r.Dst.String())
		}
		return nil
	})
	if !slices.Equal(probeRoutes, []string{h2.underlay.String() + "/32"}) {
		t.Fatalf("h1's link-probe routes %v, want [%s/32]", probeRoutes, h2.underlay)
	}

	listen := func(h *host, port int) net.PacketConn {
		var c net.PacketConn
		if err := h.ns.Do(func(ns.NetNS) (err error) {
			c, err = net.ListenPacket("udp4", netip.AddrPortFrom(h.underlay, uint16(port)).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	counters := func(h *host) (tx, rx uint64) {
		h.ns.Do(func(ns.NetNS) error {
			link, err := netlink.LinkByName(h.drv.Name())
			if err != nil {
				t.Fatal(err)
			}
			tx, rx = link.Attrs().Statistics.TxPackets, link.Attrs().Statistics.RxPackets
			return nil
		})
		return tx, rx
	}
	exchange := func(from, to net.PacketConn, toAddr netip.AddrPort) {
		t.Helper()
		if err := nslab.SendAndReceive(from, to, toAddr, 3*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	p1, p2 := listen(h1, port), listen(h2, port)
	tx1, rx1 := counters(h1)
	tx2, rx2 := counters(h2)
	exchange(p1, p2, netip.AddrPortFrom(h2.underlay, port))
	exchange(p2, p1, netip.AddrPortFrom(h1.underlay, port))
	tx1b, rx1b := counters(h1)
	tx2b, rx2b := counters(h2)
	if tx1b <= tx1 || rx2b <= rx2 || tx2b <= tx2 || rx1b <= rx1 {
		t.Fatalf("probe-port packets did not cross the WireGuard devices: h1 tx %d→%d rx %d→%d, h2 tx %d→%d rx %d→%d",
			tx1, tx1b, rx1, rx1b, tx2, tx2b, rx2, rx2b)
	}
	other := listen(h1, port+1)
	exchange(other, p2, netip.AddrPortFrom(h2.underlay, port))
	if tx, _ := counters(h1); tx != tx1b {
		t.Fatalf("a packet from port %d went through WireGuard (tx %d→%d)", port+1, tx1b, tx)
	}

	// A peer whose probes go through another driver (NoProbe: this WireGuard link carries
	// only some of its networks): AllowedIPs are its blocks alone, and no probe route.
	p2peer := h2.peer()
	p2peer.NoProbe = true
	if err := h1.drv.Set([]datapath.RemotePeer{p2peer}); err != nil {
		t.Fatal(err)
	}
	peer = peerConfigs(wgDevice(t, h1.drv.Name()))[wgtypes.Key(h2.drv.PublicKey())]
	if !strings.Contains(peer, h2.block.String()) || strings.Contains(peer, h2.underlay.String()+"/32") {
		t.Fatalf("with NoProbe h1's peer h2 is %q, want AllowedIPs %s only", peer, h2.block)
	}
	h1.ns.Do(func(ns.NetNS) error {
		link, err := netlink.LinkByName(h1.drv.Name())
		if err != nil {
			t.Fatal(err)
		}
		if rs, err := datapath.ListRoutes(nil, datapath.ProbeTable, link.Attrs().Index); err != nil || len(rs) != 0 {
			t.Fatalf("with NoProbe h1 keeps probe routes %v (%v)", rs, err)
		}
		return nil
	})
	for _, h := range l.hosts {
		if err := h.drv.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
