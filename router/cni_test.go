package router

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/ipam"
)

// fakeOwner records claims; it answers like the Raft owner without a leader when noQuorum.
type fakeOwner struct {
	claims   atomic.Int32
	noQuorum bool
	owned    []netip.Prefix
}

func (o *fakeOwner) Owned(ipam.Network, string) ([]netip.Prefix, error) { return o.owned, nil }

func (o *fakeOwner) Claim(context.Context, ipam.Network, string) (netip.Prefix, error) {
	o.claims.Add(1)
	if o.noQuorum {
		return netip.Prefix{}, ipam.ErrNoQuorum
	}
	return netip.MustParsePrefix("10.40.0.0/26"), nil
}

// leaderAfter answers "" until set is called.
type leaderAfter struct {
	mu     sync.Mutex
	leader string
	asked  int
}

func (l *leaderAfter) get() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.asked++
	return l.leader
}

func (l *leaderAfter) set(name string) {
	l.mu.Lock()
	l.leader = name
	l.mu.Unlock()
}

var testNet = ipam.Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), BlockBits: 26}

func TestLeaderWaitFailsWith11AfterTheBound(t *testing.T) {
	owner := &fakeOwner{}
	var l leaderAfter
	const bound = 300 * time.Millisecond
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: bound, Poll: 10 * time.Millisecond})
	start := time.Now()
	_, err := w.Claim(context.Background(), testNet, "p1")
	waited := time.Since(start)
	if err == nil {
		t.Fatal("claim without a leader succeeded")
	}
	if waited < bound {
		t.Fatalf("claim failed after %s, before the %s bound", waited, bound)
	}
	if !errors.Is(err, ipam.ErrNoQuorum) {
		t.Fatalf("error %v does not wrap ipam.ErrNoQuorum", err)
	}
	ce := cniError(err)
	if ce.Code != types.ErrTryAgainLater {
		t.Fatalf("code %d, want %d: %v", ce.Code, types.ErrTryAgainLater, ce)
	}
	for _, want := range []string{"p1", "waited 300ms", "--attach-wait", "raft leader", "forming or joining"} {
		if !strings.Contains(ce.Message, want) {
			t.Errorf("message %q does not say %q", ce.Message, want)
		}
	}
	if n := owner.claims.Load(); n != 0 {
		t.Fatalf("the owner was asked to claim %d times without a leader", n)
	}
}

func TestLeaderWaitClaimsOnceALeaderIsKnown(t *testing.T) {
	owner := &fakeOwner{}
	var l leaderAfter
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: 10 * time.Second, Poll: 10 * time.Millisecond})
	done := make(chan error, 1)
	go func() {
		_, err := w.Claim(context.Background(), testNet, "p1")
		done <- err
	}()
	// The claim must still be waiting while no leader is known.
	select {
	case err := <-done:
		t.Fatalf("claim returned %v before a leader was known", err)
	case <-time.After(100 * time.Millisecond):
	}
	l.set("p2")
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("claim after the leader appeared: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("claim still waiting 5s after a leader appeared")
	}
	if n := owner.claims.Load(); n != 1 {
		t.Fatalf("owner claims = %d, want 1", n)
	}
}

func TestLeaderWaitRespectsTheRequestContext(t *testing.T) {
	owner := &fakeOwner{}
	var l leaderAfter
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: time.Minute, Poll: 10 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := w.Claim(ctx, testNet, "p1")
	if err == nil || time.Since(start) > 10*time.Second {
		t.Fatalf("claim with an ended context: %v after %s", err, time.Since(start))
	}
	if !errors.Is(err, context.DeadlineExceeded) || cniError(err).Code != types.ErrTryAgainLater {
		t.Fatalf("error %v (code %d): want a deadline and code 11", err, cniError(err).Code)
	}
	if owner.claims.Load() != 0 {
		t.Fatal("the owner was asked to claim after the context ended")
	}
}

// Once the cluster has formed, a missing leader is a partition: the claim goes to the owner
// at once, which fails it (CNI 11) as before.
func TestLeaderWaitDoesNotWaitOnceFormed(t *testing.T) {
	owner := &fakeOwner{noQuorum: true}
	var l leaderAfter
	l.set("p2")
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: time.Minute, Poll: 10 * time.Millisecond})
	stop := w.watch(context.Background())
	deadline := time.Now().Add(5 * time.Second)
	for !w.formed.Load() {
		if time.Now().After(deadline) {
			t.Fatal("watch did not see the leader within 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	stop()
	l.set("") // the leader is gone: a partition
	start := time.Now()
	_, err := w.Claim(context.Background(), testNet, "p1")
	if !errors.Is(err, ipam.ErrNoQuorum) {
		t.Fatalf("claim in a partition: %v, want ErrNoQuorum", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("claim in a partition took %s; it must not wait once the cluster has formed", d)
	}
	if owner.claims.Load() != 1 {
		t.Fatalf("owner claims = %d, want 1", owner.claims.Load())
	}
}

func TestLeaderWaitZeroBoundNeverWaits(t *testing.T) {
	owner := &fakeOwner{noQuorum: true}
	var l leaderAfter
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: 0})
	if _, err := w.Claim(context.Background(), testNet, "p1"); !errors.Is(err, ipam.ErrNoQuorum) {
		t.Fatalf("claim: %v, want ErrNoQuorum from the owner", err)
	}
	if l.asked != 0 || owner.claims.Load() != 1 {
		t.Fatalf("leader asked %d times, owner claims %d; want 0 and 1", l.asked, owner.claims.Load())
	}
}

func TestConfigRejectsBadAttachWait(t *testing.T) {
	for _, d := range []time.Duration{-time.Second, time.Hour} {
		cfg := DefaultConfig()
		cfg.Name = "p1"
		cfg.AttachWait = d
		if err := cfg.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "--attach-wait") {
			t.Errorf("--attach-wait %s: %v, want an error naming --attach-wait", d, err)
		}
	}
}

// An ADD served from an owned block never waits for a leader, even while the cluster is
// forming; the one that needs a new block does, through the allocator's claim.
func TestOwnedBlockServesWithoutLeaderAndOnlyTheClaimWaits(t *testing.T) {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "weft.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	n := ipam.Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), BlockBits: 30}
	owner := &fakeOwner{noQuorum: true, owned: []netip.Prefix{netip.MustParsePrefix("10.40.0.0/30")}}
	var l leaderAfter
	const bound = 2 * time.Second // far above one bbolt write, even on a loaded machine
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: bound, Poll: 10 * time.Millisecond})
	alloc, err := ipam.NewAllocator(ipam.Config{Peer: "p1", Networks: []ipam.Network{n}}, db, w)
	if err != nil {
		t.Fatal(err)
	}
	att := func(i int) ipam.Attachment {
		return ipam.Attachment{ContainerID: fmt.Sprintf("c%d", i), IfName: "eth0", Network: "default", CNINetwork: "n"}
	}
	// A /30 block of this network holds as many addresses as the allocator hands out from it;
	// every one of them comes at once, without a leader.
	i := 0
	for ; ; i++ {
		start := time.Now()
		_, _, err := alloc.Allocate(context.Background(), att(i))
		if err != nil {
			if !errors.Is(err, ipam.ErrNoQuorum) || time.Since(start) < bound {
				t.Fatalf("ADD %d needing a new block: %v after %s; want ErrNoQuorum after the %s wait", i, err, time.Since(start), bound)
			}
			break
		}
		if d := time.Since(start); d >= bound {
			t.Fatalf("ADD %d from an owned block took %s: it waited for a leader", i, d)
		}
		if i > 4 {
			t.Fatal("a /30 block served more than 4 addresses")
		}
	}
	if i == 0 {
		t.Fatal("the owned block served no address")
	}
	if owner.claims.Load() != 0 {
		t.Fatalf("the owner was asked to claim %d times without a leader", owner.claims.Load())
	}
}

// An ADD queued behind another's claim counts its wait from its arrival: it fails at most
// Bound after it arrived, not Bound after it got its turn.
func TestLeaderWaitCountsFromTheArrival(t *testing.T) {
	owner := &fakeOwner{}
	var l leaderAfter
	// Wide margins: a loaded machine delays timers, but not by seconds.
	const bound = 3 * time.Second
	w := newLeaderWait(owner, leaderWaitConfig{Peer: "p1", Leader: l.get, Bound: bound, Poll: 10 * time.Millisecond})
	ctx := withArrival(context.Background(), time.Now().Add(-2*time.Second))
	start := time.Now()
	_, err := w.Claim(ctx, testNet, "p1")
	if d := time.Since(start); !errors.Is(err, ipam.ErrNoQuorum) || d >= 2500*time.Millisecond || d < 500*time.Millisecond {
		t.Fatalf("claim of an ADD that arrived 2s ago: %v after %s; want ErrNoQuorum after about 1s", err, d)
	}
	ctx = withArrival(context.Background(), time.Now().Add(-time.Minute))
	start = time.Now()
	if _, err := w.Claim(ctx, testNet, "p1"); !errors.Is(err, ipam.ErrNoQuorum) || !strings.Contains(err.Error(), "waited 3s") || time.Since(start) > time.Second {
		t.Fatalf("claim of an ADD past its bound: %v after %s; want ErrNoQuorum at once, saying it waited 3s", err, time.Since(start))
	}
	if owner.claims.Load() != 0 {
		t.Fatalf("the owner was asked to claim %d times without a leader", owner.claims.Load())
	}
}
