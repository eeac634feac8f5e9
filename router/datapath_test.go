package router

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// The datapath loop recomputes only on change, so it must know when a dead peer's routes
// expire without any event: the earliest grace end still ahead.
func TestNextGraceEnd(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	const grace = 20 * time.Second
	peers := []mesh.Peer{
		{Name: "me", Self: true, State: mesh.StateAlive},
		{Name: "up", State: mesh.StateAlive, Since: t0.Add(-time.Hour)},
		{Name: "old", State: mesh.StateDead, Since: t0.Add(-time.Minute)}, // grace over already
		{Name: "late", State: mesh.StateLeft, Since: t0.Add(-5 * time.Second)},
		{Name: "early", State: mesh.StateDead, Since: t0.Add(-15 * time.Second)},
	}
	if got, want := nextGraceEnd(peers, t0, grace), t0.Add(5*time.Second); !got.Equal(want) {
		t.Fatalf("next grace end %v, want %v (the peer down for 15 s)", got, want)
	}
	if got := nextGraceEnd(peers[:3], t0, grace); !got.IsZero() {
		t.Fatalf("next grace end %v with no peer in its grace, want none", got)
	}
}

// sameDesired compares typed values: any field the drivers use makes two states differ.
func TestSameDesiredTyped(t *testing.T) {
	base := func() map[string][]datapath.RemotePeer {
		return map[string][]datapath.RemotePeer{datapath.ModeVXLAN: {{
			Name: "b", Underlay: netip.MustParseAddr("192.0.2.2"), VTEPMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2},
			WireGuardKey: [32]byte{1}, WireGuardPort: 6790, Blocks: []netip.Prefix{netip.MustParsePrefix("10.40.0.0/24")},
		}}}
	}
	if !sameDesired(base(), base()) {
		t.Fatal("equal states compare different")
	}
	edits := map[string]func(*datapath.RemotePeer){
		"name":     func(r *datapath.RemotePeer) { r.Name = "c" },
		"underlay": func(r *datapath.RemotePeer) { r.Underlay = netip.MustParseAddr("192.0.2.3") },
		"mac":      func(r *datapath.RemotePeer) { r.VTEPMAC = net.HardwareAddr{2, 0, 0, 0, 0, 3} },
		"key":      func(r *datapath.RemotePeer) { r.WireGuardKey[0] = 2 },
		"port":     func(r *datapath.RemotePeer) { r.WireGuardPort++ },
		"blocks":   func(r *datapath.RemotePeer) { r.Blocks = append(r.Blocks, netip.MustParsePrefix("10.40.1.0/24")) },
	}
	for what, edit := range edits {
		b := base()
		edit(&b[datapath.ModeVXLAN][0])
		if sameDesired(base(), b) {
			t.Errorf("states differing in %s compare equal", what)
		}
	}
	moved := map[string][]datapath.RemotePeer{datapath.ModeDirect: base()[datapath.ModeVXLAN]}
	if sameDesired(base(), moved) {
		t.Error("a peer moved to another mode compares equal")
	}
}

// The loop reads the block table every tick and recomputes only when a row it routes by
// changed.
func TestSameBlock(t *testing.T) {
	a := ipam.BlockOwnership{Network: "default", CIDR: netip.MustParsePrefix("10.40.0.0/24"), Owner: "b"}
	if !sameBlock(a, a) {
		t.Fatal("a row differs from itself")
	}
	b := a
	b.Owner = "c"
	if sameBlock(a, b) {
		t.Fatal("a block that changed owner compares equal")
	}
	b = a
	b.CIDR = netip.MustParsePrefix("10.40.1.0/24")
	if sameBlock(a, b) {
		t.Fatal("another block compares equal")
	}
}

// A relay choice flapping on noise must not add and remove probed links: a name stays a
// must-probe target for the linger time after it was last needed.
func TestLingering(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	until := map[string]time.Time{}
	if got := mesh.Lingering([]string{"r1", "d1"}, until, t0, time.Minute); !slices.Equal(got, []string{"d1", "r1"}) {
		t.Fatalf("first round %v, want both", got)
	}
	if got := mesh.Lingering([]string{"r2"}, until, t0.Add(59*time.Second), time.Minute); !slices.Equal(got, []string{"d1", "r1", "r2"}) {
		t.Fatalf("within the linger %v, want the old ones kept", got)
	}
	if got := mesh.Lingering(nil, until, t0.Add(time.Minute), time.Minute); !slices.Equal(got, []string{"r2"}) {
		t.Fatalf("after the linger %v, want only the one needed since", got)
	}
	if len(until) != 1 {
		t.Fatalf("expired names kept: %v", until)
	}
}

// This peer's own links reach its path choice on finer moves than they are published with.
func TestOwnMoved(t *testing.T) {
	base := mesh.LinkMetrics{RTT: 2 * time.Millisecond, Jitter: 100 * time.Microsecond, Up: true}
	cases := []struct {
		what string
		edit func(*mesh.LinkMetrics)
		want bool
	}{
		{"nothing", func(*mesh.LinkMetrics) {}, false},
		{"rtt +0.4ms (under 0.5ms)", func(m *mesh.LinkMetrics) { m.RTT += 400 * time.Microsecond }, false},
		{"rtt +0.6ms (30%)", func(m *mesh.LinkMetrics) { m.RTT += 600 * time.Microsecond }, true},
		{"down", func(m *mesh.LinkMetrics) { m.Up = false }, true},
		{"one loss point", func(m *mesh.LinkMetrics) { m.Loss = 0.01 }, true},
		{"jitter +0.6ms", func(m *mesh.LinkMetrics) { m.Jitter += 600 * time.Microsecond }, true},
	}
	for _, c := range cases {
		next := base
		c.edit(&next)
		if got := ownMoved(base, next); got != c.want {
			t.Errorf("%s: moved %v, want %v", c.what, got, c.want)
		}
	}
}

// During start-up a network's blocks stay on the driver that carried them: a media block
// applied over WireGuard never falls back to the peer's plaintext link, a control block
// never leaves control's own VXLAN device, and only one entry of a peer carries probes.
func TestUnionPeersKeepsNetworksApart(t *testing.T) {
	pfx := netip.MustParsePrefix
	b := netip.MustParseAddr("10.0.0.2")
	applied := map[string][]datapath.RemotePeer{
		datapath.ModeWireGuard: {{Name: "b", Underlay: b, Blocks: []netip.Prefix{pfx("10.50.0.0/26")}}},
		"vxlan/control":        {{Name: "b", Underlay: b, NoProbe: true, Blocks: []netip.Prefix{pfx("10.60.0.0/26")}}},
	}
	want := map[string][]datapath.RemotePeer{datapath.ModeVXLAN: {{Name: "b", Underlay: b}}}
	got := unionPeers(applied, want)
	for key, blocks := range map[string]string{"wireguard": "[10.50.0.0/26]", "vxlan/control": "[10.60.0.0/26]", "vxlan": "[]"} {
		if len(got[key]) != 1 || fmt.Sprint(got[key][0].Blocks) != blocks {
			t.Errorf("%s: %+v, want b with %s", key, got[key], blocks)
		}
	}
	if m := probeModes(got); m["b"] != datapath.ModeVXLAN || !got["wireguard"][0].NoProbe {
		t.Errorf("b's probes must stay on its pair link alone: %v %+v", m, got)
	}
}

// TestLinkExportDue: the link gauges are set at once when a link went up or down, otherwise
// only every linkExportEvery.
func TestLinkExportDue(t *testing.T) {
	last := time.Unix(1000, 0)
	for _, c := range []struct {
		after time.Duration
		event bool
		want  bool
	}{
		{time.Second, false, false},
		{linkExportEvery - time.Millisecond, false, false},
		{linkExportEvery, false, true},
		{time.Second, true, true},
		{0, true, true},
	} {
		if got := linkExportDue(last.Add(c.after), last, c.event); got != c.want {
			t.Errorf("linkExportDue(+%v, event %v) = %v, want %v", c.after, c.event, got, c.want)
		}
	}
	if !linkExportDue(last, time.Time{}, false) {
		t.Error("the first round does not set the gauges")
	}
}
