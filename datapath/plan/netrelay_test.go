package plan

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// blocksOf is a peer's blocks in one driver's list, "absent" when it has no entry there.
func blocksOf(want Desired, key, name string) string {
	for _, rp := range want[key] {
		if rp.Name == name {
			return fmt.Sprint(rp.Blocks)
		}
	}
	return "absent"
}

// Each network with a class of its own takes its relays from NetRelays (an empty map
// relays nothing); the others fall back to Relays.
func TestApplyNetworkRelays(t *testing.T) {
	p := netip.MustParsePrefix
	all := []string{"vxlan", "wireguard"}
	in := Input{
		Self:   "a",
		Policy: Policy{UnderlayPrefix: p("192.0.2.10/24"), Modes: all},
		Peers:  []Peer{peer("b", "198.51.100.7", all...), peer("c", "198.51.100.8", all...), peer("d", "203.0.113.9", all...)},
		Blocks: map[string][]netip.Prefix{
			"b": {p("10.40.0.0/26"), p("10.50.0.0/26"), p("10.60.0.0/26")},
			"c": {p("10.40.0.128/26"), p("10.50.0.128/26"), p("10.60.0.128/26")},
			"d": {p("10.40.0.64/26"), p("10.50.0.64/26"), p("10.60.0.64/26")},
		},
		Networks: threeNetworks(),
		Relays:   map[string]string{"d": "b"},
		// media (gold) relays d through c; control (its own class) finds d's link good.
		NetRelays: map[string]map[string]string{"media": {"d": "c"}, "control": {}},
		Now:       time.Now(), DownGrace: time.Second,
	}
	want, conns := Compute(in)
	for _, c := range []struct{ key, name, blocks string }{
		{"vxlan", "b", "[10.40.0.0/26 10.40.0.64/26]"}, // default: falls back to Relays
		{"vxlan", "d", "[]"},
		{"wireguard", "c", "[10.50.0.128/26 10.50.0.64/26]"}, // media: its own relay
		{"wireguard", "b", "[10.50.0.0/26]"},
		{"wireguard", "d", "[]"},
		{"vxlan/control", "d", "[10.60.0.64/26]"}, // control: no relay of its own
		{"vxlan/control", "b", "[10.60.0.0/26]"},
	} {
		if got := blocksOf(want, c.key, c.name); got != c.blocks {
			t.Errorf("%s %s: %s, want %s", c.key, c.name, got, c.blocks)
		}
	}
	states := map[string]string{}
	for _, c := range conns {
		if c.Peer == "d" {
			states[c.Network] = c.State + " " + c.Reason
		}
	}
	for network, want := range map[string]string{"default": "relayed via b", "media": "relayed via c", "control": "established"} {
		if !strings.HasPrefix(states[network], want) {
			t.Errorf("d on %s: %q, want %q…", network, states[network], want)
		}
	}

	// Without NetRelays it is ApplyRelays exactly.
	in.NetRelays = nil
	want, _ = Compute(in)
	if got := blocksOf(want, "wireguard", "b"); got != "[10.50.0.0/26 10.50.0.64/26]" {
		t.Fatalf("without NetRelays media must follow Relays: %s", got)
	}
	if got := blocksOf(want, "vxlan/control", "b"); got != "[10.60.0.0/26 10.60.0.64/26]" {
		t.Fatalf("without NetRelays control must follow Relays: %s", got)
	}
}

// Both ends of a pair compute the same class for a network and, from the same link
// state, mirror relays: a relays d's media through b and d relays a's media through b,
// over WireGuard at every hop, while the other networks stay direct at both ends.
func TestNetworkRelaysMirrorOverWireGuard(t *testing.T) {
	p := netip.MustParsePrefix
	all := []string{"vxlan", "wireguard"}
	blocks := map[string][]netip.Prefix{
		"a": {p("10.40.0.0/26"), p("10.50.0.0/26"), p("10.60.0.0/26")},
		"b": {p("10.40.1.0/26"), p("10.50.1.0/26"), p("10.60.1.0/26")},
		"d": {p("10.40.2.0/26"), p("10.50.2.0/26"), p("10.60.2.0/26")},
	}
	peers := map[string]Peer{"a": peer("a", "192.0.2.10", all...), "b": peer("b", "198.51.100.7", all...), "d": peer("d", "203.0.113.9", all...)}
	end := func(self, other string) (Desired, []Connection) {
		in := Input{
			Self:   self,
			Policy: Policy{UnderlayPrefix: netip.PrefixFrom(peers[self].Underlay, 24), Modes: all},
			Peers:  []Peer{peers["a"], peers["b"], peers["d"]}, Blocks: blocks, Networks: threeNetworks(),
			NetRelays: map[string]map[string]string{"media": {other: "b"}},
			Now:       time.Now(), DownGrace: time.Second, WireGuardPort: 51820,
		}
		return Compute(in)
	}
	wantA, connsA := end("a", "d")
	wantD, connsD := end("d", "a")
	if got := blocksOf(wantA, "wireguard", "b"); got != "[10.50.1.0/26 10.50.2.0/26]" {
		t.Fatalf("a: media to d must ride on b over WireGuard: %s", got)
	}
	if got := blocksOf(wantD, "wireguard", "b"); got != "[10.50.1.0/26 10.50.0.0/26]" {
		t.Fatalf("d: media to a must ride on b over WireGuard: %s", got)
	}
	rows := func(conns []Connection, other string) map[string]Connection {
		out := map[string]Connection{}
		for _, c := range conns {
			if c.Peer == other {
				out[c.Network] = c
			}
		}
		return out
	}
	ra, rd := rows(connsA, "d"), rows(connsD, "a")
	for _, n := range []string{"default", "media", "control"} {
		x, y := ra[n], rd[n]
		if x.State != y.State || x.Mode != y.Mode || x.Reason != y.Reason {
			t.Errorf("%s: a→d %s/%s %q, d→a %s/%s %q: not mirrored", n, x.State, x.Mode, x.Reason, y.State, y.Mode, y.Reason)
		}
	}
	if ra["media"].State != StateRelayed || ra["media"].Mode != "wireguard" || ra["default"].State != StateEstablished {
		t.Fatalf("a→d rows %+v", ra)
	}
}
