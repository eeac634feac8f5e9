package mesh

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

func ms(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }

func up(rtt time.Duration, loss float64) LinkStats {
	return LinkStats{RTT: rtt, Jitter: rtt / 10, Loss: loss, Up: true, Samples: 10}
}

// stepClock returns a clock advancing one second per call.
func stepClock() func() time.Time {
	t := time.Unix(1_700_000_000, 0)
	return func() time.Time { t = t.Add(time.Second); return t }
}

func TestPublishThresholds(t *testing.T) {
	tab := NewLinkTable(LinkTableConfig{Now: stepClock()})
	steps := []struct {
		name  string
		stats map[string]LinkStats
		want  bool
	}{
		{"first publication", map[string]LinkStats{"b": up(ms(10), 0)}, true},
		{"same again", map[string]LinkStats{"b": up(ms(10), 0)}, false},
		{"rtt +5%", map[string]LinkStats{"b": {RTT: ms(10.5), Jitter: ms(1), Up: true}}, false},
		{"rtt +15%", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Up: true}}, true},
		{"jitter doubles but by < 0.2ms", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1.15), Up: true}}, false},
		{"loss +0.5 point", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.005, Up: true}}, false},
		{"loss +1 point", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.01, Up: true}}, true},
		{"down", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.01}}, true},
		{"neighbour added", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.01}, "c": up(ms(1), 0)}, true},
		{"neighbour removed", map[string]LinkStats{"c": up(ms(1), 0)}, true},
	}
	small := NewLinkTable(LinkTableConfig{Now: stepClock()})
	if _, ok := small.Publish("a", map[string]LinkStats{"b": up(100*time.Microsecond, 0)}); !ok {
		t.Fatal("first publication")
	}
	if _, ok := small.Publish("a", map[string]LinkStats{"b": up(250*time.Microsecond, 0)}); ok {
		t.Error("a change of 150µs (150%) was published; the floor is 200µs")
	}
	var last uint64
	for _, s := range steps {
		delta, changed := tab.Publish("a", s.stats)
		if changed != s.want {
			t.Fatalf("%s: changed %v, want %v", s.name, changed, s.want)
		}
		if changed {
			if delta == nil {
				t.Fatalf("%s: no delta", s.name)
			}
			v := tab.Version("a")
			if v <= last {
				t.Fatalf("%s: version %d not above %d", s.name, v, last)
			}
			last = v
		} else if delta != nil {
			t.Fatalf("%s: delta without change", s.name)
		}
	}
	// Drift below the threshold in small steps still gets published once
	// it adds up, because the comparison is with the published value.
	tab2 := NewLinkTable(LinkTableConfig{Now: stepClock()})
	tab2.Publish("a", map[string]LinkStats{"b": up(ms(10), 0)})
	published := 0
	for r := 10.0; r <= 13; r += 0.5 {
		if _, ok := tab2.Publish("a", map[string]LinkStats{"b": {RTT: ms(r), Jitter: ms(1), Up: true}}); ok {
			published++
		}
	}
	if published == 0 || published > 3 {
		t.Errorf("slow drift 10→13ms published %d times, want 1..3", published)
	}
}

func TestMergeVersionsAndGraph(t *testing.T) {
	a := NewLinkTable(LinkTableConfig{Now: stepClock()})
	b := NewLinkTable(LinkTableConfig{Now: stepClock()})
	b.Publish("b", map[string]LinkStats{"a": up(ms(3), 0)})

	d1, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(10), 0.02), "c": {RTT: ms(5)}})
	d2, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(20), 0.02)})
	if changed, err := b.Merge(d1); err != nil || !changed {
		t.Fatalf("merge d1: %v %v", changed, err)
	}
	if changed, err := b.Merge(d1); err != nil || changed {
		t.Fatalf("merge d1 again: %v %v", changed, err)
	}
	if changed, err := b.Merge(d2); err != nil || !changed {
		t.Fatalf("merge d2: %v %v", changed, err)
	}
	if changed, err := b.Merge(d1); err != nil || changed {
		t.Fatalf("older d1 after d2 changed the table: %v %v", changed, err)
	}
	g := b.Graph()
	if m, ok := g.Link("a", "b"); !ok || m.RTT != ms(20) || m.Loss != 0.02 || !m.Up || m.Jitter != ms(2) {
		t.Errorf("a→b = %+v %v", m, ok)
	}
	if _, ok := g.Link("a", "c"); ok {
		t.Error("a→c survived a newer LSA without it")
	}
	if m, ok := g.Link("b", "a"); !ok || m.RTT != ms(3) {
		t.Errorf("own link b→a = %+v %v", m, ok)
	}
	// The graph is a copy.
	g["a"]["b"] = LinkMetrics{}
	if m, _ := b.Graph().Link("a", "b"); m.RTT != ms(20) {
		t.Error("Graph() aliases the table")
	}
}

// TestMergeOwnOrigin: an LSA of ours held by others (from before a restart,
// or after our clock stepped back) is not taken, and our next publication
// goes above it even though our metrics did not move.
func TestMergeOwnOrigin(t *testing.T) {
	future := NewLinkTable(LinkTableConfig{Now: func() time.Time { return time.Unix(2_000_000_000, 0) }})
	old, _ := future.Publish("a", map[string]LinkStats{"b": up(ms(99), 0)})

	a := NewLinkTable(LinkTableConfig{Now: stepClock()})
	a.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	if changed, err := a.Merge(old); err != nil || changed {
		t.Fatalf("merging our own stale LSA: %v %v", changed, err)
	}
	if m, _ := a.Graph().Link("a", "b"); m.RTT != ms(1) {
		t.Fatalf("own link overwritten: %+v", m)
	}
	delta, changed := a.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	if !changed || a.Version("a") <= future.Version("a") {
		t.Fatalf("republish: changed %v, version %d, must exceed %d", changed, a.Version("a"), future.Version("a"))
	}
	other := NewLinkTable(LinkTableConfig{})
	if _, err := other.Merge(old); err != nil {
		t.Fatal(err)
	}
	if changed, err := other.Merge(delta); err != nil || !changed {
		t.Fatalf("the others take the republication: %v %v", changed, err)
	}
}

func TestEncodeMergeStateAndRemove(t *testing.T) {
	tabs := map[string]*LinkTable{}
	for _, n := range []string{"a", "b", "c"} {
		tabs[n] = NewLinkTable(LinkTableConfig{Now: stepClock()})
	}
	tabs["a"].Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(2), 0)})
	tabs["b"].Publish("b", map[string]LinkStats{"a": up(ms(1), 0)})
	tabs["c"].Publish("c", map[string]LinkStats{"a": up(ms(2), 0.5)})
	// Push/pull a↔b, then b↔c: c learns a's LSA through b.
	for _, pair := range [][2]string{{"a", "b"}, {"b", "c"}, {"c", "a"}} {
		x, y := tabs[pair[0]], tabs[pair[1]]
		sx, sy := x.Encode(), y.Encode()
		if _, err := x.MergeState(sy); err != nil {
			t.Fatal(err)
		}
		if _, err := y.MergeState(sx); err != nil {
			t.Fatal(err)
		}
	}
	want := tabs["a"].Encode()
	for n, tab := range tabs {
		if got := tab.Encode(); !bytes.Equal(got, want) {
			t.Errorf("%s did not converge:\n%x\n%x", n, got, want)
		}
	}
	if changed, err := tabs["a"].MergeState(tabs["b"].Encode()); err != nil || changed {
		t.Errorf("merging a converged state: %v %v", changed, err)
	}
	// c leaves: a removes it and does not take it back from b's older state.
	if !tabs["a"].Remove("c") {
		t.Fatal("Remove")
	}
	if changed, _ := tabs["a"].MergeState(tabs["b"].Encode()); changed {
		t.Error("a tombstoned origin came back from an older state")
	}
	if _, ok := tabs["a"].Graph()["c"]; ok {
		t.Error("c still in a's graph")
	}
	// c comes back with a newer LSA: taken.
	d, _ := tabs["c"].Publish("c", map[string]LinkStats{"a": up(ms(7), 0)})
	if changed, err := tabs["a"].Merge(d); err != nil || !changed {
		t.Errorf("newer LSA after Remove: %v %v", changed, err)
	}
}

func TestDeltaSizeFiftyNeighbours(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		name  string
		names func(i int) string
	}{
		{"numbered", func(i int) string { return fmt.Sprintf("weft-peer-%03d", i) }},
		{"random 8-byte", func(i int) string { return fmt.Sprintf("h%07x", rng.Uint32()>>4) }},
		{"host.domain", func(i int) string { return fmt.Sprintf("node%02d.dc1.example", i) }},
	} {
		tab := NewLinkTable(LinkTableConfig{})
		stats := map[string]LinkStats{}
		for i := range 50 {
			// Worst realistic figures: RTTs up to 1s, jitter, loss.
			stats[c.names(i)] = LinkStats{RTT: time.Duration(rng.Int64N(int64(time.Second))),
				Jitter: time.Duration(rng.Int64N(int64(50 * time.Millisecond))), Loss: rng.Float64() / 4, Up: i%7 != 0}
		}
		delta, changed := tab.Publish("weft-peer-self", stats)
		if !changed || delta == nil {
			t.Fatalf("%s: no delta (too large?)", c.name)
		}
		budget := MaxBroadcastSize - envelopeOverhead - len(LinkStateChannelName)
		t.Logf("%s: 50 neighbours in %d bytes (budget %d)", c.name, len(delta), budget)
		if len(delta) > budget {
			t.Errorf("%s: %d bytes > %d", c.name, len(delta), budget)
		}
	}
	// Too large: kept locally, no delta.
	tab := NewLinkTable(LinkTableConfig{})
	stats := map[string]LinkStats{}
	for i := range 100 {
		stats[fmt.Sprintf("n%02d-%016x", i, rng.Uint64())] = up(ms(1), 0)
	}
	if delta, changed := tab.Publish("a", stats); !changed || delta != nil || len(tab.Graph()["a"]) != 100 {
		t.Errorf("oversized LSA: delta %d bytes, changed %v", len(delta), changed)
	}
}

func TestMergeRejectsGarbage(t *testing.T) {
	src := NewLinkTable(LinkTableConfig{Now: stepClock()})
	good, _ := src.Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "bc": up(ms(2), 0)})
	full := src.Encode()
	// good = 01 01 | 01 'a' | version (uvarint) | 02 | 00 00 01 'b' flags rtt jitter loss | 01 00 01 'c' ...
	mod := func(b []byte, f func([]byte) []byte) []byte { return f(bytes.Clone(b)) }
	_, vlen := binary.Uvarint(good[4:])
	linksAt := 4 + vlen + 1 // first link's shared-prefix byte
	cases := []struct {
		name string
		b    []byte
		full bool
		want string
	}{
		{"empty", nil, false, "too short"},
		{"format version", mod(good, func(b []byte) []byte { b[0] = 9; return b }), false, "format version 9"},
		{"kind", full, false, "kind 2, want 1"},
		{"truncated", good[:len(good)-1], false, "bad varint"},
		{"trailing", append(bytes.Clone(good), 0), false, "trailing"},
		{"origin name", mod(good, func(b []byte) []byte { b[3] = ' '; return b }), false, "origin name"},
		{"version 0", []byte{1, 1, 1, 'a', 0, 0}, false, "version 0"},
		{"too many links", append([]byte{1, 1, 1, 'a', 1}, 0x80, 0x02), false, "links"},
		{"shared prefix", mod(good, func(b []byte) []byte { b[linksAt] = 5; return b }), false, "shared prefix"},
		{"unsorted", append([]byte{1, 1, 1, 'a', 1, 2}, 0, 0, 1, 'c', 1, 1, 1, 0, 0, 0, 1, 'b', 1, 1, 1, 0), false, "not after"},
		{"self link", append([]byte{1, 1, 1, 'a', 1, 1}, 0, 0, 1, 'a', 1, 1, 1, 0), false, "itself"},
		{"flags", append([]byte{1, 1, 1, 'a', 1, 1}, 0, 0, 1, 'b', 0x80, 1, 1, 0), false, "flags"},
		{"loss > 1", append([]byte{1, 1, 1, 'a', 1, 1}, 0, 0, 1, 'b', 1, 1, 1, 0x91, 0x4e), false, "loss"},
		{"rtt huge", append([]byte{1, 1, 1, 'a', 1, 1}, 0, 0, 1, 'b', 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 1, 0), false, "rtt"},
		{"full truncated", full[:len(full)-2], true, ""},
		{"full repeated origin", append([]byte{1, 2, 2}, append(good[2:], good[2:]...)...), true, "repeated"},
		{"full too many", []byte{1, 2, 0xff, 0xff, 0x03}, true, "origins"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tab := NewLinkTable(LinkTableConfig{})
			tab.Merge(good)
			before := tab.Encode()
			var err error
			var changed bool
			if c.full {
				changed, err = tab.MergeState(c.b)
			} else {
				changed, err = tab.Merge(c.b)
			}
			if !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), c.want) || changed {
				t.Errorf("err %v changed %v, want ErrBadLinkState mentioning %q", err, changed, c.want)
			}
			if !bytes.Equal(tab.Encode(), before) {
				t.Error("a rejected message changed the table")
			}
		})
	}
}

func FuzzMergeLinkState(f *testing.F) {
	src := NewLinkTable(LinkTableConfig{Now: stepClock()})
	d, _ := src.Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "bc": up(ms(2), 0.5), "d": {}})
	f.Add(d)
	f.Add(src.Encode())
	f.Add([]byte{1, 1, 1, 'a', 1, 0})
	f.Add([]byte{1, 2, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		tab := NewLinkTable(LinkTableConfig{})
		tab.Merge(d)
		before := tab.Encode()
		c1, err1 := tab.Merge(b)
		c2, err2 := tab.MergeState(b)
		for _, e := range []error{err1, err2} {
			if e != nil && !errors.Is(e, ErrBadLinkState) {
				t.Fatalf("error %v does not wrap ErrBadLinkState", e)
			}
		}
		if err1 != nil && err2 != nil && (c1 || c2 || !bytes.Equal(tab.Encode(), before)) {
			t.Fatal("rejected input changed the table")
		}
		// Whatever was accepted encodes into a state that decodes again
		// to the same graph.
		again := NewLinkTable(LinkTableConfig{})
		if _, err := again.MergeState(tab.Encode()); err != nil {
			t.Fatalf("own encoding rejected: %v", err)
		}
		if !bytes.Equal(again.Encode(), tab.Encode()) {
			t.Fatal("encoding is not stable")
		}
	})
}

// TestLinkStateOverMesh gossips link state between three meshes through
// the channel adapter: broadcasts deliver deltas, push/pull the rest.
func TestLinkStateOverMesh(t *testing.T) {
	t.Parallel()
	tabs := make([]*LinkTable, 3)
	changes := make(chan struct{}, 100)
	meshes := startChain(t, 3, "ls", nil)
	for i, m := range meshes {
		tabs[i] = NewLinkTable(LinkTableConfig{})
		ch := &LinkStateChannel{Table: tabs[i], OnChange: func() {
			select {
			case changes <- struct{}{}:
			default:
			}
		}}
		if err := m.RegisterChannel(LinkStateChannelName, ch); err != nil {
			t.Fatal(err)
		}
	}
	allSee(t, 10*time.Second, meshes, StateAlive, names(meshes)...)
	for i, m := range meshes {
		self := m.cfg.Name
		stats := map[string]LinkStats{}
		for j, o := range meshes {
			if j != i {
				stats[o.cfg.Name] = up(ms(float64(1+i+j)), 0)
			}
		}
		delta, changed := tabs[i].Publish(self, stats)
		if !changed || delta == nil {
			t.Fatal("no delta")
		}
		if err := m.Broadcast(LinkStateChannelName, delta); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, func() string {
		for i, tab := range tabs {
			g := tab.Graph()
			for _, m := range meshes {
				if len(g[m.cfg.Name]) != 2 {
					return fmt.Sprintf("table %d has %d links of %s", i, len(g[m.cfg.Name]), m.cfg.Name)
				}
			}
		}
		return ""
	})
	if m, _ := tabs[0].Graph().Link("ls2", "ls1"); m.RTT != ms(4) {
		t.Errorf("ls2→ls1 seen by ls0: %+v", m)
	}
	if len(changes) == 0 {
		t.Error("OnChange never called")
	}
	// A change is published as a delta and reaches the others.
	delta, changed := tabs[2].Publish("ls2", map[string]LinkStats{"ls0": up(ms(50), 0), "ls1": up(ms(4), 0)})
	if !changed {
		t.Fatal("no change")
	}
	if err := meshes[2].Broadcast(LinkStateChannelName, delta); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() string {
		if m, _ := tabs[0].Graph().Link("ls2", "ls0"); m.RTT != ms(50) {
			return fmt.Sprintf("ls0 sees ls2→ls0 %+v", m)
		}
		return ""
	})
}

func TestGraphSymmetric(t *testing.T) {
	ms := time.Millisecond
	g := Graph{
		"a": {"b": {RTT: ms, Up: true}, "c": {RTT: 2 * ms, Loss: 0.1, Up: true}},
		"b": {"a": {RTT: 3 * ms, Jitter: ms, Up: true}},
		"c": {"a": {RTT: ms, Up: false}},
	}
	s := g.Symmetric()
	if ab, ba := s["a"]["b"], s["b"]["a"]; ab != ba || ab != (LinkMetrics{RTT: 3 * ms, Jitter: ms, Up: true}) {
		t.Errorf("a–b: %+v and %+v, want both the worse direction", ab, ba)
	}
	if ac := s["a"]["c"]; ac.Up || ac.Loss != 0.1 || ac.RTT != 2*ms {
		t.Errorf("a–c: %+v, want down (c says so), with a's loss and RTT", ac)
	}
	if g["a"]["c"].Up != true {
		t.Error("Symmetric changed its receiver")
	}
	// A link only one end has published is taken as published.
	g["a"]["d"] = LinkMetrics{RTT: ms, Up: true}
	if ad := g.Symmetric()["a"]["d"]; ad != g["a"]["d"] {
		t.Errorf("a–d: %+v", ad)
	}
}

// Encrypted links travel in gossip, count as a change, and filter the graph; a link is
// encrypted in the symmetric graph only when both ends say so.
func TestEncryptedLinks(t *testing.T) {
	a := NewLinkTable(LinkTableConfig{})
	b := NewLinkTable(LinkTableConfig{})
	links := map[string]LinkMetrics{"b": {RTT: time.Millisecond, Up: true, Encrypted: true}, "c": {RTT: time.Millisecond, Up: true}}
	delta, changed := a.PublishLinks("a", links)
	if !changed || delta == nil {
		t.Fatal("first publication must emit")
	}
	if _, err := b.Merge(delta); err != nil {
		t.Fatal(err)
	}
	if m, _ := b.Graph().Link("a", "b"); !m.Encrypted {
		t.Fatalf("a→b arrived as %+v, want encrypted", m)
	}
	if m, _ := b.Graph().Link("a", "c"); m.Encrypted {
		t.Fatalf("a→c arrived as %+v, want plaintext", m)
	}
	links["c"] = LinkMetrics{RTT: time.Millisecond, Up: true, Encrypted: true}
	if _, changed := a.PublishLinks("a", links); !changed {
		t.Fatal("a link becoming encrypted must be published")
	}
	g := Graph{
		"a": {"b": {Up: true, Encrypted: true}, "c": {Up: true, Encrypted: true}},
		"c": {"a": {Up: true}},
	}
	enc := g.Encrypted()
	if _, ok := enc.Link("a", "b"); !ok {
		t.Error("encrypted a→b dropped")
	}
	if _, ok := enc.Link("c", "a"); ok {
		t.Error("plaintext c→a kept")
	}
	if m := g.Symmetric()["a"]["c"]; m.Encrypted {
		t.Error("a–c encrypted one way only must not count as encrypted")
	}
}
