package router

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// The plan's own tests are in datapath/plan; these check the conversion from the mesh.

func meta(name, addr string, caps ...string) mesh.Metadata {
	return mesh.Metadata{Name: name, Underlay: netip.MustParseAddr(addr), Capabilities: caps,
		VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, WireGuardKey: [32]byte{1}}
}

func TestChooseLinkFromMetadata(t *testing.T) {
	pol := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan", "wireguard"}}
	m := meta("b", "192.0.2.20", "direct", "vxlan", "wireguard")
	if got := chooseLink(pol, m); got.Mode != "direct" {
		t.Fatalf("plain: %+v", got)
	}
	m.Encrypt = true
	if got := chooseLink(pol, m); got.Mode != "wireguard" || !strings.Contains(got.Reason, "b does not trust 192.0.2.10") {
		t.Fatalf("the peer's encryption must carry over: %+v", got)
	}
	m.TrustedSubnets = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	if got := chooseLink(pol, m); got.Mode != "direct" {
		t.Fatalf("the peer's trusted subnets must carry over: %+v", got)
	}
}

func TestDesiredStateKeepsRestartingPeers(t *testing.T) {
	pol := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan"}}
	now := time.Now()
	peers := []mesh.Peer{
		{Name: "a", Self: true, State: mesh.StateAlive},
		{Name: "b", State: mesh.StateDead, Since: now.Add(-2 * time.Second), Meta: meta("b", "192.0.2.20", "direct", "vxlan")},
		{Name: "c", State: mesh.StateDead, Since: now.Add(-time.Minute), Meta: meta("c", "192.0.2.30", "direct", "vxlan")},
		{Name: "d", State: mesh.StateSuspect, Since: now.Add(-time.Minute), Meta: meta("d", "192.0.2.40", "direct", "vxlan")},
	}
	blocks := map[string][]netip.Prefix{"b": {netip.MustParsePrefix("10.40.0.64/26")}, "c": {netip.MustParsePrefix("10.40.0.128/26")}}
	nets := []plan.Network{{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16")}}
	want, conns := desiredState("a", pol, peers, blocks, nets, now, 5*time.Second, 6786)
	if len(want["direct"]) != 2 || want["direct"][0].Name != "b" || want["direct"][1].Name != "d" {
		t.Fatalf("a peer dead for 2s and a suspect one keep their routes, one dead for a minute does not: %+v", want)
	}
	if conns[1].State != "down" || !strings.Contains(conns[1].Reason, "dead") {
		t.Fatalf("connections %+v", conns)
	}
	want, conns = applyRelays(want, conns, map[string]string{"d": "b"}, nil)
	if len(want["direct"][0].Blocks) != 1 || conns[2].State != "relayed" {
		t.Fatalf("relays through the adapter: %+v %+v", want, conns)
	}
}

// A block outside the defined ranges (the audit's /1 of 0.0.0.0/0) is not routed.
func TestDesiredStateRoutesOnlyDefinedRanges(t *testing.T) {
	pol := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan"}}
	now := time.Now()
	peers := []mesh.Peer{
		{Name: "a", Self: true, State: mesh.StateAlive},
		{Name: "b", State: mesh.StateAlive, Since: now, Meta: meta("b", "192.0.2.20", "direct", "vxlan")},
	}
	blocks := map[string][]netip.Prefix{"b": {netip.MustParsePrefix("10.40.0.64/26"), netip.MustParsePrefix("0.0.0.0/1")}}
	want, conns := desiredState("a", pol, peers, blocks, []plan.Network{{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16")}}, now, 5*time.Second, 6786)
	if len(want["direct"]) != 1 || len(want["direct"][0].Blocks) != 1 || want["direct"][0].Blocks[0].String() != "10.40.0.64/26" {
		t.Fatalf("routed %+v, want only 10.40.0.64/26", want)
	}
	if len(conns) != 1 || len(conns[0].OutOfRange) != 1 {
		t.Fatalf("connections %+v: the dropped block must be listed", conns)
	}
}

// The cluster's networks reach the plan with their policies: media (always) rides
// WireGuard, control (never) its own VXLAN driver, default the pair's link.
func TestDesiredStatePerNetwork(t *testing.T) {
	pol := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"vxlan", "wireguard"}}
	now := time.Now()
	peers := []mesh.Peer{{Name: "b", State: mesh.StateAlive, Since: now, Meta: meta("b", "192.0.2.20", "vxlan", "wireguard")}}
	p := netip.MustParsePrefix
	blocks := map[string][]netip.Prefix{"b": {p("10.40.0.0/26"), p("10.50.0.0/26"), p("10.60.0.0/26")}}
	nets := planNetworks([]ipam.Network{
		{Name: "default", Subnet: p("10.40.0.0/16")},
		{Name: "media", Subnet: p("10.50.0.0/16"), Encrypt: "always"},
		{Name: "control", Subnet: p("10.60.0.0/16"), Encrypt: "never"},
	})
	want, conns := desiredState("a", pol, peers, blocks, nets, now, 5*time.Second, 6786)
	if len(want["vxlan"]) != 1 || len(want["vxlan/control"]) != 1 || len(want["wireguard"]) != 1 || len(conns) != 3 {
		t.Fatalf("want %v, conns %+v", want, conns)
	}
	if m := probeModes(want); m["b"] != "vxlan" {
		t.Fatalf("b's probes must go through the pair's link (vxlan), got %v", m)
	}
}
