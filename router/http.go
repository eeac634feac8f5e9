package router

import (
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

var statusPage = template.Must(template.New("status").Parse(`<!doctype html>
<html><head><meta charset="utf-8"><title>weft · {{.Name}}</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}</style>
</head><body>
<h1>weft peer {{.Name}}</h1>
<p>version {{.Version}} · up {{.Uptime}} · <a href="/metrics">metrics</a> · <a href="/status">status JSON</a></p>
<h2>Networks</h2>
<table><tr><th>network</th><th>subnet</th><th>bridge</th><th>gateway</th><th>blocks (used/free)</th></tr>
{{range .Networks}}<tr><td>{{.Name}}</td><td>{{.Subnet}}</td><td>{{.Bridge}}</td><td>{{.Gateway}}</td>
<td>{{range .Blocks}}{{.CIDR}} ({{.Used}}/{{.Free}}) {{end}}</td></tr>{{end}}
</table>
<h2>Attachments</h2>
<table><tr><th>name</th><th>address</th><th>container</th><th>ifname</th><th>host interface</th></tr>
{{range .Attachments}}<tr><td>{{.Name}}</td><td>{{.Address}}</td><td>{{.ContainerID}}</td><td>{{.IfName}}</td><td>{{.HostIfName}}</td></tr>{{end}}
</table></body></html>
`))

// httpHandler serves the loopback listener: Prometheus metrics, status JSON and a page.
// The status JSON, the page and pprof answer only requests addressed to this listener by
// address or as localhost (hostGuard); /metrics answers any Host, as scrapers name hosts.
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
	mux.Handle("GET /{$}", guard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		statusPage.Execute(w, p.status())
	})))
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
