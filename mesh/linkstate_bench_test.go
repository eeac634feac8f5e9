package mesh

import (
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"testing"
	"time"
)

// Receive-side costs of link state: what one peer pays per message it
// merges. Run with -benchmem; the figures are in mesh/SCALING.md, round 5.

const benchOrigins, benchLinks = 100, 16

// benchPubs returns one publication message per origin (benchLinks links
// each, named like the lab's peers) and a key lookup that knows them all,
// as Mesh.PublicKey does (a map read).
func benchPubs(b *testing.B, clock func() time.Time) ([][]byte, func(string) (ed25519.PublicKey, bool)) {
	b.Helper()
	src := newTable(b, LinkTableConfig{Now: clock})
	keys := map[string]ed25519.PublicKey{}
	var msgs [][]byte
	for o := range benchOrigins {
		name := fmt.Sprintf("weft-peer-%03d", o)
		keys[name] = testIdentity(name).Public()
		links := map[string]LinkStats{}
		for l := range benchLinks {
			links[fmt.Sprintf("weft-peer-%03d", (o+1+l*7)%benchOrigins)] = up(ms(float64(1+l)), 0)
		}
		m, _ := src.Publish(name, links)
		if len(m) != 1 {
			b.Fatalf("origin %s: %d messages, want 1", name, len(m))
		}
		msgs = append(msgs, m[0])
	}
	return msgs, func(n string) (ed25519.PublicKey, bool) { k, ok := keys[n]; return k, ok }
}

// BenchmarkMergeNew: a publication the receiver does not hold (decode,
// one signature check, apply): what every first copy of a broadcast costs.
func BenchmarkMergeNew(b *testing.B) {
	clock := stepClock()
	msgs, keys := benchPubs(b, clock)
	var tab *LinkTable
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i%len(msgs) == 0 {
			b.StopTimer()
			tab = newTable(b, LinkTableConfig{Now: clock})
			b.StartTimer()
		}
		if c, err := tab.Merge(msgs[i%len(msgs)], keys); err != nil || len(c) != benchLinks {
			b.Fatalf("merge: %d changes, %v", len(c), err)
		}
	}
}

// BenchmarkMergeKnown: a publication the receiver already holds (a copy in
// an anti-entropy answer, or one delivered again): no signature check.
func BenchmarkMergeKnown(b *testing.B) {
	clock := stepClock()
	msgs, keys := benchPubs(b, clock)
	tab := newTable(b, LinkTableConfig{Now: clock})
	for _, m := range msgs {
		if _, err := tab.Merge(m, keys); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if c, err := tab.Merge(msgs[i%len(msgs)], keys); err != nil || len(c) != 0 {
			b.Fatalf("merge: %d changes, %v", len(c), err)
		}
	}
}

// BenchmarkMergeAnswer: an anti-entropy answer of every origin's
// publication, all held but one: the whole answer is decoded, one
// publication verified.
func BenchmarkMergeAnswer(b *testing.B) {
	clock := stepClock()
	msgs, keys := benchPubs(b, clock)
	var pubs []*signedPub
	for _, m := range msgs {
		pubs = append(pubs, &signedPub{raw: m[3:]}) // header and count of 1 stripped
	}
	answer := packPubs(pubs, MaxUnicastSize)
	if len(answer) != 1 {
		b.Fatalf("%d answer messages, want 1", len(answer))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		tab := newTable(b, LinkTableConfig{Now: clock})
		for j, m := range msgs {
			if j != i%len(msgs) {
				if _, err := tab.Merge(m, keys); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.StartTimer()
		if c, err := tab.Merge(answer[0], keys); err != nil || len(c) != benchLinks {
			b.Fatalf("merge: %d changes, %v", len(c), err)
		}
	}
}

// TestEntryHashIsFNV1a: digests carry entryHash and peers compare them, so
// the allocation-free version must equal the FNV-1a it replaced.
func TestEntryHashIsFNV1a(t *testing.T) {
	for _, c := range []struct {
		nb string
		v  uint64
	}{{"a", 1}, {"weft-peer-017", 1_764_000_000_000_000}, {"x", math.MaxUint64}, {"", 0}} {
		h := fnv.New64a()
		h.Write([]byte(c.nb))
		h.Write(binary.BigEndian.AppendUint64(nil, c.v))
		if got, want := entryHash(c.nb, c.v), h.Sum64(); got != want {
			t.Errorf("entryHash(%q, %d) = %#x, FNV-1a %#x", c.nb, c.v, got, want)
		}
	}
}

// TestInternedDecodeStillValidates: names the table knows skip validation;
// a message naming known peers but breaking the format (unsorted,
// repeated, a link to itself, a bad new name) is still rejected whole and
// changes nothing.
func TestInternedDecodeStillValidates(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	v := uint64(now.UnixMicro())
	tab := newTable(t, LinkTableConfig{Now: func() time.Time { return now }})
	if _, err := tab.Merge(entriesMsg("a", entry("b", flagUp, v, 1, 1, 0), entry("c", flagUp, v, 1, 1, 0)), testKeys); err != nil {
		t.Fatal(err)
	}
	for name, msg := range map[string][]byte{
		"repeated":  entriesMsg("a", entry("b", flagUp, v+1, 1, 1, 0), entry("b", flagUp, v+1, 1, 1, 0)),
		"unsorted":  entriesMsg("a", entry("c", flagUp, v+1, 1, 1, 0), entry("b", flagUp, v+1, 1, 1, 0)),
		"self link": entriesMsg("b", entry("b", flagUp, v+1, 1, 1, 0)),
		"bad name":  entriesMsg("a", entry("b", flagUp, v+1, 1, 1, 0), entry("c d", flagUp, v+1, 1, 1, 0)),
	} {
		if _, err := tab.Merge(msg, testKeys); !errors.Is(err, ErrBadLinkState) {
			t.Errorf("%s: err %v, want ErrBadLinkState", name, err)
		}
	}
	if l, _ := tab.Link("a", "b"); l.RTT != time.Microsecond {
		t.Errorf("a→b changed by rejected messages: %+v", l)
	}
}

// TestBatchRidesWithMovedFigures: a pending batch (an added link, within
// BatchInterval) goes out in the publication of due moved figures, one
// signature instead of two; alone, it still waits for BatchInterval.
func TestBatchRidesWithMovedFigures(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	now := t0
	tab := newTable(t, LinkTableConfig{MinInterval: 20 * time.Second, BatchInterval: 10 * time.Second, Now: func() time.Time { return now }})
	publish := func(at time.Duration, links map[string]LinkStats) ([][]byte, []LinkChange) {
		now = t0.Add(at)
		return tab.Publish("a", links)
	}
	if msgs, _ := publish(0, map[string]LinkStats{"b": up(ms(1), 0)}); len(msgs) != 1 {
		t.Fatalf("first publication: %d messages", len(msgs))
	}
	if msgs, _ := publish(15*time.Second, map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(1), 0)}); len(msgs) != 1 {
		t.Fatalf("added c after BatchInterval: %d messages, want 1", len(msgs))
	}
	if msgs, _ := publish(16*time.Second, map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(1), 0), "d": up(ms(1), 0)}); len(msgs) != 0 {
		t.Fatalf("added d published 1s after the last batch: %d messages", len(msgs))
	}
	msgs, changed := publish(20*time.Second, map[string]LinkStats{"b": up(ms(5), 0), "c": up(ms(1), 0), "d": up(ms(1), 0)})
	if len(msgs) != 1 || len(changed) != 2 {
		t.Fatalf("moved b (due) and pending d: %d messages, changes %v; want one message with both", len(msgs), changed)
	}
}
