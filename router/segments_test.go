package router

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
	"github.com/weftnet/weft/mesh/segments"
)

// fakeClock is advanced by the test.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

type segFixture struct {
	s      *segmentsPart
	clock  *fakeClock
	link   map[string]mesh.LinkStats
	bridge time.Duration
	sent   [][]byte
}

func newSegFixture(t *testing.T, reg prometheus.Registerer) *segFixture {
	t.Helper()
	f := &segFixture{clock: &fakeClock{t: time.Unix(1_000_000, 0)}, bridge: 50 * time.Microsecond,
		link: map[string]mesh.LinkStats{"b": {RTT: time.Millisecond, Samples: 10, Up: true}}}
	var err error
	f.s, err = newSegments(segmentsConfig{
		Self: "a",
		Attachments: func() []ipam.Attachment {
			return []ipam.Attachment{{ContainerID: "c1", Network: "default", Address: netip.MustParseAddr("10.40.0.2"), HostIfName: "vethc1"}}
		},
		Networks: func() []ipam.NetworkStatus { return nil },
		Underlay: func() map[string]mesh.LinkStats { return f.link },
		Link:     func() map[string]mesh.LinkStats { return f.link },
		Pinger: func(context.Context, netip.Addr) (time.Duration, error) {
			return f.bridge, nil
		},
		Broadcast: func(msg []byte) error { f.sent = append(f.sent, msg); return nil },
		Now:       f.clock.now,
	}, reg)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func remoteRecord(version uint64, rtt time.Duration) []byte {
	b, _ := json.Marshal(segmentRecord{Peer: "b", Version: version, Bridges: []bridgeFig{{Network: "default", RTTus: rtt.Microseconds(), Samples: 20}}})
	return b
}

func (f *segFixture) ticks(n int) {
	for range n {
		f.clock.t = f.clock.t.Add(segmentTick)
		f.s.tick(context.Background())
	}
}

func pathTo(t *testing.T, st SegmentsStatus, peer string) SegmentPath {
	t.Helper()
	for _, p := range st.Paths {
		if p.Peer == peer {
			return p
		}
	}
	t.Fatalf("no path to %s in %+v", peer, st.Paths)
	return SegmentPath{}
}

func figure(t *testing.T, p SegmentPath, seg string) SegmentFigure {
	t.Helper()
	for _, f := range p.Segments {
		if f.Segment == seg {
			return f
		}
	}
	t.Fatalf("no %s segment in %+v", seg, p.Segments)
	return SegmentFigure{}
}

// A delay on the underlay raises the link and the end-to-end figure; the path names the
// underlay as the segment that grew, the bridges stay as they were.
func TestSegmentsSayWhichGrew(t *testing.T) {
	f := newSegFixture(t, nil)
	f.s.NotifyMsg(remoteRecord(1, 80*time.Microsecond))
	f.ticks(60)
	p := pathTo(t, f.s.status(""), "b")
	e2e := figure(t, p, segments.EndToEnd)
	if !e2e.HasBaseline || e2e.Grew || p.Slow != "" || !e2e.Estimated {
		t.Fatalf("steady path: %+v slow %q", e2e, p.Slow)
	}
	if want := 1.13; e2e.RTTms < want-0.01 || e2e.RTTms > want+0.01 {
		t.Fatalf("end to end %.3fms, want the sum %.2fms", e2e.RTTms, want)
	}
	f.link = map[string]mesh.LinkStats{"b": {RTT: 31 * time.Millisecond, Samples: 10, Up: true}}
	f.ticks(3)
	p = pathTo(t, f.s.status("b"), "b")
	e2e = figure(t, p, segments.EndToEnd)
	if !e2e.Grew || e2e.RTTms-e2e.BaselineRTTms < 29 || p.Slow != segments.Underlay {
		t.Fatalf("after the delay: %+v, slow %q; want end to end +30ms and the underlay blamed", e2e, p.Slow)
	}
	if b := figure(t, p, segments.Bridge); b.Grew || b.RTTms > 1 {
		t.Fatalf("bridge segment %+v", b)
	}
	// A slow container side is blamed on the bridge.
	f.link = map[string]mesh.LinkStats{"b": {RTT: time.Millisecond, Samples: 10, Up: true}}
	f.ticks(120)
	f.bridge = 9 * time.Millisecond
	f.ticks(segmentWindow)
	if p := pathTo(t, f.s.status(""), "b"); p.Slow != segments.Bridge {
		t.Fatalf("slow local container side blamed on %q: %+v", p.Slow, p.Segments)
	}
}

func TestSegmentRecordsPublishedAndRefused(t *testing.T) {
	reg := prometheus.NewRegistry()
	f := newSegFixture(t, reg)
	f.ticks(1)
	if len(f.sent) != 1 {
		t.Fatalf("%d records sent on the first tick, want 1", len(f.sent))
	}
	var rec segmentRecord
	if err := json.Unmarshal(f.sent[0], &rec); err != nil || rec.Peer != "a" || len(rec.Bridges) != 1 || rec.Version == 0 {
		t.Fatalf("record %+v %v", rec, err)
	}
	// Once the window is full the record stops changing: it is re-sent every
	// segmentRepublish, not every tick.
	f.ticks(segmentWindow)
	f.sent = nil
	f.ticks(int(2 * segmentRepublish / segmentTick))
	if len(f.sent) != 2 {
		t.Fatalf("an unchanged record was sent %d times in %v, want 2", len(f.sent), 2*segmentRepublish)
	}

	before := f.s.LocalState(false)
	bad := [][]byte{
		[]byte("garbage"),
		remoteRecord(0, time.Millisecond),  // version 0
		remoteRecord(5, -time.Millisecond), // negative RTT
		func() []byte {
			r := segmentRecord{Peer: "b", Version: 3}
			for range maxSegmentNetworks + 1 {
				r.Bridges = append(r.Bridges, bridgeFig{Network: "n", Samples: 1})
			}
			b, _ := json.Marshal(r)
			return b
		}(),
		make([]byte, mesh.MaxBroadcastSize+1),
	}
	for _, m := range bad {
		f.s.NotifyMsg(m)
	}
	if got := testutil.ToFloat64(f.s.refused.WithLabelValues("invalid")) + testutil.ToFloat64(f.s.refused.WithLabelValues("malformed")) +
		testutil.ToFloat64(f.s.refused.WithLabelValues("oversize")); got != float64(len(bad)) {
		t.Fatalf("refused %v of %d bad records", got, len(bad))
	}
	if after := f.s.LocalState(false); string(after) != string(before) {
		t.Fatalf("bad records changed the state: %s → %s", before, after)
	}
	// Newer versions win, older ones change nothing; a record naming this peer is ignored.
	f.s.NotifyMsg(remoteRecord(10, 2*time.Millisecond))
	f.s.NotifyMsg(remoteRecord(9, 7*time.Millisecond))
	f.s.MergeRemoteState([]byte(`[{"p":"a","v":99999999999999999}]`), false)
	f.s.mu.Lock()
	got, own := f.s.records["b"].Bridges[0].RTTus, f.s.records["a"].Version
	f.s.mu.Unlock()
	if got != 2000 || own == 99999999999999999 {
		t.Fatalf("b's bridge %dµs (want the newer 2000), own version %d", got, own)
	}
	// A peer not heard from is forgotten.
	f.clock.t = f.clock.t.Add(segmentRecordTTLs*segmentRepublish + time.Second) // two records held: the 2 min floor
	var recs []segmentRecord
	json.Unmarshal(f.s.LocalState(false), &recs)
	for _, r := range recs {
		if r.Peer == "b" {
			t.Fatal("a stale record kept")
		}
	}
}

// TestSegmentRepublishEvery: an unchanged record waits max(30 s, N × 0.6 s), so the
// mesh-wide rate of such records is at most 1/0.6 s whatever N.
func TestSegmentRepublishEvery(t *testing.T) {
	for _, c := range []struct {
		n    int
		want time.Duration
	}{{0, 2 * time.Minute}, {5, 2 * time.Minute}, {50, 2 * time.Minute}, {100, 4 * time.Minute}, {1000, 40 * time.Minute}} {
		if got := segmentRepublishEvery(c.n); got != c.want {
			t.Errorf("segmentRepublishEvery(%d) = %v, want %v", c.n, got, c.want)
		}
	}
}

func TestSegmentsCrossCheck(t *testing.T) {
	f := newSegFixture(t, prometheus.NewRegistry())
	var tx uint64
	f.s.cfg.Tunnels = func() map[string]tunnelCount { return map[string]tunnelCount{"b": {TX: tx}} }
	theirs := func(v uint64, rx uint64) {
		b, _ := json.Marshal(segmentRecord{Peer: "b", Version: v, Tunnels: []tunnelCount{{Peer: "a", RX: rx}}})
		f.s.NotifyMsg(b)
	}
	tx = 10000
	theirs(1, 9900)
	f.ticks(1)
	// Our TX goes on after its record was read: the later readings must not count.
	tx = 20000
	f.ticks(int(DefaultLossCrossCheckWindow / 2 / segmentTick))
	if p := pathTo(t, f.s.status("b"), "b"); p.LossCrossCheck != nil {
		t.Fatalf("a ratio before a new record came: %v", *p.LossCrossCheck)
	}
	theirs(2, 18900) // 9000 of 10000 arrived
	f.ticks(1)
	p := pathTo(t, f.s.status("b"), "b")
	if p.LossCrossCheck == nil || *p.LossCrossCheck < 0.099 || *p.LossCrossCheck > 0.101 {
		t.Fatalf("cross-check %v, want 0.1", p.LossCrossCheck)
	}
	if v := testutil.ToFloat64(f.s.crossCheck.WithLabelValues("b")); v < 0.099 || v > 0.101 {
		t.Fatalf("metric %v", v)
	}
	// The window slides: once the loss is over, within DefaultLossCrossCheckWindow the ratio is clean.
	rx, v := uint64(18900), uint64(3)
	for range int(DefaultLossCrossCheckWindow/(10*time.Second)) + 2 {
		tx, rx, v = tx+10000, rx+10000, v+1
		theirs(v, rx)
		f.ticks(5)
	}
	if p := pathTo(t, f.s.status("b"), "b"); p.LossCrossCheck == nil || *p.LossCrossCheck > 0.001 {
		t.Fatalf("cross-check after the loss ended: %v", p.LossCrossCheck)
	}
}

func TestSegmentsMeasureRefusesBadInput(t *testing.T) {
	f := newSegFixture(t, nil)
	for _, req := range []MeasureRequest{
		{Address: netip.MustParseAddr("fd00::1")},
		{Address: netip.MustParseAddr("10.40.0.9"), Count: maxMeasureCount + 1},
		{Address: netip.MustParseAddr("10.40.0.9"), Count: -1},
		{Address: netip.MustParseAddr("10.40.0.9"), Network: "nosuch"},
		{},
	} {
		if _, err := f.s.measure(context.Background(), req); !errors.Is(err, ErrBadSegmentRequest) {
			t.Errorf("measure %+v: %v, want ErrBadSegmentRequest", req, err)
		}
	}
}

// echo talks real ICMP to the loopback address (needs root for the raw socket).
func TestEchoLoopback(t *testing.T) {
	conn, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		t.Skipf("no raw ICMP socket: %v", err)
	}
	defer conn.Close()
	rtt, err := echo(context.Background(), conn, netip.MustParseAddr("127.0.0.1"), 4242, 7, time.Second)
	if err != nil || rtt <= 0 || rtt > time.Second {
		t.Fatalf("echo: %v %v", rtt, err)
	}
	if icmpChecksum([]byte{8, 0, 0, 0, 0x10, 0x92, 0, 7}) == 0 {
		t.Fatal("checksum")
	}
}

func TestWireGuardCountsByPeer(t *testing.T) {
	kb, kc, stranger := [32]byte{1}, [32]byte{2}, [32]byte{3}
	peers := []mesh.Peer{{Name: "a", Self: true, Meta: mesh.Metadata{WireGuardKey: [32]byte{9}}},
		{Name: "b", Meta: mesh.Metadata{WireGuardKey: kb}}, {Name: "c", Meta: mesh.Metadata{WireGuardKey: kc}}, {Name: "nokey"}}
	got := wireGuardCounts([]wgtypes.Peer{
		{PublicKey: wgtypes.Key(kb), TransmitBytes: 10, ReceiveBytes: 20},
		{PublicKey: wgtypes.Key(stranger), TransmitBytes: 1},
		{PublicKey: wgtypes.Key(kc), TransmitBytes: -1},
	}, peers)
	if len(got) != 1 || got["b"] != (tunnelCount{TX: 10, RX: 20}) {
		t.Fatalf("counts %+v, want only b's", got)
	}
}

// The endpoints on a real peer: its container↔bridge segment measured by real ICMP from the
// host, an on-demand echo from inside the container to its gateway, the segments section
// of the status, and bad requests refused by name.
func TestSegmentsAPI(t *testing.T) {
	p := startPeer(t, t.TempDir())
	ctx := context.Background()
	ctr := newContainer(t)
	if _, err := p.client.Add(ctx, addReq("seg1", ctr)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var st SegmentsStatus
		if err := p.client.Get(ctx, "/v1/segments", &st); err != nil {
			t.Fatal(err)
		}
		if len(st.Bridges) == 1 && st.Bridges[0].Network == DefaultNetwork && st.Bridges[0].Samples > 0 &&
			st.Bridges[0].Loss == 0 && st.Bridges[0].RTTms < 50 && st.Self == "p1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no container↔bridge figure within 30s: %+v", st)
		}
		time.Sleep(200 * time.Millisecond) // polling with a deadline
	}
	var res MeasureResult
	if err := p.client.Post(ctx, "/v1/segments/measure", MeasureRequest{Address: netip.MustParseAddr("10.40.0.1"), Count: 3}, &res); err != nil {
		t.Fatal(err)
	}
	if res.Sent != 3 || res.Lost != 0 || len(res.Samples) != 3 || res.MaxMs > 100 || res.From == "" {
		t.Fatalf("measurement from the container to its gateway: %+v", res)
	}
	if st := p.status(); st.Segments == nil || len(st.Segments.Bridges) != 1 {
		t.Fatalf("status segments %+v", st.Segments)
	}
	for _, bad := range []struct {
		method, path string
		body         any
		code         uint
	}{
		{"GET", "/v1/segments?peer=nosuch", nil, 7},
		{"POST", "/v1/segments/measure", MeasureRequest{Address: netip.MustParseAddr("10.40.0.1"), Count: 99}, 7},
		{"POST", "/v1/segments/measure", MeasureRequest{Address: netip.MustParseAddr("10.40.0.1"), ContainerID: "nosuch"}, 7},
		{"POST", "/v1/segments/measure", map[string]any{"bogus": 1}, 6},
	} {
		var err error
		if bad.method == "GET" {
			err = p.client.Get(ctx, bad.path, &SegmentsStatus{})
		} else {
			err = p.client.Post(ctx, bad.path, bad.body, &MeasureResult{})
		}
		if code := codeOf(err); code != bad.code {
			t.Errorf("%s %s %+v: %v (code %d), want code %d", bad.method, bad.path, bad.body, err, code, bad.code)
		}
	}
}
