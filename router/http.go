package router

import (
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/router/page"
)

// httpHandler serves the loopback listener: Prometheus metrics, status JSON and the status
// page with its JSON (router/page). The status JSON, the page, its JSON and pprof answer
// only requests addressed to this listener by address or as localhost (hostGuard);
// /metrics answers any Host, as scrapers name hosts.
func (p *Peer) httpHandler() http.Handler {
	refused := p.httpRefusedCounter()
	guard := func(h http.Handler) http.Handler { return hostGuard(p.cfg.HTTPAddr, refused, p.log, h) }
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{Registry: p.reg}))
	mux.Handle("GET /status", guard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(p.status())
	})))
	if p.cfg.Pprof {
		mux.Handle("/debug/pprof/", guard(http.HandlerFunc(pprof.Index)))
		mux.Handle("/debug/pprof/profile", guard(http.HandlerFunc(pprof.Profile)))
		mux.Handle("/debug/pprof/symbol", guard(http.HandlerFunc(pprof.Symbol)))
		mux.Handle("/debug/pprof/trace", guard(http.HandlerFunc(pprof.Trace)))
	}
	// The status page (router/page) and its JSON: GET /, /page/*, /api/*.
	pg, err := page.New(page.Config{Source: pageSource{p}, Log: p.log, Registerer: p.reg})
	if err != nil {
		p.log.Warn("status page unavailable", "err", err)
	} else {
		pg.Register(mux, guard)
	}
	return limitBody(mux)
}

// serverLimits bound what one client can hold of an HTTP server.
type serverLimits struct {
	readHeader time.Duration // to send the request line and headers (slowloris)
	read       time.Duration // the whole request, body included
	// write bounds a request's handling and answer: longer than the slowest handler (a CNI
	// ADD that waits for a block claim: the plugin gives up after 60s; a pprof profile: 30s
	// by default). Neither server has a long-poll or streaming endpoint.
	write     time.Duration
	idle      time.Duration // a kept-alive connection between requests
	maxHeader int           // bytes of request line and headers
}

var (
	// apiLimits: the control socket (mode 0600, root's CNI plugin and CLI).
	apiLimits = serverLimits{readHeader: 5 * time.Second, read: 30 * time.Second, write: 90 * time.Second,
		idle: 60 * time.Second, maxHeader: 64 << 10}
	// httpLimits: the metrics and status listener.
	httpLimits = serverLimits{readHeader: 5 * time.Second, read: 10 * time.Second, write: 60 * time.Second,
		idle: 60 * time.Second, maxHeader: 64 << 10}
)

// newHTTPServer is the one way the peer builds an HTTP server: every timeout set, headers
// bounded (bodies are bounded by limitBody in the handlers).
func newHTTPServer(h http.Handler, lim serverLimits, errLog *log.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.readHeader,
		ReadTimeout:       lim.read,
		WriteTimeout:      lim.write,
		IdleTimeout:       lim.idle,
		MaxHeaderBytes:    lim.maxHeader,
		ErrorLog:          errLog,
	}
}

// limitsFor returns the limits of the server named what ("control API" or "http").
func limitsFor(what string) serverLimits {
	if what == "http" {
		return httpLimits
	}
	return apiLimits
}

// limitBody caps every request body at maxRequestBytes: a handler that reads more gets an
// error (and the client 400 or 413), whatever decoder it uses.
func limitBody(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, maxRequestBytes)
		h.ServeHTTP(w, r)
	})
}

// errHostRefused is the answer to a request whose Host names neither this listener nor
// localhost.
var errHostRefused = errors.New("host header names neither this listener's address nor localhost")

// hostGuard refuses (403, counted, logged) requests whose Host header is not one a local
// client uses: a DNS-rebinding page in a browser on this host reaches the listener under
// the attacker's domain name, and the guard refuses that name.
func hostGuard(listen string, refused prometheus.Counter, log *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hostAllowed(r.Host, listen) {
			refused.Inc()
			log.Warn("http request refused", "path", r.URL.Path, "host", r.Host, "remote", r.RemoteAddr, "err", errHostRefused)
			http.Error(w, fmt.Sprintf("%v: %q (use %s or localhost)", errHostRefused, r.Host, listen), http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// hostAllowed reports whether host (a Host header: name or address, with or without port)
// is localhost, a loopback address, or the address listen is bound to (any address of
// the host when listen is unspecified). Only names are refused besides localhost: an
// address literal cannot be rebound, a name can.
func hostAllowed(host, listen string) bool {
	if host == "" {
		return false
	}
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	h = strings.TrimSuffix(strings.Trim(h, "[]"), ".")
	if strings.EqualFold(h, "localhost") {
		return true
	}
	a, err := netip.ParseAddr(h)
	if err != nil {
		return false
	}
	a = a.Unmap()
	if a.IsLoopback() {
		return true
	}
	lh, _, err := net.SplitHostPort(listen)
	if err != nil {
		return false
	}
	la, err := netip.ParseAddr(strings.Trim(lh, "[]"))
	if err != nil {
		return false
	}
	return la.IsUnspecified() || la.Unmap() == a.WithZone("")
}

// httpRefusedCounter registers (once per registry) the counter of refused HTTP requests.
func (p *Peer) httpRefusedCounter() prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "weft_http_refused_total",
		Help: "HTTP requests to the status listener refused because their Host header named neither the listener nor localhost (DNS rebinding).",
	})
	if err := p.reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			return are.ExistingCollector.(prometheus.Counter)
		}
		p.log.Warn("cannot register weft_http_refused_total", "err", err)
	}
	return c
}

// pageSource is the peer as the status page reads it (page.Source). Each call copies what
// it returns; all are safe for concurrent use once the peer runs (the HTTP listener starts
// last).
type pageSource struct{ p *Peer }

// Snapshot is the mesh as this peer sees it: members, this peer's measured links (with the
// mode each uses), every other peer's gossiped links (the mode inferred from both ends'
// metadata, unless the link reports itself encrypted), this peer's chosen paths and its
// paths split into segments (router/segments.go). O(N·D) for N peers of D links each (the
// link table's copy), plus routes' O(K·N), plus segments' O(k·M).
func (s pageSource) Snapshot() page.Snapshot {
	p := s.p
	snap := page.Snapshot{Self: p.cfg.Name, Now: time.Now(), Peers: []page.Peer{}}
	meta := map[string]mesh.Metadata{}
	if p.mesh != nil {
		for _, pr := range p.mesh.Peers() {
			meta[pr.Name] = pr.Meta
			snap.Peers = append(snap.Peers, page.Peer{Name: pr.Name, State: pr.State.String(),
				Address: pr.Meta.Underlay.String(), Self: pr.Self, Since: pr.Since})
		}
	}
	if p.segs != nil {
		snap.Segments = p.segs.figures("").Paths
	}
	pt := p.paths
	if pt == nil || p.links == nil {
		return snap
	}
	snap.SLA = pt.def.sla
	modes := p.linkModes()
	measured := pt.measured().All()
	for dest, st := range measured {
		snap.Links = append(snap.Links, page.Link{From: p.cfg.Name, To: dest, Mode: modes[dest], Up: st.Up,
			RTT: st.RTT, Jitter: st.Jitter, Loss: st.Loss})
	}
	for from, links := range pt.table.Graph() {
		if from == p.cfg.Name {
			continue
		}
		for to, lm := range links {
			l := page.Link{From: from, To: to, Up: lm.Up, RTT: lm.RTT, Jitter: lm.Jitter, Loss: lm.Loss}
			switch {
			case lm.Encrypted:
				l.Mode = page.ModeWireGuard
			case to == p.cfg.Name:
				l.Mode = modes[from]
			default:
				l.Mode, l.ModeInferred = inferMode(p.links.pol, meta[from], meta[to]), true
			}
			snap.Links = append(snap.Links, l)
		}
	}
	for _, r := range p.routes() {
		if _, ok := measured[r.Peer]; !ok && r.Estimated {
			// A peer outside the probe set: its link is drawn as the estimate path choice
			// uses, so that a large mesh shows every peer joined to this one.
			snap.Links = append(snap.Links, page.Link{From: p.cfg.Name, To: r.Peer, Mode: modes[r.Peer], Up: true,
				RTT: fromMs(r.RTTms), Estimated: true})
		}
		snap.Routes = append(snap.Routes, page.Route{Peer: r.Peer, Path: r.Path, SLA: r.SLA, SLAOK: r.SLAOK,
			Since: r.Since, Reason: r.Reason, RTT: fromMs(r.RTTms), Jitter: fromMs(r.JitterMs), Loss: r.Loss,
			Estimated: r.Estimated, Networks: r.Networks})
	}
	return snap
}

func fromMs(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }

// inferMode is the mode the link rule (plan.ChooseLink) picks between two other peers,
// seen from a's side: a's underlay with this peer's prefix length and --no-direct (the lab
// and most clusters share one underlay plan and one set of flags), a's gossiped modes and
// encryption settings. "" when either end's metadata is unknown or no mode fits.
func inferMode(pol linkPolicy, a, b mesh.Metadata) string {
	if !a.Underlay.IsValid() || !b.Underlay.IsValid() {
		return ""
	}
	pol.UnderlayPrefix = netip.PrefixFrom(a.Underlay, pol.UnderlayPrefix.Bits())
	pol.Encrypt, pol.Trusted = a.Encrypt, a.TrustedSubnets
	pol.Modes = nil
	for _, m := range []string{datapath.ModeDirect, datapath.ModeVXLAN, datapath.ModeWireGuard} { // cheapest first
		if slices.Contains(a.Capabilities, m) && (m != datapath.ModeDirect || !pol.NoDirect) {
			pol.Modes = append(pol.Modes, m)
		}
	}
	return chooseLink(pol, b).Mode
}

func (s pageSource) History(k page.HistoryKey) ([]page.Sample, bool) {
	return s.p.history.linkSamples(k)
}

func (s pageSource) HistoryKeys() []page.HistoryKey { return s.p.history.keys() }

func (s pageSource) Interfaces() []page.Interface { return s.p.history.interfaces() }
