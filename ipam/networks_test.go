package ipam

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

var (
	mediaNet   = Network{Name: "media", Subnet: netip.MustParsePrefix("10.50.0.0/16"), BlockBits: 26, MTU: 9000, Encrypt: EncryptAlways, SLA: "gold: rtt<=5ms", Isolated: true}
	controlNet = Network{Name: "control", Subnet: netip.MustParsePrefix("10.60.0.0/16"), BlockBits: 24, Isolated: true}
)

// initFSM is an FSM initialised as a bootstrapping leader does, with clusterNet pinned.
func initFSM(t *testing.T) (*fsm, *[]string) {
	t.Helper()
	f := newFSM()
	refusals := &[]string{}
	f.refused = func(reason string, err error) { *refusals = append(*refusals, reason+": "+err.Error()) }
	if res := applyCmd(f, 1, command{Op: opInit, ClusterID: "c1", Networks: []Network{clusterNet}}); res.Err != "" {
		t.Fatal(res.Err)
	}
	return f, refusals
}

func TestFSMCreateNetwork(t *testing.T) {
	f, refusals := initFSM(t)
	if res := applyCmd(f, 2, command{Op: opNetworkCreate, Network: mediaNet}); res.Err != "" {
		t.Fatalf("create media: %+v", res)
	}
	st := f.copyState()
	if st.Networks["media"] != mediaNet || len(st.Networks) != 2 || st.Version != 2 || !st.Pinned {
		t.Fatalf("after create: %+v", st)
	}
	if d := f.deltasAfter(1); len(d) != 1 || d[0].Op != opNetworkCreate || d[0].Network == nil || *d[0].Network != mediaNet {
		t.Fatalf("deltas for clients: %+v", d)
	}
	// A retried create of the same definition is a no-op success.
	if res := applyCmd(f, 3, command{Op: opNetworkCreate, Network: mediaNet}); res.Err != "" {
		t.Fatalf("same create again: %+v", res)
	}
	before := stateJSON(f)
	p := netip.MustParsePrefix
	for _, tt := range []struct {
		n    Network
		want error
		msg  string
	}{
		{Network{Name: "over", Subnet: p("10.40.128.0/17"), BlockBits: 26}, ErrInvalidNetwork, "overlaps network default"},
		{Network{Name: "over2", Subnet: p("10.0.0.0/8"), BlockBits: 26}, ErrInvalidNetwork, "overlaps network"},
		{Network{Name: "media", Subnet: p("10.70.0.0/16"), BlockBits: 26}, ErrConflict, "already exists"},
		{Network{Name: "lo", Subnet: p("127.1.0.0/16"), BlockBits: 26}, ErrInvalidNetwork, "127.0.0.0/8"},
		{Network{Name: "wide", Subnet: p("0.0.0.0/0"), BlockBits: 1}, ErrInvalidNetwork, "wider than a /8"},
		{Network{Name: "small", Subnet: p("10.70.0.0/25"), BlockBits: 26}, ErrInvalidNetwork, "smaller than a /24"},
		{Network{Name: "sixteen-chars-xx", Subnet: p("10.70.0.0/16"), BlockBits: 26}, ErrInvalidNetwork, "at most 15"},
		{Network{Name: "Bad_Name", Subnet: p("10.70.0.0/16"), BlockBits: 26}, ErrInvalidNetwork, "lower-case"},
		{Network{Name: "mtu", Subnet: p("10.70.0.0/16"), BlockBits: 26, MTU: 100}, ErrInvalidNetwork, "MTU 100"},
		{Network{Name: "mtu", Subnet: p("10.70.0.0/16"), BlockBits: 26, MTU: -1}, ErrInvalidNetwork, "MTU -1"},
		{Network{Name: "enc", Subnet: p("10.70.0.0/16"), BlockBits: 26, Encrypt: "maybe"}, ErrInvalidNetwork, "encrypt"},
		{Network{Name: "sla", Subnet: p("10.70.0.0/16"), BlockBits: 26, SLA: "gold"}, ErrInvalidNetwork, "SLA"},
		{Network{Name: "sla", Subnet: p("10.70.0.0/16"), BlockBits: 26, SLA: "gold: rtt<=" + strings.Repeat("9", 200) + "ms"}, ErrInvalidNetwork, "at most"},
		{Network{Name: "blk", Subnet: p("10.70.0.0/16"), BlockBits: 31}, ErrInvalidNetwork, "block size"},
	} {
		res := applyCmd(f, 10, command{Op: opNetworkCreate, Network: tt.n})
		if err := res.err(); !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("create %v: %v, want %v mentioning %q", tt.n, err, tt.want, tt.msg)
		}
	}
	if after := stateJSON(f); after != before {
		t.Fatalf("refused creates changed the state:\n%s\n%s", before, after)
	}
	if len(*refusals) != 14 {
		t.Fatalf("%d refusals counted, want 14: %v", len(*refusals), *refusals)
	}
}

// The underlay is checked on the leader (the FSM cannot know it deterministically).
func TestCheckCreateRefusesUnderlay(t *testing.T) {
	f, _ := initFSM(t)
	st := f.copyState()
	err := st.checkCreate(mediaNet, []netip.Addr{netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("10.50.3.7")})
	if !errors.Is(err, ErrInvalidNetwork) || !strings.Contains(err.Error(), "10.50.3.7") {
		t.Fatalf("create over the underlay: %v", err)
	}
	if err := st.checkCreate(mediaNet, []netip.Addr{netip.MustParseAddr("192.168.1.1")}); err != nil {
		t.Fatalf("create beside the underlay: %v", err)
	}
	// An uninitialised cluster, or an unpinned one that has no network yet, creates nothing.
	empty := newFSMState()
	if err := empty.checkCreate(mediaNet, nil); !errors.Is(err, ErrConflict) {
		t.Fatalf("create before init: %v", err)
	}
	empty.ClusterID = "c1"
	if err := empty.checkCreate(mediaNet, nil); !errors.Is(err, ErrConflict) {
		t.Fatalf("create on an unpinned cluster without networks: %v", err)
	}
}

func TestFSMRemoveNetwork(t *testing.T) {
	f, _ := initFSM(t)
	applyCmd(f, 2, command{Op: opNetworkCreate, Network: mediaNet})
	applyCmd(f, 3, command{Op: opNetworkCreate, Network: controlNet})
	for i, peer := range []string{"p1", "p2", "p2"} {
		if res := applyCmd(f, uint64(4+i), command{Op: opClaim, Network: mediaNet, Peer: peer}); res.Err != "" {
			t.Fatalf("claim of media: %+v", res)
		}
	}
	before := stateJSON(f)
	res := applyCmd(f, 10, command{Op: opNetworkRemove, Network: Network{Name: "media"}})
	if err := res.err(); !errors.Is(err, ErrNetworkInUse) || !strings.Contains(err.Error(), "p1 (1), p2 (2)") {
		t.Fatalf("rm of a network with owned blocks: %v, want ErrNetworkInUse naming p1 and p2", err)
	}
	if err := applyCmd(f, 10, command{Op: opNetworkRemove, Network: Network{Name: "default"}}).err(); !errors.Is(err, ErrConflict) {
		t.Fatalf("rm default: %v", err)
	}
	if err := applyCmd(f, 10, command{Op: opNetworkRemove, Network: Network{Name: "nope"}}).err(); !errors.Is(err, ErrUnknownNetwork) {
		t.Fatalf("rm of an unknown network: %v", err)
	}
	if after := stateJSON(f); after != before {
		t.Fatalf("refused removals changed the state")
	}
	if res := applyCmd(f, 11, command{Op: opNetworkRemove, Network: Network{Name: "control"}}); res.Err != "" {
		t.Fatalf("rm of an unused network: %+v", res)
	}
	applyCmd(f, 12, command{Op: opRemovePeer, Peer: "p1"})
	applyCmd(f, 13, command{Op: opRemovePeer, Peer: "p2"})
	if res := applyCmd(f, 14, command{Op: opNetworkRemove, Network: Network{Name: "media"}}); res.Err != "" {
		t.Fatalf("rm once its owners are gone: %+v", res)
	}
	st := f.copyState()
	if len(st.Networks) != 1 || len(st.Owners["media"]) != 0 || st.Version != 14 {
		t.Fatalf("after rm: %+v", st)
	}
	// The same range can be created again, with another definition.
	again := mediaNet
	again.BlockBits, again.MTU = 24, 0
	if res := applyCmd(f, 15, command{Op: opNetworkCreate, Network: again}); res.Err != "" {
		t.Fatalf("re-create: %+v", res)
	}
}

type bufSink struct {
	bytes.Buffer
}

func (*bufSink) ID() string    { return "test" }
func (*bufSink) Cancel() error { return nil }
func (*bufSink) Close() error  { return nil }

var _ raft.SnapshotSink = (*bufSink)(nil)

// snapshotRoundTrip snapshots f, persists it and restores it into a new FSM.
func snapshotRoundTrip(t *testing.T, f *fsm) *fsm {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink bufSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	restored := newFSM()
	if err := restored.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	return restored
}

// A snapshot round-trips the networks; a log replayed from the start (or from the snapshot
// plus the rest) reaches the same state, and a client's view fed the gossiped deltas too.
func TestNetworksSnapshotReplayAndDeltas(t *testing.T) {
	cmds := []command{
		{Op: opInit, ClusterID: "c1", Networks: []Network{clusterNet}},
		{Op: opClaim, Network: clusterNet, Peer: "p1"},
		{Op: opNetworkCreate, Network: mediaNet},
		{Op: opNetworkCreate, Network: controlNet},
		{Op: opClaim, Network: mediaNet, Peer: "p2"},
		{Op: opNetworkCreate, Network: Network{Name: "bad", Subnet: netip.MustParsePrefix("10.50.0.0/24"), BlockBits: 26}}, // refused
		{Op: opNetworkRemove, Network: Network{Name: "control"}},
		{Op: opNetworkRemove, Network: Network{Name: "media"}}, // refused: p2 owns a block
	}
	f := newFSM()
	view := newFSMState()
	for i, cmd := range cmds {
		applyCmd(f, uint64(i+1), cmd)
	}
	for _, d := range f.deltasAfter(0) {
		// As gossip carries it: encoded, within the size bound, decoded.
		b := mustJSON(d)
		if len(b) > maxDeltaBytes {
			t.Fatalf("delta of %d bytes: %s", len(b), b)
		}
		d = tableDelta{}
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatal(err)
		}
		if err := applyDelta(&view, d); err != nil {
			t.Fatalf("delta %+v: %v", d, err)
		}
	}
	if got, want := string(mustJSON(view)), stateJSON(f); got != want {
		t.Fatalf("a client's view from deltas:\n%s\nthe FSM:\n%s", got, want)
	}
	replay := newFSM()
	for i, cmd := range cmds {
		applyCmd(replay, uint64(i+1), cmd)
	}
	if stateJSON(replay) != stateJSON(f) {
		t.Fatal("a replayed log reached another state")
	}
	restored := snapshotRoundTrip(t, f)
	if stateJSON(restored) != stateJSON(f) {
		t.Fatalf("snapshot round trip:\n%s\n%s", stateJSON(restored), stateJSON(f))
	}
	st := restored.copyState()
	if st.Networks["media"] != mediaNet || len(st.Networks) != 2 {
		t.Fatalf("restored networks: %v", st.Networks)
	}
	// A delta the FSM would refuse is a bad table on a client, and changes nothing.
	bad := Network{Name: "evil", Subnet: netip.MustParsePrefix("10.40.0.0/24"), BlockBits: 26}
	ver := view.Version
	if err := applyDelta(&view, tableDelta{Prev: ver, Index: ver + 1, Op: opNetworkCreate, Network: &bad}); !errors.Is(err, ErrBadTable) || view.Version != ver {
		t.Fatalf("overlapping create delta: %v", err)
	}
	if err := applyDelta(&view, tableDelta{Prev: ver, Index: ver + 1, Op: opNetworkRemove, Network: &Network{Name: "default"}}); !errors.Is(err, ErrBadTable) {
		t.Fatalf("rm default delta: %v", err)
	}
	if err := applyDelta(&view, tableDelta{Prev: ver, Index: ver + 1, Op: opNetworkCreate}); !errors.Is(err, ErrBadTable) {
		t.Fatalf("create delta without a network: %v", err)
	}
}

// A snapshot written before networks had MTU, encryption, SLA and isolation decodes to the
// old meaning (all zero: the peer's flags, a routed range), and encodes as it was.
func TestOldSnapshotDecodesToOldMeaning(t *testing.T) {
	old := `{"cluster_id":"c1","networks":{"default":{"name":"default","subnet":"10.40.0.0/16","block_bits":26}},` +
		`"owners":{"default":{"10.40.0.0/26":"p1"}},"pinned":true,"version":7}`
	f := newFSM()
	if err := f.Restore(io.NopCloser(strings.NewReader(old))); err != nil {
		t.Fatal(err)
	}
	st := f.copyState()
	if st.Networks["default"] != clusterNet {
		t.Fatalf("old network decodes as %+v", st.Networks["default"])
	}
	if got := string(mustJSON(st.Networks["default"])); got != `{"name":"default","subnet":"10.40.0.0/16","block_bits":26}` {
		t.Fatalf("the default network encodes as %s", got)
	}
	// And a claim from a peer configured as before still matches it.
	if res := applyCmd(f, 8, command{Op: opClaim, Network: clusterNet, Peer: "p2"}); res.Err != "" {
		t.Fatalf("claim after restoring an old snapshot: %+v", res)
	}
}

// A network created through a follower reaches every member, and a client through the
// gossiped delta; a removal through a client reaches every node too. Refusals come back
// through forwarding with their sentinels.
func TestNetworkCreatedThroughFollowerReachesEveryNode(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 0
	tc.bootstrap("p1", "p2", "p3")
	tc.nameCluster()
	tc.start("c1")
	tc.start("c2")
	tc.converge("the clients to know the cluster", func() bool {
		return tc.nodes["c1"].c.ClusterID() != "" && tc.nodes["c2"].c.ClusterID() != ""
	})
	follower := ""
	for _, n := range tc.liveNodes() {
		if !n.c.IsLeader() && n.c.Role() != RoleClient {
			follower = n.name
			break
		}
	}
	ctx := context.Background()
	if err := tc.nodes[follower].c.CreateNetwork(ctx, mediaNet); err != nil {
		t.Fatalf("create through follower %s: %v", follower, err)
	}
	everyone := func(has bool) func() bool {
		return func() bool {
			for _, n := range tc.liveNodes() {
				def, ok := n.c.Network("media")
				if ok != has || (has && def != mediaNet) {
					return false
				}
			}
			return true
		}
	}
	tc.converge("every node to know media", everyone(true))
	if got := tc.nodes["c1"].c.Networks(); len(got) != 2 || got[1] != mediaNet {
		t.Fatalf("client's networks: %v", got)
	}
	overlap := Network{Name: "over", Subnet: netip.MustParsePrefix("10.50.128.0/17"), BlockBits: 26}
	if err := tc.nodes["c1"].c.CreateNetwork(ctx, overlap); !errors.Is(err, ErrInvalidNetwork) || !strings.Contains(err.Error(), "overlaps network media") {
		t.Fatalf("overlapping create through a client: %v", err)
	}
	if _, err := tc.nodes["c1"].c.Claim(ctx, mediaNet, "c1"); err != nil {
		t.Fatalf("claim of media: %v", err)
	}
	if err := tc.nodes[follower].c.RemoveNetwork(ctx, "media"); !errors.Is(err, ErrNetworkInUse) || !strings.Contains(err.Error(), "c1") {
		t.Fatalf("rm while c1 owns a block: %v", err)
	}
	if err := tc.nodes["c1"].c.RemoveNetwork(ctx, "default"); !errors.Is(err, ErrConflict) {
		t.Fatalf("rm default: %v", err)
	}
	if _, err := tc.nodes["p1"].c.RemovePeer(ctx, "c1"); err == nil {
		// c1 is alive: the leader keeps it. Stop it first, as an operator would.
		t.Fatal("removed a live peer")
	}
	tc.kill("c1")
	tc.converge("c1 removed", func() bool {
		_, err := tc.nodes[follower].c.RemovePeer(ctx, "c1")
		return err == nil
	})
	if err := tc.nodes[follower].c.RemoveNetwork(ctx, "media"); err != nil {
		t.Fatalf("rm once unused: %v", err)
	}
	tc.converge("every node to forget media", everyone(false))
	// A client creates one too, and the other client learns it by gossip.
	if err := tc.nodes["c2"].c.CreateNetwork(ctx, controlNet); err != nil {
		t.Fatalf("create through client c2: %v", err)
	}
	tc.converge("every node to know control", func() bool {
		for _, n := range tc.liveNodes() {
			if def, ok := n.c.Network("control"); !ok || def != controlNet {
				return false
			}
		}
		return true
	})
	if r := tc.nodes["c2"].c.Role(); r != RoleClient {
		t.Fatalf("c2 is a %s, want a client", r)
	}
	if names := networkNames(tc.nodes["c2"].c.Networks()); !slices.Equal(names, []string{"control", "default"}) {
		t.Fatalf("networks after rm: %v", names)
	}
}

func networkNames(nets []Network) []string {
	var out []string
	for _, n := range nets {
		out = append(out, n.Name)
	}
	return out
}
