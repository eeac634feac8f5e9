package router

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/weftnet/weft/mesh/identity"
)

func TestRecordSigning(t *testing.T) {
	ida, idb := identity.Generate(), identity.Generate()
	pinned := map[string]ed25519.PublicKey{"a": ida.Public(), "b": idb.Public()}
	keys := func(peer string) (ed25519.PublicKey, bool) { k, ok := pinned[peer]; return k, ok }
	signA := recordSigning{domain: labelSignDomain, signer: ida, keys: keys}
	check := recordSigning{domain: labelSignDomain, keys: keys}

	rec := labelRecord{Peer: "a", Addr: netip.MustParseAddr("10.40.0.2"), Container: "c1", Network: "default",
		Labels: map[string]string{"app": "db"}, Version: 7}
	rec.Sig = signA.sign(rec.seal())
	if err := check.verify(rec.seal()); err != nil {
		t.Fatalf("a's own record refused: %v", err)
	}

	tampered := rec
	tampered.Labels = map[string]string{"app": "web"}
	bumped := rec
	bumped.Version++ // a newer version must be signed anew
	byB := rec
	byB.Sig = recordSigning{domain: labelSignDomain, signer: idb}.sign(rec.seal()) // b in a's name
	otherDomain := rec
	otherDomain.Sig = recordSigning{domain: segmentSignDomain, signer: ida}.sign(rec.seal())
	unknown := rec
	unknown.Peer = "z"
	unsigned := rec
	unsigned.Sig = nil
	for name, r := range map[string]labelRecord{"tampered": tampered, "bumped": bumped, "wrong key": byB,
		"other domain": otherDomain, "unknown peer": unknown, "unsigned": unsigned} {
		if err := check.verify(r.seal()); !errors.Is(err, errRecordSignature) {
			t.Errorf("%s: verify = %v, want errRecordSignature", name, err)
		}
	}
	// Without keys nothing is checked (tests); without a signer nothing is signed.
	if err := (recordSigning{domain: labelSignDomain}).verify(tampered.seal()); err != nil {
		t.Errorf("unchecked verify: %v", err)
	}
	if sig := (recordSigning{domain: labelSignDomain}).sign(rec.seal()); sig != nil {
		t.Errorf("signed without a signer: %x", sig)
	}

	// A replay at an old version, or the same version again, does not replace what is held.
	old := rec
	old.Version = 3
	old.Sig = signA.sign(old.seal())
	if err := check.verify(old.seal()); err != nil {
		t.Fatalf("old record: %v", err)
	}
	for _, c := range []struct {
		name      string
		r         labelRecord
		have      bool
		supersede bool
	}{
		{"first seen", old, false, true},
		{"replay of an old version", old, true, false},
		{"same version again", rec, true, false},
		{"newer version", bumped, true, true},
	} {
		if got := supersedes(c.r.Version, rec.Version, c.have); got != c.supersede {
			t.Errorf("%s: supersedes = %v, want %v", c.name, got, c.supersede)
		}
	}
}

// What is signed is the record's JSON without its signature, field for field as it
// travels: peers running the code before signedrecord.go must verify the same bytes.
func TestRecordSignedBytesWire(t *testing.T) {
	lr := labelRecord{Peer: "a", Addr: netip.MustParseAddr("10.40.0.2"), Container: "c", Network: "n",
		Labels: map[string]string{"b": "2", "a": "1"}, Version: 9, Sig: []byte{1, 2}}
	if got, want := string(lr.seal().signedBytes()),
		`{"p":"a","a":"10.40.0.2","c":"c","n":"n","l":{"a":"1","b":"2"},"v":9}`; got != want {
		t.Errorf("label record signs\n%s, want\n%s", got, want)
	}
	sr := segmentRecord{Peer: "b", Version: 4, Tunnels: []tunnelCount{{Peer: "a", TX: 1, RX: 2}}, Sig: []byte{3}}
	if got, want := string(sr.seal().signedBytes()), `{"p":"b","v":4,"t":[{"p":"a","tx":1,"rx":2}]}`; got != want {
		t.Errorf("segment record signs\n%s, want\n%s", got, want)
	}
	// The seal leaves the record itself alone: its signature still travels.
	if b, _ := json.Marshal(sr); string(b) != `{"p":"b","v":4,"t":[{"p":"a","tx":1,"rx":2}],"s":"Aw=="}` {
		t.Errorf("segment record travels as %s", b)
	}
}

func TestDecodeGossip(t *testing.T) {
	if r, reason, err := decodeGossip[segmentRecord]("broadcast", []byte(`{"p":"b","v":4}`), 64); err != nil || reason != "" || r.Peer != "b" || r.Version != 4 {
		t.Errorf("a good record: %+v %q %v", r, reason, err)
	}
	for _, c := range []struct {
		msg    string
		reason string
	}{
		{`{"p":"b","v":4}` + strings.Repeat(" ", 64), "oversize"}, // refused before decoding
		{`{"p":"b","v":`, "malformed"},
		{`{"p":1}`, "malformed"},
	} {
		if _, reason, err := decodeGossip[segmentRecord]("broadcast", []byte(c.msg), 64); err == nil || reason != c.reason {
			t.Errorf("%q: %q %v, want %s", c.msg, reason, err, c.reason)
		}
	}
}
