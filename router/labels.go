package router

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh/identity"
)

// Container labels (issue #15, Policy 1). A container's labels come with its ADD (cni:
// args.cni.labels and WEFT_LABELS), are stored with its attachments (ipam.Attachment.Labels),
// change at run time through POST /v1/labels (`weft label`), and travel to every peer on the
// "labels" gossip channel, one record per container interface:
//
//   - The owning peer publishes a record {peer, address, container, network, labels,
//     version} signed with its identity; a change is one broadcast of that one record
//     (O(1) per change, spread in O(log N) rounds), a DEL a signed tombstone.
//   - Push/pull carries every record known (as DNS's does), so a joiner or a peer that missed
//     a broadcast converges; O(records) per exchange, bounded by maxLabelRecordsPerPeer.
//   - Records are untrusted input: each is checked (names, address, labels as cni checks
//     them, sizes), its signature verified against the key the mesh pinned for its peer, and
//     only a newer version replaces an older one. A refusal is counted
//     (weft_labels_refused_total) and changes nothing. A peer never takes a record in its
//     own name from gossip: it is the source of those.
//
// The labels a record carries are at most cni.MaxLabels; a record too large for one gossip
// broadcast (long prefixed keys) reaches the others by push/pull only.

const labelsChannel = "labels"

// labelSignDomain separates label-record signatures from every other identity signature.
const labelSignDomain = "weft labels v1"

// Bounds on label gossip.
const (
	// maxLabelRecordsPerPeer bounds the records (tombstones included) held per peer.
	maxLabelRecordsPerPeer = 4096
	// maxLabelStateBytes bounds one push/pull state received.
	maxLabelStateBytes = 8 << 20
	// maxLabelBroadcast: a record encoded larger goes by push/pull only.
	maxLabelBroadcast = 900
	// labelTombstoneAge is how long a tombstone is kept (long enough for every peer to see it
	// through push/pull).
	labelTombstoneAge = 10 * time.Minute
	maxLabelNameLen   = 253
)

// labelRecord is one container interface's labels as its peer publishes them.
type labelRecord struct {
	Peer      string            `json:"p"`
	Addr      netip.Addr        `json:"a"`
	Container string            `json:"c"`
	Name      string            `json:"nm,omitempty"`
	Network   string            `json:"n"`
	Labels    map[string]string `json:"l,omitempty"`
	Version   uint64            `json:"v"`
	Deleted   bool              `json:"d,omitempty"`
	Sig       []byte            `json:"s,omitempty"`
}

// seal is what signing and verifying need of r (signedrecord.go).
func (r labelRecord) seal() recordSeal {
	sig := r.Sig
	r.Sig = nil
	return recordSeal{peer: r.Peer, sig: sig, body: r}
}

// signedBytes is what the owner signs: the record without its signature (tests forge
// records with it).
func (r labelRecord) signedBytes() []byte { return r.seal().signedBytes() }

// check says what is wrong with a record received from elsewhere. Pure.
func (r labelRecord) check() error {
	switch {
	case r.Peer == "" || len(r.Peer) > maxLabelNameLen:
		return fmt.Errorf("record names peer %q", r.Peer)
	case !r.Addr.IsValid():
		return fmt.Errorf("record of %s has no address", r.Peer)
	case r.Container == "" || len(r.Container) > maxLabelNameLen:
		return fmt.Errorf("record of %s names container %q", r.Peer, r.Container)
	case len(r.Name) > maxLabelNameLen:
		return fmt.Errorf("record of %s: name of %d bytes", r.Peer, len(r.Name))
	case r.Network == "" || len(r.Network) > maxLabelNameLen:
		return fmt.Errorf("record of %s names network %q", r.Peer, r.Network)
	case r.Version == 0:
		return fmt.Errorf("record of %s for %s has version 0", r.Peer, r.Addr)
	case r.Deleted && len(r.Labels) > 0:
		return fmt.Errorf("tombstone of %s for %s carries labels", r.Peer, r.Addr)
	}
	if err := cni.CheckLabels(r.Labels); err != nil {
		return fmt.Errorf("record of %s for %s: %v", r.Peer, r.Addr, err)
	}
	return nil
}

type labelKey struct {
	peer string
	addr netip.Addr
}

// labelMessage is a broadcast (one record) or a push/pull state (all of them).
type labelMessage struct {
	Records []labelRecord `json:"r"`
}

// labelStore holds every container interface's labels known to this peer: its own, and the
// others' as gossip brought them. A mesh.ChannelHandler (concurrency: every method safe to
// call from memberlist's goroutines; none blocks). Costs: a local change O(1) plus one
// broadcast; a received record O(1) plus one signature check; push/pull O(records).
type labelStore struct {
	self      string
	signing   recordSigning          // signs ours, verifies the others'
	broadcast func(msg []byte) error // nil: nothing sent
	refusedC  *prometheus.CounterVec
	log       *slog.Logger
	now       func() time.Time

	mu      sync.Mutex // guards the fields below
	recs    map[labelKey]labelRecord
	deleted map[labelKey]time.Time // local time each tombstone was stored, for expiry
	perPeer map[string]int
	clock   uint64
	changed chan struct{} // signalled (never blocking) when any record changed
	// down maps a peer the mesh reported dead or gone to when; its records are dropped once
	// it stays down downGrace, and refused from gossip from then until it is back (so that
	// a peer that has not dropped them yet cannot bring them back).
	down      map[string]time.Time
	downGrace time.Duration
}

type labelStoreConfig struct {
	Self      string
	Signer    identity.Signer                             // nil: unsigned
	Keys      func(peer string) (ed25519.PublicKey, bool) // nil: unchecked
	Broadcast func(msg []byte) error
	// Registerer takes weft_labels_refused_total; nil registers nothing.
	Registerer prometheus.Registerer
	// DownGrace is how long a dead peer's records are kept (as its DNS names are); 0: 30 s.
	DownGrace time.Duration
	// Logger gets refusals at debug level (they are counted either way); nil: discarded.
	Logger *slog.Logger
}

func newLabelStore(cfg labelStoreConfig) (*labelStore, error) {
	s := &labelStore{
		self: cfg.Self, broadcast: cfg.Broadcast, now: time.Now, log: cfg.Logger,
		signing: recordSigning{domain: labelSignDomain, signer: cfg.Signer, keys: cfg.Keys},
		recs:    map[labelKey]labelRecord{}, deleted: map[labelKey]time.Time{}, perPeer: map[string]int{},
		changed: make(chan struct{}, 1), down: map[string]time.Time{}, downGrace: cfg.DownGrace,
		refusedC: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_labels_refused_total",
			Help: "Gossiped container label records refused (nothing changed), by reason.",
		}, []string{"reason"}),
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.downGrace <= 0 {
		s.downGrace = 30 * time.Second
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(s.refusedC); err != nil {
			return nil, fmt.Errorf("register label metrics: %w", err)
		}
	}
	return s, nil
}

// nextVersionLocked is the owner's clock: above every version it used, and at least the
// wall clock in ns, so that a restarted peer's records win over its older ones.
func (s *labelStore) nextVersionLocked() uint64 {
	s.clock = max(s.clock+1, uint64(s.now().UnixNano()))
	return s.clock
}

// publish stores and broadcasts this peer's record for a (labels as a is labelled now).
func (s *labelStore) publish(a ipam.Attachment) {
	s.write(labelRecord{Addr: a.Address, Container: a.ContainerID, Name: a.Name, Network: a.Network, Labels: maps.Clone(a.Labels)})
}

// unpublish replaces this peer's record for a with a tombstone.
func (s *labelStore) unpublish(a ipam.Attachment) {
	s.write(labelRecord{Addr: a.Address, Container: a.ContainerID, Name: a.Name, Network: a.Network, Deleted: true})
}

func (s *labelStore) write(r labelRecord) {
	if len(r.Labels) == 0 {
		r.Labels = nil
	}
	s.mu.Lock()
	r.Peer, r.Version = s.self, s.nextVersionLocked()
	r.Sig = s.signing.sign(r.seal())
	s.storeLocked(r)
	s.mu.Unlock()
	s.notify()
	if s.broadcast == nil {
		return
	}
	msg, err := json.Marshal(labelMessage{Records: []labelRecord{r}})
	if err != nil || len(msg) > maxLabelBroadcast {
		return // push/pull carries it
	}
	_ = s.broadcast(msg) // best effort: push/pull carries what a broadcast loses
}

// storeLocked puts r in place of what is stored under its key. Caller holds mu.
func (s *labelStore) storeLocked(r labelRecord) {
	k := labelKey{r.Peer, r.Addr}
	if _, ok := s.recs[k]; !ok {
		s.perPeer[r.Peer]++
	}
	s.recs[k] = r
	if r.Deleted {
		s.deleted[k] = s.now()
	} else {
		delete(s.deleted, k)
	}
}

func (s *labelStore) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *labelStore) refuse(reason string, err error) {
	s.refusedC.WithLabelValues(reason).Inc()
	// Debug: gossip repeats a bad record to every peer many times; the counter is the alarm.
	s.log.Debug("label record refused; nothing changed", "reason", reason, "err", err)
}

// merge takes the records of a message, each checked on its own: a bad one is refused and
// counted, the good ones kept. It returns how many changed the store.
func (s *labelStore) merge(recs []labelRecord) int {
	changed := 0
	for _, r := range recs {
		if err := r.check(); err != nil {
			s.refuse("invalid", err)
			continue
		}
		if r.Peer == s.self {
			continue // this peer is the source of its own records
		}
		k := labelKey{r.Peer, r.Addr}
		s.mu.Lock()
		cur, have := s.recs[k]
		full := !have && s.perPeer[r.Peer] >= maxLabelRecordsPerPeer
		downAt, isDown := s.down[r.Peer]
		expired := isDown && s.now().Sub(downAt) >= s.downGrace
		s.mu.Unlock()
		if !supersedes(r.Version, cur.Version, have) {
			continue // old news: not worth a signature check
		}
		if expired {
			s.refuse("down", fmt.Errorf("record of %s, which is down", r.Peer))
			continue
		}
		if full {
			s.refuse("full", fmt.Errorf("peer %s has %d label records, at most %d", r.Peer, maxLabelRecordsPerPeer, maxLabelRecordsPerPeer))
			continue
		}
		if err := s.signing.verify(r.seal()); err != nil {
			s.refuse("signature", fmt.Errorf("record for %s: %w", r.Addr, err))
			continue
		}
		s.mu.Lock()
		if cur, have := s.recs[k]; supersedes(r.Version, cur.Version, have) {
			s.storeLocked(r)
			changed++
		}
		s.mu.Unlock()
	}
	if changed > 0 {
		s.notify()
	}
	return changed
}

// NotifyMsg takes one broadcast record.
func (s *labelStore) NotifyMsg(msg []byte) {
	m, reason, err := decodeGossip[labelMessage]("broadcast", msg, maxLabelBroadcast*2)
	if err != nil {
		s.refuse(reason, err)
		return
	}
	s.merge(m.Records)
}

// sweepLocked drops tombstones old enough that every peer has seen them, and the records of
// peers down longer than downGrace. Caller holds mu. O(records).
func (s *labelStore) sweepLocked() {
	now := s.now()
	dropped := false
	for k, r := range s.recs {
		at, isDown := s.down[k.peer]
		gone := isDown && now.Sub(at) >= s.downGrace
		if del, ok := s.deleted[k]; gone || (ok && now.Sub(del) > labelTombstoneAge) {
			dropped = dropped || !r.Deleted
			delete(s.deleted, k)
			delete(s.recs, k)
			if s.perPeer[k.peer]--; s.perPeer[k.peer] <= 0 {
				delete(s.perPeer, k.peer)
			}
		}
	}
	if dropped {
		s.notify()
	}
}

// peerDown and peerUp are the membership hooks (as DNS has them). Like forgetPeer, they
// do nothing on a nil store (a Peer built in part, as tests build one).
func (s *labelStore) peerDown(peer string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	if _, ok := s.down[peer]; !ok {
		s.down[peer] = s.now()
	}
	s.mu.Unlock()
}

func (s *labelStore) peerUp(peer string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	delete(s.down, peer)
	s.mu.Unlock()
}

// LocalState is every record known, after a sweep. O(records).
func (s *labelStore) LocalState(bool) []byte {
	s.mu.Lock()
	s.sweepLocked()
	m := labelMessage{Records: make([]labelRecord, 0, len(s.recs))}
	for _, r := range s.recs {
		m.Records = append(m.Records, r)
	}
	s.mu.Unlock()
	b, _ := json.Marshal(m)
	return b
}

// MergeRemoteState merges another peer's LocalState.
func (s *labelStore) MergeRemoteState(buf []byte, _ bool) {
	m, reason, err := decodeGossip[labelMessage]("state", buf, maxLabelStateBytes)
	if err != nil {
		s.refuse(reason, err)
		return
	}
	s.merge(m.Records)
}

// forgetPeer drops every record of peer (removed with rmpeer); O(records).
func (s *labelStore) forgetPeer(peer string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	for k := range s.recs {
		if k.peer == peer {
			delete(s.recs, k)
			delete(s.deleted, k)
		}
	}
	delete(s.perPeer, peer)
	s.mu.Unlock()
	s.notify()
}

// remote lists the live records of other peers, by peer and address. O(records).
func (s *labelStore) remote() []EndpointInfo {
	s.mu.Lock()
	s.sweepLocked()
	out := make([]EndpointInfo, 0, len(s.recs))
	for _, r := range s.recs {
		if r.Deleted || r.Peer == s.self {
			continue
		}
		out = append(out, EndpointInfo{Peer: r.Peer, ContainerID: r.Container, Name: r.Name, Network: r.Network, Address: r.Addr, Labels: maps.Clone(r.Labels),
			Changed: time.Unix(0, int64(r.Version))})
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b EndpointInfo) int {
		if c := strings.Compare(a.Peer, b.Peer); c != 0 {
			return c
		}
		return a.Address.Compare(b.Address)
	})
	return out
}

// EndpointInfo is one container interface and its labels, for the policy wiring.
type EndpointInfo struct {
	Peer        string            `json:"peer"`
	ContainerID string            `json:"container_id"`
	IfName      string            `json:"ifname,omitempty"` // this peer's attachments only
	Name        string            `json:"name,omitempty"`
	Network     string            `json:"network"`
	Address     netip.Addr        `json:"address"`
	Labels      map[string]string `json:"labels,omitempty"`
	// Changed is when the owner wrote the record (its version is its clock in ns); gossiped
	// records only, for the policy's sync lag.
	Changed time.Time `json:"changed,omitzero"`
}

// endpoints lists this peer's attachments with their labels, ordered by key. O(attachments).
func (p *Peer) endpoints() []EndpointInfo {
	atts := p.alloc.Attachments()
	out := make([]EndpointInfo, 0, len(atts))
	for _, a := range atts {
		out = append(out, EndpointInfo{Peer: p.cfg.Name, ContainerID: a.ContainerID, IfName: a.IfName, Name: a.Name,
			Network: a.Network, Address: a.Address, Labels: maps.Clone(a.Labels)})
	}
	return out
}

// remoteEndpoints lists the other peers' container interfaces with their labels, as gossip
// brought them. O(records).
func (p *Peer) remoteEndpoints() []EndpointInfo {
	if p.labels == nil {
		return nil
	}
	return p.labels.remote()
}

// labelsChanged is signalled (coalesced, buffered 1) whenever any container's labels changed
// here or arrived by gossip: the policy wiring recomputes on it. One consumer: two would
// each see only some of the signals.
func (p *Peer) labelsChanged() <-chan struct{} {
	if p.labels == nil {
		return nil
	}
	return p.labels.changed
}

// publishLabels and unpublishLabels tell the mesh about an attachment made or removed here.
func (p *Peer) publishLabels(a ipam.Attachment) {
	if p.labels != nil {
		p.labels.publish(a)
	}
}

func (p *Peer) unpublishLabels(a ipam.Attachment) {
	if p.labels != nil {
		p.labels.unpublish(a)
	}
}

// LabelRequest is the body of POST /v1/labels: set and remove labels of a container attached
// on this peer, kubectl style (`weft label CONTAINER k=v k2-`).
type LabelRequest struct {
	// Container is the container ID, or the name it was attached with when that is unique.
	Container string            `json:"container"`
	Set       map[string]string `json:"set,omitempty"`
	Remove    []string          `json:"remove,omitempty"`
}

// LabelResult is the container's labels after the change.
type LabelResult struct {
	Container string            `json:"container"`
	Labels    map[string]string `json:"labels"`
}

// errNoContainer answers a label change for a container not attached here.
var errNoContainer = errors.New("no such container")

// applyLabelChange is the labels after removing remove and setting set, checked; a key both
// set and removed is refused. Pure.
func applyLabelChange(cur map[string]string, set map[string]string, remove []string) (map[string]string, error) {
	out := maps.Clone(cur)
	if out == nil {
		out = map[string]string{}
	}
	for _, k := range remove {
		if _, both := set[k]; both {
			return nil, fmt.Errorf("label %q is both set and removed", k)
		}
		delete(out, k) // removing a label that is not there is success, as kubectl has it
	}
	for k, v := range set {
		out[k] = v
	}
	if err := cni.CheckLabels(out); err != nil {
		return nil, err
	}
	return out, nil
}

// setLabels serves POST /v1/labels: the new labels are checked, stored with every attachment
// of the container, then published. Bad labels 400, unknown container 404; nothing changes
// on either.
func (p *Peer) setLabels(req LabelRequest) (*LabelResult, error) {
	bad := func(format string, args ...any) error {
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "label "+format, args...)
	}
	if req.Container == "" {
		return nil, bad("no container named")
	}
	if len(req.Set)+len(req.Remove) == 0 {
		return nil, bad("%s: no label to set or remove", req.Container)
	}
	id, err := p.containerByIDOrName(req.Container)
	if err != nil {
		return nil, newAPIError(http.StatusNotFound, types.ErrUnknownContainer, "label %s: %v", req.Container, err)
	}
	// One container at a time: two label changes racing would each start from the old set.
	defer p.lockKey(ipam.Key{ContainerID: id})()
	atts := p.alloc.Container(id)
	if len(atts) == 0 {
		return nil, newAPIError(http.StatusNotFound, types.ErrUnknownContainer, "label %s: %v attached on peer %s", req.Container, errNoContainer, p.cfg.Name)
	}
	labels, err := applyLabelChange(atts[0].Labels, req.Set, req.Remove)
	if err != nil {
		return nil, bad("%s: %v", req.Container, err)
	}
	updated, err := p.alloc.SetLabels(id, labels)
	if errors.Is(err, ipam.ErrUnknownContainer) {
		return nil, newAPIError(http.StatusNotFound, types.ErrUnknownContainer, "label %s: %v", req.Container, err)
	} else if err != nil {
		return nil, err
	}
	for _, a := range updated {
		p.publishLabels(a)
	}
	p.log.Info("labels changed", "container", id, "labels", labels)
	return &LabelResult{Container: id, Labels: labels}, nil
}

// containerByIDOrName finds the container attached here with ID s, or else the one attached
// with name s (refused when two share it). O(attachments).
func (p *Peer) containerByIDOrName(s string) (string, error) {
	if len(p.alloc.Container(s)) > 0 {
		return s, nil
	}
	var ids []string
	for _, a := range p.alloc.Attachments() {
		if a.Name == s && !slices.Contains(ids, a.ContainerID) {
			ids = append(ids, a.ContainerID)
		}
	}
	switch len(ids) {
	case 0:
		return "", fmt.Errorf("%w attached on peer %s (by ID or name)", errNoContainer, p.cfg.Name)
	case 1:
		return ids[0], nil
	}
	return "", fmt.Errorf("name %q is shared by containers %s; give the container ID", s, strings.Join(ids, ", "))
}
