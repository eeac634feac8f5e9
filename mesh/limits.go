package mesh

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
)

// memberlist (v0.5.4, net.go streamListen/handleConn) serves every TCP stream — push/pull,
// TCP pings, user messages — in a goroutine of its own, held up to TCPTimeout (10s) by a
// client that sends nothing, with no bound on how many: only the push/pull handling past
// the first byte is capped (maxPushPullRequests, 128 at once). StreamLimits adds the bounds
// it lacks, through Config.WrapTransport: open streams per source address and in all, and
// a short deadline for a stream's first byte.

// StreamLimits bound memberlist's incoming TCP streams. Zero fields take the defaults.
type StreamLimits struct {
	// PerSource bounds the streams open from one address (default 8: a peer opens one
	// push/pull at a time, plus the odd TCP ping or large message).
	PerSource int
	// Total bounds the streams open from all addresses (default 256).
	Total int
	// FirstByte is how long a new stream may stay silent (default 2s; memberlist's own
	// TCPTimeout then bounds the rest).
	FirstByte time.Duration
	Logger    *slog.Logger          // nil: discard
	Registry  prometheus.Registerer // nil: not exported
}

// Reasons of weft_mesh_streams_refused_total.
const (
	refusedSource = "source" // over PerSource from one address
	refusedTotal  = "total"  // over Total
	refusedSilent = "silent" // nothing sent within FirstByte
)

// ErrStreamRefused is logged with every refused stream.
var ErrStreamRefused = errors.New("gossip stream refused")

// LimitStreams wraps t so that its incoming streams are bounded by lim. Use it as (or
// inside) Config.WrapTransport:
//
//	cfg.WrapTransport = func(t memberlist.Transport) memberlist.Transport {
//		return mesh.LimitStreams(t, mesh.StreamLimits{Logger: log, Registry: reg})
//	}
//
// Memory and goroutines are O(Total): a stream waiting for its first byte holds one
// goroutine and counts against the limits.
func LimitStreams(t memberlist.Transport, lim StreamLimits) memberlist.Transport {
	if lim.PerSource <= 0 {
		lim.PerSource = 8
	}
	if lim.Total <= 0 {
		lim.Total = 256
	}
	if lim.FirstByte <= 0 {
		lim.FirstByte = 2 * time.Second
	}
	if lim.Logger == nil {
		lim.Logger = slog.New(slog.DiscardHandler)
	}
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weft_mesh_streams_refused_total",
		Help: "Incoming gossip TCP streams closed unread, by reason: source (too many from one address), total (too many open), silent (no first byte in time).",
	}, []string{"reason"})
	for _, r := range []string{refusedSource, refusedTotal, refusedSilent} {
		refused.WithLabelValues(r)
	}
	if lim.Registry != nil {
		if err := lim.Registry.Register(refused); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
					refused = existing // a mesh recreated on the same registry
				}
			} else {
				lim.Logger.Warn("cannot register weft_mesh_streams_refused_total", "err", err)
			}
		}
	}
	l := &limitedTransport{
		Transport: t, lim: lim, refused: refused,
		out: make(chan net.Conn), done: make(chan struct{}), bySrc: make(map[netip.Addr]int),
		waiting: make(map[*limitedConn]bool),
	}
	l.wg.Add(1)
	go l.accept()
	return l
}

// StreamLimiter returns a Config.WrapTransport that applies lim (LimitStreams).
func StreamLimiter(lim StreamLimits) func(memberlist.Transport) memberlist.Transport {
	return func(t memberlist.Transport) memberlist.Transport { return LimitStreams(t, lim) }
}

// limitedTransport is a memberlist.Transport whose StreamCh yields only the streams the
// limits admit.
type limitedTransport struct {
	memberlist.Transport
	lim      StreamLimits
	refused  *prometheus.CounterVec
	out      chan net.Conn
	done     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup // accept and the first-byte waits

	mu      sync.Mutex // guards the fields below
	open    int
	bySrc   map[netip.Addr]int
	waiting map[*limitedConn]bool // streams waiting for their first byte: closed by Shutdown
	lastLog time.Time
}

func (l *limitedTransport) StreamCh() <-chan net.Conn { return l.out }

// Shutdown stops the wrapper, then the transport.
func (l *limitedTransport) Shutdown() error {
	l.stopOnce.Do(func() { close(l.done) })
	err := l.Transport.Shutdown()
	l.mu.Lock()
	for c := range l.waiting {
		c.Conn.Close() // its firstByte returns now, not after FirstByte
	}
	l.mu.Unlock()
	l.wg.Wait()
	return err
}

func (l *limitedTransport) accept() {
	defer l.wg.Done()
	in := l.Transport.StreamCh()
	for {
		select {
		case <-l.done:
			return
		case c := <-in:
			src := remoteAddr(c)
			if reason := l.admit(src); reason != "" {
				l.refuse(reason, src) // counted before the client can see the close
				c.Close()
				continue
			}
			lc := &limitedConn{Conn: c, l: l, src: src}
			l.mu.Lock()
			l.waiting[lc] = true
			l.mu.Unlock()
			l.wg.Add(1)
			go l.firstByte(lc)
		}
	}
}

// admit takes a slot for a stream from src, or returns why not.
func (l *limitedTransport) admit(src netip.Addr) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.open >= l.lim.Total:
		return refusedTotal
	case l.bySrc[src] >= l.lim.PerSource:
		return refusedSource
	}
	l.open++
	l.bySrc[src]++
	return ""
}

func (l *limitedTransport) release(src netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if l.bySrc[src] <= 1 {
		delete(l.bySrc, src)
	} else {
		l.bySrc[src]--
	}
}

// refuse counts a refused stream and logs at most one line a second (a flood must not
// flood the log).
func (l *limitedTransport) refuse(reason string, src netip.Addr) {
	l.refused.WithLabelValues(reason).Inc()
	l.mu.Lock()
	now := time.Now()
	logIt := now.Sub(l.lastLog) >= time.Second
	if logIt {
		l.lastLog = now
	}
	l.mu.Unlock()
	if logIt {
		l.lim.Logger.Warn("gossip stream refused", "err", ErrStreamRefused, "reason", reason, "source", src.String(),
			"per_source", l.lim.PerSource, "total", l.lim.Total, "first_byte", l.lim.FirstByte)
	}
}

// firstByte hands c to memberlist once it has sent its first byte; a silent stream is
// closed and counted.
func (l *limitedTransport) firstByte(c *limitedConn) {
	defer l.wg.Done()
	_ = c.SetReadDeadline(time.Now().Add(l.lim.FirstByte))
	n, err := c.Conn.Read(c.first[:])
	l.mu.Lock()
	delete(l.waiting, c)
	l.mu.Unlock()
	if err != nil || n != 1 {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			l.refuse(refusedSilent, c.src)
		}
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	c.pending = true
	select {
	case l.out <- c:
	case <-l.done:
		c.Close()
	}
}

func remoteAddr(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// limitedConn gives back the first byte it read, and frees its slot on the first Close.
type limitedConn struct {
	net.Conn
	l       *limitedTransport
	src     netip.Addr
	first   [1]byte
	pending bool // first not yet returned by Read
	once    sync.Once
}

func (c *limitedConn) Read(b []byte) (int, error) {
	if c.pending && len(b) > 0 {
		b[0] = c.first[0]
		c.pending = false
		return 1, nil
	}
	return c.Conn.Read(b)
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.src) })
	return err
}
