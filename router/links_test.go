package router

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/mesh"
)

func meta(name, addr string, caps ...string) mesh.Metadata {
	return mesh.Metadata{Name: name, Underlay: netip.MustParseAddr(addr), Capabilities: caps,
		VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, WireGuardKey: [32]byte{1}}
}

func TestChooseLink(t *testing.T) {
	all := []string{"direct", "vxlan", "wireguard"}
	local := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: all}
	enc := local
	enc.Encrypt = true
	trusting := enc
	trusting.Trusted = []netip.Prefix{netip.MustParsePrefix("192.0.2.20/32")}
	remoteEnc := func(m mesh.Metadata, trusted ...string) mesh.Metadata {
		m.Encrypt = true
		for _, s := range trusted {
			m.TrustedSubnets = append(m.TrustedSubnets, netip.MustParsePrefix(s))
		}
		return m
	}
	cases := []struct {
		name   string
		pol    linkPolicy
		remote mesh.Metadata
		mode   string
		reason string
	}{
		{"same L2", local, meta("b", "192.0.2.20", all...), "direct", "same L2"},
		{"other L2", local, meta("b", "198.51.100.7", all...), "vxlan", "not on our L2"},
		{"direct off on the remote", local, meta("b", "192.0.2.20", "vxlan", "wireguard"), "vxlan", "direct off"},
		{"we encrypt", enc, meta("b", "192.0.2.20", all...), "wireguard", "we do not trust 192.0.2.20"},
		{"they encrypt", local, remoteEnc(meta("b", "192.0.2.20", all...)), "wireguard", "b does not trust 192.0.2.10"},
		{"mutual trust", trusting, remoteEnc(meta("b", "192.0.2.20", all...), "192.0.2.10/32"), "direct", "both ends trust"},
		{"one-sided trust", trusting, remoteEnc(meta("b", "192.0.2.20", all...)), "wireguard", "b does not trust"},
		{"encryption needed, peer cannot", enc, meta("b", "192.0.2.20", "direct", "vxlan"), "", "cannot run WireGuard"},
		{"no key yet", enc, func() mesh.Metadata { m := meta("b", "192.0.2.20", all...); m.WireGuardKey = [32]byte{}; return m }(), "", "no WireGuard key"},
	}
	for _, c := range cases {
		got := chooseLink(c.pol, c.remote)
		if got.Mode != c.mode || !strings.Contains(got.Reason, c.reason) {
			t.Errorf("%s: %+v; want mode %q with a reason mentioning %q", c.name, got, c.mode, c.reason)
		}
	}
}

func TestApplyRelays(t *testing.T) {
	blk := func(s string) []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix(s)} }
	want := map[string][]datapath.RemotePeer{
		"vxlan":     {{Name: "b", Blocks: blk("10.40.0.64/26")}, {Name: "c", Blocks: blk("10.40.0.128/26")}},
		"wireguard": {{Name: "d", Blocks: blk("10.40.0.192/26")}},
	}
	conns := []Connection{{Peer: "b", Mode: "vxlan"}, {Peer: "c", Mode: "vxlan"}, {Peer: "d", Mode: "wireguard"}}
	got, gotConns := applyRelays(want, conns, map[string]string{"c": "b", "d": "b", "b": "b"})
	if len(got["vxlan"]) != 2 || got["vxlan"][0].Name != "b" || len(got["vxlan"][0].Blocks) != 2 {
		t.Fatalf("c's block must ride on b's vxlan entry: %+v", got["vxlan"])
	}
	// c keeps its tunnel, without blocks, for the link probes.
	if c := got["vxlan"][1]; c.Name != "c" || len(c.Blocks) != 0 {
		t.Fatalf("c must keep a vxlan entry without blocks: %+v", c)
	}
	// d must be reached encrypted: never over b's plaintext link.
	if len(got["wireguard"]) != 1 || got["wireguard"][0].Name != "d" {
		t.Fatalf("d was relayed over a plaintext link: %+v", got)
	}
	if gotConns[1].State != "relayed" || !strings.Contains(gotConns[1].Reason, "via b") || gotConns[2].State == "relayed" {
		t.Fatalf("connections %+v", gotConns)
	}
}

func TestDesiredStateKeepsRestartingPeers(t *testing.T) {
	pol := linkPolicy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan"}}
	now := time.Now()
	peers := []mesh.Peer{
		{Name: "a", Self: true, State: mesh.StateAlive},
		{Name: "b", State: mesh.StateDead, Since: now.Add(-2 * time.Second), Meta: meta("b", "192.0.2.20", "direct", "vxlan")},
		{Name: "c", State: mesh.StateDead, Since: now.Add(-time.Minute), Meta: meta("c", "192.0.2.30", "direct", "vxlan")},
	}
	blocks := map[string][]netip.Prefix{"b": {netip.MustParsePrefix("10.40.0.64/26")}, "c": {netip.MustParsePrefix("10.40.0.128/26")}}
	want, conns := desiredState("a", pol, peers, blocks, now, 5*time.Second, 6786)
	if len(want["direct"]) != 1 || want["direct"][0].Name != "b" {
		t.Fatalf("a peer dead for 2s keeps its routes, one dead for a minute does not: %+v", want)
	}
	if conns[1].State != "down" {
		t.Fatalf("connections %+v", conns)
	}
}
