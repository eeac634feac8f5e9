package sriov

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sort"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

// Errors of the pool.
var (
	// ErrNoFreeVF: the PF has no free VF of the asked kind (the CNI layer maps it to error 11,
	// "try again later").
	ErrNoFreeVF = errors.New("no free vf")
	// ErrBadOwner: an owner without a container ID or interface name.
	ErrBadOwner = errors.New("invalid vf owner")
	// ErrBadVF: a discovered VF the pool will not record (bad PCI address, wrong PF).
	ErrBadVF = errors.New("invalid vf")
	// ErrUnknownVF: no record for that PCI address.
	ErrUnknownVF = errors.New("unknown vf")
	// ErrNotOwner: the record belongs to someone else (or no one): a stale DEL must leave
	// the new owner's VF alone (sriov-cni #219).
	ErrNotOwner = errors.New("vf not owned by that owner")
	// ErrWrongState: the record is not in a state that allows the operation.
	ErrWrongState = errors.New("vf in wrong state")
	// ErrOwnerConflict: the owner already holds a VF that does not fit the new request
	// (another PF or the other kind).
	ErrOwnerConflict = errors.New("owner already holds another vf")
)

var bucketSRIOV = []byte("sriov")

// pciAddr is a PCI address as sysfs spells it: domain:bus:device.function.
var pciAddr = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$`)

// State is where a VF stands in the pool.
type State string

const (
	// StateFree: in the host, nobody's; Reserve may hand it out.
	StateFree State = "free"
	// StateReserved: handed to an owner whose ADD has not finished; persisted before the
	// kernel is touched, so a crash leaves a record that Pending reports.
	StateReserved State = "reserved"
	// StateAttached: the owner's ADD finished.
	StateAttached State = "attached"
	// StateQuarantined: the VF's netdev went away with its owner's netns (or its record was
	// unreadable); unusable until Found sees it back in the host.
	StateQuarantined State = "quarantined"
)

var states = []State{StateFree, StateReserved, StateAttached, StateQuarantined}

// Owner is the CNI attachment that holds a VF. ContainerID plus IfName identify it;
// CNINetwork scopes GC; NetNS is kept for restore and diagnostics.
type Owner struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
	CNINetwork  string `json:"cni_network,omitempty"`
	NetNS       string `json:"netns,omitempty"`
}

func (o Owner) same(p Owner) bool { return o.ContainerID == p.ContainerID && o.IfName == p.IfName }

func (o Owner) valid() bool { return o.ContainerID != "" && o.IfName != "" }

func (o Owner) String() string { return o.ContainerID + "/" + o.IfName }

// Record is the pool's entry for one VF, keyed by its PCI address.
type Record struct {
	VF    VF    `json:"vf"`
	State State `json:"state"`
	// Owner is zero for a free VF.
	Owner Owner `json:"owner"`
	// Saved is the VF's state before the owner's ADD touched it; nil until SaveState.
	Saved *NetdevState `json:"saved,omitempty"`
	// Missing: the last Sync of the VF's PF did not find it; kept because it is owned.
	Missing bool `json:"missing,omitempty"`
}

// clone deep-copies r so callers never share the pool's MAC slices.
func (r Record) clone() Record {
	if r.Saved != nil {
		s := *r.Saved
		s.MAC = append([]byte(nil), r.Saved.MAC...)
		r.Saved = &s
	}
	return r
}

// usable reports whether a free record can be handed out for the asked kind: a netdev VF
// must show its netdev in the host (one without is lost somewhere: sriov-cni #349, #447); a
// DPDK VF must be bound to a userspace driver.
func (r Record) usable(dpdk bool) bool {
	if r.State != StateFree || r.Missing {
		return false
	}
	if dpdk {
		return r.VF.DPDK()
	}
	return !r.VF.DPDK() && r.VF.Driver != "" && r.VF.Netdev != ""
}

// freed is r made free after its owner's VF was restored. The netdev is back under its saved
// name, so the record says so at once: otherwise the VF, last discovered inside the
// container with no host netdev, would stay unusable until the next Sync.
func freed(r Record) Record {
	n := r.clone()
	if n.Saved != nil && n.Saved.Name != "" && !n.VF.DPDK() {
		n.VF.Netdev = n.Saved.Name
	}
	n.State, n.Owner, n.Saved = StateFree, Owner{}, nil
	return n
}

// PoolConfig configures a Pool.
type PoolConfig struct {
	// DB holds the pool in bucket "sriov"; it is opened and closed by the caller.
	DB     *bolt.DB
	Logger *slog.Logger
	// Registry receives the pool's metrics; nil means none.
	Registry prometheus.Registerer
}

// Pool hands each VF of this peer to at most one owner and remembers it across restarts.
// Every change is written to the DB in one transaction before it is applied in memory and
// before the method returns. Safe for concurrent use.
type Pool struct {
	db  *bolt.DB
	log *slog.Logger

	refused *prometheus.CounterVec // reserve refusals by reason
	corrupt prometheus.Counter     // unreadable records found at load

	// mu guards records and serialises every write, so the check and the write of a
	// reservation are one step: no VF goes to two owners.
	mu      sync.Mutex
	records map[string]Record // PCI address → record
}

// NewPool loads the pool from cfg.DB. Unreadable records are logged, counted and loaded as
// quarantined VFs of unknown owner (their VF may be inside a container), never handed out
// until Found.
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.DB == nil {
		return nil, errors.New("sriov pool: no database")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Pool{
		db:      cfg.DB,
		log:     log,
		records: map[string]Record{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_sriov_reserve_refused_total",
			Help: "VF reservations refused, by reason (no_free_vf, bad_owner, owner_conflict, store).",
		}, []string{"reason"}),
		corrupt: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_sriov_records_corrupt_total",
			Help: "Unreadable VF records found in the database (kept quarantined).",
		}),
	}
	err := cfg.DB.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketSRIOV)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			pci := string(k)
			if !pciAddr.MatchString(pci) {
				p.corrupt.Inc()
				log.Warn("sriov: record with invalid pci address key ignored", "key", fmt.Sprintf("%q", k))
				return nil
			}
			r, err := decodeRecord(pci, v)
			if err != nil {
				p.corrupt.Inc()
				log.Warn("sriov: unreadable vf record, vf quarantined", "pci", pci, "err", err)
				r = Record{VF: VF{PCI: pci}, State: StateQuarantined}
			}
			p.records[pci] = r
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("load sriov pool: %w", err)
	}
	if cfg.Registry != nil {
		for _, c := range []prometheus.Collector{p.refused, p.corrupt, vfCollector{p}} {
			if err := cfg.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("register sriov metrics: %w", err)
			}
		}
	}
	return p, nil
}

// decodeRecord parses and checks one stored record.
func decodeRecord(pci string, v []byte) (Record, error) {
	var r Record
	if err := json.Unmarshal(v, &r); err != nil {
		return Record{}, err
	}
	if r.VF.PCI != pci {
		return Record{}, fmt.Errorf("record names pci %q under key %q", r.VF.PCI, pci)
	}
	switch r.State {
	case StateFree:
		if r.Owner != (Owner{}) {
			return Record{}, errors.New("free record with an owner")
		}
	case StateReserved, StateAttached:
		if !r.Owner.valid() {
			return Record{}, fmt.Errorf("%s record without a valid owner", r.State)
		}
	case StateQuarantined:
	default:
		return Record{}, fmt.Errorf("unknown state %q", r.State)
	}
	return r, nil
}

// put writes the records in one transaction, then applies them in memory. Callers hold mu.
func (p *Pool) put(rs ...Record) error {
	return p.write(rs, nil)
}

// write stores rs and deletes the records of del in one transaction, then applies both in
// memory. Callers hold mu.
func (p *Pool) write(rs []Record, del []string) error {
	vals := make([][]byte, len(rs))
	for i, r := range rs {
		v, err := json.Marshal(r)
		if err != nil {
			return fmt.Errorf("encode vf record %s: %w", r.VF.PCI, err)
		}
		vals[i] = v
	}
	err := p.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSRIOV)
		for i, r := range rs {
			if err := b.Put([]byte(r.VF.PCI), vals[i]); err != nil {
				return err
			}
		}
		for _, pci := range del {
			if err := b.Delete([]byte(pci)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store vf records: %w", err)
	}
	for _, r := range rs {
		p.records[r.VF.PCI] = r.clone()
	}
	for _, pci := range del {
		delete(p.records, pci)
	}
	return nil
}

// Sync merges what discovery found on one PF: new VFs become free; known ones take the
// discovered VF (driver, netdev); vanished ones are dropped when free and kept, marked
// Missing, when owned. vfs must all belong to pf; a bad entry refuses the whole call.
//
// It returns the quarantined VFs that are back in the host (a netdev there, or bound to a
// userspace driver): the caller restores them from Saved and calls Found. O(VFs of pf).
func (p *Pool) Sync(pf string, vfs []VF) ([]Record, error) {
	if pf == "" {
		return nil, fmt.Errorf("%w: empty pf name", ErrBadVF)
	}
	seen := make(map[string]VF, len(vfs))
	for _, v := range vfs {
		if v.PF != pf {
			return nil, fmt.Errorf("%w: vf %s belongs to pf %q, not %q", ErrBadVF, v.PCI, v.PF, pf)
		}
		if !pciAddr.MatchString(v.PCI) {
			return nil, fmt.Errorf("%w: pci address %q", ErrBadVF, v.PCI)
		}
		if _, dup := seen[v.PCI]; dup {
			return nil, fmt.Errorf("%w: pci address %s listed twice", ErrBadVF, v.PCI)
		}
		seen[v.PCI] = v
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	var puts []Record
	var dels []string
	var back []Record
	for pci, v := range seen {
		r, ok := p.records[pci]
		if !ok {
			puts = append(puts, Record{VF: v, State: StateFree})
			continue
		}
		if r.VF.PF != "" && r.VF.PF != pf {
			p.log.Warn("sriov: vf moved to another pf", "pci", pci, "from", r.VF.PF, "to", pf)
		}
		n := r.clone()
		n.VF, n.Missing = v, false
		if n.State == StateQuarantined && (v.Netdev != "" || v.DPDK()) {
			back = append(back, n.clone())
		}
		if n.VF != r.VF || n.Missing != r.Missing {
			puts = append(puts, n)
		}
	}
	for pci, r := range p.records {
		if r.VF.PF != pf {
			continue
		}
		if _, ok := seen[pci]; ok {
			continue
		}
		if r.State == StateFree {
			dels = append(dels, pci)
			continue
		}
		if !r.Missing {
			p.log.Warn("sriov: owned vf no longer found on its pf, kept", "pci", pci, "pf", pf,
				"state", r.State, "owner", r.Owner.String())
			n := r.clone()
			n.Missing = true
			puts = append(puts, n)
		}
	}
	if len(puts) == 0 && len(dels) == 0 {
		return back, nil
	}
	sort.Slice(puts, func(i, j int) bool { return puts[i].VF.PCI < puts[j].VF.PCI })
	if err := p.write(puts, dels); err != nil {
		return nil, err
	}
	return back, nil
}

// Reserve hands a free VF of pf to owner — a netdev-bound one, or a userspace-bound one when
// dpdk — and persists the reservation before returning. A repeated Reserve by the same owner
// (container ID and ifname) returns the VF it already holds. O(VFs of this peer).
func (p *Pool) Reserve(owner Owner, pf string, dpdk bool) (VF, error) {
	if !owner.valid() {
		p.refused.WithLabelValues("bad_owner").Inc()
		return VF{}, fmt.Errorf("%w: container id %q, ifname %q", ErrBadOwner, owner.ContainerID, owner.IfName)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var pick *Record
	for _, r := range p.records {
		if (r.State == StateReserved || r.State == StateAttached) && r.Owner.same(owner) {
			if r.VF.PF != pf || r.VF.DPDK() != dpdk {
				p.refused.WithLabelValues("owner_conflict").Inc()
				return VF{}, fmt.Errorf("%w: %s holds vf %s of pf %s (dpdk %t)", ErrOwnerConflict,
					owner, r.VF.PCI, r.VF.PF, r.VF.DPDK())
			}
			return r.VF, nil
		}
		if r.VF.PF != pf || !r.usable(dpdk) {
			continue
		}
		// The lowest index first, so the choice does not depend on map order.
		if pick == nil || r.VF.Index < pick.VF.Index {
			r := r
			pick = &r
		}
	}
	if pick == nil {
		p.refused.WithLabelValues("no_free_vf").Inc()
		return VF{}, fmt.Errorf("%w: pf %s (dpdk %t)", ErrNoFreeVF, pf, dpdk)
	}
	n := pick.clone()
	n.State, n.Owner, n.Saved = StateReserved, owner, nil
	if err := p.put(n); err != nil {
		p.refused.WithLabelValues("store").Inc()
		return VF{}, err
	}
	return n.VF, nil
}

// SaveState records the VF's state before its owner's ADD changes anything. Only a reserved
// record takes it, and only once: a repeated ADD must not overwrite the original with a
// half-changed state (sriov-cni #212); the first saved state stays and nil is returned.
func (p *Pool) SaveState(pci string, st NetdevState) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.records[pci]
	if !ok {
		return fmt.Errorf("%w: %s", ErrUnknownVF, pci)
	}
	if r.State != StateReserved {
		return fmt.Errorf("%w: save state of vf %s: %s, want %s", ErrWrongState, pci, r.State, StateReserved)
	}
	if r.Saved != nil {
		return nil
	}
	n := r.clone()
	st.MAC = append([]byte(nil), st.MAC...)
	n.Saved = &st
	return p.put(n)
}

// Attached marks a reserved VF attached: its owner's ADD finished. Repeating it is a no-op.
func (p *Pool) Attached(pci string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.records[pci]
	if !ok {
		return fmt.Errorf("%w: %s", ErrUnknownVF, pci)
	}
	switch r.State {
	case StateAttached:
		return nil
	case StateReserved:
		n := r.clone()
		n.State = StateAttached
		return p.put(n)
	default:
		return fmt.Errorf("%w: attach vf %s: %s", ErrWrongState, pci, r.State)
	}
}

// heldBy returns pci's record when owner holds it (reserved, attached or quarantined);
// ErrUnknownVF or ErrNotOwner otherwise. The caller holds p.mu.
func (p *Pool) heldBy(pci string, owner Owner) (Record, error) {
	r, ok := p.records[pci]
	if !ok {
		return Record{}, fmt.Errorf("%w: %s", ErrUnknownVF, pci)
	}
	if r.State == StateFree || !r.Owner.same(owner) {
		return Record{}, fmt.Errorf("%w: vf %s is %s, owner %q, not %q", ErrNotOwner, pci, r.State, r.Owner.String(), owner.String())
	}
	return r, nil
}

// Release frees the VF once its owner restored it — only if the record still belongs to
// owner: anything else returns ErrNotOwner and changes nothing. A quarantined VF stays
// quarantined (it is not back in the host); nil is returned so DEL succeeds.
func (p *Pool) Release(pci string, owner Owner) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, err := p.heldBy(pci, owner)
	if err != nil {
		return err
	}
	if r.State == StateQuarantined {
		return nil
	}
	n := freed(r)
	if n.Missing {
		// Free and gone: nothing left to remember.
		return p.write(nil, []string{pci})
	}
	return p.put(n)
}

// Quarantine marks owner's VF unusable: its netns went away with the VF inside. The owner
// and saved state stay so the VF can be restored when it shows up in the host again.
func (p *Pool) Quarantine(pci string, owner Owner) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, err := p.heldBy(pci, owner)
	if err != nil {
		return err
	}
	if r.State == StateQuarantined {
		return nil
	}
	n := r.clone()
	n.State = StateQuarantined
	p.log.Warn("sriov: vf quarantined, its netns is gone", "pci", pci, "owner", owner.String())
	return p.put(n)
}

// Found frees a quarantined VF that is back in the host (the caller restored it). On a VF
// in any other state it does nothing.
func (p *Pool) Found(pci string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.records[pci]
	if !ok {
		return fmt.Errorf("%w: %s", ErrUnknownVF, pci)
	}
	if r.State != StateQuarantined {
		return nil
	}
	n := freed(r)
	p.log.Info("sriov: quarantined vf back in the host, free again", "pci", pci)
	return p.put(n)
}

// Owned returns every record that is not free, by PCI address.
func (p *Pool) Owned() []Record {
	return p.filter(func(r Record) bool { return r.State != StateFree })
}

// Pending returns the reserved records: after a restart, the ADDs the peer died in the middle
// of. The caller restores each VF from Saved (when set) and calls Release.
func (p *Pool) Pending() []Record {
	return p.filter(func(r Record) bool { return r.State == StateReserved })
}

// Lookup returns owner's record: the reserved or attached one, else a quarantined one.
func (p *Pool) Lookup(owner Owner) (Record, bool) {
	var found Record
	ok := false
	for _, r := range p.filter(func(r Record) bool { return r.State != StateFree && r.Owner.same(owner) }) {
		if !ok || found.State == StateQuarantined {
			found, ok = r, true
		}
	}
	return found, ok
}

// GC returns the attached records of cniNetwork whose owner is not in valid: leaked VFs the
// caller restores and then Releases. Reserved records are ADDs under way (or Pending after a
// restart) and quarantined ones have nothing to restore, so neither is returned. Changes
// nothing. O(records + valid).
func (p *Pool) GC(valid []Owner, cniNetwork string) []Record {
	keep := make(map[Owner]bool, len(valid))
	for _, o := range valid {
		keep[Owner{ContainerID: o.ContainerID, IfName: o.IfName}] = true
	}
	return p.filter(func(r Record) bool {
		return r.State == StateAttached && r.Owner.CNINetwork == cniNetwork &&
			!keep[Owner{ContainerID: r.Owner.ContainerID, IfName: r.Owner.IfName}]
	})
}

// FreeCount is how many VFs of pf Reserve could hand out now, either kind (for gossip).
func (p *Pool) FreeCount(pf string) int {
	free, _ := p.FreeCounts(pf)
	return free
}

// FreeCounts is FreeCount and, of those, how many are bound to a userspace driver (DPDK).
func (p *Pool) FreeCounts(pf string) (free, freeDPDK int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.records {
		switch {
		case r.VF.PF != pf:
		case r.usable(true):
			free++
			freeDPDK++
		case r.usable(false):
			free++
		}
	}
	return free, freeDPDK
}

// filter returns copies of the records keep selects, by PCI address.
func (p *Pool) filter(keep func(Record) bool) []Record {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []Record
	for _, r := range p.records {
		if keep(r) {
			out = append(out, r.clone())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VF.PCI < out[j].VF.PCI })
	return out
}

// vfCollector reports weft_sriov_vfs{pf,state} at scrape time from the records, so no gauge
// needs updating on each change; O(records) per scrape. Every state of every known PF is
// reported, zeros included, so a dashboard sees a state emptying.
type vfCollector struct{ p *Pool }

var vfsDesc = prometheus.NewDesc("weft_sriov_vfs", "VFs of this peer by PF and state.", []string{"pf", "state"}, nil)

func (c vfCollector) Describe(ch chan<- *prometheus.Desc) { ch <- vfsDesc }

func (c vfCollector) Collect(ch chan<- prometheus.Metric) {
	c.p.mu.Lock()
	counts := map[string]map[State]int{}
	for _, r := range c.p.records {
		if counts[r.VF.PF] == nil {
			counts[r.VF.PF] = map[State]int{}
		}
		counts[r.VF.PF][r.State]++
	}
	c.p.mu.Unlock()
	for pf, byState := range counts {
		for _, s := range states {
			ch <- prometheus.MustNewConstMetric(vfsDesc, prometheus.GaugeValue, float64(byState[s]), pf, string(s))
		}
	}
}
