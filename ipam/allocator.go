package ipam

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

// Config configures an Allocator.
type Config struct {
	// Peer is this peer's name, the owner recorded for the blocks it claims.
	Peer     string
	Networks []Network
	Logger   *slog.Logger
	// Registerer receives the allocator's metrics; nil means none.
	Registerer prometheus.Registerer
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Allocator hands out addresses from the blocks this peer owns and remembers every
// attachment. Safe for concurrent use.
type Allocator struct {
	cfg     Config
	owner   BlockOwner
	store   *store
	metrics *metrics

	// claimMu serialises block claims, which may block on the owner, without holding mu.
	claimMu sync.Mutex
	// setMu serialises SetNetworks, which reads the owner without holding mu, and guards
	// lastRefused, the refusals of its last call.
	setMu       sync.Mutex
	lastRefused string
	// releaseMu lets one ReleaseIdleBlocks run at a time; another call returns at once.
	releaseMu sync.Mutex

	mu          sync.Mutex // guards the fields below
	networks    map[string]*networkState
	attachments map[Key]Attachment
	// orphans are attachments whose address lies in no block this peer owns (the block was
	// taken away while they lived); reported, never reused, released by DEL or GC as usual.
	orphans map[Key]Attachment
	// claims counts blocks merged in by claimBlock: a syncBlocks whose read of the owner
	// raced with a claim must not drop the block just claimed.
	claims uint64
	// releasing holds the blocks handed back (or being handed back) to the owner: none is
	// merged in again while the owner may still report it (a client's table lags the log).
	// An entry goes once the owner no longer reports the block, or when the release failed.
	releasing map[string]map[netip.Prefix]releaseState
}

// releaseState is where the release of one block stands.
type releaseState struct {
	done  bool      // the owner accepted it
	retry time.Time // after a failure: not tried again before then
}

// networkState is the in-memory index of one network, rebuilt from the store on start.
type networkState struct {
	def Network
	// learnt: the network came from the cluster (SetNetworks), not the peer's configuration;
	// only such a network loses its emptied blocks (ReleaseIdleBlocks) and is dropped when
	// the cluster removes it.
	learnt bool
	// allocating counts Allocate calls under way on the network: a block claimed for one of
	// them is empty until it allocates, and must not be released meanwhile.
	allocating int
	blocks     []netip.Prefix     // owned, in address order
	used       map[netip.Addr]Key // address → attachment
	cursor     netip.Addr         // last address handed out, so releases aren't reused at once
}

// NewAllocator loads every persisted attachment and the blocks owner says this peer owns.
func NewAllocator(cfg Config, db *bolt.DB, owner BlockOwner) (*Allocator, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Peer == "" {
		return nil, fmt.Errorf("ipam: peer name is empty")
	}
	st, err := newStore(db)
	if err != nil {
		return nil, err
	}
	a := &Allocator{
		cfg:         cfg,
		owner:       owner,
		store:       st,
		networks:    map[string]*networkState{},
		attachments: map[Key]Attachment{},
		orphans:     map[Key]Attachment{},
		releasing:   map[string]map[netip.Prefix]releaseState{},
	}
	for _, n := range cfg.Networks {
		if err := n.Validate(); err != nil {
			return nil, err
		}
		if _, dup := a.networks[n.Name]; dup {
			return nil, fmt.Errorf("%w: network %s defined twice", ErrInvalidNetwork, n.Name)
		}
		blocks, err := owner.Owned(n, cfg.Peer)
		if err != nil {
			return nil, fmt.Errorf("read blocks of %s: %w", n.Name, err)
		}
		a.networks[n.Name] = &networkState{def: n, blocks: blocks, used: map[netip.Addr]Key{}}
	}
	records, err := st.all()
	if err != nil {
		return nil, err
	}
	for _, rec := range records {
		ns, ok := a.networks[rec.Network]
		if !ok {
			// Kept, not dropped: the network may come back in a later configuration, and
			// DEL/GC must still be able to release it.
			cfg.Logger.Info("attachment on a network not configured here; served once the cluster's table defines it",
				"container", rec.ContainerID, "network", rec.Network)
		} else {
			ns.used[rec.Address] = rec.Key()
			if ns.cursor.Less(rec.Address) {
				ns.cursor = rec.Address
			}
		}
		a.attachments[rec.Key()] = rec
	}
	a.metrics = newMetrics(cfg.Registerer, a)
	a.mu.Lock()
	a.updateOrphans()
	a.mu.Unlock()
	return a, nil
}

// CheckOwnership asks the owner which blocks this peer owns now and takes that as the truth:
// blocks no longer owned (rmpeer --force, or reclaimed while this peer was partitioned) are
// dropped at once, so no address is handed out from them twice, and every attachment left
// inside one is reported as orphaned (logged at error level, counted in
// weft_ipam_orphaned_attachments, listed by Orphaned). Allocate calls it before each
// allocation; the router calls it every membership round so orphans are reported without
// waiting for an ADD. O(blocks of the network + attachments).
func (a *Allocator) CheckOwnership() error {
	a.mu.Lock()
	nets := make([]Network, 0, len(a.networks))
	for _, ns := range a.networks {
		nets = append(nets, ns.def)
	}
	a.mu.Unlock()
	var errs []error
	for _, n := range nets {
		errs = append(errs, a.syncBlocks(n))
	}
	return errors.Join(errs...)
}

// syncBlocks sets network n's blocks to what the owner says this peer owns.
func (a *Allocator) syncBlocks(n Network) error {
	a.mu.Lock()
	gen := a.claims
	a.mu.Unlock()
	owned, err := a.owner.Owned(n, a.cfg.Peer)
	if err != nil {
		return fmt.Errorf("read blocks of %s: %w", n.Name, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.claims != gen {
		return nil // a claim landed meanwhile: the next check sees it in the owner too
	}
	ns, ok := a.networks[n.Name]
	if !ok {
		return nil // dropped meanwhile (SetNetworks)
	}
	owned = a.notReleasing(n.Name, owned)
	lost := lostBlocks(ns.blocks, owned)
	ns.blocks = mergeBlocks(nil, owned)
	for _, b := range lost {
		a.cfg.Logger.Error("block taken away from this peer; it allocates no more from it", "network", n.Name, "block", b)
	}
	a.updateOrphans()
	return nil
}

// lostBlocks lists the blocks of had that now is without. Pure; O(len(had) + len(now)).
func lostBlocks(had, now []netip.Prefix) []netip.Prefix {
	in := make(map[netip.Prefix]bool, len(now))
	for _, b := range now {
		in[b] = true
	}
	var lost []netip.Prefix
	for _, b := range had {
		if !in[b] {
			lost = append(lost, b)
		}
	}
	return lost
}

// orphaned lists the keys of the attachments on a served network whose address lies in none
// of that network's owned blocks. Pure; O(attachments × blocks per network).
func orphaned(attachments map[Key]Attachment, blocks map[string][]netip.Prefix) []Key {
	var out []Key
	for k, rec := range attachments {
		owned, served := blocks[rec.Network]
		if !served {
			continue // a network this peer no longer serves is another matter (logged at start)
		}
		inside := false
		for _, b := range owned {
			if b.Contains(rec.Address) {
				inside = true
				break
			}
		}
		if !inside {
			out = append(out, k)
		}
	}
	return out
}

// updateOrphans recomputes the orphans, logging each new one at error level. Caller holds mu.
func (a *Allocator) updateOrphans() {
	blocks := make(map[string][]netip.Prefix, len(a.networks))
	for name, ns := range a.networks {
		blocks[name] = ns.blocks
	}
	now := map[Key]Attachment{}
	for _, k := range orphaned(a.attachments, blocks) {
		rec := a.attachments[k]
		now[k] = rec
		if _, known := a.orphans[k]; !known {
			a.cfg.Logger.Error("attachment left in a block this peer no longer owns: its address may be handed out again elsewhere; "+
				"delete and re-create the container", "container", rec.ContainerID, "ifname", rec.IfName, "network", rec.Network, "address", rec.Address)
		}
	}
	a.orphans = now
}

// Orphaned lists the attachments whose address lies in no block this peer owns, by key.
func (a *Allocator) Orphaned() []Attachment {
	a.mu.Lock()
	out := make([]Attachment, 0, len(a.orphans))
	for _, rec := range a.orphans {
		out = append(out, rec)
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Key().String() < out[j].Key().String() })
	return out
}

// Allocate gives the attachment described by req (key, network, names) an address and persists
// it. If the key is already attached it returns the existing record and true.
func (a *Allocator) Allocate(ctx context.Context, req Attachment) (Attachment, bool, error) {
	if n, ok := a.Network(req.Network); ok {
		// The table may have taken a block away since the last look: never allocate from it.
		if err := a.syncBlocks(n); err != nil {
			return Attachment{}, false, err
		}
	}
	a.mu.Lock()
	if ns, ok := a.networks[req.Network]; ok {
		ns.allocating++
		defer func() {
			a.mu.Lock()
			ns.allocating--
			a.mu.Unlock()
		}()
	}
	a.mu.Unlock()
	for {
		a.mu.Lock()
		if existing, ok := a.attachments[req.Key()]; ok {
			a.mu.Unlock()
			return existing, true, nil
		}
		ns, ok := a.networks[req.Network]
		if !ok {
			a.mu.Unlock()
			return Attachment{}, false, fmt.Errorf("%w: %q", ErrUnknownNetwork, req.Network)
		}
		if addr, ok := ns.nextFree(); ok {
			req.Address = addr
			req.Created = a.cfg.Now().UTC()
			if err := a.store.put(req); err != nil {
				a.mu.Unlock()
				return Attachment{}, false, fmt.Errorf("persist attachment %s: %w", req.Key(), err)
			}
			ns.used[addr] = req.Key()
			ns.cursor = addr
			a.attachments[req.Key()] = req
			a.mu.Unlock()
			a.metrics.allocations.Inc()
			return req, false, nil
		}
		def := ns.def
		a.mu.Unlock()
		if err := a.claimBlock(ctx, def); err != nil {
			return Attachment{}, false, err
		}
	}
}

// notReleasing is blocks without those of network being released (releasing), and forgets
// the finished releases the owner no longer reports. Caller holds mu. O(blocks).
func (a *Allocator) notReleasing(network string, blocks []netip.Prefix) []netip.Prefix {
	rel := a.releasing[network]
	if len(rel) == 0 {
		return blocks
	}
	reported := make(map[netip.Prefix]bool, len(blocks))
	out := make([]netip.Prefix, 0, len(blocks))
	for _, b := range blocks {
		reported[b] = true
		if st, ok := rel[b]; ok && (st.done || st.retry.IsZero()) {
			continue
		}
		out = append(out, b)
	}
	for b, st := range rel {
		if !reported[b] && (st.done || !st.retry.IsZero()) {
			delete(rel, b)
		}
	}
	if len(rel) == 0 {
		delete(a.releasing, network)
	}
	return out
}

// claimBlock asks the owner for one more block unless another caller already got one.
func (a *Allocator) claimBlock(ctx context.Context, n Network) error {
	a.claimMu.Lock()
	defer a.claimMu.Unlock()
	a.mu.Lock()
	ns, ok := a.networks[n.Name]
	free := false
	if ok {
		_, free = ns.nextFree()
	}
	a.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %q (removed from the cluster meanwhile)", ErrUnknownNetwork, n.Name)
	}
	if free {
		return nil
	}
	// The owner may know of blocks the allocator does not yet (a restarted peer catching up
	// with the Raft log): use those before claiming another.
	owned, err := a.owner.Owned(n, a.cfg.Peer)
	if err != nil {
		return fmt.Errorf("read blocks of %s: %w", n.Name, err)
	}
	a.mu.Lock()
	ns, ok = a.networks[n.Name]
	if !ok {
		a.mu.Unlock()
		return fmt.Errorf("%w: %q (removed from the cluster meanwhile)", ErrUnknownNetwork, n.Name)
	}
	known := len(ns.blocks)
	ns.blocks = mergeBlocks(ns.blocks, a.notReleasing(n.Name, owned))
	_, free = ns.nextFree()
	a.mu.Unlock()
	if free {
		if len(ns.blocks) > known {
			a.cfg.Logger.Info("found blocks owned since start", "network", n.Name, "blocks", len(ns.blocks)-known)
		}
		return nil
	}
	b, err := a.owner.Claim(ctx, n, a.cfg.Peer)
	if err != nil {
		return fmt.Errorf("claim a block of %s: %w", n.Name, err)
	}
	a.mu.Lock()
	delete(a.releasing[n.Name], b) // the pool handed a released block back: ours again
	ns.blocks = mergeBlocks(ns.blocks, []netip.Prefix{b})
	a.claims++
	a.mu.Unlock()
	a.metrics.claims.Inc()
	a.cfg.Logger.Info("claimed block", "network", n.Name, "block", b)
	return nil
}

// mergeBlocks returns the union of have and more, in address order.
func mergeBlocks(have, more []netip.Prefix) []netip.Prefix {
	seen := make(map[netip.Prefix]bool, len(have))
	for _, b := range have {
		seen[b] = true
	}
	for _, b := range more {
		if !seen[b] {
			have = append(have, b)
			seen[b] = true
		}
	}
	sort.Slice(have, func(i, j int) bool { return have[i].Addr().Less(have[j].Addr()) })
	return have
}

// Release forgets the attachment and frees its address. It returns the released record and
// false (no error) when there was nothing to release.
func (a *Allocator) Release(k Key) (Attachment, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	rec, ok := a.attachments[k]
	if !ok {
		return Attachment{}, false, nil
	}
	if err := a.store.delete(k); err != nil {
		return Attachment{}, false, fmt.Errorf("delete attachment %s: %w", k, err)
	}
	delete(a.attachments, k)
	delete(a.orphans, k)
	if ns, ok := a.networks[rec.Network]; ok && ns.used[rec.Address] == k {
		delete(ns.used, rec.Address)
	}
	a.metrics.releases.Inc()
	return rec, true, nil
}

// Get returns the attachment with key k.
func (a *Allocator) Get(k Key) (Attachment, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	rec, ok := a.attachments[k]
	return rec, ok
}

// Attachments returns every attachment, ordered by key.
func (a *Allocator) Attachments() []Attachment {
	a.mu.Lock()
	out := make([]Attachment, 0, len(a.attachments))
	for _, rec := range a.attachments {
		out = append(out, rec)
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Key().String() < out[j].Key().String() })
	return out
}

// Network returns the definition of the named network.
func (a *Allocator) Network(name string) (Network, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	ns, ok := a.networks[name]
	if !ok {
		return Network{}, false
	}
	return ns.def, true
}

// BlockStatus is one owned block and how full it is.
type BlockStatus struct {
	CIDR netip.Prefix `json:"cidr"`
	Used int          `json:"used"`
	Free int          `json:"free"`
}

// NetworkStatus is one network with the blocks this peer owns.
type NetworkStatus struct {
	Network
	Blocks []BlockStatus `json:"blocks"`
}

// Networks reports every network, ordered by name.
func (a *Allocator) Networks() []NetworkStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]NetworkStatus, 0, len(a.networks))
	for _, ns := range a.networks {
		st := NetworkStatus{Network: ns.def, Blocks: []BlockStatus{}}
		for _, b := range ns.blocks {
			used := 0
			for addr := range ns.used {
				if b.Contains(addr) {
					used++
				}
			}
			st.Blocks = append(st.Blocks, BlockStatus{CIDR: b, Used: used, Free: ns.def.Usable(b) - used})
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// nextFree finds a free address, first among those after the cursor and then from the start,
// so a just-released address is the last to be handed out again. Caller holds a.mu.
func (ns *networkState) nextFree() (netip.Addr, bool) {
	for _, afterCursor := range []bool{true, false} {
		for _, b := range ns.blocks {
			if afterCursor && !ns.cursor.Less(lastAddr(b)) {
				continue // the whole block is at or before the cursor
			}
			for addr := b.Addr(); b.Contains(addr); addr = addr.Next() {
				if ns.cursor.Less(addr) != afterCursor {
					continue
				}
				if _, taken := ns.used[addr]; !taken && !ns.def.reserved(addr) {
					return addr, true
				}
			}
		}
	}
	return netip.Addr{}, false
}

// SetNetworks makes the allocator serve nets, the networks the cluster defines (issue #13),
// besides the ones of its configuration, which stay as configured: a network new to it is
// served from the blocks the owner says this peer owns (none until an ADD claims one), with
// the attachments recorded on it indexed again (a restarted peer learns its created networks
// only from the table); a network no longer in nets is dropped once no attachment here is on
// it and no Allocate is under way on it. A network redefined (removed and created again
// with another range) is rebuilt under the same rule. It returns the names added and dropped,
// and the definitions it refuses (invalid, or redefined while attached here) when they differ
// from the last call's: a refusal is reported and counted (weft_ipam_networks_refused_total)
// once, not on every call.
// O(networks) when nothing changed; O(blocks + attachments) per network added.
func (a *Allocator) SetNetworks(nets []Network) (added, dropped []string, err error) {
	a.setMu.Lock()
	defer a.setMu.Unlock()
	var errs []error
	want := make(map[string]Network, len(nets))
	for _, n := range nets {
		if err := n.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		want[n.Name] = n
	}
	var fresh []Network
	a.mu.Lock()
	for name, n := range want {
		ns, ok := a.networks[name]
		switch {
		case !ok:
			fresh = append(fresh, n)
		case !ns.learnt || ns.def == n:
		case a.inUse(name):
			errs = append(errs, fmt.Errorf("%w: network %s is %s in the cluster, but attachments on this peer are on %s; "+
				"it keeps serving them as they are", ErrConflict, name, n.Describe(), ns.def.Describe()))
		default:
			fresh = append(fresh, n)
		}
	}
	for name, ns := range a.networks {
		if _, ok := want[name]; ok || !ns.learnt || a.inUse(name) {
			continue
		}
		delete(a.networks, name)
		delete(a.releasing, name)
		dropped = append(dropped, name)
	}
	a.mu.Unlock()
	for _, n := range fresh {
		blocks, err := a.owner.Owned(n, a.cfg.Peer)
		if err != nil {
			errs = append(errs, fmt.Errorf("read blocks of %s: %w", n.Name, err))
			continue
		}
		a.mu.Lock()
		ns := &networkState{def: n, learnt: true, blocks: mergeBlocks(nil, a.notReleasing(n.Name, blocks)), used: map[netip.Addr]Key{}}
		for k, rec := range a.attachments {
			if rec.Network == n.Name && n.Subnet.Contains(rec.Address) {
				ns.used[rec.Address] = k
				if ns.cursor.Less(rec.Address) {
					ns.cursor = rec.Address
				}
			}
		}
		a.networks[n.Name] = ns
		a.updateOrphans()
		a.mu.Unlock()
		added = append(added, n.Name)
	}
	sort.Strings(added)
	sort.Strings(dropped)
	if !a.refusedChanged(errs) {
		return added, dropped, nil // reported (and counted) when it first came
	}
	a.metrics.networksRefused.Add(float64(len(errs)))
	return added, dropped, errors.Join(errs...)
}

// refusedChanged says whether the refusals of this SetNetworks differ from the last call's,
// so that a definition refused on every tick is counted (and logged by the caller) once.
// Caller holds setMu.
func (a *Allocator) refusedChanged(errs []error) bool {
	var msg string
	if err := errors.Join(errs...); err != nil {
		msg = err.Error()
	}
	changed := msg != a.lastRefused
	a.lastRefused = msg
	return changed
}

// inUse says whether an attachment here is on network name or an Allocate on it is under
// way. Caller holds mu. O(attachments).
func (a *Allocator) inUse(name string) bool {
	if ns, ok := a.networks[name]; ok && ns.allocating > 0 {
		return true
	}
	for _, rec := range a.attachments {
		if rec.Network == name {
			return true
		}
	}
	return false
}

// BlockReleaser returns a block a peer owns to the pool (ipam.Cluster.ReleaseBlock). It may
// block (a Raft round trip) and must honour ctx.
type BlockReleaser interface {
	ReleaseBlock(ctx context.Context, n Network, b netip.Prefix, peer string) error
}

// releaseRetry is how long a block whose release failed (no quorum) waits before the next try.
const releaseRetry = 10 * time.Second

// ReleaseIdleBlocks hands back to r every owned block of a network learnt from the cluster
// (SetNetworks) in which no attachment lives, so that the network can be removed once every
// container on it is detached; the configured (default) network keeps its blocks. A block
// leaves the allocator before r is asked, so no address is handed out from it meanwhile, and
// comes back if r fails (tried again after releaseRetry). One call runs at a time: a call
// made while another runs returns at once. It returns the blocks released.
// O(networks + blocks × attachments of their network) to choose; one r call per block.
func (a *Allocator) ReleaseIdleBlocks(ctx context.Context, r BlockReleaser) ([]BlockOwnership, error) {
	if !a.releaseMu.TryLock() {
		return nil, nil
	}
	defer a.releaseMu.Unlock()
	type job struct {
		n Network
		b netip.Prefix
	}
	var jobs []job
	now := a.cfg.Now()
	a.mu.Lock()
	for name, ns := range a.networks {
		if !ns.learnt || ns.allocating > 0 || len(ns.blocks) == 0 {
			continue
		}
		keep := make([]netip.Prefix, 0, len(ns.blocks))
		for _, b := range ns.blocks {
			st, tried := a.releasing[name][b]
			if blockUsed(ns, b) || tried && now.Before(st.retry) {
				keep = append(keep, b)
				continue
			}
			if a.releasing[name] == nil {
				a.releasing[name] = map[netip.Prefix]releaseState{}
			}
			a.releasing[name][b] = releaseState{}
			jobs = append(jobs, job{ns.def, b})
		}
		ns.blocks = keep
	}
	a.mu.Unlock()
	var out []BlockOwnership
	var errs []error
	for _, j := range jobs {
		err := r.ReleaseBlock(ctx, j.n, j.b, a.cfg.Peer)
		a.mu.Lock()
		_, pending := a.releasing[j.n.Name][j.b] // a claim took it back meanwhile: leave it be
		switch {
		case !pending:
		case err != nil:
			a.releasing[j.n.Name][j.b] = releaseState{retry: now.Add(releaseRetry)}
			if ns, ok := a.networks[j.n.Name]; ok {
				ns.blocks = mergeBlocks(ns.blocks, []netip.Prefix{j.b})
			}
		default:
			a.releasing[j.n.Name][j.b] = releaseState{done: true}
		}
		a.mu.Unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("release block %s of %s: %w", j.b, j.n.Name, err))
			continue
		}
		a.metrics.blockReleases.Inc()
		a.cfg.Logger.Info("released an emptied block", "network", j.n.Name, "block", j.b)
		out = append(out, BlockOwnership{Network: j.n.Name, CIDR: j.b, Owner: a.cfg.Peer})
	}
	return out, errors.Join(errs...)
}

// blockUsed says whether an address of block b is in use. Caller holds mu. O(used).
func blockUsed(ns *networkState, b netip.Prefix) bool {
	for addr := range ns.used {
		if b.Contains(addr) {
			return true
		}
	}
	return false
}

// Container lists the attachments of one container, ordered by interface name.
// O(attachments).
func (a *Allocator) Container(id string) []Attachment {
	a.mu.Lock()
	var out []Attachment
	for _, rec := range a.attachments {
		if rec.ContainerID == id {
			out = append(out, rec)
		}
	}
	a.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].IfName < out[j].IfName })
	return out
}
