package sriov

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	bolt "go.etcd.io/bbolt"
)

// testPool opens a pool on a fresh database in a temporary directory; reopen closes it and
// opens a new pool on the same file, as a restarted peer would.
type testPool struct {
	t    *testing.T
	path string
	db   *bolt.DB
	reg  *prometheus.Registry
	*Pool
}

func newTestPool(t *testing.T) *testPool {
	t.Helper()
	tp := &testPool{t: t, path: filepath.Join(t.TempDir(), "weft.db")}
	tp.open()
	t.Cleanup(func() { tp.db.Close() })
	return tp
}

func (tp *testPool) open() {
	tp.t.Helper()
	db, err := bolt.Open(tp.path, 0o600, nil)
	if err != nil {
		tp.t.Fatalf("open bbolt: %v", err)
	}
	tp.db, tp.reg = db, prometheus.NewRegistry()
	p, err := NewPool(PoolConfig{DB: db, Registry: tp.reg})
	if err != nil {
		tp.t.Fatalf("NewPool: %v", err)
	}
	tp.Pool = p
}

func (tp *testPool) reopen() {
	tp.t.Helper()
	if err := tp.db.Close(); err != nil {
		tp.t.Fatalf("close bbolt: %v", err)
	}
	tp.open()
}

func netVF(pf string, i int) VF {
	return VF{PF: pf, Index: i, PCI: fmt.Sprintf("0000:03:%02x.%d", 2+i/8, i%8), Driver: "iavf",
		Netdev: fmt.Sprintf("%sv%d", pf, i)}
}

func dpdkVF(pf string, i int) VF {
	v := netVF(pf, i)
	v.Driver, v.Netdev, v.IOMMUGroup = "vfio-pci", "", fmt.Sprint(40+i)
	return v
}

func owner(id string) Owner {
	return Owner{ContainerID: id, IfName: "eth1", CNINetwork: "fast", NetNS: "/run/netns/" + id}
}

func mustSync(t *testing.T, p *Pool, pf string, vfs ...VF) []Record {
	t.Helper()
	back, err := p.Sync(pf, vfs)
	if err != nil {
		t.Fatalf("Sync(%s): %v", pf, err)
	}
	return back
}

func mustReserve(t *testing.T, p *Pool, o Owner, pf string, dpdk bool) VF {
	t.Helper()
	v, err := p.Reserve(o, pf, dpdk)
	if err != nil {
		t.Fatalf("Reserve(%s, %s, %t): %v", o, pf, dpdk, err)
	}
	return v
}

func vfsGauge(t *testing.T, reg *prometheus.Registry, pf string, s State) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "weft_sriov_vfs" {
			continue
		}
		for _, m := range mf.GetMetric() {
			var gotPF, gotState string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "pf":
					gotPF = l.GetValue()
				case "state":
					gotState = l.GetValue()
				}
			}
			if gotPF == pf && gotState == string(s) {
				return m.GetGauge().GetValue()
			}
		}
	}
	return -1
}

func TestPoolReserveLifecycle(t *testing.T) {
	tp := newTestPool(t)
	mustSync(t, tp.Pool, "ens1f0", netVF("ens1f0", 1), netVF("ens1f0", 0), dpdkVF("ens1f0", 2))
	mustSync(t, tp.Pool, "ens1f1", netVF("ens1f1", 8))
	if n := tp.FreeCount("ens1f0"); n != 3 {
		t.Fatalf("FreeCount(ens1f0) = %d, want 3", n)
	}

	a := owner("ctr-a")
	v := mustReserve(t, tp.Pool, a, "ens1f0", false)
	if v.Index != 0 || v.PF != "ens1f0" {
		t.Fatalf("Reserve picked %+v, want index 0 of ens1f0", v)
	}
	// Idempotent ADD: the same owner gets the same VF, nothing more is taken.
	if again := mustReserve(t, tp.Pool, a, "ens1f0", false); again != v {
		t.Fatalf("repeated Reserve = %s, want %s", again.PCI, v.PCI)
	}
	if n := tp.FreeCount("ens1f0"); n != 2 {
		t.Fatalf("FreeCount after reserve = %d, want 2", n)
	}
	dv := mustReserve(t, tp.Pool, owner("ctr-d"), "ens1f0", true)
	if free, dpdk := tp.FreeCounts("ens1f0"); free != 1 || dpdk != 0 {
		t.Fatalf("FreeCounts with the dpdk vf reserved = %d, %d; want 1, 0", free, dpdk)
	}
	if err := tp.Release(dv.PCI, owner("ctr-d")); err != nil {
		t.Fatal(err)
	}
	if free, dpdk := tp.FreeCounts("ens1f0"); free != 2 || dpdk != 1 {
		t.Fatalf("FreeCounts after release = %d, %d; want 2, 1", free, dpdk)
	}
	// The same owner asking for another PF or kind is a conflict, not a second VF.
	if _, err := tp.Reserve(a, "ens1f1", false); !errors.Is(err, ErrOwnerConflict) {
		t.Fatalf("Reserve on another pf = %v, want ErrOwnerConflict", err)
	}

	orig := NetdevState{Name: "ens1f0v0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, MTU: 1500, LinkState: "auto"}
	if err := tp.SaveState(v.PCI, orig); err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	// A second save (a repeated ADD after changes) must not overwrite the original.
	changed := orig
	changed.Name, changed.MTU = "eth1", 9000
	if err := tp.SaveState(v.PCI, changed); err != nil {
		t.Fatalf("second SaveState: %v", err)
	}
	r, ok := tp.Lookup(a)
	if !ok || r.State != StateReserved || r.Saved == nil || r.Saved.Name != "ens1f0v0" || r.Saved.MTU != 1500 {
		t.Fatalf("Lookup after SaveState = %+v, %t; want reserved with the first state", r, ok)
	}
	// The returned record is a copy: changing it changes nothing in the pool.
	r.Saved.MAC[0] = 0xff
	if r2, _ := tp.Lookup(a); r2.Saved.MAC[0] != 2 {
		t.Fatalf("Lookup shares the pool's MAC slice")
	}

	if err := tp.Attached(v.PCI); err != nil {
		t.Fatalf("Attached: %v", err)
	}
	if err := tp.Attached(v.PCI); err != nil {
		t.Fatalf("repeated Attached: %v", err)
	}
	if err := tp.SaveState(v.PCI, changed); !errors.Is(err, ErrWrongState) {
		t.Fatalf("SaveState on attached = %v, want ErrWrongState", err)
	}
	if got := vfsGauge(t, tp.reg, "ens1f0", StateAttached); got != 1 {
		t.Fatalf("weft_sriov_vfs{ens1f0,attached} = %v, want 1", got)
	}
	if got := vfsGauge(t, tp.reg, "ens1f0", StateFree); got != 2 {
		t.Fatalf("weft_sriov_vfs{ens1f0,free} = %v, want 2", got)
	}
	if owned := tp.Owned(); len(owned) != 1 || owned[0].VF.PCI != v.PCI {
		t.Fatalf("Owned = %+v, want only %s", owned, v.PCI)
	}

	// DPDK asks get the userspace-bound VF only.
	d := mustReserve(t, tp.Pool, owner("ctr-d"), "ens1f0", true)
	if !d.DPDK() || d.Index != 2 {
		t.Fatalf("dpdk Reserve = %+v, want the vfio-pci VF", d)
	}
	if _, err := tp.Reserve(owner("ctr-e"), "ens1f0", true); !errors.Is(err, ErrNoFreeVF) {
		t.Fatalf("second dpdk Reserve = %v, want ErrNoFreeVF", err)
	}
	if got := testutil.ToFloat64(tp.refused.WithLabelValues("no_free_vf")); got != 1 {
		t.Fatalf("refused{no_free_vf} = %v, want 1", got)
	}

	if err := tp.Release(v.PCI, a); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if _, ok := tp.Lookup(a); ok {
		t.Fatalf("Lookup finds the owner after Release")
	}
	if n := tp.FreeCount("ens1f0"); n != 2 {
		t.Fatalf("FreeCount after release = %d, want 2", n)
	}
}

func TestPoolBadInput(t *testing.T) {
	tp := newTestPool(t)
	mustSync(t, tp.Pool, "ens1f0", netVF("ens1f0", 0))
	for _, o := range []Owner{{}, {ContainerID: "c"}, {IfName: "eth1"}} {
		if _, err := tp.Reserve(o, "ens1f0", false); !errors.Is(err, ErrBadOwner) {
			t.Fatalf("Reserve(%+v) = %v, want ErrBadOwner", o, err)
		}
	}
	if got := testutil.ToFloat64(tp.refused.WithLabelValues("bad_owner")); got != 3 {
		t.Fatalf("refused{bad_owner} = %v, want 3", got)
	}
	if _, err := tp.Reserve(owner("c"), "nope0", false); !errors.Is(err, ErrNoFreeVF) {
		t.Fatalf("Reserve on unknown pf = %v, want ErrNoFreeVF", err)
	}
	bad := [][]VF{
		{netVF("ens1f1", 1)},                          // another PF
		{{PF: "ens1f0", PCI: "03:02.1"}},              // short PCI address
		{netVF("ens1f0", 0), netVF("ens1f0", 0)},      // twice
		{netVF("ens1f0", 1), {PF: "ens1f0", PCI: ""}}, // one bad entry refuses all
	}
	for i, vfs := range bad {
		if _, err := tp.Sync("ens1f0", vfs); !errors.Is(err, ErrBadVF) {
			t.Fatalf("Sync bad #%d = %v, want ErrBadVF", i, err)
		}
	}
	if _, err := tp.Sync("", nil); !errors.Is(err, ErrBadVF) {
		t.Fatalf("Sync with empty pf = %v, want ErrBadVF", err)
	}
	// Nothing changed: still exactly VF 0, free.
	if n := tp.FreeCount("ens1f0"); n != 1 {
		t.Fatalf("FreeCount after refused syncs = %d, want 1", n)
	}
	for _, err := range []error{
		tp.SaveState("0000:09:00.0", NetdevState{}), tp.Attached("0000:09:00.0"),
		tp.Release("0000:09:00.0", owner("c")), tp.Quarantine("0000:09:00.0", owner("c")),
		tp.Found("0000:09:00.0"),
	} {
		if !errors.Is(err, ErrUnknownVF) {
			t.Fatalf("operation on unknown vf = %v, want ErrUnknownVF", err)
		}
	}
	if err := tp.Attached(netVF("ens1f0", 0).PCI); !errors.Is(err, ErrWrongState) {
		t.Fatalf("Attached on a free vf = %v, want ErrWrongState", err)
	}
}

func TestPoolUnusableVFsNotHandedOut(t *testing.T) {
	tp := newTestPool(t)
	unbound := netVF("ens1f0", 0)
	unbound.Driver, unbound.Netdev = "", ""
	lost := netVF("ens1f0", 1) // netdev driver but no netdev in the host: lost somewhere
	lost.Netdev = ""
	mustSync(t, tp.Pool, "ens1f0", unbound, lost)
	if n := tp.FreeCount("ens1f0"); n != 0 {
		t.Fatalf("FreeCount = %d, want 0", n)
	}
	for _, dpdk := range []bool{false, true} {
		if _, err := tp.Reserve(owner("c"), "ens1f0", dpdk); !errors.Is(err, ErrNoFreeVF) {
			t.Fatalf("Reserve(dpdk %t) = %v, want ErrNoFreeVF", dpdk, err)
		}
	}
}

// A stale DEL (or GC) of an old owner must not free the VF a new owner now holds
// (sriov-cni #219).
func TestPoolStaleReleaseLeavesNewOwner(t *testing.T) {
	tp := newTestPool(t)
	mustSync(t, tp.Pool, "ens1f0", netVF("ens1f0", 0))
	old, cur := owner("old"), owner("new")
	v := mustReserve(t, tp.Pool, old, "ens1f0", false)
	if err := tp.Release(v.PCI, old); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if got := mustReserve(t, tp.Pool, cur, "ens1f0", false); got.PCI != v.PCI {
		t.Fatalf("new owner got %s, want %s", got.PCI, v.PCI)
	}
	if err := tp.Release(v.PCI, old); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("stale Release = %v, want ErrNotOwner", err)
	}
	if err := tp.Quarantine(v.PCI, old); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("stale Quarantine = %v, want ErrNotOwner", err)
	}
	if r, ok := tp.Lookup(cur); !ok || r.VF.PCI != v.PCI || r.State != StateReserved {
		t.Fatalf("new owner's record = %+v, %t; want it untouched", r, ok)
	}
	// Same container, other interface: another owner.
	other := cur
	other.IfName = "net2"
	if err := tp.Release(v.PCI, other); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("Release by another ifname = %v, want ErrNotOwner", err)
	}
}

// 100 goroutines race for 4 VFs: exactly 4 win, each with its own VF.
func TestPoolConcurrentReserve(t *testing.T) {
	tp := newTestPool(t)
	var vfs []VF
	for i := 0; i < 4; i++ {
		vfs = append(vfs, netVF("ens1f0", i))
	}
	mustSync(t, tp.Pool, "ens1f0", vfs...)

	var wg sync.WaitGroup
	var mu sync.Mutex
	won := map[string]string{} // pci → container
	refused := 0
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			v, err := tp.Reserve(owner(id), "ens1f0", false)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, ErrNoFreeVF):
				refused++
			case err != nil:
				t.Errorf("Reserve(%s): %v", id, err)
			default:
				if prev, dup := won[v.PCI]; dup {
					t.Errorf("vf %s handed to %s and %s", v.PCI, prev, id)
				}
				won[v.PCI] = id
			}
		}(fmt.Sprintf("ctr-%03d", i))
	}
	wg.Wait()
	if len(won) != 4 || refused != 96 {
		t.Fatalf("%d VFs won, %d refused; want 4 and 96", len(won), refused)
	}
	// What the pool says matches what the goroutines got, and survives a restart.
	tp.reopen()
	owned := tp.Owned()
	if len(owned) != 4 {
		t.Fatalf("Owned after restart = %d records, want 4", len(owned))
	}
	for _, r := range owned {
		if won[r.VF.PCI] != r.Owner.ContainerID {
			t.Fatalf("vf %s owned by %s after restart, goroutine said %s", r.VF.PCI, r.Owner.ContainerID, won[r.VF.PCI])
		}
	}
	if got := testutil.ToFloat64(tp.refused.WithLabelValues("no_free_vf")); got != 0 {
		t.Fatalf("refusal counter after restart = %v, want 0 (a new pool counts afresh)", got)
	}
}

func TestPoolRestartPersistence(t *testing.T) {
	tp := newTestPool(t)
	mustSync(t, tp.Pool, "ens1f0", netVF("ens1f0", 0), netVF("ens1f0", 1), netVF("ens1f0", 2))
	a, b, c := owner("a"), owner("b"), owner("c")
	va := mustReserve(t, tp.Pool, a, "ens1f0", false)
	saved := NetdevState{Name: va.Netdev, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0xa}, MTU: 1500, VLAN: 0, SpoofChk: true, LinkState: "auto"}
	if err := tp.SaveState(va.PCI, saved); err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	// a: the peer dies mid ADD (reserved). b: attached. c: quarantined.
	vb := mustReserve(t, tp.Pool, b, "ens1f0", false)
	if err := tp.Attached(vb.PCI); err != nil {
		t.Fatalf("Attached: %v", err)
	}
	vc := mustReserve(t, tp.Pool, c, "ens1f0", false)
	if err := tp.Attached(vc.PCI); err != nil {
		t.Fatalf("Attached: %v", err)
	}
	if err := tp.Quarantine(vc.PCI, c); err != nil {
		t.Fatalf("Quarantine: %v", err)
	}

	tp.reopen()
	pending := tp.Pending()
	if len(pending) != 1 || pending[0].VF.PCI != va.PCI || pending[0].Owner != a {
		t.Fatalf("Pending after restart = %+v, want a's reservation", pending)
	}
	if s := pending[0].Saved; s == nil || s.Name != saved.Name || s.MAC.String() != saved.MAC.String() || !s.SpoofChk {
		t.Fatalf("saved state after restart = %+v, want %+v", s, saved)
	}
	if r, ok := tp.Lookup(b); !ok || r.State != StateAttached || r.VF.PCI != vb.PCI {
		t.Fatalf("b after restart = %+v, %t", r, ok)
	}
	if r, ok := tp.Lookup(c); !ok || r.State != StateQuarantined {
		t.Fatalf("c after restart = %+v, %t", r, ok)
	}
	if n := tp.FreeCount("ens1f0"); n != 0 {
		t.Fatalf("FreeCount after restart = %d, want 0", n)
	}
	if got := vfsGauge(t, tp.reg, "ens1f0", StateQuarantined); got != 1 {
		t.Fatalf("weft_sriov_vfs{quarantined} after restart = %v, want 1", got)
	}
	// The caller restores a's VF and releases it: free again, and still so after a restart.
	if err := tp.Release(va.PCI, a); err != nil {
		t.Fatalf("Release pending: %v", err)
	}
	tp.reopen()
	if len(tp.Pending()) != 0 || tp.FreeCount("ens1f0") != 1 {
		t.Fatalf("after release and restart: pending %d, free %d; want 0 and 1", len(tp.Pending()), tp.FreeCount("ens1f0"))
	}
}

func TestPoolQuarantineAndFound(t *testing.T) {
	tp := newTestPool(t)
	v0 := netVF("ens1f0", 0)
	mustSync(t, tp.Pool, "ens1f0", v0)
	a := owner("a")
	mustReserve(t, tp.Pool, a, "ens1f0", false)
	if err := tp.SaveState(v0.PCI, NetdevState{Name: v0.Netdev, MTU: 1500}); err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	if err := tp.Attached(v0.PCI); err != nil {
		t.Fatalf("Attached: %v", err)
	}
	if err := tp.Quarantine(v0.PCI, a); err != nil {
		t.Fatalf("Quarantine: %v", err)
	}
	if err := tp.Quarantine(v0.PCI, a); err != nil {
		t.Fatalf("repeated Quarantine: %v", err)
	}
	// DEL of the gone container succeeds but the VF stays unusable.
	if err := tp.Release(v0.PCI, a); err != nil {
		t.Fatalf("Release of quarantined: %v", err)
	}
	if _, err := tp.Reserve(owner("b"), "ens1f0", false); !errors.Is(err, ErrNoFreeVF) {
		t.Fatalf("Reserve with the VF quarantined = %v, want ErrNoFreeVF", err)
	}
	// Discovery while it is nowhere: kept, not reported back.
	gone := v0
	gone.Netdev = ""
	if back := mustSync(t, tp.Pool, "ens1f0", gone); len(back) != 0 {
		t.Fatalf("Sync reported %d VFs back while the netdev is nowhere", len(back))
	}
	// The kernel returned it to the host under another name: Sync reports it with the saved
	// state; the caller restores it and calls Found.
	renamed := v0
	renamed.Netdev = "eth7"
	back := mustSync(t, tp.Pool, "ens1f0", renamed)
	if len(back) != 1 || back[0].VF.Netdev != "eth7" || back[0].Saved == nil || back[0].Saved.Name != v0.Netdev {
		t.Fatalf("Sync back = %+v, want the VF with its saved name", back)
	}
	if err := tp.Found(v0.PCI); err != nil {
		t.Fatalf("Found: %v", err)
	}
	if err := tp.Found(v0.PCI); err != nil {
		t.Fatalf("repeated Found: %v", err)
	}
	if _, ok := tp.Lookup(a); ok {
		t.Fatalf("Lookup finds the old owner after Found")
	}
	if n := tp.FreeCount("ens1f0"); n != 1 {
		t.Fatalf("FreeCount after Found = %d, want 1", n)
	}
}

func TestPoolSyncVanishedVFs(t *testing.T) {
	tp := newTestPool(t)
	v0, v1, v2 := netVF("ens1f0", 0), netVF("ens1f0", 1), netVF("ens1f0", 2)
	mustSync(t, tp.Pool, "ens1f0", v0, v1, v2)
	mustSync(t, tp.Pool, "ens1f1", netVF("ens1f1", 9))
	a := owner("a")
	got := mustReserve(t, tp.Pool, a, "ens1f0", false)
	if got.PCI != v0.PCI {
		t.Fatalf("Reserve = %s, want %s", got.PCI, v0.PCI)
	}
	// sriov_numvfs lowered to 0: the free VFs go, the owned one stays, marked missing.
	mustSync(t, tp.Pool, "ens1f0")
	if n := tp.FreeCount("ens1f0"); n != 0 {
		t.Fatalf("FreeCount after the VFs vanished = %d, want 0", n)
	}
	r, ok := tp.Lookup(a)
	if !ok || !r.Missing || r.State != StateReserved {
		t.Fatalf("owned vanished record = %+v, %t; want kept, missing", r, ok)
	}
	// Other PFs are untouched by a Sync of ens1f0.
	if n := tp.FreeCount("ens1f1"); n != 1 {
		t.Fatalf("FreeCount(ens1f1) = %d, want 1", n)
	}
	// It comes back, with a new driver binding for v1: missing cleared, kinds follow.
	v1d := dpdkVF("ens1f0", 1)
	mustSync(t, tp.Pool, "ens1f0", v0, v1d)
	if r, _ := tp.Lookup(a); r.Missing {
		t.Fatalf("record still missing after its VF came back")
	}
	if d := mustReserve(t, tp.Pool, owner("d"), "ens1f0", true); d.PCI != v1d.PCI {
		t.Fatalf("dpdk Reserve = %s, want rebound %s", d.PCI, v1d.PCI)
	}
	// A missing owned VF released is forgotten, not made free.
	mustSync(t, tp.Pool, "ens1f0", v1d)
	if err := tp.Release(v0.PCI, a); err != nil {
		t.Fatalf("Release: %v", err)
	}
	tp.reopen()
	for _, r := range tp.Owned() {
		if r.VF.PCI == v0.PCI {
			t.Fatalf("released missing VF still recorded: %+v", r)
		}
	}
	if n := tp.FreeCount("ens1f0"); n != 0 {
		t.Fatalf("FreeCount after releasing the missing VF = %d, want 0", n)
	}
}

func TestPoolGC(t *testing.T) {
	tp := newTestPool(t)
	var vfs []VF
	for i := 0; i < 5; i++ {
		vfs = append(vfs, netVF("ens1f0", i))
	}
	mustSync(t, tp.Pool, "ens1f0", vfs...)
	attach := func(o Owner) VF {
		v := mustReserve(t, tp.Pool, o, "ens1f0", false)
		if err := tp.Attached(v.PCI); err != nil {
			t.Fatalf("Attached: %v", err)
		}
		return v
	}
	keep, leak := owner("keep"), owner("leak")
	other := owner("other")
	other.CNINetwork = "slow"
	attach(keep)
	vLeak := attach(leak)
	attach(other)
	mustReserve(t, tp.Pool, owner("adding"), "ens1f0", false) // an ADD under way
	quar := owner("quar")
	vq := attach(quar)
	if err := tp.Quarantine(vq.PCI, quar); err != nil {
		t.Fatalf("Quarantine: %v", err)
	}

	valid := []Owner{{ContainerID: "keep", IfName: "eth1"}}
	got := tp.GC(valid, "fast")
	if len(got) != 1 || got[0].VF.PCI != vLeak.PCI {
		t.Fatalf("GC = %+v, want only the leaked VF %s", got, vLeak.PCI)
	}
	// GC changes nothing by itself; the caller restores, then releases.
	if len(tp.GC(valid, "fast")) != 1 {
		t.Fatalf("GC changed the pool")
	}
	if err := tp.Release(got[0].VF.PCI, got[0].Owner); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if len(tp.GC(valid, "fast")) != 0 {
		t.Fatalf("GC after release still reports leaks")
	}
}

func TestPoolCorruptRecords(t *testing.T) {
	tp := newTestPool(t)
	good := netVF("ens1f0", 0)
	mustSync(t, tp.Pool, "ens1f0", good)
	a := owner("a")
	mustReserve(t, tp.Pool, a, "ens1f0", false)
	if err := tp.db.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	db, err := bolt.Open(tp.path, 0o600, nil)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	corrupt := map[string]string{
		"0000:03:02.1": `{not json`,
		"0000:03:02.2": `{"vf":{"PF":"ens1f0","PCI":"0000:03:02.9"},"state":"free"}`,     // key mismatch
		"0000:03:02.3": `{"vf":{"PF":"ens1f0","PCI":"0000:03:02.3"},"state":"bogus"}`,    // unknown state
		"0000:03:02.4": `{"vf":{"PF":"ens1f0","PCI":"0000:03:02.4"},"state":"attached"}`, // no owner
		"garbage-key":  `{"vf":{"PF":"ens1f0","PCI":"garbage-key"},"state":"free"}`,      // bad key
	}
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSRIOV)
		for k, v := range corrupt {
			if err := b.Put([]byte(k), []byte(v)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("write corrupt records: %v", err)
	}
	db.Close()
	tp.open()

	if got := testutil.ToFloat64(tp.corrupt); got != 5 {
		t.Fatalf("weft_sriov_records_corrupt_total = %v, want 5", got)
	}
	if r, ok := tp.Lookup(a); !ok || r.VF.PCI != good.PCI {
		t.Fatalf("good record lost beside corrupt ones: %+v, %t", r, ok)
	}
	// VFs with unreadable records may be inside a container: never handed out ...
	vfs := []VF{good}
	for i := 1; i <= 4; i++ {
		v := netVF("ens1f0", i)
		v.Netdev = ""
		vfs = append(vfs, v)
	}
	mustSync(t, tp.Pool, "ens1f0", vfs...)
	if _, err := tp.Reserve(owner("b"), "ens1f0", false); !errors.Is(err, ErrNoFreeVF) {
		t.Fatalf("Reserve beside corrupt records = %v, want ErrNoFreeVF", err)
	}
	// ... until they show up in the host and the caller calls Found.
	v1 := netVF("ens1f0", 1)
	vfs[1] = v1
	back := mustSync(t, tp.Pool, "ens1f0", vfs...)
	if len(back) != 1 || back[0].VF.PCI != v1.PCI {
		t.Fatalf("Sync back = %+v, want %s", back, v1.PCI)
	}
	if err := tp.Found(v1.PCI); err != nil {
		t.Fatalf("Found: %v", err)
	}
	if v := mustReserve(t, tp.Pool, owner("b"), "ens1f0", false); v.PCI != v1.PCI {
		t.Fatalf("Reserve = %s, want %s", v.PCI, v1.PCI)
	}
}

// A VF discovered inside its container (no host netdev) is usable again as soon as it is
// released under its restored name, without waiting for the next Sync.
func TestPoolReleaseRestoresNetdevName(t *testing.T) {
	tp := newTestPool(t)
	v0 := netVF("ens1f0", 0)
	mustSync(t, tp.Pool, "ens1f0", v0)
	a := owner("a")
	mustReserve(t, tp.Pool, a, "ens1f0", false)
	if err := tp.SaveState(v0.PCI, NetdevState{Name: v0.Netdev, MTU: 1500}); err != nil {
		t.Fatalf("SaveState: %v", err)
	}
	inside := v0
	inside.Netdev = ""
	mustSync(t, tp.Pool, "ens1f0", inside)
	if err := tp.Attached(v0.PCI); err != nil {
		t.Fatalf("Attached: %v", err)
	}
	if err := tp.Release(v0.PCI, a); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if n := tp.FreeCount("ens1f0"); n != 1 {
		t.Fatalf("FreeCount right after Release = %d, want 1", n)
	}
	if v := mustReserve(t, tp.Pool, owner("b"), "ens1f0", false); v.Netdev != v0.Netdev {
		t.Fatalf("Reserve after release = %+v, want netdev %s", v, v0.Netdev)
	}
}

// BenchmarkPoolReserveRelease measures one persisted reservation plus its release (two
// fsync'd bbolt transactions), the pool's share of an SR-IOV ADD and DEL.
func BenchmarkPoolReserveRelease(b *testing.B) {
	db, err := bolt.Open(filepath.Join(b.TempDir(), "weft.db"), 0o600, nil)
	if err != nil {
		b.Fatalf("open bbolt: %v", err)
	}
	defer db.Close()
	p, err := NewPool(PoolConfig{DB: db})
	if err != nil {
		b.Fatalf("NewPool: %v", err)
	}
	var vfs []VF
	for i := 0; i < 64; i++ {
		vfs = append(vfs, netVF("ens1f0", i))
	}
	if _, err := p.Sync("ens1f0", vfs); err != nil {
		b.Fatalf("Sync: %v", err)
	}
	o := owner("bench")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		v, err := p.Reserve(o, "ens1f0", false)
		if err != nil {
			b.Fatalf("Reserve: %v", err)
		}
		if err := p.Release(v.PCI, o); err != nil {
			b.Fatalf("Release: %v", err)
		}
	}
}
