package ipam

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A claim sent again under the same request name gets the block its first send got: the
// second log entry changes nothing, and the table holds one block for the claimer. A new
// request gets a new block; the record survives a snapshot, and rmpeer drops it.
func TestRepeatedClaimRequestGetsTheSameBlock(t *testing.T) {
	f := newFSM()
	if res := applyCmd(f, 1, command{Op: opInit, ClusterID: "c1", Networks: []Network{clusterNet}}); res.Err != "" {
		t.Fatal(res.Err)
	}
	first := applyCmd(f, 2, command{Op: opClaim, Network: clusterNet, Peer: "p1", Request: "r1"})
	if first.Err != "" || !first.Block.IsValid() || first.Index != 2 {
		t.Fatalf("first claim: %+v", first)
	}
	before := stateJSON(f)
	again := applyCmd(f, 3, command{Op: opClaim, Network: clusterNet, Peer: "p1", Request: "r1"})
	if again.Block != first.Block || again.Index != first.Index {
		t.Fatalf("the same request again: %+v, want block %s at index 2", again, first.Block)
	}
	if after := stateJSON(f); after != before {
		t.Fatalf("a repeated claim changed the state:\n%s\n%s", before, after)
	}
	if got := testutil.ToFloat64(f.claimsRepeated); got != 1 {
		t.Errorf("claims repeated counted %v, want 1", got)
	}
	// Another peer sending p1's request name is a claim of its own.
	other := applyCmd(f, 4, command{Op: opClaim, Network: clusterNet, Peer: "p2", Request: "r1"})
	second := applyCmd(f, 5, command{Op: opClaim, Network: clusterNet, Peer: "p1", Request: "r2"})
	noName := applyCmd(f, 6, command{Op: opClaim, Network: clusterNet, Peer: "p1"})
	for _, res := range []commandResult{other, second, noName} {
		if res.Err != "" || res.Block == first.Block {
			t.Fatalf("a new claim: %+v, want a block other than %s", res, first.Block)
		}
	}
	if st := f.copyState(); len(st.owned(clusterNet.Name, "p1")) != 3 {
		owned := st.owned(clusterNet.Name, "p1")
		t.Fatalf("p1 owns %v, want 3 blocks", owned)
	}

	// A request name longer than the bound is refused and changes nothing.
	before = stateJSON(f)
	if res := applyCmd(f, 7, command{Op: opClaim, Network: clusterNet, Peer: "p1", Request: strings.Repeat("x", maxRequestLen+1)}); res.Err == "" || !errors.Is(res.err(), ErrConflict) {
		t.Fatalf("an oversized request name: %+v, want a conflict", res)
	}
	if after := stateJSON(f); after != before {
		t.Fatal("a refused claim changed the state")
	}

	// The record travels in the snapshot: restored, the repeat still gets r2's block.
	g := snapshotRoundTrip(t, f)
	if res := applyCmd(g, 8, command{Op: opClaim, Network: clusterNet, Peer: "p1", Request: "r2"}); res.Block != second.Block {
		t.Fatalf("after a restore, the repeat got %+v, want %s", res, second.Block)
	}
	// Clients are served the table without the records.
	if served := g.copyState(); served.Claims != nil {
		t.Fatalf("the served table carries claim records: %v", served.Claims)
	}
	// rmpeer returns p1's blocks and forgets its records.
	applyCmd(g, 9, command{Op: opRemovePeer, Peer: "p1"})
	if recs := claimRecords(g)[clusterNet.Name]; len(recs) != 1 {
		t.Fatalf("after rmpeer p1 the records are %v, want p2's alone", recs)
	}
}

// A snapshot whose claim record names no block of its network is refused whole.
func TestRestoreRefusesBadClaimRecords(t *testing.T) {
	st := newFSMState()
	st.Networks[clusterNet.Name] = clusterNet
	st.Pinned = true
	st.recordClaim(clusterNet.Name, "p1", claimRecord{Request: "r1", Block: rogueNet.Subnet, Index: 3})
	f := newFSM()
	err := f.Restore(io.NopCloser(bytes.NewReader(mustJSON(st))))
	if !errors.Is(err, ErrBadTable) {
		t.Fatalf("restore: %v, want ErrBadTable", err)
	}
	if len(f.copyState().Networks) != 0 {
		t.Fatal("a refused snapshot changed the state")
	}
}

// Through a real three-node Raft cluster: a follower's claim is applied by the leader, but
// the answer is lost on the way back (the forward fails). The follower sends it again and
// gets the same block; the tables hold one block for it, not two.
func TestClaimWhoseAnswerWasLostIsNotCommittedTwice(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 0
	tc.bootstrap("p1", "p2", "p3")
	leader := tc.leaderNode()
	var follower *testNode
	for _, n := range tc.liveNodes() {
		if n != leader {
			follower = n
			break
		}
	}
	tc.mu.Lock()
	tc.loseAnswers = map[string]int{follower.name: 2}
	tc.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The first Claim call loses two answers within its own retries...
	b, err := follower.c.Claim(ctx, clusterNet, follower.name)
	if err != nil {
		t.Fatalf("claim: %v", err)
	}
	tc.mu.Lock()
	left := tc.loseAnswers[follower.name]
	tc.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d answers still to lose, want 0: the claim did not go through the lost answers", left)
	}
	tc.reconcileUntil("every table to hold the claim", func() bool {
		for _, n := range tc.liveNodes() {
			if owned, _ := n.c.Owned(clusterNet, follower.name); len(owned) == 0 {
				return false
			}
		}
		return true
	})
	for _, n := range tc.liveNodes() {
		owned, err := n.c.Owned(clusterNet, follower.name)
		if err != nil || len(owned) != 1 || owned[0] != b {
			t.Fatalf("%s's table gives %s %v (%v), want just %s", n.name, follower.name, owned, err, b)
		}
	}
	repeated := 0.0
	for _, n := range tc.liveNodes() {
		repeated += testutil.ToFloat64(n.c.metrics.claimsRepeated)
	}
	if repeated < 2 {
		t.Errorf("claims repeated counted %v over the nodes, want at least 2 (the leader's FSM answered both resends)", repeated)
	}
	// The next claim is a new one: a second block.
	b2, err := follower.c.Claim(ctx, clusterNet, follower.name)
	if err != nil || b2 == b {
		t.Fatalf("the next claim: %s, %v; want a block other than %s", b2, err, b)
	}
}

// claimRecords is f's claim records, read under its lock.
func claimRecords(f *fsm) map[string]map[string]claimRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Claims
}

// A claim that got no answer at all (every answer lost until it gave up) and whose claimer
// then restarted is sent again under its old name, kept in the claimer's database: the
// restarted peer gets the block the lost answers carried, not a second one.
func TestUnansweredClaimSurvivesARestart(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 0
	tc.bootstrap("p1", "p2", "p3")
	var name string
	for _, n := range tc.liveNodes() {
		if n != tc.leaderNode() {
			name = n.name
			break
		}
	}
	tc.mu.Lock()
	tc.loseAnswers = map[string]int{name: 1 << 20}
	tc.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := tc.nodes[name].c.Claim(ctx, clusterNet, name); err == nil {
		t.Fatal("a claim whose every answer was lost succeeded")
	}
	leader := tc.leaderNode()
	var committed []netip.Prefix
	tc.reconcileUntil("the leader to hold the claim", func() bool {
		committed, _ = leader.c.Owned(clusterNet, name)
		return len(committed) > 0
	})
	tc.kill(name)
	tc.mu.Lock()
	tc.loseAnswers = nil
	tc.mu.Unlock()
	restarted := tc.start(name)
	var b netip.Prefix
	retryOnElection(t, "the claim after the restart", func() (err error) {
		b, err = restarted.c.Claim(ctx, clusterNet, name)
		return err
	}, func(err error) bool { return err == nil })
	owned, _ := tc.leaderNode().c.Owned(clusterNet, name)
	if len(committed) != 1 || b != committed[0] || len(owned) != 1 {
		t.Fatalf("after the restart %s got %s and owns %v; before it, the lost answers gave it %v: want one block", name, b, owned, committed)
	}
}
