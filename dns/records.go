package dns

import (
	"cmp"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weftnet/weft/mesh/identity"
)

// Records is the replicated record store of service DNS: for every owning
// peer, the names of its attached containers with their addresses (IPv4 and
// IPv6) and SRV entries.
//
// Replication model (CONVENTIONS #9, weaveworks/mesh style):
//
//   - Only the owning peer (Self) writes its entries. Every write gets a
//     version from the owner's clock, which is max(last+1, wall clock in µs),
//     so versions grow across restarts without persisted state.
//   - A removal is a tombstone: the same entry with Deleted set and a higher
//     version. For one key the higher version wins; on a tie the tombstone
//     wins. Merging is therefore commutative, associative and idempotent, and
//     replicas that saw the same set of entries answer the same.
//   - Merge returns only what changed, ready to be encoded and broadcast as a
//     delta; State/Encode give the full state for push/pull on (re)join.
//   - The owner is authoritative: when a live entry of its own that it does
//     not know comes back (from before a restart, or resurrected after its
//     tombstone was collected), it answers with a fresh tombstone.
//   - Dead peers: PeerDown marks a peer, ExpirePeers forgets peers that have
//     been down past a grace, ForgetPeer forgets one at once. Entries of a
//     forgotten peer are refused by Merge until PeerUp says it is back.
//
// Trust (a store made by NewSignedRecords): every entry, tombstones included,
// carries its origin's ed25519 signature, and Merge verifies each entry that
// would change the store against the key of the peer it names, whoever relayed
// it; so a member can add, change or tombstone only its own names. Entries
// that would change nothing are not verified (push/pull repeats mostly known
// entries), and verification runs outside the store's mutex, so queries never
// wait for it. Versions are bounded by now + MaxSkew (saturating, never above
// 2^62), so no version, signed or not, can freeze an owner's clock. Each origin
// holds at most MaxPerOrigin entries and the store at most MaxOrigins origins.
// A store made by NewRecords signs and verifies nothing (tests, simulations);
// bounds and caps still hold.
//
// All methods are safe for concurrent use.
type Records struct {
	self string
	now  func() time.Time
	// signer signs this peer's entries and keys looks up other origins' keys;
	// both nil in an unsigned store.
	signer       Signer
	keys         identity.KeyLookup
	maxSkew      time.Duration
	maxPerOrigin int
	maxOrigins   int

	mu sync.Mutex // guards the fields below
	// clock is the last version this peer gave one of its own entries.
	clock   uint64
	entries map[entryKey]*stored
	// byName and byAddr index entries (live and tombstones) for lookups.
	byName map[string]map[entryKey]struct{}
	byAddr map[netip.Addr]map[entryKey]struct{}
	// down holds peers reported dead, with the time they were reported.
	down map[string]time.Time
	// forgotten holds peers whose entries were dropped; Merge refuses their
	// entries until PeerUp; the value says whether Merge refused some.
	forgotten map[string]bool
	// perOrigin counts the entries (live and tombstones) of each origin; its
	// length is the number of origins. O(origins) memory.
	perOrigin map[string]int
	// unverified holds origins whose entries were refused because their key
	// was not known yet (at most maxOrigins of them); PeerUp reports them so
	// that the router syncs with them once their key arrives with their join.
	unverified map[string]struct{}
	// generation counts changes; the SOA serial is derived from it. It is
	// written under mu but read without it (Generation), so that the UDP fast
	// path can check its answer cache on every query without taking mu.
	generation atomic.Uint64
}

// Kind says what an Entry holds.
type Kind uint8

// Entry kinds.
const (
	KindAddr Kind = 1 // an A or AAAA record: Name → Addr
	KindSRV  Kind = 2 // an SRV record: _Service._Proto.Name → Port on Name
)

// Entry is one replicated record. Its identity (key) is everything but
// Version and Deleted.
type Entry struct {
	Peer    string     // owning peer
	Name    string     // container name, relative to the DNS domain, lower case
	Kind    Kind       // KindAddr or KindSRV
	Addr    netip.Addr // KindAddr: the address (unmapped)
	Service string     // KindSRV: service label without '_', e.g. "http"
	Proto   string     // KindSRV: "tcp" or "udp"
	Port    uint16     // KindSRV: port
	Version uint64     // owner's clock at the write
	Deleted bool       // a tombstone
	// Sig is the owner's ed25519 signature of the entry's other fields (in
	// RecordDomain), raw bytes held in a string so that Entry stays
	// comparable; empty in an unsigned store.
	Sig string
}

// Target is an address answered for a name, with the peer that owns it.
type Target struct {
	Addr netip.Addr
	Peer string
}

// Service is an SRV answer: a port on Name, owned by Peer.
type Service struct {
	Name string
	Port uint16
	Peer string
}

type entryKey struct {
	peer    string
	name    string
	kind    Kind
	addr    netip.Addr
	service string
	proto   string
	port    uint16
}

type stored struct {
	Entry
	// deletedAt is the local time a tombstone was stored, for ExpireTombstones.
	deletedAt time.Time
}

func (e *Entry) key() entryKey {
	return entryKey{peer: e.Peer, name: e.Name, kind: e.Kind, addr: e.Addr, service: e.Service, proto: e.Proto, port: e.Port}
}

// Sentinel errors of the record store and its codec.
var (
	ErrInvalidName  = errors.New("invalid dns name")
	ErrInvalidEntry = errors.New("invalid dns record")
	ErrDecode       = errors.New("cannot decode dns records")
	// ErrTooManyRecords: this peer already holds MaxPerOrigin entries.
	ErrTooManyRecords = errors.New("too many dns records for this peer")
	// ErrRecordsConfig is wrapped by NewSignedRecords' errors.
	ErrRecordsConfig = errors.New("invalid dns records config")
)

// RecordDomain is the signature domain of DNS entries (identity.Sign).
const RecordDomain = "weft dns record v1"

// Signer signs this peer's entries; *identity.Identity is one. Public is the
// key receivers verify them with; the store checks its own entries that come
// back through gossip against it. Both must be safe for concurrent use.
type Signer interface {
	Sign(domain string, msg []byte) []byte
	Public() ed25519.PublicKey
}

// Defaults of RecordsConfig.
const (
	// DefaultMaxSkew is how far ahead of the local clock a version may be, as
	// for link state: clocks of a cluster agree within seconds (NTP); five
	// minutes keeps a badly set clock working while bounding how far a
	// version can move anyone's clock.
	DefaultMaxSkew = 5 * time.Minute
	// DefaultMaxPerOrigin bounds one peer's entries, live and tombstones.
	// A container has one or two addresses and a few SRV entries, and a
	// host runs at most a few hundred containers (kubelet's limit is 110
	// pods by default, 250 recommended at most), and tombstones live ten
	// minutes: 4096 leaves room for ~1000 containers with churn while
	// bounding one member's share of every peer's memory (~1 MB) and of
	// every push/pull.
	DefaultMaxPerOrigin = 4096
	// DefaultMaxOrigins bounds the peers whose entries are held: above the
	// 5,000 hosts the design targets. With verification only members' keys
	// are known, so this is a second line behind the membership itself.
	DefaultMaxOrigins = 8192
)

// Reasons an entry is refused by Merge: the values of
// weft_dns_replication_refused_entries_total{reason}.
const (
	RefusedBadSignature   = "bad_signature"    // the signature is not the named origin's
	RefusedUnknownOrigin  = "unknown_origin"   // the origin's key is not known (yet)
	RefusedFutureVersion  = "future_version"   // version beyond now + MaxSkew
	RefusedOriginFull     = "origin_full"      // the origin holds MaxPerOrigin entries
	RefusedTooManyOrigins = "too_many_origins" // the store holds MaxOrigins origins
	RefusedForgotten      = "forgotten_origin" // the origin left; refused until it is back
	// RefusedAfterForgery: not verified, because the message already held
	// maxForgeries entries with bad signatures. Honest peers relay only
	// entries they verified, so a message with forgeries comes from a forger;
	// checking the rest would let it spend our CPU one verification at a time.
	RefusedAfterForgery = "after_forgery"
)

// maxForgeries is how many bad signatures one message may hold before the
// rest of it is refused unverified.
const maxForgeries = 8

// Refusals counts the entries Merge refused, by reason, with the first
// error naming what was wrong (for the log).
type Refusals struct {
	Counts map[string]int
	First  error
}

// Total is the number of entries refused.
func (f *Refusals) Total() int {
	n := 0
	for _, c := range f.Counts {
		n += c
	}
	return n
}

func (f *Refusals) add(reason string, err error) {
	if f.Counts == nil {
		f.Counts = make(map[string]int)
	}
	f.Counts[reason]++
	if f.First == nil {
		f.First = err
	}
}

// RecordsConfig configures a signed store.
type RecordsConfig struct {
	// Self is this peer's name (required).
	Self string
	// Now is the clock for versions, bounds and expiry; nil means time.Now.
	Now func() time.Time
	// Signer signs this peer's entries (required).
	Signer Signer
	// Keys returns an origin's public key, false when it is not known yet
	// (required; the mesh's PublicKey).
	Keys identity.KeyLookup
	// MaxSkew, MaxPerOrigin, MaxOrigins: zero means the default.
	MaxSkew      time.Duration
	MaxPerOrigin int
	MaxOrigins   int
}

// Limits on names; they keep every answer well inside DNS limits whatever
// the domain (up to 253-200 bytes) is.
const (
	maxNameLen  = 200
	maxLabelLen = 63
	maxPeerLen  = 255
	// maxVersion caps the owner's clock and the version bound, far above
	// any clock in µs (2^51 today), so that no version arithmetic can wrap.
	maxVersion = 1 << 62
)

// NewSignedRecords returns an empty store that signs this peer's entries and
// verifies every other entry before merging it. A peer uses this one.
func NewSignedRecords(cfg RecordsConfig) (*Records, error) {
	if cfg.Signer == nil || cfg.Keys == nil {
		return nil, fmt.Errorf("%w: a signer and a key lookup are required", ErrRecordsConfig)
	}
	if len(cfg.Signer.Public()) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("%w: signer's public key has %d bytes", ErrRecordsConfig, len(cfg.Signer.Public()))
	}
	if cfg.MaxSkew < 0 || cfg.MaxPerOrigin < 0 || cfg.MaxOrigins < 0 {
		return nil, fmt.Errorf("%w: negative bound (skew %v, per origin %d, origins %d)", ErrRecordsConfig, cfg.MaxSkew, cfg.MaxPerOrigin, cfg.MaxOrigins)
	}
	return newRecords(cfg)
}

// NewRecords returns an empty unsigned store owned by peer self: it signs
// nothing and trusts every entry it merges (tests and simulations; a peer
// uses NewSignedRecords). now is the clock used for versions, bounds,
// dead-peer and tombstone times; nil means time.Now.
func NewRecords(self string, now func() time.Time) (*Records, error) {
	return newRecords(RecordsConfig{Self: self, Now: now})
}

func newRecords(cfg RecordsConfig) (*Records, error) {
	if cfg.Self == "" || len(cfg.Self) > maxPeerLen {
		return nil, fmt.Errorf("%w: peer name %q", ErrInvalidEntry, cfg.Self)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxSkew == 0 {
		cfg.MaxSkew = DefaultMaxSkew
	}
	if cfg.MaxPerOrigin == 0 {
		cfg.MaxPerOrigin = DefaultMaxPerOrigin
	}
	if cfg.MaxOrigins == 0 {
		cfg.MaxOrigins = DefaultMaxOrigins
	}
	return &Records{
		self:         cfg.Self,
		now:          cfg.Now,
		signer:       cfg.Signer,
		keys:         cfg.Keys,
		maxSkew:      cfg.MaxSkew,
		maxPerOrigin: cfg.MaxPerOrigin,
		maxOrigins:   cfg.MaxOrigins,
		entries:      make(map[entryKey]*stored),
		byName:       make(map[string]map[entryKey]struct{}),
		byAddr:       make(map[netip.Addr]map[entryKey]struct{}),
		down:         make(map[string]time.Time),
		forgotten:    make(map[string]bool),
		perOrigin:    make(map[string]int),
		unverified:   make(map[string]struct{}),
	}, nil
}

// Self returns the name of the owning peer.
func (r *Records) Self() string { return r.self }

// NormalizeName lower-cases name, strips one trailing dot and checks it is a
// valid container name: 1-200 bytes of labels of 1-63 letters, digits, '-'
// or '_', the first label not starting with '_' (those are SRV names).
func NormalizeName(name string) (string, error) {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	if err := checkName(n); err != nil {
		return "", err
	}
	return n, nil
}

func checkName(n string) error {
	if n == "" || len(n) > maxNameLen {
		return fmt.Errorf("%w: %q: length must be 1-%d", ErrInvalidName, n, maxNameLen)
	}
	if n[0] == '_' {
		return fmt.Errorf("%w: %q: must not start with '_'", ErrInvalidName, n)
	}
	for _, l := range strings.Split(n, ".") {
		if l == "" || len(l) > maxLabelLen {
			return fmt.Errorf("%w: %q: label length must be 1-%d", ErrInvalidName, n, maxLabelLen)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("%w: %q: character %q not allowed", ErrInvalidName, n, c)
			}
		}
	}
	return nil
}

func checkLabel(what, s string) error {
	if s == "" || len(s) > maxLabelLen {
		return fmt.Errorf("%w: %s %q: length must be 1-%d", ErrInvalidEntry, what, s, maxLabelLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("%w: %s %q: character %q not allowed", ErrInvalidEntry, what, s, c)
		}
	}
	return nil
}

// validate checks an entry as it would arrive from the network.
func (e *Entry) validate() error {
	if e.Peer == "" || len(e.Peer) > maxPeerLen {
		return fmt.Errorf("%w: peer name length %d", ErrInvalidEntry, len(e.Peer))
	}
	if err := checkName(e.Name); err != nil {
		return err
	}
	// Too high a version is well-formed: Merge refuses it against its bound
	// (now + MaxSkew), counted as future_version.
	if e.Version == 0 {
		return fmt.Errorf("%w: %q: version 0", ErrInvalidEntry, e.Name)
	}
	if len(e.Sig) != 0 && len(e.Sig) != ed25519.SignatureSize {
		return fmt.Errorf("%w: %q: signature of %d bytes", ErrInvalidEntry, e.Name, len(e.Sig))
	}
	switch e.Kind {
	case KindAddr:
		if !e.Addr.IsValid() || e.Addr.Is4In6() || e.Addr.Zone() != "" {
			return fmt.Errorf("%w: %q: address %v", ErrInvalidEntry, e.Name, e.Addr)
		}
		if e.Service != "" || e.Proto != "" || e.Port != 0 {
			return fmt.Errorf("%w: %q: address record with service fields", ErrInvalidEntry, e.Name)
		}
	case KindSRV:
		if e.Addr.IsValid() {
			return fmt.Errorf("%w: %q: srv record with an address", ErrInvalidEntry, e.Name)
		}
		if err := checkLabel("service", e.Service); err != nil {
			return err
		}
		if e.Proto != "tcp" && e.Proto != "udp" {
			return fmt.Errorf("%w: %q: proto %q (want tcp or udp)", ErrInvalidEntry, e.Name, e.Proto)
		}
		if e.Port == 0 {
			return fmt.Errorf("%w: %q: port 0", ErrInvalidEntry, e.Name)
		}
	default:
		return fmt.Errorf("%w: %q: kind %d", ErrInvalidEntry, e.Name, e.Kind)
	}
	return nil
}

// nextVersionLocked returns a fresh version for an entry of self:
// max(clock+1, wall clock in µs), saturating at maxVersion. The clock only
// ever takes versions within the bound (versionLimit), so it stays near the
// wall clock and the saturation is a guard, never reached in practice.
func (r *Records) nextVersionLocked() uint64 {
	v := min(r.clock, maxVersion-1) + 1
	if w := r.now().UnixMicro(); w > 0 && uint64(w) > v {
		v = min(uint64(w), maxVersion)
	}
	r.clock = v
	return v
}

// versionLimit is the highest version accepted from gossip: now + maxSkew
// in µs, saturating, never above maxVersion.
func (r *Records) versionLimit() uint64 {
	now := uint64(max(r.now().UnixMicro(), 0))
	lim := now + uint64(r.maxSkew.Microseconds())
	if lim < now || lim > maxVersion {
		return maxVersion
	}
	return lim
}

// stampLocked makes e an entry of self with a fresh version, and signs it.
func (r *Records) stampLocked(e *Entry) {
	e.Peer = r.self
	e.Version = r.nextVersionLocked()
	e.Sig = ""
	if r.signer != nil {
		e.Sig = string(r.signer.Sign(RecordDomain, e.signedBytes()))
	}
}

// signedBytes is what the owner signs: the entry's wire form without its
// signature, so that every field (version and tombstone flag included) is
// covered.
func (e *Entry) signedBytes() []byte {
	return appendEntryBody(make([]byte, 0, 64), *e)
}

// writeLocal stores local writes of es (Version and Sig are set here) and
// returns those that changed the store as a delta. It writes all or nothing:
// when the new keys would take this peer past maxPerOrigin, it returns
// ErrTooManyRecords and changes nothing.
func (r *Records) writeLocal(es ...Entry) (*Delta, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	todo := make([]Entry, 0, len(es))
	fresh := 0
	for _, e := range es {
		e.Peer = r.self
		if slices.ContainsFunc(todo, func(t Entry) bool { return t.key() == e.key() }) {
			continue // the same entry twice in one call (O(len(es)²), a handful)
		}
		cur, ok := r.entries[e.key()]
		if ok && cur.Deleted == e.Deleted || !ok && e.Deleted {
			continue
		}
		if !ok {
			fresh++
		}
		todo = append(todo, e)
	}
	if n := r.perOrigin[r.self]; n+fresh > r.maxPerOrigin {
		return nil, fmt.Errorf("%w: %d held, %d more would pass %d", ErrTooManyRecords, n, fresh, r.maxPerOrigin)
	}
	d := &Delta{entries: make([]Entry, 0, len(todo))}
	for _, e := range todo {
		r.stampLocked(&e)
		r.putLocked(e)
		d.entries = append(d.entries, e)
	}
	d.sort()
	return d, nil
}

// AddAddr registers addr for name on this peer and returns the delta to
// broadcast (empty if it was already there).
func (r *Records) AddAddr(name string, addr netip.Addr) (*Delta, error) {
	e, err := addrEntry(name, addr)
	if err != nil {
		return nil, err
	}
	return r.writeLocal(e)
}

// RemoveAddr removes addr from name on this peer (a tombstone) and returns the
// delta to broadcast (empty if it was not there).
func (r *Records) RemoveAddr(name string, addr netip.Addr) (*Delta, error) {
	e, err := addrEntry(name, addr)
	if err != nil {
		return nil, err
	}
	e.Deleted = true
	return r.writeLocal(e)
}

func addrEntry(name string, addr netip.Addr) (Entry, error) {
	n, err := NormalizeName(name)
	if err != nil {
		return Entry{}, err
	}
	addr = addr.Unmap().WithZone("")
	if !addr.IsValid() {
		return Entry{}, fmt.Errorf("%w: %q: invalid address", ErrInvalidEntry, n)
	}
	return Entry{Name: n, Kind: KindAddr, Addr: addr}, nil
}

// AddSRV registers the SRV entry _service._proto.name → port on this peer
// and returns the delta to broadcast (empty if it was already there).
func (r *Records) AddSRV(name, service, proto string, port uint16) (*Delta, error) {
	e, err := srvEntry(name, service, proto, port)
	if err != nil {
		return nil, err
	}
	return r.writeLocal(e)
}

// SRV is one SRV entry of a name: _Service._Proto.name → Port.
type SRV struct {
	Service string
	Proto   string
	Port    uint16
}

// CheckSRV says what is wrong with an SRV entry for name, before anything is
// published.
func CheckSRV(name string, s SRV) error {
	_, err := srvEntry(name, s.Service, s.Proto, s.Port)
	return err
}

// AddName registers addrs and srvs under name on this peer at once: every
// entry is checked first and, when one is invalid or the peer's cap would be
// passed, nothing is stored. It returns the delta to broadcast.
func (r *Records) AddName(name string, addrs []netip.Addr, srvs []SRV) (*Delta, error) {
	es := make([]Entry, 0, len(addrs)+len(srvs))
	for _, a := range addrs {
		e, err := addrEntry(name, a)
		if err != nil {
			return nil, err
		}
		es = append(es, e)
	}
	for _, s := range srvs {
		e, err := srvEntry(name, s.Service, s.Proto, s.Port)
		if err != nil {
			return nil, err
		}
		es = append(es, e)
	}
	if len(es) == 0 {
		if _, err := NormalizeName(name); err != nil {
			return nil, err
		}
	}
	return r.writeLocal(es...)
}

// RemoveSRV removes an SRV entry of this peer and returns the delta.
func (r *Records) RemoveSRV(name, service, proto string, port uint16) (*Delta, error) {
	e, err := srvEntry(name, service, proto, port)
	if err != nil {
		return nil, err
	}
	e.Deleted = true
	return r.writeLocal(e)
}

func srvEntry(name, service, proto string, port uint16) (Entry, error) {
	n, err := NormalizeName(name)
	if err != nil {
		return Entry{}, err
	}
	e := Entry{
		Peer:    "x", // checked by validate, replaced by writeLocal
		Name:    n,
		Kind:    KindSRV,
		Service: strings.ToLower(strings.TrimPrefix(service, "_")),
		Proto:   strings.ToLower(strings.TrimPrefix(proto, "_")),
		Port:    port,
		Version: 1,
	}
	if err := e.validate(); err != nil {
		return Entry{}, err
	}
	e.Peer, e.Version = "", 0
	return e, nil
}

// RemoveName removes every live entry (addresses and SRV) of name owned by
// this peer, as on container detach, and returns the delta to broadcast.
func (r *Records) RemoveName(name string) (*Delta, error) {
	n, err := NormalizeName(name)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	d := &Delta{}
	for k := range r.byName[n] {
		s := r.entries[k]
		if s.Peer != r.self || s.Deleted {
			continue
		}
		e := s.Entry
		e.Deleted = true
		r.stampLocked(&e)
		r.putLocked(e)
		d.entries = append(d.entries, e)
	}
	d.sort()
	return d, nil
}

// putLocked stores e, replacing any entry with the same key.
func (r *Records) putLocked(e Entry) {
	k := e.key()
	s := &stored{Entry: e}
	if e.Deleted {
		s.deletedAt = r.now()
	}
	if _, ok := r.entries[k]; !ok {
		r.perOrigin[e.Peer]++
	}
	r.entries[k] = s
	addIndex(r.byName, e.Name, k)
	if e.Kind == KindAddr {
		addIndex(r.byAddr, e.Addr, k)
	}
	r.generation.Add(1)
}

func (r *Records) deleteLocked(k entryKey) {
	if _, ok := r.entries[k]; !ok {
		return
	}
	if r.perOrigin[k.peer]--; r.perOrigin[k.peer] <= 0 {
		delete(r.perOrigin, k.peer)
	}
	delete(r.entries, k)
	delIndex(r.byName, k.name, k)
	if k.kind == KindAddr {
		delIndex(r.byAddr, k.addr, k)
	}
	r.generation.Add(1)
}

func addIndex[K comparable](idx map[K]map[entryKey]struct{}, at K, k entryKey) {
	m := idx[at]
	if m == nil {
		m = make(map[entryKey]struct{})
		idx[at] = m
	}
	m[k] = struct{}{}
}

func delIndex[K comparable](idx map[K]map[entryKey]struct{}, at K, k entryKey) {
	if m := idx[at]; m != nil {
		delete(m, k)
		if len(m) == 0 {
			delete(idx, at)
		}
	}
}

// wins reports whether a replaces b for the same key.
func wins(a, b Entry) bool {
	if a.Version != b.Version {
		return a.Version > b.Version
	}
	return a.Deleted && !b.Deleted
}

// Merge merges d into the store and returns the entries that changed it (to
// broadcast onwards), sorted; the result is empty when nothing changed. It
// never returns nil. Refused entries (MergeChecked says why) change nothing.
func (r *Records) Merge(d *Delta) *Delta {
	changed, _ := r.MergeChecked(d)
	return changed
}

// MergeChecked is Merge, also reporting the entries it refused and why.
//
// It runs in three steps so that signatures are never checked under the
// store's mutex (queries take it): a locked pass keeps the entries that
// would change the store and are within the version bound (O(len(d))); an
// unlocked pass verifies their signatures (one ed25519 verification per
// entry that would change something, none for what is already known); a
// locked pass applies them, checking again what may have moved meanwhile,
// and enforces the caps.
func (r *Records) MergeChecked(d *Delta) (*Delta, Refusals) {
	changed := &Delta{}
	var ref Refusals
	if d.Empty() {
		return changed, ref
	}
	cands := r.candidates(d, &ref)
	cands = r.verify(cands, &ref)
	if len(cands) == 0 {
		return changed, ref
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range cands {
		if c.unknown {
			// Remembered (bounded) so that PeerUp asks for a sync once the
			// origin's key arrives with its join.
			if _, ok := r.unverified[c.e.Peer]; ok || len(r.unverified) < r.maxOrigins {
				r.unverified[c.e.Peer] = struct{}{}
			}
			continue
		}
		e := c.e
		if _, gone := r.forgotten[e.Peer]; gone {
			r.forgotten[e.Peer] = true
			ref.add(RefusedForgotten, fmt.Errorf("%w: %q of peer %q: the peer left", ErrInvalidEntry, e.Name, e.Peer))
			continue
		}
		k := e.key()
		cur, ok := r.entries[k]
		if ok && !wins(e, cur.Entry) {
			continue
		}
		if !ok {
			if err := r.roomLocked(e.Peer); err != nil {
				reason := RefusedOriginFull
				if _, known := r.perOrigin[e.Peer]; !known {
					reason = RefusedTooManyOrigins
				}
				ref.add(reason, err)
				continue
			}
		}
		if e.Peer == r.self {
			// Verified as ours and within the bound: the clock may follow it
			// (never past now + maxSkew).
			r.clock = max(r.clock, e.Version)
			if t, reassert := r.ownerAnswerLocked(e, cur, ok); reassert {
				r.putLocked(t)
				changed.entries = append(changed.entries, t)
				continue
			}
		}
		r.putLocked(e)
		changed.entries = append(changed.entries, e)
	}
	changed.sort()
	return changed, ref
}

// candidate is an entry that would change the store; unknown marks one whose
// origin's key is not known.
type candidate struct {
	e       Entry
	unknown bool
}

// candidates keeps d's entries that would change the store, are within the
// version bound and fit the caps (counting the message's own new entries, so
// that no more are verified than could be kept). Locked; O(len(d)).
func (r *Records) candidates(d *Delta, ref *Refusals) []candidate {
	limit := r.versionLimit()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []candidate
	var fresh map[string]int // new entries of each origin in d
	for _, e := range d.entries {
		if _, gone := r.forgotten[e.Peer]; gone {
			r.forgotten[e.Peer] = true
			ref.add(RefusedForgotten, fmt.Errorf("%w: %q of peer %q: the peer left", ErrInvalidEntry, e.Name, e.Peer))
			continue
		}
		if e.Version > limit {
			ref.add(RefusedFutureVersion, fmt.Errorf("%w: %q of peer %q: version %d is more than %v ahead of our clock (limit %d)",
				ErrInvalidEntry, e.Name, e.Peer, e.Version, r.maxSkew, limit))
			continue
		}
		cur, ok := r.entries[e.key()]
		if ok && !wins(e, cur.Entry) {
			continue // known: nothing to verify
		}
		if !ok {
			held, known := r.perOrigin[e.Peer]
			n, seen := fresh[e.Peer]
			switch {
			case !known && !seen && e.Peer != r.self && len(r.perOrigin)+len(fresh) >= r.maxOrigins:
				ref.add(RefusedTooManyOrigins, fmt.Errorf("%w: peer %q: already holding entries of %d peers", ErrInvalidEntry, e.Peer, r.maxOrigins))
				continue
			case held+n >= r.maxPerOrigin:
				ref.add(RefusedOriginFull, fmt.Errorf("%w: peer %q would have more than %d entries", ErrInvalidEntry, e.Peer, r.maxPerOrigin))
				continue
			}
			if fresh == nil {
				fresh = make(map[string]int)
			}
			fresh[e.Peer]++
		}
		out = append(out, candidate{e: e})
	}
	return out
}

// verify drops the candidates whose signature is not their origin's, and
// marks those whose origin's key is unknown. Unlocked; one ed25519
// verification per candidate. An unsigned store trusts them all.
func (r *Records) verify(cands []candidate, ref *Refusals) []candidate {
	if r.keys == nil {
		return cands
	}
	out := cands[:0]
	forged := 0
	for _, c := range cands {
		e := &c.e
		if forged >= maxForgeries {
			ref.add(RefusedAfterForgery, fmt.Errorf("%w: %q of peer %q: not checked after %d forged entries", ErrInvalidEntry, e.Name, e.Peer, forged))
			continue
		}
		var pub ed25519.PublicKey
		var ok bool
		if e.Peer == r.self {
			pub, ok = r.signer.Public(), true
		} else {
			pub, ok = r.keys(e.Peer)
		}
		switch {
		case !ok:
			ref.add(RefusedUnknownOrigin, fmt.Errorf("%w: %q of peer %q: the peer's key is not known yet", ErrInvalidEntry, e.Name, e.Peer))
			c.unknown = true
		case !identity.Verify(pub, RecordDomain, e.signedBytes(), []byte(e.Sig)):
			ref.add(RefusedBadSignature, fmt.Errorf("%w: %q of peer %q version %d: not signed by the peer", ErrInvalidEntry, e.Name, e.Peer, e.Version))
			forged++
			continue
		}
		out = append(out, c)
	}
	return out
}

// roomLocked says whether a new entry of origin fits the caps.
func (r *Records) roomLocked(origin string) error {
	n, known := r.perOrigin[origin]
	switch {
	case !known && origin != r.self && len(r.perOrigin) >= r.maxOrigins:
		return fmt.Errorf("%w: peer %q: already holding entries of %d peers", ErrInvalidEntry, origin, r.maxOrigins)
	case n >= r.maxPerOrigin:
		return fmt.Errorf("%w: peer %q already has %d entries", ErrInvalidEntry, origin, n)
	}
	return nil
}

// ownerAnswerLocked decides what this peer, the owner, does with a newer
// entry of its own from gossip (owner authority). A live entry it does not
// have is stale (from before a restart, or resurrected after its tombstone
// was collected): answer with a tombstone. An entry whose state (live or
// deleted) differs from ours, at a higher version: re-assert ours at a newer
// version. Otherwise (a tombstone of ours we do not hold, or our own state at
// a higher version) it is taken as is.
func (r *Records) ownerAnswerLocked(e Entry, cur *stored, have bool) (Entry, bool) {
	switch {
	case !have && !e.Deleted:
		t := e
		t.Deleted = true
		r.stampLocked(&t)
		return t, true
	case have && cur.Deleted != e.Deleted:
		t := cur.Entry
		r.stampLocked(&t)
		return t, true
	}
	return Entry{}, false
}

// MergeBytes decodes an encoded delta or full state and merges it. Garbage
// gives an error wrapping ErrDecode and changes nothing.
func (r *Records) MergeBytes(b []byte) (*Delta, error) {
	d, err := DecodeDelta(b)
	if err != nil {
		return nil, err
	}
	return r.Merge(d), nil
}

// State returns the full state (live entries and tombstones), sorted.
func (r *Records) State() *Delta {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := &Delta{entries: make([]Entry, 0, len(r.entries))}
	for _, s := range r.entries {
		d.entries = append(d.entries, s.Entry)
	}
	d.sort()
	return d
}

// Encode returns the full state, encoded (for push/pull on join).
func (r *Records) Encode() []byte { return r.State().Encode() }

// Generation returns a counter that grows with every change to the store.
// It does not take the store's lock.
func (r *Records) Generation() uint64 {
	return r.generation.Load()
}

// Len returns the number of live entries.
func (r *Records) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, s := range r.entries {
		if !s.Deleted {
			n++
		}
	}
	return n
}

// PeerDown records that peer was reported dead (by membership); its entries
// keep being answered until ExpirePeers forgets it past the grace.
func (r *Records) PeerDown(peer string) {
	if peer == r.self {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.down[peer]; !ok {
		r.down[peer] = r.now()
	}
}

// PeerUp records that peer is alive (again): it is no longer down, and its
// entries are accepted by Merge again if it had been forgotten. It reports
// whether Merge refused entries of peer meanwhile (forgotten, or its key not
// known yet): only then is a state exchange with it needed to get them again.
func (r *Records) PeerUp(peer string) (refused bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, unverified := r.unverified[peer]
	refused = r.forgotten[peer] || unverified
	delete(r.down, peer)
	delete(r.forgotten, peer)
	delete(r.unverified, peer)
	return refused
}

// ExpirePeers forgets every peer that has been down for at least grace and
// returns their names, sorted. Call it periodically: a dead peer's records
// then leave every answer within grace plus the period.
func (r *Records) ExpirePeers(grace time.Duration) []string {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	var gone []string
	for p, at := range r.down {
		if now.Sub(at) >= grace {
			gone = append(gone, p)
		}
	}
	slices.Sort(gone)
	for _, p := range gone {
		r.forgetLocked(p)
	}
	return gone
}

// ForgetPeer drops every entry of peer at once and refuses its entries in
// Merge until PeerUp. It reports whether anything was dropped. Forgetting
// self is refused.
func (r *Records) ForgetPeer(peer string) bool {
	if peer == r.self {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.forgetLocked(peer)
}

func (r *Records) forgetLocked(peer string) bool {
	delete(r.down, peer)
	delete(r.unverified, peer)
	r.forgotten[peer] = false
	dropped := false
	for k := range r.entries {
		if k.peer == peer {
			r.deleteLocked(k)
			dropped = true
		}
	}
	return dropped
}

// ExpireTombstones drops tombstones stored at least maxAge ago and returns
// how many. maxAge must exceed the time a removal takes to reach every peer
// (including partitions one wants to survive); a live entry that comes back
// later is then answered by its owner with a new tombstone, or dropped with
// its peer.
func (r *Records) ExpireTombstones(maxAge time.Duration) int {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for k, s := range r.entries {
		if s.Deleted && now.Sub(s.deletedAt) >= maxAge {
			r.deleteLocked(k)
			n++
		}
	}
	return n
}

// LookupName returns the live addresses of name (normalized by the caller
// or not), sorted by address then peer, and whether the name is known at all
// (any live address or SRV entry).
func (r *Records) LookupName(name string) (targets []Target, known bool) {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.byName[n] {
		s := r.entries[k]
		if s.Deleted {
			continue
		}
		known = true
		if s.Kind == KindAddr {
			targets = append(targets, Target{Addr: s.Addr, Peer: s.Peer})
		}
	}
	slices.SortFunc(targets, func(a, b Target) int {
		if c := a.Addr.Compare(b.Addr); c != 0 {
			return c
		}
		return strings.Compare(a.Peer, b.Peer)
	})
	// One address owned by two peers (a stale entry during a handover) is
	// answered once.
	targets = slices.CompactFunc(targets, func(a, b Target) bool { return a.Addr == b.Addr })
	return targets, known
}

// LookupAddr returns the names with a live entry for addr, sorted.
func (r *Records) LookupAddr(addr netip.Addr) []string {
	addr = addr.Unmap().WithZone("")
	r.mu.Lock()
	defer r.mu.Unlock()
	var names []string
	for k := range r.byAddr[addr] {
		if s := r.entries[k]; !s.Deleted {
			names = append(names, s.Name)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// LookupSRV returns the live SRV entries _service._proto.name, sorted by
// port then peer.
func (r *Records) LookupSRV(name, service, proto string) []Service {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	service, proto = strings.ToLower(service), strings.ToLower(proto)
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Service
	for k := range r.byName[n] {
		s := r.entries[k]
		if s.Deleted || s.Kind != KindSRV || s.Service != service || s.Proto != proto {
			continue
		}
		out = append(out, Service{Name: s.Name, Port: s.Port, Peer: s.Peer})
	}
	slices.SortFunc(out, func(a, b Service) int {
		return cmp.Or(cmp.Compare(a.Port, b.Port), strings.Compare(a.Peer, b.Peer))
	})
	return out
}
