package dns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// planeNetworks: default, media, and a network named like a container ("web").
func planeNetworks() []NetworkRange {
	return []NetworkRange{
		{"default", netip.MustParsePrefix("10.40.0.0/16")},
		{"media", netip.MustParsePrefix("10.50.0.0/16")},
		{"web", netip.MustParsePrefix("10.70.0.0/16")},
	}
}

// planeRecords: web on default, media and the network web, on two peers; db on default
// only; a container "a.media" (a name with a dot) and a container "a" on media; a
// v6 address of web in no network.
func planeRecords(t testing.TB) *Records {
	t.Helper()
	a := newTestRecords(t, "a", nil)
	b := newTestRecords(t, "b", nil)
	for _, ad := range []string{"10.40.0.2", "10.50.0.2", "10.70.0.2", "fd00::2"} {
		a.AddAddr("web", mustAddr(t, ad))
	}
	for _, ad := range []string{"10.40.1.2", "10.50.1.2"} {
		d, _ := b.AddAddr("web", mustAddr(t, ad))
		a.Merge(d)
	}
	a.AddAddr("db", mustAddr(t, "10.40.0.3"))
	a.AddAddr("a.media", mustAddr(t, "10.40.0.9"))
	a.AddAddr("a", mustAddr(t, "10.50.0.9"))
	a.AddSRV("srvonly", "x", "udp", 9)
	return a
}

func planeServer(t testing.TB) *Server {
	t.Helper()
	s := newTestServer(t, planeRecords(t), func(c *Config) { c.Networks = planeNetworks() }, Deps{})
	s.zone.next = refuseAll{}
	return s
}

// askFrom runs q through the full chain as if sent from src (invalid: 127.0.0.2) and, for
// the queries the fast path takes, checks that it answers the same bytes.
func askFrom(t *testing.T, s *Server, q *mdns.Msg, src netip.Addr) *mdns.Msg {
	t.Helper()
	b, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	compareFastPathFrom(t, s, newAnswerCache(), b, src)
	w := &byteWriter{from: src}
	s.serveSlow(b, w)
	if len(w.out) != 1 {
		t.Fatalf("%v: %d answers", q.Question[0], len(w.out))
	}
	m := new(mdns.Msg)
	if err := m.Unpack(w.out[0]); err != nil {
		t.Fatal(err)
	}
	return m
}

func sortedAddrs(m *mdns.Msg) []string {
	out := answerAddrs(m)
	slices.Sort(out)
	return out
}

// TestNetworkNames: NAME.NETWORK answers NAME's addresses in NETWORK only; NODATA when
// NAME exists with none there, NXDOMAIN when NAME is unknown; collisions and garbage.
func TestNetworkNames(t *testing.T) {
	s := planeServer(t)
	none := []string(nil)
	for _, tc := range []struct {
		name  string
		qtype uint16
		rcode int
		addrs []string
	}{
		{"web.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.40.0.2", "10.40.1.2", "10.50.0.2", "10.50.1.2", "10.70.0.2"}},
		{"web.media.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.50.0.2", "10.50.1.2"}},
		{"WEB.Media.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.50.0.2", "10.50.1.2"}},
		{"web.default.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.40.0.2", "10.40.1.2"}},
		{"web.media.weft.local.", mdns.TypeAAAA, mdns.RcodeSuccess, none}, // NODATA: no v6 there
		{"web.media.weft.local.", mdns.TypeANY, mdns.RcodeSuccess, []string{"10.50.0.2", "10.50.1.2"}},
		// A container named web and a network named web.
		{"web.web.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.70.0.2"}},
		{"db.web.weft.local.", mdns.TypeA, mdns.RcodeSuccess, none}, // db exists, nothing on web: NODATA
		{"db.media.weft.local.", mdns.TypeA, mdns.RcodeSuccess, none},
		{"db.default.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.40.0.3"}},
		{"srvonly.media.weft.local.", mdns.TypeA, mdns.RcodeSuccess, none},
		{"nope.media.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"nope.web.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		// A network alone is an empty non-terminal, not NXDOMAIN.
		{"media.weft.local.", mdns.TypeA, mdns.RcodeSuccess, none},
		{"default.weft.local.", mdns.TypeAAAA, mdns.RcodeSuccess, none},
		// A registered name wins over the network reading.
		{"a.media.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.40.0.9"}},
		{"a.weft.local.", mdns.TypeA, mdns.RcodeSuccess, []string{"10.50.0.9"}},
		{"a.default.weft.local.", mdns.TypeA, mdns.RcodeSuccess, none},
		// Garbage network labels.
		{"web.nosuch.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web.media.media.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web.med!a.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web.me\\.dia.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web.-.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web._tcp.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web." + strings.Repeat("m", 63) + ".weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
		{"web.10.50.0.0/16.weft.local.", mdns.TypeA, mdns.RcodeNameError, none},
	} {
		m := askFrom(t, s, query(tc.name, tc.qtype), netip.Addr{})
		if m.Rcode != tc.rcode || !slices.Equal(sortedAddrs(m), tc.addrs) {
			t.Errorf("%s %s: %s %v, want %s %v", tc.name, mdns.TypeToString[tc.qtype], mdns.RcodeToString[m.Rcode],
				sortedAddrs(m), mdns.RcodeToString[tc.rcode], tc.addrs)
		}
		if len(tc.addrs) == 0 && (len(m.Ns) != 1 || m.Ns[0].Header().Rrtype != mdns.TypeSOA) {
			t.Errorf("%s: negative answer without the SOA: %v", tc.name, m)
		}
	}
}

// TestAskerNetworkFirst: NAME.<domain> answers every address, the asker's network's first,
// rotating within both groups; an asker in no network gets today's order.
func TestAskerNetworkFirst(t *testing.T) {
	s := planeServer(t)
	inMedia := func(a string) bool { return strings.HasPrefix(a, "10.50.") }
	inDefault := func(a string) bool { return strings.HasPrefix(a, "10.40.") }
	for _, tc := range []struct {
		from  string
		first func(string) bool
		n     int // addresses of the asker's network
	}{
		{"10.50.3.4", inMedia, 2},
		{"10.40.9.9", inDefault, 2},
	} {
		firsts := map[string]bool{}
		for range 10 {
			m := askFrom(t, s, query("web.weft.local.", mdns.TypeA), mustAddr(t, tc.from))
			got := answerAddrs(m)
			if len(got) != 5 {
				t.Fatalf("from %s: %v", tc.from, got)
			}
			for i, a := range got {
				if (i < tc.n) != tc.first(a) {
					t.Fatalf("from %s: %v: the asker's network is not first", tc.from, got)
				}
			}
			firsts[got[0]] = true
		}
		if len(firsts) != tc.n {
			t.Errorf("from %s: first answers %v, want both of the asker's network in turn", tc.from, firsts)
		}
	}
	// From no network (and from the v6 asker of no network): every address comes first in turn.
	for _, from := range []string{"127.0.0.2", "192.168.1.1", "fd00::9"} {
		firsts := map[string]bool{}
		for range 10 {
			firsts[answerAddrs(askFrom(t, s, query("web.weft.local.", mdns.TypeA), mustAddr(t, from)))[0]] = true
		}
		if len(firsts) != 5 {
			t.Errorf("from %s: first answers %v, want all five in turn", from, firsts)
		}
	}
	// Nearest first inside each group: peer b is nearer.
	s.SetNearest(func(peer string) (time.Duration, bool) {
		if peer == "b" {
			return time.Millisecond, true
		}
		return 5 * time.Millisecond, true
	})
	for range 4 {
		got := answerAddrs(askFrom(t, s, query("web.weft.local.", mdns.TypeA), mustAddr(t, "10.50.7.7")))
		if got[0] != "10.50.1.2" || got[1] != "10.50.0.2" || got[2] != "10.40.1.2" {
			t.Fatalf("nearest within the asker's network: %v", got)
		}
	}
	// SRV additional data follows the same order.
	m := askFrom(t, s, query("web.weft.local.", mdns.TypeANY), mustAddr(t, "10.70.0.40"))
	if got := answerAddrs(m); got[0] != "10.70.0.2" {
		t.Fatalf("ANY from the network web: %v", got)
	}
}

// TestAskerNetworkOverTheWire: the source address of a real UDP and TCP query picks the
// network (here a network over loopback).
func TestAskerNetworkOverTheWire(t *testing.T) {
	recs := planeRecords(t)
	recs.AddAddr("web", mustAddr(t, "127.0.0.50"))
	nets := append(planeNetworks(), NetworkRange{"lo", netip.MustParsePrefix("127.0.0.0/8")})
	_, addr := startTestServer(t, recs, func(c *Config) { c.Networks = nets }, Deps{})
	for _, netw := range []string{"udp", "tcp"} {
		for range 6 {
			m := exchange(t, netw, addr, query("web.weft.local.", mdns.TypeA))
			if got := answerAddrs(m); len(got) != 6 || got[0] != "127.0.0.50" {
				t.Fatalf("%s: %v, want 127.0.0.50 (the asker's network) first", netw, got)
			}
		}
		if got := answerAddrs(exchange(t, netw, addr, query("web.lo.weft.local.", mdns.TypeA))); !slices.Equal(got, []string{"127.0.0.50"}) {
			t.Fatalf("%s: web.lo: %v", netw, got)
		}
	}
}

// TestSetNetworks: a network created later gets names and reverse answers (the fast path's
// cache follows); bad lists are refused, counted, logged, and change nothing.
func TestSetNetworks(t *testing.T) {
	var logs bytes.Buffer
	reg := prometheus.NewRegistry()
	s := newTestServer(t, planeRecords(t), func(c *Config) { c.Networks = planeNetworks()[:1] },
		Deps{Registry: reg, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	s.zone.next = refuseAll{}
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
	if m := ask("web.media.weft.local."); m.Rcode != mdns.RcodeNameError {
		t.Fatalf("before media exists: %v", m)
	}
	if err := s.SetNetworks(planeNetworks()); err != nil {
		t.Fatal(err)
	}
	if m := ask("web.media.weft.local."); m.Rcode != mdns.RcodeSuccess || len(m.Answer) != 2 {
		t.Fatalf("after media is created: %v", m)
	}
	rev, _ := mdns.ReverseAddr("10.50.9.9")
	w := &recorder{}
	s.ServeDNS(context.Background(), w, query(rev, mdns.TypePTR))
	if w.msg.Rcode != mdns.RcodeNameError || len(w.msg.Ns) != 1 || w.msg.Ns[0].Header().Name != "50.10.in-addr.arpa." {
		t.Fatalf("reverse in media: %v", w.msg)
	}

	good := planeNetworks()
	bad := map[string][]NetworkRange{
		"name not a label": append(slices.Clone(good), NetworkRange{"me.dia", netip.MustParsePrefix("10.80.0.0/16")}),
		"empty name":       append(slices.Clone(good), NetworkRange{"", netip.MustParsePrefix("10.80.0.0/16")}),
		"long name":        append(slices.Clone(good), NetworkRange{strings.Repeat("x", 64), netip.MustParsePrefix("10.80.0.0/16")}),
		"invalid range":    append(slices.Clone(good), NetworkRange{"x", netip.Prefix{}}),
		"host bits":        append(slices.Clone(good), NetworkRange{"x", netip.MustParsePrefix("10.80.0.1/16")}),
		"duplicate name":   append(slices.Clone(good), NetworkRange{"MEDIA", netip.MustParsePrefix("10.80.0.0/16")}),
		"overlap":          append(slices.Clone(good), NetworkRange{"x", netip.MustParsePrefix("10.50.128.0/17")}),
		"too many": func() []NetworkRange {
			var l []NetworkRange
			for i := range maxNetworks + 1 {
				l = append(l, NetworkRange{fmt.Sprintf("n%d", i), netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)})
			}
			return l
		}(),
	}
	refused := 0.0
	for what, list := range bad {
		err := s.SetNetworks(list)
		if !errors.Is(err, ErrInvalidNetworks) {
			t.Errorf("%s: err = %v", what, err)
		}
		refused++
		if v := counterValue(t, s.m.networksRefused); v != refused {
			t.Errorf("%s: refused counter %v, want %v", what, v, refused)
		}
		if m := ask("web.media.weft.local."); len(m.Answer) != 2 {
			t.Fatalf("%s: the list changed: %v", what, m)
		}
	}
	if !strings.Contains(logs.String(), "dns network list refused") {
		t.Errorf("refusals not logged: %s", logs.String())
	}
	// Removing media: its names go.
	if err := s.SetNetworks(good[:1]); err != nil {
		t.Fatal(err)
	}
	if m := ask("web.media.weft.local."); m.Rcode != mdns.RcodeNameError {
		t.Fatalf("after media is removed: %v", m)
	}
}

// TestSetListen: the server listens on exactly the addresses asked for, keeping those it
// already serves; an address it cannot bind is counted and the others still served.
func TestSetListen(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := newTestServer(t, zoneRecords(t), nil, Deps{Registry: reg})
	a2, a3 := netip.MustParseAddrPort("127.0.0.2:0"), netip.MustParseAddrPort("127.0.0.3:0")
	if err := s.SetListen([]netip.AddrPort{a2, a3}); err != nil {
		t.Fatal(err)
	}
	addrs := s.Addrs()
	if len(addrs) != 2 {
		t.Fatalf("listening on %v", addrs)
	}
	for _, a := range addrs {
		if m := exchange(t, "udp", a.String(), query("web.weft.local.", mdns.TypeA)); len(m.Answer) != 2 {
			t.Fatalf("%s: %v", a, m)
		}
	}
	var kept net.Addr
	for _, a := range addrs {
		if strings.HasPrefix(a.String(), "127.0.0.3:") {
			kept = a
		}
	}
	if err := s.SetListen([]netip.AddrPort{a3}); err != nil {
		t.Fatal(err)
	}
	if got := s.Addrs(); len(got) != 1 || got[0].String() != kept.String() {
		t.Fatalf("after dropping 127.0.0.2: %v, want %v kept", got, kept)
	}
	if m := exchange(t, "tcp", kept.String(), query("web.weft.local.", mdns.TypeA)); len(m.Answer) != 2 {
		t.Fatalf("kept listener over tcp: %v", m)
	}
	// A busy address: counted, the others served.
	busy, err := net.ListenPacket("udp", "127.0.0.4:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	err = s.SetListen([]netip.AddrPort{a3, netip.MustParseAddrPort(busy.LocalAddr().String())})
	if err == nil || counterValue(t, s.m.listenErrors) != 1 {
		t.Fatalf("busy address: err %v, counter %v", err, counterValue(t, s.m.listenErrors))
	}
	if got := s.Addrs(); len(got) != 1 || got[0].String() != kept.String() {
		t.Fatalf("after a failed address: %v", got)
	}
	if err := s.SetListen(nil); err != nil || len(s.Addrs()) != 0 {
		t.Fatalf("listen on nothing: %v %v", err, s.Addrs())
	}
	s.Close()
	if err := s.SetListen([]netip.AddrPort{a2}); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}
