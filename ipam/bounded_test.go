package ipam

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// fetch stands in for HTTPTableFetcher: it asks the node at addr's table handler
// and names it as a transport that checks identities would.
func (tc *testCluster) fetch(_ context.Context, addr raft.ServerAddress) ([]byte, string, error) {
	tc.mu.Lock()
	n, ok := tc.nodes[string(addr)]
	alive := ok && n.alive
	tc.mu.Unlock()
	if !alive {
		return nil, "", fmt.Errorf("%s unreachable", addr)
	}
	rec := httptest.NewRecorder()
	n.c.serveTable(rec, httptest.NewRequest("GET", tablePath, nil))
	if rec.Code != 200 {
		return nil, "", fmt.Errorf("%s answered %d: %s", addr, rec.Code, rec.Body)
	}
	return rec.Body.Bytes(), string(addr), nil // an in-memory address is the name
}

// gossip plays one round of the table channel among the live nodes, as the mesh would: every
// node's pending broadcasts reach every other node, states are exchanged pairwise, and each
// node may fetch. It also feeds Observe, as the membership loop does.
func (tc *testCluster) gossip() {
	nodes := tc.liveNodes()
	members := tc.members()
	for _, n := range nodes {
		n.c.Observe(members)
		for _, msg := range n.c.TableBroadcasts() {
			for _, o := range nodes {
				if o != n {
					o.c.TableHandler().NotifyMsg(msg)
				}
			}
		}
	}
	for _, a := range nodes {
		for _, b := range nodes {
			if a != b {
				b.c.TableHandler().MergeRemoteState(a.c.TableHandler().LocalState(false), false)
			}
		}
	}
	for _, n := range nodes {
		n.c.mu.Lock()
		n.c.lastFetch = time.Time{} // tests need not wait out the fetch interval
		n.c.mu.Unlock()
		n.c.SyncTable(context.Background(), time.Now())
	}
}

// converge runs reconcile and gossip rounds until cond holds.
func (tc *testCluster) converge(what string, cond func() bool) {
	tc.t.Helper()
	tc.reconcileUntil(what, func() bool {
		tc.gossip()
		return cond()
	})
}

func (tc *testCluster) nameCluster() {
	tc.t.Helper()
	tc.reconcileUntil("the cluster to be named", func() bool {
		l := tc.leader()
		if l == "" {
			return false
		}
		tc.nodes[l].c.EnsureClusterID()
		return tc.nodes[l].c.ClusterID() != ""
	})
}

func TestAdmissible(t *testing.T) {
	for _, tt := range []struct {
		m     Member
		ours  string
		admit bool
	}{
		{Member{}, "aaaa", true},                                    // in no cluster: join ours
		{Member{}, "", true},                                        // ...also before ours is named
		{Member{ClusterID: "aaaa"}, "aaaa", true},                   // ours, not in the configuration yet
		{Member{InCluster: true, ClusterID: "aaaa"}, "aaaa", true},  // ours (e.g. restarted)
		{Member{InCluster: true, ClusterID: "bbbb"}, "aaaa", false}, // another cluster
		{Member{InCluster: true, ClusterID: "bbbb"}, "", false},     // another, ours unnamed yet
		{Member{ClusterID: "bbbb"}, "aaaa", false},                  // a client of another cluster
		{Member{InCluster: true}, "aaaa", false},                    // in some cluster, unnamed
		{Member{InCluster: true}, "", false},                        // ...whatever ours is
	} {
		if got := admissible(tt.m, tt.ours); got != tt.admit {
			t.Errorf("admissible(%+v, %q) = %v, want %v", tt.m, tt.ours, got, tt.admit)
		}
	}
}

// A peer that bootstrapped its own cluster never enters another's configuration, and neither
// cluster's leader adds the other's peers, whatever order their metadata arrives in.
func TestForeignClusterNeverJoins(t *testing.T) {
	for _, order := range []string{"foreign-unnamed-first", "foreign-named-first", "ours-unnamed"} {
		t.Run(order, func(t *testing.T) {
			tc := newTestCluster(t)
			for _, name := range []string{"a1", "a2", "a3"} {
				tc.start(name)
			}
			if ok, err := tc.nodes["a1"].c.MaybeBootstrap(tc.members()); !ok || err != nil {
				t.Fatalf("a1 bootstrap: %v %v", ok, err)
			}
			reconcileA := func(members []Member) {
				for _, n := range []string{"a1", "a2", "a3"} {
					tc.nodes[n].c.Reconcile(context.Background(), members, time.Now())
				}
			}
			onlyA := func() []Member {
				var out []Member
				for _, m := range tc.members() {
					if m.Name != "b1" {
						out = append(out, m)
					}
				}
				return out
			}
			tc.reconcileUntil("a's three members", func() bool {
				reconcileA(onlyA())
				return len(tc.nodes["a1"].c.configuration().Servers) == 3
			})
			if order != "ours-unnamed" {
				tc.nameCluster()
			}
			// b1 starts alone (no seeds) and bootstraps a cluster of its own.
			b1 := tc.start("b1")
			if ok, err := b1.c.MaybeBootstrap([]Member{{Name: "b1", Alive: true}}); !ok || err != nil {
				t.Fatalf("b1 bootstrap: %v %v", ok, err)
			}
			pollUntil(t, 5*time.Second, b1.c.IsLeader, "b1 to lead its own cluster")
			foreign := Member{Name: "b1", RaftAddr: "b1", Alive: true, Since: time.Now(), InCluster: true}
			all := func(f Member) []Member { return append(onlyA(), f) }
			// b1 shares the mesh with a: a's table gossip reaches it, and must not lend it a's ID.
			for _, d := range tc.nodes["a1"].c.fsm.deltasAfter(0) {
				b1.c.TableHandler().NotifyMsg(mustJSON(d))
			}
			b1.c.TableHandler().MergeRemoteState(tc.nodes["a1"].c.TableHandler().LocalState(false), false)
			if id := b1.c.ClusterID(); id != "" && id == tc.nodes["a1"].c.ClusterID() {
				t.Fatalf("b1 took a's cluster id %s from gossip", id)
			}
			switch order {
			case "foreign-unnamed-first":
				for i := 0; i < 5; i++ {
					reconcileA(all(foreign)) // says it is in a cluster, not which
				}
				b1.c.EnsureClusterID()
				foreign.ClusterID = b1.c.ClusterID()
				reconcileA(all(foreign))
			case "foreign-named-first", "ours-unnamed":
				b1.c.EnsureClusterID()
				foreign.ClusterID = b1.c.ClusterID()
				for i := 0; i < 5; i++ {
					reconcileA(all(foreign))
				}
			}
			// b1's leader sees a's members and must not take them either.
			for i := 0; i < 5; i++ {
				b1.c.Reconcile(context.Background(), tc.members(), time.Now())
			}
			// Both sides hand out blocks; neither table holds the other's.
			ctx := context.Background()
			if _, err := b1.c.Claim(ctx, clusterNet, "b1"); err != nil {
				t.Fatal(err)
			}
			if _, err := tc.nodes["a2"].c.Claim(ctx, clusterNet, "a2"); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3; i++ {
				reconcileA(all(foreign))
			}
			if got := fmt.Sprint(tc.nodes["a1"].c.Status().Voters); got != "[a1 a2 a3]" {
				t.Fatalf("a's voters = %s, want [a1 a2 a3]", got)
			}
			if st := b1.c.Status(); fmt.Sprint(st.Voters) != "[b1]" || len(st.Nonvoters) != 0 {
				t.Fatalf("b's configuration = %+v, want b1 alone", st)
			}
			for _, row := range b1.c.Status().Blocks {
				if row.Owner != "b1" {
					t.Fatalf("b1's table holds %+v", row)
				}
			}
			for _, row := range tc.nodes["a1"].c.Status().Blocks {
				if row.Owner == "b1" {
					t.Fatalf("a1's table holds %+v", row)
				}
			}
			if n := counterValue(tc.nodes["a1"].c.metrics.foreignRefused); n == 0 {
				t.Fatal("no foreign refusal counted on a's leader")
			}
		})
	}
}

// The log is compacted, and a member added later installs a snapshot instead of replaying.
func TestLogIsCompactedAndNewMemberInstallsSnapshot(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 1
	tc.tune = func(c *raft.Config) {
		fastRaft(c)
		c.SnapshotThreshold, c.TrailingLogs, c.SnapshotInterval = 64, 16, 50*time.Millisecond
	}
	tc.bootstrap("p1", "p2", "p3")
	ctx := context.Background()
	const claims = 200
	for i := 0; i < claims; i++ {
		name := "p" + strconv.Itoa(i%3+1)
		deadline := time.Now().Add(10 * time.Second)
		for { // an election under load is not what this test is about: retry through it
			_, err := tc.nodes[name].c.Claim(ctx, clusterNet, name)
			if err == nil {
				break
			}
			if !errors.Is(err, ErrNoQuorum) || time.Now().After(deadline) {
				t.Fatal(err)
			}
		}
	}
	p1 := tc.nodes["p1"].c
	pollUntil(t, 10*time.Second, func() bool {
		first, _ := p1.store.FirstIndex()
		snap, _ := strconv.ParseUint(p1.raft.Stats()["last_snapshot_index"], 10, 64)
		return snap > 0 && first > 1
	}, "a snapshot and a compacted log on p1")
	p4 := tc.start("p4")
	// p4 must hold what p1 holds.
	tc.reconcileUntil("p4 to hold the whole table", func() bool {
		want := len(p1.Status().Blocks)
		return want >= claims && len(p4.c.Status().Blocks) == want
	})
	if snap, _ := strconv.ParseUint(p4.c.raft.Stats()["last_snapshot_index"], 10, 64); snap == 0 {
		t.Fatalf("p4 replayed the log instead of installing a snapshot: %v", p4.c.raft.Stats())
	}
	if a, b := fmt.Sprint(p1.Status().Blocks), fmt.Sprint(p4.c.Status().Blocks); a != b {
		t.Fatalf("p4's table differs from the leader's:\n%s\n%s", b, a)
	}
}

// Voters plus a bounded number of non-voters; every other peer is a client that claims through
// the members and learns the table by gossip.
func TestBoundedMembershipAndClients(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 1
	tc.bootstrap("p1", "p2", "p3", "p4")
	tc.nameCluster()
	for _, name := range []string{"c1", "c2", "c3"} {
		tc.start(name)
	}
	for i := 0; i < 10; i++ {
		tc.gossip()
		for _, n := range tc.liveNodes() {
			n.c.Reconcile(context.Background(), tc.members(), time.Now())
		}
	}
	st := tc.nodes["p1"].c.Status()
	if len(st.Voters) != 3 || len(st.Nonvoters) != 1 {
		t.Fatalf("configuration %+v: want 3 voters and 1 non-voter", st)
	}
	for _, name := range []string{"c1", "c2", "c3"} {
		if r := tc.nodes[name].c.Role(); r != RoleClient {
			t.Fatalf("%s is a %s, want a client", name, r)
		}
	}
	// Clients claim (forwarded) and every peer learns every block.
	ctx := context.Background()
	want := map[netip.Prefix]string{}
	for _, name := range []string{"c1", "c2", "c3", "p4"} {
		b, err := tc.nodes[name].c.Claim(ctx, clusterNet, name)
		if err != nil {
			t.Fatalf("%s claim: %v", name, err)
		}
		if prev, dup := want[b]; dup {
			t.Fatalf("%s given to %s and %s", b, prev, name)
		}
		want[b] = name
		// Contains, then tablesAgree checks that nothing else was given.
		owned, err := tc.nodes[name].c.Owned(clusterNet, name)
		if err != nil || !slices.Contains(owned, b) {
			t.Fatalf("%s owns %v (%v) right after claiming %s", name, owned, err, b)
		}
	}
	tc.tablesAgree(tc.converge, want)
	// A client that knows its cluster never bootstraps another, even seeing no member alive.
	if ok, err := tc.nodes["c1"].c.MaybeBootstrap([]Member{{Name: "c1", Alive: true}}); ok || err != nil {
		t.Fatalf("a client bootstrapped a second cluster (%v)", err)
	}
	// A client's status names the same voters as the leader's.
	tc.converge("c1 to know the configuration", func() bool {
		return fmt.Sprint(tc.nodes["c1"].c.Status().Voters) == fmt.Sprint(st.Voters)
	})
	// A client that cannot reach the leader (its underlay blocked) claims through a member.
	leader := tc.leaderNode().name
	tc.mu.Lock()
	tc.blocked[[2]string{"c3", leader}] = true
	tc.mu.Unlock()
	tc.nodes["c3"].c.view.mu.Lock()
	tc.nodes["c3"].c.view.leader = leader // it would try the leader first
	tc.nodes["c3"].c.view.mu.Unlock()
	if _, err := tc.nodes["c3"].c.Claim(ctx, clusterNet, "c3"); err != nil {
		t.Fatalf("client cut off from the leader: %v", err)
	}
	// The leader dies: a healthy non-voter is promoted, a client becomes the spare non-voter,
	// and clients still claim.
	tc.kill("p1")
	tc.converge("a new leader with 3 voters and a spare", func() bool {
		l := tc.leader()
		if l == "" {
			return false
		}
		s := tc.nodes[l].c.Status()
		// Under load two leaders' rounds can cross (a promotion that timed out, then a voter
		// added by the next leader): the extra voter is demoted (newestVoter), which can
		// leave one spare more than --raft-nonvoters, never more voters.
		return len(s.Voters) == 3 && len(s.Nonvoters) >= 1 && len(s.Nonvoters) <= 2 && !strings.Contains(fmt.Sprint(s.Voters), "p1") &&
			(tc.nodes["c1"].c.Role() != RoleClient || tc.nodes["c1"].c.Status().Leader == l) // a client names the new leader
	})
	if _, err := tc.nodes["c2"].c.Claim(ctx, clusterNet, "c2"); err != nil {
		t.Fatalf("client claim after the leader died: %v", err)
	}
}

// A member that is not the leader passes a client's command on once, never twice.
func TestForwardIsBoundedToOneHop(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3")
	data, _ := json.Marshal(command{Op: opClaim, Network: clusterNet, Peer: "c9"})
	var out []byte
	var err error
	pollUntil(t, 10*time.Second, func() bool { // p2 must first hear of its leader
		out, err = tc.nodes["p2"].c.ApplyForwarded(data)
		return err == nil || tc.nodes["p2"].c.IsLeader()
	}, "a follower passing a client's claim on")
	if err != nil {
		t.Fatalf("follower passing a client's claim on: %v", err)
	}
	var res commandResult
	if json.Unmarshal(out, &res) != nil || !res.Block.IsValid() {
		t.Fatalf("answer %s", out)
	}
	data, _ = json.Marshal(command{Op: opClaim, Network: clusterNet, Peer: "c9", Hops: 1})
	if _, err := tc.nodes["p2"].c.ApplyForwarded(data); err == nil {
		t.Fatal("a follower passed on a command that had already made its hop")
	}
}

// Bad gossip changes nothing, and each kind is counted.
func TestTableGossipRejectsBadInput(t *testing.T) {
	tc := newTestCluster(t)
	c := tc.start("c1").c
	h := c.TableHandler()
	good := tableDelta{Prev: 0, Index: 5, Op: opClaim, Peer: "p1", Network: &clusterNet, Block: netip.MustParsePrefix("10.40.0.0/26")}
	b, _ := json.Marshal(good)
	h.NotifyMsg(b)
	if rows := c.Status().Blocks; len(rows) != 1 {
		t.Fatalf("good delta not applied: %+v", rows)
	}
	bad := []struct {
		reason string
		msg    []byte
	}{
		{"malformed", []byte("{not json")},
		{"oversize", bytes.Repeat([]byte(" "), maxDeltaBytes+1)},
		{"future", mustJSON(tableDelta{Prev: 5, Index: 5 + maxIndexAhead + 1, Op: opRemovePeer, Peer: "p1"})},
		{"invalid", mustJSON(tableDelta{Prev: 5, Index: 6, Op: opClaim, Peer: "p2", Network: &clusterNet, Block: netip.MustParsePrefix("10.40.0.0/26")})},          // owned by p1
		{"invalid", mustJSON(tableDelta{Prev: 5, Index: 6, Op: opClaim, Peer: "p2", Network: &clusterNet, Block: netip.MustParsePrefix("10.99.0.0/26")})},          // outside
		{"invalid", mustJSON(tableDelta{Prev: 5, Index: 6, Op: opClaim, Peer: "", Network: &clusterNet, Block: netip.MustParsePrefix("10.40.0.64/26")})},           // no owner
		{"invalid", mustJSON(tableDelta{Prev: 5, Index: 6, Op: "explode"})},                                                                                        // unknown op
		{"invalid", mustJSON(tableDelta{Prev: 5, Index: 6, Op: opInit, ClusterID: "NOT valid!"})},                                                                  // bad id
		{"invalid", mustJSON(tableDelta{Prev: 6, Index: 6, Op: opRemovePeer, Peer: "p1"})},                                                                         // index not above prev
		{"invalid", mustJSON(tableDelta{Prev: 5, Index: 6, Op: opClaim, Peer: "p2", Network: &Network{Name: "default", Subnet: clusterNet.Subnet, BlockBits: 3}})}, // bad network
	}
	for _, tt := range bad {
		before := counterValue(c.metrics.tableRejected.WithLabelValues(tt.reason))
		h.NotifyMsg(tt.msg)
		if after := counterValue(c.metrics.tableRejected.WithLabelValues(tt.reason)); after != before+1 {
			t.Errorf("%s (%.60s): counted %v → %v", tt.reason, tt.msg, before, after)
		}
	}
	h.MergeRemoteState([]byte("garbage"), false)
	h.MergeRemoteState(bytes.Repeat([]byte("1"), maxHintBytes+1), false)
	if rows := c.Status().Blocks; len(rows) != 1 || rows[0].Owner != "p1" || c.view.state.Version != 5 {
		t.Fatalf("bad input changed the table: %+v at %d", rows, c.view.state.Version)
	}
	// Once the table is named, a delta of another cluster is refused.
	h.NotifyMsg(mustJSON(tableDelta{Prev: 5, Index: 6, Op: opInit, ClusterID: "aaaa"}))
	before := counterValue(c.metrics.tableRejected.WithLabelValues("foreign"))
	h.NotifyMsg(mustJSON(tableDelta{Prev: 6, Index: 7, Op: opRemovePeer, Peer: "p1", ClusterID: "bbbb"}))
	if counterValue(c.metrics.tableRejected.WithLabelValues("foreign")) != before+1 || len(c.Status().Blocks) != 1 || c.ClusterID() != "aaaa" {
		t.Fatalf("a foreign delta was not refused: %+v, cluster %q", c.Status().Blocks, c.ClusterID())
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// Reconcile says "added raft voter" only when the voter was added.
func TestReconcileLogsOnlyWhatSucceeded(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("p1", "p2", "p3")
	var logs logLines
	p1 := tc.nodes["p1"].c
	p1.log = slog.New(slog.NewTextHandler(&logs, nil))
	p1.cfg.ApplyTimeout = 300 * time.Millisecond
	p1.cfg.Voters = 5
	tc.partition([]string{"p1"}, []string{"p2", "p3"}) // p1 still thinks it leads for a moment
	members := append(tc.members(), Member{Name: "p9", RaftAddr: "p9", Alive: true, Since: time.Now()})
	if !p1.IsLeader() {
		t.Skip("p1 lost leadership before the test could ask it to add a voter")
	}
	err := p1.Reconcile(context.Background(), members, time.Now())
	if err == nil {
		t.Skip("p1 added p9 before it noticed the partition; nothing to check")
	}
	if strings.Contains(logs.String(), "added raft voter") {
		t.Fatalf("logged an addition that failed (%v):\n%s", err, logs.String())
	}
}

type logLines struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logLines) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// newestVoter picks the voter to demote when there are too many: one the mesh does not list,
// else the one that came alive last; never the leader itself, never a non-voter.
func TestNewestVoter(t *testing.T) {
	conf := func(nonvoter string, voters ...string) raft.Configuration {
		var c raft.Configuration
		for _, v := range voters {
			c.Servers = append(c.Servers, raft.Server{ID: raft.ServerID(v), Suffrage: raft.Voter})
		}
		if nonvoter != "" {
			c.Servers = append(c.Servers, raft.Server{ID: raft.ServerID(nonvoter), Suffrage: raft.Nonvoter})
		}
		return c
	}
	members := []Member{{Name: "p2"}, {Name: "p3"}, {Name: "p4"}, {Name: "c1"}, {Name: "c2"}} // oldest first
	for _, tt := range []struct {
		conf raft.Configuration
		self string
		want raft.ServerID
		ok   bool
	}{
		{conf("", "c1", "p2", "p3", "p4"), "p2", "c1", true},
		{conf("", "c1", "p2", "p3", "p4"), "c1", "p4", true}, // never the leader itself
		{conf("", "p2", "p3", "p4", "p9"), "p2", "p9", true}, // a voter the mesh does not list goes first
		{conf("c2", "p2", "p3"), "p2", "p3", true},           // c2 came alive last but is no voter
		{conf("", "p2"), "p2", "", false},
	} {
		got, ok := newestVoter(tt.conf, members, tt.self)
		if got != tt.want || ok != tt.ok {
			t.Errorf("newestVoter(%v, self %s) = %s, %v; want %s, %v", tt.conf.Servers, tt.self, got, ok, tt.want, tt.ok)
		}
	}
}
