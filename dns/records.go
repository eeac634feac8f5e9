package dns

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
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
// All methods are safe for concurrent use.
type Records struct {
	self string
	now  func() time.Time

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
)

// Limits on names; they keep every answer well inside DNS limits whatever
// the domain (up to 253-200 bytes) is.
const (
	maxNameLen  = 200
	maxLabelLen = 63
	maxPeerLen  = 255
	// maxVersion bounds versions far above any clock in µs (2^51 today) so
	// that the owner's clock can never wrap.
	maxVersion = 1 << 62
)

// NewRecords returns an empty store owned by peer self. now is the clock used
// for versions, dead-peer and tombstone times; nil means time.Now.
func NewRecords(self string, now func() time.Time) (*Records, error) {
	if self == "" || len(self) > maxPeerLen {
		return nil, fmt.Errorf("%w: peer name %q", ErrInvalidEntry, self)
	}
	if now == nil {
		now = time.Now
	}
	return &Records{
		self:      self,
		now:       now,
		entries:   make(map[entryKey]*stored),
		byName:    make(map[string]map[entryKey]struct{}),
		byAddr:    make(map[netip.Addr]map[entryKey]struct{}),
		down:      make(map[string]time.Time),
		forgotten: make(map[string]bool),
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
	if e.Version == 0 || e.Version > maxVersion {
		return fmt.Errorf("%w: %q: version %d out of range", ErrInvalidEntry, e.Name, e.Version)
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

// nextVersionLocked returns a fresh version for an entry of self.
func (r *Records) nextVersionLocked() uint64 {
	v := r.clock + 1
	if w := r.now().UnixMicro(); w > 0 && uint64(w) > v {
		v = uint64(w)
	}
	r.clock = v
	return v
}

// writeLocal stores a local write of e (Version is set here) and returns it
// as a delta, or an empty delta when nothing changed.
func (r *Records) writeLocal(e Entry) *Delta {
	e.Peer = r.self
	r.mu.Lock()
	defer r.mu.Unlock()
	if cur, ok := r.entries[e.key()]; ok && cur.Deleted == e.Deleted {
		return &Delta{}
	} else if !ok && e.Deleted {
		return &Delta{}
	}
	e.Version = r.nextVersionLocked()
	r.putLocked(e)
	return &Delta{entries: []Entry{e}}
}

// AddAddr registers addr for name on this peer and returns the delta to
// broadcast (empty if it was already there).
func (r *Records) AddAddr(name string, addr netip.Addr) (*Delta, error) {
	e, err := addrEntry(name, addr)
	if err != nil {
		return nil, err
	}
	return r.writeLocal(e), nil
}

// RemoveAddr removes addr from name on this peer (a tombstone) and returns the
// delta to broadcast (empty if it was not there).
func (r *Records) RemoveAddr(name string, addr netip.Addr) (*Delta, error) {
	e, err := addrEntry(name, addr)
	if err != nil {
		return nil, err
	}
	e.Deleted = true
	return r.writeLocal(e), nil
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
	return r.writeLocal(e), nil
}

// RemoveSRV removes an SRV entry of this peer and returns the delta.
func (r *Records) RemoveSRV(name, service, proto string, port uint16) (*Delta, error) {
	e, err := srvEntry(name, service, proto, port)
	if err != nil {
		return nil, err
	}
	e.Deleted = true
	return r.writeLocal(e), nil
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
		e.Version = r.nextVersionLocked()
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
	r.entries[k] = s
	addIndex(r.byName, e.Name, k)
	if e.Kind == KindAddr {
		addIndex(r.byAddr, e.Addr, k)
	}
	r.generation.Add(1)
}

func (r *Records) deleteLocked(k entryKey) {
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
// never returns nil. Entries of forgotten peers are ignored.
func (r *Records) Merge(d *Delta) *Delta {
	changed := &Delta{}
	if d == nil {
		return changed
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range d.entries {
		if _, gone := r.forgotten[e.Peer]; gone {
			r.forgotten[e.Peer] = true
			continue
		}
		k := e.key()
		cur, ok := r.entries[k]
		if e.Peer == r.self {
			if e.Version > r.clock {
				r.clock = e.Version
			}
			if !ok && !e.Deleted {
				// Owner authority: a live entry of ours that we don't
				// have is stale; answer it with a tombstone.
				t := e
				t.Deleted = true
				t.Version = r.nextVersionLocked()
				r.putLocked(t)
				changed.entries = append(changed.entries, t)
				continue
			}
		}
		if ok && !wins(e, cur.Entry) {
			continue
		}
		r.putLocked(e)
		changed.entries = append(changed.entries, e)
	}
	changed.sort()
	return changed
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
// whether Merge refused entries of peer meanwhile: only then is a state
// exchange with it needed to get them again.
func (r *Records) PeerUp(peer string) (refused bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	refused = r.forgotten[peer]
	delete(r.down, peer)
	delete(r.forgotten, peer)
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
