package mesh

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/mesh/identity"
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

// testIdentity is name's identity in tests: derived from the name, so
// every table and test agrees on it without passing keys around.
func testIdentity(name string) *identity.Identity {
	seed := sha256.Sum256([]byte("weft test identity " + name))
	return identity.New(ed25519.NewKeyFromSeed(seed[:]))
}

// testKeys is the key lookup of tests: every name has its testIdentity.
func testKeys(name string) (ed25519.PublicKey, bool) { return testIdentity(name).Public(), true }

// noKeys knows no origin.
func noKeys(string) (ed25519.PublicKey, bool) { return nil, false }

// originSigner signs a link-state publication as its origin (the name at
// the head of the publication body), so that one test table can publish as
// any name.
type originSigner struct{}

func (originSigner) Sign(domain string, msg []byte) []byte {
	n := int(msg[0])
	return testIdentity(string(msg[1:1+n])).Sign(domain, msg)
}

func newTable(t testing.TB, cfg LinkTableConfig) *LinkTable {
	t.Helper()
	if cfg.Now == nil {
		cfg.Now = stepClock()
	}
	if cfg.Signer == nil {
		cfg.Signer = originSigner{}
	}
	if cfg.BatchInterval == 0 {
		cfg.BatchInterval = -1 // at once, unless a test is about batching
	}
	tab, err := NewLinkTable(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

// mergeAll merges msgs into tab and returns all changes.
func mergeAll(t testing.TB, tab *LinkTable, msgs [][]byte) []LinkChange {
	t.Helper()
	var out []LinkChange
	for _, m := range msgs {
		c, err := tab.Merge(m, testKeys)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c...)
	}
	return out
}

func TestPublishThresholds(t *testing.T) {
	tab := newTable(t, LinkTableConfig{})
	steps := []struct {
		name  string
		stats map[string]LinkStats
		want  []string // changed neighbours ("-x": removed)
	}{
		{"first publication", map[string]LinkStats{"b": up(ms(10), 0)}, []string{"b"}},
		{"same again", map[string]LinkStats{"b": up(ms(10), 0)}, nil},
		{"rtt +5%", map[string]LinkStats{"b": {RTT: ms(10.5), Jitter: ms(1), Up: true}}, nil},
		{"rtt +15%", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Up: true}}, []string{"b"}},
		{"jitter doubles but by < 0.2ms", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1.15), Up: true}}, nil},
		{"loss +0.5 point", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.005, Up: true}}, nil},
		{"loss +1 point", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.01, Up: true}}, []string{"b"}},
		{"down", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.01}}, []string{"b"}},
		{"neighbour added: only it is sent", map[string]LinkStats{"b": {RTT: ms(11.5), Jitter: ms(1), Loss: 0.01}, "c": up(ms(1), 0)}, []string{"c"}},
		{"neighbour removed: a tombstone", map[string]LinkStats{"c": up(ms(1), 0)}, []string{"-b"}},
	}
	small := newTable(t, LinkTableConfig{})
	if msgs, _ := small.Publish("a", map[string]LinkStats{"b": up(100*time.Microsecond, 0)}); len(msgs) != 1 {
		t.Fatal("first publication")
	}
	if msgs, _ := small.Publish("a", map[string]LinkStats{"b": up(250*time.Microsecond, 0)}); msgs != nil {
		t.Error("a change of 150µs (150%) was published; the floor is 200µs")
	}
	var last uint64
	rx := newTable(t, LinkTableConfig{})
	for _, s := range steps {
		msgs, changes := tab.Publish("a", s.stats)
		var got []string
		for _, c := range changes {
			if c.Removed {
				got = append(got, "-"+c.To)
			} else {
				got = append(got, c.To)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(s.want) || (len(msgs) > 0) != (len(s.want) > 0) {
			t.Fatalf("%s: changes %v (%d messages), want %v", s.name, got, len(msgs), s.want)
		}
		// The receiver sees exactly the same changes.
		if rc := mergeAll(t, rx, msgs); fmt.Sprint(rc) != fmt.Sprint(changes) {
			t.Fatalf("%s: receiver changes %v, publisher %v", s.name, rc, changes)
		}
		if len(msgs) > 0 {
			v := tab.Version("a")
			if v <= last {
				t.Fatalf("%s: version %d not above %d", s.name, v, last)
			}
			last = v
		}
	}
	if g := rx.Graph(); len(g["a"]) != 1 || g["a"]["c"].RTT != ms(1) {
		t.Errorf("receiver graph %v, want a→c only", g)
	}
	// Drift below the threshold in small steps still gets published once
	// it adds up, because the comparison is with the published value.
	tab2 := newTable(t, LinkTableConfig{})
	tab2.Publish("a", map[string]LinkStats{"b": up(ms(10), 0)})
	published := 0
	for r := 10.0; r <= 13; r += 0.5 {
		if msgs, _ := tab2.Publish("a", map[string]LinkStats{"b": {RTT: ms(r), Jitter: ms(1), Up: true}}); msgs != nil {
			published++
		}
	}
	if published == 0 || published > 3 {
		t.Errorf("drift 10→13ms published %d times, want 1..3", published)
	}
}

// A large change is split into messages that each fit a broadcast.
// TestPublishMinInterval: moved figures wait for MinInterval since the link's last
// publication; up/down and new links go out at once.
func TestPublishMinInterval(t *testing.T) {
	now := time.Unix(1000, 0)
	tab := newTable(t, LinkTableConfig{MinInterval: 10 * time.Second, Now: func() time.Time { return now }})
	publish := func(what string, stats map[string]LinkStats, want bool) {
		t.Helper()
		now = now.Add(time.Second)
		if msgs, _ := tab.Publish("a", stats); (msgs != nil) != want {
			t.Fatalf("%s: published %v, want %v", what, msgs != nil, want)
		}
	}
	publish("first publication", map[string]LinkStats{"b": up(ms(10), 0)}, true)
	publish("rtt doubled a second later", map[string]LinkStats{"b": up(ms(20), 0)}, false)
	publish("a new link at once", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)}, true)
	publish("b down at once", map[string]LinkStats{"b": {RTT: ms(20)}, "c": up(ms(1), 0)}, true)
	publish("b up at once", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)}, true)
	now = now.Add(10 * time.Second)
	publish("c's move after the interval", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(5), 0)}, true)
}

// TestMovedInterval: the moved-figures interval stretches to N × spacing above its floor,
// so that the mesh-wide rate of moved-figure publications stays at 1/spacing.
func TestMovedInterval(t *testing.T) {
	for _, c := range []struct {
		n       int
		spacing time.Duration
		want    time.Duration
	}{
		{10, 400 * time.Millisecond, 20 * time.Second}, // the floor
		{50, 400 * time.Millisecond, 20 * time.Second},
		{100, 400 * time.Millisecond, 40 * time.Second},
		{200, 400 * time.Millisecond, 80 * time.Second},
		{1000, 400 * time.Millisecond, 400 * time.Second},
		{1000, 0, 20 * time.Second}, // no stretch
		{0, 400 * time.Millisecond, 20 * time.Second},
		{-1, 400 * time.Millisecond, 20 * time.Second},
	} {
		if got := MovedInterval(20*time.Second, c.spacing, c.n); got != c.want {
			t.Errorf("MovedInterval(20s, %v, %d) = %v, want %v", c.spacing, c.n, got, c.want)
		}
	}
	if rate := float64(1000) / MovedInterval(20*time.Second, 400*time.Millisecond, 1000).Seconds(); math.Abs(rate-2.5) > 1e-9 {
		t.Errorf("mesh-wide rate at N=1000: %v publications/s, want 2.5", rate)
	}
}

// withOrigins is a table (cfg) holding the links of n other live origins, and a publish
// that fails the test unless peer "a" publishing stats sends something exactly when want
// (what names the step; cfg.Now's time since the first call is in the message).
func withOrigins(t *testing.T, cfg LinkTableConfig, n int) (*LinkTable, func(what string, stats map[string]LinkStats, want bool)) {
	t.Helper()
	tab := newTable(t, cfg)
	src := newTable(t, LinkTableConfig{Now: cfg.Now})
	for i := range n {
		msgs, _ := src.Publish(fmt.Sprintf("o%02d", i), map[string]LinkStats{"x": up(ms(5), 0)})
		mergeAll(t, tab, msgs)
	}
	start := cfg.Now()
	return tab, func(what string, stats map[string]LinkStats, want bool) {
		t.Helper()
		if msgs, _ := tab.Publish("a", stats); (msgs != nil) != want {
			t.Fatalf("%s (t=%v): published %v, want %v", what, cfg.Now().Sub(start), msgs != nil, want)
		}
	}
}

// TestPublishMovedIntervalStretches: in a table holding 40 live origins (this peer and 39
// others), moved figures wait 40 × MovedSpacing, not MinInterval; up/down, added and
// removed links still go out at once; with few origins the floor applies.
func TestPublishMovedIntervalStretches(t *testing.T) {
	now := time.Unix(1000, 0)
	clock := func() time.Time { return now }
	tab, publish := withOrigins(t, LinkTableConfig{MinInterval: 10 * time.Second, MovedSpacing: time.Second, Now: clock}, 39)
	publish("first publication", map[string]LinkStats{"b": up(ms(10), 0), "c": up(ms(1), 0)}, true)
	now = now.Add(11 * time.Second)
	publish("rtt doubled after MinInterval, N=40", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)}, false)
	now = now.Add(time.Second)
	publish("c down at once", map[string]LinkStats{"b": up(ms(20), 0), "c": {RTT: ms(1)}}, true)
	now = now.Add(time.Second)
	publish("c back up at once", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)}, true)
	now = now.Add(time.Second)
	publish("a new link at once", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0), "d": up(ms(3), 0)}, true)
	now = now.Add(time.Second)
	publish("a removed link at once", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)}, true)
	now = now.Add(24 * time.Second) // 39 s since the first publication
	publish("b's move before 40 s", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)}, false)
	now = now.Add(time.Second)
	msgs, changes := tab.Publish("a", map[string]LinkStats{"b": up(ms(20), 0), "c": up(ms(1), 0)})
	if msgs == nil || len(changes) != 1 || changes[0].To != "b" || changes[0].Link.RTT != ms(20) {
		t.Fatalf("b's move at 40 s: published %v, changes %+v; want b's 20 ms", msgs != nil, changes)
	}
	for reason, want := range map[string]float64{"full": 1, "updown": 2, "batch": 2, "moved": 1} {
		if got := testutil.ToFloat64(tab.published.WithLabelValues(reason)); got != want {
			t.Errorf("publications counted as %s: %v, want %v", reason, got, want)
		}
	}
	// The moved publication carried b for its RTT and its jitter (up gives a tenth of the RTT).
	for figure, want := range map[string]float64{"rtt": 1, "jitter": 1, "loss": 0} {
		if got := testutil.ToFloat64(tab.movedBy.WithLabelValues(figure)); got != want {
			t.Errorf("links moved by %s: %v, want %v", figure, got, want)
		}
	}

	// Few origins: the floor.
	now = time.Unix(1000, 0)
	small := newTable(t, LinkTableConfig{MinInterval: 10 * time.Second, MovedSpacing: time.Second, Now: clock})
	if msgs, _ := small.Publish("a", map[string]LinkStats{"b": up(ms(10), 0)}); msgs == nil {
		t.Fatal("first publication: nothing")
	}
	now = now.Add(10 * time.Second)
	if msgs, _ := small.Publish("a", map[string]LinkStats{"b": up(ms(20), 0)}); msgs == nil {
		t.Fatal("one origin: a move after MinInterval not published")
	}
}

// TestPublishBatchIntervalStretches: with 40 live origins, added and removed links wait
// max(BatchInterval, 40 × MovedSpacing) since the last batch, unless an up/down change
// goes out first and takes them along.
func TestPublishBatchIntervalStretches(t *testing.T) {
	now := time.Unix(1000, 0)
	clock := func() time.Time { return now }
	tab, publish := withOrigins(t, LinkTableConfig{MinInterval: 10 * time.Second, BatchInterval: 10 * time.Second, MovedSpacing: time.Second, Now: clock}, 39)
	b := map[string]LinkStats{"b": up(ms(10), 0)}
	bc := map[string]LinkStats{"b": up(ms(10), 0), "c": up(ms(1), 0)}
	publish("first publication", b, true)
	now = now.Add(11 * time.Second)
	publish("c added after BatchInterval, N=40", bc, false)
	now = now.Add(28 * time.Second) // 39 s
	publish("c added before 40 s", bc, false)
	now = now.Add(time.Second)
	publish("c added at 40 s", bc, true)
	now = now.Add(time.Second)
	publish("c removed a second later", b, false)
	now = now.Add(time.Second)
	publish("b down: at once, c's removal with it", map[string]LinkStats{"b": {RTT: ms(10)}}, true)
	if _, ok := tab.Link("a", "c"); ok {
		t.Fatal("c's removal did not ride with b's down")
	}
}

func TestPublishSplits(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		name  string
		names func(i int) string
	}{
		{"numbered", func(i int) string { return fmt.Sprintf("weft-peer-%03d", i) }},
		{"random 8-byte", func(i int) string { return fmt.Sprintf("h%07x", rng.Uint32()>>4) }},
		{"long random", func(i int) string { return fmt.Sprintf("n%03d-%016x.dc1.example", i, rng.Uint64()) }},
	} {
		tab := newTable(t, LinkTableConfig{})
		stats := map[string]LinkStats{}
		for i := range 200 {
			stats[c.names(i)] = LinkStats{RTT: time.Duration(rng.Int64N(int64(time.Second))),
				Jitter: time.Duration(rng.Int64N(int64(50 * time.Millisecond))), Loss: rng.Float64() / 4, Up: i%7 != 0}
		}
		msgs, changes := tab.Publish("weft-peer-self", stats)
		budget := MaxBroadcastSize - envelopeOverhead - len(LinkStateChannelName)
		total := 0
		for _, m := range msgs {
			if len(m) > budget {
				t.Errorf("%s: message of %d bytes > %d", c.name, len(m), budget)
			}
			total += len(m)
		}
		t.Logf("%s: 200 links in %d messages, %d bytes", c.name, len(msgs), total)
		rx := newTable(t, LinkTableConfig{})
		if got := mergeAll(t, rx, msgs); len(got) != 200 || len(changes) != 200 || len(rx.Graph()["weft-peer-self"]) != 200 {
			t.Errorf("%s: %d changes received, %d published, graph %d", c.name, len(got), len(changes), len(rx.Graph()["weft-peer-self"]))
		}
	}
}

func TestMergePerLinkVersions(t *testing.T) {
	a := newTable(t, LinkTableConfig{})
	b := newTable(t, LinkTableConfig{})
	b.Publish("b", map[string]LinkStats{"a": up(ms(3), 0)})

	d1, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(10), 0.02), "c": {RTT: ms(5)}})
	d2, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(20), 0.02)}) // b changed, c removed
	d3, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(20), 0.02), "d": up(ms(1), 0)})
	if c := mergeAll(t, b, d1); len(c) != 2 {
		t.Fatalf("merge d1: %v", c)
	}
	if c := mergeAll(t, b, d1); len(c) != 0 {
		t.Fatalf("merge d1 again: %v", c)
	}
	// d3 before d2: per-link versions let both apply in any order.
	if c := mergeAll(t, b, d3); len(c) != 1 || c[0].To != "d" {
		t.Fatalf("merge d3: %v", c)
	}
	if c := mergeAll(t, b, d2); len(c) != 2 {
		t.Fatalf("merge d2 after d3: %v", c)
	}
	if c := mergeAll(t, b, d1); len(c) != 0 {
		t.Fatalf("older d1 after d2 changed the table: %v", c)
	}
	g := b.Graph()
	if m, ok := g.Link("a", "b"); !ok || m.RTT != ms(20) || m.Loss != 0.02 || !m.Up || m.Jitter != ms(2) {
		t.Errorf("a→b = %+v %v", m, ok)
	}
	if _, ok := g.Link("a", "c"); ok {
		t.Error("a→c survived its tombstone")
	}
	if _, ok := g.Link("a", "d"); !ok {
		t.Error("a→d lost")
	}
	if m, ok := b.Link("b", "a"); !ok || m.RTT != ms(3) {
		t.Errorf("own link b→a = %+v %v", m, ok)
	}
	g["a"]["b"] = LinkMetrics{}
	if m, _ := b.Link("a", "b"); m.RTT != ms(20) {
		t.Error("Graph() aliases the table")
	}
}

// An entry of ours held by others (from before a restart, or after our
// clock stepped back) is not taken, and our next publication goes above it
// even though our metrics did not move; a forged link of ours that we do
// not have is answered with a tombstone above it.
func TestMergeOwnOrigin(t *testing.T) {
	later := newTable(t, LinkTableConfig{Now: func() time.Time { return time.Unix(1_700_000_100, 0) }})
	old, _ := later.Publish("a", map[string]LinkStats{"b": up(ms(99), 0), "x": up(ms(1), 0)})

	a := newTable(t, LinkTableConfig{})
	a.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	if c := mergeAll(t, a, old); len(c) != 0 {
		t.Fatalf("merging our own stale entries: %v", c)
	}
	if m, _ := a.Link("a", "b"); m.RTT != ms(1) {
		t.Fatalf("own link overwritten: %+v", m)
	}
	if _, ok := a.Link("a", "x"); ok {
		t.Fatal("forged own link taken")
	}
	msgs, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	if len(msgs) == 0 || a.Version("a") <= later.Version("a") {
		t.Fatalf("republish: %d messages, version %d, must exceed %d", len(msgs), a.Version("a"), later.Version("a"))
	}
	other := newTable(t, LinkTableConfig{})
	mergeAll(t, other, old)
	mergeAll(t, other, msgs)
	if m, _ := other.Link("a", "b"); m.RTT != ms(1) {
		t.Errorf("the others take the republication: a→b %+v", m)
	}
	if _, ok := other.Link("a", "x"); ok {
		t.Error("the forged a→x was not withdrawn")
	}
	// A forged version from the far future is rejected, not followed.
	far := newTable(t, LinkTableConfig{Now: func() time.Time { return time.Unix(1_900_000_000, 0) }})
	farMsgs, _ := far.Publish("a", map[string]LinkStats{"b": up(ms(5), 0)})
	before := a.Version("a")
	if _, err := a.Merge(farMsgs[0], testKeys); !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), "ahead of our clock") {
		t.Fatalf("future own version: %v", err)
	}
	if msgs, _ := a.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)}); msgs != nil || a.Version("a") != before {
		t.Error("a rejected future version moved our counter")
	}
}

// forged re-signs a one-publication message with signer's key: a member
// publishing entries in another origin's name.
func forged(msg []byte, signer string) []byte {
	g := msg[3 : len(msg)-ed25519.SignatureSize]
	b := bytes.Clone(msg[:len(msg)-ed25519.SignatureSize])
	return append(b, testIdentity(signer).Sign(linkStateSignDomain, g)...)
}

// exchange runs one push/pull between x and y: each answers the other's
// digest with what it lacks.
func exchange(t *testing.T, x *LinkTable, xName string, y *LinkTable, yName string) (sent int) {
	t.Helper()
	for _, d := range []struct {
		from *LinkTable
		name string
		to   *LinkTable
		toN  string
	}{{x, xName, y, yName}, {y, yName, x, xName}} {
		peer, msgs, err := d.from.Missing(d.to.Digest(d.toN))
		if err != nil || peer != d.toN {
			t.Fatalf("Missing: %q %v", peer, err)
		}
		for _, m := range msgs {
			sent += len(m)
			if len(m) > MaxUnicastSize {
				t.Fatalf("answer of %d bytes", len(m))
			}
		}
		mergeAll(t, d.to, msgs)
	}
	return sent
}

func TestAntiEntropyByDigest(t *testing.T) {
	tabs := map[string]*LinkTable{}
	for _, n := range []string{"a", "b", "c"} {
		tabs[n] = newTable(t, LinkTableConfig{})
	}
	tabs["a"].Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(2), 0)})
	tabs["b"].Publish("b", map[string]LinkStats{"a": up(ms(1), 0)})
	tabs["c"].Publish("c", map[string]LinkStats{"a": up(ms(2), 0.5)})
	for _, p := range [][2]string{{"a", "b"}, {"b", "c"}} {
		exchange(t, tabs[p[0]], p[0], tabs[p[1]], p[1])
	}
	want := fmt.Sprint(tabs["b"].Graph())
	for n, tab := range tabs {
		if n != "b" {
			exchange(t, tabs["b"], "b", tab, n)
		}
		if got := fmt.Sprint(tab.Graph()); got != want {
			t.Errorf("%s did not converge:\n%s\n%s", n, got, want)
		}
	}
	if sent := exchange(t, tabs["a"], "a", tabs["c"], "c"); sent != 0 {
		t.Errorf("converged tables exchanged %d bytes beyond the digests", sent)
	}
	// A lost broadcast between two received ones (a gap below the highest
	// version) is repaired: equal highest versions, different hashes.
	m1, _ := tabs["a"].Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(2), 0), "d": up(ms(3), 0)})
	tabs["a"].Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(9), 0), "d": up(ms(3), 0)}) // lost
	m3, _ := tabs["a"].Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "c": up(ms(9), 0), "d": up(ms(3), 0), "e": up(ms(4), 0)})
	mergeAll(t, tabs["b"], m1)
	mergeAll(t, tabs["b"], m3)
	if m, _ := tabs["b"].Link("a", "c"); m.RTT != ms(2) {
		t.Fatalf("setup: b already has a→c %v", m)
	}
	exchange(t, tabs["a"], "a", tabs["b"], "b")
	if m, _ := tabs["b"].Link("a", "c"); m.RTT != ms(9) {
		t.Errorf("gap not repaired: a→c %v", m.RTT)
	}
	// Digest size: about 30 bytes per origin.
	big := newTable(t, LinkTableConfig{})
	for i := range 1000 {
		other := newTable(t, LinkTableConfig{})
		msgs, _ := other.Publish(fmt.Sprintf("weft-peer-%04d", i), map[string]LinkStats{"x": up(ms(1), 0)})
		mergeAll(t, big, msgs)
	}
	d := big.Digest("self")
	t.Logf("digest of 1000 origins: %d bytes", len(d))
	if len(d) > 40*1000 {
		t.Errorf("digest of 1000 origins: %d bytes", len(d))
	}
}

func TestRemoveAndTombstones(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	a := newTable(t, LinkTableConfig{Now: clock})
	c := newTable(t, LinkTableConfig{Now: clock})
	msgs, _ := c.Publish("c", map[string]LinkStats{"a": up(ms(2), 0)})
	mergeAll(t, a, msgs)
	if rm := a.Remove("c"); len(rm) != 1 || !rm[0].Removed {
		t.Fatalf("Remove: %v", rm)
	}
	if got := mergeAll(t, a, msgs); len(got) != 0 {
		t.Error("a removed origin came back from an older message")
	}
	if _, msgsB, _ := newTableWith(t, clock, msgs).Missing(a.Digest("a")); len(msgsB) != 0 {
		t.Error("a peer still holding c's links offers them to one that removed c")
	}
	// Restore: a peer back after a Remove has its unchanged links taken again.
	b := newTableWith(t, clock, msgs)
	b.Remove("c")
	b.Restore("c")
	if got := mergeAll(t, b, msgs); len(got) != 1 {
		t.Errorf("after Restore: %v", got)
	}
	now = now.Add(time.Second)
	newer, _ := c.Publish("c", map[string]LinkStats{"a": up(ms(7), 0), "b": up(ms(1), 0)})
	if got := mergeAll(t, a, newer); len(got) != 2 {
		t.Errorf("newer entries after Remove: %v", got)
	}
	// A link's tombstone is swept after TombstoneTTL; the entry count follows.
	now = now.Add(time.Second)
	msgs, _ = c.Publish("c", map[string]LinkStats{"a": up(ms(7), 0)})
	mergeAll(t, a, msgs)
	if a.nEntries != 2 { // c→a, c→b (a tombstone)
		t.Fatalf("entries %d, want 2", a.nEntries)
	}
	now = now.Add(11 * time.Minute)
	a.Publish("a", nil)
	if a.nEntries != 1 {
		t.Errorf("entries after the sweep: %d, want 1", a.nEntries)
	}
}

func newTableWith(t *testing.T, clock func() time.Time, msgs [][]byte) *LinkTable {
	tab := newTable(t, LinkTableConfig{Now: clock})
	mergeAll(t, tab, msgs)
	return tab
}

// entriesMsg builds an entries message for one origin by hand.
func entriesMsg(origin string, entries ...[]byte) []byte {
	g := []byte{byte(len(origin))}
	g = append(g, origin...)
	g = binary.AppendUvarint(g, uint64(len(entries)))
	for _, e := range entries {
		g = append(g, e...)
	}
	b := []byte{linkStateVersion, linkStateEntries, 1}
	b = append(b, g...)
	return append(b, testIdentity(origin).Sign(linkStateSignDomain, g)...)
}

// entry encodes one live entry (no front coding).
func entry(nb string, flags byte, version, rtt, jitter, loss uint64) []byte {
	b := []byte{0, 0, byte(len(nb))}
	b = append(b, nb...)
	b = append(b, flags)
	b = binary.AppendUvarint(b, version)
	if flags&flagRemoved == 0 {
		b = binary.AppendUvarint(b, rtt)
		b = binary.AppendUvarint(b, jitter)
		b = binary.AppendUvarint(b, loss)
	}
	return b
}

func TestMergeRejects(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	v := uint64(now.UnixMicro())
	src := newTable(t, LinkTableConfig{Now: func() time.Time { return now }})
	good, _ := src.Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "bc": up(ms(2), 0)})
	mod := func(b []byte, f func([]byte) []byte) []byte { return f(bytes.Clone(b)) }
	many := func(n int) []byte {
		var es [][]byte
		for i := range n {
			es = append(es, entry(fmt.Sprintf("n%04d", i), flagUp, v, 1, 1, 0))
		}
		return entriesMsg("z", es...)
	}
	cases := []struct {
		name, reason string
		b            []byte
		want         string
	}{
		{"empty", "malformed", nil, "too short"},
		{"format version", "malformed", mod(good[0], func(b []byte) []byte { b[0] = 1; return b }), "format version 1"},
		{"digest kind", "malformed", src.Digest("a"), "kind 2, want 1"},
		{"truncated", "malformed", good[0][:len(good[0])-1], "signature"},
		{"trailing", "malformed", append(bytes.Clone(good[0]), 0), "trailing"},
		{"origin name", "malformed", mod(good[0], func(b []byte) []byte { b[4] = ' '; return b }), "origin name"},
		{"no publications", "malformed", []byte{linkStateVersion, 1, 0}, "publications"},
		{"no entries", "malformed", entriesMsg("a"), "entries"},
		{"version 0", "malformed", entriesMsg("a", entry("b", flagUp, 0, 1, 1, 0)), "version 0"},
		{"unsorted", "malformed", entriesMsg("a", entry("c", flagUp, v, 1, 1, 0), entry("b", flagUp, v, 1, 1, 0)), "not after"},
		{"repeated", "malformed", entriesMsg("a", entry("b", flagUp, v, 1, 1, 0), entry("b", flagUp, v, 1, 1, 0)), "not after"},
		{"self link", "malformed", entriesMsg("a", entry("a", flagUp, v, 1, 1, 0)), "itself"},
		{"flags", "malformed", entriesMsg("a", entry("b", 0x80, v, 1, 1, 0)), "flags"},
		{"removed and up", "malformed", entriesMsg("a", entry("b", flagRemoved|flagUp, v, 1, 1, 0)), "flags"},
		{"loss above 1", "malformed", entriesMsg("a", entry("b", flagUp, v, 1, 1, 10001)), "loss"},
		{"rtt above an hour", "malformed", entriesMsg("a", entry("b", flagUp, v, 3600_000_001, 1, 0)), "rtt"},
		{"jitter huge", "malformed", entriesMsg("a", entry("b", flagUp, v, 1, math.MaxUint64, 0)), "jitter"},
		{"257 links in one message", "malformed", many(257), "entries"},
		{"version from the future", "future_version", entriesMsg("a", entry("b", flagUp, v+uint64(6*time.Minute/time.Microsecond), 1, 1, 0)), "ahead"},
		{"version max", "future_version", entriesMsg("a", entry("b", flagUp, math.MaxUint64, 1, 1, 0)), "ahead"},
		{"forged for another origin", "bad_signature", forged(entriesMsg("a", entry("b", flagUp, v+1, 1, 1, 0)), "mallory"), "signature"},
		{"signature flipped", "bad_signature", mod(entriesMsg("a", entry("b", flagUp, v+1, 1, 1, 0)), func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), "signature"},
		{"entry changed after signing", "bad_signature", mod(entriesMsg("a", entry("b", flagUp, v+1, 1, 1, 0)), func(b []byte) []byte { b[len(b)-65] ^= 1; return b }), "signature"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			tab := newTable(t, LinkTableConfig{Now: func() time.Time { return now }, Registerer: reg})
			mergeAll(t, tab, good)
			before := fmt.Sprint(tab.Graph(), tab.Digest("x"))
			changes, err := tab.Merge(c.b, testKeys)
			if !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), c.want) || changes != nil {
				t.Errorf("err %v changes %v, want ErrBadLinkState mentioning %q", err, changes, c.want)
			}
			if fmt.Sprint(tab.Graph(), tab.Digest("x")) != before {
				t.Error("a rejected message changed the table")
			}
			if n := counterValue(t, reg, "weft_linkstate_rejected_total", c.reason); n != 1 {
				t.Errorf("rejected{reason=%q} = %v, want 1", c.reason, n)
			}
		})
	}
	// Valid but extreme values are taken as they are.
	tab := newTable(t, LinkTableConfig{Now: func() time.Time { return now }})
	if _, err := tab.Merge(entriesMsg("a", entry("b", flagUp, v+uint64(4*time.Minute/time.Microsecond), 3600_000_000, 3600_000_000, 10000)), testKeys); err != nil {
		t.Fatalf("extreme but valid: %v", err)
	}
	if m, _ := tab.Link("a", "b"); m.RTT != time.Hour || m.Loss != 1 {
		t.Errorf("extreme link: %+v", m)
	}
	// The per-origin bound holds across messages: 200 links, then 100 more.
	reg := prometheus.NewRegistry()
	tab = newTable(t, LinkTableConfig{Now: func() time.Time { return now }, Registerer: reg})
	var es1, es2 [][]byte
	for i := range 300 {
		e := entry(fmt.Sprintf("n%04d", i), flagUp, v, 1, 1, 0)
		if i < 200 {
			es1 = append(es1, e)
		} else {
			es2 = append(es2, e)
		}
	}
	second := entriesMsg("z", es2...)
	if _, err := tab.Merge(entriesMsg("z", es1...), testKeys); err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Merge(second, testKeys); !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), "would have 300 links") {
		t.Errorf("300 links over two messages: %v", err)
	}
	if len(tab.Graph()["z"]) != 200 {
		t.Error("the rejected message was applied in part")
	}
	// The origin bound.
	reg2 := prometheus.NewRegistry()
	small := newTable(t, LinkTableConfig{Now: func() time.Time { return now }, MaxOrigins: 2, Registerer: reg2})
	mergeAll(t, small, [][]byte{entriesMsg("o1", entry("x", flagUp, v, 1, 1, 0)), entriesMsg("o2", entry("x", flagUp, v, 1, 1, 0))})
	if _, err := small.Merge(entriesMsg("o3", entry("x", flagUp, v, 1, 1, 0)), testKeys); !errors.Is(err, ErrBadLinkState) || !strings.Contains(err.Error(), "origins") {
		t.Errorf("third origin over a bound of 2: %v", err)
	}
	if counterValue(t, reg2, "weft_linkstate_rejected_total", "too_many_origins") != 1 || counterValue(t, reg, "weft_linkstate_rejected_total", "too_many_links") != 1 {
		t.Error("bound rejections not counted")
	}
	// Malformed digests.
	for _, d := range [][]byte{nil, {linkStateVersion, 2}, {linkStateVersion, 2, 1, 'a', 1, 1, 'b', 0, 1}, {linkStateVersion, 2, 1, 'a', 1, 1, 'b', 9, 1, 0, 0, 0, 0, 0, 0, 0, 0}} {
		if _, _, err := tab.Missing(d); !errors.Is(err, ErrBadLinkState) {
			t.Errorf("digest %x: %v", d, err)
		}
	}
}

func FuzzLinkState(f *testing.F) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	src := newTable(f, LinkTableConfig{Now: clock})
	d, _ := src.Publish("a", map[string]LinkStats{"b": up(ms(1), 0), "bc": up(ms(2), 0.5), "d": {}})
	d2, _ := src.Publish("a", map[string]LinkStats{"b": up(ms(1), 0)})
	f.Add(d[0])
	f.Add(d2[0])
	f.Add(src.Digest("a"))
	f.Add(entriesMsg("a", entry("b", flagUp, 1, 1, 1, 0)))
	f.Add([]byte{linkStateVersion, 2, 1, 'x', 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		tab := newTable(t, LinkTableConfig{Now: clock})
		mergeAll(t, tab, d)
		before := fmt.Sprint(tab.Graph(), tab.Digest("x"))
		changes, err := tab.Merge(b, testKeys)
		if err != nil {
			if !errors.Is(err, ErrBadLinkState) {
				t.Fatalf("error %v does not wrap ErrBadLinkState", err)
			}
			if changes != nil || fmt.Sprint(tab.Graph(), tab.Digest("x")) != before {
				t.Fatal("rejected input changed the table")
			}
		}
		if _, _, err := tab.Missing(b); err != nil && !errors.Is(err, ErrBadLinkState) {
			t.Fatalf("digest error %v does not wrap ErrBadLinkState", err)
		}
		// Whatever was accepted re-encodes into messages that another
		// table takes to the same graph.
		_, msgs, err := tab.Missing(newTable(t, LinkTableConfig{Now: clock}).Digest("y"))
		if err != nil {
			t.Fatal(err)
		}
		again := newTable(t, LinkTableConfig{Now: clock})
		for _, m := range msgs {
			if _, err := again.Merge(m, testKeys); err != nil {
				t.Fatalf("own encoding rejected: %v", err)
			}
		}
		if fmt.Sprint(again.Graph()) != fmt.Sprint(tab.Graph()) {
			t.Fatal("re-encoding changed the graph")
		}
	})
}

// TestLinkStateOverMesh gossips link state between three meshes through
// the channel adapter: broadcasts deliver deltas; a table filled without
// broadcasting reaches the others by digest and SendTo on push/pull.
func TestLinkStateOverMesh(t *testing.T) {
	t.Parallel()
	tabs := make([]*LinkTable, 3)
	var mu sync.Mutex
	changed := map[string]int{}
	meshes := startChain(t, 3, "ls", nil)
	for i, m := range meshes {
		tabs[i] = newTable(t, LinkTableConfig{Now: time.Now})
		ch := &LinkStateChannel{Table: tabs[i], Self: m.cfg.Name, Keys: m.PublicKey, Sender: m, OnChange: func(cs []LinkChange) {
			mu.Lock()
			defer mu.Unlock()
			changed[m.cfg.Name] += len(cs)
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
		msgs, _ := tabs[i].Publish(self, stats)
		if i == 1 {
			continue // ls1 does not broadcast: push/pull carries its links
		}
		for _, msg := range msgs {
			if err := m.Broadcast(LinkStateChannelName, msg); err != nil {
				t.Fatal(err)
			}
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
	if m, _ := tabs[0].Link("ls2", "ls1"); m.RTT != ms(4) {
		t.Errorf("ls2→ls1 seen by ls0: %+v", m)
	}
	mu.Lock()
	if changed["ls0"] != 4 {
		t.Errorf("OnChange at ls0 reported %d link changes, want 4", changed["ls0"])
	}
	mu.Unlock()
	// A change is published as a delta and reaches the others.
	msgs, _ := tabs[2].Publish("ls2", map[string]LinkStats{"ls0": up(ms(50), 0), "ls1": up(ms(4), 0)})
	if len(msgs) != 1 {
		t.Fatal("no delta")
	}
	if err := meshes[2].Broadcast(LinkStateChannelName, msgs[0]); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() string {
		if m, _ := tabs[0].Link("ls2", "ls0"); m.RTT != ms(50) {
			return fmt.Sprintf("ls0 sees ls2→ls0 %+v", m)
		}
		return ""
	})
	if err := meshes[0].SendTo("nobody", LinkStateChannelName, []byte{1}); !errors.Is(err, ErrUnknownPeer) {
		t.Errorf("SendTo an unknown peer: %v", err)
	}
	if err := meshes[0].SendTo("ls1", LinkStateChannelName, make([]byte, MaxUnicastSize+1)); !errors.Is(err, ErrMessageTooLarge) {
		t.Errorf("SendTo too large: %v", err)
	}
}
