package router

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/identity"
)

// The pool's report becomes what metadata carries: sorted, counts clamped (at 256, free at
// the total, free DPDK at the free ones), and entries metadata would refuse left out with
// the reason.
func TestSRIOVAnnouncement(t *testing.T) {
	in := []mesh.PFCapacity{
		{PF: "ens2f0", Free: 2, Total: 4},
		{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1},
		{PF: "big0", Free: 300, Total: 512, FreeDPDK: 10},
		{PF: "bad name", Free: 0, Total: 1},
		{PF: "ens3f0", Free: 5, Total: 4, FreeDPDK: 6},
		{PF: "ens4f0", Free: -1, Total: -2, FreeDPDK: -3},
		{PF: "ens1f0", Free: 0, Total: 4},
	}
	got, dropped := sriovAnnouncement(in)
	want := []mesh.PFCapacity{
		{PF: "big0", Free: 256, Total: 256, FreeDPDK: 10},
		{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1},
		{PF: "ens2f0", Free: 2, Total: 4},
		{PF: "ens3f0", Free: 4, Total: 4, FreeDPDK: 4},
		{PF: "ens4f0"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("announced %+v, want %+v", got, want)
	}
	joined := strings.Join(dropped, "; ")
	for _, w := range []string{`"bad name"`, "ens1f0 reported twice"} {
		if !strings.Contains(joined, w) {
			t.Errorf("dropped %q does not say %q", joined, w)
		}
	}
	if len(dropped) != 2 {
		t.Errorf("dropped %d entries, want 2: %q", len(dropped), dropped)
	}
	if got, dropped := sriovAnnouncement(nil); got != nil || dropped != nil {
		t.Errorf("no PFs: %v %v", got, dropped)
	}
}

// poolCapacity has the layout of the VF pool's router.SRIOVCapacity (on its own branch):
// capacityFrom takes a source of it as it is.
type poolCapacity struct {
	PF       string
	Free     int
	Total    int
	FreeDPDK int
}

func TestCapacityFromAdaptsThePoolsType(t *testing.T) {
	src := capacityFrom(func() []poolCapacity { return []poolCapacity{{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1}} })
	if got := src(); !reflect.DeepEqual(got, []mesh.PFCapacity{{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1}}) {
		t.Fatalf("adapted %+v", got)
	}
}

// Metadata with many trusted subnets has less room than eight PFs need: the PFs that do not
// fit are left out (and named), the rest announced.
func TestFitAnnouncementDropsWhatDoesNotFit(t *testing.T) {
	md := mesh.Metadata{Name: strings.Repeat("n", 64), Underlay: netip.MustParseAddr("2001:db8::1"),
		Version: strings.Repeat("v", 64), ClusterID: strings.Repeat("c", 32), PublicKey: identity.Generate().Public()}
	for i := range 12 {
		md.TrustedSubnets = append(md.TrustedSubnets, netip.MustParsePrefix(fmt.Sprintf("2001:db8:%x::/48", i)))
	}
	var pfs []mesh.PFCapacity
	for i := range 8 {
		pfs = append(pfs, mesh.PFCapacity{PF: fmt.Sprintf("enp%ds0f0np0abc", i), Free: 1, Total: 2})
	}
	fit, dropped := fitAnnouncement(md, pfs)
	if len(fit) == 0 || len(fit) == len(pfs) {
		t.Fatalf("%d of %d PFs fit; the test wants some to fit and some not", len(fit), len(pfs))
	}
	md.SRIOV = fit
	if _, err := md.Encode(); err != nil {
		t.Fatalf("what fit does not encode: %v", err)
	}
	if len(fit)+len(dropped) != len(pfs) || !strings.Contains(dropped[0], pfs[len(fit)].PF) {
		t.Fatalf("fit %d, dropped %q", len(fit), dropped)
	}
	md.SRIOV = nil
	if fit, dropped := fitAnnouncement(md, pfs[:1]); len(fit) != 1 || dropped != nil {
		t.Fatalf("one PF has room: fit %v dropped %v", fit, dropped)
	}
}

func TestCapacityFor(t *testing.T) {
	peer := func(name string, state mesh.State, pfs ...mesh.PFCapacity) mesh.Peer {
		return mesh.Peer{Name: name, State: state, Meta: mesh.Metadata{Name: name, Underlay: netip.MustParseAddr("192.0.2.1"), SRIOV: pfs}}
	}
	peers := []mesh.Peer{
		peer("a", mesh.StateAlive, mesh.PFCapacity{PF: "ens1f0", Free: 2, Total: 4, FreeDPDK: 2}),
		peer("b", mesh.StateAlive, mesh.PFCapacity{PF: "ens1f1", Free: 4, Total: 4}, mesh.PFCapacity{PF: "ens1f0", Free: 3, Total: 8, FreeDPDK: 1}),
		peer("c", mesh.StateAlive, mesh.PFCapacity{PF: "ens1f0", Free: 0, Total: 4}),
		peer("d", mesh.StateSuspect, mesh.PFCapacity{PF: "ens1f0", Free: 4, Total: 4}),
		peer("e", mesh.StateAlive),
		peer("f", mesh.StateDead, mesh.PFCapacity{PF: "ens1f0", Free: 4, Total: 4}),
		peer("g", mesh.StateAlive, mesh.PFCapacity{PF: "ens1f0", Free: 3, Total: 4}),
	}
	rows := func(c Capacity) string {
		var s []string
		for _, p := range c.Peers {
			s = append(s, fmt.Sprintf("%s:%d/%d", p.Name, p.Free, p.Total))
		}
		return strings.Join(s, " ")
	}
	for _, tt := range []struct {
		dpdk string
		want string
	}{
		{"", "b:3/8 g:3/4 a:2/4"}, // auto: either kind; ties by name
		{ipam.DPDKAuto, "b:3/8 g:3/4 a:2/4"},
		{ipam.DPDKOn, "a:2/4 b:1/8"},
		{ipam.DPDKOff, "g:3/4 b:2/8"},
	} {
		n := ipam.Network{Name: "fast", Mode: ipam.ModeSRIOV, PF: "ens1f0", DPDK: tt.dpdk}
		c := capacityFor(n, peers)
		if got := rows(c); got != tt.want {
			t.Errorf("dpdk %q: %s, want %s", tt.dpdk, got, tt.want)
		}
		if c.Mode != "sriov" || c.PF != "ens1f0" || c.DPDK == "" || c.Network != "fast" {
			t.Errorf("dpdk %q: header %+v", tt.dpdk, c)
		}
	}
	// No peer serves the PF: an empty list, not null.
	c := capacityFor(ipam.Network{Name: "x", Mode: ipam.ModeSRIOV, PF: "ens9"}, peers)
	if c.Peers == nil || len(c.Peers) != 0 {
		t.Errorf("no PF anywhere: %+v", c.Peers)
	}
	// A bridge network fits on every alive peer.
	c = capacityFor(ipam.Network{Name: "default"}, peers)
	if got := rows(c); got != "a:0/0 b:0/0 c:0/0 e:0/0 g:0/0" || c.Mode != "bridge" || c.PF != "" {
		t.Errorf("bridge: %s %+v", got, c)
	}
}

// capTestMesh starts a mesh on loopback with production gossip timing.
func capTestMesh(t *testing.T, name string, seeds ...string) *mesh.Mesh {
	t.Helper()
	cfg := mesh.DefaultConfig()
	cfg.Name = name
	cfg.BindAddr, cfg.BindPort = netip.MustParseAddr("127.0.0.1"), 0
	cfg.Identity = identity.Generate()
	cfg.Registerer = prometheus.NewRegistry()
	cfg.Logger = slog.New(slog.DiscardHandler)
	cfg.Metadata = mesh.Metadata{Name: name, Underlay: netip.MustParseAddr("127.0.0.1")}
	cfg.Seeds = seeds
	m, err := mesh.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// fakePool is a capacity source whose counts a test changes.
type fakePool struct {
	mu  sync.Mutex
	pfs []mesh.PFCapacity
}

func (f *fakePool) set(pfs ...mesh.PFCapacity) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pfs = pfs
}

func (f *fakePool) capacity() []mesh.PFCapacity {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]mesh.PFCapacity(nil), f.pfs...)
}

// countingMesh records when metadata was updated.
type countingMesh struct {
	*mesh.Mesh
	mu      sync.Mutex
	updates []time.Time
}

func (c *countingMesh) UpdateMetadata(fn func(*mesh.Metadata)) error {
	c.mu.Lock()
	c.updates = append(c.updates, time.Now())
	c.mu.Unlock()
	return c.Mesh.UpdateMetadata(fn)
}

func (c *countingMesh) times() []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Time(nil), c.updates...)
}

// A change of the pool's counts reaches another peer within 2s when published once a
// membership tick, as the router does; an unchanged pool is not re-gossiped.
func TestCapacityChangeSeenByAnotherPeer(t *testing.T) {
	a := &countingMesh{Mesh: capTestMesh(t, "cap-a")}
	b := capTestMesh(t, "cap-b", a.Local().Addr.String())
	pool := &fakePool{}
	pool.set(mesh.PFCapacity{PF: "ens1f0", Free: 4, Total: 4, FreeDPDK: 1})
	log := slog.New(slog.DiscardHandler)

	// The membership loop's tick, publishing as membershipLight does.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(membershipTick)
		defer tick.Stop()
		for {
			publishCapacity(a, pool.capacity, log)
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })

	seen := func(free int) func() error {
		return func() error {
			pr, ok := b.Peer("cap-a")
			if !ok {
				return errors.New("b does not know a yet")
			}
			if len(pr.Meta.SRIOV) != 1 || pr.Meta.SRIOV[0].Free != free {
				return fmt.Errorf("b sees a's SR-IOV as %+v, want %d free", pr.Meta.SRIOV, free)
			}
			return nil
		}
	}
	if err := pollFor(10*time.Second, seen(4)); err != nil {
		t.Fatal(err)
	}
	// One container takes a VF, then another within the same second: coalesced.
	start := time.Now()
	pool.set(mesh.PFCapacity{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1})
	pool.set(mesh.PFCapacity{PF: "ens1f0", Free: 2, Total: 4, FreeDPDK: 1})
	if err := pollFor(2*time.Second, seen(2)); err != nil {
		t.Fatalf("not seen within 2s: %v", err)
	}
	t.Logf("a count change was seen by the other peer after %v", time.Since(start).Round(time.Millisecond))
	// At most one update a tick, however quickly the counts change.
	updates := a.times()
	if len(updates) < 2 || len(updates) > 3 {
		t.Errorf("%d metadata updates for the first announcement and a change, want 2 (3 if a tick fell between the changes)", len(updates))
	}
	for i := 1; i < len(updates); i++ {
		if gap := updates[i].Sub(updates[i-1]); gap < membershipTick*9/10 {
			t.Errorf("updates %d and %d only %v apart, want at most one a second", i-1, i, gap)
		}
	}
	// Nothing changed: nothing more is gossiped.
	if publishCapacity(a, pool.capacity, log) {
		t.Error("published unchanged counts")
	}
	// All VFs gone: the field empties.
	pool.set()
	if err := pollFor(2*time.Second, func() error {
		if pr, _ := b.Peer("cap-a"); len(pr.Meta.SRIOV) != 0 {
			return fmt.Errorf("b still sees %+v", pr.Meta.SRIOV)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// pollFor retries cond every 10ms until it returns nil or d passes.
func pollFor(d time.Duration, cond func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
}

// A peer wired to a pool announces it: `status peers` shows it and /v1/capacity answers for
// an SR-IOV network, a bridge network and a network that does not exist.
func TestCapacityAPI(t *testing.T) {
	pool := &fakePool{}
	pool.set(mesh.PFCapacity{PF: "ens1f0", Free: 3, Total: 4, FreeDPDK: 1})
	p := startWiredPeer(t, t.TempDir(), nil, func(p *Peer) { p.sriovSource = pool.capacity })
	h := p.apiHandler()
	if err := pollFor(10*time.Second, func() error {
		if len(p.cluster.Networks()) == 0 {
			return errors.New("the cluster defines no network yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if code, msg := apiCall(t, h, "POST", "/v1/networks", `{"name":"fast","subnet":"10.77.0.0/16","mode":"sriov","pf":"ens1f0","dpdk":"off"}`, nil); code != 200 {
		t.Fatalf("create fast: %d %s", code, msg)
	}
	var c Capacity
	if err := pollFor(5*time.Second, func() error {
		if code, msg := apiCall(t, h, "GET", "/v1/capacity?network=fast", "", &c); code != 200 {
			return fmt.Errorf("HTTP %d %s", code, msg)
		}
		if len(c.Peers) != 1 || c.Peers[0].Name != "p1" || c.Peers[0].Free != 2 || c.Peers[0].Total != 4 {
			return fmt.Errorf("capacity %+v, want p1 with 2 free netdev VFs of 4", c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if c.Mode != "sriov" || c.PF != "ens1f0" || c.DPDK != "off" {
		t.Errorf("header %+v", c)
	}
	var peers []PeerStatus
	if code, msg := apiCall(t, h, "GET", "/v1/peers", "", &peers); code != 200 || len(peers) != 1 ||
		!reflect.DeepEqual(peers[0].SRIOV, []PFStatus{{PF: "ens1f0", Free: 3, FreeDPDK: 1, Total: 4}}) {
		t.Fatalf("peers: %d %s %+v", code, msg, peers)
	}
	// The pool runs out of netdev VFs: the peer no longer fits.
	pool.set(mesh.PFCapacity{PF: "ens1f0", Free: 1, Total: 4, FreeDPDK: 1})
	if err := pollFor(3*time.Second, func() error {
		if apiCall(t, h, "GET", "/v1/capacity?network=fast", "", &c); len(c.Peers) != 0 {
			return fmt.Errorf("still fits: %+v", c.Peers)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if code, msg := apiCall(t, h, "GET", "/v1/capacity?network=default", "", &c); code != 200 || c.Mode != "bridge" || len(c.Peers) != 1 {
		t.Fatalf("default: %d %s %+v", code, msg, c)
	}
	if code, msg := apiCall(t, h, "GET", "/v1/capacity?network=nope", "", nil); code != 404 || !strings.Contains(msg, `"nope"`) {
		t.Fatalf("unknown network: %d %q", code, msg)
	}
	if code, msg := apiCall(t, h, "GET", "/v1/capacity", "", nil); code != 400 || !strings.Contains(msg, "network=NAME") {
		t.Fatalf("no network: %d %q", code, msg)
	}
	if code, _ := apiCall(t, h, "POST", "/v1/capacity?network=fast", "", nil); code != 405 {
		t.Fatalf("POST: %d", code)
	}
}
