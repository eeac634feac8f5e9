package plan

import (
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/vxlan"
)

func TestChooseNetworkLink(t *testing.T) {
	all := []string{"direct", "vxlan", "wireguard"}
	plain := []string{"direct", "vxlan"}
	local := Policy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: all}
	enc := local
	enc.Encrypt = true
	trusting := enc
	trusting.Trusted = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	noDirect := Policy{UnderlayPrefix: local.UnderlayPrefix, Modes: []string{"vxlan", "wireguard"}}
	noKey := peer("b", "192.0.2.20", all...)
	noKey.WireGuardKey = [32]byte{}
	trusted := peer("b", "192.0.2.20", all...)
	trusted.Encrypt, trusted.Trusted = true, []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	cases := []struct {
		name    string
		pol     Policy
		remote  Peer
		encrypt string
		mode    string
		reason  string
	}{
		{"auto follows the pair (plaintext)", local, peer("b", "192.0.2.20", all...), "auto", "direct", "same L2"},
		{"empty follows the pair (encrypted)", enc, peer("b", "192.0.2.20", all...), "", "wireguard", "we do not trust"},
		{"always over trusted hosts", trusting, trusted, "always", "wireguard", "media is --encrypt always"},
		{"always where the hosts do not encrypt", local, peer("b", "198.51.100.7", all...), "always", "wireguard", "--encrypt always"},
		{"always, peer cannot", local, peer("b", "192.0.2.20", plain...), "always", "", "network media is --encrypt always but one side cannot run WireGuard"},
		{"always, we cannot", Policy{UnderlayPrefix: local.UnderlayPrefix, Modes: plain}, peer("b", "192.0.2.20", all...), "always", "", "cannot run WireGuard"},
		{"always, no key yet", local, noKey, "always", "", "no WireGuard key"},
		{"never where we encrypt", enc, peer("b", "192.0.2.20", all...), "never", "direct", "media is --encrypt never"},
		{"never where they encrypt, other L2", local, func() Peer { p := peer("b", "198.51.100.7", all...); p.Encrypt = true; return p }(), "never", "vxlan", "--encrypt never"},
		{"never without direct", noDirect, peer("b", "192.0.2.20", all...), "never", "vxlan", "direct off"},
		{"never over trusted hosts", trusting, trusted, "never", "direct", "same L2"},
		{"never, only wireguard in common", local, peer("b", "198.51.100.7", "wireguard"), "never", "", "network media is --encrypt never but no plaintext mode"},
		{"unknown policy", local, peer("b", "192.0.2.20", all...), "sometimes", "", `unknown encryption policy "sometimes"`},
	}
	for _, c := range cases {
		pair := ChooseLink(c.pol, c.remote)
		got := ChooseNetworkLink(c.pol, c.remote, Network{Name: "media", Encrypt: c.encrypt}, pair)
		if got.Mode != c.mode || !strings.Contains(got.Reason, c.reason) {
			t.Errorf("%s: %+v; want mode %q with a reason mentioning %q", c.name, got, c.mode, c.reason)
		}
	}
}

// Both ends of a pair choose the same mode for every network, whatever the hosts' policies,
// trust, capabilities and the network's own policy.
func TestChooseNetworkLinkIsSymmetric(t *testing.T) {
	capsets := [][]string{{"direct", "vxlan", "wireguard"}, {"vxlan", "wireguard"}, {"direct", "vxlan"}, {"wireguard"}}
	pol := func(p Peer) Policy {
		return Policy{UnderlayPrefix: netip.PrefixFrom(p.Underlay, 24), Modes: p.Capabilities, Encrypt: p.Encrypt, Trusted: p.Trusted}
	}
	checked := 0
	for _, bAddr := range []string{"192.0.2.20", "198.51.100.7"} {
		for _, capsA := range capsets {
			for _, capsB := range capsets {
				for _, encA := range []bool{false, true} {
					for _, encB := range []bool{false, true} {
						for _, trustA := range []bool{false, true} {
							for _, trustB := range []bool{false, true} {
								a, b := peer("a", "192.0.2.10", capsA...), peer("b", bAddr, capsB...)
								a.Encrypt, b.Encrypt = encA, encB
								if trustA {
									a.Trusted = []netip.Prefix{netip.MustParsePrefix(bAddr + "/32")}
								}
								if trustB {
									b.Trusted = []netip.Prefix{netip.MustParsePrefix("192.0.2.10/32")}
								}
								for _, e := range []string{"", "auto", "always", "never", "bogus"} {
									n := Network{Name: "n", Encrypt: e}
									ab := ChooseNetworkLink(pol(a), b, n, ChooseLink(pol(a), b))
									ba := ChooseNetworkLink(pol(b), a, n, ChooseLink(pol(b), a))
									checked++
									if ab.Mode != ba.Mode {
										t.Errorf("b at %s caps a=%v b=%v encrypt a=%v b=%v trust a=%v b=%v network %q: a chooses %q (%s), b chooses %q (%s)",
											bAddr, capsA, capsB, encA, encB, trustA, trustB, e, ab.Mode, ab.Reason, ba.Mode, ba.Reason)
									}
									if e == "always" && ab.Mode != "" && ab.Mode != "wireguard" {
										t.Errorf("an always network got %q", ab.Mode)
									}
									if e == "never" && ab.Mode == "wireguard" {
										t.Errorf("a never network got wireguard")
									}
								}
							}
						}
					}
				}
			}
		}
	}
	if checked < 1000 {
		t.Fatalf("only %d combinations checked", checked)
	}
}

// Two hosts on different L2 segments, trusting each other: default and control ride VXLAN
// (each on its own device), media WireGuard. Each driver gets exactly the blocks of the
// networks that use it, and the peer's probes go through one driver only.
func threeNetworks() []Network {
	p := netip.MustParsePrefix
	return []Network{
		{Name: "media", Subnet: p("10.50.0.0/16"), Encrypt: "always"},
		{Name: "default", Subnet: p("10.40.0.0/16")},
		{Name: "control", Subnet: p("10.60.0.0/16"), Encrypt: "never"},
	}
}

func TestLinksPerNetwork(t *testing.T) {
	p := netip.MustParsePrefix
	all := []string{"direct", "vxlan", "wireguard"}
	b := peer("b", "198.51.100.7", all...)
	in := Input{
		Self:     "a",
		Policy:   Policy{UnderlayPrefix: p("192.0.2.10/24"), Modes: all},
		Peers:    []Peer{b},
		Blocks:   map[string][]netip.Prefix{"b": {p("10.40.0.64/26"), p("10.50.0.0/26"), p("10.60.0.0/26"), p("10.60.0.64/26"), p("10.99.0.0/26")}},
		Networks: threeNetworks(), Now: time.Now(), DownGrace: time.Second, WireGuardPort: 6786,
	}
	want, conns := Compute(in)
	vnis := VNIs([]string{"default", "media", "control"})
	if len(want) != 3 {
		t.Fatalf("want three drivers, got %v", keys(want))
	}
	check := func(key string, blocks string, noProbe bool) datapath.RemotePeer {
		t.Helper()
		l := want[key]
		if len(l) != 1 || l[0].Name != "b" || fmt.Sprint(l[0].Blocks) != blocks || l[0].NoProbe != noProbe {
			t.Fatalf("%s: %+v; want b with %s, NoProbe %v", key, l, blocks, noProbe)
		}
		return l[0]
	}
	def := check("vxlan", "[10.40.0.64/26]", false) // the pair's link carries the probes
	if def.VTEPMAC.String() != b.VTEPMAC.String() {
		t.Fatalf("default keeps the gossiped MAC: %s", def.VTEPMAC)
	}
	ctl := check("vxlan/control", "[10.60.0.0/26 10.60.0.64/26]", true)
	if ctl.VTEPMAC.String() != vxlan.DeriveMAC(b.Underlay, vnis["control"]).String() {
		t.Fatalf("control's MAC %s is not derived from its VNI", ctl.VTEPMAC)
	}
	check("wireguard", "[10.50.0.0/26]", true)
	var got []string
	for _, c := range conns {
		got = append(got, c.Network+"="+c.Mode+"/"+c.State+fmt.Sprint(c.Blocks))
	}
	if strings.Join(got, " ") != "control=vxlan/established[10.60.0.0/26 10.60.0.64/26] default=vxlan/established[10.40.0.64/26] media=wireguard/established[10.50.0.0/26]" {
		t.Fatalf("rows %v", got)
	}
	if n := OutOfRange(conns); n != 1 || !slices.Equal(conns[0].OutOfRange, []string{"10.99.0.0/26"}) {
		t.Fatalf("the block outside every network must be reported once: %+v", conns)
	}

	// The hosts encrypt: default follows them (WireGuard), control stays plaintext, and
	// the one WireGuard entry carries both encrypted networks' blocks and the probes.
	in.Policy.Encrypt = true
	want, _ = Compute(in)
	if len(want) != 2 {
		t.Fatalf("want wireguard and vxlan/control, got %v", keys(want))
	}
	check("wireguard", "[10.40.0.64/26 10.50.0.0/26]", false)
	check("vxlan/control", "[10.60.0.0/26 10.60.0.64/26]", true)

	// b cannot run WireGuard: media is not routed (the row names it), the rest is.
	in.Policy.Encrypt = false
	in.Peers = []Peer{peer("b", "198.51.100.7", "direct", "vxlan")}
	want, conns = Compute(in)
	if _, ok := want["wireguard"]; ok || len(want) != 2 {
		t.Fatalf("media must not be routed: %v", keys(want))
	}
	for _, c := range conns {
		if c.Network == "media" && (c.State != StateNone || !strings.Contains(c.Reason, "network media is --encrypt always")) {
			t.Fatalf("media's row %+v", c)
		}
	}

	// The pair's link has no mode (b must be encrypted and cannot): control still runs,
	// and its driver carries the probes.
	in.Policy.Encrypt = true
	want, _ = Compute(in)
	if len(want) != 1 {
		t.Fatalf("only control may be routed: %v", keys(want))
	}
	check("vxlan/control", "[10.60.0.0/26 10.60.0.64/26]", false)
}

func keys(d Desired) []string {
	var out []string
	for k := range d {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// Relays move each network's blocks to the relay's entry for that network; a network
// the relay cannot carry (none, or plaintext for an encrypted destination) stays direct.
func TestApplyRelaysPerNetwork(t *testing.T) {
	p := netip.MustParsePrefix
	all := []string{"vxlan", "wireguard"}
	in := Input{
		Self:   "a",
		Policy: Policy{UnderlayPrefix: p("192.0.2.10/24"), Modes: all},
		Peers:  []Peer{peer("b", "198.51.100.7", all...), peer("d", "203.0.113.9", all...)},
		Blocks: map[string][]netip.Prefix{
			"b": {p("10.40.0.0/26"), p("10.50.0.0/26"), p("10.60.0.0/26")},
			"d": {p("10.40.0.64/26"), p("10.50.0.64/26"), p("10.60.0.64/26")},
		},
		Networks: threeNetworks(), Relays: map[string]string{"d": "b"}, Now: time.Now(), DownGrace: time.Second,
	}
	want, conns := Compute(in)
	blocksOf := func(key, name string) string {
		for _, rp := range want[key] {
			if rp.Name == name {
				return fmt.Sprint(rp.Blocks)
			}
		}
		return "absent"
	}
	for _, c := range []struct{ key, name, blocks string }{
		{"vxlan", "b", "[10.40.0.0/26 10.40.0.64/26]"},
		{"vxlan", "d", "[]"},
		{"vxlan/control", "b", "[10.60.0.0/26 10.60.0.64/26]"},
		{"vxlan/control", "d", "[]"},
		{"wireguard", "b", "[10.50.0.0/26 10.50.0.64/26]"},
		{"wireguard", "d", "[]"},
	} {
		if got := blocksOf(c.key, c.name); got != c.blocks {
			t.Errorf("%s %s: %s, want %s", c.key, c.name, got, c.blocks)
		}
	}
	for _, c := range conns {
		if c.Peer == "d" && (c.State != StateRelayed || !strings.Contains(c.Reason, "via b")) {
			t.Errorf("d's row %+v", c)
		}
	}

	// b cannot run WireGuard: media to d stays on d's own WireGuard link, the rest is relayed.
	in.Peers[0] = peer("b", "198.51.100.7", "vxlan")
	want, conns = Compute(in)
	if got := blocksOf("wireguard", "d"); got != "[10.50.0.64/26]" {
		t.Fatalf("media to d must stay on d's WireGuard link: %s", got)
	}
	if got := blocksOf("vxlan/control", "b"); got != "[10.60.0.0/26 10.60.0.64/26]" {
		t.Fatalf("control to d must ride on b: %s", got)
	}
	for _, c := range conns {
		if c.Peer == "d" && c.Network == "media" && c.State != StateEstablished {
			t.Fatalf("media to d is not relayed: %+v", c)
		}
	}
}

func TestVNIs(t *testing.T) {
	names := []string{"default", "media", "control", "std", "mgmt", "a", "zz-top", "media"}
	got := VNIs(names)
	if got["default"] != DefaultVNI || len(got) != 7 {
		t.Fatalf("VNIs %v", got)
	}
	seen := map[uint32]string{}
	for name, vni := range got {
		if name != "default" && (vni < VNIBase || vni >= VNIBase+VNISpan) {
			t.Fatalf("%s has VNI %#x outside the reserved range", name, vni)
		}
		if other, dup := seen[vni]; dup {
			t.Fatalf("%s and %s share VNI %d", name, other, vni)
		}
		seen[vni] = name
	}
	// The same list in any order gives the same VNIs; so does a list without default.
	for i := 0; i < 20; i++ {
		shuffled := slices.Clone(names)
		rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if again := VNIs(shuffled); fmt.Sprint(again) != fmt.Sprint(got) {
			t.Fatalf("order %v gives %v, want %v", shuffled, again, got)
		}
	}
	if VNIs([]string{"media"})["media"] != got["media"] {
		t.Fatal("a network's VNI depends on networks that do not collide with it")
	}
}

// Two names hashing into one slot: the first in sorted order keeps it, the other takes
// the next, whatever order they come in; a third one probing on moves past both.
func TestVNICollisionsResolvedInSortedOrder(t *testing.T) {
	slot := func(name string) uint32 {
		h := fnv.New32a()
		h.Write([]byte(name))
		return h.Sum32() % VNISpan
	}
	bySlot := map[uint32][]string{}
	var clash []string
	for i := 0; clash == nil && i < 1_000_000; i++ {
		name := fmt.Sprintf("n%d", i)
		s := slot(name)
		bySlot[s] = append(bySlot[s], name)
		if len(bySlot[s]) == 3 {
			clash = bySlot[s]
		}
	}
	if clash == nil {
		t.Fatal("found no three names in one slot")
	}
	slices.Sort(clash)
	s := slot(clash[0])
	for _, order := range [][]string{{clash[0], clash[1], clash[2]}, {clash[2], clash[1], clash[0]}, {clash[1], clash[2], clash[0]}} {
		got := VNIs(order)
		for i, name := range clash {
			if want := VNIBase + (s+uint32(i))%VNISpan; got[name] != want {
				t.Fatalf("order %v: %s has VNI %#x, want %#x", order, name, got[name], want)
			}
		}
	}
}

// A fabric (SR-IOV) network's blocks are in range but routed by no driver; its row says the
// physical network carries it; the other networks' VNIs do not count it.
func TestFabricNetworkGetsNoRoute(t *testing.T) {
	pol := Policy{UnderlayPrefix: netip.MustParsePrefix("192.0.2.10/24"), Modes: []string{"direct", "vxlan"}}
	def := Network{Name: DefaultNetwork, Subnet: netip.MustParsePrefix("10.40.0.0/16")}
	fast := Network{Name: "fast", Subnet: netip.MustParsePrefix("10.80.0.0/16"), Fabric: true}
	in := Input{Self: "a", Policy: pol, Peers: []Peer{peer("b", "192.0.2.20", "direct", "vxlan")},
		Blocks:   map[string][]netip.Prefix{"b": {netip.MustParsePrefix("10.40.1.0/26"), netip.MustParsePrefix("10.80.1.0/26")}},
		Networks: []Network{def, fast}, Now: time.Now()}
	want, conns := Links(in)
	if OutOfRange(conns) != 0 {
		t.Fatalf("fabric blocks counted out of range: %+v", conns)
	}
	for key, list := range want {
		for _, rp := range list {
			for _, b := range rp.Blocks {
				if fast.Subnet.Contains(b.Addr()) {
					t.Fatalf("driver %s routes fabric block %s", key, b)
				}
			}
		}
	}
	var row *Connection
	for i := range conns {
		if conns[i].Network == "fast" {
			row = &conns[i]
		}
	}
	if row == nil || row.Mode != "" || row.State != StateNone || !strings.Contains(row.Reason, "physical network") {
		t.Fatalf("fabric row %+v", row)
	}
	if _, ok := want[DriverKey(datapath.ModeDirect, DefaultNetwork)]; !ok {
		t.Fatalf("the default network lost its route: %v", want)
	}
}
