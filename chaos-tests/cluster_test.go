package chaostest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

// The control plane across hosts, on 5 real peers: gossip membership from a ring of seeds,
// Raft-owned blocks under concurrent attachment, a partition, a killed leader, rmpeer.
// Phases share one lab because building and converging it is the slow part; each phase
// leaves the cluster healthy for the next.

const clusterHosts = 5

// newCluster builds clusterHosts peers, host i seeded only with host i+1 (a ring), with /28
// blocks so that filling a block takes few containers.
func newCluster(t *testing.T, prefix string, extra ...string) *lab.Lab {
	t.Helper()
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: prefix, Hosts: clusterHosts, NoStart: true, PeerArgs: func(i int) []string {
		next := l.Host((i + 1) % clusterHosts)
		args := []string{"--peers", next.Addr.Addr().String(), "--ipalloc-block", "28", "--raft-voter-grace", "5s"}
		return append(args, extra...)
	}})
	ctx := testCtx(t, time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatalf("start peers: %v", err)
	}
	return l
}

func cliJSON(ctx context.Context, h *lab.Host, v any, args ...string) error {
	out, err := h.CLI(ctx, append(args, "--json")...)
	if err != nil {
		return err
	}
	return json.Unmarshal(out, v)
}

// waitFor polls cond (which explains what is not there yet) until it returns nil.
func waitFor(t *testing.T, ctx context.Context, d time.Duration, what string, cond func() error) {
	t.Helper()
	pctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := lab.Poll(pctx, 250*time.Millisecond, cond); err != nil {
		t.Fatalf("%s within %s: %v", what, d, err)
	}
}

// aliveEverywhere: every listed host sees exactly the listed hosts alive.
func aliveEverywhere(ctx context.Context, hosts []*lab.Host) error {
	for _, h := range hosts {
		var peers []router.PeerStatus
		if err := cliJSON(ctx, h, &peers, "status", "peers"); err != nil {
			return err
		}
		alive := 0
		for _, p := range peers {
			if p.State == "alive" {
				alive++
			}
		}
		if alive != len(hosts) {
			return fmt.Errorf("%s sees %d alive of %d: %+v", h.Name, alive, len(hosts), peers)
		}
	}
	return nil
}

func ipamOf(t *testing.T, ctx context.Context, h *lab.Host) router.IPAMStatus {
	t.Helper()
	var st router.IPAMStatus
	if err := cliJSON(ctx, h, &st, "status", "ipam"); err != nil {
		t.Fatalf("status ipam on %s: %v", h.Name, err)
	}
	return st
}

func hostByName(l *lab.Lab, name string) *lab.Host {
	for _, h := range l.Hosts() {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// attachN attaches n new containers on h; it stops at the first error and returns the
// addresses attached so far with it.
func attachN(ctx context.Context, c *lab.CNI, h *lab.Host, n int) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for i := 0; i < n; i++ {
		ctr, err := h.NewContainer()
		if err != nil {
			return out, err
		}
		res, err := c.Add(ctx, ctr.RuntimeConf("eth0"))
		if err != nil {
			ctr.Delete()
			return out, err
		}
		a, err := lab.ResultAddress(res)
		if err != nil {
			return out, err
		}
		out = append(out, a)
	}
	return out, nil
}

// checkOwnership asserts that no address is attached twice anywhere and that every
// attachment lies in a block the Raft table gives to the peer that made it, as seen from
// every host; and that no block has two owners.
func checkOwnership(t *testing.T, ctx context.Context, hosts []*lab.Host) int {
	t.Helper()
	owners := map[string]string{}
	for _, h := range hosts {
		for _, b := range ipamOf(t, ctx, h).Blocks {
			if prev, ok := owners[b.CIDR]; ok && prev != b.Owner {
				t.Fatalf("block %s owned by %s and by %s", b.CIDR, prev, b.Owner)
			}
			owners[b.CIDR] = b.Owner
		}
	}
	seen := map[netip.Addr]string{}
	for _, h := range hosts {
		for _, a := range mustStatus(t, ctx, h).Attachments {
			p := netip.MustParsePrefix(a.Address)
			if prev, dup := seen[p.Addr()]; dup {
				t.Fatalf("%s attached on %s and on %s", p.Addr(), prev, h.Name)
			}
			seen[p.Addr()] = h.Name
			block := netip.PrefixFrom(p.Addr(), 28).Masked().String()
			if owners[block] != h.Name {
				t.Fatalf("%s handed out %s from block %s, which Raft gives to %q", h.Name, p.Addr(), block, owners[block])
			}
		}
	}
	return len(seen)
}

func TestCluster(t *testing.T) {
	l := newCluster(t, "wk")
	ctx := testCtx(t, 8*time.Minute)
	hosts := l.Hosts()
	cnis := map[*lab.Host]*lab.CNI{}
	for _, h := range hosts {
		cnis[h] = mustCNI(t, h, lab.CNIOptions{})
	}

	t.Run("mesh and raft converge from a ring of seeds", func(t *testing.T) {
		waitFor(t, ctx, 45*time.Second, "every peer sees 5 alive", func() error { return aliveEverywhere(ctx, hosts) })
		waitFor(t, ctx, 45*time.Second, "3 voters and 2 non-voters", func() error {
			for _, h := range hosts {
				st := ipamOf(t, ctx, h)
				if st.Leader == "" || len(st.Voters) != 3 || len(st.Nonvoters) != 2 {
					return fmt.Errorf("%s: leader %q voters %v non-voters %v", h.Name, st.Leader, st.Voters, st.Nonvoters)
				}
			}
			return nil
		})
	})

	t.Run("500 concurrent attachments get distinct addresses from their own blocks", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 2*len(hosts))
		for _, h := range hosts {
			for w := 0; w < 2; w++ { // two runtimes per host, all hosts at once
				wg.Add(1)
				go func() {
					defer wg.Done()
					if _, err := attachN(ctx, cnis[h], h, 50); err != nil {
						errs <- fmt.Errorf("%s: %w", h.Name, err)
					}
				}()
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		waitFor(t, ctx, 20*time.Second, "every peer to know every block", func() error {
			want := len(ipamOf(t, ctx, hosts[0]).Blocks)
			for _, h := range hosts[1:] {
				if got := len(ipamOf(t, ctx, h).Blocks); got != want {
					return fmt.Errorf("%s knows %d blocks, %s %d", h.Name, got, hosts[0].Name, want)
				}
			}
			return nil
		})
		if n := checkOwnership(t, ctx, hosts); n != 500 {
			t.Fatalf("%d distinct attachments, want 500", n)
		}
		waitFor(t, ctx, 20*time.Second, "status ipam on every peer to count 500 used", func() error {
			for _, h := range hosts {
				used := 0
				for _, b := range ipamOf(t, ctx, h).Blocks {
					if b.Used == nil {
						return fmt.Errorf("%s does not know the usage of %s yet", h.Name, b.CIDR)
					}
					used += *b.Used
				}
				if used != 500 {
					return fmt.Errorf("%s counts %d used", h.Name, used)
				}
			}
			return nil
		})
	})

	t.Run("a partitioned minority attaches from its blocks and reports no quorum for new ones", func(t *testing.T) {
		st := ipamOf(t, ctx, hosts[0])
		leader := hostByName(l, st.Leader)
		nonvoter := hostByName(l, st.Nonvoters[0])
		minority := []*lab.Host{leader, nonvoter}
		var majority []*lab.Host
		for _, h := range hosts {
			if h != leader && h != nonvoter {
				majority = append(majority, h)
			}
		}
		if err := l.Partition(minority, majority); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 30*time.Second, "a new leader on the majority side", func() error {
			st := ipamOf(t, ctx, majority[0])
			if st.Leader == "" || hostByName(l, st.Leader) == leader {
				return fmt.Errorf("leader %q", st.Leader)
			}
			return nil
		})
		for _, h := range minority {
			free := 0
			for _, b := range mustStatus(t, ctx, h).Networks[0].Blocks {
				free += b.Free
			}
			got, err := attachN(ctx, cnis[h], h, free+1)
			if len(got) != free {
				t.Fatalf("minority %s attached %d of its %d free addresses: %v", h.Name, len(got), free, err)
			}
			if code, ok := lab.ErrorCode(err); !ok || code != 11 || !strings.Contains(err.Error(), "quorum") {
				t.Fatalf("minority %s, needing a new block: %v; want CNI error 11 saying no quorum", h.Name, err)
			}
		}
		before := len(ipamOf(t, ctx, majority[0]).Blocks)
		if _, err := attachN(ctx, cnis[majority[0]], majority[0], 20); err != nil {
			t.Fatalf("majority %s: %v", majority[0].Name, err)
		}
		waitFor(t, ctx, 10*time.Second, "the majority's new block in its table", func() error {
			if after := len(ipamOf(t, ctx, majority[0]).Blocks); after <= before {
				return fmt.Errorf("no new block (%d → %d)", before, after)
			}
			return nil
		})
		if err := l.Heal(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 60*time.Second, "the mesh to heal", func() error { return aliveEverywhere(ctx, hosts) })
		waitFor(t, ctx, 30*time.Second, "the minority to catch up with the log", func() error {
			want := len(ipamOf(t, ctx, majority[0]).Blocks)
			for _, h := range minority {
				if got := len(ipamOf(t, ctx, h).Blocks); got != want {
					return fmt.Errorf("%s knows %d blocks, want %d", h.Name, got, want)
				}
			}
			return nil
		})
		checkOwnership(t, ctx, hosts)
	})

	t.Run("kill -9 the leader: a new one is elected and claims work again; the peer restarts intact", func(t *testing.T) {
		st := ipamOf(t, ctx, hosts[0])
		victim := hostByName(l, st.Leader)
		beforeStatus := mustStatus(t, ctx, victim)
		before, blocks := beforeStatus.SortedAttachments(), fmt.Sprint(beforeStatus.Networks[0].Blocks)
		var other *lab.Host
		for _, h := range hosts {
			if h != victim {
				other = h
				break
			}
		}
		if err := victim.Kill(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 30*time.Second, "a new leader", func() error {
			st := ipamOf(t, ctx, other)
			if st.Leader == "" || st.Leader == victim.Name {
				return fmt.Errorf("leader %q", st.Leader)
			}
			return nil
		})
		blocksBefore := len(mustStatus(t, ctx, other).Networks[0].Blocks)
		waitFor(t, ctx, 30*time.Second, "attachments that need a new block", func() error {
			_, err := attachN(ctx, cnis[other], other, 20)
			return err
		})
		if n := len(mustStatus(t, ctx, other).Networks[0].Blocks); n <= blocksBefore {
			t.Fatalf("%s claimed no new block (%d → %d)", other.Name, blocksBefore, n)
		}
		if err := victim.Start(ctx); err != nil {
			t.Fatal(err)
		}
		afterStatus := mustStatus(t, ctx, victim)
		if after := afterStatus.SortedAttachments(); fmt.Sprint(before) != fmt.Sprint(after) {
			t.Fatalf("attachments of %s changed across kill -9:\nbefore %v\nafter  %v", victim.Name, before, after)
		}
		if after := fmt.Sprint(afterStatus.Networks[0].Blocks); after != blocks {
			t.Fatalf("blocks of %s changed across kill -9:\nbefore %s\nafter  %s", victim.Name, blocks, after)
		}
		waitFor(t, ctx, 60*time.Second, "the restarted peer back in the mesh", func() error { return aliveEverywhere(ctx, hosts) })
		checkOwnership(t, ctx, hosts)
	})

	t.Run("a voter dead past the grace period is replaced by a healthy non-voter", func(t *testing.T) {
		st := ipamOf(t, ctx, hosts[0])
		var victim *lab.Host
		for _, v := range st.Voters {
			if v != st.Leader {
				victim = hostByName(l, v)
				break
			}
		}
		formerNonvoters := st.Nonvoters
		if err := victim.Kill(); err != nil {
			t.Fatal(err)
		}
		var survivor *lab.Host
		for _, h := range hosts {
			if h != victim {
				survivor = h
				break
			}
		}
		waitFor(t, ctx, 90*time.Second, "a non-voter promoted in place of "+victim.Name, func() error {
			st := ipamOf(t, ctx, survivor)
			if len(st.Voters) != 3 || slices.Contains(st.Voters, victim.Name) {
				return fmt.Errorf("voters %v", st.Voters)
			}
			for _, v := range st.Voters {
				if slices.Contains(formerNonvoters, v) {
					return nil
				}
			}
			return fmt.Errorf("voters %v include none of the non-voters %v", st.Voters, formerNonvoters)
		})
		if err := victim.Start(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 60*time.Second, victim.Name+" back, as a non-voter", func() error {
			st := ipamOf(t, ctx, survivor)
			if !slices.Contains(st.Nonvoters, victim.Name) {
				return fmt.Errorf("voters %v non-voters %v", st.Voters, st.Nonvoters)
			}
			return aliveEverywhere(ctx, hosts)
		})
	})

	t.Run("rmpeer returns a stopped peer's blocks, twice and from any peer", func(t *testing.T) {
		gone := hosts[len(hosts)-1]
		if _, err := gone.CLI(ctx, "rmpeer", hosts[0].Name); err == nil || !strings.Contains(err.Error(), "alive") {
			t.Fatalf("rmpeer of a live peer: %v; want a refusal saying it is alive", err)
		}
		if err := gone.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, 30*time.Second, gone.Name+" gone from the mesh", func() error { return aliveEverywhere(ctx, hosts[:len(hosts)-1]) })
		for _, h := range []*lab.Host{hosts[0], hosts[1]} {
			if out, err := h.CLI(ctx, "rmpeer", gone.Name); err != nil {
				t.Fatalf("rmpeer %s on %s: %v %s", gone.Name, h.Name, err, out)
			}
		}
		for _, b := range ipamOf(t, ctx, hosts[0]).Blocks {
			if b.Owner == gone.Name {
				t.Fatalf("block %s still owned by the removed %s", b.CIDR, gone.Name)
			}
		}
	})
}

// A peer with the wrong password is refused and says why; weft connect adds a seed at run
// time.
func TestPasswordAndConnect(t *testing.T) {
	pwFile := func(pw string) string {
		f := filepath.Join(t.TempDir(), "pw")
		if err := os.WriteFile(f, []byte(pw+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	right, wrong := pwFile("correct horse battery staple"), pwFile("hunter2")
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wpw", Hosts: 3, NoStart: true, PeerArgs: func(i int) []string {
		switch i {
		case 0: // the first peer: no seeds
			return []string{"--password-file", right}
		case 1:
			return []string{"--password-file", right, "--peers", l.Host(0).Addr.Addr().String()}
		}
		return []string{"--password-file", wrong, "--peers", l.Host(0).Addr.Addr().String()}
	}})
	ctx := testCtx(t, 3*time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatal(err)
	}
	h0, h1, h2 := l.Host(0), l.Host(1), l.Host(2)
	waitFor(t, ctx, 30*time.Second, "the two peers with the right password to meet", func() error {
		return aliveEverywhere(ctx, []*lab.Host{h0, h1})
	})
	waitFor(t, ctx, 30*time.Second, "the wrong password to be logged", func() error {
		if !strings.Contains(h2.LogTail(200), "password") {
			return fmt.Errorf("%s log does not mention the password yet", h2.Name)
		}
		return nil
	})
	var peers []router.PeerStatus
	if err := cliJSON(ctx, h0, &peers, "status", "peers"); err != nil {
		t.Fatal(err)
	}
	for _, p := range peers {
		if p.Name == h2.Name {
			t.Fatalf("%s with the wrong password is a member on %s: %+v", h2.Name, h0.Name, p)
		}
	}

	// Restart h2 with the right password but a seed that answers nothing; weft connect
	// brings it in.
	if err := h2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	l2cfg := []string{"--password-file", right, "--peers", "198.18.0.99"}
	if err := h2.StartWith(ctx, l2cfg...); err != nil {
		t.Fatal(err)
	}
	if out, err := h2.CLI(ctx, "connect", h1.Addr.Addr().String()); err != nil {
		t.Fatalf("weft connect: %v %s", err, out)
	}
	waitFor(t, ctx, 30*time.Second, "all three peers to meet after weft connect", func() error {
		return aliveEverywhere(ctx, []*lab.Host{h0, h1, h2})
	})
	if out, err := h2.CLI(ctx, "forget", "198.18.0.99"); err != nil {
		t.Fatalf("weft forget: %v %s", err, out)
	}
	if out, err := h2.CLI(ctx, "connect", "not a host!"); err == nil {
		t.Fatalf("weft connect with garbage succeeded: %s", out)
	}
	// h2 joined a cluster that exists: it did not bootstrap its own.
	waitFor(t, ctx, 30*time.Second, h2.Name+" added to the Raft cluster", func() error {
		st := ipamOf(t, ctx, h0)
		if !slices.Contains(append(st.Voters, st.Nonvoters...), h2.Name) {
			return fmt.Errorf("voters %v non-voters %v", st.Voters, st.Nonvoters)
		}
		return nil
	})
}

// Two first peers (no seeds) each bootstrap a cluster of their own; connecting them later
// must not merge them, since both own the same range in their own Raft logs.
func TestSeparateClustersDoNotMerge(t *testing.T) {
	l := newLab(t, lab.Config{Prefix: "wsep", Hosts: 2})
	ctx := testCtx(t, 2*time.Minute)
	h0, h1 := l.Host(0), l.Host(1)
	waitFor(t, ctx, 30*time.Second, "both peers to name their clusters", func() error {
		for _, h := range []*lab.Host{h0, h1} {
			var peers []router.PeerStatus
			if err := cliJSON(ctx, h, &peers, "status", "peers"); err != nil {
				return err
			}
			if len(peers) != 1 || !peers[0].RaftMember || peers[0].ClusterID == "" {
				return fmt.Errorf("%s: %+v", h.Name, peers)
			}
		}
		return nil
	})
	if out, err := h1.CLI(ctx, "connect", h0.Addr.Addr().String()); err != nil {
		t.Fatalf("weft connect: %v %s", err, out)
	}
	waitFor(t, ctx, 30*time.Second, "the refusal in the log", func() error {
		if !strings.Contains(h0.LogTail(200)+h1.LogTail(200), "another weft cluster") {
			return errors.New("no refusal logged yet")
		}
		return nil
	})
	for _, h := range []*lab.Host{h0, h1} {
		var peers []router.PeerStatus
		if err := cliJSON(ctx, h, &peers, "status", "peers"); err != nil {
			t.Fatal(err)
		}
		for _, p := range peers {
			if !p.Self && p.State == "alive" {
				t.Fatalf("%s accepted %s from another cluster", h.Name, p.Name)
			}
		}
	}
}
