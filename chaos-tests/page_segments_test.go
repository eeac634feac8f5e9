package chaostest

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/mesh/segments"
	"github.com/weftnet/weft/router"
	"github.com/weftnet/weft/router/page"
)

// pageShowsSegments checks the segments view in a real browser, on TestSegments' mesh
// (two hosts, a container on each, a 30 ms delay line between them, 15 ms each way on the
// underlay, /status already naming the underlay): the page loaded from A must name the
// underlay as the slow segment of A's path to B, show its container↔container
// (end-to-end) figure up by 30 ± 5 ms and the container↔bridge segments (both ends) under
// 1 ms, and mark the A↔B link in the topology. browser is Chromium's path.
func pageShowsSegments(t *testing.T, ctx context.Context, browser string, a, b *lab.Host) {
	t.Helper()
	start := time.Now()
	br := &pageBrowser{t: t, bin: browser, host: a, url: pageURL, dir: t.TempDir()}
	path := b.Name + "/" + router.DefaultNetwork
	var dom string
	waitFor(t, ctx, 30*time.Second, "the page to name the underlay slow, container↔bridge under 1 ms", func() error {
		dom = br.dumpDOM(ctx)
		tr, ok := pageElement(dom, "tr", "data-segpath", path)
		if !ok {
			return fmt.Errorf("no segments row for %s", path)
		}
		if tr["data-slow"] != segments.Underlay {
			return fmt.Errorf("row %v, want slow %s", tr, segments.Underlay)
		}
		cells := pageRowCells(dom, "data-segpath", path)
		under := cells[segments.Underlay]
		if !strings.Contains(under["class"], "slow") {
			return fmt.Errorf("underlay cell %v not highlighted", under)
		}
		if rtt, _ := strconv.ParseFloat(under["data-rtt-ms"], 64); rtt < 25 {
			return fmt.Errorf("underlay cell %v, want the 30 ms in it", under)
		}
		e2e := cells[segments.EndToEnd]
		now, _ := strconv.ParseFloat(e2e["data-rtt-ms"], 64)
		base, _ := strconv.ParseFloat(e2e["data-baseline-ms"], 64)
		if grown := now - base; grown < 25 || grown > 35 {
			return fmt.Errorf("end-to-end cell %v: up %.2f ms, want 30 ± 5", e2e, grown)
		}
		for _, seg := range []string{segments.Bridge, segments.RemoteBridge} {
			c := cells[seg]
			rtt, err := strconv.ParseFloat(c["data-rtt-ms"], 64)
			if err != nil || rtt >= 1 || c["data-samples"] == "0" || strings.Contains(c["class"], "slow") {
				return fmt.Errorf("%s cell %v: want measured, under 1 ms, not slow", seg, c)
			}
		}
		line, ok := pageElement(dom, "line", "data-link", page.LinkID(a.Name, b.Name))
		if !ok || line["data-slow"] != segments.Underlay || !strings.Contains(line["class"], "slow") {
			return fmt.Errorf("topology link %v: want it marked slow (underlay)", line)
		}
		return nil
	})
	t.Logf("the page named it after %v; segments rows: %s", time.Since(start).Round(time.Second), strings.Join(pageRows(dom, "data-segpath"), "; "))
	shot := filepath.Join(t.ArtifactDir(), "page-segments.png")
	br.screenshot(ctx, shot)
	t.Logf("screenshot of the segments view from %s: %s", a.Name, shot)
}

// segmentPathOf is h's segment path to peer on the default network, from /status.
func segmentPathOf(t *testing.T, h *lab.Host, peer string) (router.SegmentPath, error) {
	var st router.Status
	if err := cliJSON(testCtx(t, 10*time.Second), h, &st, "status"); err != nil {
		return router.SegmentPath{}, err
	}
	if st.Segments == nil {
		return router.SegmentPath{}, fmt.Errorf("no segments section in /status")
	}
	for _, p := range st.Segments.Paths {
		if p.Peer == peer && p.Network == router.DefaultNetwork {
			return p, nil
		}
	}
	return router.SegmentPath{}, fmt.Errorf("no path to %s on the default network: %+v", peer, st.Segments.Paths)
}

// pageDelayLine routes a's and b's traffic to each other through the lab's underlay
// namespace and delays it there by d each way.
func pageDelayLine(t *testing.T, ctx context.Context, l *lab.Lab, a, b *lab.Host, d time.Duration) {
	t.Helper()
	gw := "198.18.0.1"
	for _, cmd := range [][]string{
		{"ip", "-n", l.UnderlayNetNS(), "addr", "add", gw + "/24", "dev", l.Prefix() + "br"},
		{"ip", "netns", "exec", l.UnderlayNetNS(), "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf." + l.Prefix() + "br.send_redirects=0"},
		{"ip", "-n", a.Name, "route", "add", b.Addr.Addr().String() + "/32", "via", gw},
		{"ip", "-n", b.Name, "route", "add", a.Addr.Addr().String() + "/32", "via", gw},
	} {
		if out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", cmd, err, out)
		}
	}
	dl, err := lab.NewDelayLine(lab.DelayConfig{NSPath: "/run/netns/" + l.UnderlayNetNS(), Name: l.Prefix() + "dl", Delay: d,
		Routes: []netip.Prefix{netip.PrefixFrom(a.Addr.Addr(), 32), netip.PrefixFrom(b.Addr.Addr(), 32)}})
	if err != nil {
		t.Fatalf("delay line: %v", err)
	}
	t.Cleanup(func() { dl.Close() })
}

// pageRowCells returns, for the first table row whose attr is val, its cells that carry
// data-segment, by segment.
func pageRowCells(dom, attr, val string) map[string]map[string]string {
	out := map[string]map[string]string{}
	i := strings.Index(dom, attr+`="`+val+`"`)
	if i < 0 {
		return out
	}
	rest := dom[i:]
	if j := strings.Index(rest, "</tr>"); j >= 0 {
		rest = rest[:j]
	}
	for _, m := range pageTag.FindAllStringSubmatch(rest, -1) {
		if m[1] != "td" {
			continue
		}
		attrs := map[string]string{}
		for _, a := range pageAttr.FindAllStringSubmatch(m[2], -1) {
			attrs[a[1]] = a[2]
		}
		if s := attrs["data-segment"]; s != "" {
			out[s] = attrs
		}
	}
	return out
}

// The segments view without a lab: a stand-in source whose path to b has a slow underlay.
// The browser must draw the row, highlight exactly that cell, list the unmeasured link as
// such, and mark the a↔b link in the topology. Fast: one page load.
func TestStatusPageSegmentsView(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("this test needs Debian's chromium package (apt-get install -y chromium; .ci/run installs it): %v", err)
	}
	src := meshOf(3).(stubSource)
	src.s.Segments = []page.SegmentPath{{Peer: "p001", Network: "default", Slow: segments.Underlay, Segments: []page.SegmentFigure{
		{Segment: segments.Bridge, RTTms: 0.04, BaselineRTTms: 0.04, HasBaseline: true, Samples: 20},
		{Segment: segments.Underlay, RTTms: 30.6, BaselineRTTms: 0.4, HasBaseline: true, Grew: true, Samples: 40},
		{Segment: segments.RemoteBridge, RTTms: 0.05, BaselineRTTms: 0.05, HasBaseline: true, Samples: 20},
		{Segment: segments.EndToEnd, RTTms: 30.8, BaselineRTTms: 0.6, HasBaseline: true, Grew: true, Samples: 20, Estimated: true},
	}}}
	h, err := page.New(page.Config{Source: src, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	h.Register(mux, func(h http.Handler) http.Handler { return h })
	srv := httptest.NewServer(mux) // 127.0.0.1
	defer srv.Close()
	ctx := testCtx(t, time.Minute)
	br := &pageBrowser{t: t, bin: browser, url: srv.URL + "/", dir: t.TempDir()}
	dom := br.dumpDOM(ctx)

	tr, ok := pageElement(dom, "tr", "data-segpath", "p001/default")
	if !ok || tr["data-slow"] != segments.Underlay || tr["class"] != "bad" {
		t.Fatalf("segments row %v, want p001/default with the underlay slow", tr)
	}
	cells := pageRowCells(dom, "data-segpath", "p001/default")
	for _, seg := range []string{segments.Bridge, segments.Underlay, segments.Link, segments.RemoteBridge, segments.EndToEnd} {
		c, ok := cells[seg]
		if !ok {
			t.Fatalf("no %s cell in %v", seg, cells)
		}
		if slow := strings.Contains(c["class"], "slow"); slow != (seg == segments.Underlay) {
			t.Fatalf("%s cell %v: only the underlay is highlighted", seg, c)
		}
	}
	if c := cells[segments.Link]; c["data-samples"] != "0" || !strings.Contains(c["class"], "none") {
		t.Fatalf("link cell %v: the source gave no figure, the page shows none", c)
	}
	if !strings.Contains(dom, "(base 0.40 ms)") {
		t.Fatal("the underlay's baseline is not shown")
	}
	line, ok := pageElement(dom, "line", "data-link", "p000--p001")
	if !ok || line["data-slow"] != segments.Underlay || !strings.Contains(line["class"], "slow") {
		t.Fatalf("topology link %v, want it marked slow", line)
	}
	if other, ok := pageElement(dom, "line", "data-link", "p000--p002"); !ok || other["data-slow"] != "" {
		t.Fatalf("p000--p002 %v, want it not marked", other)
	}
}
