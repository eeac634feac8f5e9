package ipam

import (
	"bytes"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Claim names (command.Request) that went out and got no answer yet, kept in the peer's
// database so that a claim resent after a restart is still the same request: a name is
// written before its claim is sent and deleted once the claim is answered, so a crash in
// between leaves it for the next claim. Bounded by the claims that failed at once.

var bucketClaimNames = []byte("ipam-claim-names")

// claimNameKey is the database key of name for key ("network/peer"); names are base32.
func claimNameKey(key, name string) []byte { return []byte(key + "\x00" + name) }

// loadClaimNames returns the names left in the database, by "network/peer".
func loadClaimNames(db *bolt.DB) (map[string][]string, error) {
	out := map[string][]string{}
	err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketClaimNames)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, _ []byte) error {
			key, name, ok := bytes.Cut(k, []byte{0})
			if ok && len(name) > 0 && len(name) <= maxRequestLen {
				out[string(key)] = append(out[string(key)], string(name))
			}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read the unanswered claims: %w", err)
	}
	return out, nil
}

func saveClaimName(db *bolt.DB, key, name string) error {
	return db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketClaimNames).Put(claimNameKey(key, name), nil)
	})
}

func dropClaimName(db *bolt.DB, key, name string) error {
	return db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketClaimNames).Delete(claimNameKey(key, name))
	})
}
