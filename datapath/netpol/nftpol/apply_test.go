package nftpol

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/datapath/isolate"
	"github.com/weftnet/weft/datapath/netpol"
	"github.com/weftnet/weft/datapath/netpol/netpoltest"
	"github.com/weftnet/weft/datapath/nslab"
)

// testLab is a host namespace (r) with one bridge and containers on it, and one
// container behind a route (another subnet, reached through r's forwarding).
type testLab struct {
	t   *testing.T
	lab *nslab.Lab
	r   *nslab.NS
}

func newTestLab(t *testing.T) *testLab {
	lab := nslab.NewTest(t, nslab.Config{Prefix: fmt.Sprintf("wnp%d-", os.Getpid()%10000), NoIPv6: true})
	r, err := lab.NewNS("r")
	if err != nil {
		t.Fatal(err)
	}
	l := &testLab{t: t, lab: lab, r: r}
	l.run(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	l.run(r, "ip", "link", "add", "wbr", "type", "bridge")
	l.run(r, "ip", "addr", "add", "10.32.0.1/24", "dev", "wbr")
	l.run(r, "ip", "link", "set", "wbr", "up")
	return l
}

func (l *testLab) run(n *nslab.NS, name string, args ...string) {
	l.t.Helper()
	if _, err := n.Run(context.Background(), name, args...); err != nil {
		l.t.Fatal(err)
	}
}

// container makes a namespace with address a: on the bridge when bridged, else on a veth
// of its own routed by r (gateway .1 of a's /24).
func (l *testLab) container(suffix string, a string, bridged bool) *nslab.NS {
	l.t.Helper()
	c, err := l.lab.NewNS(suffix)
	if err != nil {
		l.t.Fatal(err)
	}
	gw := netip.MustParsePrefix(a + "/24").Masked().Addr().Next()
	hostIf := "v" + suffix
	l.run(l.r, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", "eth0", "netns", c.Name)
	if bridged {
		l.run(l.r, "ip", "link", "set", hostIf, "master", "wbr", "up")
	} else {
		l.run(l.r, "ip", "addr", "add", gw.String()+"/24", "dev", hostIf)
		l.run(l.r, "ip", "link", "set", hostIf, "up")
	}
	l.run(c, "ip", "addr", "add", a+"/24", "dev", "eth0")
	l.run(c, "ip", "link", "set", "eth0", "up")
	l.run(c, "ip", "route", "add", "default", "via", gw.String())
	return c
}

// dial connects from n to a:port, giving up after a second.
func dial(n *nslab.NS, a string, port int) (net.Conn, error) {
	return netpoltest.Dial(n.Path(), netip.AddrPortFrom(netip.MustParseAddr(a), uint16(port)), time.Second)
}

func (l *testLab) mustConnect(from *nslab.NS, a string) {
	l.t.Helper()
	nslab.Eventually(l.t, 5*time.Second, from.Name+" connects to "+a, func() error {
		c, err := dial(from, a, 5432)
		if err != nil {
			return err
		}
		defer c.Close()
		return netpoltest.EchoLine(c, "hello\n", 2*time.Second)
	})
}

func (l *testLab) mustNotConnect(from *nslab.NS, a string) {
	l.t.Helper()
	if c, err := dial(from, a, 5432); err == nil {
		c.Close()
		l.t.Fatalf("%s connects to %s:5432 against the policy", from.Name, a)
	}
}

func parse(t *testing.T, name, data string) netpol.Policy {
	t.Helper()
	p, err := netpol.Parse(name, []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func endpoint(key, a, app string) netpol.Endpoint {
	return netpol.Endpoint{Key: key, Network: "default", Addr: netip.MustParseAddr(a), Labels: map[string]string{"app": app}}
}

const dbPolicy = `
name: db-allow-web
network: default
selector: {matchLabels: {app: db}}
ingress:
  - action: allow
    peers: [{selector: {matchLabels: {app: web}}}]
    ports: [{proto: tcp, port: 5432}]
`

// unrelated is a policy on containers of another app, with a CIDR peer (an interval set)
// and a deny rule; version changes its content (so its rules and sets are replaced).
func unrelated(t *testing.T, version int) netpol.Policy {
	return parse(t, "other.yaml", fmt.Sprintf(`
name: other
network: default
order: %d
selector: {matchLabels: {app: other}}
egress:
  - action: deny
    peers: [{cidr: 192.0.2.0/24}, {selector: {matchLabels: {app: client}}}]
  - action: allow
    ports: [{proto: udp, from: 1000, to: %d}]
`, version%5, 2000+version))
}

// db accepts only app=web on tcp/5432: from the same bridge and from behind a route;
// client (same bridge) is dropped and counted; an established web→db connection survives
// 100 unrelated updates; a new endpoint is set elements only; re-applying and a fresh
// enforcer (reading the kernel back) change nothing; Remove leaves nothing.
func TestPolicyInNamespaces(t *testing.T) {
	l := newTestLab(t)
	db := l.container("db", "10.32.0.3", true)
	web := l.container("web", "10.32.0.2", true)
	client := l.container("cl", "10.32.0.4", true)
	rweb := l.container("rw", "10.33.0.2", false)
	netpoltest.ListenEcho(t, db.Path(), 5432)

	if err := l.r.Do(CheckBridged); err != nil {
		t.Fatalf("same-bridge traffic would not be policed: %v", err)
	}
	// Without policy everything connects: the test can fail.
	l.mustConnect(client, "10.32.0.3")
	l.mustConnect(rweb, "10.32.0.3")

	reg := prometheus.NewRegistry()
	e, err := New(Deps{Registry: reg, NetNSFd: int(l.r.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Remove() })
	eps := []netpol.Endpoint{endpoint("db", "10.32.0.3", "db"), endpoint("web", "10.32.0.2", "web"),
		endpoint("client", "10.32.0.4", "client"), endpoint("rweb", "10.33.0.2", "web")}
	pols := []netpol.Policy{parse(t, "db.yaml", dbPolicy), unrelated(t, 0)}
	rs := netpol.Compile(pols, eps)
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}

	l.mustConnect(web, "10.32.0.3")
	l.mustConnect(rweb, "10.32.0.3")
	l.mustNotConnect(client, "10.32.0.3")
	dropped := func() uint64 {
		d, err := e.Drops()
		if err != nil {
			t.Fatal(err)
		}
		return d[netpol.Drop{Network: "default", Policy: "db-allow-web", Direction: netpol.Ingress, Rule: netpol.Default}]
	}
	if n := dropped(); n == 0 {
		t.Fatal("client's drop was not counted on db-allow-web's default deny")
	}
	metrics := prometheus.NewRegistry()
	metrics.MustRegister(e.DropsCollector())
	if v := dropsMetric(t, metrics, "default/db-allow-web", "ingress"); v == 0 {
		t.Fatal("weft_policy_drops_total of db-allow-web's ingress is 0")
	}
	d := rs.Explain(netip.MustParseAddr("10.32.0.4"), netip.MustParseAddr("10.32.0.3"), netpol.TCP, 5432)
	if d.Allowed || !strings.Contains(d.Reason, "default deny of policy default/db-allow-web") {
		t.Fatalf("explain: %+v", d)
	}

	// Egress: web may reach only db on tcp/5432. Its allow returns to the ingress check
	// (db's policy still decides); anything else web opens is its default deny.
	netpoltest.ListenEcho(t, client.Path(), 5432)
	webOut := parse(t, "web-out.yaml", `
name: web-out
network: default
selector: {matchLabels: {app: web}}
egress:
  - action: allow
    peers: [{selector: {matchLabels: {app: db}}}]
    ports: [{proto: tcp, port: 5432}]
`)
	rsOut := netpol.Compile(append(slices.Clone(pols), webOut), eps)
	if _, err := e.Apply(rsOut); err != nil {
		t.Fatal(err)
	}
	l.mustConnect(web, "10.32.0.3")
	l.mustNotConnect(web, "10.32.0.4")
	l.mustConnect(db, "10.32.0.4") // db is not selected for egress, client not for ingress
	d = rsOut.Explain(netip.MustParseAddr("10.32.0.2"), netip.MustParseAddr("10.32.0.4"), netpol.TCP, 5432)
	if d.Allowed || d.Egress.Counter != "netpol_default_web-out_egress_default" {
		t.Fatalf("explain web→client: %+v", d)
	}
	if drops, _ := e.Drops(); drops[netpol.Drop{Network: "default", Policy: "web-out", Direction: netpol.Egress, Rule: netpol.Default}] == 0 {
		t.Fatalf("web→client not counted on web-out's egress default deny: %v", drops)
	}
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}
	l.mustConnect(web, "10.32.0.4")

	// An established connection survives 100 unrelated updates (policy content and
	// endpoints), exchanging data across each.
	conn, err := dial(web, "10.32.0.3", 5432)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	before, err := e.Rules()
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 100; i++ {
		more := append([]netpol.Endpoint{}, eps...)
		more = append(more, endpoint(fmt.Sprintf("x%d", i), fmt.Sprintf("10.32.1.%d", i), "other"))
		st, err := e.Apply(netpol.Compile([]netpol.Policy{pols[0], unrelated(t, i)}, more))
		if err != nil {
			t.Fatalf("update %d: %v", i, err)
		}
		if st.RulesAdded == 0 || st.RulesDeleted == 0 || st.ElementsAdded == 0 {
			t.Fatalf("update %d applied as %+v: want the unrelated policy's rules replaced and an endpoint added", i, st)
		}
		if err := netpoltest.EchoLine(conn, fmt.Sprintf("update %d\n", i), 2*time.Second); err != nil {
			t.Fatalf("established connection broken by update %d: %v", i, err)
		}
	}
	if after, err := e.Rules(); err != nil || after != before {
		t.Fatalf("rules %d before the updates, %d after (%v)", before, after, err)
	}

	// A new web endpoint is elements only, and reaches db.
	web2 := l.container("web2", "10.32.0.5", true)
	eps = append(eps, endpoint("web2", "10.32.0.5", "web"))
	rs = netpol.Compile(pols, eps)
	if _, err := e.Apply(rs); err != nil { // back to version 0 of the unrelated policy
		t.Fatal(err)
	}
	before, _ = e.Rules()
	eps = append(eps, endpoint("web3", "10.32.0.6", "web"))
	rs = netpol.Compile(pols, eps)
	st, err := e.Apply(rs)
	if err != nil {
		t.Fatal(err)
	}
	if st.RulesAdded+st.RulesDeleted+st.SetsAdded+st.SetsDeleted != 0 || st.ElementsAdded == 0 {
		t.Fatalf("a new endpoint applied as %+v, want elements only", st)
	}
	if after, _ := e.Rules(); after != before {
		t.Fatalf("rules %d before a new endpoint, %d after", before, after)
	}
	l.mustConnect(web2, "10.32.0.3")

	// Re-applying, and a fresh enforcer reading the kernel back, change nothing.
	if st, err := e.Apply(rs); err != nil || st != (Stats{}) {
		t.Fatalf("re-apply: %+v %v", st, err)
	}
	fresh, err := New(Deps{NetNSFd: int(l.r.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := fresh.Apply(rs); err != nil || st != (Stats{}) {
		t.Fatalf("apply by a fresh enforcer: %+v %v", st, err)
	}
	// A hand-deleted element is not seen by Apply (it trusts its last transaction) but is
	// put back by Reconcile.
	l.run(l.r, "nft", "delete", "element", "inet", "weft", netpol.GateIngress, "{ 10.32.0.3 }")
	if st, err := e.Reconcile(rs); err != nil || st.ElementsAdded != 1 {
		t.Fatalf("reconcile after a hand edit: %+v %v", st, err)
	}
	l.mustNotConnect(client, "10.32.0.3")
	if n := testutil.ToFloat64(e.a.Applies("error")); n != 0 {
		t.Fatalf("%v failed applies", n)
	}

	if err := e.Remove(); err != nil {
		t.Fatal(err)
	}
	if n, err := e.Rules(); err != nil || n != 0 {
		t.Fatalf("%d rules left after Remove (%v)", n, err)
	}
	if err := e.Remove(); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
	l.mustConnect(client, "10.32.0.3")
}

// A bad Ruleset (a clause naming a set it lacks) is refused whole: nothing changes.
func TestApplyRefusedChangesNothing(t *testing.T) {
	l := newTestLab(t)
	e, err := New(Deps{NetNSFd: int(l.r.Fd())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Remove() })
	rs := netpol.Compile([]netpol.Policy{parse(t, "db.yaml", dbPolicy)}, []netpol.Endpoint{endpoint("db", "10.32.0.3", "db")})
	if _, err := e.Apply(rs); err != nil {
		t.Fatal(err)
	}
	before, _ := e.Rules()
	bad := netpol.Compile(nil, nil)
	bad.Ingress = []netpol.Clause{{Key: "netpol bad", Direction: netpol.Ingress, Selected: "netpol_missing", Action: netpol.Allow}}
	if _, err := e.Apply(bad); !errors.Is(err, ErrRuleset) {
		t.Fatalf("apply of a clause without its set: %v", err)
	}
	if after, _ := e.Rules(); after != before {
		t.Fatalf("a refused apply changed the rules: %d → %d", before, after)
	}
}

// dropsMetric is the value of weft_policy_drops_total{policy, direction}.
func dropsMetric(t *testing.T, g prometheus.Gatherer, policy, direction string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "weft_policy_drops_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			if labels["policy"] == policy && labels["direction"] == direction {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no weft_policy_drops_total{policy=%q,direction=%q}", policy, direction)
	return 0
}

// Policy shares weft's table with isolation: each removes only its own objects, and the
// table goes with the last of them.
func TestSharesTableWithIsolation(t *testing.T) {
	l := newTestLab(t)
	hostNS := int(l.r.Fd())
	iso, err := isolate.New(isolate.Deps{NetNSFd: hostNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { iso.Remove() })
	if err := iso.Set([]isolate.Network{
		{Name: "default", Subnet: netip.MustParsePrefix("10.32.0.0/24"), Bridge: "wbr"},
		{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), Isolated: true},
	}); err != nil {
		t.Fatal(err)
	}
	e, err := New(Deps{NetNSFd: hostNS})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Remove() })
	if _, err := e.Apply(netpol.Compile([]netpol.Policy{parse(t, "db.yaml", dbPolicy)}, nil)); err != nil {
		t.Fatal(err)
	}
	chains := func() string {
		out, _ := l.r.Run(context.Background(), "nft", "list", "chains", "inet")
		return out
	}
	if c := chains(); !strings.Contains(c, "isolate_fwd") || !strings.Contains(c, ForwardChain) {
		t.Fatalf("chains after both applied:\n%s", c)
	}
	// Isolation re-applied sees policy's objects as others' and keeps them.
	if err := iso.Set([]isolate.Network{
		{Name: "default", Subnet: netip.MustParsePrefix("10.32.0.0/24"), Bridge: "wbr"},
		{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), Isolated: true},
		{Name: "ctl", Subnet: netip.MustParsePrefix("10.60.0.0/16"), Isolated: true},
	}); err != nil {
		t.Fatal(err)
	}
	if n, err := e.Rules(); err != nil || n != 7 {
		t.Fatalf("%d policy rules after isolation changed (%v), want 7", n, err)
	}
	if err := e.Remove(); err != nil {
		t.Fatal(err)
	}
	if c := chains(); !strings.Contains(c, "isolate_fwd") || strings.Contains(c, "netpol") {
		t.Fatalf("chains after policy removed:\n%s", c)
	}
	if err := iso.Remove(); err != nil {
		t.Fatal(err)
	}
	if out, err := l.r.Run(context.Background(), "nft", "list", "tables"); err != nil || strings.Contains(out, "weft") {
		t.Fatalf("tables after both removed: %q %v", out, err)
	}
}
