package netpol

import (
	"fmt"
	"net/netip"
	"testing"
)

// scale builds the #15 scale case: 1000 labelled endpoints in one network (50 apps, 4
// tiers) and 200 policies, each selecting one app, with two ingress rules (allow from the
// next app on a port, deny from a tier) and one egress rule (allow to a CIDR and an app).
func scale() ([]Policy, []Endpoint) {
	var eps []Endpoint
	for i := range 1000 {
		eps = append(eps, Endpoint{
			Key: fmt.Sprintf("c%d", i), Network: "default",
			Addr:   netip.AddrFrom4([4]byte{10, 32, byte(i / 250), byte(1 + i%250)}),
			Labels: map[string]string{"app": fmt.Sprintf("app%d", i%50), "tier": fmt.Sprintf("t%d", i%4), "id": fmt.Sprint(i)},
		})
	}
	var ps []Policy
	for i := range 200 {
		app := func(k int) *Selector {
			return &Selector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", k%50)}}
		}
		ps = append(ps, Policy{
			Name: fmt.Sprintf("p%d", i), Network: "default", Order: i % 7,
			Selector: *app(i),
			Ingress: []Rule{
				{Action: Deny, Peers: []Peer{{Selector: &Selector{MatchLabels: map[string]string{"tier": fmt.Sprintf("t%d", i%4)}}}}},
				{Action: Allow, Peers: []Peer{{Selector: app(i + 1)}}, Ports: []PortRange{{Proto: TCP, From: uint16(5000 + i)}}},
			},
			Egress: []Rule{
				{Action: Allow, Peers: []Peer{{CIDR: netip.MustParsePrefix("192.168.0.0/16")}, {Selector: app(i + 2)}}},
			},
		})
	}
	return ps, eps
}

// TestScaleRuleCount holds the rule budget of #15: about 1000 nft rules for 1000
// endpoints and 200 policies, whatever the number of endpoints.
func TestScaleRuleCount(t *testing.T) {
	ps, eps := scale()
	rs := Compile(ps, eps)
	if len(rs.Skipped) != 0 {
		t.Fatalf("skipped %v", rs.Skipped[:1])
	}
	n := len(rs.Egress) + len(rs.Ingress)
	t.Logf("%d clauses, %d sets, %d elements, %d counters", n, len(rs.Sets), rs.Elements(), len(rs.Counters))
	if n > 1000 {
		t.Fatalf("%d clauses, want at most 1000", n)
	}
	if m := len(Compile(ps, eps[:10]).Ingress) + len(Compile(ps, eps[:10]).Egress); m != n {
		t.Fatalf("clauses depend on endpoints: %d with 10, %d with 1000", m, n)
	}
}

func BenchmarkCompile(b *testing.B) {
	ps, eps := scale()
	b.ReportAllocs()
	for b.Loop() {
		Compile(ps, eps)
	}
}

// BenchmarkLabelChange is one label change: recompile everything and diff against the
// previous Ruleset (what the applier then sends is the delta).
func BenchmarkLabelChange(b *testing.B) {
	ps, eps := scale()
	old := Compile(ps, eps)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		e := eps[i%len(eps)]
		e.Labels = map[string]string{"app": fmt.Sprintf("app%d", (i+7)%50), "tier": "t9"}
		changed := append(append([]Endpoint{}, eps[:i%len(eps)]...), e)
		changed = append(changed, eps[i%len(eps)+1:]...)
		d := Diff(old, Compile(ps, changed))
		if d.Elements() == 0 {
			b.Fatal("a label change changed no element")
		}
		i++
	}
}
