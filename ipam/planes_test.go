package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// FSM: a peer returns an emptied block of a created network; the default network's blocks,
// another peer's and unowned blocks are refused and change nothing; once every block of a
// network is back, it may be removed.
func TestFSMReleaseBlock(t *testing.T) {
	f, refusals := initFSM(t)
	applyCmd(f, 2, command{Op: opNetworkCreate, Network: mediaNet})
	var blocks []netip.Prefix
	for i, peer := range []string{"p1", "p2"} {
		res := applyCmd(f, uint64(3+i), command{Op: opClaim, Network: mediaNet, Peer: peer})
		if res.Err != "" {
			t.Fatalf("claim: %+v", res)
		}
		blocks = append(blocks, res.Block)
	}
	def := applyCmd(f, 5, command{Op: opClaim, Network: clusterNet, Peer: "p1"})
	before := stateJSON(f)
	for _, tt := range []struct {
		cmd  command
		want error
		msg  string
	}{
		{command{Op: opRelease, Network: Network{Name: "media"}, Peer: "p1", Block: blocks[1]}, ErrConflict, "which p2 owns"},
		{command{Op: opRelease, Network: Network{Name: "media"}, Peer: "p1", Block: netip.MustParsePrefix("10.50.9.0/26")}, ErrConflict, "nobody owns"},
		{command{Op: opRelease, Network: Network{Name: "default"}, Peer: "p1", Block: def.Block}, ErrConflict, "rmpeer"},
		{command{Op: opRelease, Network: Network{Name: "nope"}, Peer: "p1", Block: blocks[0]}, ErrUnknownNetwork, "nope"},
		{command{Op: opRelease, Network: Network{Name: "media"}, Peer: "", Block: blocks[0]}, ErrConflict, "peer name"},
	} {
		if err := applyCmd(f, 10, tt.cmd).err(); !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%+v: %v, want %v mentioning %q", tt.cmd, err, tt.want, tt.msg)
		}
	}
	if stateJSON(f) != before {
		t.Fatal("refused releases changed the state")
	}
	if len(*refusals) != 5 {
		t.Fatalf("%d refusals counted, want 5", len(*refusals))
	}
	if res := applyCmd(f, 11, command{Op: opRelease, Network: Network{Name: "media"}, Peer: "p1", Block: blocks[0]}); res.Err != "" || !slices.Equal(res.Released, blocks[:1]) {
		t.Fatalf("release of p1's block: %+v", res)
	}
	if err := applyCmd(f, 12, command{Op: opNetworkRemove, Network: Network{Name: "media"}}).err(); !errors.Is(err, ErrNetworkInUse) || !strings.Contains(err.Error(), "p2 (1)") || strings.Contains(err.Error(), "p1") {
		t.Fatalf("rm while p2 holds a block: %v", err)
	}
	applyCmd(f, 13, command{Op: opRelease, Network: Network{Name: "media"}, Peer: "p2", Block: blocks[1]})
	if res := applyCmd(f, 14, command{Op: opNetworkRemove, Network: Network{Name: "media"}}); res.Err != "" {
		t.Fatalf("rm once every block is back: %+v", res)
	}
	// Clients replay the same deltas to the same table.
	view := newFSMState()
	for _, d := range f.deltasAfter(0) {
		if err := applyDelta(&view, d); err != nil {
			t.Fatalf("client applies %s delta %d: %v", d.Op, d.Index, err)
		}
	}
	if got, want := tableJSON(t, view), tableJSON(t, f.copyState()); got != want {
		t.Fatalf("client table differs:\n%s\n%s", got, want)
	}
	// A forged release delta (not the owner's block) is a bad table and changes nothing.
	forged := tableDelta{Prev: view.Version, Index: view.Version + 1, Op: opRelease, Peer: "p2", Network: &Network{Name: "default"}, Block: def.Block}
	if err := applyDelta(&view, forged); !errors.Is(err, ErrBadTable) {
		t.Fatalf("forged release delta: %v", err)
	}
}

func tableJSON(t *testing.T, st fsmState) string {
	t.Helper()
	return fmt.Sprint(st.Networks, st.Owners, st.Version)
}

// fakeReleaser records releases and fails while fail is set.
type fakeReleaser struct {
	owner *LocalOwner
	fail  error
	got   []netip.Prefix
}

func (r *fakeReleaser) ReleaseBlock(_ context.Context, n Network, b netip.Prefix, _ string) error {
	if r.fail != nil {
		return r.fail
	}
	r.got = append(r.got, b)
	return r.owner.forget(n.Name, b)
}

// The allocator serves the networks the cluster defines: a new one from an ADD on, a removed
// one not any more once nothing here is attached to it; the configured network stays.
func TestSetNetworksAddsAndDropsLearntNetworks(t *testing.T) {
	db := openDB(t, filepath.Join(t.TempDir(), "db"))
	a := newTestAllocator(t, db, testNet)
	ctx := context.Background()
	onMedia := func(id, ifname string) Attachment {
		return Attachment{ContainerID: id, IfName: ifname, Network: "media", CNINetwork: "media", Name: id}
	}
	if _, _, err := a.Allocate(ctx, onMedia("c1", "net1")); !errors.Is(err, ErrUnknownNetwork) {
		t.Fatalf("ADD on media before the allocator knows it: %v", err)
	}
	added, dropped, err := a.SetNetworks([]Network{testNet, mediaNet})
	if err != nil || !slices.Equal(added, []string{"media"}) || len(dropped) != 0 {
		t.Fatalf("SetNetworks: added %v dropped %v err %v", added, dropped, err)
	}
	// Unchanged input changes nothing.
	if added, dropped, err := a.SetNetworks([]Network{mediaNet, testNet}); err != nil || len(added)+len(dropped) != 0 {
		t.Fatalf("SetNetworks again: added %v dropped %v err %v", added, dropped, err)
	}
	rec, _, err := a.Allocate(ctx, onMedia("c1", "net1"))
	if err != nil || !mediaNet.Subnet.Contains(rec.Address) {
		t.Fatalf("ADD on media: %+v %v", rec, err)
	}
	// Removed from the cluster while attached here: kept.
	if _, dropped, _ := a.SetNetworks([]Network{testNet}); len(dropped) != 0 {
		t.Fatalf("dropped %v while attached", dropped)
	}
	if _, ok := a.Network("media"); !ok {
		t.Fatal("media gone while attached")
	}
	a.Release(rec.Key())
	if _, dropped, _ := a.SetNetworks([]Network{testNet}); !slices.Equal(dropped, []string{"media"}) {
		t.Fatalf("dropped %v, want media", dropped)
	}
	if _, ok := a.Network("media"); ok {
		t.Fatal("media still served after the cluster removed it")
	}
	// The configured network never goes, and a bad definition is refused, naming it.
	_, dropped, err = a.SetNetworks([]Network{{Name: "bad", Subnet: netip.MustParsePrefix("10.0.0.0/30"), BlockBits: 30}})
	if len(dropped) != 0 || !errors.Is(err, ErrInvalidNetwork) || !strings.Contains(err.Error(), "bad") {
		t.Fatalf("dropped %v err %v", dropped, err)
	}
	if _, ok := a.Network("default"); !ok {
		t.Fatal("the configured network went")
	}
	// The same refusal on the next call is not reported (nor counted) again.
	if _, _, err := a.SetNetworks([]Network{{Name: "bad", Subnet: netip.MustParsePrefix("10.0.0.0/30"), BlockBits: 30}}); err != nil {
		t.Fatalf("the same refusal reported again: %v", err)
	}
}

// A restarted peer learns its created networks from the table after NewAllocator: their
// attachments are indexed again, so their addresses are not handed out twice.
func TestSetNetworksIndexesAttachmentsOfARestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	db := openDB(t, path)
	a := newTestAllocator(t, db, testNet)
	a.SetNetworks([]Network{testNet, mediaNet})
	first, _, err := a.Allocate(context.Background(), Attachment{ContainerID: "c1", IfName: "net2", Network: "media", CNINetwork: "media"})
	if err != nil {
		t.Fatal(err)
	}
	owner, _ := NewLocalOwner(db)
	b, err := NewAllocator(Config{Peer: "p1", Networks: []Network{testNet}}, db, owner)
	if err != nil {
		t.Fatal(err)
	}
	b.SetNetworks([]Network{testNet, mediaNet})
	second, _, err := b.Allocate(context.Background(), Attachment{ContainerID: "c2", IfName: "net2", Network: "media", CNINetwork: "media"})
	if err != nil || second.Address == first.Address {
		t.Fatalf("second ADD after restart: %v %v (first %v)", second.Address, err, first.Address)
	}
	if got := b.Container("c1"); len(got) != 1 || got[0].Address != first.Address {
		t.Fatalf("Container(c1) = %+v", got)
	}
}

// Emptied blocks of a created network go back; the configured network's and used ones stay;
// a failed release brings the block back and waits before trying again.
func TestReleaseIdleBlocks(t *testing.T) {
	db := openDB(t, filepath.Join(t.TempDir(), "db"))
	owner, _ := NewLocalOwner(db)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a, err := NewAllocator(Config{Peer: "p1", Networks: []Network{testNet}, Now: func() time.Time { return now }}, db, owner)
	if err != nil {
		t.Fatal(err)
	}
	a.SetNetworks([]Network{testNet, mediaNet})
	ctx := context.Background()
	def, _, _ := a.Allocate(ctx, attach("d1"))
	m1, _, _ := a.Allocate(ctx, Attachment{ContainerID: "c1", IfName: "net1", Network: "media", CNINetwork: "media"})
	m2, _, _ := a.Allocate(ctx, Attachment{ContainerID: "c2", IfName: "net1", Network: "media", CNINetwork: "media"})
	r := &fakeReleaser{owner: owner}
	if got, err := a.ReleaseIdleBlocks(ctx, r); err != nil || len(got) != 0 {
		t.Fatalf("released %v (%v) while every block is used", got, err)
	}
	a.Release(m1.Key())
	if got, _ := a.ReleaseIdleBlocks(ctx, r); len(got) != 0 {
		t.Fatalf("released %v while c2 still uses the block", got)
	}
	a.Release(m2.Key())
	a.Release(def.Key())
	r.fail = ErrNoQuorum
	if _, err := a.ReleaseIdleBlocks(ctx, r); !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("failed release: %v", err)
	}
	if st := a.Networks(); len(st) != 2 || len(st[1].Blocks) != 1 {
		t.Fatalf("after a failed release the block must be back: %+v", st)
	}
	r.fail = nil
	if got, _ := a.ReleaseIdleBlocks(ctx, r); len(got) != 0 {
		t.Fatalf("tried again at once: %v", got)
	}
	now = now.Add(releaseRetry)
	got, err := a.ReleaseIdleBlocks(ctx, r)
	if err != nil || len(got) != 1 || got[0].Network != "media" || !got[0].CIDR.Contains(m1.Address) {
		t.Fatalf("released %v (%v), want the media block", got, err)
	}
	if err := a.CheckOwnership(); err != nil {
		t.Fatal(err)
	}
	for _, st := range a.Networks() {
		if st.Name == "media" && len(st.Blocks) != 0 || st.Name == "default" && len(st.Blocks) != 1 {
			t.Fatalf("after release: %+v", st)
		}
	}
	// The next ADD claims again (the pool hands the same block back) and uses it.
	m3, _, err := a.Allocate(ctx, Attachment{ContainerID: "c3", IfName: "net1", Network: "media", CNINetwork: "media"})
	if err != nil || !got[0].CIDR.Contains(m3.Address) {
		t.Fatalf("ADD after release: %v %v", m3.Address, err)
	}
	if err := a.CheckOwnership(); err != nil || len(a.Orphaned()) != 0 {
		t.Fatalf("the block claimed again must count as owned: %v orphans %v", err, a.Orphaned())
	}
}

// Through real Raft: a follower and a client each release the block they claimed of a
// created network (the client's release is forwarded); another's block is refused; rm then
// succeeds, and every node's table agrees.
func TestReleaseThroughFollowerAndClientThenRemove(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 0
	tc.bootstrap("p1", "p2", "p3")
	tc.nameCluster()
	tc.start("c1")
	tc.converge("the client to know the cluster", func() bool { return tc.nodes["c1"].c.ClusterID() != "" })
	ctx := context.Background()
	retryOnElection(t, "create media", func() error { return tc.nodes["p1"].c.CreateNetwork(ctx, mediaNet) }, nil)
	tc.converge("every node to know media", func() bool {
		for _, n := range tc.liveNodes() {
			if _, ok := n.c.Network("media"); !ok {
				return false
			}
		}
		return true
	})
	follower := ""
	for _, n := range tc.liveNodes() {
		if !n.c.IsLeader() && n.c.Role() != RoleClient {
			follower = n.name
			break
		}
	}
	blocks := map[string]netip.Prefix{}
	for _, name := range []string{follower, "c1"} {
		retryOnElection(t, "claim by "+name, func() error {
			b, err := tc.nodes[name].c.Claim(ctx, mediaNet, name)
			blocks[name] = b
			return err
		}, nil)
	}
	if err := tc.nodes["c1"].c.ReleaseBlock(ctx, mediaNet, blocks[follower], "c1"); !errors.Is(err, ErrConflict) {
		t.Fatalf("c1 releases %s's block: %v", follower, err)
	}
	if err := tc.nodes[follower].c.RemoveNetwork(ctx, "media"); !errors.Is(err, ErrNetworkInUse) {
		t.Fatalf("rm while blocks are held: %v", err)
	}
	for _, name := range []string{follower, "c1"} {
		retryOnElection(t, "release by "+name, func() error { return tc.nodes[name].c.ReleaseBlock(ctx, mediaNet, blocks[name], name) },
			func(err error) bool { return strings.Contains(err.Error(), "nobody owns") })
	}
	// Each node's table catches up (a follower applies after the leader commits; a client
	// learns by gossip or fetch), and the local claim record does not bring a block back.
	tc.converge("the releasers' tables to give them nothing", func() bool {
		for _, name := range []string{follower, "c1"} {
			if owned, err := tc.nodes[name].c.Owned(mediaNet, name); err != nil || len(owned) != 0 {
				return false
			}
		}
		return true
	})
	retryOnElection(t, "rm once every block is back", func() error { return tc.nodes["c1"].c.RemoveNetwork(ctx, "media") },
		func(err error) bool { return errors.Is(err, ErrUnknownNetwork) })
	tc.converge("every node to forget media", func() bool {
		for _, n := range tc.liveNodes() {
			if _, ok := n.c.Network("media"); ok {
				return false
			}
		}
		return true
	})
}
