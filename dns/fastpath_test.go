package dns

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// byteWriter is a UDP mdns.ResponseWriter that keeps the bytes written, as
// udpWriter would send them.
type byteWriter struct {
	recorder
	out  [][]byte
	from netip.Addr // the query's source; invalid: the recorder's
}

func (w *byteWriter) RemoteAddr() net.Addr {
	if w.from.IsValid() {
		return net.UDPAddrFromAddrPort(netip.AddrPortFrom(w.from, 40000))
	}
	return w.recorder.RemoteAddr()
}

func (w *byteWriter) WriteMsg(m *mdns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	w.out = append(w.out, b)
	return nil
}

// fastRecords: zoneRecords plus a name with four addresses on two peers
// and one with IPv4 and IPv6 addresses on three peers.
func fastRecords(t testing.TB) *Records {
	t.Helper()
	recs := zoneRecords(t)
	c := newTestRecords(t, "c", nil)
	for i := range 4 {
		recs.AddAddr("many", netip.AddrFrom4([4]byte{10, 40, 2, byte(i + 1)}))
		d, _ := c.AddAddr("many", netip.AddrFrom4([4]byte{10, 40, 3, byte(i + 1)}))
		recs.Merge(d)
	}
	recs.AddAddr("mixed-1_x", mustAddr(t, "10.40.4.1"))
	recs.AddAddr("mixed-1_x", mustAddr(t, "fd00::41"))
	d, _ := c.AddAddr("mixed-1_x", mustAddr(t, "fd00::42"))
	recs.Merge(d)
	// One name on two networks (see fastNetworks).
	recs.AddAddr("multi", mustAddr(t, "10.40.5.1"))
	recs.AddAddr("multi", mustAddr(t, "10.50.5.1"))
	d, _ = c.AddAddr("multi", mustAddr(t, "10.50.5.2"))
	recs.Merge(d)
	return recs
}

// fastNetworks are the networks of the fuzzed server: those of newTestServer and media.
func fastNetworks(c *Config) {
	c.Networks = append(c.Networks, NetworkRange{"media", netip.MustParsePrefix("10.50.0.0/16")})
}

// fastSources are the askers the fuzzer picks from: none, one per network, one in none.
var fastSources = []netip.Addr{{}, netip.MustParseAddr("10.40.9.9"), netip.MustParseAddr("10.50.9.9"),
	netip.MustParseAddr("fd00::9"), netip.MustParseAddr("192.0.2.1")}

// compareFastPath runs b through the fast path and, when it answers,
// through the full path (as a UDP query), with the round-robin counter at
// the same value, and fails unless both answers are the same bytes. It
// reports whether the fast path answered.
func compareFastPath(t testing.TB, s *Server, c *answerCache, b []byte) bool {
	t.Helper()
	return compareFastPathFrom(t, s, c, b, netip.Addr{})
}

// compareFastPathFrom is compareFastPath for a query from the address from
// (invalid: the recorder's, 127.0.0.2).
func compareFastPathFrom(t testing.TB, s *Server, c *answerCache, b []byte, from netip.Addr) bool {
	t.Helper()
	w := &byteWriter{from: from}
	rr := s.zone.rr.Load()
	fast, qtype, rcode, ok := s.zone.fastAnswer(c, b, nil, make([]byte, 0, 256), remoteAddr(w))
	if !ok {
		return false
	}
	s.zone.rr.Store(rr)
	s.serveSlow(b, w)
	if len(w.out) != 1 {
		t.Fatalf("full path wrote %d answers to %x, fast path answered", len(w.out), b)
	}
	if !bytes.Equal(fast, w.out[0]) {
		fm, sm := new(mdns.Msg), new(mdns.Msg)
		fe, se := fm.Unpack(fast), sm.Unpack(w.out[0])
		t.Fatalf("query %x:\nfast path (%v):\n%v\n%x\nfull path (%v):\n%v\n%x", b, fe, fm, fast, se, sm, w.out[0])
	}
	m := new(mdns.Msg)
	if err := m.Unpack(fast); err != nil || m.Rcode != rcode || m.Question[0].Qtype != qtype {
		t.Fatalf("fast answer %v (%v): rcode %d qtype %d", m, err, rcode, qtype)
	}
	return true
}

// fastSeeds are queries for the fast path (and some it must decline).
func fastSeeds(t testing.TB) [][]byte {
	var out [][]byte
	add := func(m *mdns.Msg) {
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	for _, name := range []string{"web.weft.local.", "WeB.WEFT.local.", "many.weft.local.", "mixed-1_x.weft.local.",
		"db.weft.local.", "v6only.weft.local.", "srvonly.weft.local.", "nope.weft.local.", "a.b.weft.local.",
		"weft.local.", "_http._tcp.web.weft.local.", "web.weft.local.example.", "x.y.z.example.com.",
		"w\\.eb.weft.local.", "web\\032.weft.local.", "multi.weft.local.", "multi.media.weft.local.",
		"many.default.weft.local.", "media.weft.local.", "mixed-1_x.six.weft.local.", "nope.media.weft.local.",
		"web.nosuch.weft.local."} {
		for _, qt := range []uint16{mdns.TypeA, mdns.TypeAAAA, mdns.TypeANY, mdns.TypeMX} {
			q := query(name, qt)
			add(q)
			q.RecursionDesired, q.CheckingDisabled, q.AuthenticatedData, q.Zero = false, true, true, true
			add(q)
			q = query(name, qt)
			q.SetEdns0(4096, true)
			add(q)
			q = query(name, qt)
			q.SetEdns0(100, false)
			add(q)
		}
	}
	q := query("web.weft.local.", mdns.TypeA)
	q.SetEdns0(4096, false)
	q.IsEdns0().Option = append(q.IsEdns0().Option, &mdns.EDNS0_COOKIE{Code: mdns.EDNS0COOKIE, Cookie: "0102030405060708"})
	add(q)
	q = query("web.weft.local.", mdns.TypeA)
	q.SetEdns0(4096, false)
	q.IsEdns0().SetVersion(1)
	add(q)
	q = query("web.weft.local.", mdns.TypeA)
	q.Question[0].Qclass = mdns.ClassCHAOS
	add(q)
	q = query("web.weft.local.", mdns.TypeA)
	q.Compress = true
	q.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: "web.weft.local.", Rrtype: mdns.TypeA, Class: mdns.ClassINET}, A: net.IPv4(1, 2, 3, 4)}}
	add(q)
	b, _ := query("web.weft.local.", mdns.TypeA).Pack()
	out = append(out, append(b, 0))                                                 // trailing byte
	out = append(out, append([]byte(nil), b[:len(b)-1]...))                         // cut short
	out = append(out, append(append([]byte(nil), b[:12]...), 0xc0, 12, 0, 1, 0, 1)) // pointer
	out = append(out, []byte{1, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1})    // the root
	return out
}

func FuzzFastPath(f *testing.F) {
	for _, b := range fastSeeds(f) {
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Add([]byte{}, false)
	f.Add(make([]byte, 12), false)
	s := newTestServer(f, fastRecords(f), fastNetworks, Deps{})
	s.zone.next = refuseAll{}
	near := NearestFunc(func(peer string) (time.Duration, bool) {
		switch peer {
		case "a":
			return 0, true
		case "c":
			return time.Millisecond, true
		}
		return 0, false
	})
	c := newAnswerCache()
	var mu sync.Mutex // the cache is one goroutine's; fuzz workers are processes
	f.Fuzz(func(t *testing.T, b []byte, nearest bool) {
		mu.Lock()
		defer mu.Unlock()
		if nearest {
			s.SetNearest(near)
			defer s.SetNearest(nil)
		}
		if compareFastPathFrom(t, s, c, b, fastSources[len(b)%len(fastSources)]) {
			return
		}
		// The full path, as the UDP reader runs it: never a panic, at
		// most one answer, none to an answer or a runt.
		panics := counterValue(t, s.m.panics)
		w := &byteWriter{}
		s.serveSlow(b, w)
		if counterValue(t, s.m.panics) != panics {
			t.Fatalf("full path panicked on %x", b)
		}
		if len(w.out) > 1 || len(w.out) == 1 && (len(b) < dnsHeaderLen || b[2]&0x80 != 0) {
			t.Fatalf("%d answers to %x", len(w.out), b)
		}
		if len(w.out) == 1 {
			m := new(mdns.Msg)
			if err := m.Unpack(w.out[0]); err != nil || !m.Response || m.Id != uint16(b[0])<<8|uint16(b[1]) {
				t.Fatalf("answer %v (%v) to %x", m, err, b)
			}
		}
	})
}

// TestFastPathTakesCommonQueries: A and AAAA for weft names, positive or
// negative, with or without EDNS0, take the fast path; the rest does not.
func TestFastPathTakesCommonQueries(t *testing.T) {
	s := newTestServer(t, fastRecords(t), nil, Deps{})
	c := newAnswerCache()
	e := func(m *mdns.Msg, size uint16, do bool) *mdns.Msg { m.SetEdns0(size, do); return m }
	for _, tc := range []struct {
		q    *mdns.Msg
		fast bool
	}{
		{query("web.weft.local.", mdns.TypeA), true},
		{query("WEB.Weft.Local.", mdns.TypeAAAA), true},
		{query("many.weft.local.", mdns.TypeA), true},
		{e(query("many.weft.local.", mdns.TypeA), 1232, true), true},
		{query("nope.weft.local.", mdns.TypeA), true},    // NXDOMAIN
		{query("srvonly.weft.local.", mdns.TypeA), true}, // NOERROR, no data
		{query("db.weft.local.", mdns.TypeAAAA), true},   // NOERROR, no data
		{query("web.weft.local.", mdns.TypeANY), false},  // other types: full path
		{query("web.weft.local.", mdns.TypeTXT), false},  //
		{query("weft.local.", mdns.TypeA), false},        // the apex
		{query("_x._tcp.web.weft.local.", mdns.TypeA), false},
		{query("example.com.", mdns.TypeA), false}, // forwarded
		{query("2.0.40.10.in-addr.arpa.", mdns.TypePTR), false},
	} {
		b, _ := tc.q.Pack()
		if got := compareFastPath(t, s, c, b); got != tc.fast {
			t.Errorf("%v: fast path %v, want %v", tc.q.Question[0], got, tc.fast)
		}
	}
	// Too big for 512 bytes: the full path compresses and truncates. (The
	// fast path never compresses: it declines what does not fit without.)
	big := newTestServer(t, manyAddrs(t, 30), nil, Deps{})
	b, _ := query("big.weft.local.", mdns.TypeA).Pack()
	if compareFastPath(t, big, newAnswerCache(), b) {
		t.Error("fast path answered what needs truncation")
	}
	b, _ = e(query("big.weft.local.", mdns.TypeA), 4096, false).Pack()
	if !compareFastPath(t, big, newAnswerCache(), b) {
		t.Error("fast path declined 30 addresses with EDNS0 4096")
	}
}

func TestFastPathSeeds(t *testing.T) {
	s := newTestServer(t, fastRecords(t), fastNetworks, Deps{})
	s.zone.next = refuseAll{}
	c := newAnswerCache()
	s.SetNearest(func(peer string) (time.Duration, bool) { return time.Duration(len(peer)), peer != "b" })
	for _, b := range fastSeeds(t) {
		for i := range 3 * len(fastSources) { // rotations, askers
			compareFastPathFrom(t, s, c, b, fastSources[i%len(fastSources)])
		}
	}
}

// TestFastPathFollowsRecords: the answer cache follows every change.
func TestFastPathFollowsRecords(t *testing.T) {
	recs := fastRecords(t)
	s := newTestServer(t, recs, nil, Deps{})
	c := newAnswerCache()
	ask := func(name string) *mdns.Msg {
		t.Helper()
		b, _ := query(name, mdns.TypeA).Pack()
		out, _, _, ok := s.zone.fastAnswer(c, b, nil, nil, netip.Addr{})
		if !ok {
			t.Fatalf("%s: not on the fast path", name)
		}
		m := new(mdns.Msg)
		if err := m.Unpack(out); err != nil {
			t.Fatal(err)
		}
		return m
	}
	if m := ask("db.weft.local."); len(m.Answer) != 1 {
		t.Fatalf("db: %v", m)
	}
	recs.RemoveName("db")
	if m := ask("db.weft.local."); m.Rcode != mdns.RcodeNameError || m.Ns[0].(*mdns.SOA).Serial != uint32(recs.Generation()) {
		t.Fatalf("db after removal: %v", m)
	}
	recs.AddAddr("new", mustAddr(t, "10.40.9.1"))
	if m := ask("new.weft.local."); len(m.Answer) != 1 || m.Answer[0].(*mdns.A).A.String() != "10.40.9.1" {
		t.Fatalf("new: %v", m)
	}
}

// TestUDPFastPathOverTheWire: rotation, the DO bit and metrics on real
// sockets.
func TestUDPFastPathOverTheWire(t *testing.T) {
	s, addr := startTestServer(t, fastRecords(t), nil, Deps{})
	before := counterValue(t, s.m.queries.WithLabelValues("A", "NOERROR"))
	seen := map[string]bool{}
	for range 8 {
		m := exchange(t, "udp", addr, query("many.weft.local.", mdns.TypeA))
		if len(m.Answer) != 8 || !m.Authoritative || !m.RecursionAvailable {
			t.Fatalf("many: %v", m)
		}
		seen[m.Answer[0].(*mdns.A).A.String()] = true
	}
	if len(seen) < 2 {
		t.Fatalf("no rotation: first answers %v", seen)
	}
	q := query("web.weft.local.", mdns.TypeAAAA)
	q.SetEdns0(1400, true)
	m := exchange(t, "udp", addr, q)
	if len(m.Answer) != 1 || m.IsEdns0() == nil || !m.IsEdns0().Do() || m.IsEdns0().UDPSize() != 1232 {
		t.Fatalf("AAAA with EDNS0: %v", m)
	}
	if v := counterValue(t, s.m.queries.WithLabelValues("A", "NOERROR")); v != before+8 {
		t.Fatalf("A NOERROR counted %v, want %v", v, before+8)
	}
	if v := counterValue(t, s.m.queries.WithLabelValues("AAAA", "NOERROR")); v != 1 {
		t.Fatalf("AAAA NOERROR counted %v", v)
	}
}

// TestUDPWildcardAnswersFromQueriedAddress: on a socket bound to 0.0.0.0,
// an answer leaves from the address the query was sent to (a client with a
// connected socket drops it otherwise), on the fast and the full path.
func TestUDPWildcardAnswersFromQueriedAddress(t *testing.T) {
	_, addr := startTestServer(t, zoneRecords(t), func(c *Config) { c.Listen = []string{"0.0.0.0:0"} }, Deps{})
	_, port, _ := net.SplitHostPort(addr)
	to := net.JoinHostPort("127.0.0.2", port)
	if m := exchange(t, "udp", to, query("web.weft.local.", mdns.TypeA)); len(m.Answer) != 2 {
		t.Fatalf("fast path: %v", m)
	}
	if m := exchange(t, "udp", to, query("_http._tcp.web.weft.local.", mdns.TypeSRV)); len(m.Answer) != 1 {
		t.Fatalf("full path: %v", m)
	}
}

func TestTypeLabels(t *testing.T) {
	for q := range uint16(300) {
		want, ok := mdns.TypeToString[q]
		switch q {
		case mdns.TypeA, mdns.TypeAAAA, mdns.TypePTR, mdns.TypeSRV, mdns.TypeSOA, mdns.TypeNS,
			mdns.TypeCNAME, mdns.TypeMX, mdns.TypeTXT, mdns.TypeANY, mdns.TypeHTTPS, mdns.TypeSVCB,
			mdns.TypeDS, mdns.TypeDNSKEY, mdns.TypeCAA:
		default:
			want, ok = "other", true
		}
		if got := typeLabels[typeIndex(q)]; !ok || got != want {
			t.Fatalf("type label of %d = %q, want %q", q, got, want)
		}
	}
}

// BenchmarkFastPathA is the fast path of one A query for a name with four
// addresses (rotated), without sockets: compare BenchmarkServeA.
func BenchmarkFastPathA(b *testing.B) {
	recs := newTestRecords(b, "a", nil)
	for i := range 1000 {
		recs.AddAddr(fmt.Sprintf("svc%d", i), netip.AddrFrom4([4]byte{10, 40, byte(i / 250), byte(i%250 + 1)}))
	}
	for i := range 4 {
		recs.AddAddr("web", netip.AddrFrom4([4]byte{10, 41, 0, byte(i + 1)}))
	}
	s := newTestServer(b, recs, nil, Deps{})
	q, _ := query("web.weft.local.", mdns.TypeA).Pack()
	c, out, scratch := newAnswerCache(), make([]byte, 0, 512), make([]byte, 0, 256)
	from := mustAddr(b, "127.0.0.2") // in no network: the order of before networks
	b.ReportAllocs()
	for b.Loop() {
		if _, _, rc, ok := s.zone.fastAnswer(c, q, out, scratch, from); !ok || rc != mdns.RcodeSuccess {
			b.Fatal(rc, ok)
		}
		s.m.query(typeIndex(mdns.TypeA), mdns.RcodeSuccess).Inc()
	}
}

// BenchmarkUDPLoopback: A queries over loopback UDP, 4 client sockets with
// 16 queries outstanding each (dnsperf-like); ns/op is per answer.
func BenchmarkUDPLoopback(b *testing.B) {
	for _, name := range []string{"web", "_http._tcp.web"} { // fast path, full path
		b.Run(name, func(b *testing.B) {
			_, addr := startTestServer(b, zoneRecords(b), nil, Deps{})
			qtype := mdns.TypeA
			if name[0] == '_' {
				qtype = mdns.TypeSRV
			}
			q, _ := query(name+".weft.local.", qtype).Pack()
			const clients, window = 4, 16
			per := b.N/clients + 1
			b.ResetTimer()
			var wg sync.WaitGroup
			for range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					conn, err := net.Dial("udp", addr)
					if err != nil {
						b.Error(err)
						return
					}
					defer conn.Close()
					buf := make([]byte, 1500)
					sent, got := 0, 0
					for got < per {
						for sent < per && sent-got < window {
							if _, err := conn.Write(q); err != nil {
								b.Error(err)
								return
							}
							sent++
						}
						conn.SetReadDeadline(time.Now().Add(time.Second))
						if _, err := conn.Read(buf); err != nil {
							sent = got // lost: send again
							continue
						}
						got++
					}
				}()
			}
			wg.Wait()
		})
	}
}

// BenchmarkFastPathANetworks is BenchmarkFastPathA with three networks and the
// name on two of them, asked from one: the asker's network first.
func BenchmarkFastPathANetworks(b *testing.B) {
	recs := newTestRecords(b, "a", nil)
	for i := range 1000 {
		recs.AddAddr(fmt.Sprintf("svc%d", i), netip.AddrFrom4([4]byte{10, 40, byte(i / 250), byte(i%250 + 1)}))
	}
	for i := range 4 {
		recs.AddAddr("web", netip.AddrFrom4([4]byte{10, byte(40 + 10*(i%2)), 0, byte(i + 1)}))
	}
	s := newTestServer(b, recs, func(c *Config) {
		c.Networks = []NetworkRange{{"default", netip.MustParsePrefix("10.40.0.0/16")},
			{"media", netip.MustParsePrefix("10.50.0.0/16")}, {"control", netip.MustParsePrefix("10.60.0.0/16")}}
	}, Deps{})
	q, _ := query("web.weft.local.", mdns.TypeA).Pack()
	c, out, scratch := newAnswerCache(), make([]byte, 0, 512), make([]byte, 0, 256)
	from := mustAddr(b, "10.50.3.3")
	b.ReportAllocs()
	for b.Loop() {
		if _, _, rc, ok := s.zone.fastAnswer(c, q, out, scratch, from); !ok || rc != mdns.RcodeSuccess {
			b.Fatal(rc, ok)
		}
		s.m.query(typeIndex(mdns.TypeA), mdns.RcodeSuccess).Inc()
	}
}
