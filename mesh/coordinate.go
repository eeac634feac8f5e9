package mesh

import (
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/hashicorp/serf/coordinate"

	"github.com/weftnet/weft/mesh/identity"
)

// Network coordinates.
//
// Every peer keeps a Vivaldi coordinate (hashicorp/serf/coordinate, what
// Serf and Consul use) so that the RTT between any two peers can be
// estimated from their coordinates instead of being probed. Coordinates
// ride on memberlist's own failure-detector pings: each ack carries the
// acking peer's coordinate (PingDelegate.AckPayload), and the prober feeds
// the measured RTT and that coordinate to its client
// (PingDelegate.NotifyPingComplete), as Serf's ping_delegate.go does. No
// extra packets: memberlist already probes one peer per probe interval.
//
// Costs, N = number of peers: O(dimensions) CPU per ack sent or received,
// O(1) memory per peer (one coordinate, plus the client's 3-sample latency
// filter), an estimate O(dimensions).

// ErrBadCoordinate: a coordinate payload did not decode, held a value that
// is not a valid coordinate, or came with an RTT out of range.
var ErrBadCoordinate = errors.New("mesh: bad coordinate")

// Wire format of an ack payload (big endian): the coordinate, version 1,
//
//	version (1) | dimensions (1) | vec (dims × float64) | error | adjustment | height (float64 each)
//
// then, so that only the peer itself can say where it is,
//
//	signed at (int64, µs since the epoch) | ed25519 signature (64)
//
// The signature, domain coordSignDomain, covers the acking peer's name, a
// zero byte and everything before the signature; receivers verify it
// against the peer's pinned key (Mesh.PublicKey) and refuse a timestamp
// more than coordMaxAge away from their clock, which bounds replays of an
// old coordinate. 162 bytes with 8 dimensions. Decoding is strict: exact
// length, known version, our dimensionality, finite values within
// coordMaxValue. Signing costs one ed25519 signature per ack sent (about
// 25 µs; one ack per probe interval and prober), verifying one per ack
// received: O(1) per probe, so O(1) per peer per second whatever N.
const (
	coordWireVersion = 1
	coordHeaderSize  = 2
	coordSignedTail  = 8 + ed25519.SignatureSize
	coordSignDomain  = "weft coordinate v1"
	coordMaxAge      = 5 * time.Minute
)

// Limits of an accepted coordinate. serf's client refuses RTTs above 10 s,
// so no component of a coordinate built from real RTTs gets near 10 s
// (coordinates are in seconds); its error is clamped at VivaldiErrorMax.
const (
	coordMaxRTT   = 10 * time.Second
	coordMaxValue = 10.0 // seconds
)

// Label values of weft_mesh_coordinate_rejected_total.
const (
	coordRejectEmpty  = "empty"       // the peer sent no coordinate
	coordRejectDecode = "decode"      // wrong length or unknown version
	coordRejectDims   = "dimensions"  // not our dimensionality
	coordRejectValue  = "value"       // NaN, Inf, negative error or height, out of range
	coordRejectRTT    = "rtt"         // negative or above coordMaxRTT
	coordRejectPeer   = "peer"        // not a peer that is up
	coordRejectUpdate = "update"      // the client refused it (should not happen after decoding)
	coordRejectKey    = "unknown_key" // no public key known for the peer
	coordRejectSig    = "signature"   // the signature does not verify with the peer's key
	coordRejectStale  = "stale"       // signed more than coordMaxAge away from our clock
)

// coordError is an ErrBadCoordinate with its metric reason.
type coordError struct {
	reason string
	msg    string
}

func (e *coordError) Error() string { return "mesh: bad coordinate: " + e.msg }
func (e *coordError) Unwrap() error { return ErrBadCoordinate }

func badCoord(reason, format string, args ...any) error {
	return &coordError{reason: reason, msg: fmt.Sprintf(format, args...)}
}

// coordRejectReason returns the metric label of a decode or update error.
func coordRejectReason(err error) string {
	var ce *coordError
	if errors.As(err, &ce) {
		return ce.reason
	}
	return coordRejectUpdate
}

// coordPayloadSize is the encoded size for dims dimensions.
func coordPayloadSize(dims int) int { return coordHeaderSize + 8*(dims+3) }

// encodeCoordinate encodes c in the ack payload format. O(dimensions).
func encodeCoordinate(c *coordinate.Coordinate) []byte {
	b := make([]byte, coordHeaderSize, coordPayloadSize(len(c.Vec)))
	b[0], b[1] = coordWireVersion, byte(len(c.Vec))
	for _, v := range c.Vec {
		b = binary.BigEndian.AppendUint64(b, math.Float64bits(v))
	}
	for _, v := range []float64{c.Error, c.Adjustment, c.Height} {
		b = binary.BigEndian.AppendUint64(b, math.Float64bits(v))
	}
	return b
}

// decodeCoordinate decodes and validates an ack payload for a client of
// dims dimensions. Errors wrap ErrBadCoordinate and carry a reason for the
// metric. O(dimensions).
func decodeCoordinate(b []byte, dims int) (*coordinate.Coordinate, error) {
	switch {
	case len(b) == 0:
		return nil, badCoord(coordRejectEmpty, "no payload")
	case len(b) < coordHeaderSize:
		return nil, badCoord(coordRejectDecode, "payload of %d bytes", len(b))
	case b[0] != coordWireVersion:
		return nil, badCoord(coordRejectDecode, "unknown version %d", b[0])
	case int(b[1]) != dims:
		return nil, badCoord(coordRejectDims, "%d dimensions, want %d", b[1], dims)
	case len(b) != coordPayloadSize(dims):
		return nil, badCoord(coordRejectDecode, "payload of %d bytes, want %d", len(b), coordPayloadSize(dims))
	}
	f := func(i int) float64 {
		off := coordHeaderSize + 8*i
		return math.Float64frombits(binary.BigEndian.Uint64(b[off : off+8]))
	}
	c := &coordinate.Coordinate{Vec: make([]float64, dims)}
	for i := range dims {
		v := f(i)
		if !finiteWithin(v, coordMaxValue) {
			return nil, badCoord(coordRejectValue, "vector component %d is %v", i, v)
		}
		c.Vec[i] = v
	}
	c.Error, c.Adjustment, c.Height = f(dims), f(dims+1), f(dims+2)
	switch {
	case !finiteWithin(c.Error, coordMaxValue) || c.Error < 0:
		return nil, badCoord(coordRejectValue, "error is %v", c.Error)
	case !finiteWithin(c.Adjustment, coordMaxValue):
		return nil, badCoord(coordRejectValue, "adjustment is %v", c.Adjustment)
	case !finiteWithin(c.Height, coordMaxValue) || c.Height < 0:
		return nil, badCoord(coordRejectValue, "height is %v", c.Height)
	}
	return c, nil
}

// signCoordinate appends the signing time and peer's signature to an
// encoded coordinate. O(dimensions).
func signCoordinate(body []byte, peer string, at time.Time, sign func(domain string, msg []byte) []byte) []byte {
	b := make([]byte, 0, len(body)+coordSignedTail)
	b = append(b, body...)
	b = binary.BigEndian.AppendUint64(b, uint64(at.UnixMicro()))
	return append(b, sign(coordSignDomain, coordSigned(peer, b))...)
}

// coordSigned is what the signature covers: the peer's name, a zero byte,
// the coordinate and its time.
func coordSigned(peer string, b []byte) []byte {
	msg := make([]byte, 0, len(peer)+1+len(b))
	msg = append(msg, peer...)
	msg = append(msg, 0)
	return append(msg, b...)
}

// openCoordinate checks a signed ack payload from peer (key: its public
// key, nil when unknown) and decodes its coordinate. The coordinate's
// values are checked before the signature (cheap first); nothing is
// returned unless both pass. O(dimensions) plus one ed25519 verification.
func openCoordinate(b []byte, dims int, peer string, key ed25519.PublicKey, now time.Time) (*coordinate.Coordinate, error) {
	if len(b) == 0 {
		return nil, badCoord(coordRejectEmpty, "no payload")
	}
	if len(b) < coordSignedTail {
		return nil, badCoord(coordRejectDecode, "payload of %d bytes, shorter than its signature", len(b))
	}
	body, tail := b[:len(b)-coordSignedTail], b[len(b)-coordSignedTail:]
	c, err := decodeCoordinate(body, dims)
	if err != nil {
		return nil, err
	}
	at := int64(binary.BigEndian.Uint64(tail))
	if d := now.UnixMicro() - at; at < 0 || d > coordMaxAge.Microseconds() || -d > coordMaxAge.Microseconds() {
		return nil, badCoord(coordRejectStale, "signed at %d µs, more than %v from our clock (%d)", at, coordMaxAge, now.UnixMicro())
	}
	if key == nil {
		return nil, badCoord(coordRejectKey, "no public key known for %q", peer)
	}
	if !identity.Verify(key, coordSignDomain, coordSigned(peer, b[:len(b)-ed25519.SignatureSize]), tail[8:]) {
		return nil, badCoord(coordRejectSig, "signature of %q does not verify", peer)
	}
	return c, nil
}

func finiteWithin(v, limit float64) bool {
	return !math.IsNaN(v) && !math.IsInf(v, 0) && math.Abs(v) <= limit
}

// coords holds this peer's Vivaldi client and the latest coordinate of
// every peer. Its lock is a leaf: nothing is called while holding it.
type coords struct {
	client *coordinate.Client
	dims   int

	mu    sync.RWMutex // guards following
	self  *coordinate.Coordinate
	peers map[string]peerCoord // O(1) per peer
}

// peerCoord is a peer's latest coordinate and the RTT last measured with it.
type peerCoord struct {
	c   *coordinate.Coordinate
	rtt time.Duration
}

func newCoords() *coords {
	cfg := coordinate.DefaultConfig()
	client, err := coordinate.NewClient(cfg)
	if err != nil {
		panic(fmt.Sprintf("mesh: serf's default coordinate config refused: %v", err)) // a constant config
	}
	return &coords{
		client: client,
		dims:   int(cfg.Dimensionality),
		self:   client.GetCoordinate(),
		peers:  make(map[string]peerCoord),
	}
}

// payload is our coordinate, encoded for an ack (unsigned). O(dimensions).
func (c *coords) payload() []byte {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return encodeCoordinate(c.self)
}

// ackPayload is our coordinate, encoded and signed for an ack.
// O(dimensions) plus one signature.
func (m *Mesh) ackPayload() []byte {
	return signCoordinate(m.coords.payload(), m.cfg.Name, time.Now(), m.cfg.Identity.Sign)
}

// update feeds one measured RTT to a peer and its coordinate to the
// client. O(dimensions): the client's latency filter (3 samples) and
// adjustment window (20) have constant sizes.
func (c *coords) update(peer string, other *coordinate.Coordinate, rtt time.Duration) error {
	if rtt < 0 || rtt > coordMaxRTT {
		return badCoord(coordRejectRTT, "rtt %v out of range [0, %v]", rtt, coordMaxRTT)
	}
	self, err := c.client.Update(peer, other, rtt)
	if err != nil {
		return badCoord(coordRejectUpdate, "%v", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.self = self
	c.peers[peer] = peerCoord{c: other, rtt: rtt}
	return nil
}

// forget drops a peer's coordinate and latency samples.
func (c *coords) forget(peer string) {
	c.client.ForgetNode(peer)
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.peers, peer)
}

func (c *coords) get(peer string) (*coordinate.Coordinate, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	p, ok := c.peers[peer]
	return p.c, ok
}

// Coordinate returns this peer's current network coordinate (a copy).
func (m *Mesh) Coordinate() *coordinate.Coordinate {
	m.coords.mu.RLock()
	defer m.coords.mu.RUnlock()
	return m.coords.self.Clone()
}

// PeerCoordinate returns the latest coordinate a peer sent us (a copy).
func (m *Mesh) PeerCoordinate(peer string) (*coordinate.Coordinate, bool) {
	if peer == m.cfg.Name {
		return m.Coordinate(), true
	}
	c, ok := m.coords.get(peer)
	if !ok {
		return nil, false
	}
	return c.Clone(), true
}

// EstimateRTT estimates the round-trip time from this peer to peer from
// their coordinates; false when we hold no coordinate for peer yet (it has
// not answered one of memberlist's probes since it joined). Zero for
// ourselves. O(dimensions).
func (m *Mesh) EstimateRTT(peer string) (time.Duration, bool) {
	return m.EstimateRTTBetween(m.cfg.Name, peer)
}

// EstimateRTTBetween estimates the round-trip time between any two peers
// we hold coordinates for (this peer included); false when one is
// missing. Use measured figures where they exist: this is an estimate.
// O(dimensions).
func (m *Mesh) EstimateRTTBetween(a, b string) (time.Duration, bool) {
	if a == b {
		return 0, true
	}
	c := m.coords
	c.mu.RLock()
	defer c.mu.RUnlock()
	ca, ok := c.lookupLocked(m.cfg.Name, a)
	if !ok {
		return 0, false
	}
	cb, ok := c.lookupLocked(m.cfg.Name, b)
	if !ok {
		return 0, false
	}
	return ca.DistanceTo(cb), true
}

func (c *coords) lookupLocked(self, peer string) (*coordinate.Coordinate, bool) {
	if peer == self {
		return c.self, true
	}
	p, ok := c.peers[peer]
	return p.c, ok
}

// onPingComplete handles one acknowledged direct probe of peer: the ack's
// payload is the peer's coordinate. Bad input is counted, logged at debug
// and changes nothing. Called from memberlist's probe goroutine, not under
// its node lock.
func (m *Mesh) onPingComplete(peer string, rtt time.Duration, payload []byte) {
	err := m.updateCoordinate(peer, rtt, payload)
	if err != nil {
		reason := coordRejectReason(err)
		m.metrics.coordRejected.WithLabelValues(reason).Inc()
		m.log.Debug("mesh: coordinate rejected", "peer", peer, "reason", reason, "rtt", rtt, "err", err)
		return
	}
	m.metrics.coordUpdates.Inc()
}

func (m *Mesh) updateCoordinate(peer string, rtt time.Duration, payload []byte) error {
	if peer == m.cfg.Name {
		return badCoord(coordRejectPeer, "an ack from ourselves")
	}
	m.mu.Lock()
	p, ok := m.peers[peer]
	up := ok && p.Up() && !m.shut
	var key []byte
	if up {
		key = p.Meta.PublicKey
	}
	m.mu.Unlock()
	if !up {
		return badCoord(coordRejectPeer, "peer %q is not an up member", peer)
	}
	// Verified outside mu: a signature check takes tens of µs.
	other, err := openCoordinate(payload, m.coords.dims, peer, key, time.Now())
	if err != nil {
		return err
	}
	// Only peers that are up get a cache entry, so that forget (on left
	// and on prune, under mu) bounds the cache by the membership. Order:
	// mu → coords.mu, as everywhere. The RTT is checked in update.
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.peers[peer]; !ok || !p.Up() || m.shut {
		return badCoord(coordRejectPeer, "peer %q is not an up member", peer)
	}
	return m.coords.update(peer, other, rtt)
}
