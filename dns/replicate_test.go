package dns

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh/identity"
)

// fakeMesh is an in-memory stand-in for the mesh's broadcast channel and
// push/pull, for the Replicator's state machine (CONVENTIONS #5: fakes for
// pure state machines only). Broadcasts are queued and delivered by Flush,
// to every node not cut off from the sender, possibly dropped or reordered.
type fakeMesh struct {
	mu      sync.Mutex // guards the fields below
	nodes   map[string]*Replicator
	ids     map[string]*identity.Identity // every node's identity
	keys    map[string]ed25519.PublicKey  // what each node's key lookup knows (all nodes')
	queue   []fakeMsg
	cut     map[string]bool // isolated nodes
	drop    float64         // probability of dropping one delivery
	reorder bool            // shuffle the queue before delivery
	rnd     *rand.Rand
	sizes   []int // of every broadcast, in order
}

type fakeMsg struct {
	from string
	b    []byte
}

func newFakeMesh() *fakeMesh {
	return &fakeMesh{nodes: map[string]*Replicator{}, ids: map[string]*identity.Identity{}, keys: map[string]ed25519.PublicKey{},
		cut: map[string]bool{}, rnd: rand.New(rand.NewPCG(1, 2))}
}

// lookup is the nodes' key lookup (the mesh's PublicKey in a peer).
func (fm *fakeMesh) lookup(origin string) (ed25519.PublicKey, bool) {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	k, ok := fm.keys[origin]
	return k, ok
}

// identity returns name's identity, made on first use; its key becomes
// known to every node.
func (fm *fakeMesh) identity(name string) *identity.Identity {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	id, ok := fm.ids[name]
	if !ok {
		id = identity.Generate()
		fm.ids[name] = id
		fm.keys[name] = id.Public()
	}
	return id
}

// signedRecords makes a signed store for name, with name's identity and
// the mesh's key lookup.
func (fm *fakeMesh) signedRecords(t testing.TB, name string, now func() time.Time, edit func(*RecordsConfig)) *Records {
	t.Helper()
	cfg := RecordsConfig{Self: name, Now: now, Signer: fm.identity(name), Keys: fm.lookup}
	if edit != nil {
		edit(&cfg)
	}
	r, err := NewSignedRecords(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// add makes a peer with its own Records on clock now and joins it.
func (fm *fakeMesh) add(t testing.TB, name string, now func() time.Time, edit func(*ReplicatorConfig)) *Replicator {
	t.Helper()
	cfg := ReplicatorConfig{
		Records: fm.signedRecords(t, name, now, nil),
		Broadcast: func(b []byte) error {
			fm.mu.Lock()
			defer fm.mu.Unlock()
			fm.queue = append(fm.queue, fakeMsg{from: name, b: slices.Clone(b)})
			fm.sizes = append(fm.sizes, len(b))
			return nil
		},
	}
	if edit != nil {
		edit(&cfg)
	}
	r, err := NewReplicator(cfg)
	if err != nil {
		t.Fatal(err)
	}
	fm.mu.Lock()
	fm.nodes[name] = r
	fm.mu.Unlock()
	return r
}

// Flush delivers queued broadcasts (and those their delivery causes) until
// none is left.
func (fm *fakeMesh) Flush() {
	for {
		fm.mu.Lock()
		q := fm.queue
		fm.queue = nil
		if fm.reorder {
			fm.rnd.Shuffle(len(q), func(i, j int) { q[i], q[j] = q[j], q[i] })
		}
		type delivery struct {
			to *Replicator
			b  []byte
		}
		var ds []delivery
		for _, m := range q {
			for n, r := range fm.nodes {
				if n == m.from || fm.cut[n] || fm.cut[m.from] || fm.rnd.Float64() < fm.drop {
					continue
				}
				ds = append(ds, delivery{r, m.b})
			}
		}
		fm.mu.Unlock()
		if len(q) == 0 {
			return
		}
		// Outside the lock: delivery may broadcast.
		for _, d := range ds {
			d.to.NotifyMsg(slices.Clone(d.b))
		}
	}
}

func (fm *fakeMesh) setCut(name string, cut bool) {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	fm.cut[name] = cut
}

// pushPull runs one TCP push/pull between a and b as memberlist does: a
// sends its state, b merges it and answers with its own, a merges that.
func pushPull(a, b *Replicator) {
	sa := a.LocalState(false)
	sb := b.LocalState(false)
	b.MergeRemoteState(sa, false)
	a.MergeRemoteState(sb, false)
}

func addrs(t testing.TB, ss ...string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, mustAddr(t, s))
	}
	return out
}

func lookup(r *Replicator, name string) []string {
	ts, _ := r.Records().LookupName(name)
	var out []string
	for _, t := range ts {
		out = append(out, t.Addr.String()+"@"+t.Peer)
	}
	return out
}

func threePeers(t testing.TB, now func() time.Time) (*fakeMesh, *Replicator, *Replicator, *Replicator) {
	fm := newFakeMesh()
	return fm, fm.add(t, "a", now, nil), fm.add(t, "b", now, nil), fm.add(t, "c", now, nil)
}

func assertConverged(t *testing.T, reps ...*Replicator) {
	t.Helper()
	want := reps[0].Records().Encode()
	for _, r := range reps[1:] {
		if got := r.Records().Encode(); !bytes.Equal(got, want) {
			t.Fatalf("%s's state differs from %s's:\n%v\n%v", r.Records().Self(), reps[0].Records().Self(),
				r.Records().State().Entries(), reps[0].Records().State().Entries())
		}
	}
}

func TestReplicatorAddRemove(t *testing.T) {
	fm, a, b, c := threePeers(t, nil)
	if err := a.AddContainer("Web", addrs(t, "10.40.0.2", "fd00::2")); err != nil {
		t.Fatal(err)
	}
	if err := a.AddService("web", "http", "tcp", 8080); err != nil {
		t.Fatal(err)
	}
	fm.Flush()
	for _, r := range []*Replicator{b, c} {
		if got := lookup(r, "web"); !slices.Equal(got, []string{"10.40.0.2@a", "fd00::2@a"}) {
			t.Fatalf("%s sees web = %v", r.Records().Self(), got)
		}
		if got := r.Records().LookupSRV("web", "http", "tcp"); len(got) != 1 || got[0].Port != 8080 {
			t.Fatalf("%s sees srv %v", r.Records().Self(), got)
		}
	}

	// Removing one address keeps the name and its SRV entry; the last one
	// takes the SRV entry with it.
	a.RemoveContainer("web", addrs(t, "fd00::2"))
	fm.Flush()
	if got := lookup(c, "web"); !slices.Equal(got, []string{"10.40.0.2@a"}) {
		t.Fatalf("c sees web = %v", got)
	}
	a.RemoveContainer("web", addrs(t, "10.40.0.2"))
	fm.Flush()
	for _, r := range []*Replicator{a, b, c} {
		if ts, known := r.Records().LookupName("web"); known || len(ts) != 0 {
			t.Fatalf("%s still knows web: %v", r.Records().Self(), ts)
		}
	}
	assertConverged(t, a, b, c)

	// Idempotent detach; nothing broadcast for nothing.
	n := len(fm.sizes)
	a.RemoveContainer("web", nil)
	a.RemoveContainer("not a name!", nil)
	if len(fm.sizes) != n {
		t.Fatalf("a no-op removal broadcast %d messages", len(fm.sizes)-n)
	}

	// Invalid input is an error and changes nothing.
	gen := a.Records().Generation()
	if err := a.AddContainer("ok", []netip.Addr{mustAddr(t, "10.40.0.9"), {}}); err == nil {
		t.Fatal("invalid address accepted")
	}
	if err := a.AddContainer("_bad", addrs(t, "10.40.0.9")); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("invalid name: %v", err)
	}
	if err := a.AddService("web", "http", "sctp", 1); !errors.Is(err, ErrInvalidEntry) {
		t.Fatalf("invalid proto: %v", err)
	}
	if a.Records().Generation() != gen {
		t.Fatal("a rejected change changed the store")
	}

	// Remove with no addresses drops everything of the name on this peer.
	a.AddContainer("db", addrs(t, "10.40.0.3"))
	a.AddService("db", "pg", "tcp", 5432)
	fm.Flush()
	a.RemoveContainer("db", nil)
	fm.Flush()
	if _, known := b.Records().LookupName("db"); known {
		t.Fatal("b still knows db")
	}
	assertConverged(t, a, b, c)
}

// The DNS answer on C, not just its store: a removal made while C was cut off
// reaches it through push/pull alone.
func TestReplicatorPartitionHealsByPushPull(t *testing.T) {
	fm, a, b, c := threePeers(t, nil)
	a.AddContainer("web", addrs(t, "10.40.0.2"))
	b.AddContainer("web", addrs(t, "10.40.1.2"))
	fm.Flush()
	s := newTestServer(t, c.Records(), nil, Deps{})
	answer := func() *mdns.Msg {
		w := &recorder{}
		s.ServeDNS(context.Background(), w, query("web.weft.local.", mdns.TypeA))
		return w.msg
	}
	if got := answerAddrs(answer()); len(got) != 2 {
		t.Fatalf("c answers %v before the partition", got)
	}

	fm.setCut("c", true)
	a.RemoveContainer("web", addrs(t, "10.40.0.2"))
	b.RemoveContainer("web", addrs(t, "10.40.1.2"))
	a.AddContainer("new", addrs(t, "10.40.0.5"))
	fm.Flush()
	if _, known := b.Records().LookupName("web"); known {
		t.Fatal("b did not get the removals")
	}
	if got := answerAddrs(answer()); len(got) != 2 {
		t.Fatalf("c, cut off, answers %v", got)
	}

	// Heal with push/pull only (C missed the broadcasts for good).
	fm.setCut("c", false)
	pushPull(c, a)
	if m := answer(); m.Rcode != mdns.RcodeNameError {
		t.Fatalf("c answers %v after push/pull, want NXDOMAIN", m)
	}
	if got := lookup(c, "new"); !slices.Equal(got, []string{"10.40.0.5@a"}) {
		t.Fatalf("c sees new = %v", got)
	}
	assertConverged(t, a, b, c)
}

// Under drops and reordering, broadcasts plus a round of push/pull converge
// every replica to the same state, and a removal beats the add it overtook.
func TestReplicatorLossyConverges(t *testing.T) {
	fm, a, b, c := threePeers(t, nil)
	fm.reorder, fm.drop = true, 0.3
	reps := []*Replicator{a, b, c}
	for i := 0; i < 60; i++ {
		r := reps[i%3]
		name := fmt.Sprintf("ctr%d", i%7)
		addr := netip.AddrFrom4([4]byte{10, 40, byte(i % 3), byte(i%7 + 1)})
		if i%4 == 3 {
			r.RemoveContainer(name, []netip.Addr{addr})
		} else if err := r.AddContainer(name, []netip.Addr{addr}); err != nil {
			t.Fatal(err)
		}
		if i%5 == 0 {
			fm.Flush()
		}
	}
	// Add then remove, delivered in reverse order: the tombstone wins.
	fm.drop = 0
	a.AddContainer("flip", addrs(t, "10.40.0.99"))
	a.RemoveContainer("flip", addrs(t, "10.40.0.99"))
	fm.mu.Lock()
	slices.Reverse(fm.queue)
	fm.reorder = false
	fm.mu.Unlock()
	fm.Flush()
	if _, known := b.Records().LookupName("flip"); known {
		t.Fatal("b resurrected flip from a reordered add")
	}

	pushPull(a, b)
	pushPull(b, c)
	pushPull(c, a)
	fm.Flush()
	assertConverged(t, a, b, c)
}

// An owner that gets back a live entry of its own it no longer has (e.g. from
// before its restart) answers with a tombstone that reaches everyone.
func TestReplicatorOwnerTombstonesStaleEntry(t *testing.T) {
	fm, a, b, c := threePeers(t, nil)
	a.AddContainer("old", addrs(t, "10.40.0.7"))
	fm.Flush()
	// a restarts with an empty store.
	fm.mu.Lock()
	delete(fm.nodes, "a")
	fm.mu.Unlock()
	a2 := fm.add(t, "a", nil, nil)
	pushPull(a2, b)
	if _, known := a2.Records().LookupName("old"); known {
		t.Fatal("restarted owner accepted its stale entry")
	}
	fm.Flush() // a2's tombstone goes to b and c by broadcast
	for _, r := range []*Replicator{b, c} {
		if _, known := r.Records().LookupName("old"); known {
			t.Fatalf("%s still answers the stale entry", r.Records().Self())
		}
	}
	_ = a
}

func TestReplicatorPeerDownExpires(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, c := threePeers(t, clk.Now)
	b.AddContainer("web", addrs(t, "10.40.1.2"))
	fm.Flush()

	swept := make(chan struct{}, 1)
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); wg.Wait() })
	const grace = 40 * time.Millisecond
	for _, r := range []*Replicator{a, c} {
		r.PeerDown("b")
		if r == a {
			r.afterSweep = func() {
				select {
				case swept <- struct{}{}:
				default:
				}
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.Run(ctx, grace, time.Hour); err != nil {
				t.Error(err)
			}
		}()
	}
	// A sweep before the grace has passed keeps b's records.
	<-swept
	<-swept
	if got := lookup(a, "web"); len(got) != 1 {
		t.Fatalf("a dropped b's records before the grace: %v", got)
	}
	clk.Advance(grace)
	for _, r := range []*Replicator{a, c} {
		waitFor(t, 5*time.Second, "b's records to expire on "+r.Records().Self(), func() bool {
			_, known := r.Records().LookupName("web")
			return !known
		})
	}
	if v := counterValue(t, a.m.peersExpired); v != 1 {
		t.Fatalf("peers expired = %v", v)
	}
	// A forgotten peer's entries are refused until it is up again.
	pushPull(b, a)
	if _, known := a.Records().LookupName("web"); known {
		t.Fatal("a accepted a forgotten peer's state")
	}
	a.PeerUp("b")
	pushPull(b, a)
	if got := lookup(a, "web"); !slices.Equal(got, []string{"10.40.1.2@b"}) {
		t.Fatalf("a after b came back: %v", got)
	}

	cancel()
	wg.Wait()
	if err := a.Run(context.Background(), 0, time.Hour); !errors.Is(err, ErrRunArgs) {
		t.Fatalf("Run with zero grace: %v", err)
	}
}

func TestReplicatorTombstonesExpire(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, _ := threePeers(t, clk.Now)
	a.AddContainer("web", addrs(t, "10.40.0.2"))
	fm.Flush()
	a.RemoveContainer("web", nil)
	fm.Flush()
	b.idleSweep = 20 * time.Millisecond // no peer is down: tombstones go at the idle sweeps
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- b.Run(ctx, 20*time.Millisecond, time.Minute) }()
	clk.Advance(time.Minute)
	waitFor(t, 5*time.Second, "the tombstone to expire", func() bool { return b.Records().State().Empty() })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A delta bigger than one message goes out as several, each within the
// limit and each decodable on its own; together they carry everything.
func TestReplicatorSplitsLargeDelta(t *testing.T) {
	long := strings.Repeat("x", 60) + "." + strings.Repeat("y", 60) + "." + strings.Repeat("z", 60)
	for _, max := range []int{0, MinMaxMessage, 4096} {
		t.Run(fmt.Sprint(max), func(t *testing.T) {
			fm := newFakeMesh()
			edit := func(c *ReplicatorConfig) { c.MaxMessage = max }
			a := fm.add(t, strings.Repeat("p", 200), nil, edit)
			b := fm.add(t, "b", nil, edit)
			var as []netip.Addr
			for i := 0; i < 100; i++ {
				as = append(as, netip.AddrFrom16([16]byte{0xfd, 15: byte(i)}))
			}
			if err := a.AddContainer(long, as); err != nil {
				t.Fatal(err)
			}
			limit := max
			if limit == 0 {
				limit = DefaultMaxMessage
			}
			// About 41 KB of entries.
			if len(fm.sizes) < 41000/limit {
				t.Fatalf("%d messages under a %d-byte limit", len(fm.sizes), limit)
			}
			for _, n := range fm.sizes {
				if n > limit {
					t.Fatalf("message of %d bytes over %d", n, limit)
				}
				if max == 0 && n+len("dns")+10 > 1024 {
					t.Fatalf("message of %d bytes would not fit a mesh broadcast", n)
				}
			}
			fm.Flush()
			if got := lookup(b, long); len(got) != 100 {
				t.Fatalf("b got %d of 100 addresses", len(got))
			}
			assertConverged(t, a, b)
		})
	}

	// The largest possible entry fits MinMaxMessage.
	e := Entry{Peer: strings.Repeat("p", maxPeerLen), Name: long + "." + strings.Repeat("w", 200-len(long)-1),
		Kind: KindSRV, Service: strings.Repeat("s", maxLabelLen), Proto: "udp", Port: 65535, Version: maxVersion}
	d, err := NewDelta(e)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(d.Encode()); n > MinMaxMessage {
		t.Fatalf("largest entry encodes to %d bytes, over MinMaxMessage %d", n, MinMaxMessage)
	}
	if _, err := NewReplicator(ReplicatorConfig{Records: newTestRecords(t, "a", nil), Broadcast: func([]byte) error { return nil }, MaxMessage: 100}); !errors.Is(err, ErrReplicatorConfig) {
		t.Fatalf("tiny MaxMessage: %v", err)
	}
}

func TestReplicatorGarbageCountedAndIgnored(t *testing.T) {
	reg := prometheus.NewRegistry()
	fm := newFakeMesh()
	a := fm.add(t, "a", nil, func(c *ReplicatorConfig) { c.Registry = reg })
	b := fm.add(t, "b", nil, nil)
	b.AddContainer("web", addrs(t, "10.40.1.2"))
	fm.Flush()
	before := a.Records().Encode()

	valid := b.Records().Encode()
	rnd := rand.New(rand.NewPCG(3, 4))
	garbage := [][]byte{nil, {}, []byte("WDR"), []byte("WDR\x01\x00"), []byte("hello, world"),
		valid[:len(valid)-1], append(slices.Clone(valid), 0)}
	for i := 0; i < 200; i++ {
		g := slices.Clone(valid)
		g[rnd.IntN(len(g))] ^= byte(1 + rnd.IntN(255))
		if _, err := DecodeDelta(g); err != nil {
			garbage = append(garbage, g)
		}
	}
	for _, g := range garbage {
		a.NotifyMsg(g)
		a.MergeRemoteState(g, false)
	}
	if !bytes.Equal(a.Records().Encode(), before) {
		t.Fatal("garbage changed the store")
	}
	n := float64(len(garbage))
	if v := counterValue(t, a.m.rejected.WithLabelValues("delta")); v != n {
		t.Fatalf("rejected deltas = %v, want %v", v, n)
	}
	if v := counterValue(t, a.m.rejected.WithLabelValues("state")); v != n {
		t.Fatalf("rejected states = %v, want %v", v, n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		found = found || mf.GetName() == "weft_dns_replication_rejected_total"
	}
	if !found {
		t.Fatal("weft_dns_replication_rejected_total not exported")
	}
	// A second replicator on the same registry is refused.
	if _, err := NewReplicator(ReplicatorConfig{Records: newTestRecords(t, "x", nil), Broadcast: func([]byte) error { return nil }, Registry: reg}); err == nil {
		t.Fatal("duplicate metrics registration accepted")
	}
}

func TestReplicatorBroadcastErrors(t *testing.T) {
	boom := errors.New("queue full")
	calls := 0
	r, err := NewReplicator(ReplicatorConfig{Records: newTestRecords(t, "a", nil), Broadcast: func([]byte) error { calls++; return boom }})
	if err != nil {
		t.Fatal(err)
	}
	// The change is stored even if it cannot be broadcast now.
	if err := r.AddContainer("web", addrs(t, "10.40.0.2")); err != nil {
		t.Fatal(err)
	}
	if _, known := r.Records().LookupName("web"); !known || calls != 1 {
		t.Fatalf("known %v, calls %d", known, calls)
	}
	d, _ := r.Records().AddAddr("db", mustAddr(t, "10.40.0.3"))
	if err := r.Publish(d); !errors.Is(err, boom) {
		t.Fatalf("Publish: %v", err)
	}
	if err := r.Publish(nil); err != nil {
		t.Fatal(err)
	}
	if v := counterValue(t, r.m.broadcastErrors); v != 2 {
		t.Fatalf("broadcast errors = %v", v)
	}
	if _, err := NewReplicator(ReplicatorConfig{Broadcast: r.broadcast}); !errors.Is(err, ErrReplicatorConfig) {
		t.Fatalf("no records: %v", err)
	}
	if _, err := NewReplicator(ReplicatorConfig{Records: r.Records()}); !errors.Is(err, ErrReplicatorConfig) {
		t.Fatalf("no broadcast: %v", err)
	}
}

// Concurrent local writes, deltas and push/pulls (run with -race).
func TestReplicatorConcurrent(t *testing.T) {
	fm, a, b, c := threePeers(t, nil)
	var wg sync.WaitGroup
	for i, r := range []*Replicator{a, b, c} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				name := fmt.Sprintf("n%d", j%5)
				r.AddContainer(name, []netip.Addr{netip.AddrFrom4([4]byte{10, 40, byte(i), byte(j + 1)})})
				if j%3 == 0 {
					r.RemoveContainer(name, nil)
				}
				fm.Flush()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for j := 0; j < 20; j++ {
			pushPull(a, b)
			pushPull(b, c)
		}
	}()
	wg.Wait()
	fm.Flush()
	pushPull(a, b)
	pushPull(b, c)
	pushPull(c, a)
	assertConverged(t, a, b, c)
}

func FuzzReplicatorNotifyMsg(f *testing.F) {
	r0 := newTestRecords(f, "b", nil)
	r0.AddAddr("web", netip.MustParseAddr("10.40.0.2"))
	r0.AddSRV("web", "http", "tcp", 80)
	f.Add(r0.Encode())
	f.Add([]byte("WDR\x02\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := NewReplicator(ReplicatorConfig{Records: newTestRecords(t, "a", nil), Broadcast: func([]byte) error { return nil }})
		if err != nil {
			t.Fatal(err)
		}
		r.NotifyMsg(b)
		r.MergeRemoteState(b, true)
		if _, err := DecodeDelta(b); err != nil && r.Records().Generation() != 0 {
			t.Fatal("undecodable input changed the store")
		}
	})
}

func TestSweepEvery(t *testing.T) {
	for _, tc := range []struct {
		fast, idle time.Duration
		pending    bool
		want       time.Duration
	}{
		{time.Second, time.Minute, true, time.Second},
		{time.Second, time.Minute, false, time.Minute},
		{time.Second, time.Millisecond, false, time.Second}, // never slower... nor faster than fast
	} {
		if got := sweepEvery(tc.fast, tc.idle, tc.pending); got != tc.want {
			t.Errorf("sweepEvery(%v, %v, %v) = %v, want %v", tc.fast, tc.idle, tc.pending, got, tc.want)
		}
	}
}

// An idle replicator does not sweep at the fast rate; a peer going down switches it to the
// fast rate until the peer has expired, then it goes idle again.
func TestReplicatorSweepsFastOnlyWhilePeerDown(t *testing.T) {
	clk := newFakeClock()
	fm, a, b, _ := threePeers(t, clk.Now)
	b.AddContainer("web", addrs(t, "10.40.1.2"))
	fm.Flush()
	var sweeps atomic.Int64
	a.afterSweep = func() { sweeps.Add(1) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	const grace = 40 * time.Millisecond // fast sweeps every 10 ms; idle every minute
	go func() { done <- a.Run(ctx, grace, time.Hour) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	time.Sleep(150 * time.Millisecond)
	if n := sweeps.Load(); n != 0 {
		t.Fatalf("idle replicator swept %d times in 150 ms", n)
	}
	a.PeerDown("b")
	waitFor(t, 5*time.Second, "fast sweeps after a peer went down", func() bool { return sweeps.Load() >= 3 })
	clk.Advance(grace)
	waitFor(t, 5*time.Second, "b's records to expire", func() bool {
		_, known := a.Records().LookupName("web")
		return !known
	})
	time.Sleep(30 * time.Millisecond) // the sweep that expired b may still be finishing
	n := sweeps.Load()
	time.Sleep(150 * time.Millisecond)
	if m := sweeps.Load(); m != n {
		t.Fatalf("replicator kept sweeping after the down peer expired: %d then %d", n, m)
	}
}
