package chaostest

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

// Network planes (#13 items 2, 5 and 6) on real peers, libcni and the real plugin: media and
// control are created at run time; a container on each of two hosts is attached to default
// (eth0), control (net1) and media (net2), one conflist per network; each plane carries
// pings between the hosts; only eth0's result holds the default route; an unknown network
// is CNI 7 and creates nothing; `network rm media` is refused while attached, naming the
// attachments, and succeeds once every attachment is deleted, on every host.
func TestPlanesAttachPingAndRemove(t *testing.T) {
	l := newMeshLab(t, "wpl", 2)
	ctx := testCtx(t, 3*time.Minute)
	a, b := l.Host(0), l.Host(1)
	ranges := planeRanges
	for _, name := range []string{"control", "media"} {
		if out, err := a.CLI(ctx, "network", "create", name, "--subnet", ranges[name].String()); err != nil {
			t.Fatalf("create %s: %v %s", name, err, out)
		}
	}
	listed := func(want string) func() error {
		return func() error {
			for _, h := range l.Hosts() {
				var nets []router.NetworkInfo
				if err := cliJSON(ctx, h, &nets, "network", "ls"); err != nil {
					return err
				}
				var names []string
				for _, n := range nets {
					names = append(names, n.Name)
				}
				if got := strings.Join(names, ","); got != want {
					return fmt.Errorf("%s lists %q", h.Name, got)
				}
			}
			return nil
		}
	}
	waitFor(t, ctx, 5*time.Second, "both hosts to list control and media", listed("control,default,media"))

	planes := []struct{ ifname, network string }{{"eth0", "default"}, {"net1", "control"}, {"net2", "media"}}
	type attached struct {
		ctr   *lab.Container
		cnis  map[string]*lab.CNI
		addrs map[string]netip.Addr
	}
	attach := func(h *lab.Host) attached {
		at := attached{ctr: mustContainer(t, h), cnis: map[string]*lab.CNI{}, addrs: map[string]netip.Addr{}}
		for _, p := range planes {
			c := planeCNI(t, h, p.network)
			at.cnis[p.network] = c
			res, err := c.Add(ctx, at.ctr.RuntimeConf(p.ifname))
			if err != nil {
				t.Fatalf("ADD %s %s on %s: %v", at.ctr.ID, p.ifname, p.network, err)
			}
			r, err := current.GetResult(res)
			if err != nil {
				t.Fatal(err)
			}
			addr, err := lab.ResultAddress(res)
			if err != nil || !ranges[p.network].Contains(addr.Addr()) {
				t.Fatalf("ADD %s on %s: address %s (%v), want one in %s", p.ifname, p.network, addr, err, ranges[p.network])
			}
			at.addrs[p.network] = addr.Addr()
			var dsts []string
			for _, rt := range r.Routes {
				dsts = append(dsts, rt.Dst.String())
			}
			wantDst := "0.0.0.0/0"
			if p.ifname != "eth0" {
				wantDst = ranges[p.network].String()
			}
			if !slices.Equal(dsts, []string{wantDst}) {
				t.Fatalf("ADD %s on %s: routes %v, want only %s", p.ifname, p.network, dsts, wantDst)
			}
			gw := ranges[p.network].Addr().Next().String()
			if !slices.Equal(r.DNS.Nameservers, []string{gw}) {
				t.Fatalf("ADD %s on %s: nameservers %v, want the network's gateway %s", p.ifname, p.network, r.DNS.Nameservers, gw)
			}
		}
		return at
	}
	onA, onB := attach(a), attach(b)
	for _, p := range planes {
		waitPing(t, ctx, onA.ctr, onB.addrs[p.network])
		waitPing(t, ctx, onB.ctr, onA.addrs[p.network])
		t.Logf("%s: %s on %s and %s on %s reach each other", p.network, onA.addrs[p.network], a.Name, onB.addrs[p.network], b.Name)
	}
	// CHECK of the last plane attached. The datapath does not act on Attachment.Secondary yet
	// (part attachdp of #13): each ADD still sets the container's default route, so until it
	// does, only the interface attached last passes CHECK; after the merge this loop covers
	// every plane.
	for _, p := range planes {
		if err := onA.cnis[p.network].Check(ctx, onA.ctr.RuntimeConf(p.ifname)); err != nil {
			t.Fatalf("CHECK %s on %s: %v", p.ifname, p.network, err)
		}
	}

	// A restarted peer learns the created networks again from the table, with its
	// attachments on them: CHECK passes, and a new ADD on media does not reuse net2's address.
	if err := a.Restart(ctx); err != nil {
		t.Fatalf("restart %s: %v", a.Name, err)
	}
	waitLeader(t, ctx, l.Hosts())
	waitFor(t, ctx, 20*time.Second, "CHECK of net2 after the restart", func() error {
		return onA.cnis["media"].Check(ctx, onA.ctr.RuntimeConf("net2"))
	})
	extra := mustContainer(t, a)
	res, err := onA.cnis["media"].Add(ctx, extra.RuntimeConf("eth0"))
	if err != nil {
		t.Fatalf("ADD on media after the restart: %v", err)
	}
	if got, _ := lab.ResultAddress(res); got.Addr() == onA.addrs["media"] || !ranges["media"].Contains(got.Addr()) {
		t.Fatalf("ADD on media after the restart got %s (net2 of %s holds %s)", got, onA.ctr.ID, onA.addrs["media"])
	}
	if err := onA.cnis["media"].Del(ctx, extra.RuntimeConf("eth0")); err != nil {
		t.Fatal(err)
	}
	for _, p := range planes {
		waitPing(t, ctx, onA.ctr, onB.addrs[p.network])
	}

	// An unknown network: CNI 7 naming it, and nothing created.
	nope := mustCNI(t, a, lab.CNIOptions{Name: "weft-nope", Network: "nope"})
	_, err = nope.Add(ctx, onA.ctr.RuntimeConf("net3"))
	if code, _ := lab.ErrorCode(err); code != types.ErrInvalidNetworkConfig || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("ADD on an unknown network: %v", err)
	}
	if links, _ := onA.ctr.LinkNames(); slices.Contains(links, "net3") {
		t.Fatalf("a refused ADD made net3: %v", links)
	}
	if s := mustStatus(t, ctx, a); len(s.Attachments) != 3 {
		t.Fatalf("%s has %d attachments after a refused ADD, want 3", a.Name, len(s.Attachments))
	}

	// rm media is refused while attached, naming the attachments (this host's by container,
	// the other host's by owner).
	_, err = a.CLI(ctx, "network", "rm", "media")
	if err == nil || !strings.Contains(err.Error(), onA.ctr.ID+"/net2") || !strings.Contains(err.Error(), b.Name) {
		t.Fatalf("rm media while attached: %v, want a refusal naming %s/net2 and %s", err, onA.ctr.ID, b.Name)
	}
	t.Logf("rm media refused: %v", err)

	// GC of media's conflist with nothing valid releases A's net2 only: eth0 and net1, of
	// the same container but other conflists, stay.
	if err := onA.cnis["media"].GC(ctx, []types.GCAttachment{}); err != nil {
		t.Fatalf("GC of media: %v", err)
	}
	s := mustStatus(t, ctx, a)
	var left []string
	for _, at := range s.SortedAttachments() {
		left = append(left, at.IfName)
	}
	if !slices.Equal(left, []string{"eth0", "net1"}) {
		t.Fatalf("after GC of media %s holds %v, want eth0 and net1", a.Name, left)
	}

	// DEL every attachment of control and media, on both hosts: the emptied blocks go back
	// and rm succeeds; every host forgets the networks.
	for _, at := range []attached{onA, onB} {
		for _, p := range planes[1:] {
			if err := at.cnis[p.network].Del(ctx, at.ctr.RuntimeConf(p.ifname)); err != nil {
				t.Fatalf("DEL %s %s: %v", at.ctr.ID, p.ifname, err)
			}
		}
	}
	start := time.Now()
	for _, name := range []string{"media", "control"} {
		waitFor(t, ctx, 30*time.Second, "rm "+name+" after DEL", func() error {
			out, err := b.CLI(ctx, "network", "rm", name)
			if err != nil {
				return fmt.Errorf("%v %s", err, out)
			}
			return nil
		})
	}
	t.Logf("rm of both networks succeeded %s after the last DEL", time.Since(start).Round(time.Millisecond))
	waitFor(t, ctx, 5*time.Second, "both hosts to forget control and media", listed("default"))
	// default keeps working and keeps its blocks.
	waitPing(t, ctx, onA.ctr, onB.addrs["default"])
	if st := ipamOf(t, ctx, a); !strings.Contains(fmt.Sprint(st.Blocks), "default") {
		t.Fatalf("default lost its blocks: %+v", st.Blocks)
	}
}

// planeRanges are the ranges the network-plane tests give their networks.
var planeRanges = map[string]netip.Prefix{
	"default": netip.MustParsePrefix("10.40.0.0/16"),
	"control": netip.MustParsePrefix("10.60.0.0/16"),
	"media":   netip.MustParsePrefix("10.50.0.0/16"),
	"open":    netip.MustParsePrefix("10.70.0.0/16"),
}

// planeCNI is h's conflist for network: the lab's default one for default, else
// "weft-NAME" with the network key, one conflist per network as runtimes and Multus use them.
func planeCNI(t *testing.T, h *lab.Host, network string) *lab.CNI {
	t.Helper()
	if network == "default" {
		return mustCNI(t, h, lab.CNIOptions{})
	}
	return mustCNI(t, h, lab.CNIOptions{Name: "weft-" + network, Network: network})
}
