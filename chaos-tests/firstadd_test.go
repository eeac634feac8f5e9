package chaostest

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// TestFirstAddRightAfterStart: scripts and runtimes attach as soon as `weft peer` answers on
// its control socket, before the Raft cluster has a leader. Every host's first ADD needs a
// new block, so it must wait for the cluster to form (--attach-wait, default 15s) instead of
// failing with "try again" (CNI 11). Nothing here waits for the mesh or the leader first.
func TestFirstAddRightAfterStart(t *testing.T) {
	// All three peers start at once, with the defaults (the case): the cluster forms
	// about 4-5s after the sockets answer.
	t.Run("together", func(t *testing.T) { firstAdds(t, "wnewfa", 0) })
	// Hosts 1 and 2 boot first and attach at once; host 0 boots 6s later (a rolling start).
	// The cluster, which needs all three voters, forms about 13s after the first ADDs, well
	// after one Raft apply's own 5s retry would have given up: those ADDs pass only because
	// they wait for the cluster. --attach-wait 30s leaves room on a loaded machine.
	t.Run("rolling", func(t *testing.T) { firstAdds(t, "wnewfr", 6*time.Second, "--attach-wait", "30s") })
}

// firstAdds starts a 3-host lab, every peer seeded with the others and expecting three
// voters, and attaches one container per host as soon as that host's socket answers. With
// lateStart, host 0 starts that much after hosts 1 and 2, whose ADDs must still be waiting
// then. Every ADD must succeed, with distinct addresses that reach each other.
func firstAdds(t *testing.T, prefix string, lateStart time.Duration, extra ...string) {
	const hosts = 3
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: prefix, Hosts: hosts, NoStart: true, PeerArgs: func(i int) []string {
		var seeds []string
		for j := range hosts {
			if j != i {
				seeds = append(seeds, l.Host(j).Addr.Addr().String())
			}
		}
		// Nobody bootstraps until all three are up.
		return append([]string{"--peers", strings.Join(seeds, ","), "--raft-voters", fmt.Sprint(hosts)}, extra...)
	}})
	ctx := testCtx(t, 2*time.Minute)

	type result struct {
		host  string
		addr  netip.Prefix
		took  time.Duration
		err   error
		index int
	}
	ctrs := make([]*lab.Container, hosts)
	cnis := make([]*lab.CNI, hosts)
	for i, h := range l.Hosts() {
		ctrs[i], cnis[i] = mustContainer(t, h), mustCNI(t, h, lab.CNIOptions{})
	}
	results := make(chan result, hosts)
	startAndAttach := func(i int) {
		h := l.Host(i)
		// Start returns as soon as the peer answers on its socket.
		if err := h.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if st := ipamOf(t, ctx, h); st.Leader != "" {
			t.Fatalf("%s already knows leader %s when its socket answers: its first ADD would not wait", h.Name, st.Leader)
		}
		go func() {
			start := time.Now()
			res, err := cnis[i].Add(ctx, ctrs[i].RuntimeConf("eth0"))
			r := result{host: h.Name, took: time.Since(start), err: err, index: i}
			if err == nil {
				r.addr, r.err = lab.ResultAddress(res)
			}
			results <- r
		}()
	}
	startAndAttach(1)
	startAndAttach(2)
	if lateStart > 0 {
		// No cluster can form while host 0 is down: the ADDs must still be waiting.
		select {
		case r := <-results:
			t.Fatalf("ADD on %s returned after %s (err %v) while only two of three voters were up: it must wait for the cluster",
				r.host, r.took.Round(time.Millisecond), r.err)
		case <-time.After(lateStart):
		}
	}
	startAndAttach(0)

	addrs := make([]netip.Addr, hosts)
	seen := map[netip.Addr]string{}
	for range hosts {
		r := <-results
		if r.err != nil {
			code, _ := lab.ErrorCode(r.err)
			t.Fatalf("first ADD on %s, sent as soon as its socket answered, failed after %s (CNI code %d): %v",
				r.host, r.took.Round(time.Millisecond), code, r.err)
		}
		t.Logf("first ADD on %s: %s after %s", r.host, r.addr, r.took.Round(time.Millisecond))
		assertInRange(t, r.addr)
		if other, dup := seen[r.addr.Addr()]; dup {
			t.Fatalf("%s and %s were both given %s", r.host, other, r.addr.Addr())
		}
		seen[r.addr.Addr()] = r.host
		addrs[r.index] = r.addr.Addr()
	}
	// The attachments work: every container reaches every other host's.
	for i := range hosts {
		for j := range hosts {
			if i != j {
				waitPing(t, ctx, ctrs[i], addrs[j])
			}
		}
	}
}
