package chaostest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/mesh/pathsel"
	"github.com/weftnet/weft/router/page"
)

// The status page in a real browser: headless Chromium, run inside host A's namespace
// (the lab's peers serve --http-addr on 127.0.0.1:6782 there), loads the page from A and
// the test reads the DOM the page's JavaScript built. All three peers and every link with
// its mode and RTT must be there; a screenshot is kept as a test artefact (go test
// -artifacts keeps it; the log names the path; WEFT_PAGE_SCREENSHOT=FILE also copies the
// relayed view there, which is how router/page/screenshot.png is made). Then A↔C is cut:
// within 10 s the page must draw that link red and A's path to C through B.
func TestStatusPage(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("this test needs Debian's chromium package (apt-get install -y chromium; .ci/run installs it): %v", err)
	}
	l := newMeshLab(t, "tpage", 3, "--no-direct", "--probe-interval", "200ms", "--sla", "gold: rtt<=20ms")
	ctx := testCtx(t, 4*time.Minute)
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	br := &pageBrowser{t: t, bin: browser, host: a, url: pageURL, dir: t.TempDir()}
	waitFor(t, ctx, 30*time.Second, "A's measured direct paths to B and C", func() error {
		for _, h := range []*lab.Host{b, c} {
			if r := routeTo(t, a, h.Name); len(r.Path) != 1 || r.Estimated || r.Unmeasured || !r.Direct.Up {
				return fmt.Errorf("route to %s: %+v", h.Name, r)
			}
		}
		return nil
	})

	pairs := [][2]string{{a.Name, b.Name}, {a.Name, c.Name}, {b.Name, c.Name}}
	var dom string
	waitFor(t, ctx, 90*time.Second, "the page to show 3 peers and 3 links with mode and RTT", func() error {
		dom = br.dumpDOM(ctx)
		for _, h := range l.Hosts() {
			if !strings.Contains(dom, `id="peer-`+h.Name+`"`) {
				return fmt.Errorf("peer %s not drawn", h.Name)
			}
		}
		for _, p := range pairs {
			id := p[0] + "--" + p[1]
			row, ok := pageElement(dom, "tr", "data-link", id)
			if !ok {
				return fmt.Errorf("no row for link %s", id)
			}
			rtt, err := strconv.ParseFloat(row["data-rtt-ms"], 64)
			if row["data-mode"] != "vxlan" || row["data-state"] != "up" || err != nil || rtt <= 0 {
				return fmt.Errorf("link %s: %v, want vxlan, up, an RTT", id, row)
			}
			if _, ok := pageElement(dom, "line", "data-link", id); !ok {
				return fmt.Errorf("link %s listed but not drawn", id)
			}
		}
		return nil
	})
	t.Logf("rendered: %s", strings.Join(pageRows(dom, "data-link"), "; "))
	for _, want := range []string{`id="perf-table"`, `id="sla-table"`, `data-pair="` + a.Name + `&gt;` + c.Name + `"`, `data-iface="weft"`} {
		if !strings.Contains(dom, want) {
			t.Fatalf("the page lacks %s", want)
		}
	}
	shot := filepath.Join(t.ArtifactDir(), "page-3-hosts.png")
	br.screenshot(ctx, shot)
	t.Logf("screenshot of the page from %s: %s", a.Name, shot)

	if err := l.Partition([]*lab.Host{a}, []*lab.Host{c}); err != nil {
		t.Fatal(err)
	}
	blocked := time.Now()
	idAC := a.Name + "--" + c.Name
	waitFor(t, ctx, 10*time.Second, "the page to show A↔C red and A's path to C through B", func() error {
		dom = br.dumpDOM(ctx)
		row, ok := pageElement(dom, "tr", "data-link", idAC)
		if !ok || row["data-sla"] != "violated" || row["class"] != "bad" {
			return fmt.Errorf("link %s: %v, want it violated and red", idAC, row)
		}
		line, ok := pageElement(dom, "line", "data-link", idAC)
		if !ok || !strings.Contains(line["class"], "bad") {
			return fmt.Errorf("drawn link %s: %v, want class bad", idAC, line)
		}
		rel, ok := pageElement(dom, "path", "data-from", a.Name)
		if !ok || rel["data-to"] != c.Name || rel["data-via"] != b.Name {
			return fmt.Errorf("relay drawn: %v, want %s through %s", rel, c.Name, b.Name)
		}
		return nil
	})
	t.Logf("the page showed %s red and the relay through %s %v after the block", idAC, b.Name, time.Since(blocked).Round(100*time.Millisecond))
	shot = filepath.Join(t.ArtifactDir(), "page-relayed.png")
	br.screenshot(ctx, shot)
	t.Logf("screenshot with A↔C blocked: %s", shot)
	if dst := os.Getenv("WEFT_PAGE_SCREENSHOT"); dst != "" {
		if err := pageCopyFile(shot, dst); err != nil {
			t.Fatalf("copy the screenshot to %s: %v", dst, err)
		}
		t.Logf("screenshot copied to %s", dst)
	}
	if err := l.Heal(); err != nil {
		t.Fatal(err)
	}
}

// pageBrowser runs headless Chromium against a page: in a lab host's namespace (its peer's
// page), or in the test's own when host is nil.
type pageBrowser struct {
	t    *testing.T
	bin  string
	host *lab.Host
	url  string
	dir  string // profile and HOME, a test temp dir
}

// pageURL: the lab's peers listen on loopback inside their namespace (lab/host.go).
const pageURL = "http://127.0.0.1:6782/"

// run runs chromium with args; it lets the page run 5 s of virtual time (the page polls
// every 2 s), in its own process group so that a timeout kills it with its children.
func (br *pageBrowser) run(ctx context.Context, args ...string) []byte {
	br.t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	argv := []string{br.bin, "--headless", "--disable-gpu", "--no-sandbox",
		"--no-first-run", "--disable-extensions", "--hide-scrollbars", "--user-data-dir=" + filepath.Join(br.dir, "profile"),
		"--virtual-time-budget=5000"}
	argv = append(append(argv, args...), br.url)
	if br.host != nil {
		argv = append([]string{"ip", "netns", "exec", br.host.Name}, argv...)
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "HOME="+br.dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		br.t.Fatalf("chromium %v: %v\n%s", args, err, pageLastLines(stderr.String(), 20))
	}
	return stdout.Bytes()
}

func (br *pageBrowser) dumpDOM(ctx context.Context) string {
	br.t.Helper()
	return string(br.run(ctx, "--dump-dom"))
}

func (br *pageBrowser) screenshot(ctx context.Context, file string) {
	br.t.Helper()
	br.run(ctx, "--window-size=1100,1600", "--screenshot="+file)
	if st, err := os.Stat(file); err != nil || st.Size() == 0 {
		br.t.Fatalf("no screenshot at %s: %v", file, err)
	}
}

var (
	pageTag  = regexp.MustCompile(`<([a-z]+)\s([^>]*)>`)
	pageAttr = regexp.MustCompile(`([a-zA-Z0-9_:-]+)="([^"]*)"`)
)

// pageElement finds the first element tag whose attribute attr is val in a serialized DOM
// and returns its attributes.
func pageElement(dom, tag, attr, val string) (map[string]string, bool) {
	for _, m := range pageTag.FindAllStringSubmatch(dom, -1) {
		if m[1] != tag {
			continue
		}
		attrs := map[string]string{}
		for _, a := range pageAttr.FindAllStringSubmatch(m[2], -1) {
			attrs[a[1]] = strings.ReplaceAll(a[2], "&gt;", ">")
		}
		if attrs[attr] == val {
			return attrs, true
		}
	}
	return nil, false
}

// pageRows lists the table rows carrying attr, for the log.
func pageRows(dom, attr string) []string {
	var out []string
	for _, m := range pageTag.FindAllStringSubmatch(dom, -1) {
		if m[1] == "tr" && strings.Contains(m[2], attr+"=") {
			out = append(out, m[2])
		}
	}
	return out
}

func pageLastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func pageCopyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// A 100-peer mesh in the browser is a wheel of one peer's links, not a hairball: the page
// (served here from a stand-in source on loopback, every pair linked, 4950 links) draws
// only the focus peer's 99 links, without labels; a focus and a filter in the URL narrow it
// to the chosen peer and the peers the filter matches.
func TestStatusPage100Peers(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("this test needs Debian's chromium package (apt-get install -y chromium; .ci/run installs it): %v", err)
	}
	h, err := page.New(page.Config{Source: meshOf(100), Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	h.Register(mux, func(h http.Handler) http.Handler { return h })
	srv := httptest.NewServer(mux) // 127.0.0.1
	defer srv.Close()
	ctx := testCtx(t, 2*time.Minute)
	count := func(dom, s string) int { return strings.Count(dom, s) }

	br := &pageBrowser{t: t, bin: browser, url: srv.URL + "/", dir: t.TempDir()}
	dom := br.dumpDOM(ctx)
	if n := count(dom, `<g id="peer-`); n != 100 {
		t.Fatalf("%d peers drawn, want 100", n)
	}
	if n, rows := count(dom, `<line id="link-`), count(dom, `<tr data-link=`); n != 99 || rows != 99 {
		t.Fatalf("%d links drawn and %d listed, want the focus peer's 99", n, rows)
	}
	if n := count(dom, `class="link-label"`); n != 0 {
		t.Fatalf("%d link labels on a 99-spoke wheel, want none (figures in tooltips and the table)", n)
	}
	if _, ok := pageElement(dom, "path", "data-via", "p001"); !ok {
		t.Fatal("the relayed path through p001 is not drawn")
	}
	shot := filepath.Join(t.ArtifactDir(), "page-100-peers.png")
	br.screenshot(ctx, shot)
	t.Logf("screenshot of 100 peers: %s", shot)

	br.url = srv.URL + "/#focus=p050&filter=p05"
	dom = br.dumpDOM(ctx)
	// p050 and the nine other peers p05x the filter keeps: p050's nine links among them.
	if n := count(dom, `<g id="peer-`); n != 10 {
		t.Fatalf("%d peers drawn for filter p05, want 10", n)
	}
	if n := count(dom, `<line id="link-`); n != 9 {
		t.Fatalf("%d links drawn with focus p050 and filter p05, want 9", n)
	}
	if g, ok := pageElement(dom, "g", "data-peer", "p050"); !ok || !strings.Contains(g["class"], "focus") {
		t.Fatalf("p050 is not the focus: %v", g)
	}
}

// meshOf is a stand-in page source: n peers p000…, this peer p000, every pair linked
// (gossiped, modes inferred), p000's own links measured, and p000's path to p002 relayed
// through p001.
func meshOf(n int) page.Source {
	name := func(i int) string { return fmt.Sprintf("p%03d", i) }
	sla, _ := pathsel.ParseSLA("gold: rtt<=20ms")
	s := page.Snapshot{Self: name(0), Now: time.Now(), SLA: sla}
	for i := range n {
		s.Peers = append(s.Peers, page.Peer{Name: name(i), State: "alive", Self: i == 0, Address: fmt.Sprintf("192.0.2.%d", i+1)})
		for j := i + 1; j < n; j++ {
			s.Links = append(s.Links, page.Link{From: name(i), To: name(j), Mode: page.ModeVXLAN, ModeInferred: i != 0, Up: true,
				RTT: time.Duration(1+(i*j)%30) * time.Millisecond})
		}
		if i > 0 {
			s.Routes = append(s.Routes, page.Route{Peer: name(i), Path: []string{name(i)}, SLA: sla.String(), SLAOK: true})
		}
	}
	s.Routes[1].Path = []string{name(1), name(2)}
	return stubSource{s}
}

type stubSource struct{ s page.Snapshot }

func (f stubSource) Snapshot() page.Snapshot                       { return f.s }
func (f stubSource) History(page.HistoryKey) ([]page.Sample, bool) { return nil, false }
func (f stubSource) HistoryKeys() []page.HistoryKey                { return nil }
func (f stubSource) Interfaces() []page.Interface                  { return []page.Interface{} }
