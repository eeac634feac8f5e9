package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Replicator glues a Records store to the mesh's gossip channel. It
// implements mesh.ChannelHandler (NotifyMsg, LocalState, MergeRemoteState),
// so that the router wires it in three lines:
//
//	recs, _ := dns.NewSignedRecords(dns.RecordsConfig{Self: name, Signer: id, Keys: m.PublicKey})
//	rep, _ := dns.NewReplicator(dns.ReplicatorConfig{Records: recs,
//		Broadcast: func(b []byte) error { return m.Broadcast("dns", b) }, Logger: log, Registry: reg})
//	m.RegisterChannel("dns", rep)
//	go rep.Run(ctx, grace, tombstoneTTL)
//
// and the membership hooks call PeerUp/PeerDown (PeerUp's answer says when to sync).
//
// Every received entry goes through Records.MergeChecked: entries that are
// not their origin's (bad_signature), whose origin's key is unknown
// (unknown_origin), too far in the future (future_version) or over a cap
// (origin_full, too_many_origins), or sent after too many forgeries
// (after_forgery) are refused, counted in
// weft_dns_replication_refused_entries_total{reason} and logged, one line
// per message; the rest of the message is merged.
//
// What travels where:
//
//   - Local changes (AddContainer, RemoveContainer, AddService, or Publish of
//     a delta from Records) are broadcast as deltas, split into messages of
//     at most MaxMessage bytes, each a complete encoded Delta.
//   - A received delta is merged. It is not broadcast again by the
//     Replicator: the mesh passes every broadcast on itself (mesh.Broadcast
//     relays like memberlist's own messages), so a re-broadcast would only
//     double the traffic. One exception: when a merge makes this peer, the
//     owner, mint a fresh tombstone for a stale live entry of its own (see
//     Records, "owner authority"), that tombstone is a local change and is
//     published.
//   - Full state (Records.Encode) goes through push/pull (LocalState /
//     MergeRemoteState), which repairs whatever broadcasts lost: drops,
//     partitions, peers that were down.
//
// Concurrency: every method is safe for concurrent use. NotifyMsg,
// LocalState and MergeRemoteState run on memberlist's goroutines and only
// take the store's mutex for the duration of a decode-and-merge; they never
// block on the network, provided Broadcast does not (mesh.Broadcast only
// queues).
type Replicator struct {
	records   *Records
	broadcast func([]byte) error
	max       int
	log       *slog.Logger
	m         *replMetrics

	// idleSweep paces Run's sweeps while no peer is down (tombstones only).
	idleSweep time.Duration

	// down holds the peers reported down and not yet up or expired: while it
	// is non-empty Run sweeps at the fast rate. wake tells Run a peer went down.
	mu   sync.Mutex
	down map[string]bool
	wake chan struct{}

	// afterSweep, when set (tests), is called after every sweep of Run.
	afterSweep func()
}

// ReplicatorConfig holds a Replicator's dependencies.
type ReplicatorConfig struct {
	// Records is the store to replicate (required).
	Records *Records
	// Broadcast sends one message to every other peer (required). It must
	// not block, must be safe for concurrent use, and must not keep msg
	// after it returns unless it copies it (mesh.Broadcast copies).
	Broadcast func(msg []byte) error
	// Logger; nil discards.
	Logger *slog.Logger
	// Registry for the replication metrics; nil keeps them unexported.
	Registry prometheus.Registerer
	// IdleSweep is how often Run drops old tombstones while no peer is down
	// (default DefaultIdleSweep). Dropping a tombstone late is safe: it only
	// keeps a removal alive longer.
	IdleSweep time.Duration
	// MaxMessage bounds one broadcast payload in bytes (default
	// DefaultMaxMessage, at least MinMaxMessage).
	MaxMessage int
}

// DefaultMaxMessage is the default bound of one broadcast payload. The mesh
// caps a whole broadcast at mesh.MaxBroadcastSize (1024 bytes), which also
// counts the channel name (up to 32 bytes) and 10 bytes of framing; 982 is
// what is left for the payload on any channel name.
const DefaultMaxMessage = 1024 - 32 - 10

// MinMaxMessage is the smallest MaxMessage accepted: the largest single
// entry a delta can hold (255-byte peer, 200-byte name, 63-byte service,
// 9-byte version, 64-byte signature) plus the message header, rounded up.
const MinMaxMessage = 640

// DefaultIdleSweep is the default ReplicatorConfig.IdleSweep: an idle peer
// need not wake every second to look for tombstones that live ten minutes.
const DefaultIdleSweep = time.Minute

// ErrReplicatorConfig is wrapped by NewReplicator's errors.
var ErrReplicatorConfig = errors.New("invalid dns replicator config")

// NewReplicator checks cfg and returns a Replicator. It starts nothing; Run
// is the only goroutine it needs.
func NewReplicator(cfg ReplicatorConfig) (*Replicator, error) {
	if cfg.Records == nil {
		return nil, fmt.Errorf("%w: no records", ErrReplicatorConfig)
	}
	if cfg.Broadcast == nil {
		return nil, fmt.Errorf("%w: no broadcast function", ErrReplicatorConfig)
	}
	if cfg.MaxMessage == 0 {
		cfg.MaxMessage = DefaultMaxMessage
	}
	if cfg.MaxMessage < MinMaxMessage {
		return nil, fmt.Errorf("%w: max message %d below %d bytes", ErrReplicatorConfig, cfg.MaxMessage, MinMaxMessage)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newReplMetrics(cfg.Registry)
	if err != nil {
		return nil, err
	}
	if cfg.IdleSweep <= 0 {
		cfg.IdleSweep = DefaultIdleSweep
	}
	return &Replicator{records: cfg.Records, broadcast: cfg.Broadcast, max: cfg.MaxMessage, log: log, m: m,
		idleSweep: cfg.IdleSweep, down: map[string]bool{}, wake: make(chan struct{}, 1)}, nil
}

// Records returns the replicated store.
func (r *Replicator) Records() *Records { return r.records }

// NotifyMsg merges a delta broadcast by another peer. Malformed messages are
// counted (weft_dns_replication_rejected_total{source="delta"}) and dropped;
// they change nothing.
func (r *Replicator) NotifyMsg(msg []byte) {
	r.merge(msg, "delta", false)
}

// LocalState returns the full state, for a push/pull with another peer.
func (r *Replicator) LocalState(join bool) []byte {
	b := r.records.Encode()
	r.m.stateBytes.Observe(float64(len(b)))
	return b
}

// MergeRemoteState merges another peer's full state (its LocalState).
// Malformed states are counted and dropped whole.
func (r *Replicator) MergeRemoteState(buf []byte, join bool) {
	r.merge(buf, "state", join)
}

func (r *Replicator) merge(b []byte, source string, join bool) {
	r.m.received.WithLabelValues(source).Inc()
	d, err := DecodeDelta(b)
	if err != nil {
		r.m.rejected.WithLabelValues(source).Inc()
		r.log.Warn("dns: dropped malformed gossip", "source", source, "len", len(b), "err", err)
		return
	}
	changed, refused := r.records.MergeChecked(d)
	if refused.Total() > 0 {
		for reason, n := range refused.Counts {
			r.m.refused.WithLabelValues(reason).Add(float64(n))
		}
		// One line per message, not per entry: a flood of bad entries must
		// not become a flood of log lines. A peer that left is routine.
		lvl := slog.LevelWarn
		if refused.Total() == refused.Counts[RefusedForgotten] {
			lvl = slog.LevelDebug
		}
		r.log.Log(context.Background(), lvl, "dns: refused gossiped entries", "source", source,
			"refused", refused.Counts, "first", refused.First)
	}
	r.m.merged.WithLabelValues(source).Add(float64(changed.Len()))
	if changed.Empty() {
		return
	}
	r.log.Debug("dns: merged gossip", "source", source, "join", join, "changed", changed.Len())
	// Entries of our own that the merge changed are tombstones we just
	// minted for stale entries (owner authority): announce them.
	self := r.records.Self()
	own := slices.DeleteFunc(changed.Entries(), func(e Entry) bool { return e.Peer != self })
	if len(own) > 0 {
		_ = r.Publish(&Delta{entries: own})
	}
}

// Publish broadcasts a delta of local changes, split into messages of at
// most MaxMessage bytes, each a complete encoded Delta that merges on its
// own. A nil or empty delta sends nothing. Failures are counted and logged,
// and the first one is returned after the remaining messages were tried;
// push/pull repairs what a failed broadcast missed.
func (r *Replicator) Publish(d *Delta) error {
	var first error
	for _, msg := range r.split(d) {
		if err := r.broadcast(msg); err != nil {
			r.m.broadcastErrors.Inc()
			r.log.Warn("dns: broadcast failed", "len", len(msg), "err", err)
			if first == nil {
				first = fmt.Errorf("dns: broadcast of %d bytes: %w", len(msg), err)
			}
			continue
		}
		r.m.sent.Inc()
		r.m.sentBytes.Add(float64(len(msg)))
	}
	return first
}

// split encodes d as messages of at most r.max bytes, packing entries in
// their sorted order.
func (r *Replicator) split(d *Delta) [][]byte {
	if d.Empty() {
		return nil
	}
	if b := d.Encode(); len(b) <= r.max {
		return [][]byte{b}
	}
	var out [][]byte
	var chunk []Entry
	size := 0 // of chunk's entries, encoded
	flush := func() {
		if len(chunk) > 0 {
			out = append(out, (&Delta{entries: chunk}).Encode())
		}
		chunk, size = nil, 0
	}
	for _, e := range d.entries {
		n := encodedEntryLen(e)
		if len(chunk) > 0 && headerLen(len(chunk)+1)+size+n > r.max {
			flush()
		}
		chunk = append(chunk, e)
		size += n
	}
	flush()
	return out
}

// headerLen is the encoded size of a delta's header with count entries.
func headerLen(count int) int {
	return len(codecMagic) + 1 + len(binary.AppendUvarint(nil, uint64(count)))
}

// encodedEntryLen is the encoded size of one entry, measured with the codec
// itself so that it cannot drift from it.
func encodedEntryLen(e Entry) int {
	return len((&Delta{entries: []Entry{e}}).Encode()) - headerLen(1)
}

// AddContainer registers a container's addresses under name on this peer and
// broadcasts the change. An invalid name or address is an error and changes
// nothing. A failed broadcast is not an error here (the change is stored and
// reaches the other peers through push/pull); it is logged and counted.
func (r *Replicator) AddContainer(name string, addrs []netip.Addr) error {
	return r.AddName(name, addrs, nil)
}

// AddName registers a name's addresses and SRV entries on this peer at once
// and broadcasts them: every entry is checked before anything is stored or
// published, so an invalid one (or the peer's cap) fails the whole call and
// changes nothing.
func (r *Replicator) AddName(name string, addrs []netip.Addr, srvs []SRV) error {
	d, err := r.records.AddName(name, addrs, srvs)
	if err != nil {
		return err
	}
	_ = r.Publish(d)
	return nil
}

// RemoveContainer removes a detached container's addresses under name and
// broadcasts the tombstones. With no addrs, or when this peer has no address
// left for name afterwards, every entry of name owned by this peer goes,
// its SRV entries included. Removing what is not there (or an invalid name,
// which cannot be there) does nothing: detach is idempotent.
func (r *Replicator) RemoveContainer(name string, addrs []netip.Addr) {
	if _, err := NormalizeName(name); err != nil {
		r.log.Debug("dns: remove of invalid name ignored", "name", name, "err", err)
		return
	}
	var all []Entry
	for _, a := range addrs {
		if d, err := r.records.RemoveAddr(name, a); err == nil {
			all = append(all, d.entries...)
		}
	}
	self := r.records.Self()
	targets, _ := r.records.LookupName(name)
	if len(addrs) == 0 || !slices.ContainsFunc(targets, func(t Target) bool { return t.Peer == self }) {
		if d, err := r.records.RemoveName(name); err == nil {
			all = append(all, d.entries...)
		}
	}
	_ = r.Publish(joinEntries(all))
}

// AddService registers the SRV entry _service._proto.name → port on this
// peer and broadcasts it. Invalid input is an error and changes nothing.
func (r *Replicator) AddService(name, service, proto string, port uint16) error {
	d, err := r.records.AddSRV(name, service, proto, port)
	if err != nil {
		return err
	}
	_ = r.Publish(d)
	return nil
}

// RemoveService removes an SRV entry of this peer and broadcasts the
// tombstone. Invalid input is an error and changes nothing.
func (r *Replicator) RemoveService(name, service, proto string, port uint16) error {
	d, err := r.records.RemoveSRV(name, service, proto, port)
	if err != nil {
		return err
	}
	_ = r.Publish(d)
	return nil
}

// joinEntries makes one delta of entries with distinct keys.
func joinEntries(entries []Entry) *Delta {
	d := &Delta{entries: entries}
	d.sort()
	return d
}

// PeerUp is the membership hook for a peer that joined or came back
// (Records.PeerUp). It reports whether entries of the peer were refused while
// it was forgotten.
func (r *Replicator) PeerUp(name string) bool {
	r.mu.Lock()
	delete(r.down, name)
	r.mu.Unlock()
	return r.records.PeerUp(name)
}

// PeerDown is the membership hook for a peer reported dead
// (Records.PeerDown); its records go at the first sweep of Run past grace.
func (r *Replicator) PeerDown(name string) {
	r.records.PeerDown(name)
	if name == r.records.Self() {
		return // the store ignores it too
	}
	r.mu.Lock()
	r.down[name] = true
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default: // Run is woken already
	}
}

// pendingDown reports whether a peer reported down is still waiting for its
// grace, after forgetting those in gone (just expired).
func (r *Replicator) pendingDown(gone []string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range gone {
		delete(r.down, p)
	}
	return len(r.down) > 0
}

// sweepEvery is Run's pause before the next sweep: the fast rate while a down
// peer waits for its grace, the idle rate otherwise (never slower than fast).
func sweepEvery(fast, idle time.Duration, pending bool) time.Duration {
	if pending {
		return fast
	}
	return max(fast, idle)
}

// ErrRunArgs is returned by Run for a non-positive grace or tombstone TTL.
var ErrRunArgs = errors.New("dns replicator: grace and tombstone ttl must be positive")

// Run sweeps the store until ctx ends: every min(grace/4, 1s) while a peer
// reported down (PeerDown) has not expired or come up, it forgets the peers
// down for at least grace (Records.ExpirePeers); it drops tombstones older
// than tombstoneTTL (Records.ExpireTombstones) at the same sweeps, and every
// IdleSweep when no peer is down, so an idle peer is not woken every second.
// Time is the store's clock; the timer paces the sweeps only. A dead peer's
// records thus leave every answer within grace plus one interval. tombstoneTTL must exceed
// the longest partition whose removals must survive it (a live entry that
// comes back after its tombstone was dropped is answered by its owner with
// a new tombstone, or goes with its peer). Run returns nil when ctx ends.
func (r *Replicator) Run(ctx context.Context, grace, tombstoneTTL time.Duration) error {
	if grace <= 0 || tombstoneTTL <= 0 {
		return fmt.Errorf("%w: grace %v, tombstone ttl %v", ErrRunArgs, grace, tombstoneTTL)
	}
	fast := min(grace/4, time.Second)
	pending := r.pendingDown(nil)
	t := time.NewTimer(sweepEvery(fast, r.idleSweep, pending))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.wake:
			// A peer went down: sweep at the fast rate from now (no sweep yet, its grace
			// has just started).
			if !pending {
				pending = true
				t.Reset(fast)
			}
			continue
		case <-t.C:
		}
		gone := r.records.ExpirePeers(grace)
		if len(gone) > 0 {
			r.m.peersExpired.Add(float64(len(gone)))
			r.log.Info("dns: forgot the records of dead peers", "peers", gone, "grace", grace)
		}
		pending = r.pendingDown(gone)
		t.Reset(sweepEvery(fast, r.idleSweep, pending))
		if n := r.records.ExpireTombstones(tombstoneTTL); n > 0 {
			r.m.tombstonesExpired.Add(float64(n))
			r.log.Debug("dns: dropped old tombstones", "count", n)
		}
		if r.afterSweep != nil {
			r.afterSweep()
		}
	}
}

// replMetrics are the Replicator's metrics. They live here rather than in
// metrics.go because metrics.go holds the Server's, registered as one set.
type replMetrics struct {
	received          *prometheus.CounterVec // source: delta, state
	rejected          *prometheus.CounterVec // source
	refused           *prometheus.CounterVec // reason: Refused* constants
	merged            *prometheus.CounterVec // source; entries that changed the store
	sent              prometheus.Counter
	sentBytes         prometheus.Counter
	broadcastErrors   prometheus.Counter
	stateBytes        prometheus.Histogram
	peersExpired      prometheus.Counter
	tombstonesExpired prometheus.Counter
}

func newReplMetrics(reg prometheus.Registerer) (*replMetrics, error) {
	m := &replMetrics{
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_dns_replication_received_total",
			Help: "DNS gossip received: broadcast deltas and push/pull states.",
		}, []string{"source"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_dns_replication_rejected_total",
			Help: "DNS gossip dropped because it could not be decoded.",
		}, []string{"source"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_dns_replication_refused_entries_total",
			Help: "Received DNS entries refused, by reason: bad_signature, unknown_origin, future_version, origin_full, too_many_origins, forgotten_origin, after_forgery.",
		}, []string{"reason"}),
		merged: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_dns_replication_merged_entries_total",
			Help: "Received DNS entries that changed the local store.",
		}, []string{"source"}),
		sent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_replication_sent_total",
			Help: "DNS delta messages broadcast.",
		}),
		sentBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_replication_sent_bytes_total",
			Help: "Bytes of DNS delta messages broadcast.",
		}),
		broadcastErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_replication_broadcast_errors_total",
			Help: "DNS delta messages the mesh refused to broadcast.",
		}),
		stateBytes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "weft_dns_replication_state_bytes",
			Help:    "Size of the full DNS state sent in a push/pull.",
			Buckets: prometheus.ExponentialBuckets(1024, 4, 8),
		}),
		peersExpired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_replication_peers_expired_total",
			Help: "Dead peers whose DNS records were dropped after the grace period.",
		}),
		tombstonesExpired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_replication_tombstones_expired_total",
			Help: "DNS tombstones dropped after their time to live.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.received, m.rejected, m.refused, m.merged, m.sent, m.sentBytes,
		m.broadcastErrors, m.stateBytes, m.peersExpired, m.tombstonesExpired} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("dns replication metrics: %w", err)
		}
	}
	return m, nil
}
