package main

// Traffic accounting: every byte a simulated peer sends is counted once, by
// kind, at the sender (what one peer sends, the others receive, so the
// per-peer mean of sent equals the per-peer mean of received). Bytes are
// UDP/TCP payload: IP, UDP and TCP headers are not included (add 28 bytes
// per UDP packet for the IPv4 wire size).
//
// Gossip is classified by memberlist message type, which is possible only
// without a gossip password (encrypted packets count as "encrypted"). A
// packet is unwrapped as memberlist wraps it: CRC header, then LZW
// compression, then a compound of several messages. The packet's wire
// bytes are shared among its messages in proportion to their uncompressed
// sizes, so the kinds add up to the wire total.

import (
	"bytes"
	"compress/lzw"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/memberlist"
)

// Kinds of traffic. Channel messages are "ch:" + the channel name ("ch:_"
// is the mesh's own channel: leave intents, suspicion notes).
const (
	kindSWIMProbe     = "swim.probe"   // ping, indirect ping, ack, nack (UDP)
	kindSWIMAlive     = "swim.alive"   // alive messages (UDP gossip): joins, refutations, metadata updates
	kindSWIMSuspect   = "swim.suspect" // suspect messages (UDP gossip)
	kindSWIMDead      = "swim.dead"    // dead messages (UDP gossip): failures and leaves
	kindPushPull      = "pushpull"     // full state exchange (TCP): periodic, join, mesh.Sync
	kindStreamOther   = "stream.other" // reliable user messages, anything else on TCP
	kindUserOther     = "user.other"   // user message without the mesh's envelope
	kindEncrypted     = "encrypted"
	kindOther         = "other"
	kindProbeUnderlay = "probe.underlay" // weft's UDP probes, requests and replies
	kindProbeLink     = "probe.link"
	channelKindPrefix = "ch:"
)

// memberlist message types (memberlist/net.go: "the numeric values are part
// of the protocol itself").
const (
	mlPing = iota
	mlIndirectPing
	mlAck
	mlSuspect
	mlAlive
	mlDead
	mlPushPull
	mlCompound
	mlUser
	mlCompress
	mlEncrypt
	mlNack
	mlHasCRC
	mlErr
)

// part is one message of a packet: its kind and uncompressed size.
type part struct {
	kind string
	size int
}

// maxUnwrapped bounds a decompressed packet: gossip packets are at most
// 1400 bytes before compression; anything far above is not memberlist's.
const maxUnwrapped = 64 << 10

// classifyPacket splits one memberlist UDP packet into its messages.
func classifyPacket(b []byte) []part {
	inner, err := unwrap(b, maxUnwrapped)
	if err != nil {
		if errors.Is(err, errEncrypted) {
			return []part{{kindEncrypted, len(b)}}
		}
		return []part{{kindOther, len(b)}}
	}
	if len(inner) == 0 {
		return []part{{kindOther, len(b)}}
	}
	if inner[0] != mlCompound {
		return []part{{classifyMessage(inner), len(inner)}}
	}
	// compound: type | count (1 byte) | count × length (uint16 BE) | messages
	body := inner[1:]
	if len(body) < 1 {
		return []part{{kindOther, len(inner)}}
	}
	n := int(body[0])
	body = body[1:]
	if len(body) < 2*n {
		return []part{{kindOther, len(inner)}}
	}
	var parts []part
	msgs := body[2*n:]
	for i := 0; i < n; i++ {
		l := int(binary.BigEndian.Uint16(body[2*i:]))
		if l > len(msgs) {
			break // truncated compound: memberlist drops the rest too
		}
		parts = append(parts, part{classifyMessage(msgs[:l]), l})
		msgs = msgs[l:]
	}
	if len(parts) == 0 {
		return []part{{kindOther, len(inner)}}
	}
	return parts
}

// classifyMessage names one unwrapped memberlist message.
func classifyMessage(m []byte) string {
	if len(m) == 0 {
		return kindOther
	}
	switch m[0] {
	case mlPing, mlIndirectPing, mlAck, mlNack:
		return kindSWIMProbe
	case mlAlive:
		return kindSWIMAlive
	case mlSuspect:
		return kindSWIMSuspect
	case mlDead:
		return kindSWIMDead
	case mlPushPull:
		return kindPushPull
	case mlUser:
		if name, ok := envelopeChannel(m[1:]); ok {
			return channelKindPrefix + name
		}
		return kindUserOther
	case mlEncrypt:
		return kindEncrypted
	}
	return kindOther
}

// envelopeChannel reads the channel name of a mesh envelope (see
// mesh/channels.go encodeEnvelope): version 1 | name length | name | id (8) | payload.
func envelopeChannel(b []byte) (string, bool) {
	if len(b) < 2+8 || b[0] != 1 {
		return "", false
	}
	n := int(b[1])
	if n == 0 || len(b) < 2+n+8 {
		return "", false
	}
	return string(b[2 : 2+n]), true
}

var errEncrypted = errors.New("encrypted")

// unwrap strips memberlist's CRC header and compression, reading at most
// limit decompressed bytes.
func unwrap(b []byte, limit int) ([]byte, error) {
	for range 4 { // crc, then compress: two layers at most; bounded anyway
		if len(b) == 0 {
			return b, nil
		}
		switch b[0] {
		case mlHasCRC:
			if len(b) < 5 {
				return nil, errors.New("short crc header")
			}
			b = b[5:]
		case mlCompress:
			var err error
			if b, err = decompress(b[1:], limit); err != nil {
				return nil, err
			}
		case mlEncrypt:
			return nil, errEncrypted
		default:
			return b, nil
		}
	}
	return nil, errors.New("too many layers")
}

// compressed is memberlist's compress struct (msgpack-encoded).
type compressed struct {
	Algo uint8
	Buf  []byte
}

func decompress(b []byte, limit int) ([]byte, error) {
	var c compressed
	if err := codec.NewDecoderBytes(b, &codec.MsgpackHandle{}).Decode(&c); err != nil {
		return nil, err
	}
	if c.Algo != 0 { // lzw, the only algorithm memberlist has
		return nil, errors.New("unknown compression")
	}
	r := lzw.NewReader(bytes.NewReader(c.Buf), lzw.LSB, 8)
	defer r.Close()
	out, err := io.ReadAll(io.LimitReader(r, int64(limit)))
	if err != nil && len(out) == 0 {
		return nil, err
	}
	return out, nil
}

// classifyStream names a TCP stream by the first buffer written on it
// (memberlist writes each stream message in one Write).
func classifyStream(first []byte) string {
	inner, err := unwrap(first, 1)
	switch {
	case errors.Is(err, errEncrypted):
		return kindEncrypted
	case err != nil || len(inner) == 0:
		return kindStreamOther
	case inner[0] == mlPing || inner[0] == mlPushPull:
		return classifyMessage(inner) // a TCP fallback ping is SWIM probing too
	}
	return kindStreamOther
}

// counter is one peer's sent traffic by kind. Safe for concurrent use.
type counter struct {
	mu    sync.Mutex // guards kinds
	kinds map[string]*kindCount
	// udpPackets counts datagrams (a compound packet is one).
	udpPackets atomic.Uint64
}

type kindCount struct {
	bytes float64
	msgs  uint64 // messages (a compound's parts each count), probe packets, streams
}

func newCounter() *counter { return &counter{kinds: map[string]*kindCount{}} }

func (c *counter) add(kind string, bytes float64, msgs uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := c.kinds[kind]
	if k == nil {
		k = &kindCount{}
		c.kinds[kind] = k
	}
	k.bytes += bytes
	k.msgs += msgs
}

// addPacket accounts one gossip datagram of wire size n.
func (c *counter) addPacket(b []byte) {
	c.udpPackets.Add(1)
	parts := classifyPacket(b)
	total := 0
	for _, p := range parts {
		total += p.size
	}
	for _, p := range parts {
		share := float64(len(b)) / float64(len(parts))
		if total > 0 {
			share = float64(len(b)) * float64(p.size) / float64(total)
		}
		c.add(p.kind, share, 1)
	}
}

// snapshot copies the counts.
func (c *counter) snapshot() map[string]kindCount {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]kindCount, len(c.kinds)+1)
	for k, v := range c.kinds {
		out[k] = *v
	}
	out[kindUDPPackets] = kindCount{msgs: c.udpPackets.Load()}
	return out
}

// kindUDPPackets is the snapshot key of the gossip datagram count.
const kindUDPPackets = "udp.packets"

// countingTransport wraps memberlist's transport and counts what it sends.
// It keeps memberlist's node-aware interface when the inner transport has it.
type countingTransport struct {
	memberlist.Transport
	c       *counter
	stream  chan net.Conn
	done    chan struct{} // Shutdown began: memberlist reads no more streams
	stopped chan struct{} // the inner transport has stopped
	once    sync.Once
}

func wrapTransport(c *counter) func(memberlist.Transport) memberlist.Transport {
	return func(t memberlist.Transport) memberlist.Transport {
		ct := &countingTransport{Transport: t, c: c, stream: make(chan net.Conn),
			done: make(chan struct{}), stopped: make(chan struct{})}
		go ct.forwardStreams()
		return ct
	}
}

// forwardStreams wraps incoming streams (the answering side of a push/pull
// writes its state too). After Shutdown began it closes what still comes in:
// the inner transport's listener blocks on its channel until it is read, and
// its Shutdown waits for that listener.
func (t *countingTransport) forwardStreams() {
	in := t.Transport.StreamCh()
	for {
		select {
		case conn := <-in:
			select {
			case t.stream <- &countingConn{Conn: conn, c: t.c}:
			case <-t.done:
				conn.Close()
			}
		case <-t.stopped:
			return
		}
	}
}

func (t *countingTransport) StreamCh() <-chan net.Conn { return t.stream }

// Shutdown stops the inner transport; safe to call twice.
func (t *countingTransport) Shutdown() error {
	first := false
	t.once.Do(func() { close(t.done); first = true })
	err := t.Transport.Shutdown()
	if first {
		close(t.stopped)
	}
	return err
}

func (t *countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	ts, err := t.Transport.WriteTo(b, addr)
	if err == nil {
		t.c.addPacket(b)
	}
	return ts, err
}

func (t *countingTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	conn, err := t.Transport.DialTimeout(addr, timeout)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: conn, c: t.c}, nil
}

func (t *countingTransport) WriteToAddress(b []byte, addr memberlist.Address) (time.Time, error) {
	nat, ok := t.Transport.(memberlist.NodeAwareTransport)
	if !ok {
		return t.WriteTo(b, addr.Addr)
	}
	ts, err := nat.WriteToAddress(b, addr)
	if err == nil {
		t.c.addPacket(b)
	}
	return ts, err
}

func (t *countingTransport) DialAddressTimeout(addr memberlist.Address, timeout time.Duration) (net.Conn, error) {
	nat, ok := t.Transport.(memberlist.NodeAwareTransport)
	if !ok {
		return t.DialTimeout(addr.Addr, timeout)
	}
	conn, err := nat.DialAddressTimeout(addr, timeout)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: conn, c: t.c}, nil
}

var _ memberlist.NodeAwareTransport = (*countingTransport)(nil)

// countingConn counts the bytes written on one stream under the kind of
// its first write.
type countingConn struct {
	net.Conn
	c    *counter
	mu   sync.Mutex // guards kind
	kind string
}

func (s *countingConn) Write(b []byte) (int, error) {
	n, err := s.Conn.Write(b)
	s.mu.Lock()
	first := s.kind == ""
	if first {
		s.kind = classifyStream(b)
	}
	kind := s.kind
	s.mu.Unlock()
	var streams uint64
	if first {
		streams = 1
	}
	s.c.add(kind, float64(n), streams)
	return n, err
}

// countingPacketConn counts a prober's datagrams (requests and replies).
type countingPacketConn struct {
	net.PacketConn
	c    *counter
	kind string
}

func (p *countingPacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	n, err := p.PacketConn.WriteTo(b, addr)
	if err == nil {
		p.c.add(p.kind, float64(n), 1)
	}
	return n, err
}
