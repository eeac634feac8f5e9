package ipam

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"sort"

	bolt "go.etcd.io/bbolt"
)

// BlockOwner decides which peer owns which block. It is the only place that decision is
// made: LocalOwner answers from this peer's own database (one peer, one host); the replicated
// owner answers from the Raft log. Implementations must be safe for concurrent use; Claim may
// block (a Raft round trip) and must honour ctx.
type BlockOwner interface {
	// Owned returns the blocks of network owned by peer, in address order.
	Owned(network Network, peer string) ([]netip.Prefix, error)
	// Claim gives peer one more block of network that nobody owns. It fails with ErrRangeFull
	// when there is none, or ErrNoQuorum when ownership cannot be agreed on right now.
	Claim(ctx context.Context, network Network, peer string) (netip.Prefix, error)
}

var bucketBlocks = []byte("ipam-blocks")

// LocalOwner is the single-peer BlockOwner: ownership lives in this peer's bbolt database,
// under key "<network>/<block>" with the owner's name as value.
type LocalOwner struct {
	db *bolt.DB
}

// NewLocalOwner uses db for the ownership table.
func NewLocalOwner(db *bolt.DB) (*LocalOwner, error) {
	err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketBlocks)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create block table: %w", err)
	}
	return &LocalOwner{db: db}, nil
}

func blockKey(network string, b netip.Prefix) []byte { return []byte(network + "/" + b.String()) }

// Owned implements BlockOwner.
func (o *LocalOwner) Owned(network Network, peer string) ([]netip.Prefix, error) {
	var owned []netip.Prefix
	err := o.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketBlocks).Cursor()
		prefix := []byte(network.Name + "/")
		for k, v := c.Seek(prefix); k != nil && hasPrefix(k, prefix); k, v = c.Next() {
			if string(v) != peer {
				continue
			}
			b, err := netip.ParsePrefix(string(k[len(prefix):]))
			if err != nil {
				return fmt.Errorf("corrupt block key %q: %w", k, err)
			}
			if network.ContainsBlock(b) {
				owned = append(owned, b)
			}
		}
		return nil
	})
	sort.Slice(owned, func(i, j int) bool { return owned[i].Addr().Less(owned[j].Addr()) })
	return owned, err
}

// Claim implements BlockOwner: the lowest block nobody owns.
func (o *LocalOwner) Claim(ctx context.Context, network Network, peer string) (netip.Prefix, error) {
	if err := ctx.Err(); err != nil {
		return netip.Prefix{}, err
	}
	var claimed netip.Prefix
	err := o.db.Update(func(tx *bolt.Tx) error {
		bkt := tx.Bucket(bucketBlocks)
		for i := 0; i < network.NumBlocks(); i++ {
			b := network.Block(i)
			if bkt.Get(blockKey(network.Name, b)) != nil {
				continue
			}
			claimed = b
			return bkt.Put(blockKey(network.Name, b), []byte(peer))
		}
		return fmt.Errorf("%w: every block of %s (%s) is owned", ErrRangeFull, network.Name, network.Subnet)
	})
	return claimed, err
}

func hasPrefix(b, prefix []byte) bool {
	return len(b) >= len(prefix) && string(b[:len(prefix)]) == string(prefix)
}

// bucketClaimIndex keeps, for each block the Raft owner recorded, the log index of its claim.
var bucketClaimIndex = []byte("ipam-block-claim-index")

// record notes that peer owns block b of network, claimed at Raft log index (the Raft owner
// keeps its own claims here; 0: index unknown).
func (o *LocalOwner) record(network string, b netip.Prefix, peer string, index uint64) error {
	return o.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketBlocks).Put(blockKey(network, b), []byte(peer)); err != nil {
			return err
		}
		idx, err := tx.CreateBucketIfNotExists(bucketClaimIndex)
		if err != nil {
			return err
		}
		return idx.Put(blockKey(network, b), binary.BigEndian.AppendUint64(nil, index))
	})
}

// claimIndex is the log index recorded with block b of network; 0 when none was.
func (o *LocalOwner) claimIndex(network string, b netip.Prefix) uint64 {
	var index uint64
	o.db.View(func(tx *bolt.Tx) error {
		if idx := tx.Bucket(bucketClaimIndex); idx != nil {
			if v := idx.Get(blockKey(network, b)); len(v) == 8 {
				index = binary.BigEndian.Uint64(v)
			}
		}
		return nil
	})
	return index
}

// forget drops the record of block b of network (it was released). O(1).
func (o *LocalOwner) forget(network string, b netip.Prefix) error {
	return o.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketBlocks).Delete(blockKey(network, b)); err != nil {
			return err
		}
		if idx := tx.Bucket(bucketClaimIndex); idx != nil {
			return idx.Delete(blockKey(network, b))
		}
		return nil
	})
}
