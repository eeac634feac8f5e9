package router

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/mesh"
)

// The datapath's start-up phase (only add) ends when the peer has rejoined and settled, not
// on a timer: a restarted peer that has not found the others must keep its routes.
func TestStartupEndsOnRejoinNotOnATimer(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	self := mesh.Peer{Name: "me", Self: true, State: mesh.StateAlive}
	dead := mesh.Peer{Name: "b", State: mesh.StateDead}
	alive := mesh.Peer{Name: "b", State: mesh.StateAlive}
	const settle = 3 * time.Second
	s := startup{start: t0}

	// Alone (others dead or unknown), or no leader: not over, however long, up to keepAppliedFor.
	for _, d := range []time.Duration{time.Second, 30 * time.Second, 5 * time.Minute} {
		if s.over(t0.Add(d), []mesh.Peer{self, dead}, true, settle) {
			t.Fatalf("over after %v without any other peer alive", d)
		}
		if s.over(t0.Add(d), []mesh.Peer{self, alive}, false, settle) {
			t.Fatalf("over after %v without a raft leader", d)
		}
	}
	// Rejoined with a leader: over once that has held for settle.
	at := t0.Add(6 * time.Minute)
	if s.over(at, []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("over at the moment of the rejoin; want settle first")
	}
	if s.over(at.Add(settle-time.Millisecond), []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("over before settle passed")
	}
	// Losing the others again restarts the settle time.
	if s.over(at.Add(settle), []mesh.Peer{self, dead}, true, settle) {
		t.Fatal("over while alone again")
	}
	if s.over(at.Add(settle+time.Second), []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("over right after rejoining a second time")
	}
	if !s.over(at.Add(2*settle+time.Second), []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("not over after rejoining and settling")
	}

	// Never rejoined: over at keepAppliedFor.
	lone := startup{start: t0}
	if lone.over(t0.Add(keepAppliedFor-time.Second), []mesh.Peer{self}, false, settle) {
		t.Fatal("over before keepAppliedFor while alone")
	}
	if !lone.over(t0.Add(keepAppliedFor), []mesh.Peer{self}, false, settle) || !lone.joined.IsZero() {
		t.Fatal("not over at keepAppliedFor while alone")
	}
}

// During start-up the datapath only adds: a peer the mesh knows before the Raft log has
// caught up with its blocks keeps the blocks applied before the restart.
func TestUnionPeersKeepsAppliedBlocks(t *testing.T) {
	pfx := netip.MustParsePrefix
	applied := map[string][]datapath.RemotePeer{
		datapath.ModeDirect: {
			{Name: "b", Underlay: netip.MustParseAddr("10.0.0.2"), Blocks: []netip.Prefix{pfx("10.40.0.64/26")}},
			{Name: "c", Underlay: netip.MustParseAddr("10.0.0.3"), Blocks: []netip.Prefix{pfx("10.40.0.128/26"), pfx("10.40.1.0/26")}},
			{Name: "gone", Underlay: netip.MustParseAddr("10.0.0.9"), Blocks: []netip.Prefix{pfx("10.40.2.0/26")}},
		},
	}
	want := map[string][]datapath.RemotePeer{
		// b known without blocks yet (Raft behind), now over VXLAN.
		datapath.ModeVXLAN: {{Name: "b", Underlay: netip.MustParseAddr("10.0.0.2")}},
		// c known with one block; 10.40.1.0/26 now belongs to d.
		datapath.ModeDirect: {
			{Name: "c", Underlay: netip.MustParseAddr("10.0.0.3"), Blocks: []netip.Prefix{pfx("10.40.0.128/26")}},
			{Name: "d", Underlay: netip.MustParseAddr("10.0.0.4"), Blocks: []netip.Prefix{pfx("10.40.1.0/26")}},
		},
	}
	got := unionPeers(applied, want)
	flat := map[string]string{}
	for mode, list := range got {
		for _, rp := range list {
			flat[rp.Name] = fmt.Sprintf("%s %v", mode, rp.Blocks)
		}
	}
	for name, w := range map[string]string{
		"b":    "vxlan [10.40.0.64/26]",   // new mode, applied block kept
		"c":    "direct [10.40.0.128/26]", // the block now routed to d is not kept here
		"d":    "direct [10.40.1.0/26]",   // new
		"gone": "direct [10.40.2.0/26]",   // unknown to the mesh yet: kept
	} {
		if flat[name] != w {
			t.Errorf("%s: %q, want %q", name, flat[name], w)
		}
	}
	if len(flat) != 4 {
		t.Errorf("union has %d peers: %v", len(flat), flat)
	}
	// Nothing applied: the union is what is wanted.
	if got := unionPeers(nil, want); !sameDesired(got, want) {
		t.Errorf("union with nothing applied = %v, want %v", got, want)
	}
}
