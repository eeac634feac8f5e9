package router

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/datapath/netpol"
	"github.com/weftnet/weft/datapath/netpol/netpoltest"
	"github.com/weftnet/weft/datapath/netpol/nftpol"
	"github.com/weftnet/weft/ipam"
)

// wpwContainer makes a network namespace standing in for a container (this file's prefix).
func wpwContainer(t *testing.T, n int) string {
	t.Helper()
	name := fmt.Sprintf("wpw-%d-c%d", os.Getpid(), n)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

const dbPolicy = `name: db-only-web
network: default
selector: {matchLabels: {app: db}}
ingress:
  - action: allow
    peers:
      - selector: {matchLabels: {app: web}}
    ports:
      - {proto: tcp, port: 5432}
`

// The whole wiring on one peer: the default validator takes netpol files and refuses
// garbage at a file position; a policy reaches the kernel; web→db works, client→db is
// dropped and counted, explain names the policy; a client added afterwards is blocked from
// its first packet; an open connection survives policy updates; DEL takes the address out.
func TestPolicyWiredOnOnePeer(t *testing.T) {
	p := startPeer(t, t.TempDir()) // no ValidatePolicy: the peer's own (netpol.Parse)
	h := p.apiHandler()
	ctx := context.Background()
	waitFor(t, 10*time.Second, "the cluster to define its networks", func() bool { return len(p.cluster.Networks()) > 0 })
	if p.policy == nil {
		t.Fatal("the peer runs no policy part")
	}

	add := func(n int, id string, labels map[string]string) (string, netip.Addr) {
		t.Helper()
		nsPath := wpwContainer(t, n)
		req := addReq(id, nsPath)
		req.Labels = labels
		res, err := p.client.Add(ctx, req)
		if err != nil {
			t.Fatalf("add %s: %v", id, err)
		}
		return nsPath, netip.MustParsePrefix(res.Address).Addr()
	}
	dbNS, dbAddr := add(1, "db", map[string]string{"app": "db"})
	webNS, _ := add(2, "web", map[string]string{"app": "web"})
	clientNS, clientAddr := add(3, "client", map[string]string{"app": "client"})
	netpoltest.ListenEcho(t, dbNS, 5432)
	db := netip.AddrPortFrom(dbAddr, 5432)

	// Before any policy: everyone reaches db; an established connection from the client too.
	if c, err := netpoltest.Dial(clientNS, db, 2*time.Second); err != nil {
		t.Fatalf("client→db before any policy: %v", err)
	} else {
		c.Close()
	}
	open, err := netpoltest.Dial(webNS, db, 2*time.Second)
	if err != nil {
		t.Fatalf("web→db before any policy: %v", err)
	}
	defer open.Close()

	// Garbage is refused at its position and changes nothing.
	if code, msg := apiCall(t, h, "POST", "/v1/policies", policyBody("db-only-web", "name: db-only-web\nnetwork: default\ningress:\n  - action: allw\n"), nil); code != 400 ||
		!strings.Contains(msg, "line 4") || !strings.Contains(msg, "allw") {
		t.Fatalf("garbage policy: %d %s", code, msg)
	}
	if list, _ := p.cluster.Policies(); len(list) != 0 {
		t.Fatalf("a refused policy was stored: %+v", list)
	}

	waitFor(t, 10*time.Second, "the policy to be stored", func() bool {
		code, msg := apiCall(t, h, "POST", "/v1/policies", policyBody("db-only-web", dbPolicy), nil)
		if code != 200 && code != 503 {
			t.Fatalf("apply: %d %s", code, msg)
		}
		return code == 200
	})
	waitFor(t, 5*time.Second, "the policy to be applied", func() bool {
		rs, _ := p.policy.ruleset()
		return !rs.Explain(clientAddr, dbAddr, netpol.TCP, 5432).Allowed
	})

	waitFor(t, 2*time.Second, "the policy's sync lag measured", func() bool {
		_, c := histogramCount(t, p.policy, "policy")
		return c > 0
	})
	if _, c := histogramCount(t, p.policy, "local"); c != 3 {
		t.Errorf("local sync lag measured %d times, want 3 (the ADDs)", c)
	}
	if c, err := netpoltest.Dial(webNS, db, 2*time.Second); err != nil {
		t.Fatalf("web→db under the policy: %v", err)
	} else {
		c.Close()
	}
	if c, err := netpoltest.Dial(clientNS, db, 500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("client→db connected under the policy")
	}
	if err := netpoltest.EchoLine(open, "still open\n", 2*time.Second); err != nil {
		t.Fatalf("the connection opened before the policy: %v", err)
	}
	drops := func() float64 {
		return testutil.ToFloat64(p.policy.d.Enforcer.DropsCollector())
	}
	if d := drops(); d < 1 {
		t.Fatalf("weft_policy_drops_total %v after a dropped SYN", d)
	}
	mfs, err := p.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]bool{}
	for _, mf := range mfs {
		found[mf.GetName()] = true
	}
	for _, name := range []string{"weft_policy_drops_total", "weft_policy_sync_seconds", "weft_policy_apply_seconds", "weft_policy_applies_total"} {
		if !found[name] {
			t.Errorf("metric %s not exported", name)
		}
	}

	// Explain over the API, by container name and by address.
	var ex PolicyExplain
	if code, msg := apiCall(t, h, "GET", "/v1/policy/explain?src=client&dst="+dbAddr.String()+"&proto=tcp&port=5432", "", &ex); code != 200 ||
		ex.Allowed || ex.Ingress.Policy != "default/db-only-web" || ex.Ingress.Rule != -1 || !strings.Contains(ex.Reason, "default deny of policy default/db-only-web") {
		t.Fatalf("explain client→db: %d %s %+v", code, msg, ex)
	}
	if code, msg := apiCall(t, h, "GET", "/v1/policy/explain?src=web&dst=db&port=5432", "", &ex); code != 200 ||
		!ex.Allowed || ex.Ingress.Rule != 0 || !strings.Contains(ex.Reason, "ingress rule 0 of policy default/db-only-web") {
		t.Fatalf("explain web→db: %d %s %+v", code, msg, ex)
	}
	for _, q := range []string{"src=web&dst=db&port=0", "src=web&dst=db&proto=gre&port=1", "src=nobody&dst=db&port=1", "dst=db&port=1"} {
		if code, msg := apiCall(t, h, "GET", "/v1/policy/explain?"+q, "", nil); code != 400 {
			t.Errorf("explain %s: %d %s, want 400", q, code, msg)
		}
	}

	// A new client is blocked from its very first packet: dialled the moment ADD returns.
	lateNS, _ := add(4, "late", map[string]string{"app": "client"})
	before := drops()
	if c, err := netpoltest.Dial(lateNS, db, time.Second); err == nil {
		c.Close()
		t.Fatal("a client added after the policy connected to db")
	}
	// Counted as a policy drop (not lost before the bridge: a slow link up would look alike).
	waitFor(t, 2*time.Second, "the late client's SYN to be counted as a policy drop", func() bool { return drops() > before })
	// A new web reaches db at once.
	lateWebNS, lateWebAddr := add(5, "lateweb", map[string]string{"app": "web"})
	if c, err := netpoltest.Dial(lateWebNS, db, 2*time.Second); err != nil {
		t.Fatalf("a web added after the policy: %v", err)
	} else {
		c.Close()
	}

	// Unrelated policy updates leave the open connection alone.
	for i := range 20 {
		f := fmt.Sprintf("name: other\nnetwork: default\norder: %d\nselector: {matchLabels: {app: other}}\ningress:\n  - action: allow\n    ports: [{proto: udp, port: %d}]\n", i, 1000+i)
		waitFor(t, 10*time.Second, "an unrelated update", func() bool {
			code, _ := apiCall(t, h, "POST", "/v1/policies", policyBody("other", f), nil)
			return code == 200
		})
		if err := netpoltest.EchoLine(open, fmt.Sprintf("update %d\n", i), 2*time.Second); err != nil {
			t.Fatalf("the open connection after update %d: %v", i, err)
		}
	}

	// `weft label` at run time: the late client becomes a web and reaches db.
	if code, msg := apiCall(t, h, "POST", "/v1/labels", `{"container":"late","set":{"app":"web"}}`, nil); code != 200 {
		t.Fatalf("label: %d %s", code, msg)
	}
	waitFor(t, 2*time.Second, "the relabelled client to reach db", func() bool {
		c, err := netpoltest.Dial(lateNS, db, 200*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	// DEL: the address leaves the sets before it is released.
	if err := p.client.Del(ctx, addReq("lateweb", lateWebNS)); err != nil {
		t.Fatal(err)
	}
	if _, ok := p.alloc.Get(ipam.Key{ContainerID: "lateweb", IfName: "eth0"}); ok {
		t.Fatal("lateweb still attached after DEL")
	}
	rs, _ := p.policy.ruleset()
	for name, s := range rs.Sets {
		if slices.Contains(s.Addrs, lateWebAddr) {
			t.Fatalf("set %s still holds the deleted web's %v", name, lateWebAddr)
		}
	}
}

func TestParseExplainPort(t *testing.T) {
	for _, tt := range []struct {
		proto, port string
		want        netpol.Proto
		n           uint16
		err         string
	}{
		{"", "5432", netpol.TCP, 5432, ""},
		{"UDP", "53", netpol.UDP, 53, ""},
		{"icmp", "", netpol.ICMP, 0, ""},
		{"icmp", "3", "", 0, "icmp has no port"},
		{"tcp", "0", "", 0, "1-65535"},
		{"tcp", "70000", "", 0, "1-65535"},
		{"gre", "1", "", 0, `protocol "gre"`},
	} {
		pr, n, err := parseExplainPort(tt.proto, tt.port)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%s/%s: %v, want %q", tt.proto, tt.port, err, tt.err)
			}
			continue
		}
		if err != nil || pr != tt.want || n != tt.n {
			t.Errorf("%s/%s: %s %d %v", tt.proto, tt.port, pr, n, err)
		}
	}
}

func TestPolicyEndpointsLeaveOutLeaving(t *testing.T) {
	a := netip.MustParseAddr("10.40.0.2")
	b := netip.MustParseAddr("10.40.0.3")
	local := []EndpointInfo{
		{Peer: "p1", ContainerID: "x", IfName: "eth0", Network: "default", Address: a, Labels: map[string]string{"app": "db"}},
		{Peer: "p1", ContainerID: "y", IfName: "eth0", Network: "default", Address: b},
	}
	remote := []EndpointInfo{{Peer: "p2", ContainerID: "z", Network: "default", Address: netip.MustParseAddr("10.40.1.2")}}
	eps := policyEndpoints(local, remote, map[ipam.Key]bool{{ContainerID: "y", IfName: "eth0"}: true})
	if len(eps) != 2 || eps[0].Addr != a || eps[0].Labels["app"] != "db" || eps[1].Key != "p2/10.40.1.2" {
		t.Fatalf("endpoints: %+v", eps)
	}
	if _, err := resolveEndpoint("x", local); err != nil {
		t.Fatal(err)
	}
	dup := append(local, EndpointInfo{ContainerID: "x", Address: netip.MustParseAddr("10.41.0.2")})
	if _, err := resolveEndpoint("x", dup); err == nil || !strings.Contains(err.Error(), "several") {
		t.Fatalf("ambiguous name: %v", err)
	}
}

// A spec another validator stored is left out and reported, not compiled as a policy.
func TestDecodePoliciesSkipsForeignSpecs(t *testing.T) {
	good, _ := json.Marshal(netpol.Policy{Name: "a", Network: "default"})
	pols, skipped := decodePolicies([]ipam.PolicyObject{
		{Name: "a", Network: "default", Spec: good},
		{Name: "b", Network: "default", Spec: json.RawMessage(`{"network":"default","allow":["web"]}`)},
	})
	if len(pols) != 1 || pols[0].Name != "a" || len(skipped) != 1 || !strings.Contains(skipped[0], "policy b") {
		t.Fatalf("%+v %v", pols, skipped)
	}
}

// The other hosts' endpoints at the last apply stand in after a restart until gossip brings
// them back, so a restart does not cut remote peers that policy allows.
func TestPolicyRemoteEndpointsSavedForRestart(t *testing.T) {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "weft.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	enf, err := nftpol.New(nftpol.Deps{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { enf.Remove() })
	dbAddr, web := netip.MustParseAddr("10.40.0.2"), netip.MustParseAddr("10.40.1.2")
	local := func() []EndpointInfo {
		return []EndpointInfo{{Peer: "p1", ContainerID: "db", IfName: "eth0", Network: "default", Address: dbAddr, Labels: map[string]string{"app": "db"}}}
	}
	var remote []EndpointInfo
	newPart := func() *policyPart {
		pp, err := newPolicyPart(policyDeps{Enforcer: enf, Local: local, Remote: func() []EndpointInfo { return remote }, DB: db})
		if err != nil {
			t.Fatal(err)
		}
		pol, err := netpol.Parse("db-only-web", []byte(dbPolicy))
		if err != nil {
			t.Fatal(err)
		}
		spec, _ := json.Marshal(pol)
		pp.setPolicies([]ipam.PolicyObject{{Name: "db-only-web", Network: "default", Spec: spec}})
		return pp
	}
	allowed := func(pp *policyPart) bool {
		rs, _ := pp.ruleset()
		return rs.Explain(web, dbAddr, netpol.TCP, 5432).Allowed
	}
	pp := newPart()
	remote = []EndpointInfo{{Peer: "p2", ContainerID: "web", Network: "default", Address: web, Labels: map[string]string{"app": "web"}, Changed: time.Now()}}
	if err := pp.sync(); err != nil || !allowed(pp) {
		t.Fatalf("web on p2 → db: allowed %v, err %v", allowed(pp), err)
	}
	if _, c := histogramCount(t, pp, "gossip"); c != 1 {
		t.Fatalf("gossip sync lag observed %d times, want 1", c)
	}

	// "Restart": gossip has brought nothing yet; the saved endpoints stand in.
	remote = nil
	pp = newPart()
	if err := pp.sync(); err != nil || !allowed(pp) {
		t.Fatalf("after a restart, web on p2 → db: allowed %v, err %v", allowed(pp), err)
	}
	// Once gossip brings the others' endpoints, they alone count.
	remote = []EndpointInfo{{Peer: "p2", ContainerID: "other", Network: "default", Address: netip.MustParseAddr("10.40.1.3")}}
	if err := pp.sync(); err != nil || allowed(pp) {
		t.Fatalf("with gossip back, the saved web still counts: allowed %v, err %v", allowed(pp), err)
	}
}

// histogramCount reads the sample sum and count of the sync-lag histogram of source.
func histogramCount(t *testing.T, pp *policyPart, source string) (float64, uint64) {
	t.Helper()
	var m dto.Metric
	if err := pp.syncSeconds.WithLabelValues(source).(prometheus.Histogram).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleSum(), m.GetHistogram().GetSampleCount()
}
