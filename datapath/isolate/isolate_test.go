package isolate

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
)

var (
	defNet   = Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), Bridge: "weft"}
	mediaNet = Network{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), Isolated: true, Bridge: "wmedia"}
	ctrlNet  = Network{Name: "control", Subnet: netip.MustParsePrefix("10.60.0.0/16"), Isolated: true, Bridge: "wcontrol"}
	openNet  = Network{Name: "open", Subnet: netip.MustParsePrefix("10.70.0.0/16"), Bridge: "wopen"}
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestNewPlanRules(t *testing.T) {
	p, err := NewPlan([]Network{openNet, mediaNet, defNet, ctrlNet})
	if err != nil {
		t.Fatal(err)
	}
	// 1 rule per network, 2 more per isolated one.
	if len(p.Rules) != 8 {
		t.Fatalf("%d rules, want 8: %+v", len(p.Rules), p.Rules)
	}
	keys := p.ChainKeys()
	want := map[string][]string{
		SpoofChain: {"weft-isolate spoofed control 10.60.0.0/16 on wcontrol any", "weft-isolate spoofed default 10.40.0.0/16 on weft",
			"weft-isolate spoofed media 10.50.0.0/16 on wmedia any", "weft-isolate spoofed open 10.70.0.0/16 on wopen"},
		EgressChain:  {"weft-isolate egress control 10.60.0.0/16", "weft-isolate egress media 10.50.0.0/16"},
		IngressChain: {"weft-isolate ingress control 10.60.0.0/16", "weft-isolate ingress media 10.50.0.0/16"},
		ForwardChain: {"weft-isolate jump isolate_spoof", "weft-isolate jump isolate_egress", "weft-isolate jump isolate_ingress"},
	}
	want[InputChain] = want[ForwardChain]
	if len(keys) != len(want) {
		t.Fatalf("chains %q", keys)
	}
	for ch, w := range want {
		if !slices.Equal(keys[ch], w) {
			t.Errorf("chain %s: keys %q, want %q", ch, keys[ch], w)
		}
	}
	wantCounters := []string{"isolate_control_egress", "isolate_control_ingress", "isolate_control_spoofed", "isolate_default_spoofed",
		"isolate_media_egress", "isolate_media_ingress", "isolate_media_spoofed", "isolate_open_spoofed"}
	if !slices.Equal(p.Counters(), wantCounters) {
		t.Fatalf("counters %q, want %q", p.Counters(), wantCounters)
	}
	// Every range is in the set; none adjacent here.
	if len(p.Ranges) != 4 || p.Ranges[0] != (Interval{addr("10.40.0.0"), addr("10.40.255.255")}) {
		t.Fatalf("ranges %v", p.Ranges)
	}
}

// The decision table: isolated networks are cut from everything weft routes, both ways;
// open networks reach each other; nothing outside the ranges is touched; a forged source
// is dropped on the bridge it came in on.
func TestPlanDrops(t *testing.T) {
	p, err := NewPlan([]Network{defNet, mediaNet, ctrlNet, openNet})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		iif, src, dst string
		counter       string // "" passes
	}{
		{"wmedia", "10.50.1.2", "10.60.1.2", "isolate_media_egress"},     // isolated → isolated: egress of the source
		{"wcontrol", "10.60.1.2", "10.50.1.2", "isolate_control_egress"}, // and back
		{"weft", "10.40.1.2", "10.50.1.2", "isolate_media_ingress"},      // default → isolated
		{"wmedia", "10.50.1.2", "10.40.1.2", "isolate_media_egress"},     // isolated → default
		{"wopen", "10.70.1.2", "10.60.0.1", "isolate_control_ingress"},   // open → an isolated gateway
		{"vxlan", "10.70.1.2", "10.60.1.2", "isolate_control_ingress"},   // from another host
		{"wmedia", "10.50.1.2", "10.50.2.9", ""},                         // within a network
		{"vxlan", "10.50.1.2", "10.50.2.9", ""},                          // within a network, across hosts
		{"weft", "10.40.1.2", "10.70.1.2", ""},                           // default ↔ open
		{"wopen", "10.70.1.2", "10.40.1.2", ""},
		{"wmedia", "10.50.1.2", "192.0.2.1", ""},                         // out of weft: the internet
		{"eth0", "192.0.2.1", "10.50.1.2", ""},                           // and replies from it
		{"weft", "10.60.1.9", "10.60.1.2", "isolate_default_spoofed"},    // default forging a control source
		{"weft", "192.0.2.7", "10.70.1.2", ""},                           // an open network routing another subnet
		{"wmedia", "10.40.1.9", "10.40.1.2", "isolate_media_spoofed"},    // media forging a default source
		{"wmedia", "192.0.2.7", "198.51.100.1", "isolate_media_spoofed"}, // isolated: its own sources only
	} {
		got, drop := p.Drops(c.iif, addr(c.src), addr(c.dst))
		if drop != (c.counter != "") || got != c.counter {
			t.Errorf("%s %s → %s: drop %v by %q, want %q", c.iif, c.src, c.dst, drop, got, c.counter)
		}
	}
}

func TestNewPlanNothingIsolated(t *testing.T) {
	for _, nets := range [][]Network{nil, {defNet}, {defNet, openNet}} {
		p, err := NewPlan(nets)
		if err != nil || !p.Empty() || len(p.Ranges) != 0 {
			t.Errorf("%v: plan %+v, err %v; want the empty plan", nets, p, err)
		}
	}
}

func TestNewPlanMergesAdjacentRanges(t *testing.T) {
	a := Network{Name: "a", Subnet: netip.MustParsePrefix("10.50.0.0/16"), Isolated: true}
	b := Network{Name: "b", Subnet: netip.MustParsePrefix("10.51.0.0/16")}
	c := Network{Name: "c", Subnet: netip.MustParsePrefix("10.53.0.0/24")}
	p, err := NewPlan([]Network{c, b, a})
	if err != nil {
		t.Fatal(err)
	}
	want := []Interval{{addr("10.50.0.0"), addr("10.51.255.255")}, {addr("10.53.0.0"), addr("10.53.0.255")}}
	if !slices.Equal(p.Ranges, want) {
		t.Fatalf("ranges %v, want %v", p.Ranges, want)
	}
}

func TestNewPlanRefusesBadInput(t *testing.T) {
	for name, nets := range map[string][]Network{
		"bad name":     {{Name: "Media!", Subnet: mediaNet.Subnet}},
		"empty name":   {{Subnet: mediaNet.Subnet}},
		"long name":    {{Name: "a-network-name-longer-than-32-chars", Subnet: mediaNet.Subnet}},
		"no subnet":    {{Name: "x"}},
		"ipv6":         {{Name: "x", Subnet: netip.MustParsePrefix("fd00::/64")}},
		"host bits":    {{Name: "x", Subnet: netip.MustParsePrefix("10.50.0.1/16")}},
		"everything":   {{Name: "x", Subnet: netip.MustParsePrefix("0.0.0.0/0"), Isolated: true}},
		"end of space": {{Name: "x", Subnet: netip.MustParsePrefix("255.255.255.0/24")}},
		"duplicate":    {mediaNet, {Name: "media", Subnet: ctrlNet.Subnet}},
		"overlap":      {mediaNet, {Name: "x", Subnet: netip.MustParsePrefix("10.50.128.0/24")}},
		"nested":       {{Name: "wide", Subnet: netip.MustParsePrefix("10.0.0.0/8")}, mediaNet},
		"too many":     make([]Network, MaxNetworks+1),
	} {
		if p, err := NewPlan(nets); !errors.Is(err, ErrConfig) || !p.Empty() {
			t.Errorf("%s: plan %+v, err %v; want ErrConfig", name, p, err)
		}
	}
}

// A key names what the rule matches: a network re-created with another range or bridge is
// another rule.
func TestRuleKey(t *testing.T) {
	r := Rule{Network: "media", Subnet: mediaNet.Subnet, Direction: Ingress}
	if r.Key() != "weft-isolate ingress media 10.50.0.0/16" || r.Counter() != "isolate_media_ingress" || r.Chain() != IngressChain {
		t.Fatalf("key %q counter %q chain %q", r.Key(), r.Counter(), r.Chain())
	}
}
