package identity

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
)

func TestLoadOrCreateKeepsTheKey(t *testing.T) {
	dir := t.TempDir()
	a, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !a.Public().Equal(b.Public()) {
		t.Fatal("a second load made a different key")
	}
	st, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %o, want 0600", st.Mode().Perm())
	}
}

func TestLoadRefusesOpenOrShortFiles(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadOrCreate(dir); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, FileName)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(dir); err == nil {
		t.Fatal("a world-readable key was accepted")
	}
	if err := os.WriteFile(path, []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(dir); err == nil {
		t.Fatal("a 5-byte key was accepted")
	}
}

func TestSignaturesAreBoundToDomainAndKey(t *testing.T) {
	a, b := Generate(), Generate()
	msg := []byte("link a->b v7")
	sig := a.Sign("weft linkstate v1", msg)
	if !Verify(a.Public(), "weft linkstate v1", msg, sig) {
		t.Fatal("a valid signature was refused")
	}
	if Verify(a.Public(), "weft dns v1", msg, sig) {
		t.Fatal("a signature verified in another domain")
	}
	if Verify(b.Public(), "weft linkstate v1", msg, sig) {
		t.Fatal("a signature verified under another key")
	}
	if Verify(a.Public(), "weft linkstate v1", []byte("link a->b v8"), sig) {
		t.Fatal("a signature verified for another message")
	}
	if Verify(a.Public()[:5], "weft linkstate v1", msg, sig) || Verify(a.Public(), "weft linkstate v1", msg, sig[:10]) {
		t.Fatal("a truncated key or signature verified")
	}
}

func TestSignerIsTheIdentityKey(t *testing.T) {
	id := Generate()
	s := id.Signer()
	pub, ok := s.Public().(ed25519.PublicKey)
	if !ok || !pub.Equal(id.Public()) {
		t.Fatalf("signer's public key %v is not the identity's %v", s.Public(), id.Public())
	}
	msg := []byte("tls transcript")
	sig, err := s.Sign(rand.Reader, msg, crypto.Hash(0))
	if err != nil {
		t.Fatal(err)
	}
	if !ed25519.Verify(id.Public(), msg, sig) {
		t.Fatal("the signer's signature does not verify against the identity's key")
	}
	// A raw signature is not valid in a domain: the framing keeps the two uses apart.
	if Verify(id.Public(), "weft test v1", msg, sig) {
		t.Fatal("a raw signature verified as a domain signature")
	}
}
