package router

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/weftnet/weft/mesh/identity"
)

// Signed, versioned gossip records (labels, segments): a peer publishes records in its own
// name, signed with its identity under a domain of their kind; a receiver keeps one only if
// it verifies against the key the mesh pinned for that peer, and only a higher version
// replaces the one it holds. This file is that shared part, with the bounded decoding of
// the gossip that carries them. Each kind keeps its own checks of content and its own order
// of refusals (they are counted by reason).

// errRecordSignature: a gossiped record's signature is missing, wrong, or its peer's key
// is not known yet.
var errRecordSignature = errors.New("record does not verify")

// recordSeal is what signing and verifying need of one record.
type recordSeal struct {
	peer string // who signed it, in whose name it speaks
	sig  []byte
	body any // the record with its signature cleared: what is signed
}

// signedBytes is what the peer signs: the record without its signature, as JSON
// (encoding/json keeps field order and sorts map keys, so every peer encodes it alike).
func (s recordSeal) signedBytes() []byte {
	b, _ := json.Marshal(s.body)
	return b
}

// supersedes says whether a record at version next replaces the one held at version cur
// (have: one is held). Only a higher version does, so a replayed record, or the same one
// again, changes nothing. Pure; cheap, as it runs on every gossiped copy.
func supersedes(next, cur uint64, have bool) bool {
	return !have || cur < next
}

// recordSigning signs this peer's records of one kind and verifies the others'.
type recordSigning struct {
	domain string                                      // e.g. "weft labels v1"
	signer identity.Signer                             // nil: records go unsigned (tests)
	keys   func(peer string) (ed25519.PublicKey, bool) // nil: signatures not checked (tests)
}

// sign returns the signature of s; nil when there is no signer.
func (g recordSigning) sign(s recordSeal) []byte {
	if g.signer == nil {
		return nil
	}
	return g.signer.Sign(g.domain, s.signedBytes())
}

// verify says why s is not its peer's own record; nil when it is, or when nothing is
// checked. Costs one ed25519 verification.
func (g recordSigning) verify(s recordSeal) error {
	if g.keys == nil {
		return nil
	}
	pub, ok := g.keys(s.peer)
	if !ok {
		return fmt.Errorf("%w: no key known for peer %s", errRecordSignature, s.peer)
	}
	if !identity.Verify(pub, g.domain, s.signedBytes(), s.sig) {
		return fmt.Errorf("%w: bad signature in the name of %s", errRecordSignature, s.peer)
	}
	return nil
}

// decodeGossip decodes a gossiped message (what: "broadcast", "state") of at most limit
// bytes. On failure it returns the reason to count the refusal under: "oversize" (not
// decoded at all) or "malformed".
func decodeGossip[T any](what string, msg []byte, limit int) (v T, reason string, err error) {
	if len(msg) > limit {
		return v, "oversize", fmt.Errorf("%s of %d bytes", what, len(msg))
	}
	if err := json.Unmarshal(msg, &v); err != nil {
		return v, "malformed", err
	}
	return v, "", nil
}
