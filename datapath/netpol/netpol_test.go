package netpol

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

const dbYAML = `
name: db-allow-web
network: default
selector:
  matchLabels: {app: db}
order: 10
ingress:
  - action: allow
    peers:
      - selector: {matchLabels: {app: web}}
    ports:
      - {proto: tcp, port: 5432}
`

func mustParse(t testing.TB, name, data string) Policy {
	t.Helper()
	p, err := Parse(name, []byte(data))
	if err != nil {
		t.Fatalf("parse %s: %v", name, err)
	}
	return p
}

func ep(key, network, addr string, labels ...string) Endpoint {
	l := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		l[labels[i]] = labels[i+1]
	}
	return Endpoint{Key: key, Network: network, Addr: netip.MustParseAddr(addr), Labels: l}
}

var (
	web    = ep("web", "default", "10.32.0.2", "app", "web")
	db     = ep("db", "default", "10.32.0.3", "app", "db")
	client = ep("client", "default", "10.32.0.4", "app", "client")
)

func TestParseYAMLAndJSON(t *testing.T) {
	p := mustParse(t, "db.yaml", dbYAML)
	if p.Name != "db-allow-web" || p.Order != 10 || len(p.Ingress) != 1 || p.Ingress[0].Ports[0].From != 5432 {
		t.Fatalf("parsed %+v", p)
	}
	js := "{\n\t\"name\": \"db-allow-web\", \"network\": \"default\", \"order\": 10,\n\t\"selector\": {\"matchLabels\": {\"app\": \"db\"}},\n" +
		"\t\"ingress\": [{\"action\": \"allow\", \"peers\": [{\"selector\": {\"matchLabels\": {\"app\": \"web\"}}}],\n" +
		"\t\"ports\": [{\"proto\": \"tcp\", \"from\": 5432}]}]\n}\n"
	q := mustParse(t, "db.json", js)
	if policyHash(p) != policyHash(q) {
		t.Fatalf("YAML and JSON of one policy differ:\n%+v\n%+v", p, q)
	}
}

func TestParseRefusesGarbageWithPosition(t *testing.T) {
	for _, tc := range []struct{ name, data, want string }{
		{"syntax", "name: [a\n", "db.yaml: line"},
		{"unknown field", "name: a\nnetwork: default\nselecter: {}\n", "line 3 column 1: policy: unknown field \"selecter\""},
		{"bad action", "name: a\nnetwork: default\ningress:\n  - action: allw\n", "line 4 column 5: ingress[0].action: \"allw\""},
		{"bad port type", "name: a\nnetwork: default\ningress:\n  - action: allow\n    ports: [{proto: tcp, port: http}]\n", "line 5"},
		{"port too big", "name: a\nnetwork: default\ningress:\n  - action: allow\n    ports: [{proto: tcp, port: 70000}]\n", "line 5"},
		{"bad cidr", "name: a\nnetwork: default\ningress:\n  - action: deny\n    peers: [{cidr: 10.0.0.0/33}]\n", "line 5 column 20: cidr"},
		{"host bits", "name: a\nnetwork: default\ningress:\n  - action: deny\n    peers: [{cidr: 10.0.0.1/24}]\n", "host bits"},
		{"cidr with selector", "name: a\nnetwork: default\negress:\n  - action: deny\n    peers: [{cidr: 10.0.0.0/8, network: x}]\n", "stands alone"},
		{"bad operator", "name: a\nnetwork: default\nselector:\n  matchExpressions: [{key: app, operator: Is}]\n", "line 4 column 22: selector.matchExpressions[0].operator"},
		{"bad label", "name: a\nnetwork: default\nselector: {matchLabels: {\"a=b\": x}}\n", "selector.matchLabels: key"},
		{"long label", "name: a\nnetwork: default\nselector: {matchLabels: {app: " + strings.Repeat("x", 64) + "}}\n", "64 bytes"},
		{"icmp port", "name: a\nnetwork: default\ningress:\n  - action: allow\n    ports: [{proto: icmp, port: 3}]\n", "icmp has no ports"},
		{"range backwards", "name: a\nnetwork: default\ningress:\n  - action: allow\n    ports: [{proto: udp, from: 10, to: 5}]\n", "below from"},
		{"bad name", "name: A_b\nnetwork: default\n", "name: \"A_b\""},
		{"types leave out", "name: a\nnetwork: default\ntypes: [ingress]\negress: [{action: allow}]\n", "leave egress out"},
		{"two documents", "name: a\nnetwork: default\n---\nname: b\n", "second document"},
		{"not a mapping", "- a\n- b\n", "want a mapping"},
		{"empty", "  \n", "empty file"},
		{"too many rules", "name: a\nnetwork: default\ningress:\n" + strings.Repeat("  - action: allow\n", MaxRules+1), "65 rules"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("db.yaml", []byte(tc.data))
			if !errors.Is(err, ErrPolicy) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrPolicy containing %q", err, tc.want)
			}
		})
	}
	if _, err := Parse("big.yaml", make([]byte, MaxFileBytes+1)); !errors.Is(err, ErrPolicy) {
		t.Fatalf("oversized file: %v", err)
	}
}

func TestSelectorExpressions(t *testing.T) {
	s := Selector{MatchLabels: map[string]string{"tier": "back"}, MatchExpressions: []Requirement{
		{Key: "app", Operator: OpIn, Values: []string{"db", "cache"}},
		{Key: "debug", Operator: OpDoesNotExist},
	}}
	for _, tc := range []struct {
		labels map[string]string
		want   bool
	}{
		{map[string]string{"tier": "back", "app": "db"}, true},
		{map[string]string{"tier": "back", "app": "cache"}, true},
		{map[string]string{"tier": "back", "app": "web"}, false},
		{map[string]string{"tier": "back", "app": "db", "debug": "1"}, false},
		{map[string]string{"app": "db"}, false},
	} {
		if got := s.Matches(tc.labels); got != tc.want {
			t.Errorf("%v: got %v, want %v", tc.labels, got, tc.want)
		}
	}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestCompileDBAcceptsOnlyWeb(t *testing.T) {
	rs := Compile([]Policy{mustParse(t, "db.yaml", dbYAML)}, []Endpoint{web, db, client})
	if len(rs.Skipped) != 0 {
		t.Fatalf("skipped %v", rs.Skipped)
	}
	for _, tc := range []struct {
		src, dst netip.Addr
		proto    Proto
		port     uint16
		allowed  bool
		reason   string
	}{
		{web.Addr, db.Addr, TCP, 5432, true, "ingress rule 0 of policy default/db-allow-web"},
		{web.Addr, db.Addr, TCP, 5433, false, "default deny of policy default/db-allow-web"},
		{web.Addr, db.Addr, UDP, 5432, false, "default deny"},
		{client.Addr, db.Addr, TCP, 5432, false, "default deny of policy default/db-allow-web (ingress"},
		{client.Addr, web.Addr, TCP, 80, true, "default allow"},
		{db.Addr, client.Addr, TCP, 80, true, "default allow"}, // db is not selected for egress
	} {
		d := rs.Explain(tc.src, tc.dst, tc.proto, tc.port)
		if d.Allowed != tc.allowed || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%v→%v %s/%d: allowed=%v %q; want %v %q", tc.src, tc.dst, tc.proto, tc.port, d.Allowed, d.Reason, tc.allowed, tc.reason)
		}
	}
	d := rs.Explain(client.Addr, db.Addr, TCP, 5432)
	if d.Ingress.Counter != "netpol_default_db-allow-web_ingress_default" {
		t.Fatalf("counter %q", d.Ingress.Counter)
	}
}

func TestCompileOrderAndDeny(t *testing.T) {
	// A deny of lower order beats a later allow; an allow of lower order beats a later
	// deny; allows of several policies are a union.
	denyClient := mustParse(t, "a", `
name: deny-client
network: default
order: 1
selector: {matchLabels: {app: db}}
ingress:
  - action: deny
    peers: [{selector: {matchLabels: {app: client}}}]
`)
	allowAll := mustParse(t, "b", `
name: allow-all
network: default
order: 5
selector: {matchLabels: {app: db}}
ingress: [{action: allow}]
`)
	allowWebEgress := mustParse(t, "c", `
name: web-out
network: default
selector: {matchLabels: {app: web}}
egress:
  - action: allow
    peers: [{cidr: 10.32.0.0/29}, {cidr: 10.32.0.0/16}, {cidr: 10.32.0.2/32}]
    ports: [{proto: tcp, from: 5000, to: 6000}, {proto: icmp}]
`)
	rs := Compile([]Policy{allowAll, denyClient, allowWebEgress}, []Endpoint{web, db, client})
	for _, tc := range []struct {
		src, dst netip.Addr
		proto    Proto
		port     uint16
		allowed  bool
		reason   string
	}{
		{client.Addr, db.Addr, TCP, 5432, false, "ingress rule 0 of policy default/deny-client"},
		{web.Addr, db.Addr, TCP, 5432, true, "ingress rule 0 of policy default/allow-all"},
		{web.Addr, db.Addr, TCP, 80, false, "default deny of policy default/web-out (egress"},
		{web.Addr, db.Addr, ICMP, 0, true, "egress rule 0 of policy default/web-out"},
		{web.Addr, addr("10.33.0.1"), TCP, 5500, false, "default deny of policy default/web-out"},
		{web.Addr, addr("10.32.200.1"), TCP, 5500, true, "egress rule 0"},
	} {
		d := rs.Explain(tc.src, tc.dst, tc.proto, tc.port)
		if d.Allowed != tc.allowed || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%v→%v %s/%d: allowed=%v %q; want %v %q", tc.src, tc.dst, tc.proto, tc.port, d.Allowed, d.Reason, tc.allowed, tc.reason)
		}
	}
	var cidrSet AddrSet
	for _, s := range rs.Sets {
		if s.Interval {
			cidrSet = s
		}
	}
	if fmt.Sprint(cidrSet.Prefixes) != "[10.32.0.0/16]" {
		t.Fatalf("merged CIDRs %v", cidrSet.Prefixes)
	}
	// Clause order: egress rules of web-out (2 port ranges), then its default.
	if len(rs.Egress) != 3 || rs.Egress[2].Index != -1 {
		t.Fatalf("egress clauses %+v", rs.Egress)
	}
}

func TestCompileSkipsInvalidAndNonIPv4(t *testing.T) {
	bad := Policy{Name: "Bad!", Network: "default"}
	ok := mustParse(t, "db.yaml", dbYAML)
	v6 := Endpoint{Key: "v6", Network: "default", Addr: addr("fd00::1")}
	rs := Compile([]Policy{bad, ok, ok}, []Endpoint{web, db, v6})
	if len(rs.Skipped) != 3 {
		t.Fatalf("skipped %q, want the bad policy, the duplicate and the IPv6 endpoint", rs.Skipped)
	}
	if len(rs.Ingress) != 2 {
		t.Fatalf("ingress clauses %d", len(rs.Ingress))
	}
}

func TestDiffOfANewEndpointIsElements(t *testing.T) {
	pols := []Policy{mustParse(t, "db.yaml", dbYAML)}
	old := Compile(pols, []Endpoint{web, db, client})
	web2 := ep("web2", "default", "10.32.0.9", "app", "web")
	next := Compile(pols, []Endpoint{web, db, client, web2})
	d := Diff(old, next)
	if len(d.NewClauses)+len(d.GoneClauses)+len(d.NewSets)+len(d.GoneSets) != 0 {
		t.Fatalf("a new endpoint changed rules or sets: %+v", d)
	}
	if d.Elements() != 1 || len(d.Add) != 1 {
		t.Fatalf("delta %+v, want one element added", d)
	}
	// A label change moves the endpoint between sets.
	client2 := client
	client2.Labels = map[string]string{"app": "web"}
	d = Diff(next, Compile(pols, []Endpoint{web, db, client2, web2}))
	if d.Elements() != 1 {
		t.Fatalf("label change delta %+v", d)
	}
	if !Diff(next, next).Empty() {
		t.Fatal("diff of a ruleset with itself is not empty")
	}
	// A changed policy replaces its clauses and sets, and keeps its counters' names.
	p2 := pols[0]
	p2.Ingress = append(p2.Ingress, Rule{Action: Deny})
	d = Diff(next, Compile([]Policy{p2}, []Endpoint{web, db, client, web2}))
	if len(d.GoneClauses) != 2 || len(d.NewClauses) != 3 || len(d.NewCounters) != 1 || len(d.GoneCounters) != 0 {
		t.Fatalf("policy change delta %+v", d)
	}
}

func TestParseCounter(t *testing.T) {
	name := CounterName("default", "db-allow-web", Ingress, 3)
	d, ok := ParseCounter(name)
	if !ok || d != (Drop{Network: "default", Policy: "db-allow-web", Direction: Ingress, Rule: "3"}) {
		t.Fatalf("%s → %+v %v", name, d, ok)
	}
	if _, ok := ParseCounter("netpol_x_y"); ok {
		t.Fatal("a malformed name parsed")
	}
}

// FuzzParse: garbage never panics, and whatever parses also validates and compiles.
func FuzzParse(f *testing.F) {
	f.Add([]byte(dbYAML))
	f.Add([]byte(`{"name":"a","network":"default","egress":[{"action":"deny","peers":[{"cidr":"0.0.0.0/0"}]}]}`))
	f.Add([]byte("name: a\nnetwork: b\nselector: {matchExpressions: [{key: k, operator: NotIn, values: [x]}]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.yaml", data)
		if err != nil {
			if !errors.Is(err, ErrPolicy) {
				t.Fatalf("error not ErrPolicy: %v", err)
			}
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("parsed but invalid: %v", err)
		}
		rs := Compile([]Policy{p}, []Endpoint{web, db, client})
		if len(rs.Skipped) != 0 {
			t.Fatalf("parsed but skipped: %v", rs.Skipped)
		}
		rs.Explain(web.Addr, db.Addr, TCP, 5432)
	})
}

// Two peers naming one endpoint put it once in the rule's set.
func TestOverlappingPeersOneElement(t *testing.T) {
	p := mustParse(t, "a", `
name: a
network: default
selector: {matchLabels: {app: db}}
ingress:
  - action: allow
    peers: [{selector: {matchLabels: {app: web}}}, {network: default}]
`)
	rs := Compile([]Policy{p}, []Endpoint{web, db, client})
	set := rs.Sets[rs.Ingress[0].Peers]
	if len(set.Addrs) != 3 {
		t.Fatalf("peer set %v, want the 3 endpoints once each", set.Addrs)
	}
}

// A policy stored as JSON (the replicated object) reads back the same: same hash, so the
// kernel keeps its rules when the policy is re-read.
func TestPolicyJSONRoundTrip(t *testing.T) {
	p := mustParse(t, "p.yaml", `
name: mixed
network: default
order: 3
types: [ingress, egress]
selector: {matchExpressions: [{key: app, operator: In, values: [db, cache]}]}
ingress:
  - action: deny
    peers: [{cidr: 10.0.0.0/8}, {network: other, selector: {matchLabels: {app: x}}}]
    ports: [{proto: sctp, from: 100, to: 200}, {proto: icmp}]
`)
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var q Policy
	if err := json.Unmarshal(b, &q); err != nil {
		t.Fatal(err)
	}
	if err := q.Validate(); err != nil {
		t.Fatal(err)
	}
	if policyHash(p) != policyHash(q) {
		t.Fatalf("JSON round trip changed the policy:\n%s\n%+v", b, q)
	}
	if r, err := Parse("p.json", b); err != nil || policyHash(r) != policyHash(p) {
		t.Fatalf("its JSON does not parse back: %v", err)
	}
}
