package dns

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

func serve(t testing.TB, s *Server, q *mdns.Msg) *mdns.Msg {
	t.Helper()
	w := &recorder{}
	s.ServeDNS(context.Background(), w, q)
	if w.msg == nil {
		t.Fatalf("no answer to %s", q.Question[0].Name)
	}
	return w.msg
}

func TestForwardAndCache(t *testing.T) {
	up := startUpstream(t, staticUpstream("192.0.2.7", 60, 10))
	clk := newFakeClock()
	s := newTestServer(t, zoneRecords(t), func(c *Config) { c.Upstreams = []string{up.addr} }, Deps{Now: clk.Now})

	m := serve(t, s, query("Example.COM.", mdns.TypeA))
	if m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 1 || m.Answer[0].(*mdns.A).A.String() != "192.0.2.7" || m.Authoritative {
		t.Fatalf("forwarded answer %v", m)
	}
	if m.Question[0].Name != "Example.COM." {
		t.Fatalf("question not echoed as asked: %v", m.Question)
	}
	// Cached: same answer, the upstream is not asked again.
	clk.Advance(10 * time.Second)
	q := query("example.com.", mdns.TypeA)
	m = serve(t, s, q)
	if up.queries.Load() != 1 || m.Id != q.Id {
		t.Fatalf("upstream asked %d times, id %d/%d", up.queries.Load(), m.Id, q.Id)
	}
	if ttl := m.Answer[0].Header().Ttl; ttl != 50 {
		t.Fatalf("cached ttl %d, want 50", ttl)
	}
	if v := counterValue(t, s.m.cacheHits); v != 1 {
		t.Fatalf("cache hits %v", v)
	}
	// Expired after the TTL.
	clk.Advance(50 * time.Second)
	serve(t, s, query("example.com.", mdns.TypeA))
	if up.queries.Load() != 2 {
		t.Fatalf("upstream asked %d times after expiry", up.queries.Load())
	}

	// Negative answers are cached for the SOA minimum (10s).
	m = serve(t, s, query("missing.example.", mdns.TypeTXT))
	if m.Rcode != mdns.RcodeNameError {
		t.Fatalf("negative answer %v", m)
	}
	clk.Advance(9 * time.Second)
	serve(t, s, query("missing.example.", mdns.TypeTXT))
	if up.queries.Load() != 3 {
		t.Fatalf("negative answer not cached: %d queries", up.queries.Load())
	}
	clk.Advance(time.Second)
	serve(t, s, query("missing.example.", mdns.TypeTXT))
	if up.queries.Load() != 4 {
		t.Fatalf("negative answer cached too long: %d queries", up.queries.Load())
	}
	if v := counterValue(t, s.m.forwards.WithLabelValues(forwardOK)); v != 4 {
		t.Fatalf("forward ok %v", v)
	}
}

func TestForwardFailover(t *testing.T) {
	servfail := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetRcode(r, mdns.RcodeServerFailure)
		w.WriteMsg(m)
	})
	// A silent upstream: a socket nobody reads. Tries time out.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	good := startUpstream(t, staticUpstream("192.0.2.8", 60, 10))

	s := newTestServer(t, zoneRecords(t), func(c *Config) {
		c.Upstreams = []string{silent.LocalAddr().String(), servfail.addr, good.addr}
		c.ForwardTimeout = 100 * time.Millisecond
	}, Deps{})
	m := serve(t, s, query("example.org.", mdns.TypeA))
	if m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 1 || servfail.queries.Load() != 1 || good.queries.Load() != 1 {
		t.Fatalf("failover: %v (servfail %d good %d)", m, servfail.queries.Load(), good.queries.Load())
	}

	// All fail: SERVFAIL, not cached.
	s2 := newTestServer(t, zoneRecords(t), func(c *Config) {
		c.Upstreams = []string{silent.LocalAddr().String(), servfail.addr}
		c.ForwardTimeout = 100 * time.Millisecond
	}, Deps{})
	for i := 0; i < 2; i++ {
		if m := serve(t, s2, query("example.org.", mdns.TypeA)); m.Rcode != mdns.RcodeServerFailure {
			t.Fatalf("all upstreams failing: %v", m)
		}
	}
	if servfail.queries.Load() != 3 {
		t.Fatalf("SERVFAIL was cached: %d", servfail.queries.Load())
	}
}

func TestForwardTruncatedUpstreamRetriesTCP(t *testing.T) {
	up := startUpstream(t, func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(r)
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			m.Truncated = true
		} else {
			for i := 0; i < 3; i++ {
				m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, byte(i+1))})
			}
		}
		w.WriteMsg(m)
	})
	s := newTestServer(t, zoneRecords(t), func(c *Config) { c.Upstreams = []string{up.addr} }, Deps{})
	m := serve(t, s, query("big.example.", mdns.TypeA))
	if m.Truncated || len(m.Answer) != 3 {
		t.Fatalf("answer %v", m)
	}
}

// TestForwardResolvConf: upstreams come from resolv.conf, re-read when it
// changes; the server's own address is never an upstream.
func TestForwardResolvConf(t *testing.T) {
	u1 := startUpstream(t, staticUpstream("192.0.2.1", 60, 10))
	_, port, _ := net.SplitHostPort(u1.addr)
	// u2 on another loopback address, same port (resolv.conf has no ports).
	u2 := startUpstreamAt(t, net.JoinHostPort("127.0.0.2", port), staticUpstream("192.0.2.2", 60, 10))

	dir := t.TempDir()
	path := filepath.Join(dir, "resolv.conf")
	write := func(content string, mtime time.Time) {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	clk := newFakeClock()
	write("search example\nnameserver 127.0.0.1\n", clk.Now())
	s := newTestServer(t, zoneRecords(t), func(c *Config) { c.Upstreams = nil; c.ResolvConf = path }, Deps{Now: clk.Now})
	s.fwd.defPort = port

	a := func(name string) string {
		m := serve(t, s, query(name, mdns.TypeA))
		if len(m.Answer) != 1 {
			t.Fatalf("%s: %v", name, m)
		}
		return m.Answer[0].(*mdns.A).A.String()
	}
	if got := a("one.example."); got != "192.0.2.1" {
		t.Fatalf("from u1: %s", got)
	}
	write("search example\nnameserver 127.0.0.2\n", clk.Now().Add(time.Minute))
	// Not re-checked before the interval...
	if got := a("two.example."); got != "192.0.2.1" {
		t.Fatalf("re-read too early: %s", got)
	}
	clk.Advance(time.Second)
	if got := a("three.example."); got != "192.0.2.2" {
		t.Fatalf("not re-read: %s", got)
	}
	// A broken file keeps the last upstreams.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Second)
	if got := a("four.example."); got != "192.0.2.2" {
		t.Fatalf("after removal: %s", got)
	}
	if u2.queries.Load() != 2 || u1.queries.Load() != 2 {
		t.Fatalf("queries u1 %d u2 %d", u1.queries.Load(), u2.queries.Load())
	}
}

func TestForwardSkipsSelf(t *testing.T) {
	good := startUpstream(t, staticUpstream("192.0.2.9", 60, 10))
	s := newTestServer(t, zoneRecords(t), nil, Deps{})
	self, err := s.AddListener("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.fwd.static = []string{self.String(), good.addr}
	if got := s.fwd.upstreams(); len(got) != 1 || got[0] != good.addr {
		t.Fatalf("upstreams %v", got)
	}
	// End to end over the wire, forwarded.
	_, addr := startTestServer(t, zoneRecords(t), func(c *Config) { c.Upstreams = []string{good.addr} }, Deps{})
	m := exchange(t, "udp", addr, query("example.net.", mdns.TypeA))
	if len(m.Answer) != 1 || !m.RecursionAvailable {
		t.Fatalf("%v", m)
	}
}

func TestCacheBounded(t *testing.T) {
	clk := newFakeClock()
	c := newCache(2, time.Hour, time.Minute, clk.Now)
	resp := func(q *mdns.Msg) *mdns.Msg {
		m := new(mdns.Msg)
		m.SetReply(q)
		m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: q.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 300}, A: net.IPv4(192, 0, 2, 1)}}
		return m
	}
	qs := []*mdns.Msg{query("a.", mdns.TypeA), query("b.", mdns.TypeA), query("c.", mdns.TypeA)}
	c.put(qs[0], resp(qs[0]))
	c.put(qs[1], resp(qs[1]))
	c.get(qs[0]) // a is now the most recent
	c.put(qs[2], resp(qs[2]))
	if c.len() != 2 || c.get(qs[1]) != nil || c.get(qs[0]) == nil || c.get(qs[2]) == nil {
		t.Fatalf("LRU: len %d", c.len())
	}
	// TTL cap, zero TTL and no-SOA negative answers.
	capped := newCache(10, 10*time.Second, time.Minute, clk.Now)
	capped.put(qs[0], resp(qs[0]))
	clk.Advance(10 * time.Second)
	if capped.get(qs[0]) != nil {
		t.Fatal("max ttl not applied")
	}
	zero := resp(qs[1])
	zero.Answer[0].Header().Ttl = 0
	capped.put(qs[1], zero)
	nx := new(mdns.Msg)
	nx.SetRcode(qs[2], mdns.RcodeNameError)
	capped.put(qs[2], nx)
	if capped.len() != 0 {
		t.Fatalf("uncacheable answers cached: %d", capped.len())
	}
	// DO bit is part of the key.
	do := query("a.", mdns.TypeA)
	do.SetEdns0(1232, true)
	c.put(qs[0], resp(qs[0]))
	if c.get(do) != nil {
		t.Fatal("DO query served a non-DO answer")
	}
	off := newCache(0, time.Hour, time.Hour, clk.Now)
	off.put(qs[0], resp(qs[0]))
	if off.get(qs[0]) != nil {
		t.Fatal("disabled cache cached")
	}
}

func startUpstreamAt(t testing.TB, addr string, h func(w mdns.ResponseWriter, r *mdns.Msg)) *fakeUpstream {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	u := &fakeUpstream{addr: pc.LocalAddr().String()}
	srv := &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		u.queries.Add(1)
		h(w, r)
	})}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ActivateAndServe()
	}()
	<-started
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.ShutdownContext(ctx)
		<-done
	})
	return u
}
