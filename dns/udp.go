package dns

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// udpServer serves one UDP socket (one of the SO_REUSEPORT sockets of a
// listener) from one reader goroutine. The reader answers what the fast path
// can (fastpath.go) itself, with no allocation; every other packet is copied
// and handed to the server's bounded slow pool (slowPool), which runs the full
// handler chain as miekg's server did (serveSlow), so that a slow forward
// never holds up the socket, and a flood never grows goroutines or sockets
// without bound.
type udpServer struct {
	s    *Server
	conn *net.UDPConn
	// pktinfo is set when the socket is bound to the unspecified address:
	// answers must then leave from the address each query was sent to,
	// which the kernel tells with IP_PKTINFO / IPV6_PKTINFO.
	pktinfo bool
	wg      *sync.WaitGroup // the reader
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
		resp, qtype, rcode, ok := u.fast(cache, buf[:n], out[:0], scratch, from.Addr().Unmap())
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
		u.s.slow.submit(slowJob{pkt: pkt, w: w, src: from.Addr().Unmap()})
	}
}

// slowLimits bound the full path of UDP queries.
type slowLimits struct {
	workers   int // goroutines running the handler chain (each holds at most one upstream socket)
	queue     int // queries waiting for a worker; beyond it they are dropped ("busy")
	perSource int // queries of one source address queued or in flight; beyond it dropped ("source")
}

// defaultSlowLimits: 64 workers forward 64 questions at once (with
// ForwardTimeout 2s, at least 32 distinct slow questions per second, and any
// number of identical ones, which are coalesced); a burst of 1024 waits. One
// source may hold a quarter of the queue: a busy resolver behind one address
// (a node-local cache, dnsperf with 64 outstanding) is served at full speed,
// and a flooding container leaves three quarters to the others.
var defaultSlowLimits = slowLimits{workers: 64, queue: 1024, perSource: 256}

// Reasons of weft_dns_dropped_total.
const (
	dropBusy   = "busy"   // the slow pool's queue was full
	dropSource = "source" // the source had too many queries queued or in flight
	dropTCP    = "tcp"    // a TCP connection over the per-source limit was closed
)

// slowJob is one UDP query for the full path.
type slowJob struct {
	pkt []byte
	w   *udpWriter
	src netip.Addr
}

// slowPool runs the full path of UDP queries on a fixed set of workers fed by
// a bounded queue. submit never blocks the reader: when the queue is full, or
// the query's source already has perSource queries queued or in flight, the
// query is dropped and counted (a resolver retries; answering would only feed
// the flood). Memory is O(queue + workers); the per-source map holds only
// sources with queries in flight, so it is bounded the same way.
type slowPool struct {
	lim       slowLimits
	serve     func(pkt []byte, w mdns.ResponseWriter)
	dropped   *prometheus.CounterVec // reason
	log       *slog.Logger
	jobs      chan slowJob
	queued    atomic.Int64    // queries accepted into the queue, ever (tests pace floods with it)
	done      <-chan struct{} // closed when the server closes
	wg        sync.WaitGroup  // the workers
	startOnce sync.Once

	mu       sync.Mutex // guards the fields below
	inflight map[netip.Addr]int
	lastLog  time.Time
	unlogged int // drops since the last log line
}

func newSlowPool(lim slowLimits, serve func([]byte, mdns.ResponseWriter), dropped *prometheus.CounterVec, log *slog.Logger, done <-chan struct{}) *slowPool {
	return &slowPool{
		lim: lim, serve: serve, dropped: dropped, log: log, done: done,
		jobs: make(chan slowJob, lim.queue), inflight: make(map[netip.Addr]int),
	}
}

// start starts the workers, once: with the first listener, so that a server
// never started holds no goroutine.
func (p *slowPool) start() {
	p.startOnce.Do(func() {
		p.wg.Add(p.lim.workers)
		for range p.lim.workers {
			go p.work()
		}
	})
}

// submit queues j or drops it; it never blocks.
func (p *slowPool) submit(j slowJob) {
	p.mu.Lock()
	if p.inflight[j.src] >= p.lim.perSource {
		p.dropLocked(dropSource, j.src)
		p.mu.Unlock()
		return
	}
	p.inflight[j.src]++
	p.mu.Unlock()
	select {
	case p.jobs <- j:
		p.queued.Add(1)
	default:
		p.mu.Lock()
		p.releaseLocked(j.src)
		p.dropLocked(dropBusy, j.src)
		p.mu.Unlock()
	}
}

// dropLocked counts a drop and logs at most one line a second, with the
// number of drops it stands for, so that a flood does not flood the log.
func (p *slowPool) dropLocked(reason string, src netip.Addr) {
	p.dropped.WithLabelValues(reason).Inc()
	p.unlogged++
	if now := time.Now(); now.Sub(p.lastLog) >= time.Second {
		p.log.Warn("dns query dropped: too many queries in flight", "reason", reason, "source", src.String(),
			"dropped", p.unlogged, "workers", p.lim.workers, "queue", p.lim.queue, "per_source", p.lim.perSource)
		p.lastLog, p.unlogged = now, 0
	}
}

func (p *slowPool) releaseLocked(src netip.Addr) {
	if p.inflight[src] <= 1 {
		delete(p.inflight, src)
		return
	}
	p.inflight[src]--
}

func (p *slowPool) work() {
	defer p.wg.Done()
	for {
		select {
		case <-p.done:
			return
		case j := <-p.jobs:
			p.run(j)
			p.mu.Lock()
			p.releaseLocked(j.src)
			p.mu.Unlock()
		}
	}
}

// run serves one job; a panic (a bug: the handler chain recovers its own)
// is logged and must not kill the worker.
func (p *slowPool) run(j slowJob) {
	defer func() {
		if r := recover(); r != nil {
			p.log.Error("dns slow path panic", "panic", r, "stack", string(debug.Stack()))
		}
	}()
	p.serve(j.pkt, j.w)
}

// wait waits for the workers, after done is closed.
func (p *slowPool) wait() { p.wg.Wait() }

// fast runs the fast path; a panic in it (a bug) is logged and counted, and
// the query goes to the full path, which answers SERVFAIL if it panics too.
func (u *udpServer) fast(c *answerCache, b, out, scratch []byte, from netip.Addr) (resp []byte, qtype uint16, rcode int, ok bool) {
	defer func() {
		if p := recover(); p != nil {
			u.s.m.panics.Inc()
			u.s.log.Error("dns fast path panic", "panic", p, "stack", string(debug.Stack()))
			ok = false
		}
	}()
	return u.s.zone.fastAnswer(c, b, out, scratch, from)
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

// RemoteAddrPort is RemoteAddr without the allocation (addrPorter).
func (w *udpWriter) RemoteAddrPort() netip.AddrPort { return w.remote }
func (w *udpWriter) Close() error                   { return nil }
func (w *udpWriter) TsigStatus() error              { return nil }
func (w *udpWriter) TsigTimersOnly(bool)            {}
func (w *udpWriter) Hijack()                        {}

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
