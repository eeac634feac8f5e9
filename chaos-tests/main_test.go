package chaostest

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/wireguard"
)

// binDir holds weft and weft-cni, built once by TestMain (or taken from WEFT_BIN_DIR).
// buildErr, when set, fails every test with the reason.
var (
	binDir   string
	buildErr error
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if d := os.Getenv("WEFT_BIN_DIR"); d != "" {
		binDir = d
		return m.Run()
	}
	tmp, err := os.MkdirTemp("", "weft-chaos-bin-")
	if err != nil {
		buildErr = err
		return m.Run()
	}
	defer os.RemoveAll(tmp)
	binDir = tmp
	buildErr = buildBinaries(tmp)
	return m.Run()
}

// buildBinaries builds the real daemon and plugin into dir.
func buildBinaries(dir string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goBin, "build", "-o", dir+"/",
		"github.com/weftnet/weft/cmd/weft", "github.com/weftnet/weft/cmd/weft-cni")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build cmd/weft cmd/weft-cni: %w\n%s", err, out)
	}
	return nil
}

// requirePrivileges fails (never skips) when the test cannot build a lab: CI runs as root.
func requirePrivileges(t *testing.T) {
	t.Helper()
	if buildErr != nil {
		t.Fatalf("binaries not built: %v", buildErr)
	}
	if os.Geteuid() != 0 {
		t.Fatal("chaos tests need root (network namespaces, veth, bridges); run as root")
	}
	for _, tool := range []string{"ip", "ping"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("chaos tests need %s: %v", tool, err)
		}
	}
}

// testWriter sends lab log lines to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// newLab builds a started lab for t and registers its teardown; on failure the peers'
// log tails are printed first.
func newLab(t *testing.T, cfg lab.Config) *lab.Lab {
	t.Helper()
	requirePrivileges(t)
	if cfg.Hosts == 0 {
		cfg.Hosts = 1
	}
	// WEFT_LAB_TAG renames the lab (the tag, then the prefix without its first letter, cut
	// to 8 characters) so that engineers sharing a machine can run one test at once: a lab
	// removes namespaces with its prefix as leftovers of a crashed run.
	if tag := os.Getenv("WEFT_LAB_TAG"); tag != "" {
		p := tag + cfg.Prefix[1:]
		cfg.Prefix = p[:min(len(p), 8)]
	}
	cfg.BinDir = binDir
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := lab.New(ctx, cfg)
	if err != nil {
		t.Fatalf("lab.New: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab.Close: %v", err)
		}
		if left, _ := filepath.Glob("/run/netns/" + cfg.Prefix + "-*"); len(left) > 0 {
			t.Errorf("namespaces left after Close: %v", left)
		}
		for _, h := range l.Hosts() {
			sock := filepath.Join("/var/run/wireguard", wireguard.DeriveName(h.Name)+".sock")
			if _, err := os.Stat(sock); err == nil {
				t.Errorf("WireGuard socket %s left after Close", sock)
			}
		}
	})
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range l.Hosts() {
				t.Logf("--- %s peer log (tail) ---\n%s", h.Name, h.LogTail(60))
			}
		}
	})
	if !cfg.NoStart {
		waitLeader(t, ctx, l.Hosts())
	}
	return l
}

// mostlyWaiting lets t run beside other such tests (t.Parallel; go test runs at most
// -parallel of them at once, GOMAXPROCS by default: 2 on CI's two cores). Only for tests
// whose time goes into waiting for peers' timers (failure detection, a measurement
// window, a fixed downtime) and whose checks do not measure time, rate or latency closely:
// never the relay, SLA, bandwidth, perf or segments tests. Parallel tests start after the
// serial ones, two at a time.
func mostlyWaiting(t *testing.T) {
	t.Parallel()
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitPing polls until src pings dst or 20s pass.
func waitPing(t *testing.T, ctx context.Context, src *lab.Container, dst netip.Addr) {
	t.Helper()
	pctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := lab.Poll(pctx, 200*time.Millisecond, func() error { return src.Ping(pctx, dst) }); err != nil {
		t.Fatalf("%s cannot ping %s: %v\n%s", src.Name, dst, err, pathDiagnosis(ctx, src.Host, dst))
	}
}

// pathDiagnosis says how host h would send to dst: its kernel route and the peer's own view
// of routes and blocks, printed next to a failed ping so that CI output (which keeps only a
// part of the peer logs) still shows where the path broke.
func pathDiagnosis(ctx context.Context, h *lab.Host, dst netip.Addr) string {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	var b strings.Builder
	route, err := h.Exec(dctx, "ip", "-4", "route", "get", dst.String())
	fmt.Fprintf(&b, "--- %s: ip route get %s (err %v) ---\n%s", h.Name, dst, err, route)
	for _, args := range [][]string{{"status", "routes"}, {"status", "connections"}, {"status", "ipam"}} {
		out, err := h.CLI(dctx, args...)
		fmt.Fprintf(&b, "--- %s: weft %s (err %v) ---\n%s", h.Name, strings.Join(args, " "), err, out)
	}
	return b.String()
}

// hostVethName is how the peer names the host end of an attachment: "weft" and 11 hex
// digits (not the bridge "weft", nor the link drivers' devices).
var hostVethName = regexp.MustCompile(`^weft[0-9a-f]{11}$`)

// weftLinks returns the host-side veths of attachments.
func weftLinks(t *testing.T, h *lab.Host) []string {
	t.Helper()
	names, err := h.LinkNames()
	if err != nil {
		t.Fatalf("list links of %s: %v", h.Name, err)
	}
	var out []string
	for _, n := range names {
		if hostVethName.MatchString(n) {
			out = append(out, n)
		}
	}
	return out
}

func mustStatus(t *testing.T, ctx context.Context, h *lab.Host) *lab.Status {
	t.Helper()
	s, err := h.Status(ctx)
	if err != nil {
		t.Fatalf("status of %s: %v", h.Name, err)
	}
	return s
}

func mustContainer(t *testing.T, h *lab.Host) *lab.Container {
	t.Helper()
	c, err := h.NewContainer()
	if err != nil {
		t.Fatalf("new container on %s: %v", h.Name, err)
	}
	t.Cleanup(func() { c.Delete() })
	return c
}

func mustCNI(t *testing.T, h *lab.Host, opts lab.CNIOptions) *lab.CNI {
	t.Helper()
	c, err := h.CNI(opts)
	if err != nil {
		t.Fatalf("cni config: %v", err)
	}
	return c
}

// mustAdd attaches eth0 of ctr and returns the result's address.
func mustAdd(t *testing.T, ctx context.Context, c *lab.CNI, ctr *lab.Container) netip.Prefix {
	t.Helper()
	res, err := c.Add(ctx, ctr.RuntimeConf("eth0"))
	if err != nil {
		t.Fatalf("ADD %s: %v", ctr.ID, err)
	}
	a, err := lab.ResultAddress(res)
	if err != nil {
		t.Fatalf("ADD %s: %v", ctr.ID, err)
	}
	return a
}

// defaultRange is the peers' --ipalloc-range.
var defaultRange = netip.MustParsePrefix("10.40.0.0/16")

func assertInRange(t *testing.T, a netip.Prefix) {
	t.Helper()
	if !defaultRange.Contains(a.Addr()) {
		t.Fatalf("address %s outside %s", a, defaultRange)
	}
}

// assertAttachment checks that status lists (id, eth0) with address a and that its host
// veth exists.
func assertAttachment(t *testing.T, s *lab.Status, h *lab.Host, id string, a netip.Prefix) lab.Attachment {
	t.Helper()
	at, ok := s.Attachment(id, "eth0")
	if !ok {
		t.Fatalf("status lacks attachment %s/eth0; has %+v", id, s.Attachments)
	}
	got, err := netip.ParsePrefix(at.Address)
	if err != nil || got.Addr() != a.Addr() {
		t.Fatalf("status address of %s = %q, ADD returned %s", id, at.Address, a)
	}
	if at.HostIfName == "" {
		t.Fatalf("status attachment %s has no host_ifname", id)
	}
	if names, err := h.LinkNames(); err != nil || !slices.Contains(names, at.HostIfName) {
		t.Fatalf("host veth %s of %s missing in %s (links %v, err %v)", at.HostIfName, id, h.Name, names, err)
	}
	return at
}
