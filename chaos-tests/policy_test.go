package chaostest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/netpol/netpoltest"
	"github.com/weftnet/weft/router"
)

// policyRanges: default is the peers' --ipalloc-range; secure is a network of its own.
var policyRanges = map[string]netip.Prefix{
	"default": defaultRange,
	"secure":  netip.MustParsePrefix("10.48.0.0/16"),
}

// dbOnlyWeb is the policy of network n: db accepts only app=web on tcp/5432.
func dbOnlyWeb(n string) string {
	return fmt.Sprintf(`name: db-only-web-%[1]s
network: %[1]s
selector: {matchLabels: {app: db}}
ingress:
  - action: allow
    peers:
      - selector: {matchLabels: {app: web}}
    ports:
      - {proto: tcp, port: 5432}
`, n)
}

// policyCtr is a container of the test: its namespace and its address on each network.
type policyCtr struct {
	*lab.Container
	host  *lab.Host
	addrs map[string]netip.Addr
}

// attachLabelled attaches ctr's eth0 to default and, when secure, net1 to secure, with
// labels in CNI_ARGS (WEFT_LABELS), through libcni and the real plugin.
func attachLabelled(t *testing.T, ctx context.Context, h *lab.Host, labels string, secure bool) *policyCtr {
	t.Helper()
	c := &policyCtr{Container: mustContainer(t, h), host: h, addrs: map[string]netip.Addr{}}
	ifs := [][2]string{{"eth0", "default"}}
	if secure {
		ifs = append(ifs, [2]string{"net1", "secure"})
	}
	for _, i := range ifs {
		rt := c.RuntimeConf(i[0])
		rt.Args = append(rt.Args, [2]string{"WEFT_LABELS", labels})
		opts := lab.CNIOptions{}
		if i[1] != "default" {
			opts = lab.CNIOptions{Name: "weft-" + i[1], Network: i[1]}
		}
		res, err := mustCNI(t, h, opts).Add(ctx, rt)
		if err != nil {
			t.Fatalf("ADD %s %s on %s: %v", labels, i[0], h.Name, err)
		}
		a, err := lab.ResultAddress(res)
		if err != nil || !policyRanges[i[1]].Contains(a.Addr()) {
			t.Fatalf("ADD %s %s on %s: address %v (%v)", labels, i[0], h.Name, a, err)
		}
		c.addrs[i[1]] = a.Addr()
	}
	return c
}

// listen opens an echo server on port inside c.
func (c *policyCtr) listen(t *testing.T, port int) { netpoltest.ListenEcho(t, c.NSPath, port) }

// dial connects from inside c (the socket is made in its namespace).
func (c *policyCtr) dial(to netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	return netpoltest.Dial(c.NSPath, to, timeout)
}

// reach says whether c can open a connection to to and exchange a line on it.
func (c *policyCtr) reach(to netip.AddrPort, timeout time.Duration) error {
	conn, err := c.dial(to, timeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	return echoLine(conn, "hello\n")
}

func echoLine(conn net.Conn, msg string) error { return netpoltest.EchoLine(conn, msg, 3*time.Second) }

// policyDrops is weft_policy_drops_total of policy on h (0 when not exported yet).
func policyDrops(t *testing.T, h *lab.Host, policy string) float64 {
	t.Helper()
	m, err := scrapeMetrics(h)
	if err != nil {
		t.Fatalf("metrics of %s: %v", h.Name, err)
	}
	return m[fmt.Sprintf(`weft_policy_drops_total{direction="ingress",policy="%s"}`, policy)]
}

// histogram is the sum and count of a histogram (all label values) on h.
func histogram(t *testing.T, h *lab.Host, name, labels string) (sum, count float64) {
	t.Helper()
	m, err := scrapeMetrics(h)
	if err != nil {
		t.Fatalf("metrics of %s: %v", h.Name, err)
	}
	return m[name+"_sum"+labels], m[name+"_count"+labels]
}

// Network policy end to end (#15 done-means) on three real peers: a and b route to each
// other directly, c runs --no-direct so that a↔c and b↔c ride VXLAN, and network secure
// (--encrypt always) rides WireGuard between every pair. db on a accepts only app=web on
// tcp/5432, in both networks: web reaches it from the same host, directly, over VXLAN and
// over WireGuard; a client is dropped on the same host and across hosts, the drop counter
// rises and `weft policy explain` names the policy; an open web→db connection exchanges
// data across 100 unrelated policy updates; a new web on another host reaches db within 2 s
// of its ADD; a new client is refused from its very first SYN; garbage in a policy file is
// refused with its file position and changes nothing.
func TestPolicyEndToEnd(t *testing.T) {
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wpwpol", Hosts: 3, NoStart: true, PeerArgs: func(i int) []string {
		// --encrypt auto with trust in the underlay: plaintext links where a network allows
		// them, WireGuard for secure; the lab's default --encrypt never has no WireGuard.
		args := []string{"--raft-voters", "3", "--encrypt", "auto", "--trusted-subnets", "198.18.0.0/24"}
		if i > 0 {
			args = append(args, "--peers", l.Host(0).Addr.Addr().String())
		}
		if i == 2 {
			args = append(args, "--no-direct")
		}
		return args
	}})
	ctx := testCtx(t, 6*time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 45*time.Second, "the mesh", func() error { return aliveEverywhere(ctx, l.Hosts()) })
	waitLeader(t, ctx, l.Hosts())
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	if out, err := a.CLI(ctx, "network", "create", "secure", "--subnet", policyRanges["secure"].String(), "--encrypt", "always"); err != nil {
		t.Fatalf("network create secure: %v %s", err, out)
	}

	db := attachLabelled(t, ctx, a, "app:db", true)
	db.listen(t, 5432)
	webA := attachLabelled(t, ctx, a, "app:web", true)
	webB := attachLabelled(t, ctx, b, "app:web", true)
	webC := attachLabelled(t, ctx, c, "app:web", true)
	clientA := attachLabelled(t, ctx, a, "app:client", true)
	clientB := attachLabelled(t, ctx, b, "app:client", true)
	dbAt := func(n string) netip.AddrPort { return netip.AddrPortFrom(db.addrs[n], 5432) }

	// The modes: a↔b direct, a↔c and b↔c VXLAN for default; WireGuard for secure.
	wantMode := map[string]string{
		b.Name + "/default": "direct", c.Name + "/default": "vxlan", b.Name + "/secure": "wireguard", c.Name + "/secure": "wireguard",
	}
	waitFor(t, ctx, 30*time.Second, "a's connections in their modes", func() error {
		var conns []router.Connection
		if err := cliJSON(ctx, a, &conns, "status", "connections"); err != nil {
			return err
		}
		seen := map[string]string{}
		for _, cn := range conns {
			if cn.State == "established" {
				seen[cn.Peer+"/"+cn.Network] = cn.Mode
			}
		}
		if fmt.Sprint(seen) != fmt.Sprint(wantMode) {
			return fmt.Errorf("modes %v, want %v", seen, wantMode)
		}
		return nil
	})
	// Before any policy: everyone reaches db, on both networks.
	for _, from := range []*policyCtr{webA, webB, webC, clientA, clientB} {
		for _, n := range []string{"default", "secure"} {
			waitFor(t, ctx, 20*time.Second, fmt.Sprintf("%s on %s to reach db on %s before any policy", from.ID, from.host.Name, n), func() error {
				return from.reach(dbAt(n), time.Second)
			})
		}
	}

	// Garbage is refused with its file position and reason, and changes nothing.
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.yaml")
	os.WriteFile(garbage, []byte("name: db-only-web-default\nnetwork: default\ningress:\n  - action: allw\n"), 0o600)
	out, err := b.CLI(ctx, "policy", "apply", "-f", garbage)
	if err == nil || !strings.Contains(string(out)+err.Error(), "line 4") || !strings.Contains(string(out)+err.Error(), "allw") {
		t.Fatalf("garbage policy: %v %s", err, out)
	}
	if out, err := a.CLI(ctx, "policy", "ls"); err != nil || !strings.Contains(string(out), "no policy") {
		t.Fatalf("policies after garbage: %v %s", err, out)
	}

	applied := time.Now()
	for _, n := range []string{"default", "secure"} {
		f := filepath.Join(dir, n+".yaml")
		os.WriteFile(f, []byte(dbOnlyWeb(n)), 0o600)
		if out, err := b.CLI(ctx, "policy", "apply", "-f", f); err != nil {
			t.Fatalf("policy apply %s: %v %s", n, err, out)
		}
	}
	// Every host enforces it (the client is refused wherever the check runs).
	for _, h := range l.Hosts() {
		waitFor(t, ctx, 10*time.Second, h.Name+" to apply the policies", func() error {
			for _, n := range []string{"default", "secure"} {
				var ex router.PolicyExplain
				if err := cliJSON(ctx, h, &ex, "policy", "explain", clientB.addrs[n].String(), db.addrs[n].String(), "tcp/5432"); err != nil {
					return err
				}
				if ex.Allowed {
					return fmt.Errorf("%s: client→db still allowed: %s", n, ex.Reason)
				}
			}
			return nil
		})
	}
	t.Logf("policies in force on every host %v after the apply", time.Since(applied).Round(time.Millisecond))

	// web→db: same host, direct, VXLAN (default), WireGuard (secure).
	for _, from := range []*policyCtr{webA, webB, webC} {
		for _, n := range []string{"default", "secure"} {
			if err := from.reach(dbAt(n), 2*time.Second); err != nil {
				t.Errorf("web on %s → db on %s: %v", from.host.Name, n, err)
			}
		}
	}
	// client→db: dropped on the same host and across hosts, counted, explained.
	before := policyDrops(t, a, "default/db-only-web-default")
	for _, from := range []*policyCtr{clientA, clientB} {
		for _, n := range []string{"default", "secure"} {
			if conn, err := from.dial(dbAt(n), 700*time.Millisecond); err == nil {
				conn.Close()
				t.Errorf("client on %s connected to db on %s under the policy", from.host.Name, n)
			}
		}
	}
	waitFor(t, ctx, 3*time.Second, "the same-host client's SYNs to be counted on "+a.Name, func() error {
		if after := policyDrops(t, a, "default/db-only-web-default"); after <= before {
			return fmt.Errorf("weft_policy_drops_total of default/db-only-web-default: %v before the SYNs, %v after", before, after)
		}
		return nil
	})
	t.Logf("weft_policy_drops_total{policy=default/db-only-web-default}: %v on %s, %v on %s",
		policyDrops(t, a, "default/db-only-web-default"), a.Name, policyDrops(t, b, "default/db-only-web-default"), b.Name)
	out, err = a.CLI(ctx, "policy", "explain", clientB.addrs["default"].String(), db.addrs["default"].String(), "5432")
	if err != nil || !strings.Contains(string(out), "DENIED") || !strings.Contains(string(out), "default deny of policy default/db-only-web-default") {
		t.Fatalf("explain client→db: %v\n%s", err, out)
	}
	t.Logf("weft policy explain client→db:\n%s", out)

	// An open web→db connection (across hosts) survives 100 unrelated policy updates.
	open, err := webB.dial(dbAt("default"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	other := filepath.Join(dir, "other.yaml")
	start := time.Now()
	for i := range 100 {
		os.WriteFile(other, []byte(fmt.Sprintf("name: other\nnetwork: default\norder: %d\nselector: {matchLabels: {app: other}}\n"+
			"ingress:\n  - action: allow\n    ports: [{proto: udp, port: %d}]\n", i, 1000+i)), 0o600)
		if out, err := a.CLI(ctx, "policy", "apply", "-f", other); err != nil {
			t.Fatalf("update %d: %v %s", i, err, out)
		}
		if err := echoLine(open, fmt.Sprintf("update %d\n", i)); err != nil {
			t.Fatalf("the open web→db connection after %d unrelated updates: %v", i+1, err)
		}
	}
	t.Logf("100 unrelated policy updates in %v; the open connection exchanged data across all", time.Since(start).Round(time.Millisecond))

	// A new web on another host (the gossip path) reaches db within 2 s of its ADD.
	added := time.Now()
	lateWeb := attachLabelled(t, ctx, c, "app:web", false)
	addTook := time.Since(added)
	var lag time.Duration
	waitFor(t, ctx, 2*time.Second-addTook, "a new web on "+c.Name+" to reach db", func() error {
		err := lateWeb.reach(dbAt("default"), 300*time.Millisecond)
		lag = time.Since(added)
		return err
	})
	t.Logf("a new web on %s reached db %v after its ADD began (ADD took %v)", c.Name, lag.Round(time.Millisecond), addTook.Round(time.Millisecond))

	// A new client is refused from its very first packet: dialled the moment ADD returns.
	for _, h := range []*lab.Host{a, b} {
		// Counted where it was dropped: the first forward hook, on the client's host.
		before := policyDrops(t, h, "default/db-only-web-default")
		late := attachLabelled(t, ctx, h, "app:client", false)
		if conn, err := late.dial(dbAt("default"), 700*time.Millisecond); err == nil {
			conn.Close()
			t.Errorf("a client added on %s after the policy connected to db", h.Name)
		}
		waitFor(t, ctx, 3*time.Second, "the SYN of a new client on "+h.Name+" to be a counted policy drop", func() error {
			if after := policyDrops(t, h, "default/db-only-web-default"); after <= before {
				return fmt.Errorf("drops %v → %v", before, after)
			}
			return nil
		})
	}

	// Figures before the restart resets one peer's metrics.
	for _, h := range l.Hosts() {
		ls, lc := histogram(t, h, "weft_policy_sync_seconds", `{source="local"}`)
		gs, gc := histogram(t, h, "weft_policy_sync_seconds", `{source="gossip"}`)
		ps, pc := histogram(t, h, "weft_policy_sync_seconds", `{source="policy"}`)
		as, ac := histogram(t, h, "weft_policy_apply_seconds", "")
		t.Logf("%s: sync lag local %d applies mean %.1f ms; gossip %d records mean %.1f ms; policy %d versions mean %.1f ms; apply %d mean %.2f ms",
			h.Name, int(lc), 1000*ls/max(lc, 1), int(gc), 1000*gs/max(gc, 1), int(pc), 1000*ps/max(pc, 1), int(ac), 1000*as/max(ac, 1))
	}

	// db's peer killed and restarted: the kernel keeps enforcing while it is down, and the
	// restarted peer re-applies what it stored (the other hosts' endpoints included) before
	// it serves: the open connection and a new web→db connection work, a client stays out.
	if err := a.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := echoLine(open, "peer down\n"); err != nil {
		t.Fatalf("the open connection while db's peer is down: %v", err)
	}
	if conn, err := clientB.dial(dbAt("default"), 700*time.Millisecond); err == nil {
		conn.Close()
		t.Error("a client reached db while db's peer was down")
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := webB.reach(dbAt("default"), 2*time.Second); err != nil {
		t.Errorf("web on %s → db right after db's peer restarted: %v", b.Name, err)
	}
	if err := echoLine(open, "peer back\n"); err != nil {
		t.Fatalf("the open connection after db's peer restarted: %v", err)
	}
	if conn, err := clientB.dial(dbAt("default"), 700*time.Millisecond); err == nil {
		conn.Close()
		t.Error("a client reached db after db's peer restarted")
	}

}
