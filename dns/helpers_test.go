package dns

import (
	"context"
	"errors"
	"github.com/weftnet/weft/datapath/nslab"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// fakeClock is an injectable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// recorder is a mdns.ResponseWriter that keeps the message written.
type recorder struct {
	tcp bool
	msg *mdns.Msg
	n   int // messages written
}

func (r *recorder) LocalAddr() net.Addr {
	if r.tcp {
		return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
	}
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 53}
}

func (r *recorder) RemoteAddr() net.Addr {
	if r.tcp {
		return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 40000}
	}
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 40000}
}

func (r *recorder) WriteMsg(m *mdns.Msg) error {
	// Pack like the wire would, so that an unpackable answer fails here.
	b, err := m.Pack()
	if err != nil {
		return err
	}
	r.msg = new(mdns.Msg)
	r.n++
	return r.msg.Unpack(b)
}
func (r *recorder) Write(b []byte) (int, error) { r.n++; return len(b), nil }
func (r *recorder) Close() error                { return nil }
func (r *recorder) TsigStatus() error           { return nil }
func (r *recorder) TsigTimersOnly(bool)         {}
func (r *recorder) Hijack()                     {}

func mustAddr(t testing.TB, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func newTestRecords(t testing.TB, self string, now func() time.Time) *Records {
	t.Helper()
	r, err := NewRecords(self, now)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// fakeUpstream is a local DNS server on 127.0.0.1 (UDP and TCP, one port)
// with a handler chosen by the test; it counts the queries it gets.
type fakeUpstream struct {
	addr    string
	queries atomic.Int64
}

func startUpstream(t testing.TB, h func(w mdns.ResponseWriter, r *mdns.Msg)) *fakeUpstream {
	t.Helper()
	pcs, l, err := listenBoth("127.0.0.1:0", 1)
	if err != nil {
		t.Fatal(err)
	}
	pc := pcs[0]
	u := &fakeUpstream{addr: pc.LocalAddr().String()}
	handler := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		u.queries.Add(1)
		h(w, r)
	})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // cleanups run last-in first-out: after the shutdowns below
	for _, srv := range []*mdns.Server{{PacketConn: pc, Handler: handler}, {Listener: l, Handler: handler}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = srv.ActivateAndServe()
		}()
		<-started
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.ShutdownContext(ctx)
		})
	}
	return u
}

// staticUpstream answers every A query with addr and TTL ttl, and every
// other type with NXDOMAIN and a SOA of minimum negTTL.
func staticUpstream(addr string, ttl, negTTL uint32) func(w mdns.ResponseWriter, r *mdns.Msg) {
	return func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		if q.Qtype == mdns.TypeA {
			m.Answer = []mdns.RR{&mdns.A{Hdr: mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: ttl}, A: net.ParseIP(addr)}}
		} else {
			m.Rcode = mdns.RcodeNameError
			m.Ns = []mdns.RR{&mdns.SOA{Hdr: mdns.RR_Header{Name: "example.", Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: 3600},
				Ns: "ns.example.", Mbox: "h.example.", Minttl: negTTL}}
		}
		_ = w.WriteMsg(m)
	}
}

// waitFor polls cond until it holds or the deadline passes, with weft's one poll loop.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	nslab.EventuallyEvery(t, d, 5*time.Millisecond, what, func() error {
		if !cond() {
			return errors.New("not yet")
		}
		return nil
	})
}

func query(name string, qtype uint16) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	return m
}
