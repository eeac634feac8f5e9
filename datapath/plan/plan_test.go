package plan

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath"
)

func peer(name, addr string, caps ...string) Peer {
	return Peer{Name: name, Up: true, State: "alive", Underlay: netip.MustParseAddr(addr), Capabilities: caps,
		VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, WireGuardKey: [32]byte{1}}
}

func TestChooseLink(t *testing.T) {
	all := []string{"direct", "vxlan", "wireguard"}
	local := Policy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: all}
	enc := local
	enc.Encrypt = true
	trusting := enc
	trusting.Trusted = []netip.Prefix{netip.MustParsePrefix("192.0.2.20/32")}
	remoteEnc := func(p Peer, trusted ...string) Peer {
		p.Encrypt = true
		for _, s := range trusted {
			p.Trusted = append(p.Trusted, netip.MustParsePrefix(s))
		}
		return p
	}
	noKey := peer("b", "192.0.2.20", all...)
	noKey.WireGuardKey = [32]byte{}
	noMAC := peer("b", "198.51.100.7", all...)
	noMAC.VTEPMAC = nil
	cases := []struct {
		name   string
		pol    Policy
		remote Peer
		mode   string
		reason string
	}{
		{"same L2", local, peer("b", "192.0.2.20", all...), "direct", "same L2"},
		{"other L2", local, peer("b", "198.51.100.7", all...), "vxlan", "not on our L2"},
		{"direct off on the remote", local, peer("b", "192.0.2.20", "vxlan", "wireguard"), "vxlan", "direct off"},
		{"we encrypt", enc, peer("b", "192.0.2.20", all...), "wireguard", "we do not trust 192.0.2.20"},
		{"they encrypt", local, remoteEnc(peer("b", "192.0.2.20", all...)), "wireguard", "b does not trust 192.0.2.10"},
		{"mutual trust", trusting, remoteEnc(peer("b", "192.0.2.20", all...), "192.0.2.10/32"), "direct", "both ends trust"},
		{"one-sided trust", trusting, remoteEnc(peer("b", "192.0.2.20", all...)), "wireguard", "b does not trust"},
		{"encryption needed, peer cannot", enc, peer("b", "192.0.2.20", "direct", "vxlan"), "", "cannot run WireGuard"},
		{"no key yet", enc, noKey, "", "no WireGuard key"},
		{"no VXLAN MAC yet", local, noMAC, "", "no VXLAN MAC"},
		{"only wireguard in common", local, peer("b", "198.51.100.7", "wireguard"), "wireguard", "no vxlan on one side"},
		{"nothing in common", Policy{UnderlayPrefix: local.UnderlayPrefix, Modes: []string{"vxlan"}}, peer("b", "198.51.100.7", "direct"), "", "no link mode both peers support"},
	}
	for _, c := range cases {
		got := ChooseLink(c.pol, c.remote)
		if got.Mode != c.mode || !strings.Contains(got.Reason, c.reason) {
			t.Errorf("%s: %+v; want mode %q with a reason mentioning %q", c.name, got, c.mode, c.reason)
		}
	}
}

// Both ends of a pair choose the same mode from the same gossip, whatever the policies.
func TestChooseLinkIsSymmetric(t *testing.T) {
	all := []string{"direct", "vxlan", "wireguard"}
	a := peer("a", "192.0.2.10", all...)
	b := peer("b", "192.0.2.20", all...)
	pol := func(p Peer) Policy {
		return Policy{UnderlayPrefix: netip.PrefixFrom(p.Underlay, 24), Modes: p.Capabilities, Encrypt: p.Encrypt, Trusted: p.Trusted}
	}
	for _, encA := range []bool{false, true} {
		for _, encB := range []bool{false, true} {
			for _, trustB := range []bool{false, true} {
				a.Encrypt, b.Encrypt = encA, encB
				b.Trusted = nil
				if trustB {
					b.Trusted = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
				}
				ab, ba := ChooseLink(pol(a), b), ChooseLink(pol(b), a)
				if ab.Mode != ba.Mode {
					t.Errorf("encrypt a=%v b=%v, b trusts a=%v: a chooses %q, b chooses %q", encA, encB, trustB, ab.Mode, ba.Mode)
				}
			}
		}
	}
}

func TestApplyRelays(t *testing.T) {
	blk := func(s string) []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix(s)} }
	want := Desired{
		"vxlan":     {{Name: "b", Blocks: blk("10.40.0.64/26")}, {Name: "c", Blocks: blk("10.40.0.128/26")}},
		"wireguard": {{Name: "d", Blocks: blk("10.40.0.192/26")}},
	}
	row := func(peer, mode, block string) Connection {
		return Connection{Peer: peer, Network: "default", Mode: mode, State: StateEstablished, Blocks: []string{block}}
	}
	conns := []Connection{row("b", "vxlan", "10.40.0.64/26"), row("c", "vxlan", "10.40.0.128/26"), row("d", "wireguard", "10.40.0.192/26")}
	got, gotConns := ApplyRelays(want, conns, map[string]string{"c": "b", "d": "b", "b": "b", "x": "b", "c2": "nobody"})
	if len(got["vxlan"]) != 2 || got["vxlan"][0].Name != "b" || len(got["vxlan"][0].Blocks) != 2 {
		t.Fatalf("c's block must ride on b's vxlan entry: %+v", got["vxlan"])
	}
	// c keeps its tunnel, without blocks, for the link probes.
	if c := got["vxlan"][1]; c.Name != "c" || len(c.Blocks) != 0 {
		t.Fatalf("c must keep a vxlan entry without blocks: %+v", c)
	}
	// d must be reached encrypted: never over b's plaintext link.
	if len(got["wireguard"]) != 1 || got["wireguard"][0].Name != "d" || len(got["wireguard"][0].Blocks) != 1 {
		t.Fatalf("d was relayed over a plaintext link: %+v", got)
	}
	if gotConns[1].State != StateRelayed || !strings.Contains(gotConns[1].Reason, "via b") || gotConns[1].Mode != "vxlan" || gotConns[2].State == StateRelayed {
		t.Fatalf("connections %+v", gotConns)
	}
	// The input is left as it was.
	if len(want["vxlan"][0].Blocks) != 1 || len(want["vxlan"][1].Blocks) != 1 {
		t.Fatalf("ApplyRelays modified its input: %+v", want)
	}
}

// A relay over WireGuard may carry an encrypted destination.
func TestApplyRelaysEncryptedOverEncrypted(t *testing.T) {
	blk := func(s string) []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix(s)} }
	want := Desired{"wireguard": {{Name: "b", Blocks: blk("10.40.0.64/26")}, {Name: "c", Blocks: blk("10.40.0.128/26")}}}
	conns := []Connection{
		{Peer: "b", Network: "default", Mode: "wireguard", State: StateEstablished, Blocks: []string{"10.40.0.64/26"}},
		{Peer: "c", Network: "default", Mode: "wireguard", State: StateEstablished, Blocks: []string{"10.40.0.128/26"}},
	}
	got, _ := ApplyRelays(want, conns, map[string]string{"c": "b"})
	if b := got["wireguard"][0]; len(b.Blocks) != 2 || got["wireguard"][1].Blocks != nil {
		t.Fatalf("c's block must ride on b's WireGuard entry: %+v", got)
	}
}

func TestLinksKeepRestartingPeers(t *testing.T) {
	now := time.Now()
	b := peer("b", "192.0.2.20", "direct", "vxlan")
	b.Up, b.State, b.Since = false, "dead", now.Add(-2*time.Second)
	c := peer("c", "192.0.2.30", "direct", "vxlan")
	c.Up, c.State, c.Since = false, "dead", now.Add(-time.Minute)
	in := Input{
		Self:   "a",
		Policy: Policy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan"}},
		Peers:  []Peer{{Name: "a", Self: true, Up: true}, b, c},
		Blocks: map[string][]netip.Prefix{"b": {netip.MustParsePrefix("10.40.0.64/26")}, "c": {netip.MustParsePrefix("10.40.0.128/26")}},
		Now:    now, DownGrace: 5 * time.Second, WireGuardPort: 6786,
	}
	want, conns := Links(in)
	if len(want["direct"]) != 1 || want["direct"][0].Name != "b" {
		t.Fatalf("a peer dead for 2s keeps its routes, one dead for a minute does not: %+v", want)
	}
	if len(conns) != 2 || conns[0].State != StateEstablished || !strings.Contains(conns[0].Reason, "routes kept") || conns[1].State != StateDown {
		t.Fatalf("connections %+v", conns)
	}
}

func TestComputeSortsAndRelays(t *testing.T) {
	all := []string{"direct", "vxlan"}
	in := Input{
		Self:   "a",
		Policy: Policy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: all},
		Peers:  []Peer{peer("d", "192.0.2.40", all...), peer("b", "192.0.2.20", all...), peer("c", "198.51.100.3", all...)},
		Blocks: map[string][]netip.Prefix{
			"b": {netip.MustParsePrefix("10.40.0.64/26")},
			"c": {netip.MustParsePrefix("10.40.0.128/26")},
			"d": {netip.MustParsePrefix("10.40.0.192/26")},
		},
		Networks: []Network{{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16")}},
		Relays:   map[string]string{"d": "b"},
		Now:      time.Now(), DownGrace: 5 * time.Second, WireGuardPort: 6786,
	}
	want, conns := Compute(in)
	names := func(l []datapath.RemotePeer) (out []string) {
		for _, rp := range l {
			out = append(out, rp.Name)
		}
		return out
	}
	if !slices.Equal(names(want["direct"]), []string{"b", "d"}) || !slices.Equal(names(want["vxlan"]), []string{"c"}) {
		t.Fatalf("modes %+v", want)
	}
	if len(want["direct"][0].Blocks) != 2 || len(want["direct"][1].Blocks) != 0 || want["vxlan"][0].WireGuardPort != 6786 {
		t.Fatalf("d's block must ride on b: %+v", want)
	}
	if conns[0].Peer != "d" || conns[0].State != StateRelayed {
		t.Fatalf("connections %+v", conns)
	}
}

// The audit's rogue claim: a table entry with /1 blocks of 0.0.0.0/0 (or any block outside
// the defined networks) never becomes a route, is listed in the connection row and counted;
// without known ranges nothing is routed.
func TestPlanDropsBlocksOutsideDefinedRanges(t *testing.T) {
	all := []string{"direct", "vxlan"}
	blk := netip.MustParsePrefix
	in := Input{
		Self:   "a",
		Policy: Policy{UnderlayPrefix: blk("192.0.2.10/24"), Modes: all},
		Peers:  []Peer{peer("b", "192.0.2.20", all...), peer("evil", "192.0.2.66", all...)},
		Blocks: map[string][]netip.Prefix{
			"b":    {blk("10.40.0.64/26"), blk("10.41.0.0/26")},
			"evil": {blk("0.0.0.0/1"), blk("128.0.0.0/1"), blk("10.0.0.0/8"), blk("10.40.0.129/26"), {}},
		},
		Networks: []Network{{Name: "default", Subnet: blk("10.40.0.0/16")}},
		Now:      time.Now(), DownGrace: 5 * time.Second,
	}
	want, conns := Compute(in)
	var routed []netip.Prefix
	for _, rp := range want["direct"] {
		routed = append(routed, rp.Blocks...)
	}
	if fmt.Sprint(routed) != "[10.40.0.64/26]" {
		t.Fatalf("routed %v, want only 10.40.0.64/26", routed)
	}
	if n := OutOfRange(conns); n != 6 {
		t.Fatalf("%d blocks reported out of range, want 6: %+v", n, conns)
	}
	for _, c := range conns {
		if c.Peer == "evil" && (len(c.Blocks) != 0 || !slices.Contains(c.OutOfRange, "0.0.0.0/1")) {
			t.Fatalf("evil's row %+v", c)
		}
	}
	// Relaying through a peer must not smuggle a dropped block in either.
	in.Relays = map[string]string{"evil": "b"}
	want, _ = Compute(in)
	for _, rp := range want["direct"] {
		for _, b := range rp.Blocks {
			if !blk("10.40.0.0/16").Contains(b.Addr()) {
				t.Fatalf("relayed block %s routed via %s", b, rp.Name)
			}
		}
	}
	in.Networks, in.Relays = nil, nil
	want, conns = Compute(in)
	for _, rp := range want["direct"] {
		if len(rp.Blocks) != 0 {
			t.Fatalf("no ranges known, yet %s routes %v", rp.Name, rp.Blocks)
		}
	}
	if n := OutOfRange(conns); n != 7 {
		t.Fatalf("%d blocks reported out of range with no ranges, want 7", n)
	}
}

func TestInRange(t *testing.T) {
	p := netip.MustParsePrefix
	ranges := []netip.Prefix{p("10.40.0.0/16"), p("10.50.0.0/24")}
	kept, dropped := InRange([]netip.Prefix{p("10.40.255.192/26"), p("10.50.0.0/24"), p("10.50.0.0/23"), p("10.40.0.0/15"), p("10.40.0.1/26")}, ranges)
	if fmt.Sprint(kept) != "[10.40.255.192/26 10.50.0.0/24]" || len(dropped) != 3 {
		t.Fatalf("kept %v dropped %v", kept, dropped)
	}
}
