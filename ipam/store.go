package ipam

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

var bucketAttachments = []byte("ipam-attachments")

// Key names one attachment the way CNI does: container ID plus interface name.
type Key struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
}

func (k Key) String() string { return k.ContainerID + "/" + k.IfName }

// Attachment is one container interface with its address. It is persisted before the kernel
// is touched, so a crash between the two leaves a record that DEL or GC can clean up.
type Attachment struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
	// Network is the weft network; CNINetwork the runtime's conflist name, which scopes GC.
	Network    string     `json:"network"`
	CNINetwork string     `json:"cni_network"`
	Name       string     `json:"name"`
	Address    netip.Addr `json:"address"`
	NetNS      string     `json:"netns"`
	HostIfName string     `json:"host_ifname"`
	MTU        int        `json:"mtu,omitempty"`
	// Secondary: the container had another weft attachment when this one was made, so this
	// one is not its primary interface (no default route); kept so a repeated ADD and CHECK
	// agree with the first ADD.
	Secondary bool `json:"secondary,omitempty"`
	// Services are SRV entries published for Name, SERVICE/PROTO/PORT.
	Services []string  `json:"services,omitempty"`
	Created  time.Time `json:"created"`
	// Labels are the container's labels (issue #15): from the ADD, changed by `weft label`.
	// Every interface of a container holds the same set. Absent from older records.
	Labels map[string]string `json:"labels,omitempty"`
}

// Key returns the attachment's key.
func (a Attachment) Key() Key { return Key{ContainerID: a.ContainerID, IfName: a.IfName} }

// store persists attachments in bbolt. Every write is one fsync'd transaction.
type store struct {
	db *bolt.DB
}

func newStore(db *bolt.DB) (*store, error) {
	err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketAttachments)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create attachment table: %w", err)
	}
	return &store{db: db}, nil
}

func (s *store) put(a Attachment) error {
	v, err := json.Marshal(a)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAttachments).Put([]byte(a.Key().String()), v)
	})
}

// putAll writes every attachment of as in one transaction: all or none.
func (s *store) putAll(as []Attachment) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAttachments)
		for _, a := range as {
			v, err := json.Marshal(a)
			if err != nil {
				return err
			}
			if err := b.Put([]byte(a.Key().String()), v); err != nil {
				return err
			}
		}
		return nil
	})
}

func (s *store) delete(k Key) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAttachments).Delete([]byte(k.String()))
	})
}

func (s *store) all() ([]Attachment, error) {
	var out []Attachment
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketAttachments).ForEach(func(k, v []byte) error {
			var a Attachment
			if err := json.Unmarshal(v, &a); err != nil {
				return fmt.Errorf("corrupt attachment record %q: %w", k, err)
			}
			out = append(out, a)
			return nil
		})
	})
	return out, err
}

// ErrUnknownContainer: no attachment of that container on this peer.
var ErrUnknownContainer = errors.New("no such container attached here")

// SetLabels replaces the labels of every attachment of container id with labels (nil or
// empty: none) and persists them in one transaction, before the change is visible; on a
// failed write nothing changes. It returns the updated attachments, ordered by interface.
// The caller checks the labels. O(attachments).
func (a *Allocator) SetLabels(id string, labels map[string]string) ([]Attachment, error) {
	if len(labels) == 0 {
		labels = nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var updated []Attachment
	for _, rec := range a.attachments {
		if rec.ContainerID == id {
			rec.Labels = maps.Clone(labels)
			updated = append(updated, rec)
		}
	}
	if len(updated) == 0 {
		return nil, fmt.Errorf("%w: %q", ErrUnknownContainer, id)
	}
	if err := a.store.putAll(updated); err != nil {
		return nil, fmt.Errorf("persist the labels of container %s: %w", id, err)
	}
	for _, rec := range updated {
		a.attachments[rec.Key()] = rec
	}
	slices.SortFunc(updated, func(x, y Attachment) int { return strings.Compare(x.IfName, y.IfName) })
	return updated, nil
}
