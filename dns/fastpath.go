package dns

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"time"

	mdns "github.com/miekg/dns"
)

// The UDP fast path answers the common query, an A or AAAA question for a
// name under the weft domain, straight from the wire bytes: no miekg Msg is
// unpacked or packed and no goroutine is started. Its answers are byte for
// byte those of the full handler chain (FuzzFastPath checks this). It
// declines, and the query goes to the full chain, for anything else: other
// types or classes, the apex, SRV names, names with characters a container
// name cannot have, compression pointers, EDNS0 options or versions, extra
// records or trailing bytes, and answers that would need truncation.

// Fast path limits.
const (
	maxFastAnswerNames = 10000 // names in one answerCache; it is emptied when full
	dnsHeaderLen       = 12
	optRRLen           = 11 // an OPT record without options
)

// fastQuery is a query the fast path can answer, parsed by parseFastQuery.
type fastQuery struct {
	qname  []byte // the question name, wire form, as asked (case kept)
	qtype  uint16 // A or AAAA
	edns   bool   // the query had an OPT record (version 0, no options)
	do     bool   // its DO bit
	bufLen int    // the client's EDNS0 buffer size
}

// parseFastQuery parses b when it is a query of the shape the fast path
// answers, appending the question name, lower case and in presentation
// form with the final dot, to name. ok is false for anything else, which
// then takes the full path; it never panics, whatever b holds.
func parseFastQuery(b []byte, name []byte) (q fastQuery, lname []byte, ok bool) {
	if len(b) < dnsHeaderLen {
		return q, name, false
	}
	// QR 0, opcode QUERY; one question, no answer or authority, at most the OPT.
	if b[2]&0xf8 != 0 || binary.BigEndian.Uint16(b[4:]) != 1 || b[6]|b[7]|b[8]|b[9] != 0 ||
		binary.BigEndian.Uint16(b[10:]) > 1 {
		return q, name, false
	}
	off := dnsHeaderLen
	for {
		if off >= len(b) {
			return q, name, false
		}
		l := int(b[off])
		if l == 0 {
			off++
			break
		}
		// No compression pointers or extended labels; at most 255 bytes.
		if l > 63 || off+1+l >= len(b) || off+1+l-dnsHeaderLen > 254 {
			return q, name, false
		}
		for _, c := range b[off+1 : off+1+l] {
			switch {
			case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			case c >= 'A' && c <= 'Z':
				c += 'a' - 'A'
			default:
				return q, name, false // needs escaping, or is no container name
			}
			name = append(name, c)
		}
		name = append(name, '.')
		off += 1 + l
	}
	if off == dnsHeaderLen+1 || len(b)-off < 4 {
		return q, name, false // the root, or no type and class
	}
	q.qname = b[dnsHeaderLen:off]
	q.qtype = binary.BigEndian.Uint16(b[off:])
	if q.qtype != mdns.TypeA && q.qtype != mdns.TypeAAAA || binary.BigEndian.Uint16(b[off+2:]) != mdns.ClassINET {
		return q, name, false
	}
	off += 4
	if b[11] == 1 {
		// The OPT: root owner, type 41, class = buffer size, TTL = extended
		// rcode 0 | version 0 | flags with at most DO, no options.
		if len(b)-off < optRRLen || b[off] != 0 || binary.BigEndian.Uint16(b[off+1:]) != mdns.TypeOPT ||
			b[off+5] != 0 || b[off+6] != 0 || b[off+7]&0x7f != 0 || b[off+8] != 0 ||
			binary.BigEndian.Uint16(b[off+9:]) != 0 {
			return q, name, false
		}
		q.edns, q.do = true, b[off+7]&0x80 != 0
		q.bufLen = int(binary.BigEndian.Uint16(b[off+3:]))
		off += optRRLen
	}
	if off != len(b) {
		return q, name, false
	}
	return q, name, true
}

// answerCache holds, for one generation of the records, the answer data of
// the names asked. Each UDP socket's reader owns one: it is not safe for
// concurrent use and needs no lock.
type answerCache struct {
	gen    uint64 // of the records
	netGen uint64 // of the network list (netTable.gen)
	valid  bool
	soa    []byte // the zone's SOA record, wire form, for negative answers
	names  map[string]*cachedName
	// scratch, reused by orderIdx
	idx    []int
	part   []int
	ranked []rankedIdx
}

// cachedName is what the zone answers for one name.
type cachedName struct {
	known bool    // the name has live entries (else NXDOMAIN)
	a     addrRRs // its A records
	aaaa  addrRRs // its AAAA records
}

// addrRRs are address records without their owner name: type, class, TTL,
// length and address (stride bytes each), in the order of LookupName.
type addrRRs struct {
	stride int
	rrs    []byte
	peers  []string // owner of each record, for NearestFunc
	nets   []int    // network of each record (an index of the netTable), -1 for none
}

func (a *addrRRs) len() int { return len(a.peers) }

type rankedIdx struct {
	i   int
	rtt time.Duration
	ok  bool
}

func newAnswerCache() *answerCache {
	return &answerCache{names: make(map[string]*cachedName)}
}

// lookup returns what to answer for rel (lower case, no final dot), from the
// cache when it holds the current generation of the records and nt.
func (z *zone) lookup(c *answerCache, nt *netTable, rel []byte) *cachedName {
	gen := z.records.Generation() // before the lookups: a change after it invalidates them
	if !c.valid || gen != c.gen || nt.gen != c.netGen {
		clear(c.names)
		c.gen, c.netGen, c.valid = gen, nt.gen, true
		c.soa = c.soa[:0]
		soa := z.soa(z.domain)
		soa.Serial = uint32(gen)
		buf := make([]byte, mdns.Len(soa))
		if n, err := mdns.PackRR(soa, buf, 0, nil, false); err == nil {
			c.soa = buf[:n]
		}
	}
	if cn, ok := c.names[string(rel)]; ok {
		return cn
	}
	if len(c.names) >= maxFastAnswerNames {
		clear(c.names)
	}
	targets, known := z.resolve(nt, string(rel))
	cn := &cachedName{known: known, a: addrRRs{stride: 14}, aaaa: addrRRs{stride: 26}}
	for _, t := range targets {
		set, typ := &cn.a, mdns.TypeA
		if t.Addr.Is6() {
			set, typ = &cn.aaaa, mdns.TypeAAAA
		}
		set.rrs = binary.BigEndian.AppendUint16(set.rrs, typ)
		set.rrs = binary.BigEndian.AppendUint16(set.rrs, mdns.ClassINET)
		set.rrs = binary.BigEndian.AppendUint32(set.rrs, z.ttl)
		set.rrs = binary.BigEndian.AppendUint16(set.rrs, uint16(t.Addr.BitLen()/8))
		set.rrs = append(set.rrs, t.Addr.AsSlice()...)
		set.peers = append(set.peers, t.Peer)
		set.nets = append(set.nets, nt.of(t.Addr))
	}
	c.names[string(rel)] = cn
	return cn
}

// fastAnswer answers the query b, when the fast path can, by appending the
// answer to out. It returns the answer, the query's type and the rcode; ok
// false means b must take the full path. It never panics, whatever b holds
// (FuzzFastPath).
//
// from is the query's source address: the asker's network's addresses are
// answered first (networks.go).
func (z *zone) fastAnswer(c *answerCache, b, out, scratch []byte, from netip.Addr) (resp []byte, qtype uint16, rcode int, ok bool) {
	q, name, ok := parseFastQuery(b, scratch[:0])
	if !ok {
		return out, 0, 0, false
	}
	// name.<domain>, not the apex, not an SRV name.
	rel := len(name) - len(z.domain) - 1
	if rel < 1 || name[rel] != '.' || string(name[rel+1:]) != z.domain || name[0] == '_' {
		return out, 0, 0, false
	}
	nt := z.nets.Load()
	cn := z.lookup(c, nt, name[:rel])
	set := &cn.a
	if q.qtype == mdns.TypeAAAA {
		set = &cn.aaaa
	}
	limit := mdns.MinMsgSize
	if q.edns {
		limit = int(min(max(uint16(q.bufLen), mdns.MinMsgSize), z.udpSize))
	}
	size := len(b) // header, question and, with EDNS0, an OPT of the same length as ours
	n := set.len()
	rcode = mdns.RcodeSuccess
	if !cn.known {
		rcode = mdns.RcodeNameError
	}
	if n > 0 {
		size += n * (len(q.qname) + set.stride)
	} else {
		size += len(c.soa)
	}
	if size > limit || n == 0 && len(c.soa) == 0 {
		return out, 0, 0, false // the full path truncates
	}

	// Header: ID, QR AA and RD as asked; RA, CD as asked and the rcode.
	out = append(out, b[0], b[1], 0x84|b[2]&0x01, 0x80|b[3]&0x10|byte(rcode), 0, 1)
	an, ns := n, 0
	if n == 0 {
		ns = 1
	}
	ar := 0
	if q.edns {
		ar = 1
	}
	out = append(out, byte(an>>8), byte(an), 0, byte(ns), 0, byte(ar))
	out = append(out, b[dnsHeaderLen:dnsHeaderLen+len(q.qname)+4]...) // the question as asked
	if n == 0 {
		out = append(out, c.soa...)
	} else {
		for _, i := range z.orderIdx(c, set, nt, from) {
			out = append(out, q.qname...)
			out = append(out, set.rrs[i*set.stride:(i+1)*set.stride]...)
		}
	}
	if q.edns {
		var do byte
		if q.do {
			do = 0x80
		}
		out = append(out, 0, 0, byte(mdns.TypeOPT), byte(z.udpSize>>8), byte(z.udpSize), 0, 0, do, 0, 0, 0)
	}
	return out, q.qtype, rcode, true
}

// orderIdx returns the order in which to answer the records of set: the
// same as zone.order and askerFirst, on indexes (rotated one step per
// query, then stably nearest first when a NearestFunc is set, then stably
// those in the network of from first). No allocation once the scratch has
// grown; O(records × log records + networks).
func (z *zone) orderIdx(c *answerCache, set *addrRRs, nt *netTable, from netip.Addr) []int {
	n := set.len()
	k := 0
	if n >= 2 {
		k = int((z.rr.Add(1) - 1) % uint64(n))
	}
	c.idx = c.idx[:0]
	for i := range n {
		c.idx = append(c.idx, (i+k)%n) // rotated left by k
	}
	if n < 2 {
		return c.idx
	}
	if fp := z.nearest.Load(); fp != nil {
		z.nearestIdx(c, set, *fp)
	}
	if len(nt.list) == 0 {
		return c.idx
	}
	if asker := nt.of(from); asker >= 0 {
		c.part = c.part[:0]
		for _, i := range c.idx {
			if set.nets[i] == asker {
				c.part = append(c.part, i)
			}
		}
		for _, i := range c.idx {
			if set.nets[i] != asker {
				c.part = append(c.part, i)
			}
		}
		c.idx, c.part = c.part, c.idx
	}
	return c.idx
}

// nearestIdx sorts c.idx stably nearest peer first.
func (z *zone) nearestIdx(c *answerCache, set *addrRRs, nearest NearestFunc) {
	c.ranked = c.ranked[:0]
	for _, i := range c.idx {
		rtt, ok := nearest(set.peers[i])
		c.ranked = append(c.ranked, rankedIdx{i, rtt, ok})
	}
	slices.SortStableFunc(c.ranked, func(a, b rankedIdx) int { return nearer(a.rtt, a.ok, b.rtt, b.ok) })
	c.idx = c.idx[:0]
	for _, r := range c.ranked {
		c.idx = append(c.idx, r.i)
	}
}
