package chaostest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
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
	br := &pageBrowser{t: t, bin: browser, host: a, dir: t.TempDir()}
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

// pageBrowser runs headless Chromium in a lab host's namespace against its peer's page.
type pageBrowser struct {
	t    *testing.T
	bin  string
	host *lab.Host
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
	base := []string{"netns", "exec", br.host.Name, br.bin, "--headless", "--disable-gpu", "--no-sandbox",
		"--no-first-run", "--disable-extensions", "--hide-scrollbars", "--user-data-dir=" + filepath.Join(br.dir, "profile"),
		"--virtual-time-budget=5000"}
	cmd := exec.CommandContext(ctx, "ip", append(append(base, args...), pageURL)...)
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
