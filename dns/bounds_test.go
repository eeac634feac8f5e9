package dns

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// startBoundedServer starts a server on 127.0.0.1 with slow-path limits lim
// and upstream up.
func startBoundedServer(t *testing.T, lim slowLimits, up string) (*Server, string) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Listen = []string{"127.0.0.1:0"}
	cfg.Upstreams = []string{up}
	cfg.ForwardTimeout = 5 * time.Second
	s, err := newServer(cfg, zoneRecords(t), Deps{}, lim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	return s, s.Addrs()[0].String()
}

// slowUpstream answers every question with 192.0.2.9 after delay.
func slowUpstream(delay time.Duration) func(w mdns.ResponseWriter, r *mdns.Msg) {
	static := staticUpstream("192.0.2.9", 60, 10)
	return func(w mdns.ResponseWriter, r *mdns.Msg) {
		time.Sleep(delay) // the upstream's own latency, not a wait for a condition
		static(w, r)
	}
}

// A flood of distinct questions to a slow upstream, from many sources: the
// goroutines stay bounded by the pool (before it, 3000 queries made 1428
// goroutines), every query is either forwarded or counted as dropped.
func TestSlowPathBoundedUnderFlood(t *testing.T) {
	t.Run("small", func(t *testing.T) { testFlood(t, slowLimits{workers: 16, queue: 64, perSource: 64}) })
	t.Run("default", func(t *testing.T) { testFlood(t, defaultSlowLimits) })
}

func testFlood(t *testing.T, lim slowLimits) {
	up := startUpstream(t, slowUpstream(200*time.Millisecond))
	s, addr := startBoundedServer(t, lim, up.addr)
	dst, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	base := runtime.NumGoroutine()

	var peak atomic.Int64
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for {
			if n := int64(runtime.NumGoroutine()); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()

	// 100 sources (127.0.0.2 … 127.0.0.101), 30 distinct names each.
	const sources, each = 100, 30
	var conns []*net.UDPConn
	for i := 0; i < sources; i++ {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, byte(2+i))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	busy := s.dropped.WithLabelValues(dropBusy)
	// Each round of 100 is read off the sockets before the next is sent, so
	// that the kernel's socket buffer, not the pool, drops nothing.
	for j := 0; j < each; j++ {
		for i, c := range conns {
			b, err := query(fmt.Sprintf("n%d-%d.example.", i, j), mdns.TypeA).Pack()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.WriteToUDP(b, dst); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "the round read", func() bool {
			return s.slow.queued.Load()+int64(counterValue(t, busy)) == int64((j+1)*sources)
		})
	}
	waitFor(t, 60*time.Second, "every queued query forwarded", func() bool {
		return up.queries.Load() == s.slow.queued.Load()
	})
	close(stop)
	sampler.Wait()

	// Workers, upstream handlers (one per query in flight), readers, the sampler:
	// a bound in the pool's size, not in the number of queries.
	if extra := peak.Load() - int64(base); extra > int64(3*lim.workers+20) {
		t.Fatalf("goroutines grew by %d under a flood of %d queries (pool of %d workers)", extra, sources*each, lim.workers)
	}
	if counterValue(t, busy) == 0 {
		t.Fatalf("a flood beyond the queue dropped nothing")
	}
	if up.queries.Load() < int64(lim.queue) {
		t.Fatalf("only %d queries forwarded", up.queries.Load())
	}
	t.Logf("3000 queries: peak goroutines +%d, forwarded %d, dropped busy %v", peak.Load()-int64(base), up.queries.Load(), counterValue(t, busy))
}

// One source cannot take the whole pool: beyond perSource queries in flight
// its queries are dropped, and another source is still answered.
func TestSlowPathPerSourceLimit(t *testing.T) {
	gate := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	static := staticUpstream("192.0.2.9", 60, 10)
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		if r.Question[0].Name != "other.example." {
			<-gate
		}
		static(w, r)
	})
	t.Cleanup(release) // before the upstream's shutdown, which waits for its handlers
	lim := slowLimits{workers: 32, queue: 256, perSource: 8}
	s, addr := startBoundedServer(t, lim, up.addr)
	dst, _ := net.ResolveUDPAddr("udp", addr)
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 5)}) // exchange() below comes from 127.0.0.1
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 20; i++ {
		b, _ := query(fmt.Sprintf("q%d.example.", i), mdns.TypeA).Pack()
		c.WriteToUDP(b, dst)
	}
	src := s.dropped.WithLabelValues(dropSource)
	waitFor(t, 10*time.Second, "12 queries dropped for their source", func() bool { return counterValue(t, src) == 12 })
	waitFor(t, 10*time.Second, "8 queries upstream", func() bool { return up.queries.Load() == 8 })

	// Another source is served while the first is held.
	m := exchange(t, "udp", addr, query("other.example.", mdns.TypeA))
	if m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("other source: %v", m)
	}
	release()
	waitFor(t, 10*time.Second, "the held source's slots freed", func() bool {
		s.slow.mu.Lock()
		defer s.slow.mu.Unlock()
		return len(s.slow.inflight) == 0
	})
}

// Identical questions in flight at once make one upstream query; every
// asker gets the answer with its own id.
func TestForwardCoalescesIdenticalQuestions(t *testing.T) {
	gate := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	static := staticUpstream("192.0.2.10", 60, 10)
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		<-gate
		static(w, r)
	})
	t.Cleanup(release) // before the upstream's shutdown, which waits for its handlers
	s := newTestServer(t, zoneRecords(t), func(c *Config) {
		c.Upstreams = []string{up.addr}
		c.ForwardTimeout = 10 * time.Second
	}, Deps{})

	const askers = 50
	answers := make([]*mdns.Msg, askers)
	ids := make([]uint16, askers)
	var wg sync.WaitGroup
	for i := range askers {
		q := query("Same.Example.", mdns.TypeA)
		ids[i] = q.Id
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := &recorder{}
			s.ServeDNS(context.Background(), w, q)
			answers[i] = w.msg
		}()
	}
	waitFor(t, 10*time.Second, "49 askers waiting on the first", func() bool {
		return counterValue(t, s.coalesced) == askers-1
	})
	release()
	wg.Wait()
	if n := up.queries.Load(); n != 1 {
		t.Fatalf("%d identical questions made %d upstream queries, want 1", askers, n)
	}
	for i, m := range answers {
		if m == nil || m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 1 || m.Id != ids[i] {
			t.Fatalf("asker %d: %v", i, m)
		}
	}
}

// A source holding perSource TCP connections gets its next one closed at
// once (counted); when one closes, it may connect again.
func TestTCPPerSourceLimit(t *testing.T) {
	s, addr := startTestServer(t, zoneRecords(t), nil, Deps{})
	held := make([]net.Conn, 0, defaultTCPPerSource)
	for range defaultTCPPerSource {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	// Accepted connections are counted in Accept: wait until they all are.
	waitFor(t, 5*time.Second, "held connections accepted", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, ln := range s.listeners {
			ll := ln.tcp.Listener.(*limitListener)
			ll.mu.Lock()
			n := ll.bySrc[netip.MustParseAddr("127.0.0.1")]
			ll.mu.Unlock()
			return n == defaultTCPPerSource
		}
		return false
	})
	extra, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("connection over the per-source limit: read %v, want EOF", err)
	}
	if v := counterValue(t, s.dropped.WithLabelValues(dropTCP)); v != 1 {
		t.Fatalf("dropped tcp %v", v)
	}
	held[0].Close()
	waitFor(t, 5*time.Second, "a TCP query after a slot freed", func() bool {
		c := &mdns.Client{Net: "tcp", Timeout: time.Second}
		m, _, err := c.Exchange(query("web.weft.local.", mdns.TypeA), addr)
		return err == nil && m.Rcode == mdns.RcodeSuccess
	})
}
