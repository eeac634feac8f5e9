package router

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/datapath/nslab"
)

func TestParseRate(t *testing.T) {
	for in, want := range map[string]int64{"100mbit": 100e6, "1g": 1e9, "1gbit": 1e9, "500000": 500000, "20M": 20e6,
		"2.5gbit": 2.5e9, "64kbit": 64e3, "10mbps": 10e6, " 7mb ": 7e6} {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "fast", "-1mbit", "0", "mbit", "2000gbit", "1tbit", "NaN", "inf"} {
		if got, err := ParseRate(in); err == nil {
			t.Errorf("ParseRate(%q) = %d, want an error", in, got)
		}
	}
}

func TestPerfNetNSPrefix(t *testing.T) {
	for peer, want := range map[string]string{"host-1.example": "host-1.example-perf-", "wpfperf-h0": "wpfperf-h0-perf-",
		"": "weft-perf-", "a/b": "weft-perf-", "..": "weft-perf-", "-x": "weft-perf-", "h\u00e9": "weft-perf-", strings.Repeat("a", 65): "weft-perf-"} {
		if got := perfNetNSPrefix(peer); got != want {
			t.Errorf("perfNetNSPrefix(%q) = %q, want %q", peer, got, want)
		}
	}
}

func TestCheckPerf(t *testing.T) {
	got, err := checkPerf(PerfRequest{Peer: "b"}, "a", 50e6)
	if err != nil {
		t.Fatal(err)
	}
	// The default rate never exceeds the peer's cap.
	if got.Network != DefaultNetwork || got.Seconds != DefaultPerfSeconds || got.Rate != 50e6 {
		t.Errorf("defaults: %+v", got)
	}
	for _, bad := range []PerfRequest{{}, {Peer: "a"}, {Peer: "b", Seconds: 31}, {Peer: "b", Seconds: -1},
		{Peer: "b", Rate: -5}, {Peer: "b", Rate: 50e6 + 1}} {
		_, err := checkPerf(bad, "a", 50e6)
		var ae *apiError
		if !errors.As(err, &ae) || ae.status != http.StatusBadRequest || !strings.HasPrefix(ae.body.Message, "perf: ") {
			t.Errorf("checkPerf(%+v) = %v, want a 400 naming perf", bad, err)
		}
	}
}

func TestPaceWait(t *testing.T) {
	const rate = 8_000_000 // 1 MB/s
	cases := []struct {
		sent, n int64
		elapsed time.Duration
		burst   int64
		want    time.Duration
	}{
		{0, 1000, 0, 1000, 0},                       // the burst covers the first write
		{0, 2000, 0, 1000, time.Millisecond},        // 1000 bytes over the burst: 1 ms at 1 MB/s
		{1_000_000, 1000, time.Second, 1000, 0},     // on schedule
		{2_000_000, 0, time.Second, 0, time.Second}, // a second ahead
		{500_000, 100_000, 100 * time.Millisecond, 0, 500 * time.Millisecond},
	}
	for _, c := range cases {
		if got := paceWait(c.sent, c.n, c.elapsed, rate, c.burst); (got - c.want).Abs() > time.Microsecond {
			t.Errorf("paceWait(%d, %d, %s, burst %d) = %s, want %s", c.sent, c.n, c.elapsed, c.burst, got, c.want)
		}
	}
}

func TestPerfLatency(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	rtts := ms(1, 3, 1, 3, 1, 3, 1, 3, 1, 100) // one outlier
	p50, p99, jitter, loss := perfLatency(rtts, 20)
	if p50 != time.Millisecond || p99 != 100*time.Millisecond {
		t.Errorf("p50 %s p99 %s, want 1ms and 100ms", p50, p99)
	}
	// |diffs|: eight of 2 ms and one of 99 ms over 9.
	if want := (8*2 + 99) * time.Millisecond / 9; jitter != want {
		t.Errorf("jitter %s, want %s", jitter, want)
	}
	if loss != 0.5 {
		t.Errorf("loss %v, want 0.5", loss)
	}
	if p50, _, _, loss := perfLatency(nil, 10); p50 != 0 || loss != 1 {
		t.Errorf("no answers: p50 %s loss %v, want 0 and 1", p50, loss)
	}
	if _, _, _, loss := perfLatency(ms(1, 1, 1), 2); loss != 0 {
		t.Errorf("more answers than probes (duplicates): loss %v, want 0", loss)
	}
}

func TestPerfStateOneAtATimeAndBoundedResults(t *testing.T) {
	var s perfState
	if err := s.take("test x"); err != nil {
		t.Fatal(err)
	}
	if err := s.take("test y"); !errors.Is(err, ErrPerfBusy) || !strings.Contains(err.Error(), "test x") {
		t.Errorf("second take = %v, want ErrPerfBusy naming the running test", err)
	}
	s.release()
	if err := s.take("test y"); err != nil {
		t.Errorf("take after release = %v", err)
	}
	for i := range perfResultsKept + 5 {
		s.record(PerfResult{ID: fmt.Sprint(i)})
	}
	got := s.list()
	if len(got) != perfResultsKept || got[0].ID != "5" || got[len(got)-1].ID != fmt.Sprint(perfResultsKept+4) {
		t.Errorf("kept %d results from %s to %s, want the last %d", len(got), got[0].ID, got[len(got)-1].ID, perfResultsKept)
	}
}

// The paced stream, measured where it arrives, stays within its cap (plus the 10 ms burst).
func TestPerfSendKeepsItsRate(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type rx struct {
		bytes       int64
		first, last time.Time
	}
	got := make(chan rx, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- rx{}
			return
		}
		defer c.Close()
		var r rx
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if r.bytes == 0 {
					r.first = time.Now()
				}
				r.bytes += int64(n)
				r.last = time.Now()
			}
			if err != nil {
				got <- r
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	const rate = 20_000_000
	start := time.Now()
	sent, err := perfSend(context.Background(), c, 2*time.Second, rate)
	took := time.Since(start)
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.bytes != sent {
		t.Fatalf("received %d bytes of %d", r.bytes, sent)
	}
	bps := float64(r.bytes) * 8 / r.last.Sub(r.first).Seconds()
	t.Logf("sent %d bytes in %s: %.1f Mbit/s at the receiver", sent, took, bps/1e6)
	if bps > 1.05*rate || bps < 0.8*rate {
		t.Errorf("receiver saw %.1f Mbit/s, want 16–21 (cap 20)", bps/1e6)
	}
	if took > 2200*time.Millisecond {
		t.Errorf("the stream ran %s, want at most its 2s", took)
	}
}

func TestPerfProbeMeasuresAnEcho(t *testing.T) {
	echo, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		buf := make([]byte, 64)
		odd := false
		for {
			n, from, err := echo.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if odd = !odd; odd { // drop every other probe: half lost
				continue
			}
			echo.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	c, err := net.DialUDP("udp", nil, echo.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rtts, sent := perfProbe(context.Background(), c, 500*time.Millisecond)
	_, _, _, loss := perfLatency(rtts, sent)
	if sent < 20 || sent > 30 || loss < 0.4 || loss > 0.6 {
		t.Errorf("%d probes sent, loss %.2f; want about 25 and 0.5", sent, loss)
	}
	for _, r := range rtts {
		if r <= 0 || r > 100*time.Millisecond {
			t.Errorf("loopback RTT %s", r)
		}
	}
}

// A sink on a real peer: an endpoint attached like a container, a stream from a second
// endpoint on the same bridge, a second test refused while one runs, and nothing left after.
func TestPerfSinkLifecycle(t *testing.T) {
	p := startWiredPeer(t, t.TempDir(), nil, func(p *Peer) { p.perf.nsPrefix = fmt.Sprintf("wpf-%d-", os.Getpid()) })
	ctx := context.Background()
	src, err := p.newPerfEndpoint(ctx, "0000000a", DefaultNetwork)
	if err != nil {
		t.Fatal(err)
	}
	srcClosed := false
	t.Cleanup(func() {
		if !srcClosed {
			p.closePerfEndpoint(src)
		}
	})
	req := perfSinkRequest{ID: "0000000b", Network: DefaultNetwork, Source: src.addr.String(), Seconds: 2, Rate: 20e6}
	ready, err := p.startSink(ctx, "p0", req)
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			p.stopSink(req.ID)
		}
	})
	// One test at a time: a second request is refused with a clear, retryable error.
	_, err = p.startSink(ctx, "p9", perfSinkRequest{ID: "0000000c", Network: DefaultNetwork, Source: src.addr.String(), Seconds: 2, Rate: 20e6})
	var ae *apiError
	if !errors.As(err, &ae) || ae.status != http.StatusConflict || ae.body.Code != types.ErrTryAgainLater || !strings.Contains(err.Error(), "from p0") {
		t.Errorf("second sink = %v, want 409 naming the running test", err)
	}
	// Over the peer transport's handler: a busy sink and bad JSON are refused, and counted.
	h := p.peerRPCHandler()
	for body, want := range map[string]int{`{"id":"0000000e","network":"default","source":"10.0.0.1","seconds":1,"rate":1}`: http.StatusConflict,
		`{"id":"0000000e","bogus":1}`: http.StatusBadRequest} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, perfRPCStart, strings.NewReader(body)))
		if rec.Code != want {
			t.Errorf("POST %s %s = %d %s, want %d", perfRPCStart, body, rec.Code, rec.Body, want)
		}
	}
	if got := testutil.ToFloat64(p.perf.tests.WithLabelValues("sink", "refused")); got != 2 {
		t.Errorf("refused sinks counted %v, want 2", got)
	}
	// Bad input is refused before anything is made.
	for _, bad := range []perfSinkRequest{{ID: "zz", Source: "10.0.0.1", Seconds: 1, Rate: 1}, {ID: "0000000d", Source: "nope", Seconds: 1, Rate: 1},
		{ID: "0000000d", Source: "10.0.0.1", Seconds: 99, Rate: 1}, {ID: "0000000d", Source: "10.0.0.1", Seconds: 1, Rate: 2e9}} {
		if _, err := p.startSink(ctx, "p9", bad); !errors.As(err, &ae) || ae.status != http.StatusBadRequest {
			t.Errorf("startSink(%+v) = %v, want 400", bad, err)
		}
	}
	sink := netip.MustParseAddr(ready.Addr)
	var tcp net.Conn
	var udp *net.UDPConn
	err = inNetNS(src.path, func() error {
		var err error
		if tcp, err = net.Dial("tcp", netip.AddrPortFrom(sink, uint16(ready.TCPPort)).String()); err != nil {
			return err
		}
		udp, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(sink, uint16(ready.UDPPort))))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan []time.Duration)
	var probes int
	go func() {
		r, n := perfProbe(ctx, udp, 2*time.Second)
		probes = n
		done <- r
	}()
	sent, err := perfSend(ctx, tcp, 2*time.Second, req.Rate)
	if err != nil {
		t.Fatal(err)
	}
	tcp.(*net.TCPConn).CloseWrite()
	rtts := <-done
	udp.Close()
	rep, err := p.stopSink(req.ID)
	stopped = true
	tcp.Close()
	if err != nil {
		t.Fatal(err)
	}
	if rep.Bytes != sent {
		t.Errorf("sink counted %d bytes of %d sent", rep.Bytes, sent)
	}
	bps := float64(rep.Bytes) * 8 / rep.Last.Sub(rep.First).Seconds()
	if bps > 1.05*float64(req.Rate) {
		t.Errorf("sink received %.1f Mbit/s, over the 20 Mbit/s cap", bps/1e6)
	}
	if _, _, _, loss := perfLatency(rtts, probes); loss > 0.05 || rep.Echoed < len(rtts) {
		t.Errorf("probe loss %.2f, %d echoed for %d answers", loss, rep.Echoed, len(rtts))
	}
	// The sink's endpoint is gone: no attachment, no namespace; the peer takes a new test.
	p.closePerfEndpoint(src)
	srcClosed = true
	if n := len(p.alloc.Attachments()); n != 0 {
		t.Errorf("%d attachments left after the test", n)
	}
	for _, id := range []string{"0000000a", "0000000b"} {
		if _, err := os.Stat(nslab.NetNSPath(p.perf.nsPrefix + id)); !os.IsNotExist(err) {
			t.Errorf("namespace %s%s left: %v", p.perf.nsPrefix, id, err)
		}
	}
	if _, err := p.stopSink(req.ID); err == nil {
		t.Error("stopping a stopped sink succeeded")
	}
	if got := testutil.ToFloat64(p.perf.tests.WithLabelValues("sink", "ok")); got != 1 {
		t.Errorf("sinks counted ok %v, want 1", got)
	}
	if err := p.perf.take("next"); err != nil {
		t.Errorf("peer still busy after the sink stopped: %v", err)
	}
}

// A peer stopped mid-test leaves its endpoint in the database and the kernel; the next start
// removes both.
func TestPerfEndpointsSweptAtStart(t *testing.T) {
	dir := t.TempDir()
	prefix := fmt.Sprintf("wpf-%d-", os.Getpid())
	p := startWiredPeer(t, dir, nil, func(p *Peer) { p.perf.nsPrefix = prefix })
	ep, err := p.newPerfEndpoint(context.Background(), "0000002a", DefaultNetwork)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nslab.DeleteNetNS(ep.netns) })
	p.stop()
	if _, err := os.Stat(ep.path); err != nil {
		t.Fatalf("the endpoint's namespace should outlive the stopped peer: %v", err)
	}
	p = startWiredPeer(t, dir, nil, func(p *Peer) { p.perf.nsPrefix = prefix })
	for _, a := range p.alloc.Attachments() {
		if a.ContainerID == ep.id {
			t.Errorf("attachment %s left after a restart", a.ContainerID)
		}
	}
	if _, err := os.Stat(ep.path); !os.IsNotExist(err) {
		t.Errorf("namespace %s left after a restart: %v", ep.path, err)
	}
}

// The sink echoes and accepts only the requester's endpoint: no reflector for anyone else.
func TestPerfSinkRefusesOtherSources(t *testing.T) {
	p := startWiredPeer(t, t.TempDir(), nil, func(p *Peer) { p.perf.nsPrefix = fmt.Sprintf("wpf-%d-", os.Getpid()) })
	ctx := context.Background()
	src, err := p.newPerfEndpoint(ctx, "0000001a", DefaultNetwork)
	if err != nil {
		t.Fatal(err)
	}
	defer p.closePerfEndpoint(src)
	// The sink answers only 10.99.0.1, which src is not.
	ready, err := p.startSink(ctx, "p0", perfSinkRequest{ID: "0000001b", Network: DefaultNetwork, Source: "10.99.0.1", Seconds: 1, Rate: 1e6})
	if err != nil {
		t.Fatal(err)
	}
	defer p.stopSink("0000001b")
	sink := netip.MustParseAddr(ready.Addr)
	err = inNetNS(src.path, func() error {
		udp, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(sink, uint16(ready.UDPPort))))
		if err != nil {
			return err
		}
		defer udp.Close()
		rtts, _ := perfProbe(ctx, udp, 200*time.Millisecond)
		if len(rtts) != 0 {
			return fmt.Errorf("%d probes of a stranger echoed", len(rtts))
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}
