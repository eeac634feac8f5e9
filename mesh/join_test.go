package mesh

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestDeadRetryCount(t *testing.T) {
	for _, tc := range []struct {
		dead, alive int
		u           float64
		want        int
	}{
		{0, 10, 0, 0},
		{1, 1, 0.99, 1},     // alone with one dead: always retry it
		{1, 2, 0.99, 1},     // 2·1/2 = 1
		{1, 4, 0.49, 1},     // 0.5: tried half the rounds
		{1, 4, 0.5, 0},      //
		{1, 1000, 0.001, 1}, // 0.002
		{1, 1000, 0.5, 0},   //
		{10, 10, 0.9, 2},    // 2 exactly
		{50, 10, 0, 3},      // capped at deadRetryMax
		{2, 1, 0, 2},        // never more than the dead
	} {
		if got := deadRetryCount(tc.dead, tc.alive, tc.u); got != tc.want {
			t.Errorf("deadRetryCount(%d dead, %d alive, u=%v) = %d, want %d", tc.dead, tc.alive, tc.u, got, tc.want)
		}
	}
	// Across the mesh a dead member gets about deadRetryFanout attempts per round, whatever N.
	for _, alive := range []int{3, 50, 1000} {
		total := 0
		const rounds = 20000
		for i := range rounds {
			total += deadRetryCount(1, alive, float64(i)/rounds)
		}
		perRound := float64(total) / rounds * float64(alive)
		if perRound < deadRetryFanout*0.9 || perRound > deadRetryFanout*1.1 {
			t.Errorf("%d alive: %.2f attempts per round on the dead member, want about %d", alive, perRound, deadRetryFanout)
		}
	}
}

func TestNextSnapshotBatchRotates(t *testing.T) {
	rejoin := []string{"a", "b", "c", "d", "e", "f"}
	var seen []string
	for range 3 {
		var batch []string
		batch, rejoin = nextSnapshotBatch(rejoin)
		seen = append(seen, strings.Join(batch, ""))
	}
	if got := strings.Join(seen, " "); got != "abcd efab cdef" {
		t.Fatalf("batches %s, want abcd efab cdef", got)
	}
}

// counterValue reads a counter (with one label value, or none) from a test registry.
func counterValue(t *testing.T, reg prometheus.Registerer, name, label string) float64 {
	t.Helper()
	mfs, err := reg.(prometheus.Gatherer).Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.Metric {
			if label == "" || (len(m.Label) > 0 && m.Label[0].GetValue() == label) {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// threePeers starts a (no seeds, the given snapshot path) and b, c seeded with a, waits until
// all see all, then makes b and c forget a as a seed: from then on only a's snapshot or the
// retrying of dead members can bring a restarted a back.
func threePeers(t *testing.T, snapshot string, deadRetry time.Duration) (aPort int, b, c *Mesh) {
	t.Helper()
	aPort = freePort(t)
	acfg, _ := testConfig(t, "a")
	acfg.BindPort, acfg.SnapshotPath = aPort, snapshot
	a := startMesh(t, acfg)
	var peers []*Mesh
	for _, n := range []string{"b", "c"} {
		cfg, _ := testConfig(t, n)
		cfg.Seeds = []string{addr(a)}
		if deadRetry > 0 {
			cfg.DeadRetryInterval = deadRetry
		} else {
			cfg.DeadRetryFor = 0
		}
		peers = append(peers, startMesh(t, cfg))
	}
	b, c = peers[0], peers[1]
	allSee(t, 10*time.Second, []*Mesh{a, b, c}, StateAlive, "a", "b", "c")
	for _, m := range []*Mesh{b, c} {
		if err := m.Forget(addr(a)); err != nil {
			t.Fatal(err)
		}
	}
	if snapshot != "" {
		waitFor(t, 3*snapshotInterval, func() string {
			b, err := os.ReadFile(snapshot)
			if err != nil || !strings.Contains(string(b), `"b"`) || !strings.Contains(string(b), `"c"`) {
				return fmt.Sprintf("a's snapshot lacks b and c: %q, %v", b, err)
			}
			return ""
		})
	}
	a.Close()
	allSee(t, 10*time.Second, []*Mesh{b, c}, StateDead, "a")
	// memberlist still gossips to a dead node for a while (GossipToTheDeadTime), while it
	// has broadcasts to send (the suspicion and death of a): wait until a's port has been
	// quiet for a moment, so that nothing reaches a restarted a but what the test is about.
	quiet, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", aPort))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for buf := make([]byte, 2048); ; {
		quiet.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, _, err := quiet.ReadFrom(buf); err != nil {
			break // 300 ms without a packet
		}
		if time.Now().After(deadline) {
			t.Fatal("b and c still gossip to the dead a after 10s")
		}
	}
	quiet.Close()
	return aPort, b, c
}

// restartA starts a again, without seeds, on its old port, and returns it with the time it
// took until b and c both see it alive.
func restartA(t *testing.T, port int, snapshot string, b, c *Mesh) (*Mesh, *logBuffer, time.Duration) {
	t.Helper()
	cfg, logs := testConfig(t, "a")
	cfg.BindPort, cfg.SnapshotPath, cfg.DeadRetryFor = port, snapshot, 0
	start := time.Now()
	a := startMesh(t, cfg)
	allSee(t, 10*time.Second, []*Mesh{b, c}, StateAlive, "a")
	took := time.Since(start)
	allSee(t, 5*time.Second, []*Mesh{a}, StateAlive, "b", "c")
	return a, logs, took
}

// The first peer of a mesh has no seeds; restarted after the others declared it dead, it
// finds them through its snapshot (nobody retries it: b and c have retrying off).
func TestRestartedPeerRejoinsFromSnapshot(t *testing.T) {
	snap := filepath.Join(t.TempDir(), "members.json")
	port, b, c := threePeers(t, snap, 0)
	a, logs, took := restartA(t, port, snap, b, c)
	t.Logf("restarted a seen alive by b and c %v after its start", took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("rejoin took %v, want a few seconds at most", took)
	}
	if !logs.contains("rejoined through a member of the snapshot") {
		t.Error("a did not log a rejoin through its snapshot")
	}
	if n := counterValue(t, a.cfg.Registerer, "weft_mesh_snapshot_errors_total", ""); n != 0 {
		t.Errorf("%v snapshot errors on a clean file", n)
	}
}

// Without a snapshot (and without seeds), a restarted peer is found by the others, which
// keep retrying members that died.
func TestDeadMemberIsRetried(t *testing.T) {
	port, b, c := threePeers(t, "", 200*time.Millisecond)
	_, _, took := restartA(t, port, "", b, c)
	t.Logf("restarted a seen alive by b and c %v after its start", took.Round(time.Millisecond))
	if took > 3*time.Second {
		t.Errorf("rejoin took %v, want a few seconds at most", took)
	}
	reached := counterValue(t, b.cfg.Registerer, "weft_mesh_dead_retries_total", "reached") +
		counterValue(t, c.cfg.Registerer, "weft_mesh_dead_retries_total", "reached")
	if reached < 1 {
		t.Errorf("no retry of the dead member reached it (b and c count %v)", reached)
	}
}

// Members dead for longer than DeadRetryFor are left alone.
func TestDeadRetryStopsAfterDeadRetryFor(t *testing.T) {
	cfg, _ := testConfig(t, "m")
	cfg.DeadRetryFor = time.Minute
	m := startMesh(t, cfg)
	now := time.Now()
	m.mu.Lock()
	m.peers["recent"] = &Peer{Name: "recent", Addr: netip.MustParseAddrPort("127.0.0.1:1"), State: StateDead, Since: now.Add(-30 * time.Second)}
	m.peers["old"] = &Peer{Name: "old", Addr: netip.MustParseAddrPort("127.0.0.1:2"), State: StateLeft, Since: now.Add(-2 * time.Minute)}
	m.mu.Unlock()
	for range 50 {
		picks, pending := m.deadRetryPicks(now)
		if !pending {
			t.Fatal("a recently dead member, yet no candidate pending")
		}
		for _, p := range picks {
			if p.Name != "recent" {
				t.Fatalf("picked %s, dead for longer than DeadRetryFor", p.Name)
			}
		}
	}
	if picks, _ := m.deadRetryPicks(now); len(picks) != 1 {
		t.Fatalf("alone with one recently dead member: picked %d, want it every round", len(picks))
	}
	if _, pending := m.deadRetryPicks(now.Add(time.Minute)); pending {
		t.Fatal("members dead for longer than DeadRetryFor still pending: the retry loop would not sleep")
	}
}

// A corrupt snapshot is logged with its reason, counted and ignored: the peer joins through
// its seeds and later replaces the file with a good one.
func TestCorruptSnapshotIsIgnored(t *testing.T) {
	seed := startMesh(t, func() Config { c, _ := testConfig(t, "seed"); return c }())
	snap := filepath.Join(t.TempDir(), "members.json")
	if err := os.WriteFile(snap, []byte(`{"version":1,"members":[{"name":`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, logs := testConfig(t, "p")
	cfg.Seeds, cfg.SnapshotPath = []string{addr(seed)}, snap
	p := startMesh(t, cfg)
	allSee(t, 10*time.Second, []*Mesh{p}, StateAlive, "seed")
	waitFor(t, 5*time.Second, func() string {
		if !logs.contains("member snapshot ignored") || !logs.contains("bad member snapshot") {
			return "no log line names the bad snapshot"
		}
		if n := counterValue(t, cfg.Registerer, "weft_mesh_snapshot_errors_total", snapErrRead); n != 1 {
			return fmt.Sprintf("weft_mesh_snapshot_errors_total{reason=read} = %v, want 1", n)
		}
		return ""
	})
	waitFor(t, 3*snapshotInterval, func() string {
		members, _, err := readSnapshot(snap, "p", time.Now())
		if err != nil || len(members) != 1 || members[0].Name != "seed" {
			return fmt.Sprintf("snapshot not rewritten: %+v, %v", members, err)
		}
		return ""
	})
}

// A hostile snapshot (entries pointing at this peer, bogus addresses, thousands of
// entries) does not stop the peer: bad entries are skipped and counted, at most
// snapshotJoinBatch addresses are tried per round.
func TestHostileSnapshotIsBounded(t *testing.T) {
	snap := filepath.Join(t.TempDir(), "members.json")
	var b strings.Builder
	b.WriteString(`{"version":1,"members":[`)
	now := time.Now().UTC().Format(time.RFC3339)
	for i := range 2000 {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, `{"name":"h%d","addr":"127.0.0.1:%d","last_seen":%q}`, i, 1+i%3, now)
	}
	b.WriteString(`,{"name":"p","addr":"127.0.0.1:9","last_seen":"` + now + `"}]}`)
	if err := os.WriteFile(snap, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, logs := testConfig(t, "p")
	cfg.SnapshotPath = snap
	startMesh(t, cfg)
	waitFor(t, 5*time.Second, func() string {
		if !logs.contains("entries skipped") {
			return "no log line about skipped entries"
		}
		// 1744 beyond the 256 kept (counted once) and the one naming this peer.
		if n := counterValue(t, cfg.Registerer, "weft_mesh_snapshot_errors_total", snapErrEntry); n != 2 {
			return fmt.Sprintf("weft_mesh_snapshot_errors_total{reason=entry} = %v, want 2", n)
		}
		return ""
	})
}
