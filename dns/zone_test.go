package dns

import (
	"context"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// newTestServer builds an unstarted server over records with an upstream
// that must not be used unless the test says so.
func newTestServer(t testing.TB, recs *Records, edit func(*Config), deps Deps) *Server {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Upstreams = []string{"127.0.0.1:1"} // nothing listens there
	cfg.ForwardTimeout = 500 * time.Millisecond
	cfg.Networks = []NetworkRange{{"default", netip.MustParsePrefix("10.40.0.0/16")}, {"six", netip.MustParsePrefix("fd00::/64")}}
	if edit != nil {
		edit(&cfg)
	}
	s, err := NewServer(cfg, recs, deps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// zoneRecords: web on two peers (v4 and v6), db on one, an SRV for web.
func zoneRecords(t testing.TB) *Records {
	t.Helper()
	a := newTestRecords(t, "a", nil)
	b := newTestRecords(t, "b", nil)
	a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	a.AddAddr("web", mustAddr(t, "fd00::2"))
	d, _ := b.AddAddr("web", mustAddr(t, "10.40.1.2"))
	a.Merge(d)
	a.AddAddr("db", mustAddr(t, "10.40.0.3"))
	a.AddAddr("v6only", mustAddr(t, "fd00::7"))
	a.AddSRV("web", "http", "tcp", 8080)
	a.AddSRV("srvonly", "x", "udp", 9)
	return a
}

func rrStrings(rrs []mdns.RR) []string {
	var out []string
	for _, rr := range rrs {
		switch v := rr.(type) {
		case *mdns.A:
			out = append(out, "A "+v.A.String())
		case *mdns.AAAA:
			out = append(out, "AAAA "+v.AAAA.String())
		case *mdns.PTR:
			out = append(out, "PTR "+v.Ptr)
		case *mdns.SRV:
			out = append(out, "SRV "+v.Target+" "+strconv.Itoa(int(v.Port)))
		case *mdns.SOA:
			out = append(out, "SOA "+v.Hdr.Name)
		case *mdns.OPT:
		default:
			out = append(out, rr.String())
		}
	}
	slices.Sort(out)
	return out
}

func TestZoneAnswers(t *testing.T) {
	recs := zoneRecords(t)
	s := newTestServer(t, recs, nil, Deps{})
	rev4, _ := mdns.ReverseAddr("10.40.0.2")
	rev6, _ := mdns.ReverseAddr("fd00::2")
	unknownRev, _ := mdns.ReverseAddr("10.40.9.9")
	tests := []struct {
		name   string
		q      *mdns.Msg
		rcode  int
		answer []string
		ns     []string
		extra  []string
		aa     bool
	}{
		{"A two peers", query("web.weft.local.", mdns.TypeA), mdns.RcodeSuccess, []string{"A 10.40.0.2", "A 10.40.1.2"}, nil, nil, true},
		{"A case-insensitive", query("WeB.WEFT.Local.", mdns.TypeA), mdns.RcodeSuccess, []string{"A 10.40.0.2", "A 10.40.1.2"}, nil, nil, true},
		{"AAAA", query("web.weft.local.", mdns.TypeAAAA), mdns.RcodeSuccess, []string{"AAAA fd00::2"}, nil, nil, true},
		{"ANY", query("web.weft.local.", mdns.TypeANY), mdns.RcodeSuccess, []string{"A 10.40.0.2", "A 10.40.1.2", "AAAA fd00::2"}, nil, nil, true},
		{"A of v6-only name is no data", query("v6only.weft.local.", mdns.TypeA), mdns.RcodeSuccess, nil, []string{"SOA weft.local."}, nil, true},
		{"MX of known name is no data", query("db.weft.local.", mdns.TypeMX), mdns.RcodeSuccess, nil, []string{"SOA weft.local."}, nil, true},
		{"A of srv-only name is no data", query("srvonly.weft.local.", mdns.TypeA), mdns.RcodeSuccess, nil, []string{"SOA weft.local."}, nil, true},
		{"unknown name NXDOMAIN", query("nope.weft.local.", mdns.TypeA), mdns.RcodeNameError, nil, []string{"SOA weft.local."}, nil, true},
		{"subdomain of a name NXDOMAIN", query("x.web.weft.local.", mdns.TypeA), mdns.RcodeNameError, nil, []string{"SOA weft.local."}, nil, true},
		{"apex SOA", query("weft.local.", mdns.TypeSOA), mdns.RcodeSuccess, []string{"SOA weft.local."}, nil, nil, true},
		{"apex A no data", query("weft.local.", mdns.TypeA), mdns.RcodeSuccess, nil, []string{"SOA weft.local."}, nil, true},
		{"SRV", query("_http._tcp.web.weft.local.", mdns.TypeSRV), mdns.RcodeSuccess, []string{"SRV web.weft.local. 8080"}, nil, []string{"A 10.40.0.2", "A 10.40.1.2", "AAAA fd00::2"}, true},
		{"SRV case-insensitive", query("_HTTP._TCP.Web.weft.local.", mdns.TypeSRV), mdns.RcodeSuccess, []string{"SRV web.weft.local. 8080"}, nil, []string{"A 10.40.0.2", "A 10.40.1.2", "AAAA fd00::2"}, true},
		{"SRV wrong proto NXDOMAIN", query("_http._udp.web.weft.local.", mdns.TypeSRV), mdns.RcodeNameError, nil, []string{"SOA weft.local."}, nil, true},
		{"SRV name, A type no data", query("_http._tcp.web.weft.local.", mdns.TypeA), mdns.RcodeSuccess, nil, []string{"SOA weft.local."}, nil, true},
		{"SRV malformed NXDOMAIN", query("_http.web.weft.local.", mdns.TypeSRV), mdns.RcodeNameError, nil, []string{"SOA weft.local."}, nil, true},
		{"PTR v4", query(rev4, mdns.TypePTR), mdns.RcodeSuccess, []string{"PTR web.weft.local."}, nil, nil, true},
		{"PTR v6", query(rev6, mdns.TypePTR), mdns.RcodeSuccess, []string{"PTR web.weft.local."}, nil, nil, true},
		{"PTR v4 upper case", query(strings.ToUpper(rev4), mdns.TypePTR), mdns.RcodeSuccess, []string{"PTR web.weft.local."}, nil, nil, true},
		{"reverse of weft addr, TXT no data", query(rev4, mdns.TypeTXT), mdns.RcodeSuccess, nil, []string{"SOA weft.local."}, nil, true},
		{"PTR unknown in weft network NXDOMAIN", query(unknownRev, mdns.TypePTR), mdns.RcodeNameError, nil, []string{"SOA 40.10.in-addr.arpa."}, nil, true},
		{"zone transfer refused", query("weft.local.", mdns.TypeAXFR), mdns.RcodeRefused, nil, nil, nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := &recorder{}
			rc, _ := s.ServeDNS(context.Background(), w, tc.q)
			if w.msg == nil {
				t.Fatal("no answer written")
			}
			m := w.msg
			if rc != tc.rcode || m.Rcode != tc.rcode {
				t.Fatalf("rcode = %d/%s, want %s", rc, mdns.RcodeToString[m.Rcode], mdns.RcodeToString[tc.rcode])
			}
			if m.Id != tc.q.Id || !m.Response || m.Authoritative != tc.aa {
				t.Fatalf("header: id %d/%d qr %v aa %v", m.Id, tc.q.Id, m.Response, m.Authoritative)
			}
			if got := rrStrings(m.Answer); !slices.Equal(got, tc.answer) {
				t.Errorf("answer = %v, want %v", got, tc.answer)
			}
			if got := rrStrings(m.Ns); !slices.Equal(got, tc.ns) {
				t.Errorf("authority = %v, want %v", got, tc.ns)
			}
			if got := rrStrings(m.Extra); !slices.Equal(got, tc.extra) {
				t.Errorf("additional = %v, want %v", got, tc.extra)
			}
			for _, rr := range append(m.Answer, m.Ns...) {
				if rr.Header().Ttl != 30 {
					t.Errorf("ttl %d, want the default 30: %v", rr.Header().Ttl, rr)
				}
			}
			if len(m.Ns) == 1 {
				if soa := m.Ns[0].(*mdns.SOA); soa.Minttl != 30 {
					t.Errorf("negative ttl %d", soa.Minttl)
				}
			}
		})
	}
}

func TestZoneMalformed(t *testing.T) {
	s := newTestServer(t, zoneRecords(t), nil, Deps{})
	twoQ := query("web.weft.local.", mdns.TypeA)
	twoQ.Question = append(twoQ.Question, twoQ.Question[0])
	noQ := query("web.weft.local.", mdns.TypeA)
	noQ.Question = nil
	notify := query("web.weft.local.", mdns.TypeA)
	notify.Opcode = mdns.OpcodeUpdate
	chaos := query("version.bind.", mdns.TypeTXT)
	chaos.Question[0].Qclass = mdns.ClassCHAOS
	badVers := query("web.weft.local.", mdns.TypeA)
	badVers.SetEdns0(1232, false)
	badVers.IsEdns0().SetVersion(1)
	optQ := query("web.weft.local.", mdns.TypeOPT)
	relName := query("web.weft.local.", mdns.TypeA)
	relName.Question[0].Name = "web"

	tests := []struct {
		name  string
		q     *mdns.Msg
		rcode int
	}{
		{"two questions", twoQ, mdns.RcodeFormatError},
		{"no question", noQ, mdns.RcodeFormatError},
		{"update opcode", notify, mdns.RcodeNotImplemented},
		{"chaos class", chaos, mdns.RcodeRefused},
		{"edns version 1", badVers, mdns.RcodeBadVers},
		{"qtype OPT", optQ, mdns.RcodeFormatError},
		{"not fully qualified", relName, mdns.RcodeFormatError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := &recorder{}
			s.ServeDNS(context.Background(), w, tc.q)
			if w.msg == nil || w.msg.Rcode != tc.rcode {
				t.Fatalf("answer %v, want rcode %s", w.msg, mdns.RcodeToString[tc.rcode])
			}
		})
	}
	// Answers (QR set) and nil messages are dropped.
	resp := query("web.weft.local.", mdns.TypeA)
	resp.Response = true
	for _, q := range []*mdns.Msg{resp, nil} {
		w := &recorder{}
		s.ServeDNS(context.Background(), w, q)
		if w.n != 0 {
			t.Fatalf("dropped query got an answer: %v", w.msg)
		}
	}
}

func answerAddrs(m *mdns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		if a, ok := rr.(*mdns.A); ok {
			out = append(out, a.A.String())
		}
	}
	return out
}

func TestRoundRobinAndNearest(t *testing.T) {
	recs := newTestRecords(t, "a", nil)
	peers := map[string]*Records{"a": recs}
	for _, p := range []string{"b", "c"} {
		peers[p] = newTestRecords(t, p, nil)
	}
	addrs := map[string][]string{"a": {"10.40.0.1", "10.40.0.2"}, "b": {"10.40.1.1"}, "c": {"10.40.2.1"}}
	for p, as := range addrs {
		for _, a := range as {
			d, _ := peers[p].AddAddr("svc", mustAddr(t, a))
			recs.Merge(d)
		}
	}
	s := newTestServer(t, recs, nil, Deps{})
	firsts := map[string]bool{}
	for i := 0; i < 4; i++ {
		w := &recorder{}
		s.ServeDNS(context.Background(), w, query("svc.weft.local.", mdns.TypeA))
		got := answerAddrs(w.msg)
		if len(got) != 4 {
			t.Fatalf("answer %v, want every address", got)
		}
		firsts[got[0]] = true
	}
	if len(firsts) != 4 {
		t.Fatalf("round robin put only %v first", firsts)
	}

	// Nearest first: c (1ms), then b (5ms), then a's two addresses
	// (unknown RTT) rotating.
	s.SetNearest(func(peer string) (time.Duration, bool) {
		switch peer {
		case "b":
			return 5 * time.Millisecond, true
		case "c":
			return time.Millisecond, true
		}
		return 0, false
	})
	lastTwo := map[string]bool{}
	for i := 0; i < 4; i++ {
		w := &recorder{}
		s.ServeDNS(context.Background(), w, query("svc.weft.local.", mdns.TypeA))
		got := answerAddrs(w.msg)
		if got[0] != "10.40.2.1" || got[1] != "10.40.1.1" {
			t.Fatalf("nearest order: %v", got)
		}
		lastTwo[got[2]] = true
	}
	if len(lastTwo) != 2 {
		t.Fatalf("equal-RTT addresses did not rotate: %v", lastTwo)
	}
	s.SetNearest(nil)
}

func TestConfiguredDomainAndTTL(t *testing.T) {
	s := newTestServer(t, zoneRecords(t), func(c *Config) { c.Domain = "Mesh.Example"; c.TTL = 5 * time.Second }, Deps{})
	w := &recorder{}
	s.ServeDNS(context.Background(), w, query("web.mesh.example.", mdns.TypeA))
	if w.msg.Rcode != mdns.RcodeSuccess || len(w.msg.Answer) != 2 || w.msg.Answer[0].Header().Ttl != 5 {
		t.Fatalf("answer %v", w.msg)
	}
}

func TestConfigValidate(t *testing.T) {
	bad := []func(*Config){
		func(c *Config) { c.Domain = "" },
		func(c *Config) { c.Domain = "." },
		func(c *Config) { c.Domain = "x.in-addr.arpa." },
		func(c *Config) { c.Domain = "bad..domain" },
		func(c *Config) { c.TTL = 0 },
		func(c *Config) { c.Listen = []string{"no-port"} },
		func(c *Config) { c.Upstreams = []string{"not-an-ip"} },
		func(c *Config) { c.Upstreams = nil; c.ResolvConf = "" },
		func(c *Config) { c.ForwardTimeout = 0 },
		func(c *Config) { c.CacheSize = -1 },
		func(c *Config) { c.UDPSize = 100 },
		func(c *Config) { c.Networks = []NetworkRange{{Name: "x"}} },
		func(c *Config) { c.Networks = []NetworkRange{{"bad_name", netip.MustParsePrefix("10.0.0.0/8")}} },
	}
	for i, edit := range bad {
		c := DefaultConfig()
		edit(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("case %d: Validate accepted %+v", i, c)
		}
	}
	c := DefaultConfig()
	c.Upstreams = []string{"1.1.1.1", "[2001:db8::1]:5353"}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := newTestServer(t, zoneRecords(t), nil, Deps{Registry: reg})
	s.ServeDNS(context.Background(), &recorder{}, query("web.weft.local.", mdns.TypeA))
	s.ServeDNS(context.Background(), &recorder{}, query("nope.weft.local.", mdns.TypeA))
	if v := counterValue(t, s.m.queries.WithLabelValues("A", "NOERROR")); v != 1 {
		t.Fatalf("NOERROR count %v", v)
	}
	if v := counterValue(t, s.m.queries.WithLabelValues("A", "NXDOMAIN")); v != 1 {
		t.Fatalf("NXDOMAIN count %v", v)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
		if mf.GetName() == "weft_dns_records" && mf.GetMetric()[0].GetGauge().GetValue() != float64(s.records.Len()) {
			t.Errorf("weft_dns_records = %v", mf.GetMetric()[0].GetGauge().GetValue())
		}
	}
	for _, want := range []string{"weft_dns_queries_total", "weft_dns_records", "weft_dns_cache_entries"} {
		if !slices.Contains(names, want) {
			t.Errorf("metric %s not exported (have %v)", want, names)
		}
	}
	// A second server on the same registry is refused with a clear error.
	if _, err := NewServer(s.cfg, zoneRecords(t), Deps{Registry: reg}); err == nil {
		t.Fatal("duplicate registration accepted")
	}
}

// A panic below the handler is recovered and answered with SERVFAIL.
func TestPanicRecovered(t *testing.T) {
	s := newTestServer(t, zoneRecords(t), nil, Deps{})
	s.chain = panicHandler{}
	w := &recorder{}
	rc, err := s.ServeDNS(context.Background(), w, query("web.weft.local.", mdns.TypeA))
	if rc != mdns.RcodeServerFailure || err == nil || w.msg == nil || w.msg.Rcode != mdns.RcodeServerFailure {
		t.Fatalf("rc %d err %v msg %v", rc, err, w.msg)
	}
	if v := counterValue(t, s.m.panics); v != 1 {
		t.Fatalf("panics %v", v)
	}
}

type panicHandler struct{}

func (panicHandler) Name() string { return "panic" }
func (panicHandler) ServeDNS(context.Context, mdns.ResponseWriter, *mdns.Msg) (int, error) {
	panic("boom")
}

func TestParseReverse(t *testing.T) {
	for _, a := range []string{"10.40.0.2", "0.0.0.0", "255.255.255.255", "fd00::2", "2001:db8::abcd:1", "::"} {
		rev, _ := mdns.ReverseAddr(a)
		got, ok := parseReverse(rev)
		if !ok || got != mustAddr(t, a) {
			t.Errorf("parseReverse(%s) = %v %v", rev, got, ok)
		}
	}
	for _, n := range []string{"1.2.3.in-addr.arpa.", "256.1.2.3.in-addr.arpa.", "01.1.2.3.in-addr.arpa.", "a.1.2.3.in-addr.arpa.",
		"1.0.ip6.arpa.", strings.Repeat("g.", 32) + "ip6.arpa.", "1.2.3.4.5.in-addr.arpa."} {
		if _, ok := parseReverse(n); ok {
			t.Errorf("parseReverse(%s) accepted", n)
		}
	}
	for p, want := range map[string]string{"10.40.0.0/16": "40.10.in-addr.arpa.", "10.40.0.0/20": "40.10.in-addr.arpa.", "fd00::/64": "0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa."} {
		if got := reverseZone(netip.MustParsePrefix(p)); got != want {
			t.Errorf("reverseZone(%s) = %s, want %s", p, got, want)
		}
	}
}

func counterValue(t testing.TB, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
