package lab

import (
	"container/heap"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath/nslab"
)

func TestDelayQueueKeepsOrderWithoutJitter(t *testing.T) {
	var q delayQueue
	base := time.Unix(100, 0)
	// Equal release times (no jitter, same arrival instant) and increasing ones.
	for i, off := range []time.Duration{0, 0, 0, time.Millisecond, time.Millisecond, 2 * time.Millisecond} {
		heap.Push(&q, &heldPacket{due: base.Add(off), seq: uint64(i + 1)})
	}
	for want := uint64(1); q.Len() > 0; want++ {
		if got := heap.Pop(&q).(*heldPacket).seq; got != want {
			t.Fatalf("popped seq %d, want %d", got, want)
		}
	}
}

func TestDelayParamsValidation(t *testing.T) {
	for _, c := range []struct {
		d, j time.Duration
		loss float64
		ok   bool
	}{
		{0, 0, 0, true}, {30 * time.Millisecond, 5 * time.Millisecond, 0.5, true}, {0, 0, 1, true},
		{-1, 0, 0, false}, {0, -1, 0, false}, {0, 0, -0.1, false}, {0, 0, 1.5, false},
		{2 * time.Minute, 0, 0, false},
	} {
		if err := validDelayParams(c.d, c.j, c.loss); (err == nil) != c.ok {
			t.Errorf("validDelayParams(%v, %v, %v) = %v, want ok=%v", c.d, c.j, c.loss, err, c.ok)
		}
	}
	if _, err := NewDelayLine(DelayConfig{Name: "x", NSPath: "/nonexistent"}); err == nil {
		t.Error("NewDelayLine without routes succeeded")
	}
}

// delayTopo is A — R — B: two veth pairs, R forwarding between 10.251.1.0/24
// (A side) and 10.251.2.0/24 (B side).
type delayTopo struct {
	r          ns.NetNS
	rPath      string
	client     *net.UDPConn // in A
	bAddr      *net.UDPAddr // echo server in B
	tunName    string
	aNet, bNet netip.Prefix
}

func newDelayTopo(t *testing.T) *delayTopo {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("delay line tests need root (network namespaces, TUN)")
	}
	pid := os.Getpid()
	pfx := fmt.Sprintf("wdl-%d-", pid)
	paths := map[string]string{}
	handles := map[string]ns.NetNS{}
	for _, n := range []string{"a", "r", "b"} {
		name := pfx + n
		nslab.DeleteNetNS(name) // a leftover of a crashed run with this pid
		p, err := nslab.CreateNetNS(name)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nslab.DeleteNetNS(name) })
		paths[n] = p
		h, err := ns.GetNS(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		handles[n] = h
	}
	topo := &delayTopo{r: handles["r"], rPath: paths["r"], tunName: pfx + "t",
		aNet: netip.MustParsePrefix("10.251.1.0/24"), bNet: netip.MustParsePrefix("10.251.2.0/24")}

	rh, err := nslab.HandleAt(paths["r"])
	if err != nil {
		t.Fatal(err)
	}
	defer rh.Close()
	for _, side := range []struct{ peer, rAddr, pAddr string }{
		{"a", "10.251.1.1/24", "10.251.1.2/24"},
		{"b", "10.251.2.1/24", "10.251.2.2/24"},
	} {
		rName, pName := pfx+"r"+side.peer, pfx+side.peer
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: rName}, PeerName: pName,
			PeerNamespace: netlink.NsFd(int(handles[side.peer].Fd()))}
		if err := rh.LinkAdd(veth); err != nil {
			t.Fatalf("veth %s: %v", rName, err)
		}
		mustAddrUp(t, rh, rName, side.rAddr)
		ph, err := nslab.HandleAt(paths[side.peer])
		if err != nil {
			t.Fatal(err)
		}
		mustAddrUp(t, ph, pName, side.pAddr)
		gw := netip.MustParsePrefix(side.rAddr).Addr()
		if err := ph.RouteAdd(&netlink.Route{Gw: gw.AsSlice()}); err != nil {
			t.Fatalf("default route in %s: %v", side.peer, err)
		}
		ph.Close()
	}
	if err := handles["r"].Do(func(ns.NetNS) error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	}); err != nil {
		t.Fatal(err)
	}

	// UDP echo server in B, client in A: sockets stay in the namespace
	// they were created in.
	var server *net.UDPConn
	if err := handles["b"].Do(func(ns.NetNS) error {
		var err error
		server, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP("10.251.2.2")})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	topo.bAddr = server.LocalAddr().(*net.UDPAddr)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := server.ReadFromUDP(buf)
			if err != nil {
				return
			}
			server.WriteToUDP(buf[:n], from)
		}
	}()
	t.Cleanup(func() { server.Close(); <-done })
	if err := handles["a"].Do(func(ns.NetNS) error {
		var err error
		topo.client, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP("10.251.1.2")})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.client.Close() })
	return topo
}

func mustAddrUp(t *testing.T, h *netlink.Handle, name, cidr string) {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("addr %s on %s: %v", cidr, name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}

// pings sends n UDP echoes from A to B, one every gap, and collects the
// round-trip times of those answered within wait after the last send.
// Each payload carries its sequence number, so late answers are matched.
func (tp *delayTopo) pings(t *testing.T, n int, gap, wait time.Duration) []time.Duration {
	t.Helper()
	sent := make([]time.Time, n)
	got := make([]time.Duration, n)
	replies := make(chan echoReply, n)
	stop := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 64)
		for {
			tp.client.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			k, _, err := tp.client.ReadFromUDP(buf)
			at := time.Now()
			if err != nil {
				select {
				case <-stop:
					return
				default:
					continue
				}
			}
			if k == 8 {
				replies <- echoReply{int(binary.BigEndian.Uint64(buf)), at}
			}
		}
	}()
	for i := range n {
		sent[i] = time.Now()
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(i))
		if _, err := tp.client.WriteToUDP(b[:], tp.bAddr); err != nil {
			t.Fatalf("send: %v", err)
		}
		if gap > 0 {
			next := sent[i].Add(gap)
			for time.Now().Before(next) { // pacing the probes, not waiting for a condition
				collect(replies, sent, got, time.Until(next))
			}
		} else {
			// Sequential: wait for this answer (or the deadline).
			deadline := time.Now().Add(wait)
			for got[i] == 0 && time.Now().Before(deadline) {
				collect(replies, sent, got, time.Until(deadline))
			}
		}
	}
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) && slices.Contains(got, 0) {
		collect(replies, sent, got, time.Until(deadline))
	}
	close(stop)
	<-readerDone
	out := slices.DeleteFunc(got, func(d time.Duration) bool { return d == 0 })
	return out
}

// echoReply is one answer of pings' echo server.
type echoReply struct {
	seq int
	at  time.Time
}

// collect takes one reply, or returns after max.
func collect(replies chan echoReply, sent []time.Time, got []time.Duration, max time.Duration) {
	if max <= 0 {
		return
	}
	select {
	case r := <-replies:
		if r.seq >= 0 && r.seq < len(sent) && got[r.seq] == 0 {
			got[r.seq] = max1ns(r.at.Sub(sent[r.seq]))
		}
	case <-time.After(max):
	}
}

func max1ns(d time.Duration) time.Duration { return max(d, 1) }

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// TestDelayLine delays both directions between A and B by 30ms, so the
// expected round trip is base + 60ms.
func TestDelayLine(t *testing.T) {
	tp := newDelayTopo(t)

	base := tp.pings(t, 20, 0, time.Second)
	if len(base) < 19 {
		t.Fatalf("without delay line only %d of 20 echoes answered", len(base))
	}
	baseMed := median(base)
	t.Logf("base RTT median %v", baseMed)

	const delay = 30 * time.Millisecond
	dl, err := NewDelayLine(DelayConfig{NSPath: tp.rPath, Name: tp.tunName,
		Routes: []netip.Prefix{tp.aNet, tp.bNet}, Delay: delay, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dl.Close() })

	t.Run("delay", func(t *testing.T) {
		rtts := tp.pings(t, 20, 0, time.Second)
		want := baseMed + 2*delay
		med := median(rtts)
		t.Logf("delay line 30ms each way: RTT median %v (want %v), min %v, max %v, %d answered",
			med, want, slices.Min(rtts), slices.Max(rtts), len(rtts))
		if len(rtts) < 19 {
			t.Fatalf("only %d of 20 echoes answered", len(rtts))
		}
		if med < want*8/10 || med > want*12/10 {
			t.Errorf("median RTT %v not within 20%% of %v", med, want)
		}
		if slices.Min(rtts) < 2*delay {
			t.Errorf("an echo came back in %v, faster than the two delays of %v", slices.Min(rtts), delay)
		}
	})

	t.Run("loss", func(t *testing.T) {
		if err := dl.SetParams(delay, 0, 0.5); err != nil {
			t.Fatal(err)
		}
		before := dl.Stats()
		const n = 200
		rtts := tp.pings(t, n, 2*time.Millisecond, 300*time.Millisecond)
		after := dl.Stats()
		recv, lost := after.Received-before.Received, after.Lost-before.Lost
		t.Logf("loss 0.5 per pass: %d of %d round trips survived (expect ~%d = (1-0.5)^2); line dropped %d of %d packets",
			len(rtts), n, n/4, lost, recv)
		// Each pass is a Bernoulli(0.5) draw: a round trip survives with
		// probability 0.25 (σ ≈ 6 of 200); bounds are about ±4σ.
		if len(rtts) < 25 || len(rtts) > 75 {
			t.Errorf("%d of %d round trips survived, want 25..75", len(rtts), n)
		}
		if f := float64(lost) / float64(recv); recv < n || f < 0.4 || f > 0.6 {
			t.Errorf("line dropped %d of %d packets (%.2f), want about half", lost, recv, f)
		}
	})

	t.Run("jitter", func(t *testing.T) {
		if err := dl.SetParams(20*time.Millisecond, 10*time.Millisecond, 0); err != nil {
			t.Fatal(err)
		}
		rtts := tp.pings(t, 20, 0, time.Second)
		lo, hi := slices.Min(rtts), slices.Max(rtts)
		t.Logf("delay 20ms ± 10ms each way: RTT min %v, median %v, max %v", lo, median(rtts), hi)
		if len(rtts) < 19 || lo < 20*time.Millisecond || hi > 70*time.Millisecond || hi-lo < 5*time.Millisecond {
			t.Errorf("RTTs %v..%v (%d answered), want within 20..60ms (+slack) and spread", lo, hi, len(rtts))
		}
	})

	t.Run("zero", func(t *testing.T) {
		if err := dl.SetParams(0, 0, 0); err != nil {
			t.Fatal(err)
		}
		rtts := tp.pings(t, 20, 0, time.Second)
		med := median(rtts)
		t.Logf("delay line at 0: RTT median %v (base %v)", med, baseMed)
		if len(rtts) < 19 || med > baseMed+2*time.Millisecond {
			t.Errorf("median %v with %d answered, want about the base %v", med, len(rtts), baseMed)
		}
		if st := dl.Stats(); st.Forwarded == 0 || st.Overflow != 0 || st.WriteErrors != 0 {
			t.Errorf("stats %+v", st)
		}
	})

	t.Run("close", func(t *testing.T) {
		if err := dl.Close(); err != nil {
			t.Fatal(err)
		}
		if err := dl.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		h, err := nslab.HandleAt(tp.rPath)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		if _, err := h.LinkByName(tp.tunName); err == nil || !errors.As(err, new(netlink.LinkNotFoundError)) {
			t.Errorf("tun still there after Close (err %v)", err)
		}
		rules, err := h.RuleList(netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			if r.IifName == tp.tunName {
				t.Errorf("rule left behind: %v", r)
			}
		}
		routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: dl.cfg.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		if len(routes) != 0 {
			t.Errorf("routes left in table %d: %v", dl.cfg.Table, routes)
		}
		if rtts := tp.pings(t, 5, 0, time.Second); len(rtts) < 5 || median(rtts) > baseMed+2*time.Millisecond {
			t.Errorf("after Close: %d of 5 answered, median %v (base %v)", len(rtts), median(rtts), baseMed)
		}
	})
}
