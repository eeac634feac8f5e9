package ipam

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

// testCluster is a set of Raft IPAM nodes on raft's in-memory transport, which can be
// partitioned (CONVENTIONS 5: raft logic on InmemTransport, real stores on disk).
type testCluster struct {
	t         *testing.T
	nonvoters int
	tune      func(*raft.Config)
	mu        sync.Mutex // guards nodes and blocked
	nodes     map[string]*testNode
	blocked   map[[2]string]bool // from → to pairs whose forwarding hangs
	// loseAnswers: this many of a node's next forwards are applied, then fail on the way
	// back (a reset connection after the leader committed).
	loseAnswers map[string]int
}

type testNode struct {
	name  string
	dir   string
	trans *raft.InmemTransport
	c     *Cluster
	db    *bolt.DB
	alive bool
	since time.Time
}

func newTestCluster(t *testing.T) *testCluster {
	tc := &testCluster{t: t, nodes: map[string]*testNode{}, blocked: map[[2]string]bool{}, nonvoters: 2, tune: fastRaft}
	t.Cleanup(func() {
		tc.mu.Lock()
		defer tc.mu.Unlock()
		for _, n := range tc.nodes {
			if n.alive {
				n.c.Close()
				n.db.Close()
			}
		}
	})
	return tc
}

func fastRaft(c *raft.Config) {
	c.HeartbeatTimeout = 100 * time.Millisecond
	c.ElectionTimeout = 100 * time.Millisecond
	c.LeaderLeaseTimeout = 50 * time.Millisecond
	c.CommitTimeout = 5 * time.Millisecond
}

// start runs (or restarts, keeping its dir) the named node and connects it to every live node.
func (tc *testCluster) start(name string) *testNode {
	tc.t.Helper()
	tc.mu.Lock()
	n, ok := tc.nodes[name]
	if !ok {
		n = &testNode{name: name, dir: tc.t.TempDir()}
		tc.nodes[name] = n
	}
	tc.mu.Unlock()
	_, n.trans = raft.NewInmemTransport(raft.ServerAddress(name))
	db, err := bolt.Open(filepath.Join(n.dir, "weft.db"), 0o600, nil)
	if err != nil {
		tc.t.Fatal(err)
	}
	n.db = db
	c, err := NewCluster(ClusterConfig{
		Name: name, Dir: filepath.Join(n.dir, "raft"), Transport: n.trans, DB: db, Voters: 3, Nonvoters: tc.nonvoters,
		DeadVoterGrace: 300 * time.Millisecond, ApplyTimeout: 2 * time.Second, Tune: tc.tune, Networks: []Network{clusterNet},
		Forward: func(ctx context.Context, addr raft.ServerAddress, cmd []byte) ([]byte, error) {
			return tc.forwardFrom(ctx, name, addr, cmd)
		},
		FetchTable: tc.fetch, Registerer: prometheus.NewRegistry(),
	})
	if err != nil {
		tc.t.Fatal(err)
	}
	n.c = c
	tc.mu.Lock()
	n.alive, n.since = true, time.Now()
	for _, o := range tc.nodes {
		if o != n && o.alive {
			n.trans.Connect(raft.ServerAddress(o.name), o.trans)
			o.trans.Connect(raft.ServerAddress(n.name), n.trans)
		}
	}
	tc.mu.Unlock()
	return n
}

func (tc *testCluster) kill(name string) {
	tc.mu.Lock()
	n := tc.nodes[name]
	n.alive, n.since = false, time.Now()
	for _, o := range tc.nodes {
		if o != n {
			o.trans.Disconnect(raft.ServerAddress(name))
		}
	}
	tc.mu.Unlock()
	n.c.Close()
	n.db.Close()
}

// partition cuts every link between the two groups.
func (tc *testCluster) partition(a, b []string) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	for _, x := range a {
		for _, y := range b {
			tc.nodes[x].trans.Disconnect(raft.ServerAddress(y))
			tc.nodes[y].trans.Disconnect(raft.ServerAddress(x))
		}
	}
}

func (tc *testCluster) heal() {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	for _, x := range tc.nodes {
		for _, y := range tc.nodes {
			if x != y && x.alive && y.alive {
				x.trans.Connect(raft.ServerAddress(y.name), y.trans)
			}
		}
	}
}

// forwardFrom stands in for the RPC from node from: it hands the command to the node at addr,
// if reachable; a blocked pair hangs until ctx ends, as a dial into a dropped underlay does.
func (tc *testCluster) forwardFrom(ctx context.Context, from string, addr raft.ServerAddress, cmd []byte) ([]byte, error) {
	tc.mu.Lock()
	blocked := tc.blocked[[2]string{from, string(addr)}]
	tc.mu.Unlock()
	if blocked {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	tc.mu.Lock()
	n, ok := tc.nodes[string(addr)]
	alive := ok && n.alive
	tc.mu.Unlock()
	if !alive {
		return nil, fmt.Errorf("%s unreachable", addr)
	}
	out, err := n.c.ApplyForwarded(cmd)
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if err == nil && tc.loseAnswers[from] > 0 {
		tc.loseAnswers[from]--
		return nil, fmt.Errorf("connection to %s reset after it applied the command (test: the answer is lost)", addr)
	}
	return out, err
}

func (tc *testCluster) members() []Member {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	var out []Member
	for _, n := range tc.nodes {
		m := Member{Name: n.name, RaftAddr: n.name, Alive: n.alive, Since: n.since}
		if n.alive {
			m.InCluster, m.ClusterID = n.c.InCluster(), n.c.ClusterID()
		}
		out = append(out, m)
	}
	return out
}

// tablesAgree waits (with wait: reconcileUntil, or converge when clients learn by gossip)
// until every live node's block table holds the same rows, at least one for each block of
// want (block → the peer that claimed it), then checks each row's owner against want, and
// returns the table as agreed. A claim retried after a commit its caller did not hear of
// (leadership lost while committing: frequent with fastRaft on a loaded machine) commits
// twice, so the claimer owns a block more; such a block must be a claimer's.
func (tc *testCluster) tablesAgree(wait func(string, func() bool), want map[netip.Prefix]string) map[netip.Prefix]string {
	tc.t.Helper()
	var rows []BlockOwnership
	wait(fmt.Sprintf("every table to hold the same %d blocks or more", len(want)), func() bool {
		rows = nil
		for i, n := range tc.liveNodes() {
			got := n.c.Status().Blocks
			if len(got) < len(want) || i > 0 && !slices.Equal(got, rows) {
				return false
			}
			rows = got
		}
		return true
	})
	claimers := slices.Collect(maps.Values(want))
	agreed := map[netip.Prefix]string{}
	for _, row := range rows {
		claimer, claimed := want[row.CIDR]
		switch {
		case claimed && claimer != row.Owner:
			tc.t.Fatalf("the tables say %s is %s's, the claimer was %s", row.CIDR, row.Owner, claimer)
		case !claimed && !slices.Contains(claimers, row.Owner):
			tc.t.Fatalf("the tables give %s to %s, which claimed nothing", row.CIDR, row.Owner)
		case !claimed:
			// Claims are named (command.Request): a resend through an election gets the
			// block its first send got, never a second one.
			tc.t.Fatalf("%s owns %s besides what it was told: a claim retried through an election committed twice", row.Owner, row.CIDR)
		}
		agreed[row.CIDR] = row.Owner
	}
	for b, claimer := range want {
		if _, ok := agreed[b]; !ok {
			tc.t.Fatalf("%s claimed %s, which the tables do not hold", claimer, b)
		}
	}
	return agreed
}

// leaderNode waits for a leader and returns it. With fastRaft's 50 ms lease a loaded
// machine runs elections often: tc.leader() can be "" at any moment.
func (tc *testCluster) leaderNode() *testNode {
	tc.t.Helper()
	var l string
	pollUntil(tc.t, 10*time.Second, func() bool { l = tc.leader(); return l != "" }, "a raft leader")
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.nodes[l]
}

// retryOnElection repeats write while it fails with ErrNoQuorum (an election under way)
// for up to 15 s. A write that failed with its entry committed anyway (leadership lost
// while committing) answers its retry as done already; done says which answers of a retry
// mean that (nil: only success). It reports whether the write was retried, so that the
// caller judges a retried write by the table rather than by its answer.
func retryOnElection(t *testing.T, what string, write func() error, done func(error) bool) (retried bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := write()
		if err == nil || retried && done != nil && done(err) {
			return retried
		}
		if !errors.Is(err, ErrNoQuorum) || time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		retried = true
		time.Sleep(50 * time.Millisecond) // an election takes a moment
	}
}

// reconcileUntil runs every live node's Reconcile until cond holds or the deadline passes.
func (tc *testCluster) reconcileUntil(what string, cond func() bool) {
	tc.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			for _, n := range tc.liveNodes() {
				tc.t.Logf("%s: %+v", n.name, n.c.Status())
			}
			tc.t.Fatalf("timed out waiting for %s", what)
		}
		for _, n := range tc.liveNodes() {
			n.c.Reconcile(context.Background(), tc.members(), time.Now())
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not a wait for a result
	}
}

func (tc *testCluster) liveNodes() []*testNode {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	var out []*testNode
	for _, n := range tc.nodes {
		if n.alive {
			out = append(out, n)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

func (tc *testCluster) leader() string {
	for _, n := range tc.liveNodes() {
		if n.c.IsLeader() {
			return n.name
		}
	}
	return ""
}

// bootstrap starts names, lets each decide whether to bootstrap, and waits for all of them
// to be in the configuration.
func (tc *testCluster) bootstrap(names ...string) {
	tc.t.Helper()
	for _, name := range names {
		tc.start(name)
	}
	booted := 0
	for _, n := range tc.liveNodes() {
		ok, err := n.c.MaybeBootstrap(tc.members())
		if err != nil {
			tc.t.Fatal(err)
		}
		if ok {
			booted++
		}
	}
	if booted != 1 {
		tc.t.Fatalf("%d nodes bootstrapped, want exactly 1", booted)
	}
	tc.reconcileUntil("every node in the raft configuration", func() bool {
		st := tc.nodes[names[0]].c.Status()
		return st.Leader != "" && len(st.Voters)+len(st.Nonvoters) == len(names)
	})
}

// claimEventually claims a block for owner through node from, retrying while the cluster
// has no quorum: under load (the race detector on 2 shared cores) a fresh leader can lose
// its leadership to a missed heartbeat, which is Raft working, not what a test checks.
func (tc *testCluster) claimEventually(ctx context.Context, from, owner string) netip.Prefix {
	tc.t.Helper()
	var b netip.Prefix
	var err error
	tc.reconcileUntil(owner+" to claim a block through "+from, func() bool {
		b, err = tc.nodes[from].c.Claim(ctx, clusterNet, owner)
		if err != nil && !errors.Is(err, ErrNoQuorum) {
			tc.t.Fatalf("claim for %s through %s: %v", owner, from, err)
		}
		return err == nil
	})
	return b
}

var clusterNet = Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), BlockBits: 26}

func TestBootstrapVotersAndNonvoters(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3", "p4", "p5")
	st := tc.nodes["p1"].c.Status()
	// p1 bootstrapped and led first; on a loaded machine another voter may lead by now.
	if !slices.Contains(st.Voters, st.Leader) || len(st.Voters) != 3 || len(st.Nonvoters) != 2 {
		t.Fatalf("status %+v: want a voter leading 3 voters and 2 non-voters", st)
	}
	// A node that sees a member already in a cluster never bootstraps its own.
	late := tc.start("a0")
	if ok, _ := late.c.MaybeBootstrap(tc.members()); ok {
		t.Fatal("a late node bootstrapped a second cluster")
	}
}

func TestClaimsFromEveryPeerAreDistinct(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3", "p4")
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[netip.Prefix]string{}
	for _, n := range tc.liveNodes() {
		for i := 0; i < 5; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				b, err := n.c.Claim(context.Background(), clusterNet, n.name)
				if err != nil {
					t.Errorf("%s claim: %v", n.name, err)
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if prev, dup := got[b]; dup {
					t.Errorf("block %s given to %s and %s", b, prev, n.name)
				}
				got[b] = n.name
			}()
		}
	}
	wg.Wait()
	if len(got) != 20 {
		t.Fatalf("%d distinct blocks, want 20", len(got))
	}
	// Every node's table agrees with what the claimers were told, once it has caught up.
	tc.tablesAgree(tc.reconcileUntil, got)
}

func TestConflictingNetworkDefinitionIsRefused(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2")
	if _, err := tc.nodes["p1"].c.Claim(context.Background(), clusterNet, "p1"); err != nil {
		t.Fatal(err)
	}
	other := clusterNet
	other.Subnet = netip.MustParsePrefix("10.50.0.0/16")
	_, err := tc.nodes["p2"].c.Claim(context.Background(), other, "p2")
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("claim with another range: %v, want ErrConflict", err)
	}
}

func TestMinorityCannotClaimMajorityCan(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3", "p4", "p5")
	// p1 (leader) and p4 (non-voter) on one side: one voter of three.
	tc.partition([]string{"p1", "p4"}, []string{"p2", "p3", "p5"})
	tc.reconcileUntil("a leader on the majority side", func() bool {
		l := tc.leader()
		return l == "p2" || l == "p3"
	})
	ctx := context.Background()
	for _, name := range []string{"p1", "p4"} {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, err := tc.nodes[name].c.Claim(cctx, clusterNet, name)
		cancel()
		if !errors.Is(err, ErrNoQuorum) {
			t.Fatalf("minority %s claimed: %v, want ErrNoQuorum", name, err)
		}
	}
	want := map[netip.Prefix]string{}
	for _, name := range []string{"p2", "p3", "p5"} {
		b, err := tc.nodes[name].c.Claim(ctx, clusterNet, name)
		if err != nil {
			t.Fatalf("majority %s: %v", name, err)
		}
		want[b] = name
	}
	tc.heal()
	tc.tablesAgree(tc.reconcileUntil, want) // the minority catches up
	seen := map[netip.Prefix]bool{}
	for _, row := range tc.nodes["p1"].c.Status().Blocks {
		if seen[row.CIDR] {
			t.Fatalf("%s owned twice", row.CIDR)
		}
		seen[row.CIDR] = true
	}
}

func TestDeadVoterIsReplacedByHealthyNonvoter(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3", "p4")
	tc.kill("p3")
	tc.reconcileUntil("p4 to replace p3 as a voter", func() bool {
		l := tc.leader()
		if l == "" {
			return false
		}
		st := tc.nodes[l].c.Status()
		return fmt.Sprint(st.Voters) == "[p1 p2 p4]" && len(st.Nonvoters) == 0
	})
}

func TestLeaderKilledNewLeaderAndRestartKeepsBlocks(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3")
	ctx := context.Background()
	want := map[netip.Prefix]string{}
	for i := 0; i < 3; i++ {
		want[tc.claimEventually(ctx, "p1", "p1")] = "p1"
	}
	tc.kill("p1")
	tc.reconcileUntil("a new leader", func() bool { l := tc.leader(); return l == "p2" || l == "p3" })
	want[tc.claimEventually(ctx, "p2", "p2")] = "p2"
	// Restarted, p1 knows its blocks at once, before it has heard from the new leader (all
	// it was told of; a claim retried through an election may have given it one more).
	p1 := tc.start("p1")
	owned, err := p1.c.Owned(clusterNet, "p1")
	if err != nil {
		t.Fatal(err)
	}
	for b, owner := range want {
		if owner == "p1" && !slices.Contains(owned, b) {
			t.Fatalf("restarted p1 owns %v, not its %s", owned, b)
		}
	}
	tc.tablesAgree(tc.reconcileUntil, want) // p1 catches up
}

func TestRemovePeerIsRepeatable(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2")
	ctx := context.Background()
	var claimed []netip.Prefix
	for i := 0; i < 2; i++ {
		b, err := tc.nodes["p2"].c.Claim(ctx, clusterNet, "p2")
		if err != nil {
			t.Fatal(err)
		}
		claimed = append(claimed, b)
	}
	// Every block claimed comes back (and any a claim retried through an election added).
	released, err := tc.nodes["p2"].c.RemovePeer(ctx, "p2") // from a follower
	if err != nil || len(released) < 2 || !slices.Contains(released, claimed[0]) || !slices.Contains(released, claimed[1]) {
		t.Fatalf("remove p2: %v, %v; want its blocks %v back", released, err, claimed)
	}
	released, err = tc.nodes["p1"].c.RemovePeer(ctx, "p2") // again, from the leader
	if err != nil || len(released) != 0 {
		t.Fatalf("second remove: %v, %v; want nothing and no error", released, err)
	}
	tc.kill("p2")
	tc.reconcileUntil("p2 out of the raft configuration", func() bool {
		st := tc.nodes["p1"].c.Status()
		return fmt.Sprint(st.Voters) == "[p1]"
	})
	b, err := tc.nodes["p1"].c.Claim(ctx, clusterNet, "p1")
	if err != nil || b.String() != "10.40.0.0/26" {
		t.Fatalf("claim after reclaim = %v, %v; want the freed 10.40.0.0/26", b, err)
	}
}

func TestReclaimAfterReleasesDeadPeersBlocks(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3")
	ctx := context.Background()
	if _, err := tc.nodes["p3"].c.Claim(ctx, clusterNet, "p3"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"p1", "p2"} { // whichever leads reclaims
		tc.nodes[n].c.cfg.ReclaimAfter = 200 * time.Millisecond
	}
	tc.kill("p3")
	tc.reconcileUntil("p3's block back in the pool", func() bool {
		return len(tc.nodes["p1"].c.ownedByPeer("p3")) == 0
	})
}
