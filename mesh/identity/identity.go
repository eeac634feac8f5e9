// Package identity is a peer's ed25519 identity: a private key kept in the peer's data
// directory, and signatures bound to a domain so that a signature made for one kind of
// message (link state, a DNS record, a usage report, a coordinate) is never valid for another.
//
// The public key travels in the peer's gossip metadata; receivers verify every entry an
// origin publishes against that origin's key, so a member holding the cluster key can still
// change only its own entries.
package identity

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// FileName is the identity's file inside the data directory.
const FileName = "identity.key"

// ErrBadKeyFile: the identity file exists but is not a private key weft wrote.
var ErrBadKeyFile = errors.New("identity: bad key file")

// Identity signs on behalf of one peer.
type Identity struct {
	priv ed25519.PrivateKey
}

// LoadOrCreate reads <dir>/identity.key, or makes a new key and writes it there (mode 0600,
// written to a temporary file and renamed, so a crash never leaves half a key). A key file
// readable by group or others is refused: anyone who reads it can speak for this peer.
func LoadOrCreate(dir string) (*Identity, error) {
	path := filepath.Join(dir, FileName)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		st, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("identity: %w", err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("%w: %s is mode %o, want 0600 (chmod 600 %s)", ErrBadKeyFile, path, st.Mode().Perm(), path)
		}
		if len(b) != ed25519.SeedSize {
			return nil, fmt.Errorf("%w: %s holds %d bytes, want %d", ErrBadKeyFile, path, len(b), ed25519.SeedSize)
		}
		return &Identity{priv: ed25519.NewKeyFromSeed(b)}, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("identity: %w", err)
	}
	seed := make([]byte, ed25519.SeedSize)
	if _, err := rand.Read(seed); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	tmp, err := os.CreateTemp(dir, FileName+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("identity: %w", err)
	}
	if _, err := tmp.Write(seed); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("identity: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("identity: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	return &Identity{priv: ed25519.NewKeyFromSeed(seed)}, nil
}

// New wraps an existing private key (tests, simulations).
func New(priv ed25519.PrivateKey) *Identity { return &Identity{priv: priv} }

// Generate makes a fresh identity that lives only in memory (tests, simulations).
func Generate() *Identity {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(fmt.Sprintf("identity: crypto/rand failed: %v", err))
	}
	return &Identity{priv: priv}
}

// Public is the key that goes into gossip metadata.
func (i *Identity) Public() ed25519.PublicKey {
	return i.priv.Public().(ed25519.PublicKey)
}

// Signer is the ed25519 private key as a crypto.Signer, for uses that sign outside this
// package's domains: the peer transport's TLS leaf key, so that a certificate's key is the
// key the mesh pinned for the peer's name.
func (i *Identity) Signer() crypto.Signer { return i.priv }

// Sign signs msg for one domain (e.g. "weft linkstate v1").
func (i *Identity) Sign(domain string, msg []byte) []byte {
	return ed25519.Sign(i.priv, framed(domain, msg))
}

// Verify reports whether sig is pub's signature of msg in domain. A key of the wrong size
// is never valid (ed25519.Verify would panic on it).
func Verify(pub ed25519.PublicKey, domain string, msg, sig []byte) bool {
	if len(pub) != ed25519.PublicKeySize || len(sig) != ed25519.SignatureSize {
		return false
	}
	return ed25519.Verify(pub, framed(domain, msg), sig)
}

// framed prefixes msg with its domain and a zero byte, so no message of one domain can be
// read as a message of another.
func framed(domain string, msg []byte) []byte {
	b := make([]byte, 0, len(domain)+1+len(msg))
	b = append(b, domain...)
	b = append(b, 0)
	return append(b, msg...)
}

// Signer is what a publisher needs: its consumers own narrower copies of this interface.
type Signer interface {
	Sign(domain string, msg []byte) []byte
}

// KeyLookup returns the public key an origin announced in gossip (pinned on first sight);
// false when the origin is unknown, so its entries cannot be verified yet.
type KeyLookup func(origin string) (ed25519.PublicKey, bool)
