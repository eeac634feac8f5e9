package dns

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"
)

func addrsOf(r *Records, name string) []string {
	ts, _ := r.LookupName(name)
	var out []string
	for _, t := range ts {
		out = append(out, t.Addr.String())
	}
	return out
}

func TestRecordsAddRemoveLookup(t *testing.T) {
	clk := newFakeClock()
	r := newTestRecords(t, "p1", clk.Now)

	d, err := r.AddAddr("Web.", mustAddr(t, "10.40.0.2"))
	if err != nil || d.Len() != 1 {
		t.Fatalf("AddAddr = %v, %v", d.Entries(), err)
	}
	if d2, _ := r.AddAddr("web", mustAddr(t, "10.40.0.2")); !d2.Empty() {
		t.Fatalf("second identical add gave delta %v", d2.Entries())
	}
	if _, err := r.AddAddr("web", mustAddr(t, "::ffff:10.40.0.3")); err != nil { // stored unmapped
		t.Fatal(err)
	}
	if _, err := r.AddAddr("web", mustAddr(t, "fd00::2")); err != nil {
		t.Fatal(err)
	}
	if got, want := addrsOf(r, "WEB"), []string{"10.40.0.2", "10.40.0.3", "fd00::2"}; !slices.Equal(got, want) {
		t.Fatalf("lookup = %v, want %v", got, want)
	}
	if got := r.LookupAddr(mustAddr(t, "10.40.0.3")); !slices.Equal(got, []string{"web"}) {
		t.Fatalf("LookupAddr = %v", got)
	}
	if _, err := r.AddSRV("web", "_HTTP", "_tcp", 8080); err != nil {
		t.Fatal(err)
	}
	if got := r.LookupSRV("web", "http", "tcp"); len(got) != 1 || got[0].Port != 8080 || got[0].Peer != "p1" {
		t.Fatalf("LookupSRV = %v", got)
	}
	d, err = r.RemoveAddr("web", mustAddr(t, "10.40.0.2"))
	if err != nil || d.Len() != 1 || !d.Entries()[0].Deleted {
		t.Fatalf("RemoveAddr = %v, %v", d.Entries(), err)
	}
	if d, _ := r.RemoveAddr("web", mustAddr(t, "10.9.9.9")); !d.Empty() {
		t.Fatal("removing an unknown address gave a delta")
	}
	d, err = r.RemoveName("web")
	if err != nil || d.Len() != 3 {
		t.Fatalf("RemoveName = %v, %v", d.Entries(), err)
	}
	if ts, known := r.LookupName("web"); known || len(ts) != 0 {
		t.Fatalf("after RemoveName: %v known=%v", ts, known)
	}
	if r.Len() != 0 {
		t.Fatalf("Len = %d", r.Len())
	}
}

func TestRecordsInvalidInput(t *testing.T) {
	r := newTestRecords(t, "p1", nil)
	for _, name := range []string{"", "_x", "a..b", "bad name", "é", string(make([]byte, 201)), "x." + string(bytes.Repeat([]byte("a"), 64))} {
		if _, err := r.AddAddr(name, mustAddr(t, "10.0.0.1")); !errors.Is(err, ErrInvalidName) {
			t.Errorf("AddAddr(%q) err = %v, want ErrInvalidName", name, err)
		}
	}
	if _, err := r.AddAddr("ok", netip.Addr{}); !errors.Is(err, ErrInvalidEntry) {
		t.Errorf("invalid addr: %v", err)
	}
	for _, c := range []struct {
		svc, proto string
		port       uint16
	}{{"", "tcp", 1}, {"http", "sctp", 1}, {"http", "tcp", 0}, {"ht tp", "tcp", 1}} {
		if _, err := r.AddSRV("ok", c.svc, c.proto, c.port); !errors.Is(err, ErrInvalidEntry) {
			t.Errorf("AddSRV(%v) err = %v", c, err)
		}
	}
	if _, err := NewRecords("", nil); err == nil {
		t.Error("NewRecords with empty self succeeded")
	}
	if r.Len() != 0 {
		t.Fatal("invalid input changed the store")
	}
}

// op is a local operation on a peer.
type op struct {
	add  bool
	name string
	addr string
}

// TestMergeConvergesAnyOrder runs adds and removes on two peers
// concurrently, then delivers all their deltas to replicas in different
// random orders (with duplicates); every replica ends in the same state.
func TestMergeConvergesAnyOrder(t *testing.T) {
	clk := newFakeClock()
	peers := []*Records{newTestRecords(t, "a", clk.Now), newTestRecords(t, "b", clk.Now)}
	var mu sync.Mutex
	var deltas []*Delta
	var wg sync.WaitGroup
	for pi, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(pi), 7))
			for i := 0; i < 200; i++ {
				name := fmt.Sprintf("svc%d", rng.IntN(5))
				addr := netip.AddrFrom4([4]byte{10, 40, byte(pi), byte(rng.IntN(6))})
				var d *Delta
				var err error
				if rng.IntN(3) == 0 {
					d, err = p.RemoveAddr(name, addr)
				} else {
					d, err = p.AddAddr(name, addr)
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				deltas = append(deltas, d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()

	// The reference: merge the two full states.
	ref := newTestRecords(t, "ref", clk.Now)
	ref.Merge(peers[0].State())
	ref.Merge(peers[1].State())
	want := ref.Encode()

	for seed := uint64(0); seed < 5; seed++ {
		rep := newTestRecords(t, fmt.Sprintf("rep%d", seed), clk.Now)
		order := slices.Clone(deltas)
		order = append(order, deltas[:len(deltas)/3]...) // duplicates
		rng := rand.New(rand.NewPCG(seed, 99))
		rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		for _, d := range order {
			// Through the wire format, as gossip would.
			if _, err := rep.MergeBytes(d.Encode()); err != nil {
				t.Fatal(err)
			}
		}
		if got := rep.Encode(); !bytes.Equal(got, want) {
			t.Fatalf("replica %d diverged from the reference", seed)
		}
	}
	// The peers themselves converge through push/pull of full state.
	peers[0].Merge(peers[1].State())
	peers[1].Merge(peers[0].State())
	if !bytes.Equal(peers[0].Encode(), peers[1].Encode()) || !bytes.Equal(peers[0].Encode(), want) {
		t.Fatal("peers did not converge after exchanging full state")
	}
	for i := 0; i < 5; i++ {
		n := fmt.Sprintf("svc%d", i)
		if a, b := addrsOf(peers[0], n), addrsOf(ref, n); !slices.Equal(a, b) {
			t.Fatalf("%s: %v vs %v", n, a, b)
		}
	}
}

func TestMergeReturnsOnlyChanges(t *testing.T) {
	a := newTestRecords(t, "a", nil)
	b := newTestRecords(t, "b", nil)
	d1, _ := a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	if ch := b.Merge(d1); ch.Len() != 1 {
		t.Fatalf("first merge changed %d", ch.Len())
	}
	if ch := b.Merge(d1); !ch.Empty() {
		t.Fatalf("repeated merge changed %v", ch.Entries())
	}
	if ch := b.Merge(a.State()); !ch.Empty() {
		t.Fatalf("merging known full state changed %v", ch.Entries())
	}
	if ch := b.Merge(nil); ch == nil || !ch.Empty() {
		t.Fatal("Merge(nil) must return an empty delta")
	}
}

// TestTombstoneBeatsOlderAdd: a removal reaches a partitioned replica after
// the (older) add is re-delivered: the name stays removed.
func TestTombstoneBeatsOlderAdd(t *testing.T) {
	clk := newFakeClock()
	a := newTestRecords(t, "a", clk.Now)
	b := newTestRecords(t, "b", clk.Now)
	c := newTestRecords(t, "c", clk.Now)
	add, _ := a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	b.Merge(add)
	c.Merge(add)
	clk.Advance(time.Second)
	rm, _ := a.RemoveAddr("web", mustAddr(t, "10.40.0.2"))
	b.Merge(rm) // c is partitioned
	if got := addrsOf(c, "web"); len(got) != 1 {
		t.Fatalf("partitioned c: %v", got)
	}
	// Partition heals: c pulls b's full state, then a stale add arrives late.
	if ch := c.Merge(b.State()); ch.Len() != 1 {
		t.Fatalf("heal changed %d entries", ch.Len())
	}
	if ch := c.Merge(add); !ch.Empty() {
		t.Fatalf("stale add changed %v", ch.Entries())
	}
	if _, known := c.LookupName("web"); known {
		t.Fatal("web is still known on c after the removal")
	}
	// Same tombstone at the same version as the add (a tie): the tombstone wins.
	e := add.Entries()[0]
	e.Deleted = true
	tie, err := NewDelta(e)
	if err != nil {
		t.Fatal(err)
	}
	d := newTestRecords(t, "d", nil)
	d.Merge(add)
	d.Merge(tie)
	d2 := newTestRecords(t, "d2", nil)
	d2.Merge(tie)
	d2.Merge(add)
	if _, k := d.LookupName("web"); k {
		t.Fatal("tie: add beat tombstone")
	}
	if !bytes.Equal(d.Encode(), d2.Encode()) {
		t.Fatal("tie resolved differently by delivery order")
	}
}

func TestReAddAfterRemoveWins(t *testing.T) {
	clk := newFakeClock()
	a := newTestRecords(t, "a", clk.Now)
	c := newTestRecords(t, "c", clk.Now)
	add1, _ := a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	rm, _ := a.RemoveAddr("web", mustAddr(t, "10.40.0.2"))
	add2, _ := a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	if !(add2.Entries()[0].Version > rm.Entries()[0].Version && rm.Entries()[0].Version > add1.Entries()[0].Version) {
		t.Fatal("versions do not grow")
	}
	// Delivered in reverse order.
	c.Merge(add2)
	c.Merge(rm)
	c.Merge(add1)
	if got := addrsOf(c, "web"); !slices.Equal(got, []string{"10.40.0.2"}) {
		t.Fatalf("re-add lost: %v", got)
	}
}

// TestOwnerAuthority: a restarted peer (empty state) answers a stale live
// entry of its own with a tombstone, and its new adds beat old tombstones.
func TestOwnerAuthority(t *testing.T) {
	clk := newFakeClock()
	a := newTestRecords(t, "a", clk.Now)
	b := newTestRecords(t, "b", clk.Now)
	old, _ := a.AddAddr("old", mustAddr(t, "10.40.0.9"))
	b.Merge(old)
	gone, _ := a.AddAddr("gone", mustAddr(t, "10.40.0.8"))
	rmGone, _ := a.RemoveAddr("gone", mustAddr(t, "10.40.0.8"))
	b.Merge(gone)
	b.Merge(rmGone)

	clk.Advance(time.Second)
	a2 := newTestRecords(t, "a", clk.Now) // restart without state
	if _, err := a2.AddAddr("gone", mustAddr(t, "10.40.0.8")); err != nil {
		t.Fatal(err)
	}
	ch := a2.Merge(b.State())
	var tomb bool
	for _, e := range ch.Entries() {
		if e.Name == "old" && e.Deleted && e.Version > old.Entries()[0].Version {
			tomb = true
		}
	}
	if !tomb {
		t.Fatalf("restarted owner did not tombstone its stale entry: %v", ch.Entries())
	}
	b.Merge(ch)
	if _, known := b.LookupName("old"); known {
		t.Fatal("stale entry still answered on b")
	}
	b.Merge(a2.State())
	if got := addrsOf(b, "gone"); !slices.Equal(got, []string{"10.40.0.8"}) {
		t.Fatalf("re-added name after restart: %v", got)
	}
}

func TestPeerDownExpireForget(t *testing.T) {
	clk := newFakeClock()
	a := newTestRecords(t, "a", clk.Now)
	b := newTestRecords(t, "b", clk.Now)
	d, _ := a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	b.Merge(d)
	b.AddAddr("web", mustAddr(t, "10.40.1.2"))

	b.PeerDown("a")
	b.PeerDown("b") // self: ignored
	clk.Advance(29 * time.Second)
	if gone := b.ExpirePeers(30 * time.Second); len(gone) != 0 {
		t.Fatalf("expired early: %v", gone)
	}
	clk.Advance(time.Second)
	if gone := b.ExpirePeers(30 * time.Second); !slices.Equal(gone, []string{"a"}) {
		t.Fatalf("ExpirePeers = %v", gone)
	}
	if got := addrsOf(b, "web"); !slices.Equal(got, []string{"10.40.1.2"}) {
		t.Fatalf("dead peer still answered: %v", got)
	}
	// A late gossip of the forgotten peer's state does not bring it back...
	if ch := b.Merge(a.State()); !ch.Empty() {
		t.Fatalf("forgotten peer's entries merged: %v", ch.Entries())
	}
	// ...until the peer is back.
	b.PeerUp("a")
	b.Merge(a.State())
	if got := addrsOf(b, "web"); len(got) != 2 {
		t.Fatalf("after PeerUp: %v", got)
	}
	if !b.ForgetPeer("a") || b.ForgetPeer("a") {
		t.Fatal("ForgetPeer should report dropping once")
	}
	if b.ForgetPeer("b") {
		t.Fatal("ForgetPeer(self) must be refused")
	}
	// PeerDown then PeerUp before the grace: nothing forgotten.
	b.PeerUp("a")
	b.Merge(a.State())
	b.PeerDown("a")
	b.PeerUp("a")
	clk.Advance(time.Hour)
	if gone := b.ExpirePeers(time.Second); len(gone) != 0 {
		t.Fatalf("peer back up was expired: %v", gone)
	}
}

func TestExpireTombstones(t *testing.T) {
	clk := newFakeClock()
	a := newTestRecords(t, "a", clk.Now)
	a.AddAddr("web", mustAddr(t, "10.40.0.2"))
	a.RemoveAddr("web", mustAddr(t, "10.40.0.2"))
	clk.Advance(time.Minute)
	if n := a.ExpireTombstones(2 * time.Minute); n != 0 {
		t.Fatalf("expired %d early", n)
	}
	clk.Advance(time.Minute)
	if n := a.ExpireTombstones(2 * time.Minute); n != 1 {
		t.Fatalf("expired %d", n)
	}
	if a.State().Len() != 0 {
		t.Fatal("tombstone still in state")
	}
}

func TestRecordsConcurrentUse(t *testing.T) {
	r := newTestRecords(t, "a", nil)
	other := newTestRecords(t, "b", nil)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				addr := netip.AddrFrom4([4]byte{10, 0, byte(g), byte(i)})
				d, _ := other.AddAddr("x", addr)
				r.Merge(d)
				r.AddAddr("y", addr)
				r.LookupName("x")
				r.LookupAddr(addr)
				r.RemoveAddr("y", addr)
				_ = r.Encode()
			}
		}()
	}
	wg.Wait()
	if got := addrsOf(r, "x"); len(got) != 400 {
		t.Fatalf("got %d addresses", len(got))
	}
}

func sampleState(t testing.TB) *Delta {
	r := newTestRecords(t, "peer-1", newFakeClock().Now)
	r.AddAddr("web", mustAddr(t, "10.40.0.2"))
	r.AddAddr("web", mustAddr(t, "fd00::2"))
	r.AddAddr("db.prod", mustAddr(t, "10.40.0.3"))
	r.AddSRV("web", "http", "tcp", 80)
	r.AddSRV("web", "dns", "udp", 53)
	r.RemoveAddr("db.prod", mustAddr(t, "10.40.0.3"))
	return r.State()
}

func TestCodecRoundTrip(t *testing.T) {
	d := sampleState(t)
	b := d.Encode()
	got, err := DecodeDelta(b)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got.Entries(), d.Entries()) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got.Entries(), d.Entries())
	}
	if !bytes.Equal(got.Encode(), b) {
		t.Fatal("encoding is not deterministic")
	}
	empty, err := DecodeDelta((&Delta{}).Encode())
	if err != nil || !empty.Empty() {
		t.Fatalf("empty delta: %v %v", empty, err)
	}
}

func TestDecodeRejectsGarbage(t *testing.T) {
	good := sampleState(t).Encode()
	dup := sampleState(t)
	dupBytes := (&Delta{entries: append(dup.Entries(), dup.Entries()[0])}).Encode()
	badName := (&Delta{entries: []Entry{{Peer: "p", Name: "Bad Name", Kind: KindAddr, Addr: mustAddr(t, "10.0.0.1"), Version: 1}}}).Encode()
	zeroVersion := (&Delta{entries: []Entry{{Peer: "p", Name: "ok", Kind: KindAddr, Addr: mustAddr(t, "10.0.0.1")}}}).Encode()
	mapped := (&Delta{entries: []Entry{{Peer: "p", Name: "ok", Kind: KindAddr, Addr: mustAddr(t, "::ffff:10.0.0.1"), Version: 1}}}).Encode()
	cases := map[string][]byte{
		"empty":        nil,
		"bad magic":    append([]byte("XXX"), good[3:]...),
		"bad version":  append([]byte("WDR\x01"), good[4:]...),
		"truncated":    good[:len(good)-3],
		"trailing":     append(slices.Clone(good), 0),
		"huge count":   []byte("WDR\x02\xff\xff\xff\xff\x0f"),
		"duplicate":    dupBytes,
		"bad name":     badName,
		"zero version": zeroVersion,
		"v4-mapped":    mapped,
		"bad kind":     []byte("WDR\x02\x01\x01p\x02ok\x03\x01\x04\x0a\x00\x00\x01"),
		"bad addr len": []byte("WDR\x02\x01\x01p\x02ok\x01\x01\x05\x0a\x00\x00\x01\x00"),
		"bad flags":    []byte("WDR\x02\x01\x01p\x02ok\x41\x01\x04\x0a\x00\x00\x01"),
	}
	r := newTestRecords(t, "x", nil)
	r.AddAddr("keep", mustAddr(t, "10.1.1.1"))
	before := r.Encode()
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := DecodeDelta(b); !errors.Is(err, ErrDecode) {
				t.Fatalf("DecodeDelta err = %v, want ErrDecode", err)
			}
			if _, err := r.MergeBytes(b); !errors.Is(err, ErrDecode) {
				t.Fatalf("MergeBytes err = %v", err)
			}
			if !bytes.Equal(r.Encode(), before) {
				t.Fatal("garbage changed the store")
			}
		})
	}
	// The hand-made byte cases are valid apart from the one defect.
	if _, err := DecodeDelta([]byte("WDR\x02\x01\x01p\x02ok\x01\x01\x04\x0a\x00\x00\x01\x00")); err != nil {
		t.Fatalf("control case: %v", err)
	}
}

func FuzzDecodeRecords(f *testing.F) {
	f.Add(sampleState(f).Encode())
	f.Add((&Delta{}).Encode())
	f.Add([]byte("WDR\x02\x01\x01p\x02ok\x01\x01\x04\x0a\x00\x00\x01\x00"))
	f.Add([]byte("WDR\x02\x01\x01p\x03web\x02\x05\x04http\x01\x00\x50\x00"))
	f.Add([]byte("WDR\x02\xff\xff\xff\xff\x0f"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := newTestRecords(t, "p", nil)
		r.AddAddr("keep", netip.AddrFrom4([4]byte{10, 1, 1, 1}))
		before := r.Encode()
		d, err := DecodeDelta(b)
		if err != nil {
			if !errors.Is(err, ErrDecode) {
				t.Fatalf("error does not wrap ErrDecode: %v", err)
			}
			if _, err := r.MergeBytes(b); err == nil || !bytes.Equal(r.Encode(), before) {
				t.Fatal("garbage changed the store")
			}
			return
		}
		// Canonical re-encoding is stable.
		enc := d.Encode()
		d2, err := DecodeDelta(enc)
		if err != nil || !bytes.Equal(d2.Encode(), enc) {
			t.Fatalf("re-encoding unstable: %v", err)
		}
		// Merging is idempotent.
		r.Merge(d)
		s1 := r.Encode()
		if ch := r.Merge(d); !ch.Empty() {
			t.Fatalf("second merge changed %v", ch.Entries())
		}
		if !bytes.Equal(r.Encode(), s1) {
			t.Fatal("second merge changed state")
		}
	})
}
