package ipam

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// Labels are stored with the attachment, survive a restart, change for every interface of a
// container at once; records from before labels decode without them.
func TestAttachmentLabelsAcrossRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	a := newTestAllocator(t, db, testNet)
	ctx := context.Background()
	web := attach("web")
	web.Labels = map[string]string{"app": "web"}
	if _, _, err := a.Allocate(ctx, web); err != nil {
		t.Fatal(err)
	}
	second := web
	second.IfName = "net1"
	if _, _, err := a.Allocate(ctx, second); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.Allocate(ctx, attach("plain")); err != nil {
		t.Fatal(err)
	}
	// A record as an older peer wrote it: no "labels" key.
	old := []byte(`{"container_id":"old","ifname":"eth0","network":"default","cni_network":"weft","name":"old","address":"10.40.0.60","netns":"/x","host_ifname":"weftold","created":"2026-01-01T00:00:00Z"}`)
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketAttachments).Put([]byte("old/eth0"), old) }); err != nil {
		t.Fatal(err)
	}
	upd, err := a.SetLabels("web", map[string]string{"app": "web", "tier": "front"})
	if err != nil || len(upd) != 2 || upd[0].IfName != "eth0" || upd[1].IfName != "net1" {
		t.Fatalf("set labels: %v %+v", err, upd)
	}
	if _, err := a.SetLabels("nope", map[string]string{"a": "b"}); !errors.Is(err, ErrUnknownContainer) {
		t.Fatalf("unknown container: %v", err)
	}
	db.Close()

	db = openDB(t, path)
	b := newTestAllocator(t, db, testNet)
	want := map[string]string{"app": "web", "tier": "front"}
	for _, k := range []Key{{"web", "eth0"}, {"web", "net1"}} {
		rec, ok := b.Get(k)
		if !ok || !maps.Equal(rec.Labels, want) {
			t.Fatalf("after restart %s: %+v", k, rec)
		}
	}
	for _, k := range []Key{{"plain", "eth0"}, {"old", "eth0"}} {
		if rec, ok := b.Get(k); !ok || rec.Labels != nil {
			t.Fatalf("after restart %s: %+v (found %v), want no labels", k, rec, ok)
		}
	}
	// Removing every label stores none (omitempty: the record is as an unlabelled one).
	if _, err := b.SetLabels("web", map[string]string{}); err != nil {
		t.Fatal(err)
	}
	var raw []byte
	db.View(func(tx *bolt.Tx) error {
		raw = append(raw, tx.Bucket(bucketAttachments).Get([]byte("web/eth0"))...)
		return nil
	})
	if rec, _ := b.Get(Key{"web", "eth0"}); rec.Labels != nil || len(raw) == 0 || bytes.Contains(raw, []byte("labels")) {
		t.Fatalf("after removing every label: %+v %s", rec, raw)
	}
}
