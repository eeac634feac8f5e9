package ipam

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
)

// BenchmarkAllocateRelease measures one persisted allocation plus its release (two bbolt
// transactions, each fsync'd) on a range with 500 attachments already in use.
func BenchmarkAllocateRelease(b *testing.B) {
	db := openDBB(b, filepath.Join(b.TempDir(), "db"))
	owner, _ := NewLocalOwner(db)
	a, err := NewAllocator(Config{Peer: "p", Networks: []Network{testNet}}, db, owner)
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 500; i++ {
		a.Allocate(context.Background(), attach(fmt.Sprintf("bg%d", i)))
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		rec, _, err := a.Allocate(context.Background(), attach("bench"))
		if err != nil {
			b.Fatal(err)
		}
		a.Release(rec.Key())
	}
}
