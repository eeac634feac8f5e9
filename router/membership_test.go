package router

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/weftnet/weft/dns"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// `weft status peers` (RAFT column) and `weft status ipam` (voters, non-voters) read the same
// configuration, so they cannot disagree; without a configuration, gossip decides.
func TestRaftRoleAgreesWithIPAMStatus(t *testing.T) {
	cs := ipam.ClusterStatus{Voters: []string{"h0", "h1", "h2"}, Nonvoters: []string{"h3"}}
	for _, tt := range []struct {
		peer   string
		gossip bool
		want   string
	}{
		{"h0", true, "voter"},
		{"h1", false, "voter"}, // gossip lags: the configuration wins
		{"h2", true, "voter"},
		{"h3", true, "non-voter"},
		{"h4", false, "client"},
		{"h5", true, "client"}, // says it is a member, but not of the configuration we know
	} {
		if got := raftRole(tt.peer, tt.gossip, cs); got != tt.want {
			t.Errorf("raftRole(%s, %v) = %s, want %s", tt.peer, tt.gossip, got, tt.want)
		}
	}
	// Every peer `status ipam` lists has the role it is listed under.
	for _, v := range cs.Voters {
		if raftRole(v, false, cs) != ipam.RoleVoter {
			t.Errorf("%s is a voter in status ipam, not in status peers", v)
		}
	}
	for _, v := range cs.Nonvoters {
		if raftRole(v, false, cs) != ipam.RoleNonvoter {
			t.Errorf("%s is a non-voter in status ipam, not in status peers", v)
		}
	}
	unknown := ipam.ClusterStatus{}
	if got := raftRole("x", true, unknown); got != "member" {
		t.Errorf("no configuration, gossip says member: %s", got)
	}
	if got := raftRole("x", false, unknown); got != ipam.RoleClient {
		t.Errorf("no configuration, gossip says not a member: %s", got)
	}
}

// A join does not make every peer start a full sync with the joiner; only a peer that refused
// the joiner's DNS records while it counted it as gone does.
func TestJoinSyncsOnlyWhenRecordsWereRefused(t *testing.T) {
	clock := time.Unix(1000, 0)
	recs, err := dns.NewRecords("self", func() time.Time { return clock })
	if err != nil {
		t.Fatal(err)
	}
	rep, err := dns.NewReplicator(dns.ReplicatorConfig{Records: recs, Broadcast: func([]byte) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	p := &Peer{dnsRep: rep}
	var synced []string
	sync := func(name string) { synced = append(synced, name) }
	join := func(name string) {
		p.peerEvent(mesh.Event{Type: mesh.EventJoin, Peer: mesh.Peer{Name: name}}, sync)
	}
	for i := 0; i < 20; i++ {
		join(fmt.Sprintf("new%d", i))
	}
	if len(synced) != 0 {
		t.Fatalf("fresh joins started syncs with %v", synced)
	}
	// "back" dies and is forgotten; its records, arriving before the join event, are refused.
	back, err := dns.NewRecords("back", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := back.AddAddr("web", netip.MustParseAddr("10.40.0.2")); err != nil {
		t.Fatal(err)
	}
	p.peerEvent(mesh.Event{Type: mesh.EventDead, Peer: mesh.Peer{Name: "back"}}, sync)
	clock = clock.Add(time.Minute)
	recs.ExpirePeers(time.Second)
	recs.Merge(back.State())
	if recs.Len() != 0 {
		t.Fatalf("a forgotten peer's records were accepted")
	}
	join("back")
	if fmt.Sprint(synced) != "[back]" {
		t.Fatalf("synced with %v, want only the peer whose records were refused", synced)
	}
	join("back") // nothing refused since
	if len(synced) != 1 {
		t.Fatalf("synced again: %v", synced)
	}
}

// After `weft rmpeer`, a down peer owns no block: every peer drops its key pin, so the
// host can come back reinstalled. A peer that is up, owns blocks, or is this peer keeps it.
func TestUnpinnableKeepsLiveOwnersAndSelf(t *testing.T) {
	peers := []mesh.Peer{
		{Name: "self", State: mesh.StateAlive},
		{Name: "up", State: mesh.StateAlive},
		{Name: "suspect", State: mesh.StateSuspect},
		{Name: "dead-owner", State: mesh.StateDead},
		{Name: "removed", State: mesh.StateDead},
		{Name: "left", State: mesh.StateLeft},
	}
	pinned := []string{"self", "up", "suspect", "dead-owner", "removed", "left", "reaped"}
	got := unpinnable(pinned, "self", peers, map[string]bool{"dead-owner": true, "up": true})
	want := []string{"left", "reaped", "removed"}
	if !slices.Equal(got, want) {
		t.Fatalf("unpinnable = %v, want %v", got, want)
	}
}

// An idle client (in a named cluster, not the leader, nothing changed) skips the O(N)
// round until the resync; every reason to run one makes it run.
func TestRoundDueOnlyWhenSomethingChanged(t *testing.T) {
	cases := []struct {
		name                   string
		dirty, pending, leader bool
		since                  time.Duration
		want                   bool
	}{
		{"idle client", false, false, false, membershipTick, false},
		{"idle client just before the resync", false, false, false, membershipResync - time.Millisecond, false},
		{"resync", false, false, false, membershipResync, true},
		{"mesh event or failed round", true, false, false, 0, true},
		{"bootstrap pending", false, true, false, 0, true},
		{"raft leader", false, false, true, 0, true},
	}
	for _, c := range cases {
		if got := roundDue(c.dirty, c.pending, c.leader, c.since); got != c.want {
			t.Errorf("%s: roundDue = %v, want %v", c.name, got, c.want)
		}
	}
	if !(membershipMeta{}).bootstrapPending() {
		t.Error("a peer in no cluster and knowing none is not pending a bootstrap")
	}
	if (membershipMeta{clusterID: "c1"}).bootstrapPending() || (membershipMeta{inCluster: true}).bootstrapPending() {
		t.Error("a client of a named cluster, or a member, would bootstrap")
	}
}
