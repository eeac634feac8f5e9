package mesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

const converge = 10 * time.Second // deadline for gossip to converge on loopback

// startChain starts n meshes, each seeded with only the one before it.
func startChain(t *testing.T, n int, prefix string, edit func(*Config)) []*Mesh {
	t.Helper()
	var meshes []*Mesh
	for i := range n {
		cfg, _ := testConfig(t, fmt.Sprintf("%s%d", prefix, i))
		if i > 0 {
			cfg.Seeds = []string{addr(meshes[i-1])}
		}
		if edit != nil {
			edit(&cfg)
		}
		meshes = append(meshes, startMesh(t, cfg))
	}
	return meshes
}

func names(meshes []*Mesh) []string {
	var out []string
	for _, m := range meshes {
		out = append(out, m.cfg.Name)
	}
	return out
}

func TestFiveMeshesConverge(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 5, "conv", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	for _, m := range meshes {
		peers := m.Peers()
		if len(peers) != 5 {
			t.Fatalf("%s: %d peers, want 5: %+v", m.cfg.Name, len(peers), peers)
		}
		for _, p := range peers {
			if p.Self != (p.Name == m.cfg.Name) {
				t.Errorf("%s: peer %s Self=%v", m.cfg.Name, p.Name, p.Self)
			}
			if p.Meta.Name != p.Name || p.Meta.Underlay != netip.MustParseAddr("127.0.0.1") {
				t.Errorf("%s: peer %s has metadata %+v", m.cfg.Name, p.Name, p.Meta)
			}
			if p.Addr.Addr() != netip.MustParseAddr("127.0.0.1") || p.Addr.Port() == 0 {
				t.Errorf("%s: peer %s has address %v", m.cfg.Name, p.Name, p.Addr)
			}
		}
		if got := metricValue(m.metrics.members.WithLabelValues("alive")); got != 5 {
			t.Errorf("%s: weft_mesh_members{state=alive} = %v, want 5", m.cfg.Name, got)
		}
	}
}

func TestMetadataUpdatePropagates(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 3, "meta", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	events := subscribe(t, meshes[2])

	key := [32]byte{1, 2, 3}
	mac, _ := net.ParseMAC("02:00:00:00:00:01")
	err := meshes[0].UpdateMetadata(func(md *Metadata) {
		md.Capabilities = append(md.Capabilities, "vxlan", "wireguard")
		md.VTEPMAC = mac
		md.WireGuardKey = key
		md.RaftAddr = netip.MustParseAddrPort("127.0.0.1:6785")
		md.Version = "0.1.0"
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := meshes[0].Local().Meta; !got.HasCapability("wireguard") {
		t.Fatalf("local metadata not updated: %+v", got)
	}
	waitFor(t, converge, func() string {
		for _, m := range meshes[1:] {
			p, _ := m.Peer("meta0")
			if !p.Meta.HasCapability("wireguard") || p.Meta.WireGuardKey != key ||
				!bytes.Equal(p.Meta.VTEPMAC, mac) || p.Meta.RaftAddr.Port() != 6785 || p.Meta.Version != "0.1.0" {
				return fmt.Sprintf("%s sees meta0 metadata %+v", m.cfg.Name, p.Meta)
			}
		}
		return ""
	})
	waitFor(t, converge, func() string {
		if !slices.Contains(events.types("meta0"), EventUpdate) {
			return fmt.Sprintf("meta2 got events %v for meta0, want an update", events.types("meta0"))
		}
		return ""
	})

	// Invalid or oversized metadata is refused and changes nothing.
	err = meshes[0].UpdateMetadata(func(md *Metadata) { md.Capabilities = append(md.Capabilities, "Bad Cap") })
	if !errors.Is(err, ErrBadMetadata) {
		t.Fatalf("invalid capability: err = %v, want ErrBadMetadata", err)
	}
	err = meshes[0].UpdateMetadata(func(md *Metadata) { md.Name = "other" })
	if !errors.Is(err, ErrBadMetadata) {
		t.Fatalf("rename: err = %v, want ErrBadMetadata", err)
	}
	err = meshes[0].UpdateMetadata(func(md *Metadata) {
		for i := range 16 {
			md.Capabilities = append(md.Capabilities, fmt.Sprintf("cap-%02d-%s", i, strings.Repeat("x", 24)))
		}
	})
	if !errors.Is(err, ErrBadMetadata) {
		t.Fatalf("oversized: err = %v, want ErrBadMetadata", err)
	}
	if got := meshes[0].Local().Meta.Capabilities; !slices.Equal(got, []string{"vxlan", "wireguard"}) {
		t.Fatalf("refused updates changed metadata: %v", got)
	}
}

func TestClosedPeerGoesSuspectThenDead(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 4, "fail", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	observers := meshes[:3]
	var logs []*eventLog
	for _, m := range observers {
		logs = append(logs, subscribe(t, m))
	}
	if err := meshes[3].Close(); err != nil {
		t.Fatal(err)
	}
	allSee(t, converge, observers, StateDead, "fail3")
	for i, l := range logs {
		waitFor(t, time.Second, func() string {
			got := l.types("fail3")
			s := slices.Index(got, EventSuspect)
			d := slices.Index(got, EventDead)
			if s < 0 || d < s {
				return fmt.Sprintf("%s saw events %v for fail3, want suspect then dead", observers[i].cfg.Name, got)
			}
			return ""
		})
	}
	if got := metricValue(meshes[0].metrics.members.WithLabelValues("dead")); got != 1 {
		t.Errorf("weft_mesh_members{state=dead} = %v, want 1", got)
	}
}

func TestLeaveShowsLeft(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 3, "leave", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	events := subscribe(t, meshes[0])
	if err := meshes[2].Leave(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	if err := meshes[2].Close(); err != nil {
		t.Fatal(err)
	}
	allSee(t, converge, meshes[:2], StateLeft, "leave2")
	waitFor(t, time.Second, func() string {
		if got := events.types("leave2"); !slices.Contains(got, EventLeave) || slices.Contains(got, EventDead) {
			return fmt.Sprintf("events for leave2: %v, want leave and no dead", got)
		}
		return ""
	})
}

func TestRestartWithSameNameRejoins(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 3, "restart", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	port := meshes[2].Local().Addr.Port()
	meshes[2].Close()
	allSee(t, converge, meshes[:2], StateDead, "restart2")
	deadSince := func() time.Time { p, _ := meshes[0].Peer("restart2"); return p.Since }()

	// Same name, same address, seeded with the first peer only.
	cfg, _ := testConfig(t, "restart2")
	cfg.BindPort = int(port)
	cfg.Seeds = []string{addr(meshes[0])}
	again := startMesh(t, cfg)
	all := []*Mesh{meshes[0], meshes[1], again}
	allSee(t, converge, all, StateAlive, names(all)...)
	if p, _ := meshes[0].Peer("restart2"); !p.Since.After(deadSince) {
		t.Errorf("restart2 Since = %v, not after its death at %v", p.Since, deadSince)
	}
}

func TestPasswordMismatchIsRefused(t *testing.T) {
	t.Parallel()
	right := []byte("correct horse battery staple")
	cfgA, logsA := testConfig(t, "pw-a")
	cfgA.Password = right
	a := startMesh(t, cfgA)

	cfgW, logsW := testConfig(t, "pw-wrong")
	cfgW.Password = []byte("wrong")
	cfgW.Seeds = []string{addr(a)}
	wrong := startMesh(t, cfgW)

	cfgN, _ := testConfig(t, "pw-none")
	cfgN.Seeds = []string{addr(a)}
	none := startMesh(t, cfgN)

	// Both are refused, and say why, on both sides.
	waitFor(t, converge, func() string {
		for _, m := range []*Mesh{wrong, none} {
			ts := m.Targets()
			if len(ts) != 1 || !errors.Is(ts[0].LastError, ErrPasswordMismatch) {
				return fmt.Sprintf("%s targets %+v, want a password mismatch", m.cfg.Name, ts)
			}
		}
		if !logsW.contains("join refused: gossip password mismatch") {
			return "the joining peer's log does not name the password mismatch"
		}
		if !logsA.contains("No installed keys could decrypt") && !logsA.contains("no installed keys could decrypt") {
			return "the seed's log does not mention the undecryptable message"
		}
		if !logsA.contains("encryption is configured but remote state is not encrypted") {
			return "the seed's log does not mention the unencrypted join"
		}
		return ""
	})
	if got := metricValue(wrong.metrics.joinFailures.WithLabelValues(joinFailPassword)); got < 1 {
		t.Errorf("weft_mesh_join_failures_total{reason=password} = %v", got)
	}

	// The right password joins; the others never became members.
	cfgR, _ := testConfig(t, "pw-right")
	cfgR.Password = right
	cfgR.Seeds = []string{addr(a)}
	r := startMesh(t, cfgR)
	allSee(t, converge, []*Mesh{a, r}, StateAlive, "pw-a", "pw-right")
	for _, n := range []string{"pw-wrong", "pw-none"} {
		if _, ok := a.Peer(n); ok {
			t.Errorf("pw-a lists %s as a peer", n)
		}
		if _, ok := r.Peer(n); ok {
			t.Errorf("pw-right lists %s as a peer", n)
		}
	}
	if len(wrong.Peers()) != 1 || len(none.Peers()) != 1 {
		t.Errorf("refused peers see others: %v / %v", wrong.Peers(), none.Peers())
	}
}

func TestJoinLoopRetriesUnreachableSeed(t *testing.T) {
	t.Parallel()
	port := freePort(t)
	cfgA, _ := testConfig(t, "late-a")
	cfgA.Seeds = []string{fmt.Sprintf("127.0.0.1:%d", port)}
	a := startMesh(t, cfgA)
	waitFor(t, converge, func() string {
		if n := metricValue(a.metrics.joinAttempts); n < 3 {
			return fmt.Sprintf("%v join attempts, want at least 3", n)
		}
		if ts := a.Targets(); ts[0].LastError == nil {
			return "no join error recorded"
		}
		return ""
	})

	cfgB, _ := testConfig(t, "late-b")
	cfgB.BindPort = port
	b := startMesh(t, cfgB)
	allSee(t, converge, []*Mesh{a, b}, StateAlive, "late-a", "late-b")
	waitFor(t, time.Second, func() string {
		if ts := a.Targets(); ts[0].LastError != nil {
			return fmt.Sprintf("target still has error %v", ts[0].LastError)
		}
		return ""
	})
}

func TestConnectAndForget(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 2, "conn", func(c *Config) { c.Seeds = nil })
	a, b := meshes[0], meshes[1]
	if err := a.Connect("not a host!"); err == nil {
		t.Fatal("Connect accepted a malformed address")
	}
	if err := a.Connect(addr(b)); err != nil {
		t.Fatal(err)
	}
	allSee(t, converge, meshes, StateAlive, "conn0", "conn1")
	if ts := a.Targets(); len(ts) != 1 || ts[0].Addr != addr(b) {
		t.Fatalf("targets %+v", ts)
	}
	if err := a.Forget(addr(b)); err != nil {
		t.Fatal(err)
	}
	if err := a.Forget(addr(b)); err != nil {
		t.Fatalf("forgetting twice: %v", err)
	}
	if ts := a.Targets(); len(ts) != 0 {
		t.Fatalf("targets after Forget: %+v", ts)
	}
	if peerState(a, "conn1") != "alive" {
		t.Fatal("Forget dropped a member")
	}
}

// recorder is a ChannelHandler that records what it gets.
type recorder struct {
	state []byte
	mu    sync.Mutex
	msgs  []string
	merge []string // "payload/join"
}

func (r *recorder) NotifyMsg(b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, string(b))
}

func (r *recorder) LocalState(join bool) []byte { return r.state }

func (r *recorder) MergeRemoteState(b []byte, join bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.merge = append(r.merge, fmt.Sprintf("%s/%v", b, join))
}

func (r *recorder) got() ([]string, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.msgs), slices.Clone(r.merge)
}

func TestChannelBroadcastReachesAll(t *testing.T) {
	t.Parallel()
	var recs []*recorder
	var meshes []*Mesh
	for i := range 4 {
		cfg, _ := testConfig(t, fmt.Sprintf("bc%d", i))
		if i > 0 {
			cfg.Seeds = []string{addr(meshes[i-1])}
		}
		m, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		r := &recorder{}
		if err := m.RegisterChannel("links", r); err != nil {
			t.Fatal(err)
		}
		if err := m.RegisterChannel("other", &recorder{}); err != nil {
			t.Fatal(err)
		}
		if err := m.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		recs, meshes = append(recs, r), append(meshes, m)
	}
	allSee(t, converge, meshes, StateAlive, names(meshes)...)

	want := []string{"one", "two", "three"}
	for _, msg := range want {
		if err := meshes[0].Broadcast("links", []byte(msg)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, converge, func() string {
		for i, r := range recs[1:] {
			msgs, _ := r.got()
			slices.Sort(msgs) // each exactly once, in any order
			w := slices.Sorted(slices.Values(want))
			if !slices.Equal(msgs, w) {
				return fmt.Sprintf("bc%d got %q, want %q", i+1, msgs, w)
			}
		}
		return ""
	})
	if msgs, _ := recs[0].got(); len(msgs) != 0 {
		t.Errorf("the sender's own handler got %q", msgs)
	}
	if got := metricValue(meshes[1].metrics.messagesReceived.WithLabelValues("links")); got != 3 {
		t.Errorf("weft_mesh_messages_received_total{channel=links} = %v, want 3", got)
	}

	if err := meshes[0].Broadcast("nope", []byte("x")); !errors.Is(err, ErrUnknownChannel) {
		t.Errorf("unknown channel: err = %v", err)
	}
	if err := meshes[0].Broadcast("links", make([]byte, MaxBroadcastSize)); !errors.Is(err, ErrMessageTooLarge) {
		t.Errorf("large message: err = %v", err)
	}
	if err := meshes[0].RegisterChannel("links", &recorder{}); !errors.Is(err, ErrChannelExists) {
		t.Errorf("duplicate channel: err = %v", err)
	}
	if err := meshes[0].RegisterChannel("Bad Name", &recorder{}); err == nil {
		t.Error("bad channel name accepted")
	}
}

func TestPushPullExchangesChannelState(t *testing.T) {
	t.Parallel()
	cfgA, _ := testConfig(t, "pp-a")
	a, err := New(cfgA)
	if err != nil {
		t.Fatal(err)
	}
	ra := &recorder{state: []byte("state-of-a")}
	a.RegisterChannel("dns", ra)
	a.RegisterChannel("empty", &recorder{}) // sends nothing
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })

	cfgB, _ := testConfig(t, "pp-b")
	cfgB.Seeds = []string{addr(a)}
	b, err := New(cfgB)
	if err != nil {
		t.Fatal(err)
	}
	rb := &recorder{state: []byte("state-of-b")}
	b.RegisterChannel("dns", rb)
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })

	waitFor(t, converge, func() string {
		_, ma := ra.got()
		_, mb := rb.got()
		if !slices.Contains(ma, "state-of-b/true") {
			return fmt.Sprintf("a merged %q, want b's state from the join", ma)
		}
		if !slices.Contains(mb, "state-of-a/true") {
			return fmt.Sprintf("b merged %q, want a's state from the join", mb)
		}
		// Periodic push/pull (every 500ms here) carries it again.
		if !slices.Contains(ma, "state-of-b/false") && !slices.Contains(mb, "state-of-a/false") {
			return "no periodic push/pull state yet"
		}
		return ""
	})
}

// TestGarbageMetadataIsRefused joins a raw memberlist node whose metadata is
// not ours: the mesh never lists it.
func TestGarbageMetadataIsRefused(t *testing.T) {
	t.Parallel()
	cfg, logs := testConfig(t, "meta-guard")
	m := startMesh(t, cfg)

	mc := memberlist.DefaultLANConfig()
	mc.Name = "intruder"
	mc.BindAddr, mc.BindPort, mc.AdvertisePort = "127.0.0.1", 0, 0
	mc.Delegate = rawMeta("\x07garbage")
	mc.LogOutput = &logBuffer{}
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	defer ml.Shutdown()
	ml.Join([]string{addr(m)})
	waitFor(t, converge, func() string {
		if !logs.contains("ignoring alive message for 'intruder'") {
			return "no log line about the refused node"
		}
		return ""
	})
	if _, ok := m.Peer("intruder"); ok {
		t.Fatal("a node with garbage metadata became a peer")
	}
	if got := metricValue(m.metrics.metadataRejected); got < 1 {
		t.Errorf("weft_mesh_metadata_rejected_total = %v", got)
	}
}

type rawMeta string

func (r rawMeta) NodeMeta(int) []byte           { return []byte(r) }
func (rawMeta) NotifyMsg([]byte)                {}
func (rawMeta) GetBroadcasts(int, int) [][]byte { return nil }
func (rawMeta) LocalState(bool) []byte          { return nil }
func (rawMeta) MergeRemoteState([]byte, bool)   {}

func TestLifecycle(t *testing.T) {
	t.Parallel()
	cfg, _ := testConfig(t, "life")
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Leave(time.Second); !errors.Is(err, ErrNotStarted) {
		t.Errorf("Leave before Start: %v", err)
	}
	// Metadata can change before Start and is gossiped from Start on.
	if err := m.UpdateMetadata(func(md *Metadata) { md.Version = "v1" }); err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := m.Start(context.Background()); !errors.Is(err, ErrAlreadyStarted) {
		t.Errorf("second Start: %v", err)
	}
	if l := m.Local(); l.Meta.Version != "v1" || l.State != StateAlive || l.Addr.Port() == 0 {
		t.Errorf("Local() = %+v", l)
	}
	ch, cancel := m.Subscribe()
	cancel()
	cancel()
	if _, ok := <-ch; ok {
		t.Error("cancelled subscription still open")
	}
	ch2, _ := m.Subscribe()
	if err := m.Leave(time.Second); err != nil {
		t.Errorf("Leave alone: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, ok := <-ch2; ok {
		t.Error("Close left a subscription open")
	}
	if ch3, _ := m.Subscribe(); func() bool { _, ok := <-ch3; return ok }() {
		t.Error("Subscribe after Close returned an open channel")
	}
	if err := m.Leave(time.Second); !errors.Is(err, ErrClosed) {
		t.Errorf("Leave after Close: %v", err)
	}
	if err := m.Start(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: %v", err)
	}
	// The registry is free again for a new Mesh.
	m2, err := New(cfg)
	if err != nil {
		t.Fatalf("New on the registry of a closed Mesh: %v", err)
	}
	if _, err := New(cfg); err == nil {
		t.Error("two Meshes registered on one registry")
	}
	m2.Close()

	// Close before Start is fine too.
	cfg2, _ := testConfig(t, "never-started")
	m3, err := New(cfg2)
	if err != nil {
		t.Fatal(err)
	}
	if err := m3.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestStartContextCancelStopsLoops(t *testing.T) {
	t.Parallel()
	cfg, _ := testConfig(t, "ctx")
	cfg.Seeds = []string{fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	waitFor(t, converge, func() string {
		if metricValue(m.metrics.joinAttempts) < 1 {
			return "no join attempt"
		}
		return ""
	})
	cancel()
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(converge):
		t.Fatal("loops still running after the context was cancelled")
	}
}

// TestSuspicionNeedsNoLogs: with every log discarded, a closed peer still
// goes suspect, then dead, on every observer (suspicion comes from
// memberlist's failed-probe hook, not from its log text).
func TestSuspicionNeedsNoLogs(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 3, "quiet", func(c *Config) { c.Logger = slog.New(slog.DiscardHandler) })
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	observers := meshes[:2]
	var logs []*eventLog
	for _, m := range observers {
		logs = append(logs, subscribe(t, m))
	}
	meshes[2].Close()
	allSee(t, converge, observers, StateDead, "quiet2")
	for i, l := range logs {
		waitFor(t, time.Second, func() string {
			got := l.types("quiet2")
			if s, d := slices.Index(got, EventSuspect), slices.Index(got, EventDead); s < 0 || d < s {
				return fmt.Sprintf("%s saw events %v for quiet2, want suspect then dead", observers[i].cfg.Name, got)
			}
			return ""
		})
	}
}

// TestFalseSuspicionClears: a suspicion of a healthy peer (as after one lost
// probe) spreads, and the next direct ack by any peer clears it everywhere.
func TestFalseSuspicionClears(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 4, "false", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	events := subscribe(t, meshes[3])
	meshes[0].suspectAfterFailedPing("false1")
	waitFor(t, converge, func() string {
		if got := events.types("false1"); !slices.Contains(got, EventSuspect) || !slices.Contains(got, EventAlive) {
			return fmt.Sprintf("false3 saw events %v for false1, want suspect and alive", got)
		}
		return ""
	})
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
}

// One failed direct probe is not suspicion: a healthy peer answers the confirming ping a
// probe interval later and is never marked suspect; a peer that cannot answer it is.
func TestFailedProbeNeedsConfirmation(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 3, "confirm", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	m := meshes[0]
	events := subscribe(t, m)
	m.mu.Lock()
	m.peers["ghost"] = &Peer{Name: "ghost", State: StateAlive, Since: time.Now()} // no address: no answer
	m.mu.Unlock()
	if m.onDirectProbeFailed("confirm1") || m.onDirectProbeFailed("ghost") {
		t.Fatal("the failed-probe hook turned TCP fallback pings off")
	}
	if got := peerState(m, "ghost"); got != StateAlive.String() {
		t.Fatalf("ghost is %s at once after one failed probe, want alive until the confirming ping", got)
	}
	waitFor(t, converge, func() string {
		if got := peerState(m, "ghost"); got != StateSuspect.String() {
			return "ghost, which cannot answer the confirming ping, is " + got
		}
		return ""
	})
	waitFor(t, converge, func() string {
		if got := metricValue(m.metrics.suspicionUnconfirmed); got != 1 {
			return fmt.Sprintf("unconfirmed suspicions = %v, want 1 (confirm1 answered)", got)
		}
		return ""
	})
	if got := events.types("confirm1"); slices.Contains(got, EventSuspect) {
		t.Fatalf("confirm1 answered the confirming ping but was suspected: events %v", got)
	}
}

func TestPeerUp(t *testing.T) {
	for s, want := range map[State]bool{StateAlive: true, StateSuspect: true, StateDead: false, StateLeft: false} {
		if got := (Peer{State: s}).Up(); got != want {
			t.Errorf("Peer{State: %v}.Up() = %v", s, got)
		}
	}
}

// Compression is off by default; a peer that still has it on (an older
// build, or Config.Compress) must join and be understood both ways.
func TestCompressionMixedConverges(t *testing.T) {
	t.Parallel()
	if DefaultConfig().Compress {
		t.Fatal("DefaultConfig compresses gossip; the default is off (see Config.Compress)")
	}
	meshes := startChain(t, 3, "mixc", func(c *Config) { c.Compress = strings.HasSuffix(c.Name, "1") })
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
}

// The suspicion budget: a burst goes out at once, then one note per refill
// period; time going backwards refills nothing.
func TestSuspicionBudget(t *testing.T) {
	var b tokenBucket
	t0 := time.Unix(1000, 0)
	per := 10 * time.Second
	for i := range suspicionBurst {
		if !b.take(t0, per) {
			t.Fatalf("note %d of the burst refused", i+1)
		}
	}
	if b.take(t0, per) {
		t.Fatal("a note beyond the burst went out")
	}
	if b.take(t0.Add(per/2), per) {
		t.Fatal("a note went out half a refill period later")
	}
	if !b.take(t0.Add(per), per) {
		t.Fatal("no note after a full refill period")
	}
	if b.take(t0.Add(-time.Hour), per) {
		t.Fatal("a clock step back refilled the budget")
	}
	if got := refill(2, time.Hour, per, true); got != 0 {
		t.Fatalf("refill after an hour = %v, want 0 (never below empty)", got)
	}
}

// A storm of failed probes sends at most the burst of suspect notes; the
// rest are counted as suppressed and still mark the peers suspect locally.
func TestSuspicionStormBounded(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 3, "storm", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	m := meshes[0]
	for range 20 {
		for _, name := range []string{"storm1", "storm2"} {
			m.suspectAfterFailedPing(name)
			m.markAlive(name) // so that the next failure is a transition again
		}
	}
	suppressed := metricValue(m.metrics.suspicionSuppressed.WithLabelValues("suspect"))
	if suppressed < 40-suspicionBurst {
		t.Fatalf("%v suspect notes suppressed of 40, want at least %d", suppressed, 40-suspicionBurst)
	}
	// A private suspicion ends without a note; a published one with one.
	if m.notes.cleared("storm1") || m.notes.cleared("storm2") {
		// markAlive above already ran; cleared is what onDirectAck asks next.
		t.Fatal("the end of a suppressed (private) suspicion would be published")
	}
	m.notes.heard("storm1")
	if !m.notes.cleared("storm1") {
		t.Fatal("the end of a suspicion another peer published would not be published")
	}
}

// A suspicion that nothing renews expires after memberlist's shortest suspicion timeout
// (the peer stays alive in memberlist); failed probes renew it. Without the expiry a
// private suspicion lasted until this peer probed that one again, ~N probe intervals.
// The suspected peer is a row of the table that memberlist does not probe, so no direct
// ack ends the suspicion first.
func TestSuspicionExpires(t *testing.T) {
	t.Parallel()
	cfg, _ := testConfig(t, "expire0")
	m := startMesh(t, cfg)
	m.mu.Lock()
	m.peers["ghost"] = &Peer{Name: "ghost", State: StateAlive, Since: time.Now()}
	m.mu.Unlock()
	expiry := m.suspicionExpiry() // SuspicionMult × ProbeInterval below N=10
	if want := time.Duration(cfg.SuspicionMult) * cfg.ProbeInterval; expiry != want {
		t.Fatalf("suspicionExpiry = %v, want %v", expiry, want)
	}
	m.suspectAfterFailedPing("ghost")
	if got := peerState(m, "ghost"); got != StateSuspect.String() {
		t.Fatalf("after a failed probe ghost is %s, want suspect", got)
	}
	// Renewed by a failed probe every half expiry: still suspect after twice the expiry.
	for end := time.Now().Add(2 * expiry); time.Now().Before(end); {
		time.Sleep(expiry / 2)
		if got := peerState(m, "ghost"); got != StateSuspect.String() {
			t.Fatalf("renewed suspicion ended: ghost is %s", got)
		}
		m.onDirectProbeFailed("ghost")
	}
	start := time.Now()
	waitFor(t, 5*expiry, func() string {
		if got := peerState(m, "ghost"); got != StateAlive.String() {
			return "ghost is " + got
		}
		return ""
	})
	if took := time.Since(start); took < expiry*9/10 {
		t.Fatalf("suspicion ended %v after the last renewal, before the expiry %v", took, expiry)
	}
	if got := metricValue(m.metrics.suspicionExpired); got != 1 {
		t.Fatalf("suspicions expired = %v, want 1", got)
	}
}

// A private suspicion (its note suppressed: nobody else holds it, so no alive note will
// end it) expires after privateSuspicionExpiry probe intervals, a published one later.
func TestPrivateSuspicionExpiresSooner(t *testing.T) {
	t.Parallel()
	cfg, _ := testConfig(t, "private0")
	cfg.SuspicionMult = 30 // published: 3 s, private: 200 ms; a wide margin on a loaded machine
	m := startMesh(t, cfg)
	m.mu.Lock()
	for _, name := range []string{"public", "private"} {
		m.peers[name] = &Peer{Name: name, State: StateAlive, Since: time.Now()}
	}
	m.mu.Unlock()
	m.suspectAfterFailedPing("public")  // takes the budget's one note
	m.suspectAfterFailedPing("private") // suppressed
	if !m.notes.isPrivate("private") || m.notes.isPrivate("public") {
		t.Fatal("want private's suspicion private and public's published")
	}
	short := privateSuspicionExpiry * cfg.ProbeInterval
	if short >= m.suspicionExpiry() {
		t.Fatalf("private expiry %v not below the published one %v", short, m.suspicionExpiry())
	}
	waitFor(t, 5*short, func() string {
		if got := peerState(m, "private"); got != StateAlive.String() {
			return "private is " + got
		}
		return ""
	})
	if got := peerState(m, "public"); got != StateSuspect.String() {
		t.Fatalf("public is %s once private's suspicion expired, want still suspect", got)
	}
	if m.notes.isPrivate("private") {
		t.Fatal("an expired private suspicion is still remembered")
	}
}
