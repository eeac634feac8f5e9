package dns

import (
	"errors"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// udpServer serves one UDP socket (one of the SO_REUSEPORT sockets of a
// listener) from one reader goroutine. The reader answers what the fast path
// can (fastpath.go) itself, with no allocation; every other packet is copied
// and handled in a goroutine of its own by the full handler chain, exactly as
// miekg's server did (serveSlow), so that a slow forward never holds up the
// socket.
type udpServer struct {
	s    *Server
	conn *net.UDPConn
	// pktinfo is set when the socket is bound to the unspecified address:
	// answers must then leave from the address each query was sent to,
	// which the kernel tells with IP_PKTINFO / IPV6_PKTINFO.
	pktinfo bool
	wg      *sync.WaitGroup // the reader and the slow-path goroutines
}

// udpReadSize bounds the queries read (larger ones are cut and rejected).
const udpReadSize = 4096

func newUDPServer(s *Server, conn *net.UDPConn, wg *sync.WaitGroup) *udpServer {
	u := &udpServer{s: s, conn: conn, wg: wg}
	if la, ok := conn.LocalAddr().(*net.UDPAddr); ok && la.IP.IsUnspecified() {
		u.pktinfo = setPktinfo(conn)
	}
	return u
}

// setPktinfo asks the kernel for each packet's destination address, as
// miekg does: both families are tried, as a v6 socket also gets v4 packets.
func setPktinfo(conn *net.UDPConn) bool {
	rc, err := conn.SyscallConn()
	if err != nil {
		return false
	}
	var err4, err6 error
	if err := rc.Control(func(fd uintptr) {
		err4 = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		err6 = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
	}); err != nil {
		return false
	}
	return err4 == nil || err6 == nil
}

// serve reads and answers until the socket is closed.
func (u *udpServer) serve() {
	defer u.wg.Done()
	var (
		buf     = make([]byte, udpReadSize)
		out     = make([]byte, 0, udpReadSize)
		scratch = make([]byte, 0, 256) // the lower-case question name
		oob     = make([]byte, 128)
		cache   = newAnswerCache()
		errs    int // consecutive read errors
	)
	for {
		var (
			n, oobn int
			from    netip.AddrPort
			err     error
		)
		if u.pktinfo {
			n, oobn, _, from, err = u.conn.ReadMsgUDPAddrPort(buf, oob)
		} else {
			n, from, err = u.conn.ReadFromUDPAddrPort(buf)
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient (ENOMEM, an ICMP error reported late): go on, but
			// never spin on an error that persists.
			u.s.log.Debug("dns udp read", "addr", u.conn.LocalAddr().String(), "err", err)
			if errs++; errs > 10 {
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		errs = 0
		if n < dnsHeaderLen {
			continue // miekg dropped these too: any answer could be used to amplify
		}
		var src []byte // the answer's source, for pktinfo
		if u.pktinfo {
			src = replySource(oob[:oobn])
		}
		resp, qtype, rcode, ok := u.fast(cache, buf[:n], out[:0], scratch)
		if ok {
			_, _, _ = u.conn.WriteMsgUDPAddrPort(resp, src, from)
			u.s.m.query(typeIndex(qtype), rcode).Inc()
			if cap(resp) > cap(out) {
				out = resp[:0]
			}
			continue
		}
		pkt := append([]byte(nil), buf[:n]...)
		w := &udpWriter{conn: u.conn, remote: from, src: src}
		u.wg.Add(1)
		go func() {
			defer u.wg.Done()
			u.s.serveSlow(pkt, w)
		}()
	}
}

// fast runs the fast path; a panic in it (a bug) is logged and counted, and
// the query goes to the full path, which answers SERVFAIL if it panics too.
func (u *udpServer) fast(c *answerCache, b, out, scratch []byte) (resp []byte, qtype uint16, rcode int, ok bool) {
	defer func() {
		if p := recover(); p != nil {
			u.s.m.panics.Inc()
			u.s.log.Error("dns fast path panic", "panic", p, "stack", string(debug.Stack()))
			ok = false
		}
	}()
	return u.s.zone.fastAnswer(c, b, out, scratch)
}

// serveSlow handles one UDP query as miekg's server does (its serveDNS):
// drop answers; FORMERR or NOTIMP, with the header only, for what its
// default accept function rejects or what cannot be unpacked; else run the
// handler chain.
func (s *Server) serveSlow(b []byte, w mdns.ResponseWriter) {
	var dh mdns.Header
	if len(b) < dnsHeaderLen {
		return
	}
	dh.Id = uint16(b[0])<<8 | uint16(b[1])
	dh.Bits = uint16(b[2])<<8 | uint16(b[3])
	dh.Qdcount = uint16(b[4])<<8 | uint16(b[5])
	dh.Ancount = uint16(b[6])<<8 | uint16(b[7])
	dh.Nscount = uint16(b[8])<<8 | uint16(b[9])
	dh.Arcount = uint16(b[10])<<8 | uint16(b[11])
	req := new(mdns.Msg)
	action := mdns.DefaultMsgAcceptFunc(dh)
	switch action {
	case mdns.MsgAccept:
		err := req.Unpack(b)
		if err == nil {
			s.serveMiekg(w, req)
			return
		}
		// Unpack set the header (and what it could of the rest) before it failed.
	case mdns.MsgIgnore:
		return
	default:
		req.Id = dh.Id
		req.Opcode = int(dh.Bits>>11) & 0xf
		req.RecursionDesired = dh.Bits&(1<<8) != 0
		req.CheckingDisabled = dh.Bits&(1<<4) != 0
	}
	opcode := req.Opcode
	req.SetRcodeFormatError(req)
	req.Zero = false
	if action == mdns.MsgRejectNotImplemented {
		req.Opcode = opcode
		req.Rcode = mdns.RcodeNotImplemented
	}
	req.Ns, req.Answer, req.Extra = nil, nil, nil
	_ = w.WriteMsg(req)
}

// udpWriter is the mdns.ResponseWriter of one UDP query on the full path.
type udpWriter struct {
	conn   *net.UDPConn
	remote netip.AddrPort
	src    []byte // control message setting the source address, or nil
}

func (w *udpWriter) WriteMsg(m *mdns.Msg) error {
	b, err := m.Pack()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func (w *udpWriter) Write(b []byte) (int, error) {
	n, _, err := w.conn.WriteMsgUDPAddrPort(b, w.src, w.remote)
	return n, err
}

func (w *udpWriter) LocalAddr() net.Addr  { return w.conn.LocalAddr() }
func (w *udpWriter) RemoteAddr() net.Addr { return net.UDPAddrFromAddrPort(w.remote) }
func (w *udpWriter) Close() error         { return nil }
func (w *udpWriter) TsigStatus() error    { return nil }
func (w *udpWriter) TsigTimersOnly(bool)  {}
func (w *udpWriter) Hijack()              {}

// replySource returns the control message that sends an answer from the
// destination address of the query whose control messages are oob (as
// miekg's correctSource does), or nil.
func replySource(oob []byte) []byte {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var dst netip.Addr
	for _, m := range msgs {
		switch {
		case m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= 16:
			// struct in6_pktinfo: the destination address, then the interface.
			dst = netip.AddrFrom16([16]byte(m.Data[:16]))
		case m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= 12 && !dst.IsValid():
			// struct in_pktinfo: interface, local address, destination address.
			dst = netip.AddrFrom4([4]byte(m.Data[8:12]))
		}
	}
	switch {
	case !dst.IsValid():
		return nil
	case dst.Unmap().Is4():
		return unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: dst.Unmap().As4()})
	default:
		return unix.PktInfo6(&unix.Inet6Pktinfo{Addr: dst.As16()})
	}
}
