package dns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

func startTestServer(t testing.TB, recs *Records, edit func(*Config), deps Deps) (*Server, string) {
	t.Helper()
	s := newTestServer(t, recs, func(c *Config) {
		c.Listen = []string{"127.0.0.1:0"}
		if edit != nil {
			edit(c)
		}
	}, deps)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	return s, s.Addrs()[0].String()
}

func exchange(t testing.TB, netw, addr string, q *mdns.Msg) *mdns.Msg {
	t.Helper()
	c := &mdns.Client{Net: netw, Timeout: 5 * time.Second}
	if netw == "udp" {
		c.UDPSize = 65535 // read whatever the server sends; the query says what it accepts
	}
	m, _, err := c.Exchange(q, addr)
	if err != nil {
		t.Fatalf("%s exchange %s: %v", netw, q.Question[0].Name, err)
	}
	return m
}

func TestServerUDPAndTCP(t *testing.T) {
	_, addr := startTestServer(t, zoneRecords(t), nil, Deps{})
	rev, _ := mdns.ReverseAddr("10.40.1.2")
	for _, netw := range []string{"udp", "tcp"} {
		t.Run(netw, func(t *testing.T) {
			m := exchange(t, netw, addr, query("WEB.weft.local.", mdns.TypeA))
			if m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 2 || !m.Authoritative {
				t.Fatalf("A: %v", m)
			}
			m = exchange(t, netw, addr, query("nope.weft.local.", mdns.TypeA))
			if m.Rcode != mdns.RcodeNameError || len(m.Ns) != 1 {
				t.Fatalf("NXDOMAIN: %v", m)
			}
			m = exchange(t, netw, addr, query(rev, mdns.TypePTR))
			if len(m.Answer) != 1 || m.Answer[0].(*mdns.PTR).Ptr != "web.weft.local." {
				t.Fatalf("PTR: %v", m)
			}
			m = exchange(t, netw, addr, query("_http._tcp.web.weft.local.", mdns.TypeSRV))
			if len(m.Answer) != 1 || m.Answer[0].(*mdns.SRV).Port != 8080 {
				t.Fatalf("SRV: %v", m)
			}
		})
	}
}

// manyAddrs returns records with n IPv4 addresses for "big".
func manyAddrs(t testing.TB, n int) *Records {
	r := newTestRecords(t, "a", nil)
	for i := 0; i < n; i++ {
		if _, err := r.AddAddr("big", netip.AddrFrom4([4]byte{10, 40, byte(i / 250), byte(i%250 + 1)})); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

func TestTruncationAndTCPFallback(t *testing.T) {
	_, addr := startTestServer(t, manyAddrs(t, 200), nil, Deps{})
	q := query("big.weft.local.", mdns.TypeA)

	m := exchange(t, "udp", addr, q)
	if !m.Truncated || wireLen(m) > mdns.MinMsgSize || len(m.Answer) >= 200 {
		t.Fatalf("udp without edns: tc=%v len=%d answers=%d", m.Truncated, wireLen(m), len(m.Answer))
	}
	m = exchange(t, "tcp", addr, q)
	if m.Truncated || len(m.Answer) != 200 {
		t.Fatalf("tcp: tc=%v answers=%d", m.Truncated, len(m.Answer))
	}
	// The miekg client retries over TCP by itself when told to.
	c := &mdns.Client{Net: "udp", Timeout: 5 * time.Second}
	m, _, err := c.Exchange(q, addr)
	if err != nil || !m.Truncated {
		t.Fatalf("udp: %v %v", m, err)
	}
}

func TestEDNS0BufferSize(t *testing.T) {
	// 50 A records: ~850 bytes: over 512, under the 1232 we advertise.
	_, addr := startTestServer(t, manyAddrs(t, 50), nil, Deps{})
	plain := query("big.weft.local.", mdns.TypeA)
	if m := exchange(t, "udp", addr, plain); !m.Truncated {
		t.Fatalf("no edns: not truncated (%d bytes)", wireLen(m))
	}
	e := query("big.weft.local.", mdns.TypeA)
	e.SetEdns0(4096, false)
	m := exchange(t, "udp", addr, e)
	if m.Truncated || len(m.Answer) != 50 || m.IsEdns0() == nil || m.IsEdns0().UDPSize() != 1232 {
		t.Fatalf("edns 4096: tc=%v answers=%d opt=%v", m.Truncated, len(m.Answer), m.IsEdns0())
	}
	small := query("big.weft.local.", mdns.TypeA)
	small.SetEdns0(600, true)
	m = exchange(t, "udp", addr, small)
	if !m.Truncated || wireLen(m) > 600 || m.IsEdns0() == nil || !m.IsEdns0().Do() {
		t.Fatalf("edns 600: tc=%v len=%d opt=%v", m.Truncated, wireLen(m), m.IsEdns0())
	}
	// 200 addresses do not fit 1232 even with EDNS0: truncated.
	_, addr2 := startTestServer(t, manyAddrs(t, 200), nil, Deps{})
	e2 := query("big.weft.local.", mdns.TypeA)
	e2.SetEdns0(4096, false)
	if m := exchange(t, "udp", addr2, e2); !m.Truncated || wireLen(m) > 1232 {
		t.Fatalf("edns 4096, 200 addrs: tc=%v len=%d", m.Truncated, wireLen(m))
	}
}

func TestMalformedOverTheWire(t *testing.T) {
	_, addr := startTestServer(t, zoneRecords(t), nil, Deps{})
	conn, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Garbage: dropped. Then a header claiming two questions: FORMERR.
	for _, b := range [][]byte{{1}, {0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0xff}, make([]byte, 600)} {
		if _, err := conn.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	q := query("web.weft.local.", mdns.TypeA)
	b, _ := q.Pack()
	b[5] = 2 // qdcount 2
	if _, err := conn.Write(b); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no FORMERR: %v", err)
		}
		m := new(mdns.Msg)
		if m.Unpack(buf[:n]) == nil && m.Id == q.Id {
			if m.Rcode != mdns.RcodeFormatError {
				t.Fatalf("rcode %s", mdns.RcodeToString[m.Rcode])
			}
			break
		}
	}
	// Still serving, on UDP and on TCP after garbage on a TCP connection.
	tc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tc.Write([]byte{0, 3, 1, 2, 3})
	tc.Close()
	for _, netw := range []string{"udp", "tcp"} {
		if m := exchange(t, netw, addr, query("web.weft.local.", mdns.TypeA)); len(m.Answer) != 2 {
			t.Fatalf("%s after garbage: %v", netw, m)
		}
	}
}

func TestListenersAndClose(t *testing.T) {
	before := runtime.NumGoroutine()
	s := newTestServer(t, zoneRecords(t), nil, Deps{})
	a1, err := s.AddListener("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a2, err := s.AddListener("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Addrs()) != 2 {
		t.Fatalf("Addrs = %v", s.Addrs())
	}
	// UDP and TCP on one port.
	exchange(t, "tcp", a2.String(), query("web.weft.local.", mdns.TypeA))
	if _, err := s.AddListener(a2.String()); err == nil {
		t.Fatal("listening twice on one address succeeded")
	}
	if err := s.RemoveListener(a1); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveListener(a1); err == nil {
		t.Fatal("removing twice succeeded")
	}
	c := &mdns.Client{Net: "tcp", Timeout: time.Second}
	if _, _, err := c.Exchange(query("web.weft.local.", mdns.TypeA), a1.String()); err == nil {
		t.Fatal("removed listener still answers")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal("second Close:", err)
	}
	if _, err := s.AddListener("127.0.0.1:0"); !errors.Is(err, ErrClosed) {
		t.Fatalf("AddListener after Close: %v", err)
	}
	waitFor(t, 5*time.Second, "serving goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

func TestStartFailsOnBusyAddress(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	s := newTestServer(t, zoneRecords(t), func(c *Config) { c.Listen = []string{pc.LocalAddr().String()} }, Deps{})
	if err := s.Start(); err == nil {
		t.Fatal("Start on a busy address succeeded")
	}
}

// TestDeadPeerLeavesAnswers: once a dead peer is expired, the server stops
// answering its addresses.
func TestDeadPeerLeavesAnswers(t *testing.T) {
	clk := newFakeClock()
	recs := newTestRecords(t, "a", clk.Now)
	b := newTestRecords(t, "b", clk.Now)
	d, _ := b.AddAddr("web", mustAddr(t, "10.40.1.2"))
	recs.Merge(d)
	recs.AddAddr("web", mustAddr(t, "10.40.0.2"))
	_, addr := startTestServer(t, recs, nil, Deps{})
	recs.PeerDown("b")
	clk.Advance(10 * time.Second)
	recs.ExpirePeers(10 * time.Second)
	m := exchange(t, "udp", addr, query("web.weft.local.", mdns.TypeA))
	if got := answerAddrs(m); len(got) != 1 || got[0] != "10.40.0.2" {
		t.Fatalf("answers %v", got)
	}
}

func BenchmarkServeA(b *testing.B) {
	recs := newTestRecords(b, "a", nil)
	for i := 0; i < 1000; i++ {
		recs.AddAddr(fmt.Sprintf("svc%d", i), netip.AddrFrom4([4]byte{10, 40, byte(i / 250), byte(i%250 + 1)}))
	}
	for i := 0; i < 4; i++ {
		recs.AddAddr("web", netip.AddrFrom4([4]byte{10, 41, 0, byte(i + 1)}))
	}
	s := newTestServer(b, recs, nil, Deps{})
	q := query("web.weft.local.", mdns.TypeA)
	w := &discardWriter{}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if rc, _ := s.ServeDNS(ctx, w, q); rc != mdns.RcodeSuccess {
			b.Fatal(rc)
		}
	}
}

type discardWriter struct{ recorder }

func (*discardWriter) WriteMsg(*mdns.Msg) error { return nil }

// wireLen is the size of m as sent (compressed).
func wireLen(m *mdns.Msg) int {
	c := m.Copy()
	c.Compress = true
	return c.Len()
}
