package chaostest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

// Containers on different hosts reaching each other through the peers' datapath.

// newMesh3 builds n hosts seeded with host 0 (extra flags on every peer) and waits for the
// mesh and a Raft leader.
func newMeshLab(t *testing.T, prefix string, n int, extra ...string) *lab.Lab {
	t.Helper()
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: prefix, Hosts: n, NoStart: true, PeerArgs: func(i int) []string {
		args := append([]string{"--raft-voters", fmt.Sprint(min(n, 3))}, extra...)
		if i > 0 {
			args = append(args, "--peers", l.Host(0).Addr.Addr().String())
		}
		return args
	}})
	ctx := testCtx(t, time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 45*time.Second, "the mesh", func() error { return aliveEverywhere(ctx, l.Hosts()) })
	waitLeader(t, ctx, l.Hosts())
	return l
}

// waitLeader waits until every host knows the Raft leader: before that, an ADD that needs a
// new block fails with "try again" (CNI 11), which a runtime would retry but a test should
// not have to.
func waitLeader(t *testing.T, ctx context.Context, hosts []*lab.Host) {
	t.Helper()
	waitFor(t, ctx, 45*time.Second, "a raft leader known everywhere", func() error {
		for _, h := range hosts {
			if st := ipamOf(t, ctx, h); st.Leader == "" {
				return fmt.Errorf("%s knows no leader yet", h.Name)
			}
		}
		return nil
	})
}

type placed struct {
	ctr  *lab.Container
	addr netip.Addr
}

// onePerHost attaches one container on every host.
func onePerHost(t *testing.T, ctx context.Context, l *lab.Lab) []placed {
	t.Helper()
	var out []placed
	for _, h := range l.Hosts() {
		ctr := mustContainer(t, h)
		a := mustAdd(t, ctx, mustCNI(t, h, lab.CNIOptions{}), ctr)
		out = append(out, placed{ctr, a.Addr()})
	}
	return out
}

func pingAll(t *testing.T, ctx context.Context, cs []placed) {
	t.Helper()
	for _, src := range cs {
		for _, dst := range cs {
			if src.ctr != dst.ctr {
				waitPing(t, ctx, src.ctr, dst.addr)
			}
		}
	}
}

func connectionsOf(t *testing.T, ctx context.Context, h *lab.Host) []router.Connection {
	t.Helper()
	var conns []router.Connection
	if err := cliJSON(ctx, h, &conns, "status", "connections"); err != nil {
		t.Fatalf("status connections on %s: %v", h.Name, err)
	}
	return conns
}

// routesVia lists h's routes to remote blocks (10.40.x.y/N more specific than the /16).
func routesVia(t *testing.T, h *lab.Host) []string {
	t.Helper()
	var out []string
	err := h.Do(func() error {
		routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst == nil || !strings.HasPrefix(r.Dst.String(), "10.40.") || strings.HasSuffix(r.Dst.String(), "/16") {
				continue
			}
			link, _ := netlink.LinkByIndex(r.LinkIndex)
			out = append(out, fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, link.Attrs().Name))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("routes of %s: %v", h.Name, err)
	}
	return out
}

func TestCrossHostDirect(t *testing.T) {
	l := newMeshLab(t, "wdir", 3)
	ctx := testCtx(t, 3*time.Minute)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	for _, h := range l.Hosts() {
		waitFor(t, ctx, 30*time.Second, h.Name+"'s links established and direct", func() error {
			for _, c := range connectionsOf(t, ctx, h) {
				if c.Mode != "direct" || c.State != "established" || c.Address == "" || c.Reason == "" {
					return fmt.Errorf("%s: connection %+v; want an established direct link with its reason", h.Name, c)
				}
			}
			return nil
		})
		routes := routesVia(t, h)
		if len(routes) != 2 {
			t.Fatalf("%s routes to remote blocks: %v; want one per other host", h.Name, routes)
		}
		for _, r := range routes {
			if !strings.Contains(r, "via 198.18.0.") || !strings.HasSuffix(r, "dev eth0") {
				t.Fatalf("%s: route %q is not a direct route over the underlay", h.Name, r)
			}
		}
	}
}

func TestCrossHostVXLAN(t *testing.T) {
	mostlyWaiting(t) // the stopped peer's kernel state leaves with failure detection
	l := newMeshLab(t, "wvx", 3, "--no-direct")
	ctx := testCtx(t, 3*time.Minute)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	h0 := l.Host(0)
	// A pair may sit on a relay for a hold time while its first measurements settle; the
	// links must come to vxlan, established, and stay there.
	waitFor(t, ctx, 30*time.Second, "every link of host 0 established over vxlan", func() error {
		for _, c := range connectionsOf(t, ctx, h0) {
			if c.Mode != "vxlan" || c.State != "established" {
				return fmt.Errorf("connection %+v; want vxlan with --no-direct", c)
			}
		}
		return nil
	})
	for _, r := range routesVia(t, h0) {
		if !strings.HasSuffix(r, "dev weft-vxlan") {
			t.Fatalf("route %q does not use the VXLAN device", r)
		}
	}
	// Full-size packets and a bulk transfer: no black hole from the encapsulation.
	if out, err := cs[0].ctr.Exec(ctx, "ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1372", cs[1].addr.String()); err != nil {
		t.Fatalf("1400-byte ping with DF over vxlan: %v\n%s", err, out)
	}
	if n, err := bulkTransfer(cs[0].ctr, cs[1].ctr, cs[1].addr, 16<<20); err != nil || n != 16<<20 {
		t.Fatalf("bulk TCP over vxlan: %d bytes, %v", n, err)
	}

	t.Run("a peer that leaves takes its routes, FDB and neighbour entries with it", func(t *testing.T) {
		gone := l.Host(2)
		if err := gone.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 60*time.Second, "host 2's kernel state gone from host 0", func() error {
			routes := routesVia(t, h0)
			fdb, neigh := vxlanEntries(t, h0)
			if len(routes) != 1 || fdb != 1 || neigh != 1 {
				return fmt.Errorf("routes %v, %d FDB and %d neighbour entries; want those of host 1 only", routes, fdb, neigh)
			}
			return nil
		})
	})
}

// vxlanEntries counts the permanent FDB and neighbour entries on h's VXLAN device.
func vxlanEntries(t *testing.T, h *lab.Host) (fdb, neigh int) {
	t.Helper()
	err := h.Do(func() error {
		link, err := netlink.LinkByName("weft-vxlan")
		if err != nil {
			return err
		}
		fdbs, err := netlink.NeighList(link.Attrs().Index, syscall.AF_BRIDGE)
		if err != nil {
			return err
		}
		for _, e := range fdbs {
			if e.State&netlink.NUD_PERMANENT != 0 && e.IP != nil {
				fdb++
			}
		}
		neighs, err := netlink.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, e := range neighs {
			if e.State&netlink.NUD_PERMANENT != 0 {
				neigh++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("vxlan entries of %s: %v", h.Name, err)
	}
	return fdb, neigh
}

// inNetNS runs fn on a thread inside c's namespace (sockets made there stay there).
func inNetNS(c *lab.Container, fn func() error) error {
	n, err := ns.GetNS(c.NSPath)
	if err != nil {
		return err
	}
	defer n.Close()
	return n.Do(func(ns.NetNS) error { return fn() })
}

// bulkTransfer sends n bytes over TCP from src to a listener in dst and returns how many
// arrived.
func bulkTransfer(src, dst *lab.Container, dstAddr netip.Addr, n int64) (int64, error) {
	var ln net.Listener
	if err := inNetNS(dst, func() (err error) { ln, err = net.Listen("tcp", net.JoinHostPort(dstAddr.String(), "5001")); return }); err != nil {
		return 0, err
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- 0
			return
		}
		defer c.Close()
		k, _ := io.Copy(io.Discard, c)
		got <- k
	}()
	var conn net.Conn
	if err := inNetNS(src, func() (err error) {
		conn, err = net.DialTimeout("tcp", net.JoinHostPort(dstAddr.String(), "5001"), 5*time.Second)
		return
	}); err != nil {
		return 0, err
	}
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.CopyN(conn, zeroReader{}, n); err != nil {
		conn.Close()
		return 0, err
	}
	conn.Close()
	select {
	case k := <-got:
		return k, nil
	case <-time.After(30 * time.Second):
		return 0, errors.New("receiver did not finish")
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// stream is a TCP stream from one container to another that writes 1 KiB every 10 ms, so a
// test can check it keeps flowing, without a reset, through a disturbance.
type stream struct {
	t        *testing.T
	received atomic.Int64
	readErr  atomic.Value
	writeErr atomic.Value
	stop     chan struct{}
	wg       sync.WaitGroup
	ln       net.Listener
}

func startStream(t *testing.T, src, dst placed, port string) *stream {
	t.Helper()
	st := &stream{t: t, stop: make(chan struct{})}
	if err := inNetNS(dst.ctr, func() (err error) { st.ln, err = net.Listen("tcp", net.JoinHostPort(dst.addr.String(), port)); return }); err != nil {
		t.Fatal(err)
	}
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		c, err := st.ln.Accept()
		if err != nil {
			st.readErr.Store(err)
			return
		}
		defer c.Close()
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			st.received.Add(int64(k))
			if err != nil {
				if err != io.EOF {
					st.readErr.Store(err)
				}
				return
			}
		}
	}()
	var conn net.Conn
	if err := inNetNS(src.ctr, func() (err error) {
		conn, err = net.DialTimeout("tcp", net.JoinHostPort(dst.addr.String(), port), 5*time.Second)
		return
	}); err != nil {
		t.Fatal(err)
	}
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		chunk := make([]byte, 1024)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-st.stop:
				conn.Close()
				return
			case <-tick.C:
			}
			conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := conn.Write(chunk); err != nil {
				st.writeErr.Store(err)
				return
			}
		}
	}()
	return st
}

// flowing waits until another 50 KiB have arrived.
func (st *stream) flowing(ctx context.Context, what string) {
	st.t.Helper()
	before := st.received.Load()
	waitFor(st.t, ctx, 30*time.Second, "the stream to flow "+what, func() error {
		if st.received.Load() < before+50*1024 {
			return fmt.Errorf("%d bytes so far", st.received.Load())
		}
		return nil
	})
}

// finish stops the stream and fails the test if either end saw an error (a reset).
func (st *stream) finish() {
	st.t.Helper()
	close(st.stop)
	st.wg.Wait()
	st.ln.Close()
	if err, _ := st.writeErr.Load().(error); err != nil {
		st.t.Fatalf("sender saw %v", err)
	}
	if err, _ := st.readErr.Load().(error); err != nil {
		st.t.Fatalf("receiver saw %v", err)
	}
}

// A TCP stream between containers on two hosts keeps flowing, without a reset, while the
// peer of one host is killed with SIGKILL and started again.
func TestStreamSurvivesPeerKill(t *testing.T) {
	l := newMeshLab(t, "wkill", 2)
	ctx := testCtx(t, 3*time.Minute)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	st := startStream(t, cs[0], cs[1], "5002")
	st.flowing(ctx, "before the kill")
	h1 := l.Host(1)
	if err := h1.Kill(); err != nil {
		t.Fatal(err)
	}
	st.flowing(ctx, "while the peer is down")
	if err := h1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 45*time.Second, "the restarted peer back in the mesh", func() error { return aliveEverywhere(ctx, l.Hosts()) })
	st.flowing(ctx, "after the restart")
	st.finish()
}
