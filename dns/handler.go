package dns

import (
	"context"
	"errors"
	"net"

	mdns "github.com/miekg/dns"
)

// Handler is one link of the query handling chain, as in CoreDNS
// (plugin/plugin.go). ServeDNS either writes an answer to w and returns its
// rcode, or writes nothing and returns an rcode for which clientWrites is
// false (SERVFAIL, REFUSED, FORMERR, NOTIMP), which the server then writes.
// It may be called concurrently and must not keep w or r after it returns.
type Handler interface {
	ServeDNS(ctx context.Context, w mdns.ResponseWriter, r *mdns.Msg) (rcode int, err error)
	Name() string
}

// errDrop tells the server to send nothing back.
var errDrop = errors.New("query dropped")

// clientWrites reports whether a handler returning rcode has written the
// answer itself.
func clientWrites(rcode int) bool {
	switch rcode {
	case mdns.RcodeServerFailure, mdns.RcodeRefused, mdns.RcodeFormatError, mdns.RcodeNotImplemented:
		return false
	}
	return true
}

// sanitize is the first handler: it drops what must not be answered and
// rejects what is malformed, so that the next handlers see one well-formed
// IN question of a regular type.
type sanitize struct{ next Handler }

func (sanitize) Name() string { return "sanitize" }

func (s sanitize) ServeDNS(ctx context.Context, w mdns.ResponseWriter, r *mdns.Msg) (int, error) {
	if r.Response {
		return 0, errDrop // never answer answers: reflection loops
	}
	if r.Opcode != mdns.OpcodeQuery {
		return mdns.RcodeNotImplemented, nil
	}
	if len(r.Question) != 1 {
		return mdns.RcodeFormatError, nil
	}
	if o := r.IsEdns0(); o != nil && o.Version() != 0 {
		m := new(mdns.Msg)
		m.SetRcode(r, mdns.RcodeBadVers)
		m.SetEdns0(mdns.MinMsgSize, false)
		_ = w.WriteMsg(m)
		return mdns.RcodeBadVers, nil
	}
	q := r.Question[0]
	if _, ok := mdns.IsDomainName(q.Name); !ok || !mdns.IsFqdn(q.Name) {
		return mdns.RcodeFormatError, nil
	}
	switch q.Qtype {
	case mdns.TypeAXFR, mdns.TypeIXFR:
		return mdns.RcodeRefused, nil
	case mdns.TypeOPT, mdns.TypeNone, mdns.TypeTSIG, mdns.TypeTKEY:
		return mdns.RcodeFormatError, nil
	}
	if q.Qclass != mdns.ClassINET {
		return mdns.RcodeRefused, nil
	}
	return s.next.ServeDNS(ctx, w, r)
}

// writeResponse writes resp (an answer to req) to w, with our OPT when req
// had one, truncated with TC to the client's UDP buffer: the EDNS0 size
// (at least 512, at most udpSize), or 512 without EDNS0. TCP answers are not
// truncated below the DNS maximum.
func writeResponse(w mdns.ResponseWriter, req, resp *mdns.Msg, udpSize uint16, m *metrics) {
	// The OPT record is hop by hop: drop an upstream's, add ours.
	extra := resp.Extra[:0]
	for _, rr := range resp.Extra {
		if rr.Header().Rrtype != mdns.TypeOPT {
			extra = append(extra, rr)
		}
	}
	resp.Extra = extra
	size := mdns.MinMsgSize
	if o := req.IsEdns0(); o != nil {
		size = int(min(max(o.UDPSize(), mdns.MinMsgSize), udpSize))
		resp.SetEdns0(udpSize, o.Do())
	}
	if isTCP(w) {
		size = mdns.MaxMsgSize
	}
	resp.Truncate(size)
	if resp.Truncated && !isTCP(w) && m != nil {
		m.truncated.Inc()
	}
	_ = w.WriteMsg(resp)
}

func isTCP(w mdns.ResponseWriter) bool {
	_, ok := w.RemoteAddr().(*net.TCPAddr)
	return ok
}
