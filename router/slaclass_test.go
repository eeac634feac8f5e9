package router

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/pathsel"
)

const (
	goldSLA   = "gold: rtt<=6ms,jitter<=2ms"
	silverSLA = "silver: rtt<=50ms"
)

func testPaths(t *testing.T, own string) *paths {
	t.Helper()
	sla := pathsel.DefaultSLA()
	if own != "" {
		var err error
		if sla, err = pathsel.ParseSLA(own); err != nil {
			t.Fatal(err)
		}
	}
	pt, err := newPaths("a", sla, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return pt
}

func nets(specs ...string) []ipam.Network {
	var out []ipam.Network
	for _, s := range specs {
		name, sla, _ := strings.Cut(s, "=")
		out = append(out, ipam.Network{Name: name, SLA: sla})
	}
	return out
}

// Selectors come with the networks that use their class, seeded with the links known, and
// go (with their metrics) when no network uses it; a refusal is counted once.
func TestSelectorsFollowNetworks(t *testing.T) {
	pt := testPaths(t, "")
	log := slog.New(slog.DiscardHandler)
	l := pathsel.Link{RTT: time.Millisecond, Up: true}
	pt.feed(log, []mesh.LinkChange{{From: "b", To: "d", Link: mesh.LinkMetrics{RTT: l.RTT, Up: true}}})
	pt.feedOwn(log, map[string]mesh.LinkMetrics{"b": {RTT: l.RTT, Up: true}})
	pt.setDestinations(map[string]pathsel.Dest{"b": {}, "d": {}})

	if pt.syncClasses(log, nets("default")) || len(pt.classes) != 0 || pt.netRelays() != nil {
		t.Fatal("no network has a class: def alone, nothing changes")
	}
	if !pt.syncClasses(log, nets("default", "media="+goldSLA, "bad=nonsense")) {
		t.Fatal("a class came: syncClasses must say so")
	}
	gold := pt.classes["gold"]
	if gold == nil || len(pt.classes) != 1 || pt.netClass["media"] != "gold" {
		t.Fatalf("classes %v, per network %v", pt.classes, pt.netClass)
	}
	if got, ok := gold.sel.Link("a", "b"); !ok || got != l {
		t.Fatalf("gold's selector was not seeded with a→b: %v %v", got, ok)
	}
	if _, ok := gold.sel.Link("b", "d"); !ok {
		t.Fatal("gold's selector was not seeded with b→d")
	}
	// Later links reach every selector.
	pt.feed(log, []mesh.LinkChange{{From: "d", To: "c", Link: mesh.LinkMetrics{RTT: l.RTT, Up: true}}})
	if _, ok := gold.sel.Link("c", "d"); !ok {
		t.Fatal("a link fed after the class came did not reach it")
	}
	pt.selectAll(time.Now())
	if got := testutil.ToFloat64(pt.slaOK.WithLabelValues("b", "gold")); got != 1 {
		t.Fatalf("weft_path_sla_ok{peer=b,sla=gold} = %v", got)
	}
	if got := testutil.ToFloat64(pt.slaOK.WithLabelValues("b", "default")); got != 1 {
		t.Fatalf("weft_path_sla_ok{peer=b,sla=default} = %v", got)
	}
	if nr := pt.netRelays(); nr == nil || nr["media"] == nil || len(nr["media"]) != 0 {
		t.Fatalf("media has its own (empty) relays: %v", nr)
	}
	if got := testutil.ToFloat64(pt.refusedClasses); got != 1 {
		t.Fatalf("refusals counted %v, want 1", got)
	}
	pt.syncClasses(log, nets("default", "media="+goldSLA, "bad=nonsense", "other"))
	if got := testutil.ToFloat64(pt.refusedClasses); got != 1 {
		t.Fatalf("the same refusal was counted again: %v", got)
	}

	if !pt.syncClasses(log, nets("default", "bad=nonsense")) || len(pt.classes) != 0 || pt.netRelays() != nil {
		t.Fatalf("media gone: gold must go: %v", pt.classes)
	}
	if n := testutil.CollectAndCount(pt.slaOK); n != 2 { // b and d, default only
		t.Fatalf("%d weft_path_sla_ok series left, want 2 (gold's removed)", n)
	}
	if _, moved := pt.selectAll(time.Now()); !moved {
		t.Fatal("a class went: the relays must be applied again")
	}
}

// Two networks with different classes take different relays to the same destination when
// the direct link meets one class and not the other.
func TestClassesRelayPerNetwork(t *testing.T) {
	pt := testPaths(t, "")
	log := slog.New(slog.DiscardHandler)
	pt.syncClasses(log, nets("default", "media="+goldSLA))
	// a→d: 4 ms, jitter 3 ms (cheapest, but breaks gold's jitter<=2ms);
	// a→b→d: 5 ms, jitter 1 ms (meets gold).
	lm := func(rtt, jitter time.Duration) mesh.LinkMetrics {
		return mesh.LinkMetrics{RTT: rtt, Jitter: jitter, Up: true}
	}
	pt.feedOwn(log, map[string]mesh.LinkMetrics{"d": lm(4*time.Millisecond, 3*time.Millisecond), "b": lm(2*time.Millisecond, 500*time.Microsecond)})
	pt.feed(log, []mesh.LinkChange{{From: "b", To: "d", Link: lm(3*time.Millisecond, 500*time.Microsecond)}})
	pt.setDestinations(map[string]pathsel.Dest{"b": {}, "d": {}})
	now := time.Now()
	deadline := now.Add(time.Minute) // simulated time: holds are a few seconds
	var def map[string]string
	for ; now.Before(deadline); now = now.Add(time.Second) {
		def, _ = pt.selectAll(now)
		if pt.netRelays()["media"]["d"] == "b" {
			break
		}
	}
	nr := pt.netRelays()
	if nr["media"]["d"] != "b" {
		t.Fatalf("media (gold) must relay d through b: %v", nr)
	}
	if _, relayed := def["d"]; relayed {
		t.Fatalf("default (no bounds) must stay direct to d: %v", def)
	}
	if got := testutil.ToFloat64(pt.slaOK.WithLabelValues("d", "gold")); got != 1 {
		t.Fatalf("gold holds over the relay: weft_path_sla_ok = %v", got)
	}

	// The plan takes each network's own relay.
	p := netip.MustParsePrefix
	pr := func(name, addr string) plan.Peer {
		return plan.Peer{Name: name, Up: true, Underlay: netip.MustParseAddr(addr), Capabilities: []string{"vxlan"}, VTEPMAC: []byte{2, 0, 0, 0, 0, 1}}
	}
	_, conns := plan.Compute(plan.Input{
		Self: "a", Policy: plan.Policy{UnderlayPrefix: p("192.0.2.1/24"), Modes: []string{"vxlan"}},
		Peers:    []plan.Peer{pr("b", "198.51.100.2"), pr("d", "203.0.113.4")},
		Blocks:   map[string][]netip.Prefix{"b": {p("10.40.1.0/26"), p("10.50.1.0/26")}, "d": {p("10.40.2.0/26"), p("10.50.2.0/26")}},
		Networks: []plan.Network{{Name: "default", Subnet: p("10.40.0.0/16")}, {Name: "media", Subnet: p("10.50.0.0/16")}},
		Relays:   def, NetRelays: nr, Now: now, DownGrace: time.Second,
	})
	for _, c := range conns {
		if c.Peer != "d" {
			continue
		}
		if want := map[string]string{"default": plan.StateEstablished, "media": plan.StateRelayed}[c.Network]; c.State != want {
			t.Errorf("d on %s: %s, want %s", c.Network, c.State, want)
		}
	}
}

// Link-state changes arrive on their own goroutine while classes come and go: a class made
// meanwhile must end up with every link def has (none missed between seeding and feeding).
func TestClassSeedingMissesNoLink(t *testing.T) {
	pt := testPaths(t, "")
	log := slog.New(slog.DiscardHandler)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 300 {
			from := string(rune('b' + i%20))
			pt.feed(log, []mesh.LinkChange{{From: from, To: "z", Link: mesh.LinkMetrics{RTT: time.Duration(i+1) * time.Microsecond, Up: true}}})
		}
	}()
	for i := 0; ; i++ {
		spec := "media=" + goldSLA
		if i%2 == 1 {
			spec = "media=" + silverSLA
		}
		pt.syncClasses(log, nets("default", spec))
		select {
		case <-done:
		default:
			continue
		}
		break
	}
	want := pt.def.sel.Links()
	for name, cl := range pt.classes {
		if got := cl.sel.Links(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("class %s holds %v, def %v", name, got, want)
		}
	}
}

// A move between measured paths is counted by why; a first choice and a path kept are not.
func TestPathSwitchesCounted(t *testing.T) {
	pt := testPaths(t, "")
	log := slog.New(slog.DiscardHandler)
	up := func(ms float64) mesh.LinkMetrics {
		return mesh.LinkMetrics{RTT: time.Duration(ms * float64(time.Millisecond)), Up: true}
	}
	pt.feed(log, []mesh.LinkChange{{From: "r", To: "b", Link: up(1)}})
	pt.feedOwn(log, map[string]mesh.LinkMetrics{"b": up(1), "r": up(1)})
	pt.setDestinations(map[string]pathsel.Dest{"b": {}, "r": {}})
	t0 := time.Unix(100, 0)
	pt.selectAll(t0)
	pt.selectAll(t0.Add(time.Second))
	if n := testutil.CollectAndCount(pt.switches); n != 0 {
		t.Fatalf("%d switch series after a first choice, want none", n)
	}
	pt.feedOwn(log, map[string]mesh.LinkMetrics{"b": {RTT: time.Millisecond}, "r": up(1)}) // a→b down
	if relays, changed := pt.selectAll(t0.Add(2 * time.Second)); !changed || relays["b"] != "r" {
		t.Fatalf("relays %v (changed %v), want b via r", relays, changed)
	}
	if got := testutil.ToFloat64(pt.switches.WithLabelValues(pathsel.SwitchBroken)); got != 1 {
		t.Fatalf("weft_path_switches_total{reason=broken} = %v, want 1", got)
	}
}
