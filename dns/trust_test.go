package dns

import (
	"crypto/ed25519"
	"errors"
	"math"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/weftnet/weft/mesh/identity"
)

// forge signs e as signer (who is not necessarily e.Peer).
func forge(signer *identity.Identity, e Entry) Entry {
	e.Sig = ""
	e.Sig = string(signer.Sign(RecordDomain, e.signedBytes()))
	return e
}

func encodeEntries(t testing.TB, es ...Entry) []byte {
	t.Helper()
	d := &Delta{entries: slices.Clone(es)}
	d.sort()
	return d.Encode()
}

func refusedCount(t testing.TB, r *Replicator, reason string) float64 {
	t.Helper()
	return counterValue(t, r.m.refused.WithLabelValues(reason))
}

// entryOf returns the stored entry of peer for name and addr.
func entryOf(t testing.TB, r *Records, peer, name string, addr netip.Addr) (Entry, bool) {
	t.Helper()
	for _, e := range r.State().Entries() {
		if e.Peer == peer && e.Name == name && e.Addr == addr {
			return e, true
		}
	}
	return Entry{}, false
}

// A member (mallory, whose key every peer knows) tries to add a name in b's
// name, to tombstone b's name and to take over a's own entry; each forged
// entry is refused as bad_signature, whether sent as a delta or relayed in a
// push/pull state, and nothing changes.
func TestForgedEntriesOfOtherOriginsRefused(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, _ := threePeers(t, clk.Now)
	mallory := fm.identity("mallory")
	web := mustAddr(t, "10.40.1.2")
	if err := b.AddContainer("web", []netip.Addr{web}); err != nil {
		t.Fatal(err)
	}
	if err := a.AddContainer("db", addrs(t, "10.40.0.9")); err != nil {
		t.Fatal(err)
	}
	fm.Flush()
	before := a.Records().Encode()
	real, ok := entryOf(t, a.Records(), "b", "web", web)
	if !ok {
		t.Fatal("b's entry did not reach a")
	}
	v := real.Version + 1
	forged := []Entry{
		forge(mallory, Entry{Peer: "b", Name: "evil", Kind: KindAddr, Addr: mustAddr(t, "10.66.0.1"), Version: v}),
		forge(mallory, Entry{Peer: "b", Name: "web", Kind: KindAddr, Addr: web, Version: v, Deleted: true}), // forged tombstone
		forge(mallory, Entry{Peer: "a", Name: "db", Kind: KindAddr, Addr: mustAddr(t, "10.40.0.9"), Version: v + 1000, Deleted: true}),
		// b's real entry with its signature, moved to a newer version: the signature no longer holds.
		func() Entry { e := real; e.Version = v; e.Deleted = true; return e }(),
		// No signature at all.
		{Peer: "b", Name: "nosig", Kind: KindAddr, Addr: mustAddr(t, "10.66.0.2"), Version: v},
	}
	for i, e := range forged {
		msg := encodeEntries(t, e)
		was := refusedCount(t, a, RefusedBadSignature)
		a.NotifyMsg(msg)
		a.MergeRemoteState(msg, false)
		if got := refusedCount(t, a, RefusedBadSignature); got != was+2 {
			t.Errorf("forged entry %d: bad_signature went %v → %v, want +2", i, was, got)
		}
	}
	// Relayed by an honest peer's state: a forged entry mixed with real ones.
	relay := append(b.Records().State().Entries(), forged[0])
	a.MergeRemoteState(encodeEntries(t, relay...), false)
	if string(a.Records().Encode()) != string(before) {
		t.Fatal("forged entries changed the store")
	}
	if got := lookup(a, "web"); !slices.Equal(got, []string{"10.40.1.2@b"}) {
		t.Fatalf("web at a = %v after a forged tombstone", got)
	}
	if got := lookup(a, "evil"); got != nil {
		t.Fatalf("forged name answered: %v", got)
	}
	fm.Flush()
	if len(fm.queue) != 0 {
		t.Fatal("forged entries were answered with broadcasts")
	}
}

// Entries reach peers that never heard their origin: c learns b's names
// from a's push/pull state, signatures intact.
func TestRelayedEntriesVerifyAtEveryHop(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, c := threePeers(t, clk.Now)
	fm.setCut("c", true)
	if err := b.AddContainer("web", addrs(t, "10.40.1.2")); err != nil {
		t.Fatal(err)
	}
	fm.Flush()
	fm.setCut("c", false)
	c.MergeRemoteState(a.LocalState(false), false)
	if got := lookup(c, "web"); !slices.Equal(got, []string{"10.40.1.2@b"}) {
		t.Fatalf("c got %v through a's state", got)
	}
	if n := refusedCount(t, c, RefusedBadSignature); n != 0 {
		t.Fatalf("%v relayed entries refused", n)
	}
}

// An origin whose key is not known yet is refused (unknown_origin); once its
// key is known, PeerUp asks for a sync and push/pull brings its entries.
func TestUnknownOriginRefusedThenRepaired(t *testing.T) {
	clk := newFakeClock()
	fm := newFakeMesh()
	a := fm.add(t, "a", clk.Now, nil)
	lateID := identity.Generate() // not in fm.keys
	late, err := NewReplicator(ReplicatorConfig{
		Records: func() *Records {
			r, err := NewSignedRecords(RecordsConfig{Self: "late", Now: clk.Now, Signer: lateID, Keys: fm.lookup})
			if err != nil {
				t.Fatal(err)
			}
			return r
		}(),
		Broadcast: func([]byte) error { return nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := late.AddContainer("web", addrs(t, "10.40.2.2")); err != nil {
		t.Fatal(err)
	}
	a.MergeRemoteState(late.LocalState(false), false)
	if n := refusedCount(t, a, RefusedUnknownOrigin); n != 1 {
		t.Fatalf("unknown_origin = %v, want 1", n)
	}
	if got := lookup(a, "web"); got != nil {
		t.Fatalf("entry of an unknown origin answered: %v", got)
	}
	fm.mu.Lock()
	fm.keys["late"] = lateID.Public()
	fm.mu.Unlock()
	if !a.PeerUp("late") {
		t.Fatal("PeerUp did not ask for a sync with an origin refused for its key")
	}
	if a.PeerUp("late") {
		t.Fatal("PeerUp asked twice")
	}
	a.MergeRemoteState(late.LocalState(false), false)
	if got := lookup(a, "web"); !slices.Equal(got, []string{"10.40.2.2@late"}) {
		t.Fatalf("after the key arrived: %v", got)
	}
}

// Versions far ahead (2^62, 2^64−1, now + an hour), even signed by their
// real owner, are refused as future_version; the owner's clock does not move
// and its later writes are still accepted everywhere.
func TestFutureVersionsRefusedAndClockNotFrozen(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, _ := threePeers(t, clk.Now)
	bID := fm.identity("b")
	if err := b.AddContainer("web", addrs(t, "10.40.1.2")); err != nil {
		t.Fatal(err)
	}
	fm.Flush()
	clockBefore := b.Records().clock
	for _, v := range []uint64{1 << 62, math.MaxUint64, math.MaxUint64 - 1, uint64(clk.Now().Add(time.Hour).UnixMicro())} {
		e := forge(bID, Entry{Peer: "b", Name: "web", Kind: KindAddr, Addr: mustAddr(t, "10.40.1.2"), Version: v, Deleted: true})
		msg := encodeEntries(t, e)
		for _, r := range []*Replicator{a, b} {
			was := refusedCount(t, r, RefusedFutureVersion)
			r.NotifyMsg(msg)
			r.MergeRemoteState(msg, false)
			if got := refusedCount(t, r, RefusedFutureVersion); got != was+2 {
				t.Errorf("version %d at %s: future_version %v → %v, want +2", v, r.Records().Self(), was, got)
			}
		}
	}
	if b.Records().clock != clockBefore {
		t.Fatalf("b's clock moved from %d to %d", clockBefore, b.Records().clock)
	}
	// Within the skew is fine, and the clock follows it (bounded).
	near := uint64(clk.Now().Add(time.Minute).UnixMicro())
	e := forge(bID, Entry{Peer: "b", Name: "api", Kind: KindAddr, Addr: mustAddr(t, "10.40.1.3"), Version: near})
	b.NotifyMsg(encodeEntries(t, e))
	if c := b.Records().clock; c < near || c > b.Records().versionLimit() {
		t.Fatalf("clock %d, want from %d to the bound", c, near)
	}
	fm.Flush()
	// b's later writes still win at a.
	if err := b.AddContainer("web2", addrs(t, "10.40.1.4")); err != nil {
		t.Fatal(err)
	}
	b.RemoveContainer("web", nil)
	fm.Flush()
	if got := lookup(a, "web2"); !slices.Equal(got, []string{"10.40.1.4@b"}) {
		t.Fatalf("b's later add not accepted: %v", got)
	}
	if got := lookup(a, "web"); got != nil {
		t.Fatalf("b's later remove not accepted: %v", got)
	}
}

// The saturating clock: a store whose clock sits at the cap still hands out
// versions (the cap), never wraps to small ones.
func TestVersionClockSaturates(t *testing.T) {
	r := newTestRecords(t, "a", newFakeClock().Now)
	r.mu.Lock()
	r.clock = maxVersion
	v1 := r.nextVersionLocked()
	v2 := r.nextVersionLocked()
	r.mu.Unlock()
	if v1 != maxVersion || v2 != maxVersion {
		t.Fatalf("versions %d, %d at the cap", v1, v2)
	}
	r.maxSkew = time.Duration(math.MaxInt64)
	r.now = func() time.Time { return time.UnixMicro(math.MaxInt64) }
	if l := r.versionLimit(); l != maxVersion {
		t.Fatalf("limit %d with a huge skew", l)
	}
}

// The owner re-asserts its real state over a newer version of its own entry:
// a genuine one from an old session (same key, state differs) is answered
// with a newer copy of what the owner holds.
func TestOwnerReassertsOverNewerOwnEntry(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, _ := threePeers(t, clk.Now)
	if err := b.AddContainer("web", addrs(t, "10.40.1.2")); err != nil {
		t.Fatal(err)
	}
	fm.Flush()
	// An old session of b, clock a minute ahead, had removed web.
	old := forge(fm.identity("b"), Entry{Peer: "b", Name: "web", Kind: KindAddr, Addr: mustAddr(t, "10.40.1.2"),
		Version: uint64(clk.Now().Add(time.Minute).UnixMicro()), Deleted: true})
	a.NotifyMsg(encodeEntries(t, old)) // a takes it: it is b's, signed, newer
	if got := lookup(a, "web"); got != nil {
		t.Fatalf("a did not take b's newer tombstone: %v", got)
	}
	b.NotifyMsg(encodeEntries(t, old))
	fm.Flush()
	e, ok := entryOf(t, b.Records(), "b", "web", mustAddr(t, "10.40.1.2"))
	if !ok || e.Deleted || e.Version <= old.Version {
		t.Fatalf("b did not re-assert: %+v", e)
	}
	if got := lookup(a, "web"); !slices.Equal(got, []string{"10.40.1.2@b"}) {
		t.Fatalf("a after b re-asserted: %v", got)
	}
}

// Caps: an origin holds at most MaxPerOrigin entries and the store at most
// MaxOrigins origins; breaches are refused and counted; forgetting a peer
// frees its slot.
func TestPerOriginAndOriginCaps(t *testing.T) {
	clk := newFakeClock()
	fm := newFakeMesh()
	small := func(c *ReplicatorConfig) {
		c.Records = fm.signedRecords(t, "a", clk.Now, func(rc *RecordsConfig) { rc.MaxPerOrigin, rc.MaxOrigins = 4, 2 })
	}
	a := fm.add(t, "a", clk.Now, small)
	b := fm.add(t, "b", clk.Now, nil)
	for i := range 6 {
		if err := b.AddContainer("web", []netip.Addr{netip.AddrFrom4([4]byte{10, 40, 1, byte(i + 1)})}); err != nil {
			t.Fatal(err)
		}
	}
	fm.Flush()
	if got := len(lookup(a, "web")); got != 4 {
		t.Fatalf("a holds %d of b's entries, cap 4", got)
	}
	if n := refusedCount(t, a, RefusedOriginFull); n != 2 {
		t.Fatalf("origin_full = %v, want 2", n)
	}
	// Replacing a held entry (a tombstone) is no new entry: accepted at the cap.
	b.RemoveContainer("web", []netip.Addr{netip.AddrFrom4([4]byte{10, 40, 1, 1})})
	fm.Flush()
	if got := len(lookup(a, "web")); got != 3 {
		t.Fatalf("tombstone at the cap: a holds %d live", got)
	}
	// Origins: b and c fit; d does not.
	c := fm.add(t, "c", clk.Now, nil)
	d := fm.add(t, "d", clk.Now, nil)
	c.AddContainer("c1", addrs(t, "10.40.3.1"))
	d.AddContainer("d1", addrs(t, "10.40.4.1"))
	fm.Flush()
	if lookup(a, "c1") == nil || lookup(a, "d1") != nil {
		t.Fatalf("origin cap: c1=%v d1=%v", lookup(a, "c1"), lookup(a, "d1"))
	}
	if n := refusedCount(t, a, RefusedTooManyOrigins); n != 1 {
		t.Fatalf("too_many_origins = %v", n)
	}
	// c leaves the membership: its slot goes to d at the next push/pull.
	a.Records().ForgetPeer("c")
	pushPull(a, d)
	if lookup(a, "d1") == nil {
		t.Fatal("d's entries refused after c was forgotten")
	}
	// The local cap: a refuses to write past its own cap, all or nothing.
	ra := a.Records()
	for i := range 4 {
		if _, err := ra.AddAddr("own", netip.AddrFrom4([4]byte{10, 40, 0, byte(i + 1)})); err != nil {
			t.Fatal(err)
		}
	}
	gen := ra.Generation()
	if err := a.AddName("more", addrs(t, "10.40.0.9"), []SRV{{"http", "tcp", 80}}); !errors.Is(err, ErrTooManyRecords) {
		t.Fatalf("write past the cap: %v", err)
	}
	if ra.Generation() != gen {
		t.Fatal("a refused write changed the store")
	}
}

// A bad SRV entry fails AddName before anything is stored or published.
func TestAddNameAllOrNothing(t *testing.T) {
	fm := newFakeMesh()
	a := fm.add(t, "a", nil, nil)
	err := a.AddName("web", addrs(t, "10.40.0.2"), []SRV{{"http", "tcp", 80}, {"BAD!", "tcp", 81}})
	if !errors.Is(err, ErrInvalidEntry) {
		t.Fatalf("err = %v", err)
	}
	if a.Records().Generation() != 0 || len(fm.queue) != 0 {
		t.Fatal("a refused AddName stored or published something")
	}
	if err := CheckSRV("web", SRV{"http", "sctp", 80}); !errors.Is(err, ErrInvalidEntry) {
		t.Fatalf("CheckSRV: %v", err)
	}
	if err := a.AddName("web", addrs(t, "10.40.0.2"), []SRV{{"http", "tcp", 80}}); err != nil {
		t.Fatal(err)
	}
	if got := a.Records().LookupSRV("web", "http", "tcp"); len(got) != 1 {
		t.Fatalf("srv = %v", got)
	}
}

func TestNewSignedRecordsConfig(t *testing.T) {
	id := identity.Generate()
	keys := func(string) (ed25519.PublicKey, bool) { return nil, false }
	for _, cfg := range []RecordsConfig{
		{Self: "a", Keys: keys},
		{Self: "a", Signer: id},
		{Self: "", Signer: id, Keys: keys},
		{Self: "a", Signer: id, Keys: keys, MaxPerOrigin: -1},
		{Self: "a", Signer: id, Keys: keys, MaxSkew: -time.Second},
	} {
		if _, err := NewSignedRecords(cfg); err == nil {
			t.Errorf("config %+v accepted", cfg)
		}
	}
}

// FuzzMergeExtremeSigned feeds well-formed, correctly signed entries with
// extreme values (versions up to 2^64−1, many entries of one origin, long
// names, tombstones) beside forged ones, and checks the invariants: nothing
// forged is stored, no origin passes its cap, the owner's clock never passes
// the bound, and the owner's next write still wins at the receiver.
func FuzzMergeExtremeSigned(f *testing.F) {
	f.Add(uint64(1<<62), uint16(1), uint8(3), false, false)
	f.Add(uint64(math.MaxUint64), uint16(300), uint8(200), true, true)
	f.Add(uint64(1), uint16(5000), uint8(1), false, true)
	f.Add(uint64(1735787045000000), uint16(70), uint8(63), true, false)
	f.Fuzz(func(t *testing.T, version uint64, count uint16, nameLen uint8, deleted, forged bool) {
		if version == 0 {
			version = 1
		}
		count = count%300 + 1
		nameLen = nameLen%60 + 1
		clk := newFakeClock()
		fm := newFakeMesh()
		a := fm.add(t, "a", clk.Now, func(c *ReplicatorConfig) {
			c.Records = fm.signedRecords(t, "a", clk.Now, func(rc *RecordsConfig) { rc.MaxPerOrigin = 64 })
		})
		b := fm.add(t, "b", clk.Now, nil)
		signer := fm.identity("b")
		if forged {
			signer = fm.identity("mallory")
		}
		name := string(slices.Repeat([]byte("n"), int(nameLen)))
		var es []Entry
		for i := range int(count) {
			es = append(es, forge(signer, Entry{Peer: "b", Name: name, Kind: KindAddr,
				Addr: netip.AddrFrom4([4]byte{10, 41, byte(i >> 8), byte(i)}), Version: version + uint64(i)%3, Deleted: deleted}))
		}
		// An entry of a itself too: the owner path.
		own := fm.identity("a")
		if forged {
			own = signer
		}
		es = append(es, forge(own, Entry{Peer: "a", Name: name, Kind: KindAddr, Addr: netip.AddrFrom4([4]byte{10, 42, 0, 1}), Version: version}))
		msg := encodeEntries(t, es...)
		a.NotifyMsg(msg)
		a.MergeRemoteState(msg, false)
		limit := a.Records().versionLimit()
		if c := a.Records().clock; c > limit {
			t.Fatalf("clock %d past the bound %d", c, limit)
		}
		held := 0
		for _, e := range a.Records().State().Entries() {
			if e.Peer == "b" {
				held++
				if forged {
					t.Fatalf("forged entry stored: %+v", e)
				}
			}
			if e.Version > limit {
				t.Fatalf("entry past the bound stored: %+v", e)
			}
		}
		if held > 64 {
			t.Fatalf("%d entries of b held, cap 64", held)
		}
		// Both owners can still write and be heard.
		if err := a.AddContainer("after", addrs(t, "10.40.0.200")); err != nil {
			t.Fatal(err)
		}
		fm.Flush()
		if got := lookup(b, "after"); !slices.Equal(got, []string{"10.40.0.200@a"}) {
			t.Fatalf("a's write after the merge not heard: %v", got)
		}
	})
}

// BenchmarkMergeSignedState measures a push/pull of a 1000-entry state from another
// origin: "new" verifies every entry (a joiner's first state), "unsigned-new" is the same
// without signatures, "known" is the steady state (nothing changed, nothing verified).
func BenchmarkMergeSignedState(b *testing.B) {
	fm := newFakeMesh()
	clk := newFakeClock()
	src := fm.signedRecords(b, "src", clk.Now, nil)
	for i := range 1000 {
		if _, err := src.AddAddr("web", netip.AddrFrom4([4]byte{10, 40, byte(i >> 8), byte(i)})); err != nil {
			b.Fatal(err)
		}
	}
	state := src.Encode()
	b.Run("new", func(b *testing.B) {
		for range b.N {
			dst := fm.signedRecords(b, "dst", clk.Now, nil)
			if _, err := dst.MergeBytes(state); err != nil || dst.Len() != 1000 {
				b.Fatal(err, dst.Len())
			}
		}
	})
	b.Run("unsigned-new", func(b *testing.B) { // the cost without signatures, for comparison
		u := newTestRecords(b, "src", clk.Now)
		for i := range 1000 {
			u.AddAddr("web", netip.AddrFrom4([4]byte{10, 40, byte(i >> 8), byte(i)}))
		}
		ustate := u.Encode()
		b.ResetTimer()
		for range b.N {
			dst := newTestRecords(b, "dst", clk.Now)
			if _, err := dst.MergeBytes(ustate); err != nil || dst.Len() != 1000 {
				b.Fatal(err, dst.Len())
			}
		}
	})
	b.Run("known", func(b *testing.B) {
		dst := fm.signedRecords(b, "dst", clk.Now, nil)
		dst.MergeBytes(state)
		b.ResetTimer()
		for range b.N {
			if ch, err := dst.MergeBytes(state); err != nil || !ch.Empty() {
				b.Fatal(err)
			}
		}
	})
}

// Verification runs outside the store's mutex: while a merge is stuck verifying (its key
// lookup blocks here), queries are still answered.
func TestQueriesNotBlockedByVerification(t *testing.T) {
	fm := newFakeMesh()
	src := fm.signedRecords(t, "src", nil, nil)
	if _, err := src.AddAddr("web", mustAddr(t, "10.40.0.2")); err != nil {
		t.Fatal(err)
	}
	inLookup, release := make(chan struct{}), make(chan struct{})
	dst := fm.signedRecords(t, "dst", nil, func(c *RecordsConfig) {
		c.Keys = func(o string) (ed25519.PublicKey, bool) {
			close(inLookup)
			<-release
			return fm.lookup(o)
		}
	})
	if _, err := dst.AddAddr("db", mustAddr(t, "10.40.0.3")); err != nil {
		t.Fatal(err)
	}
	merged := make(chan *Delta)
	go func() { merged <- dst.Merge(src.State()) }()
	<-inLookup
	answered := make(chan []Target)
	go func() { ts, _ := dst.LookupName("db"); answered <- ts }()
	select {
	case ts := <-answered:
		if len(ts) != 1 {
			t.Fatalf("lookup during verification: %v", ts)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a query waited for a merge's signature checks")
	}
	close(release)
	if ch := <-merged; ch.Len() != 1 {
		t.Fatalf("merge after verification changed %d entries", ch.Len())
	}
}

// The same address twice in one AddName is one entry, broadcast at the version stored.
func TestAddNameDuplicateAddress(t *testing.T) {
	r := newTestRecords(t, "a", newFakeClock().Now)
	d, err := r.AddName("web", addrs(t, "10.40.0.2", "10.40.0.2"), nil)
	if err != nil || d.Len() != 1 {
		t.Fatalf("delta %v, %v", d.Entries(), err)
	}
	if st := r.State().Entries(); len(st) != 1 || st[0] != d.Entries()[0] {
		t.Fatalf("stored %v, broadcast %v", st, d.Entries())
	}
}

// A message cannot make a peer verify more than it could keep: entries past an origin's
// cap are refused before verification, and after maxForgeries bad signatures the rest of
// the message is refused unchecked.
func TestVerificationBoundedPerMessage(t *testing.T) {
	clk := newFakeClock()
	fm := newFakeMesh()
	bID, mallory := fm.identity("b"), fm.identity("mallory")
	lookups := 0
	a := fm.add(t, "a", clk.Now, func(c *ReplicatorConfig) {
		c.Records = fm.signedRecords(t, "a", clk.Now, func(rc *RecordsConfig) {
			rc.MaxPerOrigin = 10
			rc.Keys = func(o string) (ed25519.PublicKey, bool) { lookups++; return fm.lookup(o) }
		})
	})
	v := uint64(clk.Now().UnixMicro())
	var own, forged []Entry
	for i := range 1000 {
		addr := netip.AddrFrom4([4]byte{10, 41, byte(i >> 8), byte(i)})
		own = append(own, forge(bID, Entry{Peer: "b", Name: "web", Kind: KindAddr, Addr: addr, Version: v}))
		forged = append(forged, forge(mallory, Entry{Peer: "c", Name: "web", Kind: KindAddr, Addr: addr, Version: v}))
	}
	fm.identity("c")
	a.MergeRemoteState(encodeEntries(t, own...), false)
	if lookups != 10 || len(lookup(a, "web")) != 10 || refusedCount(t, a, RefusedOriginFull) != 990 {
		t.Fatalf("1000 entries of one origin, cap 10: %d verified, %d kept, origin_full %v",
			lookups, len(lookup(a, "web")), refusedCount(t, a, RefusedOriginFull))
	}
	lookups = 0
	a.MergeRemoteState(encodeEntries(t, forged[:10]...), false)
	if lookups != maxForgeries || refusedCount(t, a, RefusedBadSignature) != maxForgeries || refusedCount(t, a, RefusedAfterForgery) != 10-maxForgeries {
		t.Fatalf("forged message: %d verified, bad_signature %v, after_forgery %v", lookups,
			refusedCount(t, a, RefusedBadSignature), refusedCount(t, a, RefusedAfterForgery))
	}
}
