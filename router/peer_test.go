package router

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	"github.com/weftnet/weft/cni"
)

// The peer does its kernel work in its own process's network namespace, so TestMain re-runs
// the test binary in a fresh one (CLONE_NEWNET): the bridge and veths it makes never touch
// the machine's namespace, and vanish with the process. Needs root, as CI has.
func TestMain(m *testing.M) {
	if os.Getenv("WEFT_ROUTER_TEST_NETNS") == "" {
		cmd := exec.Command(os.Args[0], os.Args[1:]...)
		cmd.Env = append(os.Environ(), "WEFT_ROUTER_TEST_NETNS=1")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
		if err := cmd.Run(); err != nil {
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				os.Exit(exit.ExitCode())
			}
			fmt.Fprintln(os.Stderr, "router tests need root to run in their own network namespace:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bring up lo:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

type testPeer struct {
	*Peer
	client *cni.Client
	stop   func()
}

// testConfig is a lone peer "p1" on loopback with its state in dataDir: a keyed peer, with
// plaintext links as before keys were required (auto would mean WireGuard).
func testConfig(dataDir string) Config {
	cfg := DefaultConfig()
	cfg.Name = "p1"
	cfg.DataDir = dataDir
	cfg.Socket = filepath.Join(dataDir, "weft.sock")
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.AdvertiseAddr = netip.MustParseAddr("127.0.0.1")
	cfg.MeshPort, cfg.RaftPort = 0, 0
	cfg.ClusterKey, cfg.Encrypt = bytes.Repeat([]byte{1}, ClusterKeySize), "never"
	return cfg
}

func startPeer(t *testing.T, dataDir string) *testPeer {
	t.Helper()
	return startWiredPeer(t, dataDir, nil, nil)
}

// startWiredPeer is startPeer with the configuration changed by tune (if any) and the peer
// wired by wire (if any) before it runs.
func startWiredPeer(t *testing.T, dataDir string, tune func(*Config), wire func(*Peer)) *testPeer {
	t.Helper()
	cfg := testConfig(dataDir)
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if tune != nil {
		tune(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if wire != nil {
		wire(p)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-errc:
		cancel()
		t.Fatalf("peer did not start: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("peer not ready within 10s")
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-errc; err != nil {
				t.Errorf("peer stopped with %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return &testPeer{Peer: p, client: cni.NewClient(cfg.Socket, 10*time.Second), stop: stop}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

var nsSeq int

// newContainer makes a network namespace standing in for a container.
func newContainer(t *testing.T) string {
	t.Helper()
	nsSeq++
	name := fmt.Sprintf("wrt-%d-c%d", os.Getpid(), nsSeq)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

func addReq(id, netns string) cni.AttachRequest {
	return cni.AttachRequest{ContainerID: id, IfName: "eth0", NetNS: netns, CNINetwork: "testnet", Network: "default", Name: id}
}

func codeOf(err error) uint {
	var e *cni.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

func hostVeths(t *testing.T) []string {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range links {
		if _, ok := l.(*netlink.Veth); ok {
			names = append(names, l.Attrs().Name)
		}
	}
	sort.Strings(names)
	return names
}

// settleHostVeths waits for the host ends of veths that earlier tests left to go: the kernel
// removes a veth whose other end was in a deleted namespace asynchronously, so one can vanish
// in the middle of a later test that compares the host's veths before and after a request.
func settleHostVeths() error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		var left []string
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			if _, ok := l.(*netlink.Veth); ok {
				left = append(left, l.Attrs().Name)
			}
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("host veths left by earlier tests still here after 20s: %v", left)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestAttachCheckDelete(t *testing.T) {
	p := startPeer(t, t.TempDir())
	ctx := context.Background()
	c1, c2 := newContainer(t), newContainer(t)
	r1, err := p.client.Add(ctx, addReq("c1", c1))
	if err != nil {
		t.Fatalf("add c1: %v", err)
	}
	r2, err := p.client.Add(ctx, addReq("c2", c2))
	if err != nil {
		t.Fatalf("add c2: %v", err)
	}
	if r1.Address == r2.Address || r1.Gateway != "10.40.0.1" || !strings.HasSuffix(r1.Address, "/16") {
		t.Fatalf("addresses %s, %s via %s", r1.Address, r2.Address, r1.Gateway)
	}
	// A repeated ADD for the same attachment converges and answers the same address.
	again, err := p.client.Add(ctx, addReq("c1", c1))
	if err != nil || again.Address != r1.Address {
		t.Fatalf("repeated add = %v, %v; want %s", again, err, r1.Address)
	}
	ip2, _, _ := strings.Cut(r2.Address, "/")
	if out, err := exec.Command("ip", "netns", "exec", filepath.Base(c1), "ping", "-c1", "-W2", ip2).CombinedOutput(); err != nil {
		t.Fatalf("c1 cannot ping c2 at %s: %v\n%s", ip2, err, out)
	}
	if _, err := p.client.Check(ctx, addReq("c1", c1)); err != nil {
		t.Fatalf("check c1: %v", err)
	}
	if out, err := exec.Command("ip", "-n", filepath.Base(c1), "link", "del", "eth0").CombinedOutput(); err != nil {
		t.Fatalf("delete eth0: %v %s", err, out)
	}
	_, err = p.client.Check(ctx, addReq("c1", c1))
	if codeOf(err) != cni.CodeCheckFailed || !strings.Contains(err.Error(), "eth0") {
		t.Fatalf("check without eth0 = %v, want code %d naming eth0", err, cni.CodeCheckFailed)
	}
	for _, id := range []string{"c1", "c1", "c2", "c2"} {
		if err := p.client.Del(ctx, addReq(id, "")); err != nil {
			t.Fatalf("del %s: %v", id, err)
		}
	}
	if st := p.status(); len(st.Attachments) != 0 || st.Networks[0].Blocks[0].Used != 0 {
		t.Fatalf("after deleting everything: %+v", st)
	}
	if v := hostVeths(t); len(v) != 0 {
		t.Fatalf("veths left behind: %v", v)
	}
	if _, err := p.client.Check(ctx, addReq("c1", c1)); codeOf(err) != 3 {
		t.Fatalf("check of a deleted attachment = %v, want code 3", err)
	}
}

// snapshot is everything a bad request must leave as it was.
type snapshot struct {
	Status Status
	Veths  []string
}

func takeSnapshot(t *testing.T, p *testPeer) snapshot {
	st := p.status()
	st.Uptime = ""
	st.Segments = nil // measurements and counters move on their own (router/segments.go)
	return snapshot{Status: st, Veths: hostVeths(t)}
}

func TestBadRequestsChangeNothing(t *testing.T) {
	if err := settleHostVeths(); err != nil {
		t.Fatal(err)
	}
	p := startPeer(t, t.TempDir())
	ctx := context.Background()
	good := newContainer(t)
	if _, err := p.client.Add(ctx, addReq("existing", good)); err != nil {
		t.Fatal(err)
	}
	// A container whose eth0 is something else already.
	taken := newContainer(t)
	if out, err := exec.Command("ip", "-n", filepath.Base(taken), "link", "add", "eth0", "type", "bridge").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	notNS := filepath.Join(t.TempDir(), "plain-file")
	os.WriteFile(notNS, []byte("x"), 0o600)
	fresh := newContainer(t)

	cases := []struct {
		name, method, path, body string
		code                     uint
		mention                  string
	}{
		{"truncated JSON", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0"`, 6, "decode"},
		{"unknown field", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","bogus":1}`, 6, "bogus"},
		{"trailing data", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0"} {}`, 6, "trailing"},
		{"no container id", "POST", cni.PathAdd, `{"ifname":"eth0","netns":"` + fresh + `","cni_network":"n"}`, 4, "CNI_CONTAINERID"},
		{"bad ifname", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0/../x","netns":"` + fresh + `","cni_network":"n"}`, 4, "CNI_IFNAME"},
		{"no netns", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","cni_network":"n"}`, 4, "CNI_NETNS"},
		{"netns is a file", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","netns":"` + notNS + `","cni_network":"n"}`, 4, notNS},
		{"netns missing", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","netns":"/nonexistent/ns","cni_network":"n"}`, 4, "/nonexistent/ns"},
		{"ifname taken", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","netns":"` + taken + `","cni_network":"n"}`, 4, "eth0"},
		{"unknown network", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","netns":"` + fresh + `","cni_network":"n","network":"nope"}`, 7, "nope"},
		{"bad mtu", "POST", cni.PathAdd, `{"container_id":"c9","ifname":"eth0","netns":"` + fresh + `","cni_network":"n","mtu":20}`, 7, "mtu"},
		{"same container other netns", "POST", cni.PathAdd, `{"container_id":"existing","ifname":"eth0","netns":"` + fresh + `","cni_network":"n"}`, 4, "already attached"},
		{"gc without network", "POST", cni.PathGC, `{"valid":[]}`, 7, "name"},
		{"status unknown network", "POST", cni.PathStatus, `{"network":"nope"}`, 7, "nope"},
		{"wrong method", "GET", cni.PathAdd, ``, 7, "use POST"},
		{"unknown path", "POST", "/v1/nothing", `{}`, 7, "/v1/nothing"},
	}
	before := takeSnapshot(t, p)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest(c.method, "http://weft"+c.path, bytes.NewReader([]byte(c.body)))
			resp, err := rawClient(p).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var e cni.Error
			json.NewDecoder(resp.Body).Decode(&e)
			if resp.StatusCode == http.StatusOK || e.Code != c.code || !strings.Contains(e.Error(), c.mention) {
				t.Fatalf("%s %s %s: HTTP %d %+v; want code %d mentioning %q", c.method, c.path, c.body, resp.StatusCode, e, c.code, c.mention)
			}
			if after := takeSnapshot(t, p); !reflect.DeepEqual(before, after) {
				t.Fatalf("state changed:\nbefore %+v\nafter  %+v", before, after)
			}
		})
	}
}

func rawClient(p *testPeer) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", p.cfg.Socket)
	}}}
}

func TestGCReleasesOnlyStaleAttachmentsOfItsNetwork(t *testing.T) {
	p := startPeer(t, t.TempDir())
	ctx := context.Background()
	for _, id := range []string{"keep", "stale1", "stale2"} {
		if _, err := p.client.Add(ctx, addReq(id, newContainer(t))); err != nil {
			t.Fatal(err)
		}
	}
	other := addReq("othernet", newContainer(t))
	other.CNINetwork = "another"
	if _, err := p.client.Add(ctx, other); err != nil {
		t.Fatal(err)
	}
	res, err := p.client.GC(ctx, cni.GCRequest{CNINetwork: "testnet", Valid: []cni.GCAttachment{{ContainerID: "keep", IfName: "eth0"}}})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Released) != 2 {
		t.Fatalf("released %+v, want stale1 and stale2", res.Released)
	}
	var left []string
	for _, a := range p.status().Attachments {
		left = append(left, a.ContainerID)
	}
	if !reflect.DeepEqual(left, []string{"keep", "othernet"}) {
		t.Fatalf("left %v, want keep and othernet", left)
	}
	if v := hostVeths(t); len(v) != 2 {
		t.Fatalf("veths after GC: %v, want 2", v)
	}
}

func TestRestartKeepsAttachmentsAndStopsCleanly(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	dir := t.TempDir()
	p := startPeer(t, dir)
	ctx := context.Background()
	var addrs []string
	conts := []string{newContainer(t), newContainer(t), newContainer(t)}
	for i, c := range conts {
		r, err := p.client.Add(ctx, addReq(fmt.Sprintf("c%d", i), c))
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, r.Address)
	}
	before := p.status().Attachments
	p.stop()

	p2 := startPeer(t, dir)
	after := p2.status().Attachments
	if !reflect.DeepEqual(before, after) {
		t.Fatalf("attachments changed across restart:\nbefore %+v\nafter  %+v", before, after)
	}
	for i, c := range conts {
		if _, err := p2.client.Check(ctx, addReq(fmt.Sprintf("c%d", i), c)); err != nil {
			t.Fatalf("check c%d after restart: %v", i, err)
		}
	}
	r, err := p2.client.Add(ctx, addReq("new", newContainer(t)))
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if a == r.Address {
			t.Fatalf("restarted peer reused %s", a)
		}
	}
	p2.stop()
}

func TestDataDirUsedByAnotherPeer(t *testing.T) {
	dir := t.TempDir()
	startPeer(t, dir)
	cfg := DefaultConfig()
	cfg.Name, cfg.DataDir, cfg.Socket, cfg.HTTPAddr = "p2", dir, filepath.Join(t.TempDir(), "s"), ""
	cfg.AdvertiseAddr, cfg.MeshPort, cfg.RaftPort = netip.MustParseAddr("127.0.0.1"), 0, 0
	cfg.Insecure = true
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = p.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second peer on the same data dir: %v, want an in-use error", err)
	}
}

func TestConfigValidate(t *testing.T) {
	base := DefaultConfig()
	base.Name = "p"
	base.ClusterKey = bytes.Repeat([]byte{1}, ClusterKeySize)
	cases := map[string]func(*Config){
		"weft keygen":              func(c *Config) { c.ClusterKey = nil },
		"--insecure":               func(c *Config) { c.Insecure = true },
		"want 32":                  func(c *Config) { c.ClusterKey = c.ClusterKey[:16] },
		"--encrypt=always":         func(c *Config) { c.ClusterKey, c.Insecure, c.Encrypt = nil, true, "always" },
		"--name":                   func(c *Config) { c.Name = "" },
		"--data-dir":               func(c *Config) { c.DataDir = "relative" },
		"--socket":                 func(c *Config) { c.Socket = "weft.sock" },
		"--mtu":                    func(c *Config) { c.MTU = 100 },
		"--ipalloc-range":          func(c *Config) { c.IPAllocRange = netip.MustParsePrefix("10.40.0.1/16") },
		"--link-probe-port":        func(c *Config) { c.LinkProbePort = c.ProbePort },
		"--probe-timeout":          func(c *Config) { c.ProbeTimeout = time.Millisecond },
		"--sriov-rescan":           func(c *Config) { c.SRIOVRescan = -time.Second },
		"--loss-crosscheck-window": func(c *Config) { c.LossCrossCheckWindow = 10 * time.Second },
	}
	for flag, mutate := range cases {
		cfg := base
		mutate(&cfg)
		if err := cfg.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), flag) {
			t.Errorf("%s: Validate = %v, want ErrInvalidConfig naming %s", flag, err, flag)
		}
	}
	if err := base.Validate(); err != nil {
		t.Errorf("defaults invalid: %v", err)
	}
	// The probe timeout follows the interval unless set: twice it, at most a second.
	for _, c := range []struct{ interval, timeout, want time.Duration }{
		{time.Second, 0, time.Second}, {200 * time.Millisecond, 0, 400 * time.Millisecond},
		{200 * time.Millisecond, 300 * time.Millisecond, 300 * time.Millisecond},
	} {
		cfg := base
		cfg.ProbeInterval, cfg.ProbeTimeout = c.interval, c.timeout
		if got := cfg.probeTimeout(); got != c.want {
			t.Errorf("interval %s, timeout %s: probe timeout %s, want %s", c.interval, c.timeout, got, c.want)
		}
	}
}
