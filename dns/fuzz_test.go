package dns

import (
	"context"
	"testing"

	mdns "github.com/miekg/dns"
)

// refuseAll stands in for the forwarder in the fuzz test: no network.
type refuseAll struct{}

func (refuseAll) Name() string { return "refuse" }
func (refuseAll) ServeDNS(context.Context, mdns.ResponseWriter, *mdns.Msg) (int, error) {
	return mdns.RcodeRefused, nil
}

func FuzzServeDNS(f *testing.F) {
	rev, _ := mdns.ReverseAddr("10.40.0.2")
	rev6, _ := mdns.ReverseAddr("fd00::2")
	for _, q := range []*mdns.Msg{
		query("web.weft.local.", mdns.TypeA),
		query("web.weft.local.", mdns.TypeAAAA),
		query("WEB.weft.local.", mdns.TypeANY),
		query("nope.weft.local.", mdns.TypeA),
		query("weft.local.", mdns.TypeSOA),
		query("_http._tcp.web.weft.local.", mdns.TypeSRV),
		query("_a._b._c.weft.local.", mdns.TypeSRV),
		query(rev, mdns.TypePTR),
		query(rev6, mdns.TypePTR),
		query("9.9.40.10.in-addr.arpa.", mdns.TypePTR),
		query("example.com.", mdns.TypeA),
		query("weft.local.", mdns.TypeAXFR),
	} {
		b, err := q.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		q.SetEdns0(4096, true)
		b, _ = q.Pack()
		f.Add(b, true)
	}
	f.Add([]byte{}, false)
	f.Add([]byte{0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0}, false)

	recs := zoneRecords(f)
	s := newTestServer(f, recs, nil, Deps{})
	s.zone.next = refuseAll{}
	f.Fuzz(func(t *testing.T, b []byte, tcp bool) {
		r := new(mdns.Msg)
		if err := r.Unpack(b); err != nil {
			return // the miekg server answers or drops these before us
		}
		w := &recorder{tcp: tcp}
		panics := counterValue(t, s.m.panics)
		s.ServeDNS(context.Background(), w, r)
		if counterValue(t, s.m.panics) != panics {
			t.Fatalf("handler panicked on %v", r)
		}
		if w.n > 1 {
			t.Fatalf("%d answers written", w.n)
		}
		if w.msg == nil {
			return
		}
		if w.msg.Id != r.Id || !w.msg.Response {
			t.Fatalf("bad answer header: %v", w.msg)
		}
		size := mdns.MinMsgSize
		if o := r.IsEdns0(); o != nil {
			size = int(max(min(o.UDPSize(), 1232), 512))
		}
		if wl := wireLen(w.msg); !tcp && wl > size {
			t.Fatalf("udp answer of %d bytes over %d", wl, size)
		}
	})
}
