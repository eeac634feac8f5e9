package mesh

// Link state: every peer publishes its measured neighbour list (a
// "link-state advertisement", LSA, as in OSPF) and keeps everyone else's.
// An LSA carries the origin's complete neighbour list under a version; the
// highest version per origin wins. A peer republishes only when a metric
// moved beyond a threshold (LinkTableConfig), so the gossip carries changes,
// not periodic full state; push/pull (Encode / MergeState) repairs what
// the best-effort broadcasts missed.
//
// Versions are microseconds of wall-clock time, raised to last+1 when the
// clock has not moved, so that a restarted peer (which forgot its counter)
// still publishes above its previous versions. Should another peer hold a
// newer LSA of ours (the clock stepped back), Merge notes its version and
// the next Publish goes above it.
//
// Wire format. Every message starts with
//
//	format version (1 byte, 1) | kind (1 byte: 1 = one LSA, 2 = full state)
//
// kind 1 is followed by one LSA; kind 2 by a uvarint count and that many
// LSAs. An LSA is
//
//	origin name length (1 byte) | origin name
//	version (uvarint)
//	link count (uvarint, at most 255)
//	links, sorted by neighbour name, each:
//	  length of the prefix shared with the previous neighbour name (1 byte)
//	  length of the suffix shared with it (1 byte)
//	  length of the rest (1 byte) | the rest   (front and back coding)
//	  flags (1 byte: bit 0 = up)
//	  RTT in µs (uvarint) | jitter in µs (uvarint) | loss in 1/10000 (uvarint, ≤ 10000)
//
// A link costs 6–11 bytes plus the part of its name not shared with the
// previous one: 50 neighbours named like "weft-peer-017" or
// "node17.dc1.example" take about 700 bytes, 50 random 8-byte names about
// 920, within one gossip broadcast (1005 bytes of payload).

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sync"
	"time"
)

// ErrBadLinkState: a link-state message could not be decoded.
var ErrBadLinkState = errors.New("mesh: bad link-state message")

// LinkStateChannelName is the gossip channel link state travels on.
const LinkStateChannelName = "linkstate"

const (
	linkStateVersion = 1
	linkStateLSA     = 1
	linkStateFull    = 2
	maxLSALinks      = 255
	maxLSAOrigins    = 4096
	maxLinkDuration  = time.Hour
	lossUnits        = 10000 // loss is carried in 1/10000 (0.01%)
	flagUp           = 1
	flagEncrypted    = 2
)

// LinkMetrics are one directed link's published figures, as measured by the
// link's origin.
type LinkMetrics struct {
	RTT    time.Duration
	Jitter time.Duration
	Loss   float64 // fraction, 0..1
	Up     bool
	// Encrypted: the link runs over WireGuard, so it may carry traffic that must stay
	// encrypted (see Graph.Encrypted).
	Encrypted bool
}

// quantize rounds m to what the wire carries, so the origin and the others
// hold identical values.
func (m LinkMetrics) quantize() LinkMetrics {
	m.RTT = m.RTT.Round(time.Microsecond)
	m.Jitter = m.Jitter.Round(time.Microsecond)
	m.Loss = math.Round(min(max(m.Loss, 0), 1)*lossUnits) / lossUnits
	return m
}

// Graph is the directed link graph: Graph[from][to] is the link from→to as
// measured by from.
type Graph map[string]map[string]LinkMetrics

// Link returns the link from→to.
func (g Graph) Link(from, to string) (LinkMetrics, bool) {
	m, ok := g[from][to]
	return m, ok
}

// Symmetric returns the graph with each link taken as the worse of its two
// directions where both ends have published it: up only when both say up,
// the larger RTT, jitter and loss. Path choice runs on it so that both ends
// of a pair see the same costs and choose mirror paths — WireGuard accepts a
// peer's packets only from the peer its blocks are routed to, so a pair
// relayed one way and direct the other would drop its replies.
func (g Graph) Symmetric() Graph {
	out := make(Graph, len(g))
	for from, links := range g {
		out[from] = make(map[string]LinkMetrics, len(links))
		for to, m := range links {
			if back, ok := g[to][from]; ok {
				m = LinkMetrics{RTT: max(m.RTT, back.RTT), Jitter: max(m.Jitter, back.Jitter),
					Loss: max(m.Loss, back.Loss), Up: m.Up && back.Up, Encrypted: m.Encrypted && back.Encrypted}
			}
			out[from][to] = m
		}
	}
	return out
}

// Encrypted returns the graph of the encrypted links only: the paths a pair
// that must be encrypted may take, every hop of a relay included.
func (g Graph) Encrypted() Graph {
	out := make(Graph, len(g))
	for from, links := range g {
		out[from] = map[string]LinkMetrics{}
		for to, m := range links {
			if m.Encrypted {
				out[from][to] = m
			}
		}
	}
	return out
}

// LinkTableConfig sets when Publish considers a link changed. Zero fields
// take the defaults.
type LinkTableConfig struct {
	// RTTChange and RTTMinChange: an RTT (or jitter) change counts when it
	// is at least RTTChange of the published value and at least
	// RTTMinChange. Defaults 0.10 and 200µs.
	RTTChange    float64
	RTTMinChange time.Duration
	// LossChange: a loss change counts from this many (fraction) points.
	// Default 0.01 (one percentage point).
	LossChange float64
	// MaxDelta bounds Publish's delta; a larger LSA is kept locally and
	// spreads by push/pull only. Default: MaxBroadcastSize less the channel
	// envelope.
	MaxDelta int
	// Now gives the wall clock for versions. Default time.Now.
	Now func() time.Time
	// Logger; default discard.
	Logger *slog.Logger
}

// LinkTable holds every peer's published neighbour list.
//
// Concurrency: safe for concurrent use; mu guards everything.
type LinkTable struct {
	cfg LinkTableConfig

	mu        sync.Mutex // guards following
	origins   map[string]*lsa
	self      string // origin of the last Publish
	selfFloor uint64 // a version of ours seen from others; publish above it
	republish bool   // force the next Publish to emit
}

// lsa is one origin's advertisement; deleted marks a tombstone (Remove).
type lsa struct {
	origin  string
	version uint64
	links   map[string]LinkMetrics
	deleted bool
}

// NewLinkTable returns an empty table.
func NewLinkTable(cfg LinkTableConfig) *LinkTable {
	if cfg.RTTChange == 0 {
		cfg.RTTChange = 0.10
	}
	if cfg.RTTMinChange == 0 {
		cfg.RTTMinChange = 200 * time.Microsecond
	}
	if cfg.LossChange == 0 {
		cfg.LossChange = 0.01
	}
	if cfg.MaxDelta == 0 {
		cfg.MaxDelta = MaxBroadcastSize - envelopeOverhead - len(LinkStateChannelName)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &LinkTable{cfg: cfg, origins: map[string]*lsa{}}
}

// Publish records self's current neighbour figures. stats is keyed by
// neighbour peer name (when several paths to one peer are probed, the
// caller passes the one in use); keys that are not valid peer names, and
// self, are ignored with a warning. When a link appeared or disappeared,
// flipped up/down, or moved beyond the thresholds since the last
// publication, Publish bumps self's version and returns the encoded LSA to
// broadcast (changed true); otherwise nothing (changed false). delta is nil
// with changed true when the LSA is larger than MaxDelta: the table has it
// and push/pull carries it.
func (t *LinkTable) Publish(self string, stats map[string]LinkStats) (delta []byte, changed bool) {
	links := make(map[string]LinkMetrics, len(stats))
	for name, s := range stats {
		links[name] = LinkMetrics{RTT: s.RTT, Jitter: s.Jitter, Loss: s.Loss, Up: s.Up}
	}
	return t.PublishLinks(self, links)
}

// PublishLinks is Publish with the links' metrics given whole (with Encrypted).
func (t *LinkTable) PublishLinks(self string, metrics map[string]LinkMetrics) (delta []byte, changed bool) {
	if err := validName(self); err != nil {
		t.cfg.Logger.Warn("linkstate: publish with invalid self name", "self", self, "err", err)
		return nil, false
	}
	links := make(map[string]LinkMetrics, len(metrics))
	for name, m := range metrics {
		if err := validName(name); err != nil || name == self {
			t.cfg.Logger.Warn("linkstate: not publishing link with invalid neighbour name", "name", name)
			continue
		}
		links[name] = m.quantize()
	}
	if len(links) > maxLSALinks {
		names := slices.Sorted(maps.Keys(links))
		for _, n := range names[maxLSALinks:] {
			delete(links, n)
		}
		t.cfg.Logger.Warn("linkstate: too many neighbours, publishing the first", "n", len(names), "max", maxLSALinks)
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	if t.self != self {
		t.self, t.republish = self, true
	}
	cur := t.origins[self]
	if cur != nil && !cur.deleted && !t.republish && !t.moved(cur.links, links) {
		return nil, false
	}
	v := uint64(t.cfg.Now().UnixMicro())
	if cur != nil {
		v = max(v, cur.version+1)
	}
	v = max(v, t.selfFloor+1)
	l := &lsa{origin: self, version: v, links: links}
	t.origins[self] = l
	t.republish = false
	b := appendLSA([]byte{linkStateVersion, linkStateLSA}, l)
	if len(b) > t.cfg.MaxDelta {
		t.cfg.Logger.Warn("linkstate: advertisement too large to broadcast; it spreads by push/pull only",
			"bytes", len(b), "max", t.cfg.MaxDelta, "links", len(links))
		return nil, true
	}
	return b, true
}

// moved reports whether next differs from the published prev beyond the
// thresholds.
func (t *LinkTable) moved(prev, next map[string]LinkMetrics) bool {
	if len(prev) != len(next) {
		return true
	}
	for name, n := range next {
		p, ok := prev[name]
		if !ok || p.Up != n.Up || p.Encrypted != n.Encrypted ||
			t.durMoved(p.RTT, n.RTT) || t.durMoved(p.Jitter, n.Jitter) ||
			math.Abs(p.Loss-n.Loss) >= t.cfg.LossChange-1e-9 {
			return true
		}
	}
	return false
}

func (t *LinkTable) durMoved(prev, next time.Duration) bool {
	d := next - prev
	if d < 0 {
		d = -d
	}
	return d >= t.cfg.RTTMinChange && float64(d) >= t.cfg.RTTChange*float64(prev)
}

// Merge applies one LSA received by gossip. It returns whether the graph
// changed. A malformed message is rejected whole with an error wrapping
// ErrBadLinkState, and changes nothing.
func (t *LinkTable) Merge(delta []byte) (changed bool, err error) {
	ls, err := decodeLinkState(delta, linkStateLSA)
	if err != nil {
		return false, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applyLocked(ls[0]), nil
}

// MergeState applies a full state from Encode (push/pull). All or nothing:
// a malformed state changes nothing.
func (t *LinkTable) MergeState(state []byte) (changed bool, err error) {
	ls, err := decodeLinkState(state, linkStateFull)
	if err != nil {
		return false, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, l := range ls {
		if t.applyLocked(l) {
			changed = true
		}
	}
	return changed, nil
}

// applyLocked merges one LSA: the higher version wins.
func (t *LinkTable) applyLocked(l *lsa) bool {
	if t.self != "" && l.origin == t.self {
		// Others cannot speak for us; but if they hold a version of ours
		// at or above the current one, publish above it.
		if cur := t.origins[t.self]; cur == nil || l.version >= cur.version {
			t.selfFloor = max(t.selfFloor, l.version)
			t.republish = true
		}
		return false
	}
	cur := t.origins[l.origin]
	if cur != nil && l.version <= cur.version {
		return false
	}
	t.origins[l.origin] = l
	return cur == nil || cur.deleted || !maps.Equal(cur.links, l.links)
}

// Remove forgets an origin (a peer that left or was removed). It keeps a
// tombstone with the version, so the same or older LSAs gossiped by others
// are not taken back; a newer one (the peer came back) is.
func (t *LinkTable) Remove(origin string) (changed bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := t.origins[origin]
	if cur == nil || cur.deleted {
		return false
	}
	t.origins[origin] = &lsa{origin: origin, version: cur.version, deleted: true}
	return true
}

// Encode returns the full state (every origin's LSA) for push/pull.
func (t *LinkTable) Encode() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	names := slices.Sorted(maps.Keys(t.origins))
	live := names[:0]
	for _, n := range names {
		if !t.origins[n].deleted {
			live = append(live, n)
		}
	}
	b := []byte{linkStateVersion, linkStateFull}
	b = binary.AppendUvarint(b, uint64(len(live)))
	for _, n := range live {
		b = appendLSA(b, t.origins[n])
	}
	return b
}

// Graph returns a copy of the current graph.
func (t *LinkTable) Graph() Graph {
	t.mu.Lock()
	defer t.mu.Unlock()
	g := make(Graph, len(t.origins))
	for n, l := range t.origins {
		if !l.deleted {
			g[n] = maps.Clone(l.links)
		}
	}
	return g
}

// Version returns the version of an origin's LSA (0 when unknown).
func (t *LinkTable) Version(origin string) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if l := t.origins[origin]; l != nil {
		return l.version
	}
	return 0
}

func appendLSA(b []byte, l *lsa) []byte {
	b = append(b, byte(len(l.origin)))
	b = append(b, l.origin...)
	b = binary.AppendUvarint(b, l.version)
	names := slices.Sorted(maps.Keys(l.links))
	b = binary.AppendUvarint(b, uint64(len(names)))
	prev := ""
	for _, n := range names {
		limit := min(len(prev), len(n))
		pre := 0
		for pre < limit && prev[pre] == n[pre] {
			pre++
		}
		suf := 0
		for pre+suf < limit && prev[len(prev)-1-suf] == n[len(n)-1-suf] {
			suf++
		}
		m := l.links[n]
		b = append(b, byte(pre), byte(suf), byte(len(n)-pre-suf))
		b = append(b, n[pre:len(n)-suf]...)
		var flags byte
		if m.Up {
			flags |= flagUp
		}
		if m.Encrypted {
			flags |= flagEncrypted
		}
		b = append(b, flags)
		b = binary.AppendUvarint(b, uint64(m.RTT/time.Microsecond))
		b = binary.AppendUvarint(b, uint64(m.Jitter/time.Microsecond))
		b = binary.AppendUvarint(b, uint64(math.Round(m.Loss*lossUnits)))
		prev = n
	}
	return b
}

// decodeLinkState parses a message of the given kind.
func decodeLinkState(b []byte, kind byte) ([]*lsa, error) {
	d := lsDecoder{b: b}
	if len(b) < 2 {
		return nil, d.fail("%d bytes, too short", len(b))
	}
	if b[0] != linkStateVersion {
		return nil, d.fail("format version %d, this peer understands %d", b[0], linkStateVersion)
	}
	if b[1] != kind {
		return nil, d.fail("kind %d, want %d", b[1], kind)
	}
	d.off = 2
	n := uint64(1)
	if kind == linkStateFull {
		n = d.uvarint("origin count")
		if d.err == nil && n > maxLSAOrigins {
			return nil, d.fail("%d origins, at most %d", n, maxLSAOrigins)
		}
	}
	var out []*lsa
	seen := map[string]bool{}
	for i := uint64(0); i < n && d.err == nil; i++ {
		l := d.readLSA()
		if d.err != nil {
			break
		}
		if seen[l.origin] {
			return nil, d.fail("origin %q repeated", l.origin)
		}
		seen[l.origin] = true
		out = append(out, l)
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.off != len(b) {
		return nil, d.fail("%d trailing bytes", len(b)-d.off)
	}
	return out, nil
}

// lsDecoder reads a link-state message; the first error sticks.
type lsDecoder struct {
	b   []byte
	off int
	err error
}

func (d *lsDecoder) fail(format string, a ...any) error {
	if d.err == nil {
		d.err = fmt.Errorf("%w: at offset %d: %s", ErrBadLinkState, d.off, fmt.Sprintf(format, a...))
	}
	return d.err
}

func (d *lsDecoder) u8(what string) byte {
	if d.err != nil {
		return 0
	}
	if d.off >= len(d.b) {
		d.fail("%s: truncated", what)
		return 0
	}
	c := d.b[d.off]
	d.off++
	return c
}

func (d *lsDecoder) str(n int, what string) string {
	if d.err != nil {
		return ""
	}
	if len(d.b)-d.off < n {
		d.fail("%s of %d bytes overruns the %d bytes left", what, n, len(d.b)-d.off)
		return ""
	}
	s := string(d.b[d.off : d.off+n])
	d.off += n
	return s
}

func (d *lsDecoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, k := binary.Uvarint(d.b[d.off:])
	if k <= 0 {
		d.fail("%s: bad varint", what)
		return 0
	}
	d.off += k
	return v
}

func (d *lsDecoder) duration(what string) time.Duration {
	v := d.uvarint(what)
	if d.err == nil && v > uint64(maxLinkDuration/time.Microsecond) {
		d.fail("%s %dµs out of range", what, v)
	}
	return time.Duration(v) * time.Microsecond
}

func (d *lsDecoder) readLSA() *lsa {
	l := &lsa{}
	l.origin = d.str(int(d.u8("origin length")), "origin name")
	if d.err != nil {
		return nil
	}
	if err := validName(l.origin); err != nil {
		d.fail("origin name %q: %v", l.origin, err)
		return nil
	}
	l.version = d.uvarint("version")
	if d.err == nil && l.version == 0 {
		d.fail("origin %q: version 0", l.origin)
	}
	n := d.uvarint("link count")
	if d.err == nil && n > maxLSALinks {
		d.fail("origin %q: %d links, at most %d", l.origin, n, maxLSALinks)
	}
	if d.err != nil {
		return nil
	}
	l.links = make(map[string]LinkMetrics, n)
	prev := ""
	for range n {
		pre := int(d.u8("shared prefix"))
		suf := int(d.u8("shared suffix"))
		if d.err == nil && pre+suf > len(prev) {
			d.fail("origin %q: shared prefix %d and suffix %d longer than the previous name %q", l.origin, pre, suf, prev)
		}
		mid := d.str(int(d.u8("name length")), "neighbour name")
		if d.err != nil {
			return nil
		}
		name := prev[:pre] + mid + prev[len(prev)-suf:]
		if err := validName(name); err != nil {
			d.fail("origin %q: neighbour name %q: %v", l.origin, name, err)
			return nil
		}
		if name <= prev {
			d.fail("origin %q: neighbour %q not after %q (unsorted or repeated)", l.origin, name, prev)
			return nil
		}
		if name == l.origin {
			d.fail("origin %q: link to itself", l.origin)
			return nil
		}
		flags := d.u8("flags")
		if d.err == nil && flags&^(flagUp|flagEncrypted) != 0 {
			d.fail("origin %q: neighbour %q: unknown flags %#x", l.origin, name, flags)
		}
		m := LinkMetrics{Up: flags&flagUp != 0, Encrypted: flags&flagEncrypted != 0}
		m.RTT = d.duration("rtt")
		m.Jitter = d.duration("jitter")
		loss := d.uvarint("loss")
		if d.err == nil && loss > lossUnits {
			d.fail("origin %q: neighbour %q: loss %d/%d above 1", l.origin, name, loss, lossUnits)
		}
		if d.err != nil {
			return nil
		}
		m.Loss = float64(loss) / lossUnits
		l.links[name] = m
		prev = name
	}
	return l
}

// LinkStateChannel adapts a LinkTable to the mesh's ChannelHandler:
//
//	ch := &mesh.LinkStateChannel{Table: t, OnChange: kick}
//	m.RegisterChannel(mesh.LinkStateChannelName, ch)
//	if delta, ok := t.Publish(self, prober.All()); ok && delta != nil {
//		m.Broadcast(mesh.LinkStateChannelName, delta)
//	}
//
// The mesh relays broadcasts itself; the channel only merges.
type LinkStateChannel struct {
	Table *LinkTable
	// OnChange, if set, is called after a merge changed the graph. It runs
	// on memberlist's goroutines and must not block (signal a channel).
	OnChange func()
	// Logger receives rejected messages; nil discards.
	Logger *slog.Logger
}

var _ ChannelHandler = (*LinkStateChannel)(nil)

// NotifyMsg merges one gossiped LSA.
func (c *LinkStateChannel) NotifyMsg(msg []byte) {
	c.done(c.Table.Merge(msg))
}

// LocalState returns the full table for push/pull.
func (c *LinkStateChannel) LocalState(join bool) []byte { return c.Table.Encode() }

// MergeRemoteState merges another peer's full table.
func (c *LinkStateChannel) MergeRemoteState(buf []byte, join bool) {
	c.done(c.Table.MergeState(buf))
}

func (c *LinkStateChannel) done(changed bool, err error) {
	if err != nil {
		if c.Logger != nil {
			c.Logger.Warn("linkstate: dropped malformed message", "err", err)
		}
		return
	}
	if changed && c.OnChange != nil {
		c.OnChange()
	}
}
