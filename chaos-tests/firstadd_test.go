package chaostest

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// TestFirstAddRightAfterStart: scripts and runtimes attach as soon as `weft peer` answers on
// its control socket, before the Raft cluster has a leader. Every host's first ADD needs a
// new block, so it must wait for the cluster to form (--attach-wait, default 15s) instead of
// failing with "try again" (CNI 11). Nothing here waits for the mesh or the leader first.
func TestFirstAddRightAfterStart(t *testing.T) {
	const hosts = 3
	var l *lab.Lab
	l = newLab(t, lab.Config{Prefix: "wnewfa", Hosts: hosts, NoStart: true, PeerArgs: func(i int) []string {
		if i == 0 {
			return nil // the first peer: it bootstraps the cluster once the mesh has settled
		}
		return []string{"--peers", l.Host(0).Addr.Addr().String(), "--raft-voters", fmt.Sprint(hosts)}
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
	for i, h := range l.Hosts() {
		// Start returns as soon as the peer answers on its socket.
		if err := h.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			// The test exercises the wait only if the first ADD goes out before the cluster
			// has a leader.
			if st := ipamOf(t, ctx, h); st.Leader != "" {
				t.Fatalf("%s already knows leader %s when its socket answers: the first ADD would not wait", h.Name, st.Leader)
			}
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
