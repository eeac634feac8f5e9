package router

import (
	"context"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/ipam"
)

func traceFixture() traceInput {
	blk := func(cidr, owner string) ipam.BlockOwnership {
		return ipam.BlockOwnership{Network: "default", CIDR: netip.MustParsePrefix(cidr), Owner: owner}
	}
	return traceInput{
		Self: "a",
		Attachments: []AttachmentStatus{{ContainerID: "c0ffee1234", IfName: "eth0", Network: "default", Name: "web",
			Address: netip.MustParsePrefix("10.40.0.5/16")}},
		Blocks: []ipam.BlockOwnership{blk("10.40.0.0/26", "a"), blk("10.40.0.64/26", "b"), blk("10.40.0.128/26", "c"), blk("10.40.0.192/26", "d"), blk("10.40.1.0/26", "e")},
		Routes: []Route{
			{Peer: "b", Path: []string{"b"}, RTTms: 1.5, SLA: "default", SLAOK: true, Link: "vxlan", Networks: []string{"default"},
				Hops: []Hop{{From: "a", To: "b", RTTms: 1.5, Up: true}}},
			{Peer: "c", Path: []string{"b", "c"}, RTTms: 4, Loss: 0.01, SLA: "gold", SLAOK: false, Reason: "direct link down", Link: "wireguard",
				Networks: []string{"default"}, Hops: []Hop{{From: "a", To: "b", RTTms: 1.5, Up: true}, {From: "b", To: "c", RTTms: 2.5, Loss: 0.01, Up: true}}},
			{Peer: "d", Path: []string{"d"}, RTTms: 7, SLA: "default", SLAOK: true, Estimated: true, Link: "direct"},
		},
		Conns: []Connection{{Peer: "b", Network: "default", Mode: "vxlan", State: plan.StateEstablished},
			{Peer: "c", Network: "default", Mode: "vxlan", State: plan.StateRelayed}},
		Names: map[string][]string{"db": {"10.40.0.70"}},
	}
}

func TestResolveDst(t *testing.T) {
	in := traceFixture()
	for dst, want := range map[string]string{"10.40.0.5": "10.40.0.5", "web": "10.40.0.5", "c0ffee1234": "10.40.0.5",
		"c0ffee": "10.40.0.5", "db": "10.40.0.70", "192.0.2.1": "192.0.2.1"} {
		addr, _, ok := resolveDst(dst, in)
		if !ok || addr.String() != want {
			t.Errorf("resolveDst(%q) = %s, %v; want %s", dst, addr, ok, want)
		}
	}
	for _, dst := range []string{"c0f", "nosuch", ""} { // a short ID prefix could match anyone's
		if addr, _, ok := resolveDst(dst, in); ok {
			t.Errorf("resolveDst(%q) = %s, want no match", dst, addr)
		}
	}
}

func TestBuildTrace(t *testing.T) {
	in := traceFixture()
	tr := func(addr string) Trace { return buildTrace(addr, netip.MustParseAddr(addr), "", in) }

	local := buildTrace("web", netip.MustParseAddr("10.40.0.5"), "c0ffee1234", in)
	if !local.Local || local.Owner != "a" || len(local.Path) != 0 || len(local.Hops) != 0 || !strings.Contains(local.Reason, "bridge") {
		t.Errorf("local container: %+v", local)
	}
	if free := tr("10.40.0.9"); !free.Local || !strings.Contains(free.Reason, "no container") {
		t.Errorf("a free address of this peer: %+v", free)
	}

	direct := tr("10.40.0.70")
	if direct.Owner != "b" || direct.Block != "10.40.0.64/26" || direct.Relayed || direct.Mode != "vxlan" || direct.Figures != FiguresMeasured ||
		len(direct.Hops) != 1 || direct.Hops[0].Figures != FiguresMeasured || direct.Hops[0].Mode != "vxlan" || direct.RTTms != 1.5 {
		t.Errorf("direct: %+v", direct)
	}

	relayed := tr("10.40.0.130")
	if relayed.Owner != "c" || !relayed.Relayed || !slices.Equal(relayed.Path, []string{"b", "c"}) || relayed.SLAOK ||
		relayed.Reason != "direct link down" || relayed.State != plan.StateRelayed || len(relayed.Hops) != 2 {
		t.Fatalf("relayed: %+v", relayed)
	}
	// The first hop is this peer's own link (measured); the relay's onward link is what it gossips.
	if h := relayed.Hops; h[0].Figures != FiguresMeasured || h[1].Figures != FiguresGossiped || h[1].From != "b" || h[1].Loss != 0.01 || h[1].Mode != "" {
		t.Errorf("relayed hops: %+v", relayed.Hops)
	}

	est := tr("10.40.0.200")
	if est.Owner != "d" || est.Figures != FiguresEstimated || len(est.Hops) != 1 || est.Hops[0].Figures != FiguresEstimated || est.Hops[0].RTTms != 7 || est.Mode != "direct" {
		t.Errorf("estimated: %+v", est)
	}

	if noRoute := tr("10.40.1.3"); noRoute.Owner != "e" || len(noRoute.Path) != 0 || !strings.Contains(noRoute.Reason, "no path") {
		t.Errorf("an owner without a chosen path: %+v", noRoute)
	}
	if outside := tr("192.0.2.1"); outside.Owner != "" || !strings.Contains(outside.Reason, "no peer owns") || outside.Path == nil || outside.Hops == nil {
		t.Errorf("outside the mesh: %+v", outside)
	}
}

// GET /v1/trace on a real peer: a local container by name and by address; bad dst refused.
func TestTraceAPI(t *testing.T) {
	p := startPeer(t, t.TempDir())
	netns := newContainer(t)
	res, err := p.client.Add(context.Background(), addReq("trace1", netns))
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParsePrefix(res.Address).Addr()
	for _, dst := range []string{"trace1", addr.String()} {
		var tr Trace
		if err := p.client.Get(context.Background(), "/v1/trace?dst="+dst, &tr); err != nil {
			t.Fatal(err)
		}
		if !tr.Local || tr.Owner != "p1" || tr.Address != addr.String() || tr.Container != "trace1" || tr.Network != "default" {
			t.Errorf("trace %s: %+v", dst, tr)
		}
	}
	for dst, status := range map[string]int{"": http.StatusBadRequest, "nosuch": http.StatusNotFound} {
		var tr Trace
		err := p.client.Get(context.Background(), "/v1/trace?dst="+dst, &tr)
		if err == nil || !strings.Contains(err.Error(), "trace") {
			t.Errorf("trace %q = %v, want a %d naming trace", dst, err, status)
		}
	}
	var res2 []PerfResult
	if err := p.client.Get(context.Background(), "/v1/perf", &res2); err != nil || res2 == nil || len(res2) != 0 {
		t.Errorf("GET /v1/perf on a fresh peer = %v, %v; want an empty list", res2, err)
	}
	var pr PerfResult
	err = p.client.Post(context.Background(), "/v1/perf", PerfRequest{Peer: "p1"}, &pr)
	if err == nil || !strings.Contains(err.Error(), "this peer") {
		t.Errorf("perf to itself = %v, want refused", err)
	}
	err = p.client.Post(context.Background(), "/v1/perf", PerfRequest{Peer: "ghost"}, &pr)
	if err == nil || !strings.Contains(err.Error(), "not a live member") {
		t.Errorf("perf to an unknown peer = %v, want refused", err)
	}
}
