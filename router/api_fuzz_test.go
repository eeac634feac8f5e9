package router

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftnet/weft/cni"
)

// apiEndpoints is every route of the control API with its method; the fuzzer picks one by
// index, so new inputs reach every endpoint, plus a path that is none of them.
var apiEndpoints = []struct{ method, path string }{
	{http.MethodGet, "/v1/status"},
	{http.MethodPost, cni.PathAdd},
	{http.MethodPost, cni.PathDel},
	{http.MethodPost, cni.PathCheck},
	{http.MethodPost, cni.PathGC},
	{http.MethodPost, cni.PathStatus},
	{http.MethodGet, "/v1/peers"},
	{http.MethodGet, "/v1/ipam"},
	{http.MethodPost, "/v1/rotate-key"},
	{http.MethodGet, "/v1/routes"},
	{http.MethodGet, "/v1/connections"},
	{http.MethodPost, "/v1/connect"},
	{http.MethodPost, "/v1/forget"},
	{http.MethodPost, "/v1/dns/add"},
	{http.MethodPost, "/v1/dns/remove"},
	{http.MethodGet, "/v1/dns/lookup"},
	{http.MethodPost, "/v1/rmpeer"},
	{http.MethodPost, "/v1/nothing"},
	{http.MethodPost, "/v1/perf"}, // after /v1/nothing: the seeds' indexes stay
	{http.MethodGet, "/v1/trace"},
}

var cniVerb = map[string]bool{cni.PathAdd: true, cni.PathDel: true, cni.PathCheck: true, cni.PathGC: true, cni.PathStatus: true}

// startFuzzPeer starts one real peer, alone, in the network namespace TestMain made for this
// process, so whatever the fuzzer asks of it (connect to an address, attach into a namespace
// path) cannot leave that namespace. It returns the peer and its stop function.
func startFuzzPeer(dir string) (*testPeer, func() error, error) {
	if err := settleHostVeths(); err != nil {
		return nil, nil, err
	}
	cfg := testConfig(dir)
	cfg.Logger = slog.New(slog.DiscardHandler)
	p, err := New(cfg)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-errc:
		cancel()
		return nil, nil, fmt.Errorf("peer did not start: %w", err)
	case <-time.After(10 * time.Second):
		cancel()
		return nil, nil, fmt.Errorf("peer not ready within 10s: %w", <-errc)
	}
	return &testPeer{Peer: p}, func() error { cancel(); return <-errc }, nil
}

// fuzzPeer starts one real peer for a fuzz target, lazily in the process that runs the
// inputs (not in the fuzz coordinator), waits for ready (if given), and stops it when the
// target ends. One peer per namespace (its bridge and devices have fixed names), so fuzz
// these targets with -parallel 1 (make fuzz does).
func fuzzPeer(f *testing.F, ready func(*testPeer) error) func(t *testing.T) (*testPeer, http.Handler) {
	dir := f.TempDir()
	var (
		once  sync.Once
		p     *testPeer
		h     http.Handler
		stop  func() error
		start error
	)
	f.Cleanup(func() {
		if stop != nil {
			if err := stop(); err != nil {
				f.Errorf("peer stopped with %v", err)
			}
		}
	})
	return func(t *testing.T) (*testPeer, http.Handler) {
		t.Helper()
		once.Do(func() {
			if p, stop, start = startFuzzPeer(dir); start != nil {
				return
			}
			h = p.apiHandler()
			if ready != nil {
				start = ready(p)
			}
		})
		if start != nil {
			t.Fatalf("%v (one peer per network namespace: fuzz with -parallel 1)", start)
		}
		return p, h
	}
}

// FuzzControlAPI drives every JSON endpoint of the control API through the real handler of a
// real peer with fuzzed bodies and queries, garbage and valid-but-extreme values alike. Every
// answer is JSON; a failure is a cni.Error with a code and a message, its HTTP status the one
// its code implies; and a refused request changes nothing the peer shows (its status, its
// host veths).
func FuzzControlAPI(f *testing.F) {
	long := strings.Repeat("a", 300)
	label := strings.Repeat("a", 63)
	seeds := []struct {
		ep          int
		body, query string
	}{
		{0, "", ""},
		{1, `{"container_id":"c1","ifname":"eth0","netns":"/nonexistent","cni_network":"n","network":"default","name":"web"}`, ""},
		{1, `{"container_id":"c1","ifname":"eth0","netns":"/nonexistent","cni_network":"n","mtu":65535,"services":["http/tcp/65535","x/udp/0"]}`, ""},
		{1, `{"container_id":"` + long + `","ifname":"` + strings.Repeat("i", 16) + `","netns":"/nonexistent","cni_network":"` + long + `"}`, ""},
		{1, `{"container_id":"c1","ifname":"eth0","netns":"/nonexistent","cni_network":"n","mtu":-1}`, ""},
		{1, `{"container_id":"c1"`, ""},
		{2, `{"container_id":"c1","ifname":"eth0","netns":"","cni_network":"n"}`, ""},
		{3, `{"container_id":"c1","ifname":"eth0","netns":"/nonexistent","cni_network":"n"}`, ""},
		{4, `{"cni_network":"n","valid":[{"container_id":"c1","ifname":"eth0"}]}`, ""},
		{4, `{"cni_network":"` + long + `","valid":[]}`, ""},
		{5, `{"network":"default"}`, ""},
		{5, `{"network":"` + long + `"}`, ""},
		{6, "", ""},
		{7, "", ""},
		{8, "{}", ""},
		{9, "", ""},
		{10, "", ""},
		{11, `{"address":"127.0.0.1:0"}`, ""},
		{11, `{"address":"127.0.0.1:65535"}`, ""},
		{11, `{"address":"0.0.0.0:65536"}`, ""},
		{12, `{"address":"127.0.0.1:6783"}`, ""},
		{13, `{"name":"web","addrs":["10.40.0.9"]}`, ""},
		{13, `{"name":"web","addrs":["10.40.0.9"],"services":["http/tcp/80"]}`, ""},
		{13, `{"name":"` + label + `","addrs":["0.0.0.0","255.255.255.255","::","ffff::1"],"services":["x/tcp/0","y/udp/65535"]}`, ""},
		{13, `{"name":"` + long + `","addrs":["10.40.0.9"]}`, ""},
		{13, `{"name":"web","addrs":[]}`, ""},
		{13, `{"name":"web","addrs":["10.40.0.9/32"]}`, ""},
		{14, `{"name":"web","addrs":["10.40.0.9"]}`, ""},
		{15, "", "name=web"},
		{15, "", "name=" + long},
		{15, "", "name=%00"},
		{16, `{"name":"p1"}`, ""},
		{16, `{"name":"ghost","force":true}`, ""},
		{16, `{"name":"` + long + `"}`, ""},
		{17, `{}`, ""},
		{18, `{"peer":"ghost","seconds":30,"rate":1000000000}`, ""},
		{18, `{"peer":"p1","network":"` + long + `","seconds":-1,"rate":-1}`, ""},
		{19, "", "dst=10.40.0.1"},
		{19, "", "dst=" + long},
	}
	for _, s := range seeds {
		f.Add(uint8(s.ep), false, []byte(s.body), s.query)
	}
	f.Add(uint8(1), true, []byte("{}"), "")
	// The peer starts in the process that runs the inputs, not in the fuzz coordinator: one
	// peer per namespace (its bridge and devices have fixed names), so fuzz this target with
	// -parallel 1 (make fuzz does).
	peer := fuzzPeer(f, nil)
	f.Fuzz(func(t *testing.T, ep uint8, wrongMethod bool, body []byte, query string) {
		p, h := peer(t)
		e := apiEndpoints[int(ep)%len(apiEndpoints)]
		method := e.method
		if wrongMethod {
			method = map[string]string{http.MethodGet: http.MethodPost, http.MethodPost: http.MethodGet}[method]
		}
		target := "http://weft" + e.path
		if query != "" {
			target += "?" + query
		}
		req, err := http.NewRequest(method, target, bytes.NewReader(body))
		if err != nil {
			return // not a request a client can send
		}
		before := takeSnapshot(t, p)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if !json.Valid(w.Body.Bytes()) {
			t.Fatalf("%s %s %q: answer is not JSON: %q", method, e.path, body, w.Body.String())
		}
		if w.Code == http.StatusOK {
			return
		}
		var ae cni.Error
		if err := json.Unmarshal(w.Body.Bytes(), &ae); err != nil || ae.Code == 0 || ae.Message == "" {
			t.Fatalf("%s %s %q: HTTP %d %q: want a cni.Error with a code and a message", method, e.path, body, w.Code, w.Body.String())
		}
		if e.path == "/v1/nothing" || wrongMethod {
			if w.Code != http.StatusNotFound && w.Code != http.StatusMethodNotAllowed {
				t.Fatalf("%s %s: HTTP %d", method, e.path, w.Code)
			}
		} else if want := httpStatus(ae.Code); cniVerb[e.path] && w.Code != want {
			// The operator endpoints choose their status (409 for a conflict); the CNI
			// verbs' status follows from the code, which is all the plugin reads.
			t.Fatalf("%s %s %q: HTTP %d for code %d, want %d", method, e.path, body, w.Code, ae.Code, want)
		}
		if after := takeSnapshot(t, p); !reflect.DeepEqual(before, after) {
			t.Fatalf("%s %s %q refused (%d %s) but changed the peer:\nbefore %+v\nafter  %+v", method, e.path, body, w.Code, ae.Message, before, after)
		}
	})
}
