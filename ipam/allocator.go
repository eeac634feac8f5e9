package ipam

import (
	"context"
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

	mu          sync.Mutex // guards the fields below
	networks    map[string]*networkState
	attachments map[Key]Attachment
}

// networkState is the in-memory index of one network, rebuilt from the store on start.
type networkState struct {
	def    Network
	blocks []netip.Prefix     // owned, in address order
	used   map[netip.Addr]Key // address → attachment
	cursor netip.Addr         // last address handed out, so releases aren't reused at once
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
			cfg.Logger.Warn("attachment on a network this peer no longer serves", "container", rec.ContainerID, "network", rec.Network)
		} else {
			ns.used[rec.Address] = rec.Key()
			if ns.cursor.Less(rec.Address) {
				ns.cursor = rec.Address
			}
		}
		a.attachments[rec.Key()] = rec
	}
	a.metrics = newMetrics(cfg.Registerer, a)
	return a, nil
}

// Allocate gives the attachment described by req (key, network, names) an address and persists
// it. If the key is already attached it returns the existing record and true.
func (a *Allocator) Allocate(ctx context.Context, req Attachment) (Attachment, bool, error) {
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

// claimBlock asks the owner for one more block unless another caller already got one.
func (a *Allocator) claimBlock(ctx context.Context, n Network) error {
	a.claimMu.Lock()
	defer a.claimMu.Unlock()
	a.mu.Lock()
	_, free := a.networks[n.Name].nextFree()
	a.mu.Unlock()
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
	ns := a.networks[n.Name]
	known := len(ns.blocks)
	ns.blocks = mergeBlocks(ns.blocks, owned)
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
	ns.blocks = mergeBlocks(ns.blocks, []netip.Prefix{b})
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
