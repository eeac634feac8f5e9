package mesh

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"

	"github.com/hashicorp/memberlist"
)

// ChannelHandler receives one named channel's gossip. Subsystems (link
// state, DNS records …) each register one with Mesh.RegisterChannel; their
// traffic shares memberlist's single delegate through a small envelope.
//
// Concurrency contract (inherited from memberlist's Delegate): every method
// may be called concurrently from memberlist's goroutines, and must be safe
// for that.
type ChannelHandler interface {
	// NotifyMsg is called with a message another peer broadcast on this
	// channel. It runs on memberlist's packet receive loop: it must not
	// block (hand work to your own goroutine). msg is the handler's to
	// keep. The message comes from an authenticated peer when a password
	// is set, but its content is untrusted input: validate it.
	NotifyMsg(msg []byte)
	// LocalState returns this channel's full state for a TCP push/pull
	// with another peer (join is true when that is a join). Return nil to
	// send nothing. The states of all channels of one push/pull together
	// must stay below a few megabytes.
	LocalState(join bool) []byte
	// MergeRemoteState merges the other peer's LocalState of this channel.
	// It is called only when the other peer sent state for this channel.
	// buf is the handler's to keep; untrusted input as for NotifyMsg.
	MergeRemoteState(buf []byte, join bool)
}

// MaxBroadcastSize bounds one broadcast (payload plus the channel name plus
// 10 bytes of framing), so that it fits one gossip packet (memberlist's 1400-byte UDP
// buffer less encryption, label and compound-message overhead). Larger
// state belongs in LocalState, which travels over TCP.
const MaxBroadcastSize = 1024

const (
	envelopeVersion   = 1
	maxChannelNameLen = 32
	maxStateEntries   = 64
)

// RegisterChannel adds a named channel. Names are 1–32 bytes of
// [a-z0-9._-], not starting with "_" (reserved for the mesh itself). Register before Start so that the first push/pull of a join
// already carries the channel's state; registering later works too.
func (m *Mesh) RegisterChannel(name string, h ChannelHandler) error {
	if err := validToken(name, maxChannelNameLen); err != nil {
		return fmt.Errorf("mesh: channel name: %w", err)
	}
	if strings.HasPrefix(name, internalChannel) {
		return fmt.Errorf("mesh: channel name %q: names starting with %q are reserved", name, internalChannel)
	}
	if h == nil {
		return fmt.Errorf("mesh: channel %q: nil handler", name)
	}
	m.chMu.Lock()
	defer m.chMu.Unlock()
	if _, ok := m.channels[name]; ok {
		return fmt.Errorf("%w: %q", ErrChannelExists, name)
	}
	m.channels[name] = h
	return nil
}

// Broadcast queues msg for gossip to every other peer on the named channel.
// Each peer sends it to random peers a number of times that grows with
// log(N), piggybacked on memberlist's gossip, and every peer that gets it
// passes it on the same way (memberlist alone would not relay it), so it
// spreads like memberlist's own messages: in O(log N) gossip rounds, each
// peer's handler called once. Still best effort over UDP: a subsystem
// that must converge also keeps LocalState/MergeRemoteState. The local
// peer's handler is not called. msg is copied.
func (m *Mesh) Broadcast(name string, msg []byte) error {
	m.chMu.RLock()
	_, ok := m.channels[name]
	m.chMu.RUnlock()
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownChannel, name)
	}
	if envelopeOverhead+len(name)+len(msg) > MaxBroadcastSize {
		return fmt.Errorf("%w: %d bytes on channel %q, at most %d including the channel name and %d bytes of framing",
			ErrMessageTooLarge, len(msg), name, MaxBroadcastSize, envelopeOverhead)
	}
	m.queueChannelBroadcast(name, broadcast(m.newMessage(name, msg)))
	m.metrics.broadcasts.WithLabelValues(name).Inc()
	return nil
}

// broadcast is a memberlist.Broadcast that never invalidates another:
// channel messages are independent; a channel wanting last-writer-wins
// semantics puts versions in its payload.
type broadcast []byte

func (b broadcast) Invalidates(memberlist.Broadcast) bool { return false }
func (b broadcast) Message() []byte                       { return b }
func (b broadcast) Finished()                             {}

// UniqueBroadcast tells memberlist what Invalidates says: this message
// replaces no other. Without it, memberlist asks every queued message
// whether the new one invalidates it: O(Q) per message queued, sent or
// relayed, O(Q²) for a burst. At N=100 in a suspicion storm that scan was
// 27 % of a peer's CPU. With it, queueing is O(log Q).
func (b broadcast) UniqueBroadcast() {}

// encodeEnvelope frames one channel message:
//
//	version (1 byte) | name length (1 byte) | name | message id (8 bytes, big endian) | payload
//
// The id is random; peers use it to pass each message on once and to
// deliver it once.
func encodeEnvelope(name string, id uint64, payload []byte) []byte {
	b := make([]byte, 0, envelopeOverhead+len(name)+len(payload))
	b = append(b, envelopeVersion, byte(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint64(b, id)
	return append(b, payload...)
}

// envelopeOverhead is an envelope's size besides name and payload.
const envelopeOverhead = 2 + 8

// decodeEnvelope parses a channel message. The payload aliases b.
func decodeEnvelope(b []byte) (name string, id uint64, payload []byte, err error) {
	if len(b) < envelopeOverhead {
		return "", 0, nil, fmt.Errorf("%w: %d bytes, too short", ErrBadEnvelope, len(b))
	}
	if b[0] != envelopeVersion {
		return "", 0, nil, fmt.Errorf("%w: version %d, this peer understands %d", ErrBadEnvelope, b[0], envelopeVersion)
	}
	n := int(b[1])
	if len(b)-envelopeOverhead < n {
		return "", 0, nil, fmt.Errorf("%w: channel name of %d bytes overruns the %d bytes left", ErrBadEnvelope, n, len(b)-2)
	}
	name = string(b[2 : 2+n])
	if err := validToken(name, maxChannelNameLen); err != nil {
		return "", 0, nil, fmt.Errorf("%w: channel name: %v", ErrBadEnvelope, err)
	}
	id = binary.BigEndian.Uint64(b[2+n:])
	return name, id, b[2+n+8:], nil
}

// seen remembers the ids of the last dedupSize messages, to pass each on
// and deliver it only once. A message that comes back after its id was
// forgotten is delivered again; handlers must tolerate that (it needs
// thousands of messages within the few gossip rounds one circulates).
type seen struct {
	mu   sync.Mutex // guards following
	ids  map[uint64]struct{}
	ring []uint64
	next int
}

const dedupSize = 8192

// first records id and reports whether it was new.
func (s *seen) first(id uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.ids[id]; ok {
		return false
	}
	if s.ids == nil {
		s.ids = make(map[uint64]struct{}, dedupSize)
		s.ring = make([]uint64, 0, dedupSize)
	}
	if len(s.ring) < dedupSize {
		s.ring = append(s.ring, id)
	} else {
		delete(s.ids, s.ring[s.next])
		s.ring[s.next] = id
		s.next = (s.next + 1) % dedupSize
	}
	s.ids[id] = struct{}{}
	return true
}

// queueBroadcast queues an envelope for gossip, bounding the queue.
func (m *Mesh) queueBroadcast(b memberlist.Broadcast) {
	m.queue.QueueBroadcast(b)
	if n := m.queue.NumQueued(); n > m.cfg.MaxQueuedBroadcasts {
		m.queue.Prune(m.cfg.MaxQueuedBroadcasts)
		m.metrics.broadcastsDropped.Add(float64(n - m.queue.NumQueued()))
	}
}

// queueChannelBroadcast queues a channel's envelope: link state on its own
// queue, sent fewer times (Config.LinkStateRetransmitMult), the rest on the
// main queue.
func (m *Mesh) queueChannelBroadcast(name string, b memberlist.Broadcast) {
	if name != LinkStateChannelName {
		m.queueBroadcast(b)
		return
	}
	m.lsQueue.QueueBroadcast(b)
	if n := m.lsQueue.NumQueued(); n > m.cfg.MaxQueuedBroadcasts {
		m.lsQueue.Prune(m.cfg.MaxQueuedBroadcasts)
		m.metrics.broadcastsDropped.Add(float64(n - m.lsQueue.NumQueued()))
	}
}

// LinkStateQueued is how many link-state broadcasts wait in this peer's
// queue to be sent (again); 0 once every one has had its retransmissions.
// The simulation reads it to open its idle window after the join's
// link-state backlog, not inside it.
func (m *Mesh) LinkStateQueued() int { return m.lsQueue.NumQueued() }

// getBroadcasts fills one gossip packet (memberlist's
// Delegate.GetBroadcasts): the main queue first (membership, block table,
// DNS: small and rare), then link state in the bytes left.
func (m *Mesh) getBroadcasts(overhead, limit int) [][]byte {
	out := m.queue.GetBroadcasts(overhead, limit)
	for _, b := range out {
		limit -= overhead + len(b)
	}
	if limit <= overhead {
		return out
	}
	return append(out, m.lsQueue.GetBroadcasts(overhead, limit)...)
}

// newMessage frames a new message of this peer.
func (m *Mesh) newMessage(name string, payload []byte) []byte {
	id := rand.Uint64()
	m.seen.first(id)
	return encodeEnvelope(name, id, payload)
}

// stateEntry is one channel's part of a push/pull state.
type stateEntry struct {
	name    string
	payload []byte
}

// encodeState frames the channels' states of one push/pull:
//
//	version (1 byte) | entries: name length (1 byte) | name | payload length (uvarint) | payload
func encodeState(entries []stateEntry) []byte {
	size := 1
	for _, e := range entries {
		size += 1 + len(e.name) + binary.MaxVarintLen64 + len(e.payload)
	}
	b := make([]byte, 0, size)
	b = append(b, envelopeVersion)
	for _, e := range entries {
		b = append(b, byte(len(e.name)))
		b = append(b, e.name...)
		b = binary.AppendUvarint(b, uint64(len(e.payload)))
		b = append(b, e.payload...)
	}
	return b
}

// decodeState parses encodeState's output; payloads alias b (capped so that
// appending to one cannot overwrite the next).
func decodeState(b []byte) ([]stateEntry, error) {
	bad := func(format string, a ...any) ([]stateEntry, error) {
		return nil, fmt.Errorf("%w: state: %s", ErrBadEnvelope, fmt.Sprintf(format, a...))
	}
	if len(b) == 0 {
		return bad("empty")
	}
	if b[0] != envelopeVersion {
		return bad("version %d, this peer understands %d", b[0], envelopeVersion)
	}
	var entries []stateEntry
	for off := 1; off < len(b); {
		if len(entries) == maxStateEntries {
			return bad("more than %d channels", maxStateEntries)
		}
		n := int(b[off])
		off++
		if len(b)-off < n {
			return bad("channel name of %d bytes at offset %d overruns the %d bytes left", n, off-1, len(b)-off)
		}
		name := string(b[off : off+n])
		off += n
		if err := validToken(name, maxChannelNameLen); err != nil {
			return bad("channel name: %v", err)
		}
		if slices.ContainsFunc(entries, func(e stateEntry) bool { return e.name == name }) {
			return bad("channel %q repeated", name)
		}
		l, k := binary.Uvarint(b[off:])
		if k <= 0 {
			return bad("channel %q: bad payload length", name)
		}
		off += k
		if l > uint64(len(b)-off) {
			return bad("channel %q: payload of %d bytes overruns the %d bytes left", name, l, len(b)-off)
		}
		end := off + int(l)
		entries = append(entries, stateEntry{name: name, payload: b[off:end:end]})
		off = end
	}
	return entries, nil
}

// handler returns the registered handler of a channel, or nil.
func (m *Mesh) handler(name string) ChannelHandler {
	m.chMu.RLock()
	defer m.chMu.RUnlock()
	return m.channels[name]
}

// ErrUnknownPeer: SendTo names a peer this mesh does not know.
var ErrUnknownPeer = errors.New("mesh: unknown peer")

// unicastMarker starts a SendTo frame, where a broadcast envelope starts
// with its version:
//
//	marker (1 byte, 0x55) | name length (1 byte) | name | payload
//
// A peer that predates SendTo rejects it as a malformed envelope.
const unicastMarker = 0x55

// SendTo sends msg to one peer's handler of the named channel, reliably
// (memberlist's SendReliable: a TCP stream, encrypted like the rest). The
// receiving mesh delivers it once and does not pass it on. msg is at most
// MaxUnicastSize bytes: split larger state into several messages. It
// blocks for the connection; call it off memberlist's goroutines. O(N) to
// find the peer.
func (m *Mesh) SendTo(peer, channel string, msg []byte) error {
	if err := validToken(channel, maxChannelNameLen); err != nil {
		return fmt.Errorf("mesh: channel name: %w", err)
	}
	if len(msg) > MaxUnicastSize {
		return fmt.Errorf("%w: %d bytes to %s on channel %q, at most %d", ErrMessageTooLarge, len(msg), peer, channel, MaxUnicastSize)
	}
	ml := m.ml.Load()
	if ml == nil {
		return ErrNotStarted
	}
	for _, n := range ml.Members() {
		if n.Name != peer {
			continue
		}
		b := make([]byte, 0, 2+len(channel)+len(msg))
		b = append(b, unicastMarker, byte(len(channel)))
		b = append(b, channel...)
		b = append(b, msg...)
		if err := ml.SendReliable(n, b); err != nil {
			return fmt.Errorf("mesh: send to %s on channel %q: %w", peer, channel, err)
		}
		return nil
	}
	return fmt.Errorf("%w: %q", ErrUnknownPeer, peer)
}

// notifyUnicast delivers one SendTo frame to its handler: once, not passed on.
func (m *Mesh) notifyUnicast(b []byte) {
	if len(b) < 2 || len(b)-2 < int(b[1]) {
		m.metrics.messagesRejected.WithLabelValues("malformed").Inc()
		m.log.Warn("mesh: dropped malformed unicast message", "len", len(b))
		return
	}
	name := string(b[2 : 2+int(b[1])])
	if err := validToken(name, maxChannelNameLen); err != nil || strings.HasPrefix(name, internalChannel) {
		m.metrics.messagesRejected.WithLabelValues("malformed").Inc()
		m.log.Warn("mesh: dropped unicast message with a bad channel name", "channel", name)
		return
	}
	h := m.handler(name)
	if h == nil {
		m.metrics.messagesRejected.WithLabelValues("unknown_channel").Inc()
		return
	}
	m.metrics.messagesReceived.WithLabelValues(name).Inc()
	h.NotifyMsg(slices.Clone(b[2+int(b[1]):]))
}

// notifyMsg dispatches one received channel message (memberlist's
// Delegate.NotifyMsg). b is reused by memberlist after we return, so the
// payload is copied before the handler gets it.
func (m *Mesh) notifyMsg(b []byte) {
	if len(b) > 0 && b[0] == unicastMarker {
		m.notifyUnicast(b)
		return
	}
	name, id, payload, err := decodeEnvelope(b)
	if err != nil {
		m.metrics.messagesRejected.WithLabelValues("malformed").Inc()
		m.log.Warn("mesh: dropped malformed gossip message", "err", err, "len", len(b))
		return
	}
	if !m.seen.first(id) {
		m.metrics.messagesRejected.WithLabelValues("duplicate").Inc()
		return
	}
	if name == internalChannel {
		if err := m.handleInternal(payload); err != nil {
			m.metrics.messagesRejected.WithLabelValues("malformed").Inc()
			m.log.Warn("mesh: dropped malformed internal message", "err", err)
			return
		}
		m.queueBroadcast(broadcast(slices.Clone(b)))
		return
	}
	// Pass it on, whether or not this peer has the channel.
	m.queueChannelBroadcast(name, broadcast(slices.Clone(b)))
	h := m.handler(name)
	if h == nil {
		// A peer runs a subsystem this one does not (e.g. during an
		// upgrade): not an error.
		m.metrics.messagesRejected.WithLabelValues("unknown_channel").Inc()
		m.log.Debug("mesh: message for unregistered channel", "channel", name)
		return
	}
	m.metrics.messagesReceived.WithLabelValues(name).Inc()
	h.NotifyMsg(slices.Clone(payload))
}

// localState collects every channel's LocalState (Delegate.LocalState).
func (m *Mesh) localState(join bool) []byte {
	m.chMu.RLock()
	names := make([]string, 0, len(m.channels))
	handlers := make(map[string]ChannelHandler, len(m.channels))
	for n, h := range m.channels {
		names = append(names, n)
		handlers[n] = h
	}
	m.chMu.RUnlock()
	if len(names) == 0 {
		return nil
	}
	slices.Sort(names)
	entries := make([]stateEntry, 0, len(names))
	for _, n := range names {
		if p := handlers[n].LocalState(join); len(p) > 0 {
			entries = append(entries, stateEntry{name: n, payload: p})
		}
	}
	if len(entries) == 0 {
		return nil
	}
	return encodeState(entries)
}

// mergeRemoteState hands each channel its part of a remote peer's state
// (Delegate.MergeRemoteState). A malformed state is dropped whole.
func (m *Mesh) mergeRemoteState(b []byte, join bool) {
	if len(b) == 0 {
		return
	}
	entries, err := decodeState(b)
	if err != nil {
		m.metrics.messagesRejected.WithLabelValues("malformed_state").Inc()
		m.log.Warn("mesh: dropped malformed push/pull state", "err", err, "len", len(b))
		return
	}
	for _, e := range entries {
		h := m.handler(e.name)
		if h == nil {
			m.log.Debug("mesh: dropped state for unregistered channel", "channel", e.name)
			continue
		}
		h.MergeRemoteState(e.payload, join)
	}
}
