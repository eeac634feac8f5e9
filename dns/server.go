package dns

import (
	"runtime"
	"syscall"

	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// Server answers service DNS on UDP and TCP at each listen address: weft
// names from the Records, everything else forwarded upstream. Build it with
// NewServer, then Start; Close stops it.
type Server struct {
	cfg     Config
	records *Records
	log     *slog.Logger
	m       *metrics
	zone    *zone
	fwd     *forwarder
	chain   Handler

	ctx    context.Context // cancelled by Close: aborts forwards in flight, stops the slow pool
	cancel context.CancelFunc

	// slow runs the full path of UDP queries on bounded workers (udp.go).
	slow      *slowPool
	dropped   *prometheus.CounterVec // weft_dns_dropped_total{reason}
	coalesced prometheus.Counter
	// tcpPerSource bounds the TCP connections open from one address.
	tcpPerSource int
	tcpMax       int // and from all addresses: Accept waits beyond it

	// netMu serialises SetNetworks (the table itself is an atomic pointer
	// in zone, read without a lock).
	netMu sync.Mutex
	// listenMu serialises SetListen, so that two converges never race to
	// add or remove the same address.
	listenMu sync.Mutex

	mu        sync.Mutex // guards the fields below
	listeners map[string]*listener
	closed    bool
}

// Deps are the collaborators of a Server.
type Deps struct {
	Logger   *slog.Logger          // nil: discard
	Registry prometheus.Registerer // nil: metrics not exported
	Now      func() time.Time      // nil: time.Now; used by the cache and resolv.conf checks
}

type listener struct {
	want string   // the address asked for (AddListener's argument), as SetListen names it
	addr net.Addr // the UDP address; TCP listens on the same ip:port
	// udp serves the UDP sockets: they share the port with SO_REUSEPORT, one
	// per CPU, so that queries from many clients are read and answered in
	// parallel, each by its own reader goroutine (udp.go).
	udp  []*udpServer
	tcp  *mdns.Server   // miekg/dns
	done sync.WaitGroup // the UDP readers and their slow-path goroutines, the TCP server
}

// ErrClosed is returned by methods called after Close.
var ErrClosed = errors.New("dns server closed")

// NewServer checks cfg and builds a server over records. It listens on
// nothing until Start.
func NewServer(cfg Config, records *Records, deps Deps) (*Server, error) {
	return newServer(cfg, records, deps, defaultSlowLimits)
}

// TCP connection limits: a resolver needs one or two connections; a
// container flooding connections must not hold the port for the others.
const (
	defaultTCPPerSource = 16
	defaultTCPMax       = 256
)

func newServer(cfg Config, records *Records, deps Deps, lim slowLimits) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if records == nil {
		return nil, fmt.Errorf("%w: no records", ErrConfig)
	}
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := deps.Now
	if now == nil {
		now = time.Now
	}
	s := &Server{cfg: cfg, records: records, log: log, listeners: make(map[string]*listener)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	c := newCache(cfg.CacheSize, cfg.CacheMaxTTL, cfg.CacheMaxNegativeTTL, now)
	m, err := newMetrics(deps.Registry, c.len, records.Len)
	if err != nil {
		s.cancel()
		return nil, err
	}
	s.m = m
	if err := s.newBoundMetrics(deps.Registry); err != nil {
		s.cancel()
		return nil, err
	}
	s.tcpPerSource, s.tcpMax = defaultTCPPerSource, defaultTCPMax
	var static []string
	for _, u := range cfg.Upstreams {
		a, _ := upstreamAddr(u, "53") // checked by Validate
		static = append(static, a)
	}
	s.fwd = &forwarder{
		static: static, resolvPath: cfg.ResolvConf, check: cfg.ResolvConfCheck,
		timeout: cfg.ForwardTimeout, udpSize: cfg.UDPSize, defPort: "53",
		now: now, log: log, m: m, cache: c,
		selfAddrs: func() map[string]bool { return selfAddrSet(s.Addrs()) },
		flights:   make(map[cacheKey]*flight), coalesced: s.coalesced,
	}
	s.zone = &zone{
		domain: cfg.Domain, ttl: uint32(cfg.TTL / time.Second),
		records: records, udpSize: cfg.UDPSize, m: m, next: s.fwd,
	}
	nt, _ := newNetTable(cfg.Networks, 0) // checked by Validate
	s.zone.nets.Store(nt)
	s.chain = sanitize{next: s.zone}
	s.slow = newSlowPool(lim, s.serveSlow, s.dropped, log, s.ctx.Done())
	return s, nil
}

// newBoundMetrics registers the counters of the flood bounds. They live here
// rather than in metrics.go so that the bounds are one reviewable piece.
func (s *Server) newBoundMetrics(reg prometheus.Registerer) error {
	s.dropped = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weft_dns_dropped_total",
		Help: "Queries (UDP) or connections (TCP) dropped unanswered by the flood bounds, by reason: busy (worker queue full), source (too many from one address in flight), tcp (too many connections from one address).",
	}, []string{"reason"})
	for _, r := range []string{dropBusy, dropSource, dropTCP} {
		s.dropped.WithLabelValues(r)
	}
	s.coalesced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "weft_dns_forward_coalesced_total",
		Help: "Forwarded queries answered by an identical upstream question already in flight.",
	})
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{s.dropped, s.coalesced} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("dns metrics: %w", err)
		}
	}
	return nil
}

// SetNearest sets (or, with nil, clears) the function that orders addresses
// nearest peer first. Safe to call at any time.
func (s *Server) SetNearest(f NearestFunc) {
	if f == nil {
		s.zone.nearest.Store(nil)
		return
	}
	s.zone.nearest.Store(&f)
}

// SetNetworks replaces the network list (Config.Networks) as a whole: the
// router calls it whenever the networks it knows change. A bad list (a
// name that is no DNS label, an invalid or overlapping range, a name twice,
// more than 1024 networks) is refused with an error wrapping
// ErrInvalidNetworks, counted in weft_dns_networks_refused_total and
// logged, and the previous list stays. Safe to call at any time; queries
// in flight finish with the list they started with. O(networks²) for the
// overlap check, once per change.
func (s *Server) SetNetworks(list []NetworkRange) error {
	s.netMu.Lock()
	defer s.netMu.Unlock()
	old := s.zone.nets.Load()
	if slices.Equal(old.list, lowerNames(list)) {
		return nil // unchanged: keep the answer caches
	}
	nt, err := newNetTable(list, old.gen+1)
	if err != nil {
		s.m.networksRefused.Inc()
		s.log.Error("dns network list refused; keeping the previous one", "err", err, "networks", len(list))
		return err
	}
	s.zone.nets.Store(nt)
	s.log.Info("dns networks", "networks", len(nt.list))
	return nil
}

// lowerNames is list with lower-case names, as newNetTable keeps them.
func lowerNames(list []NetworkRange) []NetworkRange {
	out := make([]NetworkRange, len(list))
	for i, n := range list {
		out[i] = NetworkRange{Name: strings.ToLower(n.Name), Prefix: n.Prefix}
	}
	return out
}

// SetListen makes the server listen on exactly addrs (each on UDP and
// TCP): it starts the missing ones and stops the ones no longer wanted,
// keeping those in both. The router calls it when a network's gateway
// address appears on or leaves this host. An address that cannot be bound
// is logged and counted (weft_dns_listen_errors_total) and the others are
// still served; the error joins every failure. Port 0 picks a free port
// per address (tests). O(listeners + addrs).
func (s *Server) SetListen(addrs []netip.AddrPort) error {
	s.listenMu.Lock()
	defer s.listenMu.Unlock()
	want := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		want[listenKey(a.String())] = true
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	have := make(map[string]bool, len(s.listeners))
	var stale []net.Addr
	for _, ln := range s.listeners {
		have[ln.want] = true
		if !want[ln.want] {
			stale = append(stale, ln.addr)
		}
	}
	s.mu.Unlock()
	for _, a := range stale {
		if err := s.RemoveListener(a); err == nil {
			s.log.Info("dns stopped listening", "addr", a.String())
		}
	}
	var errs []error
	for _, a := range addrs {
		if have[listenKey(a.String())] {
			continue
		}
		if _, err := s.AddListener(a.String()); err != nil {
			if errors.Is(err, ErrClosed) {
				return err
			}
			s.m.listenErrors.Inc()
			s.log.Warn("dns cannot listen on a gateway address; retried at the next change", "addr", a.String(), "err", err)
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Start listens on every address of the config.
func (s *Server) Start() error {
	for _, a := range s.cfg.Listen {
		if _, err := s.AddListener(a); err != nil {
			return err
		}
	}
	return nil
}

// AddListener serves UDP and TCP on addr (host:port; port 0 picks a port
// free for both) and returns the bound address. It is how a network created
// later gets DNS on its gateway.
func (s *Server) AddListener(addr string) (net.Addr, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	pcs, l, err := listenBoth(addr, runtime.GOMAXPROCS(0))
	if err != nil {
		return nil, fmt.Errorf("dns listen %s: %w", addr, err)
	}
	ln := &listener{want: listenKey(addr), addr: pcs[0].LocalAddr()}
	if _, dup := s.listeners[ln.addr.String()]; dup {
		for _, pc := range pcs {
			pc.Close()
		}
		l.Close()
		return nil, fmt.Errorf("dns listen %s: already listening", addr)
	}
	for _, pc := range pcs {
		ln.udp = append(ln.udp, newUDPServer(s, pc.(*net.UDPConn), &ln.done))
	}
	ln.tcp = &mdns.Server{
		Listener: newLimitListener(l, s.tcpMax, s.tcpPerSource, func(src net.Addr) {
			s.dropped.WithLabelValues(dropTCP).Inc()
			s.log.Debug("dns tcp connection refused: too many from one address", "source", src.String(), "limit", s.tcpPerSource)
		}), Handler: mdns.HandlerFunc(s.serveMiekg), ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
		IdleTimeout: func() time.Duration { return s.cfg.TCPIdleTimeout },
	}
	if err := s.serve(ln, ln.tcp); err != nil {
		for _, u := range ln.udp {
			u.conn.Close()
		}
		l.Close()
		ln.done.Wait()
		return nil, fmt.Errorf("dns serve %s: %w", addr, err)
	}
	s.slow.start()
	for _, u := range ln.udp {
		ln.done.Add(1)
		go u.serve()
	}
	s.listeners[ln.addr.String()] = ln
	s.log.Info("dns listening", "addr", ln.addr.String())
	return ln.addr, nil
}

// listenKey names a requested listen address as SetListen does
// (netip.AddrPort's form) when it is ip:port, else as given.
func listenKey(addr string) string {
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
	}
	return addr
}

// serve starts srv and waits until it is serving.
func (s *Server) serve(ln *listener, srv *mdns.Server) error {
	started := make(chan struct{})
	errc := make(chan error, 1)
	srv.NotifyStartedFunc = func() { close(started) }
	ln.done.Add(1)
	go func() {
		defer ln.done.Done()
		errc <- srv.ActivateAndServe()
	}()
	select {
	case <-started:
		return nil
	case err := <-errc:
		return err
	}
}

// reusePort lets several UDP sockets of this process share one port.
var reusePort = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	})
	if err != nil {
		return err
	}
	return serr
}}

// listenBoth binds n UDP sockets (sharing the port) and one TCP listener on the same ip:port.
func listenBoth(addr string, n int) ([]net.PacketConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, err
	}
	closeAll := func(pcs []net.PacketConn) {
		for _, pc := range pcs {
			pc.Close()
		}
	}
	for try := 0; ; try++ {
		first, err := reusePort.ListenPacket(context.Background(), "udp", addr)
		if err != nil {
			return nil, nil, err
		}
		pcs := []net.PacketConn{first}
		bound := first.LocalAddr().String()
		for len(pcs) < n {
			pc, err := reusePort.ListenPacket(context.Background(), "udp", bound)
			if err != nil {
				closeAll(pcs)
				return nil, nil, err
			}
			pcs = append(pcs, pc)
		}
		p := strconv.Itoa(first.LocalAddr().(*net.UDPAddr).Port)
		l, err := net.Listen("tcp", net.JoinHostPort(host, p))
		if err == nil {
			return pcs, l, nil
		}
		closeAll(pcs)
		if port != "0" || try == 9 {
			return nil, nil, err
		}
	}
}

// shutdown closes the sockets and waits for every goroutine serving them,
// including queries in flight on the full path.
func (ln *listener) shutdown() {
	for _, u := range ln.udp {
		u.conn.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ln.tcp.ShutdownContext(ctx); err != nil {
		ln.tcp.Listener.Close() // not started: close it ourselves
	}
	ln.done.Wait()
}

// RemoveListener stops serving on addr, an address AddListener returned.
func (s *Server) RemoveListener(addr net.Addr) error {
	s.mu.Lock()
	ln, ok := s.listeners[addr.String()]
	delete(s.listeners, addr.String())
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("dns: not listening on %s", addr)
	}
	ln.shutdown()
	return nil
}

// Addrs returns the bound UDP addresses (TCP uses the same), sorted.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, 0, len(s.listeners))
	for _, ln := range s.listeners {
		out = append(out, ln.addr)
	}
	slices.SortFunc(out, func(a, b net.Addr) int {
		if a.String() < b.String() {
			return -1
		}
		if a.String() > b.String() {
			return 1
		}
		return 0
	})
	return out
}

// Close stops every listener, aborts forwards in flight and waits for the
// serving goroutines. It is safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	lns := s.listeners
	s.listeners = make(map[string]*listener)
	s.mu.Unlock()
	s.cancel()
	for _, ln := range lns {
		ln.shutdown()
	}
	s.slow.wait()
	return nil
}

// limitListener bounds the TCP connections of a listener: at most max open
// (Accept waits for one to close, as golang.org/x/net/netutil does, so the
// kernel's backlog pushes back), and at most perSource from one address
// (accepted and closed at once, counted by onRefuse). Memory is
// O(open connections).
type limitListener struct {
	net.Listener
	sem       chan struct{}
	perSource int
	onRefuse  func(net.Addr)
	closeOnce sync.Once
	done      chan struct{}

	mu    sync.Mutex // guards bySrc
	bySrc map[netip.Addr]int
}

func newLimitListener(l net.Listener, max, perSource int, onRefuse func(net.Addr)) *limitListener {
	return &limitListener{Listener: l, sem: make(chan struct{}, max), perSource: perSource, onRefuse: onRefuse,
		done: make(chan struct{}), bySrc: make(map[netip.Addr]int)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		select {
		case l.sem <- struct{}{}:
		case <-l.done:
			return nil, net.ErrClosed
		}
		c, err := l.Listener.Accept()
		if err != nil {
			<-l.sem
			return nil, err
		}
		src := addrOf(c.RemoteAddr())
		l.mu.Lock()
		over := l.bySrc[src] >= l.perSource
		if !over {
			l.bySrc[src]++
		}
		l.mu.Unlock()
		if over {
			l.onRefuse(c.RemoteAddr()) // counted before the client can see the close
			c.Close()
			<-l.sem
			continue
		}
		return &limitConn{Conn: c, l: l, src: src}, nil
	}
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

func (l *limitListener) release(src netip.Addr) {
	l.mu.Lock()
	if l.bySrc[src] <= 1 {
		delete(l.bySrc, src)
	} else {
		l.bySrc[src]--
	}
	l.mu.Unlock()
	<-l.sem
}

func addrOf(a net.Addr) netip.Addr {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// limitConn releases its slot once, on the first Close.
type limitConn struct {
	net.Conn
	l    *limitListener
	src  netip.Addr
	once sync.Once
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.src) })
	return err
}

// ServeDNS runs the handler chain (sanitize → weft zone → forward) for r,
// writing the answer to w. It never panics: a panic is logged, counted, and
// answered with SERVFAIL. It is the in-process entry point (tests,
// benchmarks); the listeners call it too.
func (s *Server) ServeDNS(ctx context.Context, w mdns.ResponseWriter, r *mdns.Msg) (rcode int, err error) {
	rw := &recordingWriter{ResponseWriter: w, rcode: -1}
	ti := typeIndexNone
	if r != nil && len(r.Question) > 0 {
		ti = typeIndex(r.Question[0].Qtype)
	}
	defer func() {
		if p := recover(); p != nil {
			s.m.panics.Inc()
			s.log.Error("dns handler panic", "panic", p, "stack", string(debug.Stack()))
			rcode, err = mdns.RcodeServerFailure, fmt.Errorf("dns handler panic: %v", p)
			if rw.rcode < 0 && r != nil {
				s.writeError(rw, r, rcode)
			}
		}
		s.m.query(ti, rw.rcode).Inc() // rcode -1: dropped
	}()
	if r == nil {
		return mdns.RcodeFormatError, errDrop
	}
	rcode, err = s.chain.ServeDNS(ctx, rw, r)
	if errors.Is(err, errDrop) {
		return rcode, err
	}
	if err != nil {
		s.log.Debug("dns query failed", "err", err)
	}
	if !clientWrites(rcode) && rw.rcode < 0 {
		s.writeError(rw, r, rcode)
	}
	return rcode, err
}

func (s *Server) writeError(w mdns.ResponseWriter, r *mdns.Msg, rcode int) {
	m := new(mdns.Msg)
	m.SetRcode(r, rcode)
	m.RecursionAvailable = true
	if len(m.Question) == 1 {
		// A name that cannot be packed is not echoed.
		if _, ok := mdns.IsDomainName(m.Question[0].Name); !ok || !mdns.IsFqdn(m.Question[0].Name) {
			m.Question = nil
		}
	}
	writeResponse(w, r, m, s.cfg.UDPSize, s.m)
}

// serveMiekg adapts the chain to miekg/dns.
func (s *Server) serveMiekg(w mdns.ResponseWriter, r *mdns.Msg) {
	_, _ = s.ServeDNS(s.ctx, w, r)
}

// recordingWriter remembers the rcode written.
type recordingWriter struct {
	mdns.ResponseWriter
	rcode int // -1 until written
}

// RemoteAddrPort passes on the source address (addrPorter), without an
// allocation when the writer underneath is an addrPorter.
func (w *recordingWriter) RemoteAddrPort() netip.AddrPort {
	if ap, ok := w.ResponseWriter.(addrPorter); ok {
		return ap.RemoteAddrPort()
	}
	switch a := w.ResponseWriter.RemoteAddr().(type) {
	case *net.UDPAddr:
		return a.AddrPort()
	case *net.TCPAddr:
		return a.AddrPort()
	}
	return netip.AddrPort{}
}

func (w *recordingWriter) WriteMsg(m *mdns.Msg) error {
	w.rcode = m.Rcode
	return w.ResponseWriter.WriteMsg(m)
}
