package mesh

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/weftnet/weft/mesh/identity"
)

// Mesh is this peer's membership in the mesh. Create it with New; all
// methods are safe for concurrent use (see the package documentation for
// the full contract).
type Mesh struct {
	cfg     Config // validated, defaults filled in; read-only after New
	log     *slog.Logger
	metrics *metrics
	queue   *memberlist.TransmitLimitedQueue
	lsQueue *memberlist.TransmitLimitedQueue      // link-state channel only (Config.LinkStateRetransmitMult)
	coords  *coords                               // network coordinates; own leaf lock
	ml      atomic.Pointer[memberlist.Memberlist] // set once by Start
	wake    chan struct{}                         // cap 1: pokes the join loop
	seen    seen                                  // ids of recent channel messages
	notes   suspicionNotes                        // which suspect and alive notes go out (suspicion.go)
	nodes   atomic.Int64                          // alive and suspect peers, set by updateGaugeLocked; see numNodes
	pins    *keyPins                              // public keys pinned to names; own leaf lock
	pinned  chan struct{}                         // cap 1: a name was pinned, the state loop saves the pins
	downed  chan struct{}                         // cap 1: a peer died or left, the dead-retry loop wakes

	lifeMu   sync.Mutex // serializes Start, Leave and Close; guards following
	started  bool
	closed   bool
	closeErr error
	cancel   context.CancelFunc // stops the loops started by Start
	wg       sync.WaitGroup     // the loops started by Start

	metaMu    sync.Mutex // guards following
	meta      Metadata   // local metadata, always valid
	metaBytes []byte     // meta encoded, what NodeMeta returns

	accepted acceptedAlives // alive messages already checked (delegate.go)

	chMu     sync.RWMutex // guards following
	channels map[string]ChannelHandler

	mu      sync.Mutex // guards following; taken inside memberlist's node lock, so never call memberlist while holding it
	peers   map[string]*Peer
	subs    map[*subscriber]struct{}
	targets []*target           // seeds and Connect targets, in the order added
	leaving map[string]struct{} // peers that announced they leave
	// suspects: when each suspicion held here expires unless renewed (suspicion.go).
	suspects map[string]*suspicion
	// confirming: failed direct probes waiting for their confirming ping (suspicion.go);
	// confirms counts the pings under way, for Close.
	confirming map[string]*time.Timer
	confirms   sync.WaitGroup
	left       bool // Leave was called: stop joining
	shut       bool // Close began: no more events
}

type subscriber struct {
	ch   chan Event
	lost bool // events were dropped; send EventOverflow first
}

// New validates cfg, fills in defaults (advertise address, metadata name
// and underlay) and registers the metrics. It does no network I/O; Start
// does.
func New(cfg Config) (*Mesh, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Seeds = slices.Clone(cfg.Seeds)
	cfg.Password = slices.Clone(cfg.Password)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if !cfg.AdvertiseAddr.IsValid() {
		if cfg.BindAddr.IsValid() && !cfg.BindAddr.IsUnspecified() {
			cfg.AdvertiseAddr = cfg.BindAddr
		} else {
			a, err := DefaultAdvertiseAddr()
			if err != nil {
				return nil, fmt.Errorf("%w: no advertise address: %v", ErrInvalidConfig, err)
			}
			cfg.AdvertiseAddr = a
		}
	}
	cfg.AdvertiseAddr = cfg.AdvertiseAddr.Unmap()
	md := cfg.Metadata.Clone()
	if md.Name == "" {
		md.Name = cfg.Name
	}
	if !md.Underlay.IsValid() {
		md.Underlay = cfg.AdvertiseAddr
	}
	md.PublicKey = cfg.Identity.Public()
	enc, err := md.Encode()
	if err != nil {
		return nil, fmt.Errorf("mesh: local metadata: %w", err)
	}
	cfg.Metadata = md
	pins, err := loadKeyPins(cfg.PinsPath)
	if err != nil {
		return nil, err
	}
	// Our own name is pinned to our key, so that nobody else takes it.
	if err := pins.check(cfg.Name, md.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: this peer's identity does not match the key pinned for its own name (%v); "+
			"was %s replaced? remove the pins file %s to start over", ErrInvalidConfig, err, identity.FileName, cfg.PinsPath)
	}

	m := &Mesh{
		pins:       pins,
		cfg:        cfg,
		log:        cfg.Logger,
		wake:       make(chan struct{}, 1),
		pinned:     make(chan struct{}, 1),
		downed:     make(chan struct{}, 1),
		meta:       md,
		metaBytes:  enc,
		channels:   make(map[string]ChannelHandler),
		peers:      make(map[string]*Peer),
		subs:       make(map[*subscriber]struct{}),
		leaving:    make(map[string]struct{}),
		suspects:   make(map[string]*suspicion),
		confirming: make(map[string]*time.Timer),
		coords:     newCoords(),
	}
	m.queue = &memberlist.TransmitLimitedQueue{NumNodes: m.numNodes, RetransmitMult: 4}
	m.lsQueue = &memberlist.TransmitLimitedQueue{NumNodes: m.numNodes, RetransmitMult: cfg.LinkStateRetransmitMult}
	m.metrics, err = newMetrics(cfg.Registerer, func() float64 { return float64(m.queue.NumQueued() + m.lsQueue.NumQueued()) })
	if err != nil {
		return nil, err
	}
	for _, s := range cfg.Seeds {
		t, _ := normalizeTarget(s) // validated above
		m.addTarget(t)
	}
	return m, nil
}

// numNodes feeds the broadcast queue's retransmit count. The queue calls it
// under its lock, so it must not take memberlist's node lock: memberlist
// holds that lock while it logs a suspicion, and onMemberlistLog then
// queues a broadcast (the lock-order inversion froze peers).
func (m *Mesh) numNodes() int {
	return max(1, int(m.nodes.Load()))
}

func (m *Mesh) memberlistConfig() (*memberlist.Config, error) {
	c := m.cfg
	mc := memberlist.DefaultLANConfig()
	mc.Name = c.Name
	bind := c.BindAddr
	if !bind.IsValid() {
		bind = netip.IPv4Unspecified()
	}
	mc.BindAddr = bind.String()
	mc.BindPort = c.BindPort
	mc.AdvertiseAddr = c.AdvertiseAddr.String()
	// With both ports 0 memberlist advertises the port it picked.
	mc.AdvertisePort = c.AdvertisePort
	if mc.AdvertisePort == 0 {
		mc.AdvertisePort = c.BindPort
	}
	mc.GossipInterval = c.GossipInterval
	mc.GossipNodes = c.GossipNodes
	mc.ProbeInterval = c.ProbeInterval
	mc.ProbeTimeout = c.ProbeTimeout
	mc.PushPullInterval = c.PushPullInterval
	mc.SuspicionMult = c.SuspicionMult
	mc.RetransmitMult = c.MembershipRetransmitMult // see the Config field
	// A peer that comes back under its name from another address (new
	// DHCP lease, moved VM) may take the name over once the old one has
	// been dead this long; memberlist's default (never) would refuse it
	// until every peer forgot the dead one.
	mc.DeadNodeReclaimTime = 10 * c.ProbeInterval
	d := delegate{m}
	mc.Delegate = d
	mc.Events = d
	mc.Alive = d
	mc.Ping = d
	mc.Merge = d
	mc.DisableTcpPingsForNode = m.onDirectProbeFailed // always false; see suspicion.go
	mc.Logger = newMemberlistLogger(m.log)
	mc.EnableCompression = c.Compress // off in DefaultConfig: see Config.Compress
	if len(c.Password) > 0 {
		kr, err := memberlist.NewKeyring(nil, GossipKey(c.Password))
		if err != nil {
			return nil, fmt.Errorf("mesh: keyring: %w", err)
		}
		mc.Keyring = kr
		mc.GossipVerifyIncoming = true
		mc.GossipVerifyOutgoing = true
	}
	// Our own transport: memberlist's NetTransport allocates 64 KB per
	// datagram received (transport.go).
	pt, err := newPacketTransport(bind, mc.BindPort, mc.Logger)
	if err != nil {
		return nil, err
	}
	if mc.BindPort == 0 {
		mc.BindPort = pt.Port()
		if mc.AdvertisePort == 0 {
			mc.AdvertisePort = pt.Port()
		}
	}
	mc.Transport = pt
	if c.WrapTransport != nil {
		mc.Transport = c.WrapTransport(pt)
	}
	return mc, nil
}

// Start binds the gossip port and starts the join loop (which tries the
// seeds with backoff until one answers, and again whenever this peer finds
// itself alone) and the state loop (which prunes old dead peers). Cancelling ctx
// stops both loops; Close is still needed to release the sockets.
func (m *Mesh) Start(ctx context.Context) error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if m.started {
		return ErrAlreadyStarted
	}
	mc, err := m.memberlistConfig()
	if err != nil {
		return err
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		if mc.Transport != nil {
			mc.Transport.Shutdown()
		}
		return fmt.Errorf("mesh: start gossip on %s:%d: %w", mc.BindAddr, m.cfg.BindPort, err)
	}
	m.ml.Store(ml)
	m.started = true
	loopCtx, cancel := context.WithCancel(ctx)
	m.cancel = cancel
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		m.joinLoop(loopCtx)
	}()
	go func() {
		defer m.wg.Done()
		m.stateLoop(loopCtx)
	}()
	m.log.Info("mesh: started", "name", m.cfg.Name, "addr", m.Local().Addr,
		"seeds", m.cfg.Seeds, "encrypted", len(m.cfg.Password) > 0)
	return nil
}

// Local returns the local peer.
func (m *Mesh) Local() Peer {
	m.metaMu.Lock()
	md := m.meta.Clone()
	m.metaMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	p := Peer{Name: m.cfg.Name, Self: true, State: StateAlive}
	if e, ok := m.peers[m.cfg.Name]; ok {
		p = e.clone()
	} else {
		port := m.cfg.AdvertisePort
		if port == 0 {
			port = m.cfg.BindPort
		}
		p.Addr = netip.AddrPortFrom(m.cfg.AdvertiseAddr, uint16(port))
	}
	p.Meta = md
	return p
}

// Peers returns every peer this one knows, itself included, sorted by name.
// Dead and left peers stay for Config.DeadPeerRetention.
//
// Alive and dead come from memberlist's events; left from memberlist plus
// the leave intent of Leave; suspect is advisory (see suspicion.go for how
// each is learnt).
func (m *Mesh) Peers() []Peer {
	local := m.Local()
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Peer, 0, len(m.peers)+1)
	for _, p := range m.peers {
		if p.Self {
			continue
		}
		out = append(out, p.clone())
	}
	out = append(out, local)
	slices.SortFunc(out, func(a, b Peer) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Peer returns one peer by name.
func (m *Mesh) Peer(name string) (Peer, bool) {
	if name == m.cfg.Name {
		return m.Local(), true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.peers[name]
	if !ok {
		return Peer{}, false
	}
	return p.clone(), true
}

// PublicKey returns the identity key of a peer this one knows (itself, or
// a member not yet pruned: alive, suspect, or dead or left within
// Config.DeadPeerRetention); false for any other name, so that entries of
// origins that are not members cannot be verified and are refused. The key
// is the one in the member's metadata, which equals the key pinned for the
// name (NotifyAlive refuses metadata with another). It has the shape of
// identity.KeyLookup. O(1).
func (m *Mesh) PublicKey(name string) (ed25519.PublicKey, bool) {
	if name == m.cfg.Name {
		return m.cfg.Metadata.PublicKey, true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.peers[name]
	if !ok || p.Meta.PublicKey == nil {
		return nil, false
	}
	return p.Meta.PublicKey, true
}

// Unpin forgets the public key pinned for a peer name, so that a host that
// was reinstalled (new identity, same name) is accepted again; `weft
// rmpeer` calls it. Our own name cannot be unpinned. The change is written
// at once.
func (m *Mesh) Unpin(name string) error {
	if name == m.cfg.Name {
		return fmt.Errorf("%w: cannot unpin this peer's own name %q", ErrInvalidConfig, name)
	}
	if m.pins.drop(name) {
		m.log.Info("mesh: key pin cleared", "peer", name)
	}
	m.accepted.forget(name)
	return m.pins.flush()
}

// Pinned lists the peer names whose public keys are pinned. O(pins).
func (m *Mesh) Pinned() []string { return m.pins.names() }

// Sign signs msg in domain with this peer's identity (for the packages
// that publish what this peer owns: link state, DNS records, usage).
func (m *Mesh) Sign(domain string, msg []byte) []byte { return m.cfg.Identity.Sign(domain, msg) }

// localMeta returns a copy of the local metadata; safe under memberlist's node lock.
// localMetaBytes is the local metadata as encoded. SetMetadata replaces the slice, never
// writes into it, so the caller may keep it.
func (m *Mesh) localMetaBytes() []byte {
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	return m.metaBytes
}

func (m *Mesh) localMeta() Metadata {
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	return m.meta.Clone()
}

// UpdateMetadata changes the local metadata: fn edits a copy, which must
// stay valid and fit MaxMetadataSize, and keep its Name; otherwise nothing
// changes and the error says why. After Start the change is gossiped at
// once (memberlist UpdateNode). fn runs under a lock: it must not call the
// Mesh.
func (m *Mesh) UpdateMetadata(fn func(*Metadata)) error {
	m.metaMu.Lock()
	md := m.meta.Clone()
	fn(&md)
	if md.Name != m.cfg.Name {
		m.metaMu.Unlock()
		return fmt.Errorf("%w: name %q cannot change to %q", ErrBadMetadata, m.cfg.Name, md.Name)
	}
	if !bytes.Equal(md.PublicKey, m.meta.PublicKey) {
		m.metaMu.Unlock()
		return fmt.Errorf("%w: the public key is the peer's identity and cannot change", ErrBadMetadata)
	}
	enc, err := md.Encode()
	if err != nil {
		m.metaMu.Unlock()
		return err
	}
	m.meta, m.metaBytes = md, enc
	m.metaMu.Unlock()

	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	ml := m.ml.Load()
	m.mu.Lock()
	left := m.left
	m.mu.Unlock()
	if ml == nil || m.closed || left {
		// Not started: Start gossips the new metadata. Left: an alive
		// message now would undo the leave.
		return nil
	}
	// UpdateNode waits until the alive message went out; past the timeout
	// it has still been queued, and push/pull spreads it anyway.
	if err := ml.UpdateNode(10 * m.cfg.GossipInterval); err != nil {
		m.log.Debug("mesh: metadata update not yet gossiped", "err", err)
	}
	return nil
}

// Subscribe returns a channel of changes to remote peers and a function
// that cancels the subscription (and closes the channel; safe to call more
// than once). Close closes every subscription's channel.
//
// Delivery never blocks the mesh: each channel holds Config.EventBuffer
// events; when it is full, events are dropped (counted in
// weft_mesh_events_dropped_total) and the next event delivered is
// EventOverflow, after which the subscriber should re-read Peers. Events
// of one peer arrive in the order this peer observed them.
func (m *Mesh) Subscribe() (<-chan Event, func()) {
	ch := make(chan Event, m.cfg.EventBuffer)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.shut {
		close(ch)
		return ch, func() {}
	}
	s := &subscriber{ch: ch}
	m.subs[s] = struct{}{}
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			if _, ok := m.subs[s]; ok {
				delete(m.subs, s)
				close(s.ch)
			}
		})
	}
}

// Leave tells the other peers that this one leaves on purpose (they mark it
// left rather than dead) and stops the join loop. It first gossips a leave
// intent (waiting up to half the timeout for it to go out), then
// memberlist's leave message (waiting for the rest). Gossip continues until
// Close, which should follow.
func (m *Mesh) Leave(timeout time.Duration) error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.closed {
		return ErrClosed
	}
	ml := m.ml.Load()
	if ml == nil {
		return ErrNotStarted
	}
	m.mu.Lock()
	m.left = true
	m.mu.Unlock()
	m.poke()
	deadline := time.Now().Add(timeout)
	if !m.alone() {
		intent := &leaveIntent{
			msg:  m.newMessage(internalChannel, append([]byte{msgLeaving}, m.cfg.Name...)),
			done: make(chan struct{}),
		}
		m.queue.QueueBroadcast(intent)
		var expire <-chan time.Time
		if timeout > 0 {
			t := time.NewTimer(timeout / 2)
			defer t.Stop()
			expire = t.C
		}
		select {
		case <-intent.done:
		case <-expire:
			m.log.Warn("mesh: leave intent not fully gossiped in time; some peers may see this one as dead")
		}
	}
	rest := time.Duration(0)
	if timeout > 0 {
		rest = max(time.Until(deadline), time.Millisecond)
	}
	if err := ml.Leave(rest); err != nil {
		return fmt.Errorf("mesh: leave: %w", err)
	}
	m.log.Info("mesh: left", "name", m.cfg.Name)
	return nil
}

// Close stops gossip without a leave message (the others will see this
// peer suspect, then dead), waits for the mesh's goroutines, closes the
// subscriptions and unregisters the metrics. Safe to call twice; the
// second call returns the first's result. A join attempt in flight delays
// Close by at most memberlist's TCP timeout (10 s).
func (m *Mesh) Close() error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.closed {
		return m.closeErr
	}
	m.closed = true
	if m.cancel != nil {
		m.cancel()
	}
	if ml := m.ml.Load(); ml != nil {
		if err := ml.Shutdown(); err != nil {
			m.closeErr = fmt.Errorf("mesh: shutdown: %w", err)
		}
	}
	m.wg.Wait()
	if err := m.pins.flush(); err != nil {
		m.log.Error("mesh: key pins not saved", "err", err)
	}
	m.mu.Lock()
	m.shut = true
	for _, s := range m.suspects {
		s.timer.Stop()
	}
	clear(m.suspects)
	for _, t := range m.confirming {
		t.Stop()
	}
	clear(m.confirming)
	for s := range m.subs {
		close(s.ch)
	}
	m.subs = nil
	m.mu.Unlock()
	m.confirms.Wait()
	m.metrics.unregister()
	return m.closeErr
}

// poke wakes the join loop without blocking.
func (m *Mesh) poke() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}
