package mesh

// Tests of origins bound to their owner: signed link state, bounded
// versions, unknown origins, pruning with membership (#12).

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh/identity"
)

// A publication forwarded by a third peer still verifies: its signature is
// the origin's, kept with the entries and sent unchanged.
func TestLinkStateSignatureSurvivesForwarding(t *testing.T) {
	a := newTable(t, LinkTableConfig{})
	b := newTable(t, LinkTableConfig{})
	c := newTable(t, LinkTableConfig{})
	msgs, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(2), 0)})
	mergeAll(t, b, msgs)
	_, fwd, err := b.Missing(c.Digest("c"))
	if err != nil || len(fwd) == 0 {
		t.Fatalf("b's answer to c: %d messages, %v", len(fwd), err)
	}
	// Only a's key verifies a's entries: c with a lookup that gives a
	// another key refuses the forwarded message.
	wrong := func(name string) (ed25519.PublicKey, bool) { return testIdentity("mallory").Public(), true }
	if _, err := c.Merge(fwd[0], wrong); !errors.Is(err, ErrBadLinkState) {
		t.Fatalf("forwarded entries verified with the wrong key: %v", err)
	}
	if _, err := c.Merge(fwd[0], testKeys); err != nil {
		t.Fatalf("forwarded entries with a's key: %v", err)
	}
	if m, ok := c.Link("a", "c"); !ok || m.RTT != ms(2) {
		t.Errorf("c sees a→c %+v %v", m, ok)
	}
}

// A member signing entries in another origin's name is refused and
// counted, even inside an answer that also carries honest publications.
func TestLinkStateForgedOriginRefused(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	v := uint64(now.UnixMicro())
	reg := prometheus.NewRegistry()
	tab := newTable(t, LinkTableConfig{Now: func() time.Time { return now }, Registerer: reg})
	honest := entriesMsg("b", entry("c", flagUp, v, 1, 1, 0))
	forgedA := forged(entriesMsg("a", entry("c", flagUp, v, 1, 1, 0)), "b")
	// One message with both publications (as an anti-entropy answer).
	both := append([]byte{linkStateVersion, linkStateEntries, 2}, honest[3:]...)
	both = append(both, forgedA[3:]...)
	if _, err := tab.Merge(both, testKeys); !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), `origin "a"`) {
		t.Fatalf("forged publication: %v", err)
	}
	if len(tab.Graph()) != 0 {
		t.Errorf("a message with a forged publication was applied in part: %v", tab.Graph())
	}
	if n := counterValue(t, reg, "weft_linkstate_rejected_total", "bad_signature"); n != 1 {
		t.Errorf("bad_signature counted %v times, want 1", n)
	}
	if _, err := tab.Merge(honest, testKeys); err != nil {
		t.Fatalf("honest publication: %v", err)
	}
}

// Versions at the top of uint64 or far in the future are refused; the
// owner keeps publishing; an owner that sees its own (signed) entry above
// its version re-asserts its state above it; increments saturate.
func TestLinkStateVersionBounds(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	reg := prometheus.NewRegistry()
	owner := newTable(t, LinkTableConfig{Now: clock, Registerer: reg})
	other := newTable(t, LinkTableConfig{Now: clock})
	first, _ := owner.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	mergeAll(t, other, first)
	for _, v := range []uint64{math.MaxUint64, math.MaxUint64 - 1, uint64(now.Add(time.Hour).UnixMicro())} {
		bad := entriesMsg("a", entry("b", flagUp, v, 99, 1, 0))
		for _, tab := range []*LinkTable{owner, other} {
			if _, err := tab.Merge(bad, testKeys); !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), "ahead of our clock") {
				t.Fatalf("version %d: %v", v, err)
			}
		}
	}
	if n := counterValue(t, reg, "weft_linkstate_rejected_total", "future_version"); n != 3 {
		t.Errorf("future_version counted %v, want 3", n)
	}
	now = now.Add(time.Second)
	msgs, _ := owner.Publish("a", map[string]LinkStats{"b": up(ms(5), 0)})
	mergeAll(t, other, msgs)
	if m, _ := other.Link("a", "b"); m.RTT != ms(5) {
		t.Fatalf("the owner's next publication was not taken: %+v", m)
	}

	// Our own entry, signed by us, at a version within the bound but
	// above ours (our clock stepped back 4 minutes): re-asserted above it.
	ahead := now.Add(4 * time.Minute)
	past := newTable(t, LinkTableConfig{Now: func() time.Time { return ahead }})
	stale, _ := past.Publish("a", map[string]LinkStats{"b": up(ms(77), 0), "x": up(ms(1), 0)})
	mergeAll(t, other, stale)
	mergeAll(t, owner, stale)
	if m, _ := owner.Link("a", "b"); m.RTT != ms(5) {
		t.Fatalf("the owner took an entry of its own from elsewhere: %+v", m)
	}
	now = now.Add(time.Second)
	re, _ := owner.Publish("a", map[string]LinkStats{"b": up(ms(5), 0)})
	if len(re) == 0 || owner.Version("a") <= past.Version("a") {
		t.Fatalf("no re-assertion above %d (version %d)", past.Version("a"), owner.Version("a"))
	}
	mergeAll(t, other, re)
	if m, _ := other.Link("a", "b"); m.RTT != ms(5) {
		t.Errorf("others keep the stale entry: %+v", m)
	}
	if _, ok := other.Link("a", "x"); ok {
		t.Error("the stale a→x was not withdrawn")
	}

	// Saturation: with our floor at the top, the version stays there.
	if satInc(math.MaxUint64) != math.MaxUint64 || satInc(1) != 2 {
		t.Fatal("satInc")
	}
	top := newTable(t, LinkTableConfig{Now: clock})
	top.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	top.mu.Lock()
	top.selfFloor = math.MaxUint64
	top.republish = true
	top.mu.Unlock()
	if msgs, _ := top.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)}); len(msgs) == 0 || top.Version("a") != math.MaxUint64 {
		t.Errorf("publication at the top: %d messages, version %d", len(msgs), top.Version("a"))
	}

	// A digest claiming a version from the future is ignored for that
	// origin (counted): the sender still gets its entries.
	d := []byte{linkStateVersion, linkStateDigest, 1, 'z', 1, 1, 'a', 0}
	d = appendUvarint(d, math.MaxUint64)
	d = append(d, 0, 0, 0, 0, 0, 0, 0, 1)
	peer, ans, err := other.Missing(d)
	if err != nil || peer != "z" || len(ans) == 0 {
		t.Errorf("digest with a future version: peer %q, %d messages, %v", peer, len(ans), err)
	}
}

// An origin whose key is not known yet is skipped (counted), and taken
// when anti-entropy brings it again once its key is known.
func TestLinkStateUnknownOriginLater(t *testing.T) {
	reg := prometheus.NewRegistry()
	a := newTable(t, LinkTableConfig{})
	b := newTable(t, LinkTableConfig{})
	c := newTable(t, LinkTableConfig{Registerer: reg})
	pa, _ := a.Publish("a", map[string]LinkStats{"c": up(ms(1), 0)})
	b.Publish("b", map[string]LinkStats{"c": up(ms(2), 0)})
	mergeAll(t, b, pa)
	onlyB := func(name string) (ed25519.PublicKey, bool) {
		if name == "b" {
			return testKeys(name)
		}
		return nil, false
	}
	// b's answer to c carries a's and b's publications; c knows only b.
	_, ans, err := b.Missing(c.Digest("c"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ans {
		if _, err := c.Merge(m, onlyB); err != nil {
			t.Fatalf("merge with an unknown origin: %v", err)
		}
	}
	if _, ok := c.Link("a", "c"); ok {
		t.Fatal("an entry of an origin with no known key was taken")
	}
	if _, ok := c.Link("b", "c"); !ok {
		t.Fatal("the known origin's entry was dropped with the unknown one")
	}
	if n := counterValue(t, reg, "weft_linkstate_rejected_total", "unknown_origin"); n != 1 {
		t.Errorf("unknown_origin counted %v, want 1", n)
	}
	// a's key becomes known (a joined): the next push/pull brings it.
	exchangeKeys(t, b, "b", c, "c", testKeys)
	if m, ok := c.Link("a", "c"); !ok || m.RTT != ms(1) {
		t.Errorf("after anti-entropy c sees a→c %+v %v", m, ok)
	}
}

func exchangeKeys(t *testing.T, x *LinkTable, xName string, y *LinkTable, yName string, keys identity.KeyLookup) {
	t.Helper()
	for _, d := range [][2]*LinkTable{{x, y}, {y, x}} {
		toName := yName
		if d[1] == x {
			toName = xName
		}
		_, msgs, err := d[0].Missing(d[1].Digest(toName))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range msgs {
			if _, err := d[1].Merge(m, keys); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// 12,288 origins: one member cannot publish them (not its key); as many
// members fill the table to its bound and no further; once they leave the
// membership they are pruned, and push/pull works throughout.
func TestLinkStateOriginsPrunedWithMembership(t *testing.T) {
	if testing.Short() {
		t.Skip("signs and verifies 24k publications")
	}
	const n = 12288
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	v := uint64(now.UnixMicro())
	reg := prometheus.NewRegistry()
	tab := newTable(t, LinkTableConfig{Now: clock, Registerer: reg, TombstoneTTL: time.Minute})
	tab.Publish("self", map[string]LinkStats{"o00000": up(ms(1), 0)})
	names := make([]string, n)
	ids := map[string]*identity.Identity{}
	for i := range n {
		names[i] = fmt.Sprintf("o%05d", i)
		ids[names[i]] = identity.Generate()
	}
	members := map[string]bool{"self": true}
	keys := func(name string) (ed25519.PublicKey, bool) {
		if !members[name] {
			return nil, false
		}
		if name == "self" {
			return testKeys(name)
		}
		return ids[name].Public(), true
	}
	msg := func(name string, signer *identity.Identity) []byte {
		g := []byte{byte(len(name))}
		g = append(g, name...)
		g = append(g, 1)
		g = append(g, entry("self", flagUp, v, 1, 1, 0)...)
		b := append([]byte{linkStateVersion, linkStateEntries, 1}, g...)
		return append(b, signer.Sign(linkStateSignDomain, g)...)
	}
	for _, name := range names {
		members[name] = true
	}
	// One member, mallory, signing for all of them: nothing is taken.
	mallory := identity.Generate()
	for _, name := range names[:512] {
		if _, err := tab.Merge(msg(name, mallory), keys); !errors.Is(err, ErrBadLinkState) {
			t.Fatalf("%s signed by another member: %v", name, err)
		}
	}
	if got := len(tab.Graph()); got != 1 {
		t.Fatalf("forged origins taken: %d origins", got)
	}
	// As many members as origins: the bound holds.
	refused := 0
	for _, name := range names {
		if _, err := tab.Merge(msg(name, ids[name]), keys); err != nil {
			refused++
		}
	}
	if refused != n+1-8192 {
		t.Errorf("%d origins refused, want %d", refused, n+1-8192)
	}
	if c := counterValue(t, reg, "weft_linkstate_rejected_total", "too_many_origins"); int(c) != refused {
		t.Errorf("too_many_origins counted %v, refused %d", c, refused)
	}
	// Push/pull works: another table answers our digest, and ours answers it.
	other := newTable(t, LinkTableConfig{Now: clock})
	if _, _, err := other.Missing(tab.Digest("self")); err != nil {
		t.Fatalf("a full table's digest: %v", err)
	}
	// All but ten leave the membership: pruned, and after the tombstone
	// TTL forgotten; new origins are taken again.
	for _, name := range names[10:] {
		delete(members, name)
	}
	removed := tab.Prune(keys)
	if len(removed) != 8191-10 {
		t.Errorf("prune removed %d links, want %d", len(removed), 8191-10)
	}
	now = now.Add(2 * time.Minute)
	tab.Publish("self", map[string]LinkStats{"o00000": up(ms(1), 0), "o00001": up(ms(1), 0)}) // sweeps
	_, _, err := other.Missing(tab.Digest("self"))
	if err != nil {
		t.Fatal(err)
	}
	if d := tab.Digest("self"); len(d) > 1024 {
		t.Errorf("digest after pruning: %d bytes", len(d))
	}
	members["o09999"] = true
	if _, err := tab.Merge(msg("o09999", ids["o09999"]), keys); err != nil {
		t.Errorf("a new origin after pruning: %v", err)
	}
}

func appendUvarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

// FuzzLinkStateSignedExtreme feeds validly signed publications with valid
// but extreme values (versions up to 2^64−1, durations and loss at and
// past their bounds, any flags, many entries): each is taken or refused
// whole with ErrBadLinkState, nothing refused changes the table, the
// owner keeps publishing above anything taken, and what was taken
// forwards to a third table unchanged.
func FuzzLinkStateSignedExtreme(f *testing.F) {
	now := time.Unix(1_700_000_000, 0)
	v := uint64(now.UnixMicro())
	f.Add(v, uint64(1000), uint64(10), uint64(0), byte(flagUp), uint16(1))
	f.Add(uint64(math.MaxUint64), uint64(1), uint64(1), uint64(0), byte(flagUp), uint16(1))
	f.Add(v+uint64(5*time.Minute/time.Microsecond), uint64(3600_000_000), uint64(3600_000_000), uint64(10000), byte(flagUp|flagEncrypted), uint16(256))
	f.Add(uint64(1), uint64(math.MaxUint64), uint64(0), uint64(math.MaxUint64), byte(flagRemoved), uint16(300))
	f.Fuzz(func(t *testing.T, version, rtt, jitter, loss uint64, flags byte, count uint16) {
		cur := now
		clock := func() time.Time { return cur }
		tab := newTable(t, LinkTableConfig{Now: clock})
		owner := newTable(t, LinkTableConfig{Now: clock})
		base, _ := owner.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
		mergeAll(t, tab, base)
		n := int(count%400) + 1
		es := make([][]byte, n)
		for i := range n {
			es[i] = entry(fmt.Sprintf("n%04d", i), flags, version, rtt, jitter, loss)
		}
		msg := entriesMsg("a", es...)
		before := fmt.Sprint(tab.Graph(), tab.Digest("x"))
		changes, err := tab.Merge(msg, testKeys)
		if err != nil {
			if !errors.Is(err, ErrBadLinkState) {
				t.Fatalf("error %v does not wrap ErrBadLinkState", err)
			}
			if changes != nil || fmt.Sprint(tab.Graph(), tab.Digest("x")) != before {
				t.Fatal("a refused publication changed the table")
			}
		}
		if tab.Version("a") > uint64(now.Add(5*time.Minute).UnixMicro()) {
			t.Fatalf("a version beyond the bound was taken: %d", tab.Version("a"))
		}
		// The owner sees what was taken and re-asserts above it.
		_, back, err := tab.Missing(owner.Digest("a"))
		if err != nil {
			t.Fatal(err)
		}
		mergeAll(t, owner, back)
		again, _ := owner.Publish("a", map[string]LinkStats{"b": up(ms(2), 0)})
		if len(again) == 0 || owner.Version("a") < tab.Version("a") {
			t.Fatalf("owner stuck: %d messages, version %d below %d", len(again), owner.Version("a"), tab.Version("a"))
		}
		// An entry taken at the very bound is re-asserted 1µs above it:
		// the others take that once their clocks moved on.
		cur = cur.Add(time.Second)
		mergeAll(t, tab, again)
		if m, ok := tab.Link("a", "b"); !ok || m.RTT != ms(2) {
			t.Fatalf("the owner's publication after the extreme one: %+v %v", m, ok)
		}
		third := newTable(t, LinkTableConfig{Now: clock})
		_, fwd, err := tab.Missing(third.Digest("z"))
		if err != nil {
			t.Fatal(err)
		}
		mergeAll(t, third, fwd)
		if fmt.Sprint(third.Graph()) != fmt.Sprint(tab.Graph()) {
			t.Fatal("forwarding changed the graph")
		}
	})
}

// A publication is forwarded whole, superseded entries included; the
// owner's periodic full republication retires old publications before the
// tombstones that cancel their entries are swept, so a peer that swept a
// tombstone is not handed the removed link again.
func TestLinkStateOldPublicationsRetired(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	owner := newTable(t, LinkTableConfig{Now: clock})
	fwd := newTable(t, LinkTableConfig{Now: clock})
	late := newTable(t, LinkTableConfig{Now: clock})
	step := func(d time.Duration, links map[string]LinkStats) {
		now = now.Add(d)
		msgs, _ := owner.Publish("a", links)
		mergeAll(t, fwd, msgs)
		mergeAll(t, late, msgs)
	}
	step(0, map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(1), 0)}) // one publication of b and c
	step(time.Second, map[string]LinkStats{"b": up(ms(1), 0)})          // c removed
	step(6*time.Minute, map[string]LinkStats{"b": up(ms(1), 0)})        // the refresh: b alone
	// Both sweep c's tombstone (TombstoneTTL, 10m, after they learned it).
	now = now.Add(5 * time.Minute)
	late.Publish("z", nil)
	fwd.Publish("f", nil)
	_, msgs, err := fwd.Missing(late.Digest("z"))
	if err != nil {
		t.Fatal(err)
	}
	mergeAll(t, late, msgs)
	_, msgs, err = fwd.Missing(newTable(t, LinkTableConfig{Now: clock}).Digest("y"))
	if err != nil {
		t.Fatal(err)
	}
	mergeAll(t, late, msgs)
	if _, ok := late.Link("a", "c"); ok {
		t.Error("the removed link a→c came back from an old publication")
	}
	if _, ok := late.Link("a", "b"); !ok {
		t.Error("a→b lost")
	}
}

// Added, removed and recovered links wait for the next batch (one
// signature for all); a link going down goes out at once and takes the
// pending ones along.
func TestPublishBatches(t *testing.T) {
	now := time.Unix(1000, 0)
	tab := newTable(t, LinkTableConfig{BatchInterval: 2 * time.Second, MinInterval: 10 * time.Second, Now: func() time.Time { return now }})
	publish := func(what string, d time.Duration, stats map[string]LinkStats, want int) {
		t.Helper()
		now = now.Add(d)
		_, changed := tab.Publish("a", stats)
		if len(changed) != want {
			t.Fatalf("%s: %d links published (%v), want %d", what, len(changed), changed, want)
		}
	}
	b, c, d := up(ms(1), 0), up(ms(2), 0), up(ms(3), 0)
	publish("first publication", 0, map[string]LinkStats{"b": b}, 1)
	publish("c added: waits", 500*time.Millisecond, map[string]LinkStats{"b": b, "c": c}, 0)
	publish("d added: waits", 500*time.Millisecond, map[string]LinkStats{"b": b, "c": c, "d": d}, 0)
	publish("the batch", time.Second, map[string]LinkStats{"b": b, "c": c, "d": d}, 2)
	publish("d removed: waits", 500*time.Millisecond, map[string]LinkStats{"b": b, "c": c}, 0)
	publish("b down: at once, with d's removal", 500*time.Millisecond, map[string]LinkStats{"b": {RTT: ms(1)}, "c": c}, 2)
	// A recovered link goes out at once too: the other end takes the worse of both
	// directions, so a stale "down" would keep it on a detour the owner already left.
	publish("b up: at once", 500*time.Millisecond, map[string]LinkStats{"b": b, "c": c}, 1)
	publish("nothing new", 2*time.Second, map[string]LinkStats{"b": b, "c": c}, 0)
}
