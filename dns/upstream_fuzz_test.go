package dns

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// rawUpstream is a fake upstream resolver on 127.0.0.1 (UDP and TCP, one port) that answers
// every query with the bytes the fuzzer chose. With fix set it first unpacks them, gives them
// the query's ID, question and QR bit and packs them again, so that valid but extreme answers
// (huge TTLs, thousands of records, odd types) get past the forwarder's matching and reach its
// cache and size limits; otherwise it only patches the ID into the first two bytes, so that
// garbage reaches the decoder.
type rawUpstream struct {
	addr  string
	reply atomic.Pointer[[]byte] // a copy: the fuzzer reuses its input's memory
	fix   atomic.Bool
}

func startRawUpstream(t testing.TB) *rawUpstream {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := pc.LocalAddr().(*net.UDPAddr).Port
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	u := &rawUpstream{addr: pc.LocalAddr().String()}
	empty := []byte{}
	u.reply.Store(&empty)
	done := make(chan struct{}, 2)
	t.Cleanup(func() { pc.Close(); l.Close(); <-done; <-done })
	go func() {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if out := u.answer(buf[:n]); out != nil {
				pc.WriteTo(out, from)
			}
		}
	}()
	go func() {
		defer func() { done <- struct{}{} }()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Second))
				var n uint16
				if binary.Read(c, binary.BigEndian, &n) != nil {
					return
				}
				q := make([]byte, n)
				if _, err := io.ReadFull(c, q); err != nil {
					return
				}
				out := u.answer(q)
				if out == nil || len(out) > 65535 {
					return
				}
				c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(out))), out...))
			}()
		}
	}()
	return u
}

// answer is the reply to query q: the fuzz bytes, adjusted as u.fix says; nil sends nothing.
func (u *rawUpstream) answer(q []byte) []byte {
	b := *u.reply.Load()
	if len(q) < 2 {
		return nil
	}
	var qm, m mdns.Msg
	if u.fix.Load() && qm.Unpack(q) == nil && m.Unpack(b) == nil {
		m.Id, m.Response, m.Question = qm.Id, true, qm.Question
		if out, err := m.Pack(); err == nil {
			return out
		}
	}
	// Garbage (or what could not be fixed) goes out as it is, with the query's ID, so that
	// the forwarder's decoder sees it instead of waiting for its timeout.
	out := append([]byte(nil), b...)
	if len(out) >= 2 {
		copy(out, q[:2])
	}
	return out
}

// FuzzUpstreamAnswer puts the forwarder behind a real listener and a fake upstream that
// answers what the fuzzer chose: garbage, and valid answers with extreme contents. Whatever
// the upstream says, the server must answer the client (SERVFAIL at worst) with its own ID and
// question, within the size limits, without a panic, and its own zone must be unchanged.
func FuzzUpstreamAnswer(f *testing.F) {
	seed := func(rcode int, tc bool, rrs ...mdns.RR) []byte {
		m := new(mdns.Msg)
		m.SetQuestion("example.com.", mdns.TypeA)
		m.Response, m.Rcode, m.Truncated = true, rcode, tc
		m.Answer = rrs
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	a := func(name string, ttl uint32, ip string) mdns.RR {
		return &mdns.A{Hdr: mdns.RR_Header{Name: name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: ttl}, A: net.ParseIP(ip)}
	}
	many := make([]mdns.RR, 0, 300)
	for i := range 300 {
		many = append(many, a("example.com.", 60, fmt.Sprintf("192.0.2.%d", i%256)))
	}
	long := strings.Repeat(strings.Repeat("x", 63)+".", 3) + "example.com."
	soa := &mdns.SOA{Hdr: mdns.RR_Header{Name: "com.", Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: 1<<32 - 1},
		Ns: "ns.com.", Mbox: "h.com.", Minttl: 1<<32 - 1}
	neg := new(mdns.Msg)
	neg.SetQuestion("example.com.", mdns.TypeA)
	neg.Response, neg.Rcode, neg.Ns = true, mdns.RcodeNameError, []mdns.RR{soa}
	negb, _ := neg.Pack()
	for _, s := range [][]byte{
		seed(mdns.RcodeSuccess, false, a("example.com.", 60, "192.0.2.1")),
		seed(mdns.RcodeSuccess, false, a("example.com.", 0, "192.0.2.1")),
		seed(mdns.RcodeSuccess, false, a("example.com.", 1<<32-1, "192.0.2.1")),
		seed(mdns.RcodeSuccess, false, a(long, 60, "0.0.0.0"), a("example.com.", 60, "255.255.255.255")),
		seed(mdns.RcodeSuccess, false, many...),
		seed(mdns.RcodeSuccess, true),
		seed(mdns.RcodeServerFailure, false),
		seed(mdns.RcodeRefused, false),
		seed(mdns.RcodeNameError, false),
		seed(15, false),
		negb,
		{},
		{0, 0},
		{0, 0, 0x80, 0, 0, 1, 0, 0xff, 0, 0, 0, 0},
	} {
		f.Add(s, true)
		f.Add(s, false)
	}

	up := startRawUpstream(f)
	reg := prometheus.NewRegistry()
	recs, err := NewRecords("p1", nil)
	if err != nil {
		f.Fatal(err)
	}
	if _, err := recs.AddAddr("web", netip.MustParseAddr("10.40.0.2")); err != nil {
		f.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Upstreams = []string{up.addr}
	cfg.ForwardTimeout = 100 * time.Millisecond // short: an answer the upstream never completes costs one timeout
	cfg.Networks = []NetworkRange{{"default", netip.MustParsePrefix("10.40.0.0/16")}}
	s, err := NewServer(cfg, recs, Deps{Registry: reg})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	ln, err := s.AddListener("127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	server := ln.String()
	client := &mdns.Client{Net: "udp", Timeout: 3 * time.Second, UDPSize: 4096}
	var seq atomic.Int64

	f.Fuzz(func(t *testing.T, reply []byte, fix bool) {
		reply = append([]byte(nil), reply...)
		up.reply.Store(&reply)
		up.fix.Store(fix)
		panics := gatherCounter(t, reg, "weft_dns_panics_total")
		// A fresh name each time: the forwarder's cache must not answer for the upstream.
		name := fmt.Sprintf("q%d.example.com.", seq.Add(1))
		for _, edns := range []bool{false, true} {
			q := new(mdns.Msg)
			q.SetQuestion(name, mdns.TypeA)
			limit := mdns.MinMsgSize
			if edns {
				q.SetEdns0(4096, false)
				limit = int(cfg.UDPSize)
			}
			resp, _, err := client.Exchange(q, server)
			if err != nil {
				t.Fatalf("no answer from the server (edns %v) when the upstream says %x: %v", edns, reply, err)
			}
			if resp.Id != q.Id || !resp.Response || len(resp.Question) != 1 || resp.Question[0] != q.Question[0] {
				t.Fatalf("answer does not match the question %v: %v", q.Question, resp)
			}
			if wl := resp.Len(); wl > limit {
				t.Fatalf("udp answer of %d bytes over %d (edns %v)", wl, limit, edns)
			}
		}
		if got := gatherCounter(t, reg, "weft_dns_panics_total"); got != panics {
			t.Fatalf("handler panicked when the upstream said %x", reply)
		}
		// The zone is the server's own: no upstream answer can change it.
		q := new(mdns.Msg)
		q.SetQuestion("web.weft.local.", mdns.TypeA)
		resp, _, err := client.Exchange(q, server)
		if err != nil || resp.Rcode != mdns.RcodeSuccess || len(resp.Answer) != 1 {
			t.Fatalf("zone answer changed after upstream said %x: %v %v", reply, resp, err)
		}
		if got, ok := resp.Answer[0].(*mdns.A); !ok || !got.A.Equal(net.ParseIP("10.40.0.2")) {
			t.Fatalf("web.weft.local. now answers %v", resp.Answer[0])
		}
	})
}

// gatherCounter sums the counter called name in reg (0 when it has not been created yet).
func gatherCounter(t testing.TB, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}
