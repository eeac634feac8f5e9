package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/datapath/shape"
	"github.com/weftnet/weft/ipam"
)

func TestEffectiveRatesCapabilityOverridesPerDirection(t *testing.T) {
	n := ipam.Network{Name: "n", IngressRate: 10e6, IngressBurst: 1e5, EgressRate: 20e6}
	for _, tc := range []struct {
		name string
		bw   *cni.Bandwidth
		want shape.Rates
	}{
		{"network defaults", nil, shape.Rates{IngressRate: 10e6, IngressBurst: 1e5, EgressRate: 20e6}},
		{"ingress overridden with its burst", &cni.Bandwidth{IngressRate: 5e6}, shape.Rates{IngressRate: 5e6, EgressRate: 20e6}},
		{"both overridden", &cni.Bandwidth{IngressRate: 1e6, IngressBurst: 8e4, EgressRate: 2e6, EgressBurst: 9e4},
			shape.Rates{IngressRate: 1e6, IngressBurst: 8e4, EgressRate: 2e6, EgressBurst: 9e4}},
		{"empty capability keeps defaults", &cni.Bandwidth{}, shape.Rates{IngressRate: 10e6, IngressBurst: 1e5, EgressRate: 20e6}},
	} {
		if got := effectiveRates(n, tc.bw); got != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

func TestShapePlanRefusesWithCNIErrorNamingTheSource(t *testing.T) {
	for _, tc := range []struct {
		name string
		n    ipam.Network
		bw   *cni.Bandwidth
		want string
	}{
		{"burst without rate", ipam.Network{Name: "n"}, &cni.Bandwidth{EgressBurst: 1e5}, "runtimeConfig.bandwidth over network n"},
		{"rate below minimum", ipam.Network{Name: "n"}, &cni.Bandwidth{IngressRate: 10}, "below the minimum"},
		{"network default below minimum", ipam.Network{Name: "slow", EgressRate: 10}, nil, "network slow"},
		{"sriov", ipam.Network{Name: "vf", Mode: ipam.ModeSRIOV}, &cni.Bandwidth{IngressRate: 1e6}, "SR-IOV"},
	} {
		_, err := shapePlan(tc.n, tc.bw, 1500)
		var ce *cni.Error
		if !errors.As(err, &ce) || ce.Code != 7 || !strings.Contains(ce.Message, tc.want) {
			t.Errorf("%s: %v, want CNI 7 naming %q", tc.name, err, tc.want)
		}
	}
	if p, err := shapePlan(ipam.Network{Name: "n"}, nil, 1500); err != nil || p.Ingress != nil || p.Egress != nil {
		t.Errorf("unlimited network: %+v %v, want an empty plan", p, err)
	}
}

// fakeShaper keeps states in memory; the kernel side is tested in datapath/shape.
type fakeShaper struct {
	states map[string]shape.State
}

func (f *fakeShaper) Apply(hostIf string, p shape.Plan) error {
	st := shape.State{}
	if p.Ingress != nil {
		st.Ingress = &shape.DirState{RateBits: p.Ingress.RateBytes * 8}
	}
	if p.Egress != nil {
		st.Egress = &shape.DirState{RateBits: p.Egress.RateBytes * 8}
	}
	f.states[hostIf] = st
	return nil
}

func (f *fakeShaper) Remove(hostIf string) error { delete(f.states, hostIf); return nil }

func (f *fakeShaper) Read(hostIf string) (shape.State, error) {
	st, ok := f.states[hostIf]
	if !ok {
		return shape.State{}, shape.ErrNoInterface
	}
	return st, nil
}

func (f *fakeShaper) Check(string, shape.Plan) error { return shape.ErrMismatch }

// The drop counters never go down when a container goes: its last counts are kept.
func TestShapingCountersSurviveRemoval(t *testing.T) {
	f := &fakeShaper{states: map[string]shape.State{}}
	ifs := []string{"weft1", "weft2"}
	reg := prometheus.NewRegistry()
	s := newShaping(f, reg, slog.New(slog.DiscardHandler), func() []string { return ifs })
	p, err := shape.PlanFor(shape.Rates{IngressRate: 1e6, EgressRate: 1e6}, 1500)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		if err := s.apply(i, p); err != nil {
			t.Fatal(err)
		}
	}
	f.states["weft1"].Ingress.Drops = 5
	f.states["weft2"].Ingress.Drops = 7
	f.states["weft2"].Egress.Drops = 1
	want := func(ingress, egress, shaped string) {
		t.Helper()
		exp := `
# HELP weft_shape_drops_total Packets dropped by weft's per-container rate limits (the tbf queues), by the container's direction.
# TYPE weft_shape_drops_total counter
weft_shape_drops_total{direction="egress"} ` + egress + `
weft_shape_drops_total{direction="ingress"} ` + ingress + `
# HELP weft_shape_attachments Attachments of this peer with a rate limit, by the container's direction.
# TYPE weft_shape_attachments gauge
weft_shape_attachments{direction="egress"} ` + shaped + `
weft_shape_attachments{direction="ingress"} ` + shaped + `
`
		if err := testutil.CollectAndCompare(s, strings.NewReader(exp), "weft_shape_drops_total", "weft_shape_attachments"); err != nil {
			t.Error(err)
		}
	}
	want("12", "1", "2")
	if err := s.remove("weft2"); err != nil {
		t.Fatal(err)
	}
	ifs = ifs[:1]
	want("12", "1", "1")
	if err := s.check("weft1", p); !errors.As(err, new(*cni.Error)) {
		t.Fatalf("check: %v, want a CNI error", err)
	}
}

// wshContainer makes a network namespace standing in for a container (this part's prefix).
func wshContainer(t *testing.T, n int) string {
	t.Helper()
	name := fmt.Sprintf("wsh-%d-c%d", os.Getpid(), n)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

// ADD shapes the host veth before it returns (the network's defaults under the container's
// capability), CHECK compares, `status rates` shows it, DEL leaves no ifb or qdisc, and bad
// rates are refused with CNI 7 leaving nothing attached.
func TestAttachShapesAndDetachUnshapes(t *testing.T) {
	p := startPeer(t, t.TempDir())
	h := p.apiHandler()
	ctx := context.Background()
	waitUntil(t, "the cluster to define its networks", 10*time.Second, func() error {
		if len(p.cluster.Networks()) == 0 {
			return fmt.Errorf("none")
		}
		return nil
	})
	if code, msg := apiCall(t, h, "POST", "/v1/networks", `{"name":"capped","subnet":"10.51.0.0/16","ingress_rate":10000000,"egress_rate":20000000}`, nil); code != 200 {
		t.Fatalf("create capped: %d %s", code, msg)
	}
	netns := wshContainer(t, 1)
	req := planeReq("s1", "eth0", netns, "capped")
	req.Bandwidth = &cni.Bandwidth{EgressRate: 5e6, EgressBurst: 1 << 31} // as Kubernetes sends it
	res, err := p.client.Add(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	sh := shape.New(nil)
	st, err := sh.Read(res.HostIfName)
	if err != nil || st.Ingress == nil || st.Ingress.RateBits != 10e6 || st.Egress == nil || st.Egress.RateBits != 5e6 {
		t.Fatalf("after ADD: %+v %+v %v, want ingress 10 Mbit/s (network) and egress 5 Mbit/s (capability)", st.Ingress, st.Egress, err)
	}
	if st.Egress.BurstBits > 8*uint64(st.Egress.LimitBytes)+64 {
		t.Fatalf("a 2^31-bit burst was not clamped: %d bits", st.Egress.BurstBits)
	}
	if _, err := p.client.Add(ctx, req); err != nil { // idempotent
		t.Fatal(err)
	}
	if _, err := p.client.Check(ctx, req); err != nil {
		t.Fatalf("CHECK with the ADD's rates: %v", err)
	}
	other := req
	other.Bandwidth = &cni.Bandwidth{EgressRate: 7e6}
	var ce *cni.Error
	if _, err := p.client.Check(ctx, other); !errors.As(err, &ce) || ce.Code != cni.CodeCheckFailed {
		t.Fatalf("CHECK with other rates: %v, want code %d", err, cni.CodeCheckFailed)
	}
	var rates []RateStatus
	if code, msg := apiCall(t, h, "GET", "/v1/rates", "", &rates); code != 200 || len(rates) != 1 || rates[0].Egress == nil || rates[0].Egress.RateBits != 5e6 {
		t.Fatalf("/v1/rates: %d %s %+v", code, msg, rates)
	}

	bad := planeReq("s2", "eth0", wshContainer(t, 2), "capped")
	bad.Bandwidth = &cni.Bandwidth{IngressBurst: 1000}
	if _, err := p.client.Add(ctx, bad); !errors.As(err, &ce) || ce.Code != 7 || !strings.Contains(ce.Message, "runtimeConfig.bandwidth") {
		t.Fatalf("ADD with a burst and no rate: %v, want CNI 7 naming runtimeConfig.bandwidth", err)
	}
	if _, ok := p.alloc.Get(ipam.Key{ContainerID: "s2", IfName: "eth0"}); ok {
		t.Fatal("a refused ADD left an attachment")
	}

	if err := p.client.Del(ctx, req); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(shape.IfbName(res.HostIfName)); err == nil {
		t.Fatal("DEL left the ifb")
	}
	links, _ := netlink.LinkList()
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, shape.IfbPrefix) {
			t.Fatalf("DEL left ifb %s", l.Attrs().Name)
		}
	}
	if err := p.client.Del(ctx, req); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
}
