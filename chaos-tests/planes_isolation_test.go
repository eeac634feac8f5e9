package chaostest

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// Network planes seen from inside the containers (#13 items 2, 4 and 5), on real peers:
// control and media (isolated) and open (--isolated=false) are created at run time. A
// container "multi" on host A is attached to default (eth0), control (net1) and media (net2),
// and so is "multi" on host B; a container on default only sits on each host, and one on open
// on B. Then: only eth0 holds the default route and replies from the media address leave by
// net2; the default-only containers reach neither control nor media, across hosts or on one
// host (containers and gateways), also right after A's peer restarts; default and open reach
// each other; the drops are counted; DNS answers NAME.NETWORK.weft.local with the address on
// that network only, and NAME.weft.local with the asker's own network first.
func TestPlanesIsolationAndDNS(t *testing.T) {
	l := newMeshLab(t, "wpi", 2)
	ctx := testCtx(t, 4*time.Minute)
	a, b := l.Host(0), l.Host(1)
	waitLeader(t, ctx, l.Hosts())
	ranges := planeRanges
	gateway := func(network string) netip.Addr { return ranges[network].Addr().Next() }
	for _, n := range []struct{ name, isolated string }{{"control", "true"}, {"media", "true"}, {"open", "false"}} {
		if out, err := a.CLI(ctx, "network", "create", n.name, "--subnet", ranges[n.name].String(), "--isolated="+n.isolated); err != nil {
			t.Fatalf("create %s: %v %s", n.name, err, out)
		}
	}
	// attach puts a new container named name on h, one interface per network, in order.
	attach := func(h *lab.Host, name string, networks ...string) (*lab.Container, map[string]netip.Addr) {
		ctr := mustContainer(t, h)
		addrs := map[string]netip.Addr{}
		for i, network := range networks {
			rt := ctr.RuntimeConf(fmt.Sprintf("net%d", i))
			if i == 0 {
				rt = ctr.RuntimeConf("eth0")
			}
			rt.Args = append(rt.Args, [2]string{"name", name})
			var res types.Result
			waitFor(t, ctx, 10*time.Second, "ADD on "+network+" (every peer learns a created network within a tick)", func() error {
				r, err := planeCNI(t, h, network).Add(ctx, rt)
				res = r
				return err
			})
			addr, err := lab.ResultAddress(res)
			if err != nil || !ranges[network].Contains(addr.Addr()) {
				t.Fatalf("ADD %s of %s on %s: %s (%v), want an address in %s", rt.IfName, name, network, addr, err, ranges[network])
			}
			addrs[network] = addr.Addr()
		}
		return ctr, addrs
	}
	multiA, onA := attach(a, "multia", "default", "control", "media")
	multiB, onB := attach(b, "multib", "default", "control", "media")
	plainA, plainOnA := attach(a, "plaina", "default")
	plainB, _ := attach(b, "plainb", "default")
	openB, openOnB := attach(b, "openb", "open")

	// Inside multi on A: one default route, on eth0; the media address answers by net2.
	out, err := multiA.Exec(ctx, "ip", "-4", "route", "show", "default")
	if err != nil || strings.Count(strings.TrimSpace(string(out)), "\n") != 0 || !strings.Contains(string(out), "dev eth0") {
		t.Fatalf("default routes in %s: %q (%v), want one, on eth0", multiA.Name, out, err)
	}
	out, err = multiA.Exec(ctx, "ip", "-4", "route", "get", "192.0.2.1", "from", onA["media"].String())
	if err != nil || !strings.Contains(string(out), "dev net2") {
		t.Fatalf("a reply from %s's media address %s would leave by %q (%v), want net2", multiA.Name, onA["media"], out, err)
	}

	// Every plane carries traffic between the two multi containers; default and open meet.
	for _, network := range []string{"default", "control", "media"} {
		waitPing(t, ctx, multiA, onB[network])
		waitPing(t, ctx, multiB, onA[network])
	}
	waitPing(t, ctx, plainA, openOnB["open"])
	waitPing(t, ctx, openB, plainOnA["default"])
	waitPing(t, ctx, plainB, onA["default"])

	before, err := scrapeMetrics(a)
	if err != nil {
		t.Fatal(err)
	}
	// What the default-only containers must never reach: the isolated planes' containers on
	// the other host and on their own, and those planes' gateways on their own host.
	// Every ping here must fail, so each waits out its 1 s timeout: they run at once (two
	// per pair, as before), which takes a second, not fourteen.
	cutOff := func(when string) {
		t.Helper()
		cases := []struct {
			from *lab.Container
			to   netip.Addr
			what string
		}{
			{plainB, onA["media"], "media container across hosts"},
			{plainB, onA["control"], "control container across hosts"},
			{plainA, onA["media"], "media container on its own host"},
			{plainA, onB["control"], "control container across hosts"},
			{plainA, gateway("media"), "media gateway on its own host"},
			{plainB, gateway("control"), "control gateway on its own host"},
			{openB, onA["media"], "media container from open"},
		}
		reached := make([]error, 2*len(cases))
		var wg sync.WaitGroup
		for i := range reached {
			c := cases[i/2]
			wg.Go(func() { reached[i] = c.from.Ping(ctx, c.to) })
		}
		wg.Wait()
		for i, err := range reached {
			if c := cases[i/2]; err == nil {
				t.Fatalf("%s: %s reached %s (%s)", when, c.from.Name, c.to, c.what)
			}
		}
	}
	cutOff("before any restart")
	after, err := scrapeMetrics(a)
	if err != nil {
		t.Fatal(err)
	}
	grew := 0.0
	for k, v := range after {
		if strings.HasPrefix(k, "weft_isolation_drops_total{") && strings.Contains(k, `network="media"`) {
			grew += v - before[k]
		}
	}
	if grew <= 0 {
		t.Errorf("%s counted no drop on media while default-only containers pinged it", a.Name)
	}

	// DNS per network, asked on media's gateway from B's multi (its media address is the asker).
	names, err := queryVia(multiB, gateway("media").String(), "multia.media.weft.local", mdns.TypeA)
	if err != nil || len(names.Answer) != 1 || names.Answer[0].(*mdns.A).A.String() != onA["media"].String() {
		t.Fatalf("multia.media.weft.local from %s: %v (%v), want only %s", multiB.Name, names, err, onA["media"])
	}
	waitFor(t, ctx, 10*time.Second, "multia.weft.local to list three addresses, the asker's network first", func() error {
		for _, asker := range []string{"media", "control", "default"} {
			r, err := queryVia(multiB, gateway(asker).String(), "multia.weft.local", mdns.TypeA)
			if err != nil {
				return err
			}
			var got []string
			for _, rr := range r.Answer {
				got = append(got, rr.(*mdns.A).A.String())
			}
			if len(got) != 3 || got[0] != onA[asker].String() {
				return fmt.Errorf("asked on %s: %v, want three with %s first", asker, got, onA[asker])
			}
		}
		return nil
	})
	r, err := queryVia(multiB, gateway("media").String(), "plaina.media.weft.local", mdns.TypeA)
	if err != nil || r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
		t.Fatalf("plaina.media.weft.local (a name with no media address): %v (%v), want an empty answer", r, err)
	}

	// A's peer restarts: isolation holds from its start, before it rejoins, and after.
	if err := a.Restart(ctx); err != nil {
		t.Fatalf("restart %s: %v", a.Name, err)
	}
	cutOff("right after " + a.Name + "'s restart")
	waitLeader(t, ctx, l.Hosts())
	waitPing(t, ctx, multiB, onA["media"])
	cutOff("after " + a.Name + " rejoined")

	// One table owned by weft holds both the guard's and isolation's chains.
	out, err = a.Exec(ctx, "nft", "list", "table", "inet", "weft")
	if err != nil {
		t.Fatalf("nft list table inet weft on %s: %v", a.Name, err)
	}
	var chains []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "chain" {
			chains = append(chains, f[1])
		}
	}
	if !slices.ContainsFunc(chains, func(c string) bool { return strings.HasPrefix(c, "isolate") }) || len(chains) < 4 {
		t.Fatalf("table inet weft on %s has chains %v, want the guard's and isolation's", a.Name, chains)
	}
}
