package mesh

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/memberlist"
)

// A pin survives a restart; a changed key is refused, counted and logged;
// Unpin lets the new key in; our own name stays pinned to our identity.
func TestKeyPinsAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	pins := filepath.Join(dir, "keypins.json")
	start := func(id string) (*Mesh, *logBuffer, error) {
		cfg, logs := testConfig(t, "pin-a")
		cfg.Identity = testIdentity(id)
		cfg.PinsPath = pins
		m, err := New(cfg)
		return m, logs, err
	}
	alive := func(m *Mesh, name, id string) error {
		md := Metadata{Name: name, Underlay: netip.MustParseAddr("127.0.0.9"), PublicKey: testIdentity(id).Public()}
		b, err := md.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return delegate{m}.NotifyAlive(&memberlist.Node{Name: name, Meta: b})
	}
	m, _, err := start("pin-a")
	if err != nil {
		t.Fatal(err)
	}
	if err := alive(m, "b", "b"); err != nil {
		t.Fatalf("first sight of b: %v", err)
	}
	if err := alive(m, "b", "b"); err != nil {
		t.Fatalf("b again with its key: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(pins); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("pins file: %v %v", st, err)
	}

	m, logs, err := start("pin-a")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	err = alive(m, "b", "b-reinstalled")
	if !errors.Is(err, ErrKeyMismatch) || !strings.Contains(err.Error(), "weft rmpeer b") {
		t.Fatalf("b with another key after a restart: %v", err)
	}
	if metricValue(m.metrics.keyRejected.WithLabelValues("mismatch")) != 1 || !logs.contains("peer refused") {
		t.Error("the refusal was not counted and logged")
	}
	if err := alive(m, "c", "none"); err != nil {
		t.Fatal(err)
	}
	noKey, _ := (&Metadata{Name: "d", Underlay: netip.MustParseAddr("127.0.0.9")}).Encode()
	if err := (delegate{m}).NotifyAlive(&memberlist.Node{Name: "d", Meta: noKey}); !errors.Is(err, ErrBadMetadata) {
		t.Errorf("metadata without a key: %v", err)
	}
	if metricValue(m.metrics.keyRejected.WithLabelValues("no_key")) != 1 {
		t.Error("no_key not counted")
	}
	// The operator removes b: its new key is taken.
	if err := m.Unpin("b"); err != nil {
		t.Fatal(err)
	}
	if err := alive(m, "b", "b-reinstalled"); err != nil {
		t.Errorf("b after Unpin: %v", err)
	}
	if err := m.Unpin("pin-a"); err == nil {
		t.Error("our own name was unpinned")
	}
	// Our own name with another identity on the same pins file.
	if _, _, err := start("impostor"); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("our name with another identity: %v", err)
	}
	// Metadata cannot swap the key.
	if err := m.UpdateMetadata(func(md *Metadata) { md.PublicKey = testIdentity("x").Public() }); !errors.Is(err, ErrBadMetadata) {
		t.Errorf("UpdateMetadata changing the key: %v", err)
	}
}

func TestKeyPinsFileRefusedWhenCorrupt(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"garbage":     "{not json",
		"version":     `{"version": 9, "pins": {}}`,
		"short key":   `{"version": 1, "pins": {"b": "AAAA"}}`,
		"bad name":    `{"version": 1, "pins": {"a/b": "` + strings.Repeat("A", 43) + `="}}`,
		"not base64!": `{"version": 1, "pins": {"b": "%%%"}}`,
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_"))
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := loadKeyPins(p); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// A repeated alive message (memberlist delivers each one many times) is not checked again
// while both its metadata and ours are unchanged; a change on either side, a death or a
// cleared pin checks it afresh, and a refused message is never remembered.
func TestRepeatedAliveCheckedOnce(t *testing.T) {
	cfg, _ := testConfig(t, "rep-a")
	accepts := 0
	cfg.AcceptPeer = func(local, remote Metadata) error { accepts++; return nil }
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	node := func(name, id string, port uint16) *memberlist.Node {
		md := Metadata{Name: name, Underlay: netip.MustParseAddr("127.0.0.9"), PublicKey: testIdentity(id).Public(),
			RaftAddr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.9"), port)}
		b, err := md.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return &memberlist.Node{Name: name, Meta: b}
	}
	d := delegate{m}
	alive := func(n *memberlist.Node, want int) {
		t.Helper()
		if err := d.NotifyAlive(n); err != nil {
			t.Fatalf("alive %s: %v", n.Name, err)
		}
		if accepts != want {
			t.Fatalf("alive %s: %d full checks, want %d", n.Name, accepts, want)
		}
	}
	alive(node("b", "b", 1), 1)
	alive(node("b", "b", 1), 1) // a repeat
	alive(node("b", "b", 2), 2) // its metadata changed
	if err := m.UpdateMetadata(func(md *Metadata) { md.Version = "changed" }); err != nil {
		t.Fatal(err)
	}
	alive(node("b", "b", 2), 3) // ours changed
	d.NotifyLeave(node("b", "b", 2))
	alive(node("b", "b", 2), 4) // after a death
	if err := m.Unpin("b"); err != nil {
		t.Fatal(err)
	}
	alive(node("b", "b", 2), 5) // after its pin was cleared
	forged := node("b", "other-key", 2)
	for range 2 {
		if err := d.NotifyAlive(forged); !errors.Is(err, ErrKeyMismatch) {
			t.Fatalf("forged key: %v, want a refusal each time", err)
		}
	}
}
