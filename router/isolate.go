package router

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/datapath/guard"
	"github.com/weftnet/weft/datapath/isolate"
	"github.com/weftnet/weft/ipam"
)

// filters are this peer's nftables rules in weft's table: the guard of its own ports
// (router/guard.go) and the isolation between networks (datapath/isolate). Both follow the
// cluster's networks: the guard covers every network's bridge, the isolation every
// network's range.
type filters struct {
	guard     *guard.Guard
	advertise netip.Addr
	iso       *isolate.Isolator

	mu       sync.Mutex        // guards the fields below; held across one apply
	bridges  []string          // the bridges the guard was last set with
	saved    []isolate.Network // what was applied before this start (database); nil once exact
	applied  []isolate.Network // what the isolator holds; nil before the first apply
	failed   []isolate.Network // the last input the guard or the isolator refused
	failedAt time.Time         // when; the same input is retried after filterRetry
}

// guardedBridges are the bridges the guard was last set with.
func (f *filters) guardedBridges() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.bridges)
}

// filterRetry is how long a refused input is not retried: the error is logged and counted
// once per change of input (or per retry), not once per datapath tick.
const filterRetry = 30 * time.Second

// keyIsolation is the key, in bucketDatapath, of the last isolation applied.
var keyIsolation = []byte("isolation")

// startIsolation builds the isolator and applies, before the control API serves any ADD,
// the isolation of every network this peer knows now — the cluster's table, its own
// configuration, and what it applied before a restart (kept in the database and in the
// kernel), so a restarted peer whose Raft log or gossiped table has not caught up yet
// isolates the networks it has not heard of again. syncFilters converges exactly once the
// peer has rejoined. A host where the isolation cannot be applied does not start.
func (p *Peer) startIsolation() error {
	iso, err := isolate.New(isolate.Deps{Logger: p.log.With("component", "isolate"), Registry: p.reg})
	if err != nil {
		return err
	}
	saved, err := loadIsolation(p.db)
	if err == nil {
		_, err = isolate.NewPlan(saved) // it was applied once; a database edited since is not trusted
	}
	if err != nil {
		p.log.Warn("last isolation state unusable; isolating the networks known now", "err", err)
		saved = nil
	}
	p.filters.iso = iso
	p.filters.saved = saved
	return p.syncFilters(false)
}

// syncFilters brings the guard's bridges and the isolation in step with the networks this
// peer knows. exact: the peer has rejoined the cluster, so its table is complete and
// networks it no longer knows are removed; before that it only adds to what it applied
// last. Called on every datapath tick: O(networks) to compare, and a transaction only when
// something changed. The errors are logged and counted by the guard and the isolator.
func (p *Peer) syncFilters(exact bool) error {
	f := p.filters
	nets := p.knownNetworks()
	want := isolationNetworks(nets)
	f.mu.Lock()
	defer f.mu.Unlock()
	if exact {
		f.saved = nil
	} else {
		want = unionNetworks(f.saved, want)
	}
	bridges := guardBridges(want)
	if slices.Equal(bridges, f.bridges) && f.applied != nil && slices.Equal(want, f.applied) {
		return nil
	}
	if f.failed != nil && slices.Equal(want, f.failed) && time.Since(f.failedAt) < filterRetry {
		return nil
	}
	if !slices.Equal(bridges, f.bridges) {
		if err := f.guard.Set(p.guardConfig(f.advertise, bridges)); err != nil {
			f.failed, f.failedAt = want, time.Now()
			return err
		}
		f.bridges = bridges
	}
	if f.applied == nil || !slices.Equal(want, f.applied) {
		if err := f.iso.Set(want); err != nil {
			f.failed, f.failedAt = want, time.Now()
			return err
		}
		f.applied = want
	}
	f.failed = nil
	if err := saveIsolation(p.db, want); err != nil {
		p.log.Warn("could not save the isolation state", "err", err)
	}
	return nil
}

// knownNetworks are the networks of the cluster's table, and this peer's configured default
// network if the table does not hold it yet (before the table arrives). O(networks): it runs
// on every datapath tick, so it reads no allocator state (whose Networks is O(addresses)).
func (p *Peer) knownNetworks() []ipam.Network {
	nets := p.cluster.Networks()
	def := p.cfg.defaultNetwork()
	if !slices.ContainsFunc(nets, func(n ipam.Network) bool { return n.Name == def.Name }) {
		nets = append(nets, def)
	}
	return nets
}

// isolationNetworks is what isolation needs of the networks, with their bridges on this
// host, sorted by name. Pure, O(N log N).
func isolationNetworks(nets []ipam.Network) []isolate.Network {
	out := make([]isolate.Network, 0, len(nets))
	for _, n := range nets {
		if n.Mode == ipam.ModeSRIOV {
			continue // no bridge to filter: its VFs bypass the host (issue #14)
		}
		out = append(out, isolate.Network{Name: n.Name, Subnet: n.Subnet, Isolated: n.Isolated, Bridge: bridgeName(n.Name)})
	}
	slices.SortFunc(out, func(a, b isolate.Network) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// unionNetworks is now plus the networks of before that now does not name and whose range
// and bridge are none of now's (a network removed and its range reused meanwhile: now wins).
// Sorted by name. Pure, O(N²) in networks (at most ipam.MaxNetworks).
func unionNetworks(before, now []isolate.Network) []isolate.Network {
	out := slices.Clone(now)
	for _, b := range before {
		if slices.ContainsFunc(out, func(n isolate.Network) bool {
			return n.Name == b.Name || n.Subnet.Overlaps(b.Subnet) || n.Bridge == b.Bridge
		}) {
			continue
		}
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b isolate.Network) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// guardBridges are the bridges of the networks, sorted. O(N log N).
func guardBridges(nets []isolate.Network) []string {
	out := make([]string, 0, len(nets))
	for _, n := range nets {
		out = append(out, n.Bridge)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func saveIsolation(db *bolt.DB, nets []isolate.Network) error {
	data, err := json.Marshal(nets)
	if err != nil {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketDatapath)
		if err != nil {
			return err
		}
		return b.Put(keyIsolation, data)
	})
}

func loadIsolation(db *bolt.DB) ([]isolate.Network, error) {
	var nets []isolate.Network
	err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDatapath)
		if b == nil {
			return nil
		}
		if data := b.Get(keyIsolation); data != nil {
			return json.Unmarshal(data, &nets)
		}
		return nil
	})
	return nets, err
}
