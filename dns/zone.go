package dns

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
)

// NearestFunc gives the measured round-trip time to a peer, ok false when
// unknown. Addresses are answered nearest peer first once it is set; it must
// be fast and safe for concurrent use (it runs on every query), and should
// return 0, true for the local peer.
type NearestFunc func(peer string) (rtt time.Duration, ok bool)

// zone answers the weft domain from the records, and reverse (PTR) queries
// for weft addresses; it passes everything else to next.
type zone struct {
	domain  string // lower case, fully qualified
	ttl     uint32
	nets    atomic.Pointer[netTable] // never nil once built (newServer)
	records *Records
	udpSize uint16
	m       *metrics
	next    Handler
	rr      atomic.Uint64 // round-robin counter, one step per query
	nearest atomic.Pointer[NearestFunc]
}

func (*zone) Name() string { return "weft" }

func (z *zone) ServeDNS(ctx context.Context, w mdns.ResponseWriter, r *mdns.Msg) (int, error) {
	q := r.Question[0]
	name := strings.ToLower(q.Name)
	switch {
	case name == z.domain:
		return z.apex(w, r)
	case strings.HasSuffix(name, "."+z.domain):
		rel := strings.TrimSuffix(name, "."+z.domain)
		if strings.HasPrefix(rel, "_") {
			return z.srv(w, r, rel)
		}
		return z.names(w, r, rel)
	case strings.HasSuffix(name, ".in-addr.arpa.") || strings.HasSuffix(name, ".ip6.arpa."):
		if addr, ok := parseReverse(name); ok {
			if rc, handled := z.ptr(w, r, addr); handled {
				return rc, nil
			}
		}
	}
	return z.next.ServeDNS(ctx, w, r)
}

func (z *zone) reply(r *mdns.Msg, rcode int) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetRcode(r, rcode)
	m.Authoritative = true
	m.RecursionAvailable = true
	return m
}

func (z *zone) soa(owner string) *mdns.SOA {
	return &mdns.SOA{
		Hdr:     mdns.RR_Header{Name: owner, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: z.ttl},
		Ns:      "ns." + z.domain,
		Mbox:    "hostmaster." + z.domain,
		Serial:  uint32(z.records.Generation()),
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  z.ttl, // the negative TTL (RFC 2308)
	}
}

// negative writes NXDOMAIN or NOERROR/no data, with the SOA of owner in
// the authority section.
func (z *zone) negative(w mdns.ResponseWriter, r *mdns.Msg, rcode int, owner string) (int, error) {
	m := z.reply(r, rcode)
	m.Ns = []mdns.RR{z.soa(owner)}
	writeResponse(w, r, m, z.udpSize, z.m)
	return rcode, nil
}

func (z *zone) answer(w mdns.ResponseWriter, r *mdns.Msg, answer, extra []mdns.RR) (int, error) {
	m := z.reply(r, mdns.RcodeSuccess)
	m.Answer, m.Extra = answer, extra
	writeResponse(w, r, m, z.udpSize, z.m)
	return mdns.RcodeSuccess, nil
}

func (z *zone) apex(w mdns.ResponseWriter, r *mdns.Msg) (int, error) {
	if r.Question[0].Qtype == mdns.TypeSOA {
		return z.answer(w, r, []mdns.RR{z.soa(r.Question[0].Name)}, nil)
	}
	return z.negative(w, r, mdns.RcodeSuccess, z.domain)
}

// names answers A, AAAA (and ANY) for a container name, or a container
// name on one network (networks.go).
func (z *zone) names(w mdns.ResponseWriter, r *mdns.Msg, rel string) (int, error) {
	nt := z.nets.Load()
	targets, known := z.resolve(nt, rel)
	if !known {
		return z.negative(w, r, mdns.RcodeNameError, z.domain)
	}
	answer := z.addrRRs(r.Question[0].Name, r.Question[0].Qtype, targets, nt, askerOf(w, nt, len(targets)))
	if len(answer) == 0 {
		return z.negative(w, r, mdns.RcodeSuccess, z.domain)
	}
	return z.answer(w, r, answer, nil)
}

// addrRRs returns the A and/or AAAA records of targets for qtype, rotated
// round robin, then ordered nearest first when a NearestFunc is set, then
// those in network asker (an index of nt, -1: none) first.
func (z *zone) addrRRs(owner string, qtype uint16, targets []Target, nt *netTable, asker int) []mdns.RR {
	want4 := qtype == mdns.TypeA || qtype == mdns.TypeANY
	want6 := qtype == mdns.TypeAAAA || qtype == mdns.TypeANY
	sel := make([]Target, 0, len(targets))
	for _, t := range targets {
		if t.Addr.Is4() && want4 || t.Addr.Is6() && want6 {
			sel = append(sel, t)
		}
	}
	z.order(sel)
	askerFirst(sel, nt, asker)
	rrs := make([]mdns.RR, 0, len(sel))
	for _, t := range sel {
		if t.Addr.Is4() {
			rrs = append(rrs, &mdns.A{Hdr: mdns.RR_Header{Name: owner, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: z.ttl}, A: t.Addr.AsSlice()})
		} else {
			rrs = append(rrs, &mdns.AAAA{Hdr: mdns.RR_Header{Name: owner, Rrtype: mdns.TypeAAAA, Class: mdns.ClassINET, Ttl: z.ttl}, AAAA: t.Addr.AsSlice()})
		}
	}
	return rrs
}

// nearer orders two peers for nearest-first answers: a known RTT before an unknown one,
// then the smaller RTT first; 0 keeps their rotated order.
func nearer(aRTT time.Duration, aOK bool, bRTT time.Duration, bOK bool) int {
	switch {
	case aOK != bOK:
		if aOK {
			return -1
		}
		return 1
	case aRTT < bRTT:
		return -1
	case aRTT > bRTT:
		return 1
	}
	return 0
}

// order rotates ts by one step per query, then, with a NearestFunc, sorts
// stably by RTT (unknown RTTs last), so that equally near addresses keep
// rotating.
func (z *zone) order(ts []Target) {
	if len(ts) < 2 {
		return
	}
	n := z.rr.Add(1) - 1
	k := int(n % uint64(len(ts)))
	slices.Reverse(ts[:k])
	slices.Reverse(ts[k:])
	slices.Reverse(ts)
	fp := z.nearest.Load()
	if fp == nil {
		return
	}
	nearest := *fp
	type ranked struct {
		t   Target
		rtt time.Duration
		ok  bool
	}
	rk := make([]ranked, len(ts))
	for i, t := range ts {
		rtt, ok := nearest(t.Peer)
		rk[i] = ranked{t, rtt, ok}
	}
	slices.SortStableFunc(rk, func(a, b ranked) int { return nearer(a.rtt, a.ok, b.rtt, b.ok) })
	for i := range rk {
		ts[i] = rk[i].t
	}
}

// srv answers _service._proto.name.
func (z *zone) srv(w mdns.ResponseWriter, r *mdns.Msg, rel string) (int, error) {
	parts := strings.SplitN(rel, ".", 3)
	if len(parts) != 3 || !strings.HasPrefix(parts[1], "_") {
		return z.negative(w, r, mdns.RcodeNameError, z.domain)
	}
	service, proto, name := parts[0][1:], parts[1][1:], parts[2]
	svcs := z.records.LookupSRV(name, service, proto)
	if len(svcs) == 0 {
		return z.negative(w, r, mdns.RcodeNameError, z.domain)
	}
	qtype := r.Question[0].Qtype
	if qtype != mdns.TypeSRV && qtype != mdns.TypeANY {
		return z.negative(w, r, mdns.RcodeSuccess, z.domain)
	}
	target := name + "." + z.domain
	var answer []mdns.RR
	for _, s := range svcs {
		answer = append(answer, &mdns.SRV{
			Hdr:      mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypeSRV, Class: mdns.ClassINET, Ttl: z.ttl},
			Priority: 0, Weight: 10, Port: s.Port, Target: target,
		})
	}
	answer = slices.CompactFunc(answer, func(a, b mdns.RR) bool { return a.(*mdns.SRV).Port == b.(*mdns.SRV).Port })
	targets, _ := z.records.LookupName(name)
	nt := z.nets.Load()
	extra := z.addrRRs(target, mdns.TypeANY, targets, nt, askerOf(w, nt, len(targets)))
	return z.answer(w, r, answer, extra)
}

// ptr answers a reverse query for addr when addr is a weft address or lies
// in a weft network; handled is false when the query is not ours.
func (z *zone) ptr(w mdns.ResponseWriter, r *mdns.Msg, addr netip.Addr) (rcode int, handled bool) {
	names := z.records.LookupAddr(addr)
	if len(names) == 0 {
		nt := z.nets.Load()
		if i := nt.of(addr); i >= 0 {
			rc, _ := z.negative(w, r, mdns.RcodeNameError, reverseZone(nt.list[i].Prefix))
			return rc, true
		}
		return 0, false
	}
	if q := r.Question[0].Qtype; q != mdns.TypePTR && q != mdns.TypeANY {
		rc, _ := z.negative(w, r, mdns.RcodeSuccess, z.domain)
		return rc, true
	}
	answer := make([]mdns.RR, 0, len(names))
	for _, n := range names {
		answer = append(answer, &mdns.PTR{
			Hdr: mdns.RR_Header{Name: r.Question[0].Name, Rrtype: mdns.TypePTR, Class: mdns.ClassINET, Ttl: z.ttl},
			Ptr: n + "." + z.domain,
		})
	}
	rc, _ := z.answer(w, r, answer, nil)
	return rc, true
}

// parseReverse parses a full reverse name (4 labels under in-addr.arpa, 32
// nibbles under ip6.arpa), lower case.
func parseReverse(name string) (netip.Addr, bool) {
	if rest, ok := strings.CutSuffix(name, ".in-addr.arpa."); ok {
		labels := strings.Split(rest, ".")
		if len(labels) != 4 {
			return netip.Addr{}, false
		}
		var b [4]byte
		for i, l := range labels {
			if len(l) == 0 || len(l) > 3 || len(l) > 1 && l[0] == '0' {
				return netip.Addr{}, false
			}
			v := 0
			for _, c := range []byte(l) {
				if c < '0' || c > '9' {
					return netip.Addr{}, false
				}
				v = v*10 + int(c-'0')
			}
			if v > 255 {
				return netip.Addr{}, false
			}
			b[3-i] = byte(v)
		}
		return netip.AddrFrom4(b), true
	}
	if rest, ok := strings.CutSuffix(name, ".ip6.arpa."); ok {
		if len(rest) != 63 {
			return netip.Addr{}, false
		}
		var b [16]byte
		for i := 0; i < 32; i++ {
			c := rest[2*i]
			if i < 31 && rest[2*i+1] != '.' {
				return netip.Addr{}, false
			}
			var v byte
			switch {
			case c >= '0' && c <= '9':
				v = c - '0'
			case c >= 'a' && c <= 'f':
				v = c - 'a' + 10
			default:
				return netip.Addr{}, false
			}
			nib := 31 - i // nibble index from the most significant
			if nib%2 == 0 {
				b[nib/2] |= v << 4
			} else {
				b[nib/2] |= v
			}
		}
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}

// reverseZone returns the reverse zone of p, rounded out to a whole octet
// (IPv4) or nibble (IPv6): 10.40.0.0/16 → 40.10.in-addr.arpa.
func reverseZone(p netip.Prefix) string {
	full, _ := mdns.ReverseAddr(p.Addr().String())
	labels := mdns.SplitDomainName(full)
	keep := p.Bits() / 8
	if p.Addr().Is6() {
		keep = p.Bits() / 4
	}
	suffix := 2 // in-addr.arpa / ip6.arpa
	return mdns.Fqdn(strings.Join(labels[len(labels)-suffix-keep:], "."))
}

// askerOf is the network (an index of nt, -1: none) of the query written
// to w, looked up only when there is an order to choose (n targets).
func askerOf(w mdns.ResponseWriter, nt *netTable, n int) int {
	if n < 2 || len(nt.list) == 0 {
		return -1
	}
	return nt.of(remoteAddr(w))
}

// addrPorter is a ResponseWriter that gives the source address without
// allocating (udpWriter, and recordingWriter around one).
type addrPorter interface{ RemoteAddrPort() netip.AddrPort }

// remoteAddr is the source address of the query written to w, invalid when
// w does not say.
func remoteAddr(w mdns.ResponseWriter) netip.Addr {
	if ap, ok := w.(addrPorter); ok {
		return ap.RemoteAddrPort().Addr().Unmap()
	}
	switch a := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap()
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}
