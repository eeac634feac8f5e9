package mesh

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestProbeRoundTrip(t *testing.T) {
	for _, key := range [][]byte{nil, []byte("secret")} {
		p := Probe{Kind: ProbeReply, Seq: 1<<63 + 5, T1: -3, T2: 1e18, T3: 1e18 + 7, From: "peer-b", Path: "peer-b/underlay"}
		b, err := AppendProbe(nil, p, key)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > MaxProbeSize {
			t.Errorf("%d bytes, more than MaxProbeSize %d", len(b), MaxProbeSize)
		}
		got, err := DecodeProbe(b, key)
		if err != nil {
			t.Fatalf("key %q: %v", key, err)
		}
		if got != p {
			t.Errorf("key %q: got %+v, want %+v", key, got, p)
		}
	}
}

func TestDecodeProbeRejects(t *testing.T) {
	key := []byte("k")
	good, _ := AppendProbe(nil, Probe{Kind: ProbeRequest, Seq: 1, T1: 10, From: "a", Path: "b"}, nil)
	goodAuth, _ := AppendProbe(nil, Probe{Kind: ProbeRequest, Seq: 1, T1: 10, From: "a", Path: "b"}, key)
	mod := func(b []byte, i int, v byte) []byte { c := bytes.Clone(b); c[i] = v; return c }
	badReply, _ := AppendProbe(nil, Probe{Kind: ProbeReply, T2: 10, T3: 5, From: "a", Path: "b"}, nil)
	for _, c := range []struct {
		name string
		b    []byte
		key  []byte
		want string
	}{
		{"empty", nil, nil, "too short"},
		{"truncated", good[:len(good)-1], nil, "overruns"},
		{"magic", mod(good, 0, 'x'), nil, "magic"},
		{"version", mod(good, 2, 9), nil, "version 9"},
		{"kind", mod(good, 3, 7), nil, "kind 7"},
		{"flags", mod(good, 4, 0x80), nil, "flags"},
		{"reserved", mod(good, 6, 1), nil, "flags"},
		{"trailing", append(bytes.Clone(good), 0), nil, "trailing"},
		{"from name", mod(good, probeHeaderLen+1, '!'), nil, "from name"},
		{"empty path", append(bytes.Clone(good[:len(good)-2]), 0), nil, "path name"},
		{"unauthenticated", good, key, "requires authentication"},
		{"authenticated without key", goodAuth, nil, "no probe key"},
		{"wrong key", goodAuth, []byte("other"), "MAC mismatch"},
		{"forged", mod(goodAuth, 8, 1), key, "MAC mismatch"},
		{"reply T3<T2", badReply, nil, "T3"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := DecodeProbe(c.b, c.key)
			if !errors.Is(err, ErrBadProbe) || !bytes.Contains([]byte(err.Error()), []byte(c.want)) {
				t.Errorf("err %v, want ErrBadProbe mentioning %q", err, c.want)
			}
		})
	}
}

func FuzzDecodeProbe(f *testing.F) {
	key := []byte("fuzz")
	for _, k := range [][]byte{nil, key} {
		b, _ := AppendProbe(nil, Probe{Kind: ProbeRequest, Seq: 9, T1: 1, From: "a", Path: "b/c"}, k)
		f.Add(b, k != nil)
		b, _ = AppendProbe(nil, Probe{Kind: ProbeReply, Seq: 9, T1: 1, T2: 2, T3: 3, From: "peer", Path: "x"}, k)
		f.Add(b, k != nil)
	}
	f.Add([]byte("wP\x01\x01"), false)
	f.Fuzz(func(t *testing.T, b []byte, auth bool) {
		var k []byte
		if auth {
			k = key
		}
		p, err := DecodeProbe(b, k)
		if err != nil {
			if !errors.Is(err, ErrBadProbe) {
				t.Fatalf("error %v does not wrap ErrBadProbe", err)
			}
			return
		}
		again, err := AppendProbe(nil, p, k)
		if err != nil {
			t.Fatalf("decoded probe %+v does not encode: %v", p, err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs:\n%x\n%x", again, b)
		}
	})
}

// fakeClock is a settable clock for the prober's timestamps.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// accountingProber returns a prober with a fake clock and a target "b", and a function that
// sends one request by hand and answers it after rtt, of which hold was spent at the
// responder (rtt 0: it is lost). Window 4, DownAfter 2.
func accountingProber(t *testing.T, edit ...func(*ProberConfig)) (*Prober, func(rtt, hold time.Duration)) {
	p, probe, _ := accountingProberClock(t, edit...)
	return p, probe
}

// accountingProberClock is accountingProber that also returns its clock.
func accountingProberClock(t *testing.T, edit ...func(*ProberConfig)) (*Prober, func(rtt, hold time.Duration), *fakeClock) {
	clk := &fakeClock{now: time.Unix(1000, 0)}
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	cfg := ProberConfig{Self: "a", Conn: conn, Window: 4, DownAfter: 2, Timeout: 100 * time.Millisecond, Now: clk.Now}
	for _, e := range edit {
		e(&cfg)
	}
	p, err := NewProber(cfg)
	if err != nil {
		t.Fatal(err)
	}
	target := conn.LocalAddr().(*net.UDPAddr).AddrPort() // replies to ourselves are answered, and not "ours"
	if err := p.SetTargets(map[string]netip.AddrPort{"b": target}); err != nil {
		t.Fatal(err)
	}
	probe := func(rtt, hold time.Duration) {
		t.Helper()
		p.mu.Lock()
		p.seq++
		seq := p.seq
		t1 := clk.Now()
		p.pending[seq] = pendingProbe{target: "b", t1: t1}
		p.mu.Unlock()
		if rtt == 0 {
			clk.Add(p.cfg.Timeout)
			var sc tickScratch
			p.tick(&sc) // expires it (and sends a real probe nobody answers in time)
			p.mu.Lock()
			clear(p.pending)
			p.mu.Unlock()
			return
		}
		t2 := t1.Add(50 * time.Hour) // the responder's clock is far off; only T3−T2 matters
		rep, err := AppendProbe(nil, Probe{Kind: ProbeReply, Seq: seq, T1: t1.UnixNano(), T2: t2.UnixNano(), T3: t2.Add(hold).UnixNano(), From: "b", Path: "b"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		clk.Add(rtt + hold)
		p.handle(rep, netip.AddrPort{}, clk.Now(), nil)
	}
	return p, probe, clk
}

// TestProberSettles: probes lost while a new target's path is still being built show as loss
// while it is silent, and three answers in a row clear them.
func TestProberSettles(t *testing.T) {
	p, probe := accountingProber(t)
	probe(0, 0)
	probe(0, 0)
	if s, _ := p.Stats("b"); s.Up || s.Loss != 1 {
		t.Fatalf("silent target: %+v, want loss 1", s)
	}
	probe(time.Millisecond, 0)
	probe(time.Millisecond, 0)
	if s, _ := p.Stats("b"); s.Loss != 0.5 {
		t.Fatalf("two answers: %+v, want the losses still counted", s)
	}
	probe(time.Millisecond, 0)
	if s, _ := p.Stats("b"); s.Loss != 0 || !s.Up {
		t.Fatalf("settled: %+v, want the set-up losses cleared", s)
	}
	probe(0, 0)
	if s, _ := p.Stats("b"); s.Loss != 0.5 {
		t.Fatalf("a loss after settling: %+v, want it counted", s)
	}
}

// TestProberAccounting drives the prober's bookkeeping with a fake clock
// and hand-made replies: RTT subtracts the responder's hold time, EWMA,
// jitter, MinRTT, loss window, Up.
func TestProberAccounting(t *testing.T) {
	p, probe := accountingProber(t)
	if s, _ := p.Stats("b"); s.Up || s.Samples != 0 {
		t.Fatalf("before any reply: %+v", s)
	}
	// The first reply primes the path (it may have waited for a handshake): answered, no sample.
	probe(80*time.Millisecond, 0)
	s, _ := p.Stats("b")
	if s.Up || s.Samples != 0 || s.Loss != 0 || s.MinRTT != 0 || s.LastHeard.IsZero() {
		t.Fatalf("after the priming reply: %+v", s)
	}
	probe(10*time.Millisecond, 5*time.Millisecond)
	s, _ = p.Stats("b")
	if s.RTT != 10*time.Millisecond || s.MinRTT != 10*time.Millisecond || s.Jitter != 0 || !s.Up || s.Loss != 0 || s.Samples != 1 {
		t.Fatalf("after one sample: %+v", s)
	}
	// The average is fed the median of the last three samples (of two, the smaller).
	probe(18*time.Millisecond, time.Millisecond)
	s, _ = p.Stats("b")
	// The first differences are averaged plainly (weight 1/16 only from the 16th on).
	if s.RTT != 10*time.Millisecond || s.Jitter != 8*time.Millisecond {
		t.Fatalf("after two samples: %+v, want RTT 10ms jitter %v", s, 8*time.Millisecond)
	}
	probe(30*time.Millisecond, 0)
	s, _ = p.Stats("b")
	if want := 10*time.Millisecond + 8*time.Millisecond/8; s.RTT != want || s.Jitter != 10*time.Millisecond {
		t.Fatalf("after three samples: %+v, want RTT %v (median 18ms), jitter 10ms (mean of 8 and 12)", s, want)
	}
	// One spike moves the average by its median (30ms), not by itself (500ms). (The third
	// answer in a row settled the target and restarted the window, so MinRTT starts at 18ms.)
	probe(500*time.Millisecond, 0)
	s, _ = p.Stats("b")
	if want := 11*time.Millisecond + 19*time.Millisecond/8; s.RTT != want || s.MinRTT != 18*time.Millisecond {
		t.Fatalf("after a spike: %+v, want RTT %v", s, want)
	}
	probe(0, 0)
	s, _ = p.Stats("b")
	if s.Loss != 1.0/4 || !s.Up {
		t.Fatalf("after a loss: %+v", s)
	}
	probe(0, 0)
	s, _ = p.Stats("b")
	if s.Loss != 0.5 || s.Up {
		t.Fatalf("after two losses in a row (DownAfter 2): %+v", s)
	}
	// The first reply after the link went down primes again: up, but no sample; the window
	// restarts (the outage was reported as down, not as loss).
	samples := s.Samples
	probe(20*time.Millisecond, 0)
	s, _ = p.Stats("b")
	if !s.Up || s.Samples != samples || s.MinRTT != 0 || s.Loss != 0 {
		t.Fatalf("after recovery: %+v", s)
	}
	probe(20*time.Millisecond, 0)
	s, _ = p.Stats("b")
	if s.Loss != 0 || !s.Up || s.Samples != samples+1 || s.MinRTT != 20*time.Millisecond {
		t.Fatalf("after a sample past recovery: %+v", s)
	}
	// A reply nobody asked for, or for another target, is not counted.
	before := p.Counters().Unexpected
	rep, _ := AppendProbe(nil, Probe{Kind: ProbeReply, Seq: 12345, From: "b", Path: "b"}, nil)
	p.handle(rep, netip.AddrPort{}, time.Unix(2000, 0), nil)
	if p.Counters().Unexpected != before+1 {
		t.Error("unexpected reply not counted")
	}
}

// runProber starts a prober on a fresh loopback socket, stopped at the end
// of the test.
func runProber(t testing.TB, name string, edit func(*ProberConfig)) (*Prober, netip.AddrPort) {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := ProberConfig{Self: name, Conn: conn, Interval: 20 * time.Millisecond, Timeout: 200 * time.Millisecond}
	if edit != nil {
		edit(&cfg)
	}
	p, err := NewProber(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run(%s): %v", name, err)
		}
		conn.Close()
	})
	return p, conn.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestProberMeasuresLoopback(t *testing.T) {
	t.Parallel()
	a, _ := runProber(t, "a", nil)
	b, bAddr := runProber(t, "b", nil)
	// Two named paths to the same peer, and one to a port nobody answers.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	if err := a.SetTargets(map[string]netip.AddrPort{
		"b/underlay": bAddr, "b/overlay": bAddr,
		"c": silent.LocalAddr().(*net.UDPAddr).AddrPort(),
	}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() string {
		all := a.All()
		for _, n := range []string{"b/underlay", "b/overlay"} {
			if s := all[n]; s.Samples < 5 || !s.Up {
				return fmt.Sprintf("%s: %+v", n, s)
			}
		}
		if s := all["c"]; s.Loss < 0.99 || s.Up || s.Samples != 0 {
			return fmt.Sprintf("c: %+v", s)
		}
		return ""
	})
	s, _ := a.Stats("b/underlay")
	if s.RTT <= 0 || s.RTT > 50*time.Millisecond || s.MinRTT > s.RTT*4 || s.Loss != 0 || time.Since(s.LastHeard) > time.Second {
		t.Errorf("loopback stats %+v", s)
	}
	if c := b.Counters(); c.Answered < 10 || c.Bad != 0 {
		t.Errorf("b counters %+v", c)
	}
	t.Logf("loopback: %+v; a %+v", s, a.Counters())

	// Dropping a target forgets it.
	if err := a.SetTargets(map[string]netip.AddrPort{"b/underlay": bAddr}); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.Stats("c"); ok {
		t.Error("removed target still has stats")
	}
	if s2, _ := a.Stats("b/underlay"); s2.Samples < s.Samples {
		t.Errorf("kept target lost its samples: %d < %d", s2.Samples, s.Samples)
	}
	if err := a.SetTargets(map[string]netip.AddrPort{"bad name!": bAddr}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("bad target name: %v", err)
	}
}

func TestProberAuthenticationAndGarbage(t *testing.T) {
	t.Parallel()
	a, aAddr := runProber(t, "a", func(c *ProberConfig) { c.Key = []byte("k1") })
	b, bAddr := runProber(t, "b", func(c *ProberConfig) { c.Key = []byte("k1") })
	x, _ := runProber(t, "x", func(c *ProberConfig) { c.Key = []byte("other") })
	n, _ := runProber(t, "n", nil) // no key
	for _, p := range []*Prober{a, x, n} {
		if err := p.SetTargets(map[string]netip.AddrPort{"b": bAddr}); err != nil {
			t.Fatal(err)
		}
	}
	// Garbage at a's socket.
	g, err := net.Dial("udp", aAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for _, junk := range []string{"", "hello", "wP\x01\x01\x00\x00\x00\x00"} {
		g.Write([]byte(junk))
	}
	waitFor(t, 5*time.Second, func() string {
		if s, _ := a.Stats("b"); s.Samples < 3 {
			return fmt.Sprintf("a→b (same key): %+v", s)
		}
		if c := b.Counters(); c.Bad < 4 {
			return fmt.Sprintf("b has dropped only %d bad probes (x and n should be refused)", c.Bad)
		}
		if c := a.Counters(); c.Bad < 2 {
			return fmt.Sprintf("a counted %d garbage packets", c.Bad)
		}
		return ""
	})
	for _, p := range []*Prober{x, n} {
		if s, _ := p.Stats("b"); s.Samples != 0 || s.Up {
			t.Errorf("%s got answers from b despite the key mismatch: %+v", p.cfg.Self, s)
		}
	}
}

func TestProberRunEnds(t *testing.T) {
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewProber(ProberConfig{Self: "a", Conn: conn})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Run(context.Background()) }()
	conn.Close() // the owner closing the socket ends Run with an error
	select {
	case err := <-done:
		if err == nil {
			t.Error("Run returned nil after its socket was closed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after the socket closed")
	}
	if _, err := NewProber(ProberConfig{Self: "a"}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("no conn: %v", err)
	}
	if _, err := NewProber(ProberConfig{Self: "a", Conn: conn, Window: 5, DownAfter: 6}); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("DownAfter > Window: %v", err)
	}
}

// countingConn counts the bytes and packets a prober writes and reads.
type countingConn struct {
	net.PacketConn
	outPkts, outBytes, inPkts, inBytes *atomic.Uint64
}

func (c countingConn) WriteTo(b []byte, a net.Addr) (int, error) {
	n, err := c.PacketConn.WriteTo(b, a)
	if err == nil {
		c.outPkts.Add(1)
		c.outBytes.Add(uint64(n) + 28) // + IPv4 and UDP headers
	}
	return n, err
}

func (c countingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(b)
	if err == nil {
		c.inPkts.Add(1)
		c.inBytes.Add(uint64(n) + 28)
	}
	return n, a, err
}

// BenchmarkProbeOverhead runs 50 peers in one process on loopback, each
// probing the 49 others with the default 1s interval twice over, as the
// daemon does (one prober over the underlay, one through the link in use),
// and reports what one peer sends and receives per second (requests and
// replies of both probers, IPv4+UDP headers included) and the CPU the whole
// process spends. Each iteration is one probe interval.
func BenchmarkProbeOverhead(b *testing.B) {
	const n, perPeer = 50, 2
	var outPkts, outBytes, inPkts, inBytes atomic.Uint64
	var probers []*Prober
	for range perPeer {
		addrs := map[string]netip.AddrPort{}
		group := make([]*Prober, n)
		for i := range group {
			name := fmt.Sprintf("weft-peer-%02d", i)
			group[i], addrs[name] = runProber(b, name, func(c *ProberConfig) {
				c.Conn = countingConn{c.Conn, &outPkts, &outBytes, &inPkts, &inBytes}
				c.Interval, c.Timeout = time.Second, time.Second
				c.Key = []byte("bench-key")
			})
		}
		for i, p := range group {
			targets := map[string]netip.AddrPort{}
			for name, a := range addrs {
				if name != fmt.Sprintf("weft-peer-%02d", i) {
					targets[name] = a
				}
			}
			p.SetTargets(targets)
		}
		probers = append(probers, group...)
	}
	// Warm up: every peer has measured every other.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok := true
		for _, p := range probers {
			for _, s := range p.All() {
				ok = ok && s.Samples > 0
			}
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("probers did not measure each other within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	var ru0, ru1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	o0, ob0, i0, ib0 := outPkts.Load(), outBytes.Load(), inPkts.Load(), inBytes.Load()
	start := time.Now()
	for b.Loop() {
		time.Sleep(time.Second) // one probe interval of the running probers
	}
	secs := time.Since(start).Seconds()
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	per := func(v uint64) float64 { return float64(v) / secs / n }
	b.ReportMetric(per(outPkts.Load()-o0), "out-pkts/s/peer")
	b.ReportMetric(per(outBytes.Load()-ob0), "out-B/s/peer")
	b.ReportMetric(per(inPkts.Load()-i0), "in-pkts/s/peer")
	b.ReportMetric(per(inBytes.Load()-ib0), "in-B/s/peer")
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.ReportMetric(float64(cpu.Microseconds())/secs/n, "cpu-µs/s/peer")
	b.ReportMetric(0, "ns/op")
}

// TestProberIdleInterval: a quiet, healthy target is probed at IdleInterval; one marked
// active, one still settling and one that just lost a probe at Interval.
func TestProberIdleInterval(t *testing.T) {
	const fast, idle = 100 * time.Millisecond, 2 * time.Second
	p, probe := accountingProber(t, func(c *ProberConfig) { c.Interval, c.IdleInterval = fast, idle })
	// wait sends b's due probe and returns how long until b's next one.
	wait := func() time.Duration {
		t.Helper()
		p.mu.Lock()
		tg := p.targets["b"]
		tg.next = p.cfg.Now()
		p.mu.Unlock()
		var sc tickScratch
		p.tick(&sc)
		p.mu.Lock()
		defer p.mu.Unlock()
		clear(p.pending) // the real probe went to our own socket; nobody reads it
		return tg.next.Sub(p.cfg.Now())
	}
	within := func(what string, got, want time.Duration) {
		t.Helper()
		if got < want*4/5 || got > want*6/5 {
			t.Fatalf("%s: next probe in %v, want %v ±20%%", what, got, want)
		}
	}
	within("new target", wait(), fast)
	for range settleAnswers + 1 {
		probe(time.Millisecond, 0)
	}
	within("settled and quiet", wait(), idle)
	p.SetActive([]string{"b"})
	within("active", wait(), fast)
	p.SetActive(nil)
	within("idle again", wait(), idle)
	probe(0, 0) // lost
	p.mu.Lock()
	next := p.targets["b"].next.Sub(p.cfg.Now())
	p.mu.Unlock()
	// Interval ± 20 %, from when the probe was due: it may have gone up to Interval/4
	// early with others (tick).
	if fullRate := fast*6/5 + fast/4; next > fullRate {
		t.Fatalf("after a loss the next probe is in %v, want within %v", next, fullRate)
	}
	within("after a loss", wait(), fast)
	probe(time.Millisecond, 0)
	within("answered again", wait(), idle)
}

// TestProberNoAllocsPerPacket: answering a request and accounting a reply allocate
// nothing (GC was a fifth of an idle peer's CPU).
func TestProberNoAllocsPerPacket(t *testing.T) {
	p, _ := accountingProber(t)
	req, err := AppendProbe(nil, Probe{Kind: ProbeRequest, Seq: 7, T1: 1, From: "c", Path: "a/link"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dst := p.cfg.Conn.LocalAddr().(*net.UDPAddr).AddrPort()
	out := make([]byte, 0, MaxProbeSize)
	if n := testing.AllocsPerRun(100, func() { out = p.handle(req, dst, p.cfg.Now(), out) }); n != 0 {
		t.Errorf("answering a request: %v allocations, want 0", n)
	}
	rep, err := AppendProbe(nil, Probe{Kind: ProbeReply, Seq: 9, T1: p.cfg.Now().UnixNano(), T2: 5, T3: 6, From: "b", Path: "b"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() {
		p.mu.Lock()
		p.pending[9] = pendingProbe{target: "b", t1: p.cfg.Now()}
		p.mu.Unlock()
		p.handle(rep, dst, p.cfg.Now(), nil)
	}); n != 0 {
		t.Errorf("accounting a reply: %v allocations, want 0", n)
	}
}

// TestProberChanged: going down, coming back up and settling are signalled; a plain
// answer on a healthy link is not.
func TestProberChanged(t *testing.T) {
	p, probe := accountingProber(t)
	signalled := func() bool {
		select {
		case <-p.Changed():
			return true
		default:
			return false
		}
	}
	probe(time.Millisecond, 0) // primes
	probe(time.Millisecond, 0) // first sample: up
	probe(time.Millisecond, 0) // third answer in a row: settled
	if !signalled() {
		t.Fatal("no signal after the target came up and settled")
	}
	probe(time.Millisecond, 0)
	if signalled() {
		t.Fatal("signal for an answer that changed nothing")
	}
	probe(0, 0)
	if signalled() {
		t.Fatal("signal for one loss below DownAfter (2)")
	}
	probe(0, 0)
	if !signalled() {
		t.Fatal("no signal when the target went down")
	}
}

// TestProberRecoveryClearsLoss: a link back after being down is judged afresh; the outage
// was reported as down, and stale losses must not keep it "lossy" for a whole window.
func TestProberRecoveryClearsLoss(t *testing.T) {
	p, probe := accountingProber(t) // window 4, DownAfter 2
	for range 8 {                   // settled, and a window full of answers
		probe(time.Millisecond, 0)
	}
	probe(0, 0)
	if s, _ := p.Stats("b"); !s.Up || s.Loss != 0.25 {
		t.Fatalf("one loss: %+v, want up with loss 0.25", s)
	}
	probe(0, 0)
	if s, _ := p.Stats("b"); s.Up {
		t.Fatalf("two losses in a row: %+v, want down", s)
	}
	probe(time.Millisecond, 0)
	if s, _ := p.Stats("b"); !s.Up || s.Loss != 0 {
		t.Fatalf("back after the outage: %+v, want up with loss 0", s)
	}
	probe(0, 0)
	if s, _ := p.Stats("b"); s.Loss != 0.5 {
		t.Fatalf("a loss after the recovery: %+v, want loss 0.5 (1 of 2 since)", s)
	}
}

// The reused HMAC gives the MAC a fresh hmac.New gives, packet after packet,
// from concurrent senders, and a packet sealed with another key fails.
func TestProbeKeyReuse(t *testing.T) {
	key, other := []byte("probe key one"), []byte("probe key two")
	k := newProbeKey(key)
	if newProbeKey(nil) != nil {
		t.Fatal("an empty key gave a probeKey; want nil (unauthenticated)")
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				p := Probe{Kind: ProbeRequest, Seq: uint64(g*1000 + i), T1: int64(i), From: "a", Path: "b"}
				b, err := appendProbe(nil, p, k)
				if err != nil {
					t.Error(err)
					return
				}
				m := hmac.New(sha256.New, key)
				m.Write(b[:len(b)-probeMACLen])
				if want := m.Sum(nil)[:probeMACLen]; !bytes.Equal(b[len(b)-probeMACLen:], want) {
					t.Errorf("packet %d: MAC %x, want %x", i, b[len(b)-probeMACLen:], want)
					return
				}
				if _, err := decodeProbe(b, k); err != nil {
					t.Errorf("packet %d: %v", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	b, _ := AppendProbe(nil, Probe{Kind: ProbeRequest, Seq: 1, T1: 1, From: "a", Path: "b"}, other)
	if _, err := decodeProbe(b, k); !errors.Is(err, ErrBadProbe) {
		t.Fatalf("a packet sealed with another key: %v, want ErrBadProbe", err)
	}
}

// TestProberLateReply: a reply after its timeout (a loaded host) takes its loss back — the
// loss figure, the run towards down and the full probe rate — while losses after it still
// count, a target that went down stays down, and a reply past lateFor is unexpected.
func TestProberLateReply(t *testing.T) {
	const fast, idle = 100 * time.Millisecond, 2 * time.Second
	p, probe, fc := accountingProberClock(t, func(c *ProberConfig) { c.Interval, c.IdleInterval, c.DownAfter = fast, idle, 3 })
	clk, advance := fc.Now, fc.Add
	// lose sends a request by hand and lets it time out; it returns the request to answer.
	lose := func() (uint64, time.Time) {
		t.Helper()
		p.mu.Lock()
		p.seq++
		seq, t1 := p.seq, clk()
		p.pending[seq] = pendingProbe{target: "b", t1: t1}
		p.mu.Unlock()
		advance(p.cfg.Timeout)
		var sc tickScratch
		p.tick(&sc)
		p.mu.Lock()
		clear(p.pending) // the real probe tick sent went to our own socket
		p.mu.Unlock()
		return seq, t1
	}
	answer := func(seq uint64, t1 time.Time) {
		t.Helper()
		rep, err := AppendProbe(nil, Probe{Kind: ProbeReply, Seq: seq, T1: t1.UnixNano(), T2: 1, T3: 2, From: "b", Path: "b"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		p.handle(rep, netip.AddrPort{}, clk(), nil)
	}
	nextIn := func() time.Duration {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.targets["b"].next.Sub(p.targets["b"].sent)
	}
	// The full rate: Interval ± 20 %, and a probe sent up to Interval/4 early (sent with
	// others due) is scheduled from when it was due.
	const fullRate = fast*6/5 + fast/4
	for range 8 { // settled, a full window of answers, idle
		probe(time.Millisecond, 0)
	}
	seq, t1 := lose()
	if s, _ := p.Stats("b"); s.Loss != 0.25 || !s.Up {
		t.Fatalf("after a timeout: %+v, want loss 0.25", s)
	}
	if n := nextIn(); n > fullRate {
		t.Fatalf("after a timeout the next probe is in %v, want the full rate", n)
	}
	advance(300 * time.Millisecond)
	answer(seq, t1)
	if s, _ := p.Stats("b"); s.Loss != 0 || !s.Up || !s.LastHeard.Equal(clk()) {
		t.Fatalf("after the late reply: %+v, want loss 0, heard now", s)
	}
	if c := p.Counters(); c.Late != 1 || c.Unexpected != 0 {
		t.Fatalf("counters %+v, want 1 late, 0 unexpected", c)
	}
	if n := nextIn(); n < idle*4/5 {
		t.Fatalf("after the late reply the next probe is in %v, want the idle rate %v", n, idle)
	}
	answer(seq, t1) // the same reply again: a duplicate
	if c := p.Counters(); c.Late != 1 || c.Unexpected != 1 {
		t.Fatalf("duplicate late reply: counters %+v, want it unexpected", c)
	}

	// A late reply ends the run of losses at it; the losses after it still count.
	a, aT1 := lose()
	lose()
	answer(a, aT1)
	if s, _ := p.Stats("b"); s.Loss != 0.25 || !s.Up {
		t.Fatalf("late reply to the first of two losses: %+v, want loss 0.25", s)
	}
	if n := nextIn(); n > fullRate {
		t.Fatalf("a loss still unanswered, yet the next probe is in %v", n)
	}
	lose()
	if s, _ := p.Stats("b"); !s.Up {
		t.Fatalf("two losses after the late reply (DownAfter 3): %+v, want up", s)
	}
	lose()
	if s, _ := p.Stats("b"); s.Up {
		t.Fatalf("three losses in a row after the late reply: %+v, want down", s)
	}

	// Down stays down until a reply to a fresh probe: late replies do not decide it.
	for range 8 {
		probe(time.Millisecond, 0)
	}
	var lost [3]uint64
	var lostT1 [3]time.Time
	for i := range lost {
		lost[i], lostT1[i] = lose()
	}
	answer(lost[0], lostT1[0])
	if s, _ := p.Stats("b"); s.Up {
		t.Fatalf("a late reply revived a target that went down: %+v", s)
	}

	// A target re-added under its name (a new address) starts over: a late reply for the
	// old one is unexpected.
	for range 8 {
		probe(time.Millisecond, 0)
	}
	seq, t1 = lose()
	other := netip.MustParseAddrPort("127.0.0.1:9")
	if err := p.SetTargets(map[string]netip.AddrPort{"b": other}); err != nil {
		t.Fatal(err)
	}
	before0 := p.Counters()
	answer(seq, t1)
	if c := p.Counters(); c.Late != before0.Late || c.Unexpected != before0.Unexpected+1 {
		t.Fatalf("late reply for a replaced target: counters %+v, before %+v", c, before0)
	}

	// Past lateFor timeouts, a reply is unexpected.
	seq, t1 = lose()
	advance((lateFor + 1) * p.cfg.Timeout)
	var sc tickScratch
	p.tick(&sc)
	before := p.Counters()
	answer(seq, t1)
	if c := p.Counters(); c.Late != before.Late || c.Unexpected != before.Unexpected+1 {
		t.Fatalf("reply past lateFor: counters %+v, before %+v", c, before)
	}
}

// TestProberSendsDueProbesTogether: a tick sends the probes due within Interval/4 along with
// the one that woke it (one wake-up, not one per target), schedules an early one from when
// it was due (the rate is unchanged), and leaves later ones for their own time.
func TestProberSendsDueProbesTogether(t *testing.T) {
	const every = time.Second
	p, _ := accountingProber(t, func(c *ProberConfig) { c.Interval, c.IdleInterval = every, every })
	self := p.cfg.Conn.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := p.SetTargets(map[string]netip.AddrPort{"b": self, "c": self, "d": self}); err != nil {
		t.Fatal(err)
	}
	now := p.cfg.Now()
	p.mu.Lock()
	p.targets["b"].next = now
	p.targets["c"].next = now.Add(every / 8) // within Interval/4: goes now
	p.targets["d"].next = now.Add(every / 2) // not within: waits
	p.mu.Unlock()
	var sc tickScratch
	wait := p.tick(&sc)
	if got := p.Counters().Sent; got != 2 {
		t.Fatalf("sent %d probes, want 2 (b, and c due within Interval/4)", got)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := p.targets["d"]; !d.sent.IsZero() || !d.next.Equal(now.Add(every/2)) {
		t.Fatalf("d (due in Interval/2) was sent or rescheduled: sent %v, next in %v", d.sent, d.next.Sub(now))
	}
	if wait != every/2 {
		t.Fatalf("next wake in %v, want %v (d's time)", wait, every/2)
	}
	if c := p.targets["c"].next.Sub(now); c < every/8+every*4/5 || c > every/8+every*6/5 {
		t.Fatalf("c, sent early, is next due in %v, want Interval ±20%% after when it was due (%v)", c, every/8)
	}
	if b := p.targets["b"].next.Sub(now); b < every*4/5 || b > every*6/5 {
		t.Fatalf("b next due in %v, want Interval ±20%%", b)
	}
}

// TestProberSetActiveUnchanged: setting the same active set again (the datapath does it every
// round) does not wake the send loop; a changed one does.
func TestProberSetActiveUnchanged(t *testing.T) {
	p, _ := accountingProber(t)
	woken := func() bool {
		select {
		case <-p.kick:
			return true
		default:
			return false
		}
	}
	woken() // SetTargets woke it
	p.SetActive(nil)
	if woken() {
		t.Fatal("an unchanged empty set woke the send loop")
	}
	p.SetActive([]string{"b", "c", "b"})
	if !woken() {
		t.Fatal("a changed set did not wake the send loop")
	}
	p.SetActive([]string{"c", "b"})
	if woken() {
		t.Fatal("the same set in another order woke the send loop")
	}
	p.SetActive([]string{"b"})
	if !woken() {
		t.Fatal("a smaller set did not wake the send loop")
	}
	p.mu.Lock()
	_, b := p.active["b"]
	_, c := p.active["c"]
	p.mu.Unlock()
	if !b || c {
		t.Fatalf("active set after the change: b %v c %v, want b only", b, c)
	}
}
