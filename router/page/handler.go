package page

import (
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

//go:embed assets
var assets embed.FS

// ErrBadRequest is the answer to a query the API cannot serve (bad or unknown parameter).
var ErrBadRequest = errors.New("bad page API request")

// errUnknownPeer: a history query for a (peer, via) with no ring.
var errUnknownPeer = errors.New("no history for this peer")

// Source is what the page reads from the peer. Every method is called from HTTP handlers,
// concurrently: each must be safe for that and return copies it no longer touches.
type Source interface {
	// Snapshot is the mesh as this peer sees it now.
	Snapshot() Snapshot
	// History is the samples of one ring, oldest first; false when there is none.
	History(k HistoryKey) ([]Sample, bool)
	// HistoryKeys lists the rings there are.
	HistoryKeys() []HistoryKey
	// Interfaces is the throughput of the interfaces weft owns.
	Interfaces() []Interface
}

// Config configures the page's handler.
type Config struct {
	Source Source
	Log    *slog.Logger
	// Registerer takes weft_page_bad_requests_total{endpoint}. Required.
	Registerer prometheus.Registerer
}

// Handler serves the page and its JSON.
type Handler struct {
	cfg    Config
	bad    *prometheus.CounterVec
	static http.Handler

	mu    sync.Mutex // guards since
	since map[string]SinceMark
}

// New builds the handler; nothing is served until Register.
func New(cfg Config) (*Handler, error) {
	if cfg.Source == nil || cfg.Registerer == nil {
		return nil, errors.New("page: config needs a source and a registerer")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	bad := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weft_page_bad_requests_total",
		Help: "Requests to the status page's JSON endpoints refused as malformed (bad or unknown parameters), by endpoint.",
	}, []string{"endpoint"})
	if err := cfg.Registerer.Register(bad); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, fmt.Errorf("page: register metrics: %w", err)
		}
		bad = are.ExistingCollector.(*prometheus.CounterVec)
	}
	sub, err := fs.Sub(assets, "assets")
	if err != nil {
		return nil, err
	}
	return &Handler{cfg: cfg, bad: bad, static: http.StripPrefix("/page/", http.FileServerFS(sub)), since: map[string]SinceMark{}}, nil
}

// Register adds the page's routes to mux, each wrapped by guard (the listener's Host
// check): GET / (the page), /page/* (its assets), /api/topology, /api/sla,
// /api/history, /api/interfaces and /api/segments.
func (h *Handler) Register(mux *http.ServeMux, guard func(http.Handler) http.Handler) {
	mux.Handle("GET /{$}", guard(http.HandlerFunc(h.index)))
	mux.Handle("GET /page/", guard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/") { // files only, no listings
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", "no-cache") // revalidated, so an upgraded peer serves its own script
		h.static.ServeHTTP(w, r)
	})))
	mux.Handle("GET /api/topology", guard(h.api("topology", func(*http.Request) (any, error) {
		return BuildTopology(h.cfg.Source.Snapshot()), nil
	})))
	mux.Handle("GET /api/sla", guard(h.api("sla", func(*http.Request) (any, error) { return h.sla(), nil })))
	mux.Handle("GET /api/history", guard(h.api("history", h.history)))
	mux.Handle("GET /api/interfaces", guard(h.api("interfaces", func(*http.Request) (any, error) {
		return h.cfg.Source.Interfaces(), nil
	})))
	mux.Handle("GET /api/segments", guard(h.api("segments", h.segments)))
}

// segments is GET /api/segments[?peer=P]: this peer's paths split into segments.
func (h *Handler) segments(r *http.Request) (any, error) {
	q := r.URL.Query()
	for k := range q {
		if k != "peer" {
			return nil, fmt.Errorf("%w: unknown parameter %q (want peer)", ErrBadRequest, k)
		}
	}
	peer := q.Get("peer")
	if q.Has("peer") && (peer == "" || len(peer) > maxNameLen) {
		return nil, fmt.Errorf("%w: peer must be a peer name of 1 to %d bytes", ErrBadRequest, maxNameLen)
	}
	v := BuildSegments(h.cfg.Source.Snapshot(), peer)
	if peer != "" && len(v.Paths) == 0 {
		return nil, fmt.Errorf("%w: %s has no measured segments", errUnknownPeer, peer)
	}
	return v, nil
}

func (h *Handler) index(w http.ResponseWriter, r *http.Request) {
	b, err := assets.ReadFile("assets/index.html")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Write(b)
}

// SLAView is GET /api/sla.
type SLAView struct {
	Self      string    `json:"self"`
	Generated time.Time `json:"generated"`
	Rows      []SLARow  `json:"rows"`
}

func (h *Handler) sla() SLAView {
	s := h.cfg.Source.Snapshot()
	topo := BuildTopology(s)
	h.mu.Lock()
	rows := BuildSLA(s, topo, h.since)
	h.mu.Unlock()
	return SLAView{Self: s.Self, Generated: s.Now, Rows: rows}
}

// HistoryView is GET /api/history?peer=P&via=V: one ring's samples and summary.
type HistoryView struct {
	HistoryKey
	Summary Summary  `json:"summary"`
	Samples []Sample `json:"samples"`
}

// HistoryRow is one ring's summary in GET /api/history (no parameters): the performance
// table.
type HistoryRow struct {
	HistoryKey
	Summary Summary `json:"summary"`
}

// maxNameLen bounds a peer name in a query (mesh names are at most 64 bytes).
const maxNameLen = 64

func (h *Handler) history(r *http.Request) (any, error) {
	q := r.URL.Query()
	for k := range q {
		if k != "peer" && k != "via" {
			return nil, fmt.Errorf("%w: unknown parameter %q (want peer, via)", ErrBadRequest, k)
		}
	}
	peer, via := q.Get("peer"), q.Get("via")
	if peer == "" && via == "" {
		rows := []HistoryRow{}
		for _, k := range h.cfg.Source.HistoryKeys() {
			if s, ok := h.cfg.Source.History(k); ok {
				rows = append(rows, HistoryRow{HistoryKey: k, Summary: Summarize(s)})
			}
		}
		return rows, nil
	}
	if peer == "" || len(peer) > maxNameLen {
		return nil, fmt.Errorf("%w: peer must be a peer name of 1 to %d bytes", ErrBadRequest, maxNameLen)
	}
	if via == "" {
		via = ViaLink
	}
	if err := ValidVia(via); err != nil {
		return nil, err
	}
	k := HistoryKey{Peer: peer, Via: via}
	s, ok := h.cfg.Source.History(k)
	if !ok {
		return nil, fmt.Errorf("%w: %s via %s", errUnknownPeer, peer, via)
	}
	if s == nil {
		s = []Sample{}
	}
	return HistoryView{HistoryKey: k, Summary: Summarize(s), Samples: s}, nil
}

// api serves fn's answer as JSON; a bad request is 400, counted and logged, an unknown
// ring 404.
func (h *Handler) api(endpoint string, fn func(*http.Request) (any, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, err := fn(r)
		switch {
		case errors.Is(err, ErrBadRequest):
			h.bad.WithLabelValues(endpoint).Inc()
			h.cfg.Log.Warn("page api request refused", "endpoint", endpoint, "query", r.URL.RawQuery, "err", err)
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		case errors.Is(err, errUnknownPeer):
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		case err != nil:
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(v)
	})
}
