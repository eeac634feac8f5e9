package router

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/router/page"
)

func TestHostAllowed(t *testing.T) {
	for _, tc := range []struct {
		host, listen string
		want         bool
	}{
		{"127.0.0.1:6782", "127.0.0.1:6782", true},
		{"localhost:6782", "127.0.0.1:6782", true},
		{"LOCALHOST", "127.0.0.1:6782", true},
		{"localhost.:6782", "127.0.0.1:6782", true},
		{"[::1]:6782", "127.0.0.1:6782", true},
		{"127.0.0.2", "127.0.0.1:6782", true},
		{"10.0.0.5:6782", "10.0.0.5:6782", true},
		{"10.0.0.6:6782", "10.0.0.5:6782", false},
		{"10.0.0.6:6782", "0.0.0.0:6782", true},
		{"[fd00::1]:6782", "[::]:6782", true},
		{"rebind.attacker.example:6782", "127.0.0.1:6782", false},
		{"rebind.attacker.example", "0.0.0.0:6782", false},
		{"localhost.attacker.example", "127.0.0.1:6782", false},
		{"", "127.0.0.1:6782", false},
	} {
		if got := hostAllowed(tc.host, tc.listen); got != tc.want {
			t.Errorf("hostAllowed(%q, %q) = %v, want %v", tc.host, tc.listen, got, tc.want)
		}
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// bareHTTPPeer has what the handlers need before they reach the peer's state.
func bareHTTPPeer(httpAddr string) *Peer {
	reg := prometheus.NewRegistry()
	return &Peer{cfg: Config{HTTPAddr: httpAddr, Pprof: true}, log: slog.New(slog.DiscardHandler), reg: reg, metrics: newMetrics(reg)}
}

// /status, the page and pprof refuse a rebinding Host (before touching any state: the bare
// peer would panic); /metrics answers it.
func TestStatusRefusesForeignHost(t *testing.T) {
	p := bareHTTPPeer("127.0.0.1:6782")
	h := p.httpHandler()
	paths := []string{"/status", "/", "/debug/pprof/", "/page/app.js", "/api/topology", "/api/sla", "/api/history", "/api/interfaces"}
	for _, path := range paths {
		r := httptest.NewRequest(http.MethodGet, "http://rebind.attacker.example:6782"+path, nil)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "rebind.attacker.example") {
			t.Fatalf("GET %s with a foreign Host: %d %q", path, w.Code, w.Body.String())
		}
	}
	refused := p.httpRefusedCounter() // the registered one
	if v := counterValue(t, refused); v != float64(len(paths)) {
		t.Fatalf("weft_http_refused_total = %v, want %d", v, len(paths))
	}
	r := httptest.NewRequest(http.MethodGet, "http://prometheus-scrapes-by-name:6782/metrics", nil)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), fmt.Sprintf("weft_http_refused_total %d", len(paths))) {
		t.Fatalf("/metrics: %d", w.Code)
	}
}

// Every POST of the control API is bounded: a body over the limit is refused whatever the
// endpoint, and counted as a failed request.
func TestAPIBodyLimit(t *testing.T) {
	p := bareHTTPPeer("")
	h := p.apiHandler()
	big := `{"name":"` + strings.Repeat("a", maxRequestBytes) + `"}`
	for _, path := range []string{"/v1/dns/add", cni.PathAdd, "/v1/rmpeer"} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "http://weft"+path, strings.NewReader(big)))
		if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "too large") {
			t.Fatalf("POST %s of %d bytes: %d %s", path, len(big), w.Code, w.Body.String())
		}
	}
}

// listenBoth returns a TCP listener on loopback and a Unix socket listener.
func testListeners(t *testing.T) map[string]net.Listener {
	t.Helper()
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ul, err := net.Listen("unix", filepath.Join(t.TempDir(), "api.sock"))
	if err != nil {
		t.Fatal(err)
	}
	return map[string]net.Listener{"tcp": tl, "unix": ul}
}

func startLimited(t *testing.T, ln net.Listener, lim serverLimits) {
	t.Helper()
	srv := newHTTPServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), lim, nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
}

// readUntilClosed reads c until the server closes it, or fails after d.
func readUntilClosed(t *testing.T, c net.Conn, d time.Duration, what string) time.Duration {
	t.Helper()
	start := time.Now()
	c.SetReadDeadline(start.Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: connection still open after %v", what, d)
	}
	return time.Since(start)
}

// A client that sends headers slowly, or idles on a kept-alive connection, is cut off;
// oversized headers are refused. On TCP (the status listener) and on the control socket.
func TestServerTimeouts(t *testing.T) {
	lim := serverLimits{readHeader: 300 * time.Millisecond, read: time.Second, write: time.Second,
		idle: 300 * time.Millisecond, maxHeader: 4 << 10}
	for netw, ln := range testListeners(t) {
		t.Run(netw, func(t *testing.T) {
			startLimited(t, ln, lim)
			addr := ln.Addr().String()

			slow, err := net.Dial(netw, addr)
			if err != nil {
				t.Fatal(err)
			}
			defer slow.Close()
			io.WriteString(slow, "GET / HTTP/1.1\r\nHost: localhost\r\n") // and never the end
			if d := readUntilClosed(t, slow, 5*time.Second, "slow headers"); d < lim.readHeader/2 {
				t.Fatalf("slow headers cut after %v, before the timeout", d)
			}

			idle, err := net.Dial(netw, addr)
			if err != nil {
				t.Fatal(err)
			}
			defer idle.Close()
			io.WriteString(idle, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(idle), nil)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("first request: %v %v", resp, err)
			}
			resp.Body.Close()
			readUntilClosed(t, idle, 5*time.Second, "idle keep-alive")

			big, err := net.Dial(netw, addr)
			if err != nil {
				t.Fatal(err)
			}
			defer big.Close()
			var b bytes.Buffer
			b.WriteString("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
			b.WriteString(strings.Repeat("x", 64<<10))
			b.WriteString("\r\n\r\n")
			big.Write(b.Bytes())
			resp, err = http.ReadResponse(bufio.NewReader(big), nil)
			if err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
				t.Fatalf("64 KiB of headers: %v %v", resp, err)
			}
		})
	}
}

// Both servers of the peer have every bound set.
func TestServerLimitsSet(t *testing.T) {
	for _, what := range []string{"control API", "http"} {
		srv := newHTTPServer(http.NotFoundHandler(), limitsFor(what), nil)
		if srv.ReadHeaderTimeout <= 0 || srv.ReadTimeout <= 0 || srv.WriteTimeout <= 0 || srv.IdleTimeout <= 0 || srv.MaxHeaderBytes <= 0 {
			t.Fatalf("%s server without a bound: %+v", what, srv)
		}
		if srv.WriteTimeout < 60*time.Second {
			t.Fatalf("%s write timeout %v is shorter than the CNI plugin's 60s or a default profile", what, srv.WriteTimeout)
		}
	}
}

// A body sent slowly is cut at the read timeout; a handler slower than the write timeout
// gets no answer out (the client sees the connection closed).
func TestServerReadAndWriteTimeouts(t *testing.T) {
	lim := serverLimits{readHeader: 300 * time.Millisecond, read: 400 * time.Millisecond, write: 300 * time.Millisecond,
		idle: time.Second, maxHeader: 4 << 10}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newHTTPServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(lim.write + 200*time.Millisecond) // a handler slower than the bound, not a wait
		}
		if _, err := io.ReadAll(r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		io.WriteString(w, "ok")
	}), lim, nil)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	addr := ln.Addr().String()

	body, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	io.WriteString(body, "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nx") // and 99 bytes never
	if d := readUntilClosed(t, body, 5*time.Second, "slow body"); d < lim.read/2 {
		t.Fatalf("slow body cut after %v, before the read timeout", d)
	}

	slow, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	io.WriteString(slow, "GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
	slow.SetReadDeadline(time.Now().Add(5 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(slow), nil); err == nil {
		t.Fatalf("a handler past the write timeout still answered %d", resp.StatusCode)
	}
}

// The page and its JSON on a running peer: the page loads, the topology lists this peer,
// the history rings fill from the sampler, and a bad query is refused (400) and counted.
func TestPageOnPeer(t *testing.T) {
	p := startPeer(t, t.TempDir())
	h := p.httpHandler()
	get := func(path string) *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "http://localhost"+path, nil))
		return w
	}
	if w := get("/"); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `id="topo"`) {
		t.Fatalf("GET /: %d", w.Code)
	}
	var topo page.Topology
	if w := get("/api/topology"); w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &topo) != nil {
		t.Fatalf("GET /api/topology: %d %s", w.Code, w.Body.String())
	}
	if topo.Self != "p1" || len(topo.Peers) != 1 || !topo.Peers[0].Self || topo.Peers[0].State != "alive" {
		t.Fatalf("topology %+v", topo)
	}
	var sla page.SLAView
	if w := get("/api/sla"); w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &sla) != nil || sla.Self != "p1" {
		t.Fatalf("GET /api/sla: %d %s", w.Code, w.Body.String())
	}
	// The sampler reads the interfaces at start: the peer's bridge is weft's.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var ifs []page.Interface
		w := get("/api/interfaces")
		if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &ifs) != nil {
			t.Fatalf("GET /api/interfaces: %d %s", w.Code, w.Body.String())
		}
		// The row is the one weft_iface_* exports: kind and network from the segments part.
		if slices.ContainsFunc(ifs, func(i page.Interface) bool {
			return i.Name == "weft" && i.Kind == "bridge" && i.Network == DefaultNetwork
		}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the bridge weft is not among the interfaces: %+v", ifs)
		}
		time.Sleep(100 * time.Millisecond) // polling for the sampler, with a deadline
	}
	var segs page.SegmentsView
	if w := get("/api/segments"); w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &segs) != nil ||
		segs.Self != "p1" || segs.Paths == nil || len(segs.Order) != 5 {
		t.Fatalf("GET /api/segments: %d %s", w.Code, w.Body.String())
	}
	if w := get("/api/segments?peer=p2"); w.Code != http.StatusNotFound {
		t.Fatalf("segments of an unknown peer: %d", w.Code)
	}
	if w := get("/api/history?peer=p2&via=over-the-rainbow"); w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "over-the-rainbow") {
		t.Fatalf("bad via: %d %s", w.Code, w.Body.String())
	}
	if w := get("/api/history?peer=p2"); w.Code != http.StatusNotFound {
		t.Fatalf("unknown peer: %d", w.Code)
	}
	if w := get("/metrics"); !strings.Contains(w.Body.String(), `weft_page_bad_requests_total{endpoint="history"} 1`) {
		t.Fatal("the bad query is not counted in /metrics")
	}
}

func TestInferMode(t *testing.T) {
	pol := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan", "wireguard"}}
	caps := []string{"direct", "vxlan", "wireguard"}
	mac := []byte{2, 0, 0, 0, 0, 1}
	var key [32]byte
	key[0] = 7
	a := mesh.Metadata{Name: "a", Underlay: netip.MustParseAddr("192.0.2.20"), Capabilities: caps, VTEPMAC: mac, WireGuardKey: key}
	b := mesh.Metadata{Name: "b", Underlay: netip.MustParseAddr("192.0.2.30"), Capabilities: caps, VTEPMAC: mac, WireGuardKey: key}
	c := mesh.Metadata{Name: "c", Underlay: netip.MustParseAddr("198.51.100.30"), Capabilities: caps, VTEPMAC: mac, WireGuardKey: key}
	if m := inferMode(pol, a, b); m != "direct" {
		t.Fatalf("same segment: %q", m)
	}
	if m := inferMode(pol, a, c); m != "vxlan" {
		t.Fatalf("other segment: %q", m)
	}
	pol.NoDirect = true
	if m := inferMode(pol, a, b); m != "vxlan" {
		t.Fatalf("same segment with --no-direct: %q", m)
	}
	a.Encrypt = true
	if m := inferMode(pol, a, c); m != "wireguard" {
		t.Fatalf("a encrypts: %q", m)
	}
	if m := inferMode(pol, a, mesh.Metadata{Name: "d"}); m != "" {
		t.Fatalf("unknown metadata: %q", m)
	}
}
