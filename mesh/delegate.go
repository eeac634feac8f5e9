package mesh

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// delegate adapts the Mesh to memberlist's Delegate, EventDelegate and
// AliveDelegate without putting those methods on *Mesh.
//
// memberlist calls the EventDelegate and AliveDelegate methods while
// holding its node lock, one at a time; the Delegate and PingDelegate
// methods concurrently from its packet, stream and probe goroutines. None
// of them may block or call into memberlist.
type delegate struct{ m *Mesh }

var (
	_ memberlist.Delegate      = delegate{}
	_ memberlist.EventDelegate = delegate{}
	_ memberlist.AliveDelegate = delegate{}
	_ memberlist.PingDelegate  = delegate{}
	_ memberlist.MergeDelegate = delegate{}
)

// NodeMeta returns the encoded local metadata (Encode keeps it within
// MaxMetadataSize, which is the limit memberlist passes).
func (d delegate) NodeMeta(limit int) []byte {
	d.m.metaMu.Lock()
	defer d.m.metaMu.Unlock()
	if len(d.m.metaBytes) > limit {
		d.m.log.Error("mesh: metadata exceeds memberlist's limit", "size", len(d.m.metaBytes), "limit", limit)
		return nil
	}
	return append([]byte(nil), d.m.metaBytes...)
}

func (d delegate) NotifyMsg(b []byte) { d.m.notifyMsg(b) }

func (d delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.m.getBroadcasts(overhead, limit)
}

func (d delegate) LocalState(join bool) []byte { return d.m.localState(join) }

func (d delegate) MergeRemoteState(b []byte, join bool) { d.m.mergeRemoteState(b, join) }

// NotifyAlive refuses peers whose metadata does not decode or names another
// peer: they never become members. memberlist logs the refusal ("ignoring
// alive message for 'x': <our error>") at warning level.
//
// memberlist calls it for every alive message, repeats included (each is
// retransmitted 6·log₁₀N times), before it looks at the incarnation: a message
// whose metadata is byte for byte the one last accepted from that peer, while
// our own metadata (which AcceptPeer reads) is unchanged too, is accepted
// without decoding and checking it again.
func (d delegate) NotifyAlive(n *memberlist.Node) error {
	local := d.m.localMetaBytes()
	if d.m.accepted.repeat(n.Name, n.Meta, local) {
		return nil
	}
	if err := d.checkAlive(n); err != nil {
		return err
	}
	d.m.accepted.remember(n.Name, n.Meta, local)
	return nil
}

// checkAlive is NotifyAlive's full check.
func (d delegate) checkAlive(n *memberlist.Node) error {
	md, err := DecodeMetadata(n.Meta)
	if err == nil && md.Name != n.Name {
		err = fmt.Errorf("%w: metadata names %q", ErrBadMetadata, md.Name)
	}
	if err != nil {
		d.m.metrics.metadataRejected.Inc()
		return err
	}
	if err := d.m.checkKey(md); err != nil {
		return err
	}
	return d.accept(md)
}

// checkKey refuses metadata without an identity key, or with another key
// than the one pinned for its name (pinning it on first sight). Counted
// and logged. Runs under memberlist's node lock: the pins' lock is a leaf.
func (m *Mesh) checkKey(md Metadata) error {
	if md.PublicKey == nil {
		m.metrics.keyRejected.WithLabelValues("no_key").Inc()
		err := fmt.Errorf("%w: peer %q announces no identity key (a weft older than signed gossip?)", ErrBadMetadata, md.Name)
		m.log.Warn("mesh: peer refused", "peer", md.Name, "err", err)
		return err
	}
	_, had := m.pins.get(md.Name)
	if err := m.pins.check(md.Name, md.PublicKey); err != nil {
		m.metrics.keyRejected.WithLabelValues("mismatch").Inc()
		m.log.Error("mesh: peer refused", "peer", md.Name, "err", err)
		return err
	}
	if !had {
		select { // the state loop saves the new pin now, not at its next tick
		case m.pinned <- struct{}{}:
		default:
		}
	}
	return nil
}

// NotifyMerge refuses a push/pull merge (a join) that would bring in a peer the
// AcceptPeer hook refuses: the two sides stay apart and both log why.
func (d delegate) NotifyMerge(nodes []*memberlist.Node) error {
	for _, n := range nodes {
		md, err := DecodeMetadata(n.Meta)
		if err != nil {
			continue // NotifyAlive refuses it on its own
		}
		if err := d.accept(md); err != nil {
			d.m.log.Error("mesh: merge refused", "peer", n.Name, "err", err)
			return err
		}
	}
	return nil
}

func (d delegate) accept(remote Metadata) error {
	if d.m.cfg.AcceptPeer == nil || remote.Name == d.m.cfg.Name {
		return nil
	}
	return d.m.cfg.AcceptPeer(d.m.localMeta(), remote)
}

func (d delegate) NotifyJoin(n *memberlist.Node) {
	d.m.observe(n.Name, nodeAddr(n), n.Meta, StateAlive, EventJoin)
}

func (d delegate) NotifyUpdate(n *memberlist.Node) {
	d.m.observe(n.Name, nodeAddr(n), n.Meta, StateAlive, EventUpdate)
}

// NotifyLeave reports a peer that memberlist declared dead or that left.
// memberlist knows which (a leave is a dead message sent by the node about
// itself) but does not say: the Node it passes has State StateAlive
// whatever happened (nodeState shadows Node.State, hashicorp/memberlist#266).
// So Leave first broadcasts a leave intent on the internal channel, like
// Serf does, and a peer with a recent intent is recorded as left.
func (d delegate) NotifyLeave(n *memberlist.Node) {
	d.m.accepted.forget(n.Name)
	d.m.observe(n.Name, nodeAddr(n), n.Meta, StateDead, EventDead)
}

// NotifyPingComplete: a direct probe of the peer was acknowledged. The
// peer is alive now (clears a suspicion of it, see suspicion.go), and the
// ack carried its network coordinate (see coordinate.go).
func (d delegate) NotifyPingComplete(n *memberlist.Node, rtt time.Duration, payload []byte) {
	d.m.onDirectAck(n.Name)
	d.m.onPingComplete(n.Name, rtt, payload)
}

// AckPayload puts our signed network coordinate on every ack we send.
// O(dimensions) plus one signature.
func (d delegate) AckPayload() []byte { return d.m.ackPayload() }

// nodeAddr copies a node's address. Only call it inside memberlist's
// callbacks, where the node lock makes reading Node fields safe.
func nodeAddr(n *memberlist.Node) netip.AddrPort {
	a, _ := netip.AddrFromSlice(n.Addr)
	return netip.AddrPortFrom(a.Unmap(), n.Port)
}

// observe records what an EventDelegate callback reported and publishes
// the event.
func (m *Mesh) observe(name string, addr netip.AddrPort, meta []byte, state State, ev EventType) {
	md, err := DecodeMetadata(meta)
	if err != nil && state == StateAlive {
		// NotifyAlive refused such nodes; only a node that was alive
		// before could get here (e.g. metadata from a dead message).
		m.log.Warn("mesh: peer metadata did not decode", "peer", name, "err", err)
	}
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.shut {
		return
	}
	p, ok := m.peers[name]
	if !ok {
		p = &Peer{Name: name, Self: name == m.cfg.Name, State: StateDead}
		m.peers[name] = p
	}
	prev := p.State
	switch ev {
	case EventDead:
		if _, ok := m.leaving[name]; ok {
			state, ev = StateLeft, EventLeave
		}
	case EventJoin:
		delete(m.leaving, name)
	}
	if err == nil {
		p.Meta = md
	}
	if addr.IsValid() {
		p.Addr = addr
	}
	if state != prev || !ok {
		p.State, p.Since = state, now
	}
	if state == StateLeft {
		m.coords.forget(name) // gone for good; a dead peer's is kept until prune
	}
	m.emitLocked(ev, p, prev)
}

// emitLocked counts an event, publishes it to subscribers and refreshes the
// members gauge. Events about the local peer are not published.
func (m *Mesh) emitLocked(t EventType, p *Peer, prev State) {
	m.metrics.events.WithLabelValues(t.String()).Inc()
	m.updateGaugeLocked()
	if p.Self {
		return
	}
	switch t {
	case EventDead, EventLeave:
		select { // a member to retry (deadRetryLoop)
		case m.downed <- struct{}{}:
		default:
		}
	}
	switch t {
	case EventJoin, EventDead, EventLeave:
		m.log.Info("mesh: peer "+t.String(), "peer", p.Name, "addr", p.Addr, "prev", prev)
	case EventSuspect, EventAlive:
		m.log.Info("mesh: peer "+t.String(), "peer", p.Name, "addr", p.Addr)
	default:
		m.log.Debug("mesh: peer "+t.String(), "peer", p.Name)
	}
	ev := Event{Type: t, Peer: p.clone(), Prev: prev}
	for s := range m.subs {
		if s.lost {
			select {
			case s.ch <- Event{Type: EventOverflow}:
				s.lost = false
			default:
				m.metrics.eventsDropped.Inc()
				continue
			}
		}
		select {
		case s.ch <- ev:
		default:
			s.lost = true
			m.metrics.eventsDropped.Inc()
		}
	}
}

func (m *Mesh) updateGaugeLocked() {
	var n [len(stateNames)]int
	for _, p := range m.peers {
		n[p.State]++
	}
	for s, c := range n {
		m.metrics.members.WithLabelValues(State(s).String()).Set(float64(c))
	}
	m.nodes.Store(int64(n[StateAlive] + n[StateSuspect]))
}

// stateLoop prunes dead and left peers past Config.DeadPeerRetention, at
// stateLoopEvery, and saves the key pins after a name was pinned: at once, or
// pinsFlushGap after the last save, so a join of many peers costs a few
// writes (each fsyncs), as when the pins were saved every second. Each tick
// also saves, which retries a failed save.
func (m *Mesh) stateLoop(ctx context.Context) {
	tick := time.NewTicker(stateLoopEvery(m.cfg.ProbeInterval, m.cfg.DeadPeerRetention))
	defer tick.Stop()
	flush := time.NewTimer(0)
	<-flush.C
	defer flush.Stop()
	var lastFlush time.Time
	armed := false // flush is running
	save := func() {
		lastFlush, armed = time.Now(), false
		if err := m.pins.flush(); err != nil {
			m.log.Error("mesh: key pins not saved", "err", err)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-m.pinned:
			if armed {
				continue // the save due takes this pin too
			}
			if wait := pinsFlushGap - time.Since(lastFlush); wait > 0 {
				flush.Reset(wait)
				armed = true
				continue
			}
			save()
		case <-flush.C:
			save()
		case <-tick.C:
			m.prune(time.Now())
			save()
		}
	}
}

// pinsFlushGap is the least time between two saves of the key pins caused by new pins.
const pinsFlushGap = time.Second

// stateLoopEvery is the state loop's period: a tenth of the retention, so a dead
// peer goes at most 10 % late, but at most a minute and never faster than the
// probe interval (the old period). An idle peer need not wake every second to
// prune peers kept for an hour (the default).
func stateLoopEvery(probe, retention time.Duration) time.Duration {
	every := time.Minute
	if retention > 0 {
		every = min(every, retention/10)
	}
	return max(every, probe, 10*time.Millisecond)
}

func (m *Mesh) prune(now time.Time) {
	r := m.cfg.DeadPeerRetention
	if r <= 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	pruned := false
	for name, p := range m.peers {
		if !p.Self && !p.Up() && now.Sub(p.Since) > r {
			delete(m.peers, name)
			m.coords.forget(name)
			pruned = true
		}
	}
	if pruned {
		m.updateGaugeLocked()
	}
}

// acceptedAlives remembers, per peer, the metadata of the last alive message
// that passed every check and our own metadata at the time. Entries go when
// the peer dies or leaves, or its key pin is cleared (so a new key is pinned
// afresh), which bounds it by the members. Its lock is a leaf.
type acceptedAlives struct {
	mu   sync.Mutex
	seen map[string]acceptedAlive
}

type acceptedAlive struct{ remote, local []byte }

// repeat reports whether remote (from peer name) and local are what was last
// accepted.
func (a *acceptedAlives) repeat(name string, remote, local []byte) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.seen[name]
	return ok && bytes.Equal(e.remote, remote) && bytes.Equal(e.local, local)
}

func (a *acceptedAlives) remember(name string, remote, local []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.seen == nil {
		a.seen = map[string]acceptedAlive{}
	}
	a.seen[name] = acceptedAlive{remote: bytes.Clone(remote), local: local}
}

func (a *acceptedAlives) forget(name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.seen, name)
}
