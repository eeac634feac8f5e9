package mesh

// Key pins: the first public key a peer name is seen with (in metadata that
// memberlist accepted, so from a holder of the cluster key) is pinned to the
// name and kept in the data dir. Metadata naming a pinned peer with another
// key is refused: a member forging another's metadata, or a reinstalled host
// that lost its identity.key. The operator clears a pin by removing the peer
// (`weft rmpeer NAME`, which calls Mesh.Unpin); the host then comes back with
// its new key. Trust on first use, as ssh's known_hosts: a forger that is
// first to announce a name wins it, which needs the cluster key and a name
// no peer uses yet.
//
// Costs: O(1) per check; the file holds one line per name ever pinned
// (bounded by maxPins) and is rewritten, O(pins), at most once per flush
// (the mesh's state loop, about every probe interval, and Close).

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"
)

// ErrKeyMismatch: a peer announced a public key other than the one pinned
// for its name.
var ErrKeyMismatch = errors.New("mesh: public key does not match the pinned key")

// maxPins bounds the names pinned; more are refused (counted), so that a
// member announcing fresh names cannot grow the file without end. Far above
// any cluster weft is built for.
const maxPins = 65536

const pinsFileVersion = 1

// keyPins maps peer names to pinned public keys. Its lock is a leaf.
type keyPins struct {
	path string // "": not persisted

	mu    sync.Mutex // guards following
	pins  map[string]ed25519.PublicKey
	dirty bool
}

type pinsFile struct {
	Version int               `json:"version"`
	Pins    map[string]string `json:"pins"` // name → base64 public key
}

// loadKeyPins reads the pins file at path ("" or missing: no pins). A
// corrupt file is an error: silently dropping pins would re-open trust on
// first use for every peer.
func loadKeyPins(path string) (*keyPins, error) {
	k := &keyPins{path: path, pins: map[string]ed25519.PublicKey{}}
	if path == "" {
		return k, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return k, nil
	}
	if err != nil {
		return nil, fmt.Errorf("mesh: key pins: %w", err)
	}
	var f pinsFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%w: key pins file %s: %v (move it away to start over)", ErrInvalidConfig, path, err)
	}
	if f.Version != pinsFileVersion {
		return nil, fmt.Errorf("%w: key pins file %s: version %d, this peer understands %d", ErrInvalidConfig, path, f.Version, pinsFileVersion)
	}
	if len(f.Pins) > maxPins {
		return nil, fmt.Errorf("%w: key pins file %s: %d pins, at most %d", ErrInvalidConfig, path, len(f.Pins), maxPins)
	}
	for name, s := range f.Pins {
		key, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(key) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("%w: key pins file %s: key of %q is not a base64 ed25519 public key", ErrInvalidConfig, path, name)
		}
		if err := validName(name); err != nil {
			return nil, fmt.Errorf("%w: key pins file %s: name %q: %v", ErrInvalidConfig, path, name, err)
		}
		k.pins[name] = key
	}
	return k, nil
}

// check pins key to name on first sight and reports whether it is the
// pinned key. O(1).
func (k *keyPins) check(name string, key ed25519.PublicKey) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	pinned, ok := k.pins[name]
	switch {
	case ok && pinned.Equal(key):
		return nil
	case ok:
		return fmt.Errorf("%w: peer %q announced key %s, pinned %s; if its host was reinstalled, run `weft rmpeer %s` to clear the pin",
			ErrKeyMismatch, name, shortKey(key), shortKey(pinned), name)
	case len(k.pins) >= maxPins:
		return fmt.Errorf("%w: %d names pinned, at most %d; peer %q refused", ErrKeyMismatch, len(k.pins), maxPins, name)
	}
	k.pins[name] = append(ed25519.PublicKey(nil), key...)
	k.dirty = true
	return nil
}

// get returns the key pinned for name. O(1).
func (k *keyPins) get(name string) (ed25519.PublicKey, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	key, ok := k.pins[name]
	return key, ok
}

// names lists the pinned names. O(pins).
func (k *keyPins) names() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]string, 0, len(k.pins))
	for n := range k.pins {
		out = append(out, n)
	}
	return out
}

// drop clears name's pin; false when there was none.
func (k *keyPins) drop(name string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.pins[name]; !ok {
		return false
	}
	delete(k.pins, name)
	k.dirty = true
	return true
}

// flush writes the pins when they changed (temporary file, fsync, rename:
// a crash leaves the old or the new file, never half of one). O(pins).
func (k *keyPins) flush() error {
	if k.path == "" {
		return nil
	}
	k.mu.Lock()
	if !k.dirty {
		k.mu.Unlock()
		return nil
	}
	f := pinsFile{Version: pinsFileVersion, Pins: make(map[string]string, len(k.pins))}
	for name, key := range k.pins {
		f.Pins[name] = base64.StdEncoding.EncodeToString(key)
	}
	k.dirty = false
	k.mu.Unlock()
	b, err := json.MarshalIndent(f, "", "  ")
	if err == nil {
		err = writeFileAtomic(k.path, b)
	}
	if err != nil {
		k.mu.Lock()
		k.dirty = true // try again at the next flush
		k.mu.Unlock()
		return fmt.Errorf("mesh: write key pins: %w", err)
	}
	return nil
}

func shortKey(k ed25519.PublicKey) string {
	s := base64.StdEncoding.EncodeToString(k)
	if len(s) > 12 {
		s = s[:12] + "…"
	}
	return s
}
