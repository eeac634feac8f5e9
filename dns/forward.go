package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// forwarder is the last handler of the chain: it answers everything the
// weft zone does not, from the cache or from the upstream resolvers, tried
// in order with a timeout per try. When every upstream fails it returns
// SERVFAIL for the server to write.
type forwarder struct {
	static     []string // explicit upstreams, ip:port; when empty, resolv.conf
	resolvPath string
	check      time.Duration
	timeout    time.Duration
	udpSize    uint16
	defPort    string // port for resolv.conf nameservers ("53"; tests change it)
	now        func() time.Time
	log        *slog.Logger
	m          *metrics
	cache      *cache
	selfAddrs  func() map[string]bool // addresses the server listens on

	mu        sync.Mutex // guards the resolv.conf state below
	checked   time.Time  // last stat of resolv.conf
	modTime   time.Time
	size      int64
	loaded    bool
	fromFile  []string
	readError string // last error logged, to log each once

	// flights are the upstream questions in flight, by cache key: an
	// identical question asked meanwhile waits for the same answer instead
	// of asking again, so a burst of one name costs one upstream query.
	// O(questions in flight) memory, bounded by the slow pool's workers plus
	// the TCP connections.
	fmu       sync.Mutex // guards flights
	flights   map[cacheKey]*flight
	coalesced prometheus.Counter
}

// flight is one upstream question in flight; done is closed when resp or err is set.
type flight struct {
	done chan struct{}
	resp *mdns.Msg // read-only once done: waiters copy it
	err  error
}

// errNoUpstream means there is no upstream to forward to.
var errNoUpstream = errors.New("no upstream resolver")

func (f *forwarder) Name() string { return "forward" }

// upstreams returns the upstreams to try, re-reading resolv.conf when its
// modification time or size changed (checked at most every f.check).
func (f *forwarder) upstreams() []string {
	var list []string
	if len(f.static) > 0 {
		list = f.static
	} else {
		list = f.fileUpstreams()
	}
	self := f.selfAddrs()
	out := make([]string, 0, len(list))
	for _, u := range list {
		if !self[u] {
			out = append(out, u)
		}
	}
	return out
}

func (f *forwarder) fileUpstreams() []string {
	now := f.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.loaded && now.Sub(f.checked) < f.check {
		return f.fromFile
	}
	f.checked = now
	st, err := os.Stat(f.resolvPath)
	if err != nil {
		f.logOnce("cannot stat resolv.conf; keeping the last upstreams", err)
		return f.fromFile
	}
	if f.loaded && st.ModTime().Equal(f.modTime) && st.Size() == f.size {
		return f.fromFile
	}
	cc, err := mdns.ClientConfigFromFile(f.resolvPath)
	if err != nil {
		f.logOnce("cannot read resolv.conf; keeping the last upstreams", err)
		return f.fromFile
	}
	var list []string
	for _, s := range cc.Servers {
		a, err := upstreamAddr(s, f.defPort)
		if err != nil {
			f.log.Warn("resolv.conf: skipping nameserver", "path", f.resolvPath, "err", err)
			continue
		}
		list = append(list, a)
	}
	f.loaded, f.modTime, f.size, f.fromFile, f.readError = true, st.ModTime(), st.Size(), list, ""
	f.log.Info("dns upstreams loaded", "path", f.resolvPath, "upstreams", list)
	return list
}

func (f *forwarder) logOnce(msg string, err error) {
	if s := err.Error(); s != f.readError {
		f.readError = s
		f.log.Warn(msg, "path", f.resolvPath, "err", err)
	}
}

func (f *forwarder) ServeDNS(ctx context.Context, w mdns.ResponseWriter, r *mdns.Msg) (int, error) {
	resp := f.cache.get(r)
	if resp != nil {
		f.m.cacheHits.Inc()
	} else {
		f.m.cacheMisses.Inc()
		var err error
		if resp, err = f.resolve(ctx, r); err != nil {
			return mdns.RcodeServerFailure, err
		}
	}
	resp.Id = r.Id
	resp.Question = r.Question // as asked, case included
	resp.RecursionAvailable = true
	resp.Authoritative = false
	writeResponse(w, r, resp, f.udpSize, f.m)
	return resp.Rcode, nil
}

// resolve forwards r upstream, or waits for the identical question already
// in flight, and caches the answer. It returns a copy the caller may change.
func (f *forwarder) resolve(ctx context.Context, r *mdns.Msg) (*mdns.Msg, error) {
	k := keyOf(r)
	f.fmu.Lock()
	if fl, ok := f.flights[k]; ok {
		f.fmu.Unlock()
		f.coalesced.Inc()
		select {
		case <-fl.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if fl.err != nil {
			return nil, fl.err
		}
		return fl.resp.Copy(), nil
	}
	fl := &flight{done: make(chan struct{})}
	f.flights[k] = fl
	f.fmu.Unlock()

	fl.resp, fl.err = f.forward(ctx, r)
	if fl.err == nil {
		f.cache.put(r, fl.resp)
	}
	f.fmu.Lock()
	delete(f.flights, k)
	f.fmu.Unlock()
	close(fl.done)
	if fl.err != nil {
		return nil, fl.err
	}
	return fl.resp.Copy(), nil
}

// forward asks each upstream in turn and returns the first answer that is
// not SERVFAIL or REFUSED.
func (f *forwarder) forward(ctx context.Context, r *mdns.Msg) (*mdns.Msg, error) {
	ups := f.upstreams()
	if len(ups) == 0 {
		f.m.forwards.WithLabelValues(forwardNoServer).Inc()
		return nil, errNoUpstream
	}
	q := new(mdns.Msg)
	q.Id = mdns.Id()
	q.Question = []mdns.Question{r.Question[0]}
	q.RecursionDesired = r.RecursionDesired
	q.CheckingDisabled = r.CheckingDisabled
	do := false
	if o := r.IsEdns0(); o != nil {
		do = o.Do()
	}
	q.SetEdns0(f.udpSize, do)

	var errs []error
	for _, u := range ups {
		if ctx.Err() != nil {
			errs = append(errs, ctx.Err())
			break
		}
		start := time.Now()
		resp, err := f.exchange(ctx, q, u)
		switch {
		case err != nil:
			f.m.forwards.WithLabelValues(forwardError).Inc()
			errs = append(errs, fmt.Errorf("upstream %s: %w", u, err))
			continue
		case resp.Rcode == mdns.RcodeServerFailure || resp.Rcode == mdns.RcodeRefused:
			f.m.forwards.WithLabelValues(forwardRcode).Inc()
			errs = append(errs, fmt.Errorf("upstream %s: %s", u, mdns.RcodeToString[resp.Rcode]))
			continue
		}
		f.m.forwards.WithLabelValues(forwardOK).Inc()
		f.m.forwardTime.Observe(time.Since(start).Seconds())
		return resp, nil
	}
	f.m.forwards.WithLabelValues(forwardAllFail).Inc()
	return nil, fmt.Errorf("forward %s %s: %w", r.Question[0].Name, mdns.TypeToString[r.Question[0].Qtype], errors.Join(errs...))
}

// exchange does one try at one upstream: UDP, then TCP if the answer was
// truncated. The answer must match the question.
func (f *forwarder) exchange(ctx context.Context, q *mdns.Msg, upstream string) (*mdns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	c := &mdns.Client{Net: "udp", UDPSize: f.udpSize, Timeout: f.timeout}
	resp, _, err := c.ExchangeContext(ctx, q, upstream)
	if err == nil && resp.Truncated {
		c.Net = "tcp"
		resp, _, err = c.ExchangeContext(ctx, q, upstream)
	}
	if err != nil {
		return nil, err
	}
	if len(resp.Question) != 1 || !strings.EqualFold(resp.Question[0].Name, q.Question[0].Name) ||
		resp.Question[0].Qtype != q.Question[0].Qtype || !resp.Response {
		return nil, fmt.Errorf("answer does not match the question")
	}
	return resp, nil
}

// selfAddrSet returns the listen addresses as "ip:port" strings.
func selfAddrSet(addrs []net.Addr) map[string]bool {
	m := make(map[string]bool, len(addrs))
	for _, a := range addrs {
		if u, ok := a.(*net.UDPAddr); ok {
			ap := u.AddrPort()
			m[netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()] = true
		}
	}
	return m
}
