package mesh

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/serf/coordinate"
)

// TestCoordinatesConverge runs a real mesh on loopback: every peer ends up
// with a coordinate for every other, and its estimates are close to the
// RTTs memberlist measured (loopback: well under a few milliseconds).
func TestCoordinatesConverge(t *testing.T) {
	t.Parallel()
	meshes := startChain(t, 4, "coord", nil)
	allSee(t, converge, meshes, StateAlive, names(meshes)...)
	waitFor(t, 2*converge, func() string {
		for _, m := range meshes {
			for _, o := range meshes {
				if m == o {
					continue
				}
				if _, ok := m.EstimateRTT(o.cfg.Name); !ok {
					return fmt.Sprintf("%s has no coordinate for %s", m.cfg.Name, o.cfg.Name)
				}
			}
		}
		return ""
	})
	// Loose bound: loopback RTTs here are tens of microseconds to a few
	// milliseconds on a loaded machine; Vivaldi should land in that range,
	// not at 0 or at seconds. Polled, since a few updates may be needed.
	waitFor(t, 2*converge, func() string {
		for _, m := range meshes {
			if c := m.Coordinate(); !c.IsValid() || len(c.Vec) != 8 {
				return fmt.Sprintf("%s has coordinate %+v", m.cfg.Name, c)
			}
			for _, o := range meshes {
				if m == o {
					continue
				}
				est, _ := m.EstimateRTT(o.cfg.Name)
				m.coords.mu.RLock()
				measured := m.coords.peers[o.cfg.Name].rtt
				m.coords.mu.RUnlock()
				if est <= 0 || est > 20*time.Millisecond || est > 10*measured+5*time.Millisecond {
					return fmt.Sprintf("%s estimates %s at %v, last measured %v", m.cfg.Name, o.cfg.Name, est, measured)
				}
				// Any pair, seen from a third peer, and symmetric.
				for _, third := range meshes {
					ab, ok1 := third.EstimateRTTBetween(m.cfg.Name, o.cfg.Name)
					ba, ok2 := third.EstimateRTTBetween(o.cfg.Name, m.cfg.Name)
					if !ok1 || !ok2 || ab != ba || ab > 20*time.Millisecond {
						return fmt.Sprintf("%s estimates %s↔%s at %v/%v (%v %v)", third.cfg.Name, m.cfg.Name, o.cfg.Name, ab, ba, ok1, ok2)
					}
				}
			}
		}
		return ""
	})
	for _, o := range meshes[1:] {
		est, _ := meshes[0].EstimateRTT(o.cfg.Name)
		meshes[0].coords.mu.RLock()
		t.Logf("coord0→%s: estimate %v, last measured %v", o.cfg.Name, est, meshes[0].coords.peers[o.cfg.Name].rtt)
		meshes[0].coords.mu.RUnlock()
	}
	m := meshes[0]
	if d, ok := m.EstimateRTT("coord0"); !ok || d != 0 {
		t.Errorf("EstimateRTT(self) = %v, %v", d, ok)
	}
	if _, ok := m.EstimateRTT("nobody"); ok {
		t.Error("EstimateRTT of an unknown peer succeeded")
	}
	if _, ok := m.EstimateRTTBetween("coord1", "nobody"); ok {
		t.Error("EstimateRTTBetween with an unknown peer succeeded")
	}
	if got := metricValue(m.metrics.coordUpdates); got < 3 {
		t.Errorf("weft_mesh_coordinate_updates_total = %v", got)
	}

	// A peer that leaves is forgotten.
	if err := meshes[3].Leave(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	meshes[3].Close()
	allSee(t, converge, meshes[:3], StateLeft, "coord3")
	for _, m := range meshes[:3] {
		if _, ok := m.PeerCoordinate("coord3"); ok {
			t.Errorf("%s still holds the coordinate of a peer that left", m.cfg.Name)
		}
	}
}

// TestCoordinateRejected feeds bad acks to a mesh: each is counted under its
// reason and changes neither our coordinate nor the cache.
func TestCoordinateRejected(t *testing.T) {
	t.Parallel()
	cfg, logs := testConfig(t, "coord-guard")
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	// A known, alive peer.
	m.observe("other", netip.MustParseAddrPort("127.0.0.2:7946"), mustMeta(t, "other", "127.0.0.2"), StateAlive, EventJoin)
	// A member whose metadata has no key (the mesh refuses such alive
	// messages; observe is fed directly here).
	nokey, _ := (&Metadata{Name: "nokey", Underlay: netip.MustParseAddr("127.0.0.3")}).Encode()
	m.observe("nokey", netip.MustParseAddrPort("127.0.0.3:7946"), nokey, StateAlive, EventJoin)

	body := encodeCoordinate(coordinate.NewCoordinate(coordinate.DefaultConfig()))
	sign := func(peer, signer string, at time.Time) []byte {
		return signCoordinate(body, peer, at, testIdentity(signer).Sign)
	}
	good := sign("other", "other", time.Now())
	cases := []struct {
		name    string
		peer    string
		rtt     time.Duration
		payload []byte
		reason  string
	}{
		{"empty", "other", time.Millisecond, nil, coordRejectEmpty},
		{"garbage", "other", time.Millisecond, []byte("garbage"), coordRejectDecode},
		{"future version", "other", time.Millisecond, append([]byte{9}, good[1:]...), coordRejectDecode},
		{"truncated", "other", time.Millisecond, good[:len(good)-1], coordRejectDecode},
		{"dimensions", "other", time.Millisecond, withDims(good, 3), coordRejectDims},
		{"NaN", "other", time.Millisecond, withFloat(good, 0, math.NaN()), coordRejectValue},
		{"Inf", "other", time.Millisecond, withFloat(good, 7, math.Inf(-1)), coordRejectValue},
		{"huge vector", "other", time.Millisecond, withFloat(good, 3, 1e9), coordRejectValue},
		{"negative error", "other", time.Millisecond, withFloat(good, 8, -1), coordRejectValue},
		{"huge adjustment", "other", time.Millisecond, withFloat(good, 9, -50), coordRejectValue},
		{"negative height", "other", time.Millisecond, withFloat(good, 10, -1e-3), coordRejectValue},
		{"negative rtt", "other", -time.Millisecond, good, coordRejectRTT},
		{"huge rtt", "other", time.Hour, good, coordRejectRTT},
		{"unknown peer", "stranger", time.Millisecond, good, coordRejectPeer},
		{"self", "coord-guard", time.Millisecond, good, coordRejectPeer},
		{"unsigned", "other", time.Millisecond, body, coordRejectDecode},
		{"signed by another member", "other", time.Millisecond, sign("other", "mallory", time.Now()), coordRejectSig},
		{"signed for another name", "other", time.Millisecond, sign("mallory", "other", time.Now()), coordRejectSig},
		{"signature flipped", "other", time.Millisecond, func() []byte { b := sign("other", "other", time.Now()); b[len(b)-1] ^= 1; return b }(), coordRejectSig},
		{"coordinate changed after signing", "other", time.Millisecond, withFloat(good, 0, 1e-3), coordRejectSig},
		{"no key known", "nokey", time.Millisecond, sign("nokey", "nokey", time.Now()), coordRejectKey},
		{"replayed", "other", time.Millisecond, sign("other", "other", time.Now().Add(-10*time.Minute)), coordRejectStale},
		{"from the future", "other", time.Millisecond, sign("other", "other", time.Now().Add(time.Hour)), coordRejectStale},
		{"signed at max int64", "other", time.Millisecond, sign("other", "other", time.UnixMicro(math.MaxInt64)), coordRejectStale},
	}
	before := m.Coordinate()
	for _, tc := range cases {
		was := metricValue(m.metrics.coordRejected.WithLabelValues(tc.reason))
		m.onPingComplete(tc.peer, tc.rtt, tc.payload)
		if got := metricValue(m.metrics.coordRejected.WithLabelValues(tc.reason)); got != was+1 {
			t.Errorf("%s: weft_mesh_coordinate_rejected_total{reason=%s} went %v → %v", tc.name, tc.reason, was, got)
		}
	}
	if after := m.Coordinate(); !equalCoord(before, after) {
		t.Errorf("rejected acks moved our coordinate: %+v → %+v", before, after)
	}
	if _, ok := m.PeerCoordinate("other"); ok {
		t.Error("a rejected ack was cached")
	}
	if metricValue(m.metrics.coordUpdates) != 0 {
		t.Error("a rejected ack counted as an update")
	}
	if !logs.contains("coordinate rejected") || !logs.contains("reason=value") {
		t.Error("rejections are not logged with their reason")
	}

	// A valid one is taken; a peer that is pruned loses it.
	m.onPingComplete("other", 2*time.Millisecond, sign("other", "other", time.Now()))
	if _, ok := m.PeerCoordinate("other"); !ok {
		t.Fatal("a valid ack was not cached")
	}
	m.observe("other", netip.AddrPort{}, nil, StateDead, EventDead)
	if _, ok := m.PeerCoordinate("other"); !ok {
		t.Error("a dead peer's coordinate is dropped before retention")
	}
	m.prune(time.Now().Add(m.cfg.DeadPeerRetention + time.Second))
	if _, ok := m.PeerCoordinate("other"); ok {
		t.Error("a pruned peer's coordinate is kept")
	}
}

func TestCoordinateRoundTrip(t *testing.T) {
	cfg := coordinate.DefaultConfig()
	c := coordinate.NewCoordinate(cfg)
	for i := range c.Vec {
		c.Vec[i] = float64(i) * 1e-3
	}
	c.Error, c.Adjustment, c.Height = 0.7, -2e-4, 3e-5
	b := encodeCoordinate(c)
	if len(b) != 90 {
		t.Fatalf("payload of %d bytes, want 90", len(b))
	}
	got, err := decodeCoordinate(b, int(cfg.Dimensionality))
	if err != nil {
		t.Fatal(err)
	}
	if !equalCoord(c, got) {
		t.Fatalf("round trip: %+v → %+v", c, got)
	}
}

// FuzzCoordinatePayload: whatever arrives, decoding either fails with
// ErrBadCoordinate or yields a valid coordinate that re-encodes to the same
// bytes and can be fed to a client and measured against.
func FuzzCoordinatePayload(f *testing.F) {
	cfg := coordinate.DefaultConfig()
	good := encodeCoordinate(coordinate.NewCoordinate(cfg))
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte{1, 8})
	f.Add(withFloat(good, 0, math.NaN()))
	f.Add(withFloat(good, 10, 1e300))
	f.Add(withDims(good, 255))
	dims := int(cfg.Dimensionality)
	id := testIdentity("peer")
	f.Add(signCoordinate(good, "peer", time.Unix(1_700_000_000, 0), id.Sign))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Signed: only what the peer signed opens, whatever the bytes.
		if _, err := openCoordinate(b, dims, "peer", id.Public(), time.Unix(1_700_000_000, 0)); err != nil && !errors.Is(err, ErrBadCoordinate) {
			t.Fatalf("error %v does not wrap ErrBadCoordinate", err)
		}
		c, err := decodeCoordinate(b, dims)
		if err != nil {
			if !errors.Is(err, ErrBadCoordinate) {
				t.Fatalf("error %v does not wrap ErrBadCoordinate", err)
			}
			return
		}
		if !c.IsValid() || len(c.Vec) != dims {
			t.Fatalf("decoded an invalid coordinate %+v", c)
		}
		if string(encodeCoordinate(c)) != string(b) {
			t.Fatalf("re-encoding differs")
		}
		client, _ := coordinate.NewClient(cfg)
		if _, err := client.Update("x", c, time.Millisecond); err != nil {
			t.Fatalf("client refused a decoded coordinate: %v", err)
		}
		if d := client.DistanceTo(c); d < 0 || d > time.Minute {
			t.Fatalf("distance %v", d)
		}
	})
}

// BenchmarkCoordinateUpdate is the cost of one ack received: decode the
// peer's coordinate, update the client, cache it.
func BenchmarkCoordinateUpdate(b *testing.B) {
	c := newCoords()
	other := coordinate.NewCoordinate(coordinate.DefaultConfig())
	other.Vec[0] = 1e-3
	id := testIdentity("peer")
	payload := signCoordinate(encodeCoordinate(other), "peer", time.Now(), id.Sign)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		o, err := openCoordinate(payload, c.dims, "peer", id.Public(), time.Now())
		if err != nil {
			b.Fatal(err)
		}
		if err := c.update("peer", o, time.Millisecond+time.Duration(i%7)*time.Microsecond); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEstimateRTTBetween is one pair estimate from cached coordinates.
func BenchmarkEstimateRTTBetween(b *testing.B) {
	cfg := DefaultConfig()
	cfg.Name = "self"
	m := &Mesh{cfg: cfg, coords: newCoords()}
	for i, p := range []string{"a", "b"} {
		c := coordinate.NewCoordinate(coordinate.DefaultConfig())
		c.Vec[i] = 1e-3
		m.coords.peers[p] = peerCoord{c: c}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := m.EstimateRTTBetween("a", "b"); !ok {
			b.Fatal("no estimate")
		}
	}
}

func withDims(b []byte, dims byte) []byte {
	out := append([]byte(nil), b...)
	out[1] = dims
	return out
}

// withFloat replaces float i of the payload (0..7 vector, 8 error, 9
// adjustment, 10 height).
func withFloat(b []byte, i int, v float64) []byte {
	out := append([]byte(nil), b...)
	binary.BigEndian.PutUint64(out[coordHeaderSize+8*i:], math.Float64bits(v))
	return out
}

func equalCoord(a, b *coordinate.Coordinate) bool {
	if len(a.Vec) != len(b.Vec) || a.Error != b.Error || a.Adjustment != b.Adjustment || a.Height != b.Height {
		return false
	}
	for i := range a.Vec {
		if a.Vec[i] != b.Vec[i] {
			return false
		}
	}
	return true
}

// mustMeta encodes a peer's metadata, for feeding observe directly.
func mustMeta(t *testing.T, name, underlay string) []byte {
	t.Helper()
	md := Metadata{Name: name, Underlay: netip.MustParseAddr(underlay), PublicKey: testIdentity(name).Public()}
	b, err := md.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}
