package chaostest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

// Bounded Raft on real peers: 7 peers with --raft-voters 3 --raft-nonvoters 1 make 3 voters,
// 1 non-voter and 3 clients. A client claims blocks (forwarded to the leader), every peer
// learns the block table (clients by gossip), containers on a client reach containers on
// members, and after kill -9 of the leader clients still claim.
func TestClusterBoundedRaft(t *testing.T) {
	const n = 7
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wrafb", Hosts: n, NoStart: true, PeerArgs: func(i int) []string {
		return []string{"--peers", l.Host((i + 1) % n).Addr.Addr().String(), "--ipalloc-block", "28",
			"--raft-voters", "3", "--raft-nonvoters", "1", "--raft-voter-grace", "5s"}
	}})
	ctx := testCtx(t, 8*time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatalf("start peers: %v", err)
	}
	hosts := l.Hosts()
	waitFor(t, ctx, 90*time.Second, "every peer sees 7 alive", func() error { return aliveEverywhere(ctx, hosts) })
	waitFor(t, ctx, 60*time.Second, "3 voters, 1 non-voter and 3 clients, agreed by every peer", func() error {
		return rolesAgree(ctx, hosts, 3, 1)
	})

	st := ipamOf(t, ctx, hosts[0])
	var clients []*lab.Host
	for _, h := range hosts {
		if !slices.Contains(st.Voters, h.Name) && !slices.Contains(st.Nonvoters, h.Name) {
			clients = append(clients, h)
		}
	}
	client, voter, nonvoter := clients[0], hostByName(l, st.Voters[0]), hostByName(l, st.Nonvoters[0])
	// Containers on a client (its claim is forwarded) and on two members reach each other.
	var ctrs []*lab.Container
	var addrs []netip.Addr
	for _, h := range []*lab.Host{client, voter, nonvoter} {
		ctr := mustContainer(t, h)
		addrs = append(addrs, mustAdd(t, ctx, mustCNI(t, h, lab.CNIOptions{}), ctr).Addr())
		ctrs = append(ctrs, ctr)
	}
	for i := range ctrs {
		for j := range ctrs {
			if i != j {
				waitPing(t, ctx, ctrs[i], addrs[j])
			}
		}
	}
	waitFor(t, ctx, 30*time.Second, "every peer to know the client's block", func() error {
		for _, h := range hosts {
			found := false
			for _, b := range ipamOf(t, ctx, h).Blocks {
				found = found || b.Owner == client.Name
			}
			if !found {
				return fmt.Errorf("%s does not know %s's block", h.Name, client.Name)
			}
		}
		return nil
	})

	// kill -9 the leader: a new one is elected; clients still claim new blocks.
	victim := hostByName(l, st.Leader)
	if err := victim.Kill(); err != nil {
		t.Fatal(err)
	}
	var alive []*lab.Host
	for _, h := range hosts {
		if h != victim {
			alive = append(alive, h)
		}
	}
	waitFor(t, ctx, 60*time.Second, "a new leader", func() error {
		st := ipamOf(t, ctx, voterOtherThan(l, st, victim))
		if st.Leader == "" || st.Leader == victim.Name {
			return fmt.Errorf("leader %q", st.Leader)
		}
		return nil
	})
	for _, c := range clients {
		cni := mustCNI(t, c, lab.CNIOptions{})
		before := len(mustStatus(t, ctx, c).Networks[0].Blocks)
		waitFor(t, ctx, 60*time.Second, c.Name+" (a client) to attach containers that need a new block", func() error {
			_, err := attachN(ctx, cni, c, 16)
			return err
		})
		if after := len(mustStatus(t, ctx, c).Networks[0].Blocks); after <= before {
			t.Fatalf("client %s claimed no new block (%d → %d)", c.Name, before, after)
		}
	}
	waitFor(t, ctx, 30*time.Second, "every live peer to know every block", func() error {
		want := len(ipamOf(t, ctx, alive[0]).Blocks)
		for _, h := range alive[1:] {
			if got := len(ipamOf(t, ctx, h).Blocks); got != want {
				return fmt.Errorf("%s knows %d blocks, %s %d", h.Name, got, alive[0].Name, want)
			}
		}
		return nil
	})
	checkOwnership(t, ctx, alive)
}

func voterOtherThan(l *lab.Lab, st router.IPAMStatus, not *lab.Host) *lab.Host {
	for _, v := range st.Voters {
		if v != not.Name {
			return hostByName(l, v)
		}
	}
	return nil
}

// rolesAgree: every host's `status ipam` names the same leader, voters and non-voters, and
// every host's `status peers` gives each peer the role `status ipam` lists it under.
func rolesAgree(ctx context.Context, hosts []*lab.Host, voters, nonvoters int) error {
	var ref string
	for _, h := range hosts {
		var st router.IPAMStatus
		if err := cliJSON(ctx, h, &st, "status", "ipam"); err != nil {
			return err
		}
		if st.Leader == "" || len(st.Voters) != voters || len(st.Nonvoters) != nonvoters {
			return fmt.Errorf("%s: leader %q voters %v non-voters %v", h.Name, st.Leader, st.Voters, st.Nonvoters)
		}
		key := fmt.Sprint(st.Voters, st.Nonvoters)
		if ref == "" {
			ref = key
		} else if key != ref {
			return fmt.Errorf("%s says %s, another peer %s", h.Name, key, ref)
		}
		var peers []router.PeerStatus
		if err := cliJSON(ctx, h, &peers, "status", "peers"); err != nil {
			return err
		}
		roles := map[string]int{}
		for _, p := range peers {
			want := "client"
			switch {
			case slices.Contains(st.Voters, p.Name):
				want = "voter"
			case slices.Contains(st.Nonvoters, p.Name):
				want = "non-voter"
			}
			if p.RaftRole != want {
				return fmt.Errorf("%s: status peers says %s is a %q, status ipam a %q", h.Name, p.Name, p.RaftRole, want)
			}
			roles[p.RaftRole]++
		}
		if clients := len(hosts) - voters - nonvoters; roles["client"] != clients {
			return fmt.Errorf("%s counts roles %v, want %d clients", h.Name, roles, clients)
		}
	}
	return nil
}

// A peer started on its own (it bootstraps its own cluster and hands out addresses) and then
// told `weft connect` to a peer of an existing cluster is refused: it never enters the other
// cluster's Raft configuration, and no address is handed out twice on either side.
func TestClusterForeignPeerIsRefused(t *testing.T) {
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wraff", Hosts: 4, NoStart: true, PeerArgs: func(i int) []string {
		args := []string{"--ipalloc-block", "28"}
		if i == 1 || i == 2 {
			args = append(args, "--peers", l.Host(0).Addr.Addr().String())
		}
		return args // host 0 and host 3: first peers of their own clusters
	}})
	ctx := testCtx(t, 5*time.Minute)
	a := []*lab.Host{l.Host(0), l.Host(1), l.Host(2)}
	b := l.Host(3)
	for _, h := range a {
		if err := h.Start(ctx); err != nil {
			t.Fatalf("start %s: %v", h.Name, err)
		}
	}
	waitFor(t, ctx, 60*time.Second, "cluster a: 3 peers, 3 voters", func() error {
		if err := aliveEverywhere(ctx, a); err != nil {
			return err
		}
		for _, h := range a {
			if st := ipamOf(t, ctx, h); st.Leader == "" || len(st.Voters) != 3 {
				return fmt.Errorf("%s: leader %q voters %v", h.Name, st.Leader, st.Voters)
			}
		}
		return nil
	})
	if err := b.Start(ctx); err != nil {
		t.Fatalf("start %s: %v", b.Name, err)
	}
	// Connect b as early as possible after it bootstrapped: best in the window where it is in a
	// cluster that has no ID yet, which the mesh cannot tell apart from ours (only Raft's own
	// check keeps it out); otherwise once it is named.
	unnamed := false
	waitFor(t, ctx, 30*time.Second, b.Name+" to bootstrap its own cluster", func() error {
		var peers []router.PeerStatus
		if err := cliJSON(ctx, b, &peers, "status", "peers"); err != nil {
			return err
		}
		if len(peers) == 0 || !peers[0].RaftMember {
			return fmt.Errorf("%s: %+v", b.Name, peers)
		}
		unnamed = peers[0].ClusterID == ""
		if out, err := b.CLI(ctx, "connect", a[0].Addr.Addr().String()); err != nil {
			t.Fatalf("weft connect: %v %s", err, out)
		}
		return nil
	})
	t.Logf("%s connected while its cluster had no ID yet: %v", b.Name, unnamed)
	waitFor(t, ctx, 30*time.Second, b.Name+" to lead and name its own cluster", func() error {
		var peers []router.PeerStatus
		if err := cliJSON(ctx, b, &peers, "status", "peers"); err != nil {
			return err
		}
		for _, p := range peers {
			if p.Self && p.ClusterID != "" && ipamOf(t, ctx, b).Leader == b.Name {
				return nil
			}
		}
		return fmt.Errorf("%s: %+v", b.Name, peers)
	})
	waitFor(t, ctx, 30*time.Second, "the refusal in a log", func() error {
		logs := b.LogTail(300)
		for _, h := range a {
			logs += h.LogTail(300)
		}
		if !strings.Contains(logs, "another weft cluster") && !strings.Contains(logs, "another raft cluster") {
			return errors.New("no refusal logged yet")
		}
		return nil
	})
	attachSome := func(h *lab.Host, k int) {
		t.Helper()
		if _, err := attachN(ctx, mustCNI(t, h, lab.CNIOptions{}), h, k); err != nil {
			t.Fatalf("attach on %s: %v", h.Name, err)
		}
	}
	attachSome(b, 3)
	attachSome(a[1], 3)
	// Keep handing out addresses on both sides while the mesh is told to merge; watch that
	// neither Raft configuration ever takes a peer of the other.
	for round := 0; round < 5; round++ {
		attachSome(b, 3)
		attachSome(a[round%3], 3)
		for _, h := range a {
			st := ipamOf(t, ctx, h)
			if slices.Contains(append(st.Voters, st.Nonvoters...), b.Name) {
				t.Fatalf("%s's configuration took %s: %+v", h.Name, b.Name, st)
			}
		}
		st := ipamOf(t, ctx, b)
		if fmt.Sprint(st.Voters) != "["+b.Name+"]" || len(st.Nonvoters) != 0 {
			t.Fatalf("%s's configuration changed: %+v", b.Name, st)
		}
	}
	// No address twice on either side, each in a block its own cluster gives the peer.
	checkOwnership(t, ctx, a)
	checkOwnership(t, ctx, []*lab.Host{b})
	var bAddrs []string
	for _, at := range mustStatus(t, ctx, b).Attachments {
		bAddrs = append(bAddrs, at.Address)
	}
	sort.Strings(bAddrs)
	if len(bAddrs) != 18 || len(slices.Compact(slices.Clone(bAddrs))) != 18 {
		t.Fatalf("%s holds %d attachments (%d distinct), want 18: %v", b.Name, len(bAddrs), len(slices.Compact(slices.Clone(bAddrs))), bAddrs)
	}
}

// A client whose underlay to the Raft leader is blocked still claims blocks: it forwards to a
// member it reaches, which passes the claim on to its leader (one hop), and it learns the
// table from gossip and from members it reaches.
func TestClusterClientCutOffFromLeader(t *testing.T) {
	const n = 4
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wrafc", Hosts: n, NoStart: true, PeerArgs: func(i int) []string {
		return []string{"--peers", l.Host((i + 1) % n).Addr.Addr().String(), "--ipalloc-block", "28",
			"--raft-voters", "3", "--raft-nonvoters", "0"}
	}})
	ctx := testCtx(t, 5*time.Minute)
	if err := l.StartAll(ctx); err != nil {
		t.Fatalf("start peers: %v", err)
	}
	hosts := l.Hosts()
	waitFor(t, ctx, 90*time.Second, "every peer sees 4 alive", func() error { return aliveEverywhere(ctx, hosts) })
	waitFor(t, ctx, 60*time.Second, "3 voters and 1 client, agreed by every peer", func() error {
		return rolesAgree(ctx, hosts, 3, 0)
	})
	st := ipamOf(t, ctx, hosts[0])
	var client *lab.Host
	for _, h := range hosts {
		if !slices.Contains(st.Voters, h.Name) {
			client = h
		}
	}
	leader := hostByName(l, st.Leader)
	other := voterOtherThan(l, st, leader)
	waitFor(t, ctx, 30*time.Second, client.Name+" to see every voter's cluster id", func() error {
		var peers []router.PeerStatus
		if err := cliJSON(ctx, client, &peers, "status", "peers"); err != nil {
			return err
		}
		for _, p := range peers {
			if slices.Contains(st.Voters, p.Name) && (!p.RaftMember || p.ClusterID == "") {
				return fmt.Errorf("%s: %+v", client.Name, p)
			}
		}
		return nil
	})
	if err := l.Partition([]*lab.Host{client}, []*lab.Host{leader}); err != nil {
		t.Fatal(err)
	}
	// Two blocks' worth: the second claim is made well after the cut.
	addrs, err := attachN(ctx, mustCNI(t, client, lab.CNIOptions{}), client, 16)
	if err != nil {
		t.Fatalf("client %s cut off from leader %s: attached %d: %v", client.Name, leader.Name, len(addrs), err)
	}
	if blocks := len(mustStatus(t, ctx, client).Networks[0].Blocks); blocks < 2 {
		t.Fatalf("client %s owns %d blocks, want 2", client.Name, blocks)
	}
	waitFor(t, ctx, 30*time.Second, "the client and a member to agree on the table", func() error {
		owners := func(h *lab.Host) string {
			var out []string
			for _, b := range ipamOf(t, ctx, h).Blocks {
				out = append(out, b.CIDR+"="+b.Owner)
			}
			return strings.Join(out, " ")
		}
		a, b := owners(client), owners(other)
		if a != b {
			return fmt.Errorf("%s: %v, %s: %v", client.Name, a, other.Name, b)
		}
		return nil
	})
	checkOwnership(t, ctx, hosts)
	// Its containers reach a member's container over the underlay it still has.
	ctr := mustContainer(t, other)
	dst := mustAdd(t, ctx, mustCNI(t, other, lab.CNIOptions{}), ctr).Addr()
	src := mustContainer(t, client)
	mustAdd(t, ctx, mustCNI(t, client, lab.CNIOptions{}), src)
	waitPing(t, ctx, src, dst)
}
