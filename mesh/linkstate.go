package mesh

// Link state: every peer publishes its measured links and keeps everyone
// else's, one versioned entry per directed link (origin → neighbour), so
// that gossip carries only what changed and no table is ever cut.
//
// Versions. Each entry carries the version its origin gave it: the
// origin's monotonic counter, microseconds of wall-clock time raised to
// last+1 when the clock has not moved, so that a restarted peer (which
// forgot its counter) still publishes above its previous versions. A
// receiver takes an entry only when it is newer than the one it holds. A
// removed link becomes a tombstone with a version, kept for TombstoneTTL
// (far longer than a push/pull round) so that older copies of the link
// still circulating are not taken back. Versions more than MaxSkew ahead of
// the receiver's clock are rejected; should another peer hold a newer entry
// of ours (our clock stepped back), the next Publish re-publishes every
// link of ours above it.
//
// Spreading. Publish emits only the changed entries, split into messages
// that fit one gossip broadcast. Anti-entropy runs by digest: a push/pull
// carries only origin → (highest version, hash of the live entries'
// versions), about 18 bytes plus the name per origin; each side then
// sends the other, by a reliable unicast (Mesh.SendTo), the entries the
// other lacks — those above the other's
// highest version, or all of an origin whose hash differs at equal
// versions (a missed broadcast in between). Memberlist's push/pull runs
// both ways, so no request round is needed; a join is a push/pull with the
// peer joined through, so the joiner gets its table from that peer alone.
//
// Signatures. Every entry is signed by its origin, so a member can change
// only its own links; the unit of signing is a publication: one origin's
// group of entries as Publish emits it (up to one broadcast's worth),
// signed once with the origin's identity (mesh/identity, domain
// linkStateSignDomain). Peers keep each publication's bytes with its entries
// and forward it unchanged, signature included, in anti-entropy answers,
// so every receiver verifies against the origin's key whoever relayed it.
// A receiver verifies only a publication that would change something it
// holds: the copies that gossip relays bring again, and the echo of our own
// entries, cost a map lookup, not a signature check. A publication from an
// origin whose key is not known (not a member yet, or no longer) is
// refused (reason unknown_origin, the rest of the message is taken) and
// comes again with the next push/pull; one whose signature does not verify
// (a forged entry) refuses the whole message (bad_signature). Costs: one
// ed25519 signature per publication (per peer: ≤ one per
// max(MinInterval, N × MovedSpacing) for moved figures, so the mesh-wide
// rate of those is bounded whatever N; ≤ one per max(BatchInterval, N × MovedSpacing)
// for added and removed links, plus one per reconcile in which a link went down or came back up), one
// verification per publication received new, 64 bytes per publication on
// the wire; anti-entropy answers may carry entries
// a later publication superseded, and a peer holds each publication that
// still has a current entry, so memory is O(N × D × publication size) at
// worst (a publication is at most one broadcast).
//
// Bounds, not silent caps: a message giving an origin more than
// MaxLinksPerOrigin live links, or the table more than MaxOrigins origins,
// is rejected whole, counted and logged; so are malformed messages and
// versions from the future (more than MaxSkew ahead of our clock: no
// version arithmetic can reach the top of uint64, and our own increments
// saturate). Origins whose key the lookup no longer knows (members pruned
// after the mesh's DeadPeerRetention) are pruned from the table (Prune,
// run by LinkStateChannel at most once a minute), so the origin count
// follows the membership.
//
// Costs (N peers, D links per peer): Publish O(D), plus O(N) to count the
// origins once moved figures are past MinInterval; Merge O(entries in the
// message); a digest O(N) bytes per push/pull;
// answering one O(N + entries sent); memory O(N × D).
//
// Wire format. Every message starts with
//
//	format version (1 byte, 3) | kind (1 byte: 1 = entries, 2 = digest)
//
// entries: publication count (uvarint), then per publication (one origin
// may have several in a message)
//
//	origin name length (1 byte) | origin name | entry count (uvarint)
//	entries, sorted by neighbour name, each:
//	  length of the prefix shared with the previous neighbour name (1 byte)
//	  length of the suffix shared with it (1 byte)
//	  length of the rest (1 byte) | the rest   (front and back coding)
//	  flags (1 byte: bit 0 = up, bit 1 = encrypted, bit 2 = removed)
//	  version (uvarint)
//	  unless removed: RTT in µs (uvarint) | jitter in µs (uvarint) | loss in 1/10000 (uvarint, ≤ 10000)
//	signature (64 bytes): the origin's, of everything above from its name length on
//
// digest: sender name length (1 byte) | sender name | origin count
// (uvarint), then per origin: name length (1 byte) | name | flags (1 byte:
// bit 0 = removed) | highest version (uvarint) | hash (8 bytes, big endian).
//
// An entry costs 14–19 bytes plus the part of its name not shared with the
// previous one, a publication 64 bytes more: about 55 entries named like
// "weft-peer-017" fit one broadcast.

import (
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh/identity"
)

// ErrBadLinkState: a link-state message could not be decoded, or broke a
// bound (too many links or origins, a version from the future).
var ErrBadLinkState = errors.New("mesh: bad link-state message")

// LinkStateChannelName is the gossip channel link state travels on.
const LinkStateChannelName = "linkstate"

// linkStateSignDomain is the identity domain of link-state publications.
const linkStateSignDomain = "weft linkstate v1"

const (
	linkStateVersion = 3
	linkStateEntries = 1
	linkStateDigest  = 2
	maxLinkDuration  = time.Hour
	lossUnits        = 10000 // loss is carried in 1/10000 (0.01%)
	flagUp           = 1
	flagEncrypted    = 2
	flagRemoved      = 4
	digestRemoved    = 1
	// MaxUnicastSize bounds one SendTo message; anti-entropy answers are
	// split to fit.
	MaxUnicastSize = 64 << 10
)

// LinkMetrics are one directed link's published figures, as measured by the
// link's origin.
type LinkMetrics struct {
	RTT    time.Duration
	Jitter time.Duration
	Loss   float64 // fraction, 0..1
	Up     bool
	// Encrypted: the link runs over WireGuard, so it may carry traffic that
	// must stay encrypted.
	Encrypted bool
}

// quantize rounds m to what the wire carries, so the origin and the others
// hold identical values.
func (m LinkMetrics) quantize() LinkMetrics {
	m.RTT = min(max(m.RTT, 0), maxLinkDuration).Round(time.Microsecond)
	m.Jitter = min(max(m.Jitter, 0), maxLinkDuration).Round(time.Microsecond)
	loss := m.Loss
	if math.IsNaN(loss) {
		loss = 1
	}
	m.Loss = math.Round(min(max(loss, 0), 1)*lossUnits) / lossUnits
	return m
}

// FailingLinks names the links down or with a loss in their window: those whose underlay
// the router probes at the full rate, to tell a broken tunnel from a broken network. O(k).
func FailingLinks(links map[string]LinkMetrics) []string {
	var out []string
	for name, lm := range links {
		if !lm.Up || lm.Loss > 0 {
			out = append(out, name)
		}
	}
	return out
}

// LinkChange is one link that changed in the table: set to Link, or
// Removed.
type LinkChange struct {
	From, To string
	Link     LinkMetrics
	Removed  bool
}

// Graph is a snapshot of the directed link graph: Graph[from][to] is the
// link from→to as measured by from.
type Graph map[string]map[string]LinkMetrics

// Link returns the link from→to.
func (g Graph) Link(from, to string) (LinkMetrics, bool) {
	m, ok := g[from][to]
	return m, ok
}

// LinkTableConfig sets when Publish considers a link changed, and the
// table's bounds. Zero fields take the defaults.
type LinkTableConfig struct {
	// Signer signs this peer's publications (its identity, or the Mesh).
	// Required.
	Signer Signer
	// RTTChange and RTTMinChange: an RTT (or jitter) change counts when it
	// is at least RTTChange of the published value and at least
	// RTTMinChange. Defaults 0.10 and 200µs.
	RTTChange    float64
	RTTMinChange time.Duration
	// LossChange: a loss change counts from this many (fraction) points.
	// Default 0.01 (one percentage point).
	LossChange float64
	// MinInterval: links whose figures moved (RTT, jitter, loss) but that
	// did not go up or down are republished, together, at most this often.
	// Every
	// peer's publications reach every other peer, so the mesh-wide rate,
	// and each peer's share of relaying it, grows with N: this bounds it.
	// 0: no bound.
	MinInterval time.Duration
	// MovedSpacing stretches MinInterval with the mesh: moved figures wait
	// max(MinInterval, N × MovedSpacing), N the origins with live links in
	// this table (this peer's view of the mesh, itself included). Every
	// publication reaches every peer and each peer relays it
	// mult·⌈log₁₀(N+1)⌉ times, so with a fixed interval each peer's share
	// grows as N·log N; stretched, the mesh-wide rate of moved-figure
	// publications stays at most 1/MovedSpacing whatever N, and a peer's
	// share grows only as log N. Up/down changes do not wait for it; added
	// and removed links wait max(BatchInterval, N × MovedSpacing) (or ride
	// with an earlier publication). 0: no stretch.
	MovedSpacing time.Duration
	// BatchInterval: links that were added or removed go out together, at
	// most this often, or every N × MovedSpacing if that is longer (each
	// publication costs a 64-byte signature, relayed
	// to every peer; probe-target churn adds and removes links steadily). A
	// link going down or coming back up, or changing encryption, goes out
	// at once: others must route around it, and a recovered link must not
	// wait — the other end takes the worse of both directions, so a stale
	// "down" keeps it relaying while the owner is already direct, which over
	// WireGuard drops the pair's replies. Up/down flips are rare next to
	// churn. Default 10s (in the 50-peer simulation 2s cost 20 kB/s per
	// peer of link state, 10s 13 kB/s, unsigned per-link publication 14
	// kB/s); negative: at once.
	BatchInterval time.Duration
	// MaxDelta bounds one message of Publish; more changes are split into
	// several. Default: MaxBroadcastSize less the channel envelope.
	MaxDelta int
	// MaxLinksPerOrigin bounds an origin's live links (its probed links
	// plus relays in use: far below it). Default 256.
	MaxLinksPerOrigin int
	// MaxOrigins bounds the origins held. Default 8192.
	MaxOrigins int
	// MaxSkew: versions further ahead of our clock are rejected. Default 5m.
	MaxSkew time.Duration
	// TombstoneTTL: how long removed links and origins are remembered.
	// Default 10m.
	TombstoneTTL time.Duration
	// Now gives the wall clock for versions. Default time.Now.
	Now func() time.Time
	// Logger; default discard.
	Logger *slog.Logger
	// Registerer for weft_linkstate_* metrics; nil: none.
	Registerer prometheus.Registerer
}

// Signer signs with this peer's identity; *identity.Identity and *Mesh
// have this method. Safe for concurrent use.
type Signer interface {
	Sign(domain string, msg []byte) []byte
}

// LinkTable holds every peer's published links.
//
// Concurrency: safe for concurrent use; mu guards everything.
type LinkTable struct {
	cfg       LinkTableConfig
	rejects   *prometheus.CounterVec
	entries   prometheus.Gauge
	published *prometheus.CounterVec // own publications, by what made them due
	movedBy   *prometheus.CounterVec // own links republished for moved figures, by figure

	mu        sync.Mutex // guards following
	origins   map[string]*origin
	nEntries  int
	self      string          // origin of the last Publish
	selfFloor uint64          // a version of ours seen from others; publish above it
	forged    map[string]bool // neighbours of ours others hold newer entries for
	republish bool            // force the next Publish to re-emit every link
	lastSweep time.Time
	lastMoved time.Time // our last publication of moved figures (MinInterval)
	lastBatch time.Time // our last publication of added, removed, up links (BatchInterval)
	lastFull  time.Time // our last publication of every link (TombstoneTTL/2)

	// names interns the peer names of stored entries, so that decoding a
	// message about peers we know allocates no strings (most of what a
	// peer receives repeats names it holds). Only names that passed
	// decoding and were stored get in; cleared when it outgrows the
	// bound on origins. Lock order: mu, then namesMu.
	namesMu sync.Mutex // guards names
	names   map[string]string
}

// origin is one origin's entries.
type origin struct {
	links     map[string]*lsEntry
	max       uint64 // highest version held (tombstones included)
	live      int
	hash      uint64 // xor of entryHash over the live entries
	removed   bool   // Remove was called; entries ≤ max are not taken back
	removedAt time.Time
}

type lsEntry struct {
	version   uint64
	m         LinkMetrics
	deleted   bool
	deletedAt time.Time
	at        time.Time  // when this peer published it (own entries only)
	pub       *signedPub // the signed publication it came in, forwarded as is
}

// signedPub is one origin's signed publication: its group bytes followed
// by the signature, as on the wire. Shared by its entries; dropped with the
// last of them.
type signedPub struct {
	raw     []byte
	version uint64 // the highest version in it (orders forwarding)
}

// satInc is v+1, saturating: versions never wrap.
func satInc(v uint64) uint64 {
	if v == math.MaxUint64 {
		return v
	}
	return v + 1
}

// entryHash is FNV-1a (64 bit) of nb followed by version in big endian,
// written out so that it allocates nothing (it runs for every entry
// stored). Peers compare these hashes: the function must not change.
func entryHash(nb string, version uint64) uint64 {
	const offset64, prime64 = 14695981039346656037, 1099511628211
	h := uint64(offset64)
	for i := 0; i < len(nb); i++ {
		h = (h ^ uint64(nb[i])) * prime64
	}
	for i := 56; i >= 0; i -= 8 {
		h = (h ^ (version >> i & 0xff)) * prime64
	}
	return h
}

// internLocked records name (valid, stored) for the decoder. O(1).
func (t *LinkTable) internLocked(name string) {
	t.namesMu.Lock()
	defer t.namesMu.Unlock()
	if _, ok := t.names[name]; ok {
		return
	}
	if t.names == nil || len(t.names) >= 4*t.cfg.MaxOrigins {
		t.names = make(map[string]string)
	}
	t.names[name] = name
}

// NewLinkTable returns an empty table.
func NewLinkTable(cfg LinkTableConfig) (*LinkTable, error) {
	if cfg.BatchInterval == 0 {
		cfg.BatchInterval = 10 * time.Second
	}
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
	if cfg.MaxLinksPerOrigin == 0 {
		cfg.MaxLinksPerOrigin = 256
	}
	if cfg.MaxOrigins == 0 {
		cfg.MaxOrigins = 8192
	}
	if cfg.MaxSkew == 0 {
		cfg.MaxSkew = 5 * time.Minute
	}
	if cfg.TombstoneTTL == 0 {
		cfg.TombstoneTTL = 10 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	switch {
	case cfg.Signer == nil:
		return nil, fmt.Errorf("%w: link-state table without a Signer (the peer's identity)", ErrInvalidConfig)
	case cfg.MaxDelta < 300 || cfg.MaxDelta > MaxUnicastSize:
		return nil, fmt.Errorf("%w: link-state MaxDelta %d out of range 300..%d", ErrInvalidConfig, cfg.MaxDelta, MaxUnicastSize)
	case cfg.MaxLinksPerOrigin < 1 || cfg.MaxOrigins < 1:
		return nil, fmt.Errorf("%w: link-state bounds must be positive", ErrInvalidConfig)
	case cfg.RTTChange < 0 || cfg.RTTMinChange < 0 || cfg.LossChange < 0 || cfg.MaxSkew < 0 || cfg.TombstoneTTL < 0 || cfg.MovedSpacing < 0:
		return nil, fmt.Errorf("%w: link-state thresholds must not be negative", ErrInvalidConfig)
	}
	t := &LinkTable{cfg: cfg, origins: map[string]*origin{}, forged: map[string]bool{},
		rejects: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_linkstate_rejected_total",
			Help: "Link-state messages rejected whole, by reason."}, []string{"reason"}),
		entries: prometheus.NewGauge(prometheus.GaugeOpts{Name: "weft_linkstate_entries",
			Help: "Link-state entries held, tombstones included."}),
		published: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_linkstate_published_total",
			Help: "Link-state publications of this peer (messages broadcast), by what made them due: full (the periodic or first republish of every link), updown (a link went up or down, or changed encryption), moved (moved figures, MinInterval stretched with N), batch (added or removed links)."}, []string{"reason"}),
		movedBy: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "weft_linkstate_moved_links_total",
			Help: "This peer's links republished because their figures moved beyond the thresholds, by the figure that moved (rtt, jitter, loss; a link counts once per figure)."}, []string{"figure"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{t.rejects, t.entries, t.published, t.movedBy} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("link-state metrics: %w", err)
			}
		}
	}
	return t, nil
}

// Publish records self's current link figures (see PublishLinks).
func (t *LinkTable) Publish(self string, stats map[string]LinkStats) (msgs [][]byte, changed []LinkChange) {
	links := make(map[string]LinkMetrics, len(stats))
	for name, s := range stats {
		links[name] = LinkMetrics{RTT: s.RTT, Jitter: s.Jitter, Loss: s.Loss, Up: s.Up}
	}
	return t.PublishLinks(self, links)
}

// PublishLinks records self's current links, keyed by neighbour name; keys
// that are not valid peer names, and self, are ignored with a warning.
// Links that appeared, disappeared, flipped up/down or encrypted, or moved
// beyond the thresholds since their last publication get a new version;
// PublishLinks returns them encoded in messages that each fit MaxDelta (to
// broadcast) and as changes (to feed path selection). O(D), plus O(N) once
// moved figures wait past MinInterval (MovedSpacing counts the origins).
func (t *LinkTable) PublishLinks(self string, metrics map[string]LinkMetrics) (msgs [][]byte, changed []LinkChange) {
	if err := validName(self); err != nil {
		t.cfg.Logger.Warn("linkstate: publish with invalid self name", "self", self, "err", err)
		return nil, nil
	}
	links := make(map[string]LinkMetrics, len(metrics))
	for name, m := range metrics {
		if err := validName(name); err != nil || name == self {
			t.cfg.Logger.Warn("linkstate: not publishing link with invalid neighbour name", "name", name)
			continue
		}
		links[name] = m.quantize()
	}
	if len(links) > t.cfg.MaxLinksPerOrigin {
		names := slices.Sorted(maps.Keys(links))
		for _, n := range names[t.cfg.MaxLinksPerOrigin:] {
			delete(links, n)
		}
		t.rejects.WithLabelValues("own_too_many_links").Inc()
		t.cfg.Logger.Error("linkstate: more links than the bound; publishing the first", "n", len(names), "max", t.cfg.MaxLinksPerOrigin)
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.cfg.Now()
	t.sweepLocked(now)
	if t.self != self {
		t.self, t.republish = self, true
	}
	// Every TombstoneTTL/2 all our links are republished: a publication
	// is forwarded whole, superseded entries included, for as long as one
	// of its entries is current somewhere; refreshed, no old publication
	// outlives the tombstones that cancel its superseded entries (which
	// others keep TombstoneTTL), so a peer that already swept a tombstone
	// is never handed the removed link again. One publication of D
	// entries per TombstoneTTL/2.
	if now.Sub(t.lastFull) >= t.cfg.TombstoneTTL/2 {
		t.republish = true
	}
	if t.republish {
		t.lastFull = now
	}
	o := t.origins[self]
	if o == nil {
		o = &origin{links: map[string]*lsEntry{}}
		t.origins[self] = o
	}
	type upd struct {
		nb      string
		m       LinkMetrics
		removed bool
	}
	// Added links, up/down and encrypted flips go out at once; links whose
	// figures only moved go out together, at most every MinInterval: one
	// signature and one broadcast for all of them (publications per peer ≤
	// one per MinInterval plus the urgent ones, whatever D; entries per
	// link ≤ one per MinInterval, as before). They do not ride along with
	// urgent changes, which would republish every moved link at the rate
	// links flap.
	// ups go out at once; batch within BatchInterval, or with ups (the
	// signature is paid anyway); moved within MinInterval, on their own
	// timer (riding along would republish them at the rate of churn).
	var ups, batch, moved []upd
	full := t.republish
	for nb, m := range links {
		e := o.links[nb]
		switch {
		case t.republish || e != nil && !e.deleted && (e.m.Up != m.Up || e.m.Encrypted != m.Encrypted):
			ups = append(ups, upd{nb: nb, m: m})
		case e == nil || e.deleted || e.m.Up != m.Up:
			batch = append(batch, upd{nb: nb, m: m})
		case t.moved(e.m, m):
			moved = append(moved, upd{nb: nb, m: m})
		}
	}
	for nb, e := range o.links {
		if _, ok := links[nb]; !ok && (!e.deleted || t.forged[nb]) {
			if t.forged[nb] {
				ups = append(ups, upd{nb: nb, removed: true})
			} else {
				batch = append(batch, upd{nb: nb, removed: true})
			}
		}
	}
	for nb := range t.forged {
		if _, ok := links[nb]; !ok && o.links[nb] == nil {
			ups = append(ups, upd{nb: nb, removed: true})
		}
	}
	if t.lastBatch.IsZero() {
		t.lastBatch = now
	}
	if t.lastMoved.IsZero() {
		t.lastMoved = now // the first publication carries every link
	}
	// The stretched interval counts the live origins, O(N): only once the
	// fixed floor has passed and something moved.
	movedDue := len(moved) > 0 && now.Sub(t.lastMoved) >= t.cfg.MinInterval &&
		now.Sub(t.lastMoved) >= MovedInterval(t.cfg.MinInterval, t.cfg.MovedSpacing, t.liveOriginsLocked())
	// Added and removed links are stretched the same way (their mesh-wide rate grew with N:
	// at N=100, 6 of the 9 link-state publications a peer took a second were batches of
	// probe-target churn), but from BatchInterval.
	batchDue := len(batch) > 0 && (t.cfg.BatchInterval < 0 || now.Sub(t.lastBatch) >= t.cfg.BatchInterval &&
		now.Sub(t.lastBatch) >= MovedInterval(t.cfg.BatchInterval, t.cfg.MovedSpacing, t.liveOriginsLocked()))
	// The batch also rides with due moved figures: every peer verifies
	// every publication (one ed25519 check each, the largest receive cost
	// at N=100), so one publication instead of two.
	urgent := len(ups) > 0
	if len(batch) > 0 && (len(ups) > 0 || movedDue || batchDue) {
		ups = append(ups, batch...)
		t.lastBatch = now
	}
	if movedDue {
		ups = append(ups, moved...)
		t.lastMoved = now
		for _, u := range moved {
			prev := o.links[u.nb].m
			if t.durMoved(prev.RTT, u.m.RTT) {
				t.movedBy.WithLabelValues("rtt").Inc()
			}
			if t.durMoved(prev.Jitter, u.m.Jitter) {
				t.movedBy.WithLabelValues("jitter").Inc()
			}
			if t.lossMoved(prev.Loss, u.m.Loss) {
				t.movedBy.WithLabelValues("loss").Inc()
			}
		}
	}
	t.republish = false
	clear(t.forged)
	if len(ups) == 0 {
		if len(o.links) == 0 {
			delete(t.origins, self)
		}
		return nil, nil
	}
	// Above everything of ours seen anywhere (saturating: a version at the
	// top of uint64 cannot come in, see Merge, but the arithmetic must not
	// wrap if it did).
	v := max(uint64(max(now.UnixMicro(), 1)), satInc(o.max), satInc(t.selfFloor))
	o.removed = false
	items := make([]encItem, 0, len(ups))
	for _, u := range ups {
		e := &lsEntry{version: v, m: u.m, deleted: u.removed, at: now}
		if u.removed {
			e.m, e.deletedAt = LinkMetrics{}, now
		}
		if c, ok := t.setLocked(o, self, u.nb, e); ok {
			changed = append(changed, c)
		}
		items = append(items, encItem{origin: self, nb: u.nb, e: e})
	}
	t.entries.Set(float64(t.nEntries))
	msgs = t.sealLocked(self, items)
	reason := "batch"
	switch {
	case full:
		reason = "full"
	case urgent:
		reason = "updown"
	case movedDue:
		reason = "moved"
	}
	t.published.WithLabelValues(reason).Add(float64(len(msgs)))
	return msgs, changed
}

// sealLocked encodes our entries (one origin) in publications of at most
// MaxDelta bytes each (as a whole message), signs each, points the entries
// at their publication and returns the messages. One signature per message.
func (t *LinkTable) sealLocked(self string, items []encItem) [][]byte {
	sortItems(items)
	budget := t.cfg.MaxDelta - 3 - (1 + len(self) + binary.MaxVarintLen16) - ed25519.SignatureSize
	var msgs [][]byte
	for len(items) > 0 {
		size, n, prev := 0, 0, ""
		for n < len(items) {
			k := len(appendEntry(nil, prev, items[n].nb, items[n].e))
			if n > 0 && size+k > budget {
				break
			}
			size += k
			prev = items[n].nb
			n++
		}
		chunk := items[:n]
		items = items[n:]
		group := appendGroup(nil, self, chunk)
		raw := append(group, t.cfg.Signer.Sign(linkStateSignDomain, group)...)
		pub := &signedPub{raw: raw, version: chunk[0].e.version}
		for _, it := range chunk {
			it.e.pub = pub
			pub.version = max(pub.version, it.e.version)
		}
		msgs = append(msgs, packPubs([]*signedPub{pub}, MaxUnicastSize)...)
	}
	return msgs
}

// MovedInterval is how long a peer's moved figures wait since its last
// publication of moved figures in a mesh of n peers: minInterval, stretched
// to n × spacing so that the mesh-wide rate of such publications stays at
// most 1/spacing. Pure.
func MovedInterval(minInterval, spacing time.Duration, n int) time.Duration {
	return max(minInterval, time.Duration(max(n, 0))*spacing)
}

// liveOriginsLocked counts the origins with at least one live link (the
// peers that publish, this one included). O(N).
func (t *LinkTable) liveOriginsLocked() int {
	n := 0
	for _, o := range t.origins {
		if o.live > 0 {
			n++
		}
	}
	return n
}

// Moved reports whether next differs from prev beyond the table's
// thresholds (what makes a link worth republishing).
func (t *LinkTable) Moved(prev, next LinkMetrics) bool { return t.moved(prev, next) }

// moved reports whether next differs from the published prev beyond the
// thresholds.
func (t *LinkTable) moved(prev, next LinkMetrics) bool {
	return prev.Up != next.Up || prev.Encrypted != next.Encrypted ||
		t.durMoved(prev.RTT, next.RTT) || t.durMoved(prev.Jitter, next.Jitter) || t.lossMoved(prev.Loss, next.Loss)
}

func (t *LinkTable) lossMoved(prev, next float64) bool {
	return math.Abs(prev-next) >= t.cfg.LossChange-1e-9
}

func (t *LinkTable) durMoved(prev, next time.Duration) bool {
	d := next - prev
	if d < 0 {
		d = -d
	}
	return d >= t.cfg.RTTMinChange && float64(d) >= t.cfg.RTTChange*float64(prev)
}

// setLocked stores e as origin o's entry for nb, keeping the counts, and
// reports the change to the graph, if any.
func (t *LinkTable) setLocked(o *origin, from, nb string, e *lsEntry) (LinkChange, bool) {
	old := o.links[nb]
	if old == nil {
		t.nEntries++
	} else if !old.deleted {
		o.live--
		o.hash ^= entryHash(nb, old.version)
	}
	if old == nil {
		t.internLocked(nb)
	}
	o.links[nb] = e
	o.max = max(o.max, e.version)
	if !e.deleted {
		o.live++
		o.hash ^= entryHash(nb, e.version)
	}
	switch {
	case e.deleted && (old == nil || old.deleted):
		return LinkChange{}, false
	case e.deleted:
		return LinkChange{From: from, To: nb, Removed: true}, true
	case old != nil && !old.deleted && old.m == e.m:
		return LinkChange{}, false
	}
	return LinkChange{From: from, To: nb, Link: e.m}, true
}

// sweepLocked drops tombstones older than TombstoneTTL, at most once a
// minute. O(entries).
func (t *LinkTable) sweepLocked(now time.Time) {
	if now.Sub(t.lastSweep) < time.Minute {
		return
	}
	t.lastSweep = now
	for name, o := range t.origins {
		if o.removed {
			if now.Sub(o.removedAt) > t.cfg.TombstoneTTL {
				delete(t.origins, name)
			}
			continue
		}
		for nb, e := range o.links {
			if e.deleted && now.Sub(e.deletedAt) > t.cfg.TombstoneTTL {
				delete(o.links, nb)
				t.nEntries--
			}
		}
	}
	t.entries.Set(float64(t.nEntries))
}

// Merge applies one entries message (a broadcast or an anti-entropy
// unicast) and returns the links that changed. Each publication in it that
// would change something is verified with its origin's key from keys (nil
// knows none). A malformed message, a forged publication, or one breaking a
// bound, is rejected whole with an error wrapping ErrBadLinkState: it
// changes nothing, and is counted and logged. Publications of origins whose
// key is unknown are skipped (counted as unknown_origin); the rest applies.
// O(entries in the message) plus one verification per new publication.
func (t *LinkTable) Merge(msg []byte, keys identity.KeyLookup) ([]LinkChange, error) {
	groups, err := t.decodeEntries(msg)
	if err != nil {
		return nil, t.reject("malformed", err)
	}
	now := t.cfg.Now()
	limit := t.versionLimit(now)
	for _, g := range groups {
		for _, it := range g.items {
			if it.e.version > limit {
				return nil, t.reject("future_version", fmt.Errorf("%w: origin %q: neighbour %q: version %d is more than %v ahead of our clock (%d)",
					ErrBadLinkState, g.origin, it.nb, it.e.version, t.cfg.MaxSkew, now.UnixMicro()))
			}
		}
	}
	// Only publications that would change something are verified (and
	// need a key): relayed copies of what we hold cost no signature check.
	t.mu.Lock()
	useful := make([]bool, len(groups))
	for i, g := range groups {
		useful[i] = t.usefulLocked(g)
	}
	t.mu.Unlock()
	verified := make([]encGroup, 0, len(groups))
	for i, g := range groups {
		if !useful[i] {
			continue
		}
		var key ed25519.PublicKey
		ok := false
		if keys != nil {
			key, ok = keys(g.origin)
		}
		if !ok {
			t.rejects.WithLabelValues("unknown_origin").Inc()
			t.cfg.Logger.Debug("linkstate: publication of an origin with no known key skipped; anti-entropy brings it again", "origin", g.origin)
			continue
		}
		if !identity.Verify(key, linkStateSignDomain, g.signed, g.sig) {
			return nil, t.reject("bad_signature", fmt.Errorf("%w: origin %q: signature does not verify with its key (forged, or signed by another peer)",
				ErrBadLinkState, g.origin))
		}
		verified = append(verified, g)
	}
	if len(verified) == 0 {
		return nil, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	// Check every bound before applying anything. pending holds what the
	// message's earlier publications of an origin would set.
	newOrigins := map[string]bool{}
	live := map[string]int{}
	pending := map[string]map[string]*lsEntry{}
	for _, g := range verified {
		if g.origin == t.self && t.self != "" {
			continue
		}
		o := t.origins[g.origin]
		if o == nil {
			o = &origin{links: map[string]*lsEntry{}}
			newOrigins[g.origin] = true
		}
		p := pending[g.origin]
		if p == nil {
			p = map[string]*lsEntry{}
			pending[g.origin] = p
			live[g.origin] = o.live
		}
		for _, it := range g.items {
			cur := p[it.nb]
			if cur == nil {
				cur = o.links[it.nb]
			}
			if !t.newer(o, cur, it.e) {
				continue
			}
			if cur != nil && !cur.deleted {
				live[g.origin]--
			}
			if !it.e.deleted {
				live[g.origin]++
			}
			p[it.nb] = it.e
		}
		if n := live[g.origin]; n > t.cfg.MaxLinksPerOrigin {
			return nil, t.reject("too_many_links", fmt.Errorf("%w: origin %q would have %d links, at most %d",
				ErrBadLinkState, g.origin, n, t.cfg.MaxLinksPerOrigin))
		}
	}
	if n := len(t.origins) + len(newOrigins); len(newOrigins) > 0 && n > t.cfg.MaxOrigins {
		return nil, t.reject("too_many_origins", fmt.Errorf("%w: %d origins, at most %d", ErrBadLinkState, n, t.cfg.MaxOrigins))
	}
	var changes []LinkChange
	for _, g := range verified {
		pub := &signedPub{raw: slices.Clone(g.raw)} // memberlist reuses msg
		for _, it := range g.items {
			pub.version = max(pub.version, it.e.version)
			it.e.pub = pub
		}
		if g.origin == t.self && t.self != "" {
			t.ownLocked(g)
			continue
		}
		o := t.origins[g.origin]
		if o == nil {
			o = &origin{links: map[string]*lsEntry{}}
			t.origins[g.origin] = o
			t.internLocked(g.origin)
		}
		for _, it := range g.items {
			if !t.newer(o, o.links[it.nb], it.e) {
				continue
			}
			if o.removed {
				o.removed = false // the origin came back with a newer entry
			}
			if it.e.deleted {
				it.e.deletedAt = now
			}
			if c, ok := t.setLocked(o, g.origin, it.nb, it.e); ok {
				changes = append(changes, c)
			}
		}
		if len(o.links) == 0 && !o.removed {
			delete(t.origins, g.origin)
		}
	}
	t.entries.Set(float64(t.nEntries))
	return changes, nil
}

// versionLimit is the highest version taken: MaxSkew ahead of now.
func (t *LinkTable) versionLimit(now time.Time) uint64 {
	return uint64(max(now.Add(t.cfg.MaxSkew).UnixMicro(), 0))
}

// usefulLocked reports whether a publication would change anything here:
// a newer entry of another origin, or an entry of ours others hold at or
// above our own version (which we must answer). O(entries in g).
func (t *LinkTable) usefulLocked(g encGroup) bool {
	o := t.origins[g.origin]
	if g.origin == t.self && t.self != "" {
		for _, it := range g.items {
			if t.ownForgedLocked(o, it) {
				return true
			}
		}
		return false
	}
	if o == nil {
		return true
	}
	for _, it := range g.items {
		if t.newer(o, o.links[it.nb], it.e) {
			return true
		}
	}
	return false
}

// ownForgedLocked reports whether it, an entry of ours held by another
// peer, is at or above our own entry and not its echo.
func (t *LinkTable) ownForgedLocked(o *origin, it encItem) bool {
	var cur *lsEntry
	if o != nil {
		cur = o.links[it.nb]
	}
	if cur != nil && it.e.version < cur.version {
		return false
	}
	if cur != nil && it.e.version == cur.version && it.e.deleted == cur.deleted && (cur.deleted || it.e.m == cur.m) {
		return false // our own entry echoed back
	}
	return true
}

// newer reports whether e replaces cur (nil: none) of origin o.
func (t *LinkTable) newer(o *origin, cur, e *lsEntry) bool {
	if cur != nil {
		return e.version > cur.version
	}
	return !o.removed || e.version > o.max
}

// ownLocked handles entries of ours held by others (signed by us: an old
// entry from before our clock stepped back or our restart). They are not
// taken, but when one is at or above our own entry's version, the next
// Publish re-asserts our real state above it. Its version passed the
// MaxSkew bound, so Publish's version stays below the top of uint64.
func (t *LinkTable) ownLocked(g encGroup) {
	o := t.origins[t.self]
	for _, it := range g.items {
		if t.ownForgedLocked(o, it) {
			t.selfFloor = max(t.selfFloor, it.e.version)
			t.forged[it.nb] = true
			t.republish = true
		}
	}
}

func (t *LinkTable) reject(reason string, err error) error {
	t.rejects.WithLabelValues(reason).Inc()
	t.cfg.Logger.Warn("linkstate: rejected message", "reason", reason, "err", err)
	return err
}

// Remove forgets an origin (a peer that left or was removed) and returns
// its links as removed. Its highest version is kept (for TombstoneTTL), so
// the same or older entries gossiped by others are not taken back; a newer
// one (the peer came back) is.
func (t *LinkTable) Remove(name string) []LinkChange {
	t.mu.Lock()
	defer t.mu.Unlock()
	o := t.origins[name]
	if o == nil || o.removed {
		return nil
	}
	var out []LinkChange
	for nb, e := range o.links {
		if !e.deleted {
			out = append(out, LinkChange{From: name, To: nb, Removed: true})
		}
	}
	t.nEntries -= len(o.links)
	t.origins[name] = &origin{links: map[string]*lsEntry{}, max: o.max, removed: true, removedAt: t.cfg.Now()}
	t.entries.Set(float64(t.nEntries))
	return out
}

// Prune removes (as Remove does) every origin but ours whose key keys no
// longer knows: the mesh forgets a member DeadPeerRetention after it died
// or left, and its links go with it, so the origins held follow the
// membership and not whatever was once published. O(N) lookups, made
// without the table's lock.
func (t *LinkTable) Prune(keys identity.KeyLookup) []LinkChange {
	t.mu.Lock()
	names := make([]string, 0, len(t.origins))
	for name, o := range t.origins {
		if name != t.self && !o.removed {
			names = append(names, name)
		}
	}
	t.mu.Unlock()
	var out []LinkChange
	n := 0
	for _, name := range names {
		if keys != nil {
			if _, ok := keys(name); ok {
				continue
			}
		}
		out = append(out, t.Remove(name)...)
		n++
	}
	if n > 0 {
		t.cfg.Logger.Info("linkstate: pruned origins that are no longer members", "origins", n)
	}
	return out
}

// Restore undoes Remove for a peer that came back: its entries are taken
// again whatever their versions, so the next push/pull brings back the
// links it did not change meanwhile (those it did change come anyway).
func (t *LinkTable) Restore(name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if o := t.origins[name]; o != nil && o.removed {
		delete(t.origins, name)
	}
}

// Digest returns the anti-entropy digest (push/pull's LocalState) naming
// self as the sender. O(N).
func (t *LinkTable) Digest(self string) []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	b := []byte{linkStateVersion, linkStateDigest, byte(len(self))}
	b = append(b, self...)
	b = binary.AppendUvarint(b, uint64(len(t.origins)))
	for _, name := range slices.Sorted(maps.Keys(t.origins)) {
		o := t.origins[name]
		var flags byte
		if o.removed {
			flags = digestRemoved
		}
		b = append(b, byte(len(name)))
		b = append(b, name...)
		b = append(b, flags)
		b = binary.AppendUvarint(b, o.max)
		b = binary.BigEndian.AppendUint64(b, o.hash)
	}
	return b
}

// digestEntry is one origin of a digest.
type digestEntry struct {
	max     uint64
	hash    uint64
	removed bool
}

// Missing answers a digest: it returns the digest's sender and the entries
// that sender lacks, in messages of at most MaxUnicastSize. A malformed
// digest is rejected (counted, logged). O(N + entries sent).
func (t *LinkTable) Missing(digest []byte) (peer string, msgs [][]byte, err error) {
	peer, theirs, err := t.decodeDigest(digest)
	if err != nil {
		return "", nil, t.reject("malformed_digest", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var pubs []*signedPub
	seen := map[*signedPub]bool{}
	for _, name := range slices.Sorted(maps.Keys(t.origins)) {
		o := t.origins[name]
		if o.removed {
			continue
		}
		first := len(pubs)
		d, ok := theirs[name]
		var above uint64
		switch {
		case name == peer && ok && d.max >= o.max:
			continue // a peer is the authority on its own links
		case name == peer && ok:
			// We hold entries of the peer's own above its version (signed
			// by it before a restart or a clock step back): sent, so
			// that it re-asserts its state above them.
			above = d.max
		case !ok:
		case d.removed && d.max >= o.max:
			continue
		case d.max > o.max || d.max == o.max && d.hash == o.hash:
			continue
		case d.max < o.max:
			above = d.max
		}
		for _, e := range o.links {
			if e.version > above && e.pub != nil && !seen[e.pub] {
				seen[e.pub] = true
				pubs = append(pubs, e.pub)
			}
		}
		// Oldest first, so that a receiver applies them in order.
		slices.SortFunc(pubs[first:], func(a, b *signedPub) int {
			if a.version != b.version {
				if a.version < b.version {
					return -1
				}
				return 1
			}
			return slices.Compare(a.raw, b.raw) // deterministic
		})
	}
	return peer, packPubs(pubs, MaxUnicastSize), nil
}

// Graph returns a copy of the current graph (live links only). O(N × D).
func (t *LinkTable) Graph() Graph {
	t.mu.Lock()
	defer t.mu.Unlock()
	g := make(Graph, len(t.origins))
	for n, o := range t.origins {
		if o.live == 0 {
			continue
		}
		links := make(map[string]LinkMetrics, o.live)
		for nb, e := range o.links {
			if !e.deleted {
				links[nb] = e.m
			}
		}
		g[n] = links
	}
	return g
}

// Link returns the live link from→to. O(1).
func (t *LinkTable) Link(from, to string) (LinkMetrics, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if o := t.origins[from]; o != nil {
		if e := o.links[to]; e != nil && !e.deleted {
			return e.m, true
		}
	}
	return LinkMetrics{}, false
}

// Version returns the highest version of an origin's entries (0 when
// unknown).
func (t *LinkTable) Version(name string) uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if o := t.origins[name]; o != nil {
		return o.max
	}
	return 0
}

// encItem is one entry to encode; encGroup one signed publication of a
// decoded message: its origin, entries, the bytes the signature covers,
// the signature, and both as forwarded (raw).
type encItem struct {
	origin, nb string
	e          *lsEntry
}

type encGroup struct {
	origin string
	items  []encItem
	signed []byte
	sig    []byte
	raw    []byte
}

// sortItems sorts items by origin, then neighbour.
func sortItems(items []encItem) {
	slices.SortFunc(items, func(a, b encItem) int {
		if a.origin != b.origin {
			if a.origin < b.origin {
				return -1
			}
			return 1
		}
		switch {
		case a.nb < b.nb:
			return -1
		case a.nb > b.nb:
			return 1
		}
		return 0
	})
}

// appendGroup encodes one origin's items (sorted by neighbour) as a
// publication body, what its signature covers.
func appendGroup(b []byte, origin string, items []encItem) []byte {
	b = append(b, byte(len(origin)))
	b = append(b, origin...)
	b = binary.AppendUvarint(b, uint64(len(items)))
	prev := ""
	for _, it := range items {
		b = appendEntry(b, prev, it.nb, it.e)
		prev = it.nb
	}
	return b
}

// packPubs packs signed publications, in order, into entries messages of
// at most limit bytes each (a publication is never larger: Publish keeps
// each within MaxDelta ≤ MaxUnicastSize).
func packPubs(pubs []*signedPub, limit int) [][]byte {
	const header = 2 + binary.MaxVarintLen32
	var msgs [][]byte
	for len(pubs) > 0 {
		size, n := header, 0
		for n < len(pubs) && (n == 0 || size+len(pubs[n].raw) <= limit) {
			size += len(pubs[n].raw)
			n++
		}
		b := make([]byte, 0, size)
		b = append(b, linkStateVersion, linkStateEntries)
		b = binary.AppendUvarint(b, uint64(n))
		for _, p := range pubs[:n] {
			b = append(b, p.raw...)
		}
		msgs = append(msgs, b)
		pubs = pubs[n:]
	}
	return msgs
}

func appendEntry(b []byte, prev, n string, e *lsEntry) []byte {
	limit := min(len(prev), len(n))
	pre := 0
	for pre < limit && prev[pre] == n[pre] {
		pre++
	}
	suf := 0
	for pre+suf < limit && prev[len(prev)-1-suf] == n[len(n)-1-suf] {
		suf++
	}
	b = append(b, byte(pre), byte(suf), byte(len(n)-pre-suf))
	b = append(b, n[pre:len(n)-suf]...)
	var flags byte
	if e.deleted {
		flags |= flagRemoved
	} else {
		if e.m.Up {
			flags |= flagUp
		}
		if e.m.Encrypted {
			flags |= flagEncrypted
		}
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, e.version)
	if e.deleted {
		return b
	}
	b = binary.AppendUvarint(b, uint64(e.m.RTT/time.Microsecond))
	b = binary.AppendUvarint(b, uint64(e.m.Jitter/time.Microsecond))
	return binary.AppendUvarint(b, uint64(math.Round(e.m.Loss*lossUnits)))
}

// decodeEntries parses an entries message, enforcing the per-message
// bounds (origins, entries per origin).
func (t *LinkTable) decodeEntries(b []byte) ([]encGroup, error) {
	t.namesMu.Lock()
	defer t.namesMu.Unlock()
	d := lsDecoder{b: b, names: t.names}
	if !d.header(linkStateEntries) {
		return nil, d.err
	}
	n := d.uvarint("publication count")
	// A publication takes more than 64 bytes (its signature): a count
	// above len(b)/64 cannot be honest.
	if d.err == nil && (n == 0 || n > uint64(len(b)/ed25519.SignatureSize)) {
		return nil, d.fail("%d publications in %d bytes", n, len(b))
	}
	var out []encGroup
	for i := uint64(0); i < n && d.err == nil; i++ {
		start := d.off
		g := d.readGroup(t.cfg.MaxLinksPerOrigin)
		if d.err != nil {
			break
		}
		g.signed = d.b[start:d.off]
		g.sig = d.bytes(ed25519.SignatureSize, "signature")
		if d.err != nil {
			break
		}
		g.raw = d.b[start:d.off:d.off]
		out = append(out, g)
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.off != len(b) {
		return nil, d.fail("%d trailing bytes", len(b)-d.off)
	}
	return out, nil
}

func (t *LinkTable) decodeDigest(b []byte) (string, map[string]digestEntry, error) {
	d := lsDecoder{b: b}
	if !d.header(linkStateDigest) {
		return "", nil, d.err
	}
	sender := d.name("sender")
	limit := t.versionLimit(t.cfg.Now())
	n := d.uvarint("origin count")
	if d.err == nil && n > uint64(t.cfg.MaxOrigins) {
		return "", nil, d.fail("%d origins, at most %d", n, t.cfg.MaxOrigins)
	}
	out := make(map[string]digestEntry, min(n, 1024))
	for i := uint64(0); i < n && d.err == nil; i++ {
		name := d.name("origin")
		flags := d.u8("flags")
		if d.err == nil && flags&^digestRemoved != 0 {
			d.fail("origin %q: unknown flags %#x", name, flags)
		}
		v := d.uvarint("version")
		var h uint64
		if d.err == nil {
			if len(b)-d.off < 8 {
				d.fail("origin %q: hash truncated", name)
			} else {
				h = binary.BigEndian.Uint64(b[d.off:])
				d.off += 8
			}
		}
		if _, dup := out[name]; d.err == nil && dup {
			d.fail("origin %q repeated", name)
		}
		if v > limit {
			// A version no entry can have: the sender's claim is ignored
			// (as if it lacked the origin), so that it cannot stop us
			// sending it that origin's entries.
			t.rejects.WithLabelValues("future_version_digest").Inc()
			t.cfg.Logger.Warn("linkstate: digest claims a version from the future; ignored", "sender", sender, "origin", name, "version", v)
			continue
		}
		out[name] = digestEntry{max: v, hash: h, removed: flags&digestRemoved != 0}
	}
	if d.err == nil && d.off != len(b) {
		d.fail("%d trailing bytes", len(b)-d.off)
	}
	if d.err != nil {
		return "", nil, d.err
	}
	return sender, out, nil
}

// lsDecoder reads a link-state message; the first error sticks.
type lsDecoder struct {
	b   []byte
	off int
	err error
	// names, if set, holds known valid names (LinkTable.names, its lock
	// held): a name found there costs no allocation and no validation.
	names   map[string]string
	scratch [2 * maxNameLen]byte
}

// bytes reads n bytes, aliasing the message.
func (d *lsDecoder) bytes(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b)-d.off < n {
		d.fail("%s of %d bytes overruns the %d bytes left", what, n, len(d.b)-d.off)
		return nil
	}
	s := d.b[d.off : d.off+n]
	d.off += n
	return s
}

// intern returns b as a string: the known one if b names a known peer
// (no allocation), else a new one. known reports which.
func (d *lsDecoder) intern(b []byte) (s string, known bool) {
	if s, ok := d.names[string(b)]; ok {
		return s, true
	}
	return string(b), false
}

func (d *lsDecoder) fail(format string, a ...any) error {
	if d.err == nil {
		d.err = fmt.Errorf("%w: at offset %d: %s", ErrBadLinkState, d.off, fmt.Sprintf(format, a...))
	}
	return d.err
}

func (d *lsDecoder) header(kind byte) bool {
	switch {
	case len(d.b) < 2:
		d.fail("%d bytes, too short", len(d.b))
	case d.b[0] != linkStateVersion:
		d.fail("format version %d, this peer understands %d", d.b[0], linkStateVersion)
	case d.b[1] != kind:
		d.fail("kind %d, want %d", d.b[1], kind)
	default:
		d.off = 2
		return true
	}
	return false
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

// name reads a length-prefixed peer name.
func (d *lsDecoder) name(what string) string {
	b := d.bytes(int(d.u8("name length")), "name") // constants: no allocation per call
	if d.err != nil {
		return ""
	}
	s, known := d.intern(b)
	if known {
		return s
	}
	if err := validName(s); err != nil {
		d.fail("%s name %q: %v", what, s, err)
		return ""
	}
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

func (d *lsDecoder) readGroup(maxLinks int) encGroup {
	g := encGroup{origin: d.name("origin")}
	n := d.uvarint("entry count")
	if d.err == nil && (n == 0 || n > uint64(maxLinks)) {
		d.fail("origin %q: %d entries, want 1..%d", g.origin, n, maxLinks)
	}
	if d.err != nil {
		return g
	}
	g.items = make([]encItem, 0, n)
	// One allocation for the group's entries: they are stored together
	// and share one publication, so they mostly go together too.
	entries := make([]lsEntry, n)
	prev := ""
	for i := range n {
		pre := int(d.u8("shared prefix"))
		suf := int(d.u8("shared suffix"))
		if d.err == nil && pre+suf > len(prev) {
			d.fail("origin %q: shared prefix %d and suffix %d longer than the previous name %q", g.origin, pre, suf, prev)
		}
		mid := d.bytes(int(d.u8("name length")), "neighbour name")
		if d.err == nil && pre+len(mid)+suf > len(d.scratch) {
			d.fail("origin %q: neighbour name of %d bytes", g.origin, pre+len(mid)+suf)
		}
		if d.err != nil {
			return g
		}
		nb := append(append(append(d.scratch[:0], prev[:pre]...), mid...), prev[len(prev)-suf:]...)
		name, known := d.intern(nb)
		var nameErr error
		if !known {
			nameErr = validName(name)
		}
		switch {
		case nameErr != nil:
			d.fail("origin %q: neighbour name %q: %v", g.origin, name, nameErr)
		case name <= prev:
			d.fail("origin %q: neighbour %q not after %q (unsorted or repeated)", g.origin, name, prev)
		case name == g.origin:
			d.fail("origin %q: link to itself", g.origin)
		}
		flags := d.u8("flags")
		if d.err == nil && (flags&^(flagUp|flagEncrypted|flagRemoved) != 0 || flags&flagRemoved != 0 && flags != flagRemoved) {
			d.fail("origin %q: neighbour %q: bad flags %#x", g.origin, name, flags)
		}
		e := &entries[i]
		*e = lsEntry{version: d.uvarint("version"), deleted: flags&flagRemoved != 0}
		if d.err == nil && e.version == 0 {
			d.fail("origin %q: neighbour %q: version 0", g.origin, name)
		}
		if !e.deleted {
			e.m = LinkMetrics{Up: flags&flagUp != 0, Encrypted: flags&flagEncrypted != 0}
			e.m.RTT = d.duration("rtt")
			e.m.Jitter = d.duration("jitter")
			loss := d.uvarint("loss")
			if d.err == nil && loss > lossUnits {
				d.fail("origin %q: neighbour %q: loss %d/%d above 1", g.origin, name, loss, lossUnits)
			}
			e.m.Loss = float64(loss) / lossUnits
		}
		if d.err != nil {
			return g
		}
		g.items = append(g.items, encItem{origin: g.origin, nb: name, e: e})
		prev = name
	}
	return g
}

// LinkStateSender sends one message to one peer, reliably (Mesh.SendTo).
type LinkStateSender interface {
	SendTo(peer, channel string, msg []byte) error
}

// LinkStateChannel adapts a LinkTable to the mesh's ChannelHandler:
//
//	ch := &mesh.LinkStateChannel{Table: t, Self: name, Sender: m, OnChange: feed}
//	m.RegisterChannel(mesh.LinkStateChannelName, ch)
//	msgs, changes := t.PublishLinks(name, links)
//	for _, msg := range msgs { m.Broadcast(mesh.LinkStateChannelName, msg) }
//
// The mesh relays broadcasts itself; the channel merges them, exchanges
// digests on push/pull and answers the other side's digest by SendTo.
type LinkStateChannel struct {
	Table *LinkTable
	// Self names this peer in its digests.
	Self string
	// Keys gives each origin's public key (Mesh.PublicKey): publications
	// are verified with it, and origins it no longer knows are pruned. nil
	// knows none: every publication is refused.
	Keys identity.KeyLookup
	// Sender sends anti-entropy answers; nil: push/pull repairs nothing.
	Sender LinkStateSender
	// OnChange, if set, is called with the links a merge changed. It runs
	// on memberlist's goroutines and must not block.
	OnChange func([]LinkChange)
	// Logger; nil discards.
	Logger *slog.Logger

	inflight sync.Mutex // guards following
	sending  int
	pruned   time.Time // last Prune
}

// pruneEvery is how often the channel prunes origins that left the
// membership (Prune is O(N)).
const pruneEvery = time.Minute

// maxInflightAnswers bounds the anti-entropy answers being sent at once;
// more are skipped (the next push/pull repairs what they would have).
const maxInflightAnswers = 4

var _ ChannelHandler = (*LinkStateChannel)(nil)

// NotifyMsg merges one entries message (a broadcast or a unicast answer).
func (c *LinkStateChannel) NotifyMsg(msg []byte) {
	changes, err := c.Table.Merge(msg, c.Keys)
	if err != nil {
		changes = nil
	}
	now := time.Now()
	c.inflight.Lock()
	prune := now.Sub(c.pruned) >= pruneEvery
	if prune {
		c.pruned = now
	}
	c.inflight.Unlock()
	if prune {
		changes = append(changes, c.Table.Prune(c.Keys)...)
	}
	if len(changes) > 0 && c.OnChange != nil {
		c.OnChange(changes)
	}
}

// LocalState returns the digest for push/pull.
func (c *LinkStateChannel) LocalState(join bool) []byte { return c.Table.Digest(c.Self) }

// MergeRemoteState answers the other peer's digest with what it lacks, by
// unicast, off memberlist's goroutine.
func (c *LinkStateChannel) MergeRemoteState(buf []byte, join bool) {
	peer, msgs, err := c.Table.Missing(buf)
	if err != nil || len(msgs) == 0 || c.Sender == nil || peer == c.Self {
		return
	}
	c.inflight.Lock()
	if c.sending >= maxInflightAnswers {
		c.inflight.Unlock()
		c.logger().Debug("linkstate: too many answers in flight; skipping one", "peer", peer)
		return
	}
	c.sending++
	c.inflight.Unlock()
	go func() {
		defer func() {
			c.inflight.Lock()
			c.sending--
			c.inflight.Unlock()
		}()
		for _, m := range msgs {
			if err := c.Sender.SendTo(peer, LinkStateChannelName, m); err != nil {
				c.logger().Debug("linkstate: anti-entropy answer not sent", "peer", peer, "err", err)
				return
			}
		}
	}()
}

func (c *LinkStateChannel) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}
