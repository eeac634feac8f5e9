package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func openDB(t *testing.T, path string) *bolt.DB { return openDBB(t, path) }

func openDBB(t testing.TB, path string) *bolt.DB {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatalf("open bbolt: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func newTestAllocator(t *testing.T, db *bolt.DB, nets ...Network) *Allocator {
	t.Helper()
	owner, err := NewLocalOwner(db)
	if err != nil {
		t.Fatal(err)
	}
	a, err := NewAllocator(Config{Peer: "p1", Networks: nets}, db, owner)
	if err != nil {
		t.Fatalf("NewAllocator: %v", err)
	}
	return a
}

var testNet = Network{Name: "default", Subnet: netip.MustParsePrefix("10.40.0.0/16"), BlockBits: 26}

func attach(id string) Attachment {
	return Attachment{ContainerID: id, IfName: "eth0", Network: "default", CNINetwork: "weft", Name: id}
}

func TestAllocateSkipsReservedAndClaimsBlocksOnDemand(t *testing.T) {
	a := newTestAllocator(t, openDB(t, filepath.Join(t.TempDir(), "db")), testNet)
	seen := map[netip.Addr]bool{}
	// The first block loses the network address and the gateway: 62 usable; the 63rd
	// allocation must come from a second block.
	for i := 0; i < 63; i++ {
		rec, existed, err := a.Allocate(context.Background(), attach(fmt.Sprintf("c%d", i)))
		if err != nil || existed {
			t.Fatalf("allocate %d: %v existed=%v", i, err, existed)
		}
		if seen[rec.Address] {
			t.Fatalf("address %s handed out twice", rec.Address)
		}
		if rec.Address == testNet.Subnet.Addr() || rec.Address == testNet.Gateway() {
			t.Fatalf("reserved address %s handed out", rec.Address)
		}
		seen[rec.Address] = true
	}
	st := a.Networks()[0]
	if len(st.Blocks) != 2 || st.Blocks[0].CIDR.String() != "10.40.0.0/26" || st.Blocks[1].CIDR.String() != "10.40.0.64/26" {
		t.Fatalf("blocks = %+v, want 10.40.0.0/26 and 10.40.0.64/26", st.Blocks)
	}
	if st.Blocks[0].Used != 62 || st.Blocks[0].Free != 0 || st.Blocks[1].Used != 1 || st.Blocks[1].Free != 63 {
		t.Fatalf("block usage = %+v", st.Blocks)
	}
}

func TestAllocateIsIdempotentPerKey(t *testing.T) {
	a := newTestAllocator(t, openDB(t, filepath.Join(t.TempDir(), "db")), testNet)
	first, _, err := a.Allocate(context.Background(), attach("c1"))
	if err != nil {
		t.Fatal(err)
	}
	again, existed, err := a.Allocate(context.Background(), attach("c1"))
	if err != nil || !existed || again.Address != first.Address {
		t.Fatalf("second allocate = %v existed=%v err=%v, want %v existed", again.Address, existed, err, first.Address)
	}
	if n := len(a.Attachments()); n != 1 {
		t.Fatalf("%d attachments, want 1", n)
	}
}

func TestRestartKeepsAttachmentsAndNeverReuses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	db := openDB(t, path)
	a := newTestAllocator(t, db, testNet)
	var before []Attachment
	for i := 0; i < 70; i++ {
		rec, _, err := a.Allocate(context.Background(), attach(fmt.Sprintf("c%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		before = append(before, rec)
	}
	db.Close()

	b := newTestAllocator(t, openDB(t, path), testNet)
	for _, rec := range before {
		got, ok := b.Get(rec.Key())
		if !ok || got.Address != rec.Address {
			t.Fatalf("after restart %s = %v (found %v), want %v", rec.Key(), got.Address, ok, rec.Address)
		}
	}
	fresh, _, err := b.Allocate(context.Background(), attach("new"))
	if err != nil {
		t.Fatal(err)
	}
	for _, rec := range before {
		if rec.Address == fresh.Address {
			t.Fatalf("restarted allocator reused %s", fresh.Address)
		}
	}
	if n := len(b.Networks()[0].Blocks); n != 2 {
		t.Fatalf("restarted allocator owns %d blocks, want the same 2", n)
	}
}

func TestReleaseFreesAddressButNotImmediatelyReused(t *testing.T) {
	a := newTestAllocator(t, openDB(t, filepath.Join(t.TempDir(), "db")), testNet)
	first, _, _ := a.Allocate(context.Background(), attach("c1"))
	if _, ok, err := a.Release(first.Key()); !ok || err != nil {
		t.Fatalf("release = %v, %v", ok, err)
	}
	if _, ok, err := a.Release(first.Key()); ok || err != nil {
		t.Fatalf("second release = %v, %v; want nothing to release and no error", ok, err)
	}
	next, _, _ := a.Allocate(context.Background(), attach("c2"))
	if next.Address == first.Address {
		t.Fatalf("released address %s reused at once", first.Address)
	}
	if st := a.Networks()[0].Blocks[0]; st.Used != 1 {
		t.Fatalf("used = %d after release and one allocation, want 1", st.Used)
	}
}

func TestWrapsAroundToReleasedAddresses(t *testing.T) {
	small := Network{Name: "small", Subnet: netip.MustParsePrefix("10.9.0.0/24"), BlockBits: 24}
	a := newTestAllocator(t, openDB(t, filepath.Join(t.TempDir(), "db")), small)
	var recs []Attachment
	for i := 0; i < 253; i++ { // .0, .1 and .255 are reserved
		rec, _, err := a.Allocate(context.Background(), Attachment{ContainerID: fmt.Sprint(i), IfName: "eth0", Network: "small"})
		if err != nil {
			t.Fatalf("allocate %d: %v", i, err)
		}
		recs = append(recs, rec)
	}
	_, _, err := a.Allocate(context.Background(), Attachment{ContainerID: "full", IfName: "eth0", Network: "small"})
	if !errors.Is(err, ErrRangeFull) {
		t.Fatalf("allocate on a full range: err = %v, want ErrRangeFull", err)
	}
	a.Release(recs[10].Key())
	rec, _, err := a.Allocate(context.Background(), Attachment{ContainerID: "again", IfName: "eth0", Network: "small"})
	if err != nil || rec.Address != recs[10].Address {
		t.Fatalf("after release got %v, %v; want the only free address %v", rec.Address, err, recs[10].Address)
	}
}

func TestUnknownNetwork(t *testing.T) {
	a := newTestAllocator(t, openDB(t, filepath.Join(t.TempDir(), "db")), testNet)
	req := attach("c1")
	req.Network = "nope"
	if _, _, err := a.Allocate(context.Background(), req); !errors.Is(err, ErrUnknownNetwork) {
		t.Fatalf("err = %v, want ErrUnknownNetwork", err)
	}
	if len(a.Attachments()) != 0 {
		t.Fatal("a failed allocation left a record")
	}
}

func TestConcurrentAllocationsAreDistinct(t *testing.T) {
	a := newTestAllocator(t, openDB(t, filepath.Join(t.TempDir(), "db")), testNet)
	var wg sync.WaitGroup
	addrs := make([]netip.Addr, 300)
	errs := make([]error, 300)
	for i := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec, _, err := a.Allocate(context.Background(), attach(fmt.Sprintf("c%d", i)))
			addrs[i], errs[i] = rec.Address, err
		}()
	}
	wg.Wait()
	seen := map[netip.Addr]bool{}
	for i, addr := range addrs {
		if errs[i] != nil {
			t.Fatalf("allocate %d: %v", i, errs[i])
		}
		if seen[addr] {
			t.Fatalf("%s handed out twice", addr)
		}
		seen[addr] = true
	}
	// 300 addresses need exactly 5 blocks (62 + 4×64 ≥ 300); more means a claim race.
	if n := len(a.Networks()[0].Blocks); n != 5 {
		t.Fatalf("owned %d blocks for 300 addresses, want 5", n)
	}
}

func TestNetworkValidate(t *testing.T) {
	cases := []struct {
		net  Network
		want string
	}{
		{Network{Name: "Bad Name", Subnet: testNet.Subnet, BlockBits: 26}, "name"},
		{Network{Name: "n", Subnet: netip.MustParsePrefix("10.40.0.1/16"), BlockBits: 26}, "host bits"},
		{Network{Name: "n", Subnet: netip.MustParsePrefix("fd00::/64"), BlockBits: 26}, "IPv4"},
		{Network{Name: "n", Subnet: netip.MustParsePrefix("10.40.0.0/28"), BlockBits: 30}, "smaller than a /24"},
		{Network{Name: "n", Subnet: testNet.Subnet, BlockBits: 12}, "block size"},
		{Network{Name: "n", Subnet: testNet.Subnet, BlockBits: 31}, "block size"},
	}
	for _, c := range cases {
		err := c.net.Validate()
		if !errors.Is(err, ErrInvalidNetwork) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Validate(%+v) = %v, want ErrInvalidNetwork mentioning %q", c.net, err, c.want)
		}
	}
	if err := testNet.Validate(); err != nil {
		t.Errorf("default network invalid: %v", err)
	}
}
