package mesh

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// How the peer table learns about suspicion and leaves.
//
// memberlist tracks suspect/dead/left internally but only reports joins,
// updates and "leaves" (dead or left alike) through its EventDelegate. The
// State of the Nodes it hands out, in callbacks and in Members(), is always
// StateAlive: its nodeState keeps the real state in a field of its own that
// shadows Node.State (hashicorp/memberlist#266, still so in v0.7.0; the fix,
// memberlist#321, is unmerged). So polling Members() can see neither
// suspicion nor the difference between dead and left, and the mesh learns
// them through memberlist's typed hooks instead (never its log text):
//
//   - Config.DisableTcpPingsForNode(name) is called by the prober exactly
//     when its direct UDP probe of name failed, to decide on the TCP
//     fallback ping (memberlist's DisableTcpPings documents that fallback
//     as "attempted if the direct UDP ping fails"). We answer false, the
//     default, and take the call as the failed probe that precedes
//     memberlist's own suspicion; a second direct ping a probe interval
//     later confirms it;
//   - PingDelegate.NotifyPingComplete, when a direct probe was answered.
//
// The mesh turns those into gossip of its own on an internal channel
// (relayed by every peer like any channel message), like Serf does for
// leave intents: the prober broadcasts "suspect <name>", any peer whose
// direct probe of a peer it holds suspect is answered broadcasts "alive
// <name>", and Leave broadcasts "leaving <name>" before memberlist's leave
// message. The peer table then is:
//
//	alive → suspect   on a local failed direct probe confirmed by a failed
//	                  ping a probe interval later, or a "suspect" message
//	suspect → alive   on a direct ack or an "alive" message
//	→ dead / left     on NotifyLeave: left if a leave intent arrived,
//	                  else dead (a late intent turns dead into left)
//	→ alive (join)    on NotifyJoin
//
// Alive, dead, left and join are memberlist's decisions. Suspect is
// advisory (Peer.Up counts it as up): it starts at a failed direct probe
// and a failed confirming ping, about when memberlist's suspicion starts
// (it waits for the indirect probes), and ends at the next direct ack by any peer, which
// comes within about one probe interval for a healthy peer, since the N
// probers each probe one of N peers per interval. Messages can be lost or
// reordered; a later ack corrects the state. A suspicion also expires
// (suspicionExpiry): one nobody else heard of (its note was suppressed), or
// whose alive note was lost, would otherwise last until this peer probes
// that one again, about N probe intervals (at N=100 on 2 cores, peers
// stayed suspect in others' views for minutes after a loaded start, and
// "every peer sees all alive" never held). A peer whose UDP path from the
// probers is broken keeps failing direct probes, which renew it.

// internalChannel carries the mesh's own messages. RegisterChannel refuses
// names starting with "_".
const internalChannel = "_"

// Internal message kinds: kind (1 byte) | peer name.
const (
	msgSuspect = 1
	msgAlive   = 2
	msgLeaving = 3
)

// leaveIntentWindow is how long after a peer was declared dead a late leave
// intent still turns it into left.
const leaveIntentWindow = 30 * time.Second

// onDirectProbeFailed is memberlist's DisableTcpPingsForNode: called from
// its probe goroutine (not under its node lock) when a direct UDP probe of
// name got no ack. It keeps the TCP fallback ping on (returns false). A
// peer already suspect has its suspicion renewed. An alive one is not
// suspected yet: one lost probe is most often a stall (a loaded or
// starting peer, a GC pause) or one lost packet, and memberlist itself
// suspects only after its indirect probes failed too. So the peer is pinged
// once more a probe interval later (confirmSuspicion) and marked suspect
// only if that fails as well. At N=100 on 2 cores a starting peer that
// missed one probe was held suspect by every peer for the 7–8 s of the
// expiry; its ping a second later was answered. O(1).
func (m *Mesh) onDirectProbeFailed(name string) bool {
	m.mu.Lock()
	p, ok := m.peers[name]
	switch {
	case m.shut || !ok || p.Self:
	case p.State == StateSuspect:
		m.mu.Unlock()
		m.renewSuspicion(name, m.notes.isPrivate(name))
		return false
	case p.State == StateAlive && m.confirming[name] == nil:
		m.confirming[name] = time.AfterFunc(m.cfg.ProbeInterval, func() { m.confirmSuspicion(name) })
	}
	m.mu.Unlock()
	return false
}

// confirmSuspicion pings name once (memberlist's Ping: one UDP ping, ProbeTimeout)
// and suspects it if that gets no answer either. Runs on its own timer goroutine.
func (m *Mesh) confirmSuspicion(name string) {
	m.mu.Lock()
	delete(m.confirming, name)
	p, ok := m.peers[name]
	if m.shut || !ok || p.State != StateAlive {
		m.mu.Unlock()
		return
	}
	addr := p.Addr
	m.confirms.Add(1) // under mu while not shut: Close waits only after shut is set
	m.mu.Unlock()
	defer m.confirms.Done()
	if m.pingOnce(name, addr) {
		m.metrics.suspicionUnconfirmed.Inc()
		return
	}
	m.suspectAfterFailedPing(name)
}

// pingOnce reports whether name answered one direct ping at addr.
func (m *Mesh) pingOnce(name string, addr netip.AddrPort) bool {
	ml := m.ml.Load()
	if ml == nil || !addr.IsValid() {
		return false
	}
	_, err := ml.Ping(name, net.UDPAddrFromAddrPort(addr))
	return err == nil
}

// suspectAfterFailedPing marks name suspect, tells the others (within the
// notes' budget) and starts or renews the suspicion's expiry.
func (m *Mesh) suspectAfterFailedPing(name string) {
	defer func() { m.renewSuspicion(name, m.notes.isPrivate(name)) }()
	if m.markSuspect(name) {
		per := time.Duration(m.numNodes()) * m.cfg.ProbeInterval
		if m.notes.publish(name, time.Now(), per) {
			m.broadcastInternal(msgSuspect, name)
		} else {
			m.metrics.suspicionSuppressed.WithLabelValues("suspect").Inc()
		}
	}
}

// onDirectAck handles a direct probe's ack: a peer we held suspect is alive,
// and the others, who heard our or someone's suspicion, learn it too. A
// suspicion nobody else heard (its note was suppressed) needs no alive note.
func (m *Mesh) onDirectAck(name string) {
	if !m.markAlive(name) {
		return
	}
	if m.notes.cleared(name) {
		m.broadcastInternal(msgAlive, name)
	} else {
		m.metrics.suspicionSuppressed.WithLabelValues("alive").Inc()
	}
}

// suspicionNotes decides which suspect notes go out. Why a budget: one lost
// UDP probe made a note that every peer received and relayed, and the next
// direct ack another. A starved machine loses probes, so the notes, the
// events and the work they trigger (every peer's datapath and membership
// rounds, O(N) each) grew with the load that caused them: at N=100 on 2
// cores each peer took 12 suspect and 12 alive events and 250 duplicate
// messages a second. The budget refills one suspect note per numNodes probe
// intervals, about one a probe interval for the whole mesh, with bursts of
// suspicionBurst: a single lost probe still spreads at once, a storm does
// not. Alive notes are not budgeted, but only a suspicion that was
// published (sent by us or heard from another peer) gets one, so there are
// no more of them than of suspect notes. O(1) per probe; memory O(peers
// suspected privately).
type suspicionNotes struct {
	mu      sync.Mutex // guards following
	budget  tokenBucket
	private map[string]struct{} // suspected here only: the note was suppressed
}

// publish reports whether a suspect note for name may go out now; if not,
// the suspicion is remembered as private.
func (n *suspicionNotes) publish(name string, now time.Time, per time.Duration) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.budget.take(now, per) {
		delete(n.private, name)
		return true
	}
	if n.private == nil {
		n.private = map[string]struct{}{}
	}
	if len(n.private) >= maxPrivateSuspicions {
		// Peers that died while suspected here are never cleared; forgetting
		// them costs at most one unneeded alive note each.
		clear(n.private)
	}
	n.private[name] = struct{}{}
	return false
}

// heard records that another peer published a suspicion of name.
func (n *suspicionNotes) heard(name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.private, name)
}

// cleared reports whether the end of name's suspicion should be published,
// and forgets it.
func (n *suspicionNotes) cleared(name string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, private := n.private[name]
	delete(n.private, name)
	return !private
}

// isPrivate reports whether name's suspicion here was never published.
func (n *suspicionNotes) isPrivate(name string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.private[name]
	return ok
}

// forget drops name's private suspicion (it expired).
func (n *suspicionNotes) forget(name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.private, name)
}

// maxPrivateSuspicions bounds suspicionNotes.private.
const maxPrivateSuspicions = 4096

// suspicionBurst is how many suspect notes a peer may send at once. 1: the
// burst is per peer, so the mesh's is N notes, which a starved start of 100
// peers spent at once with 4 (365 suspect events per peer in 2.5 min).
const suspicionBurst = 1

// tokenBucket is a token bucket of capacity suspicionBurst, full at first.
// Not safe for concurrent use (suspicionNotes guards it).
type tokenBucket struct {
	used   float64   // tokens taken and not yet refilled
	last   time.Time // when used was last updated
	inited bool
}

// take reports whether a token was available at now, refilling one every per.
// O(1).
func (b *tokenBucket) take(now time.Time, per time.Duration) bool {
	b.used, b.last = refill(b.used, now.Sub(b.last), per, b.inited), now
	b.inited = true
	if b.used+1 > suspicionBurst {
		return false
	}
	b.used++
	return true
}

// refill is the tokens still used after elapsed at one token per per; a
// bucket never used before is empty of use. A clock step back refills
// nothing.
func refill(used float64, elapsed, per time.Duration, inited bool) float64 {
	if !inited {
		return 0
	}
	if elapsed <= 0 || per <= 0 {
		return used
	}
	return max(0, used-float64(elapsed)/float64(per))
}

// handleInternal applies an internal message from another peer.
func (m *Mesh) handleInternal(b []byte) error {
	if len(b) < 2 {
		return fmt.Errorf("%w: internal message of %d bytes", ErrBadEnvelope, len(b))
	}
	name := string(b[1:])
	if err := validName(name); err != nil {
		return fmt.Errorf("%w: internal message: peer name: %v", ErrBadEnvelope, err)
	}
	switch b[0] {
	case msgSuspect:
		m.markSuspect(name)
		m.notes.heard(name)
		m.renewSuspicion(name, false)
	case msgAlive:
		m.markAlive(name)
	case msgLeaving:
		m.markLeaving(name)
	default:
		// A kind from a later version: ignore.
	}
	return nil
}

func (m *Mesh) broadcastInternal(kind byte, name string) {
	m.queueBroadcast(broadcast(m.newMessage(internalChannel, append([]byte{kind}, name...))))
}

// markSuspect moves an alive peer to suspect and reports whether it did.
func (m *Mesh) markSuspect(name string) bool {
	return m.transition(name, StateAlive, StateSuspect, EventSuspect)
}

// markAlive moves a suspect peer back to alive.
func (m *Mesh) markAlive(name string) bool {
	return m.transition(name, StateSuspect, StateAlive, EventAlive)
}

func (m *Mesh) transition(name string, from, to State, ev EventType) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.peers[name]
	if m.shut || !ok || p.Self || p.State != from {
		return false
	}
	p.State, p.Since = to, time.Now()
	m.emitLocked(ev, p, from)
	return true
}

// suspicion is the expiry of one suspicion held here.
type suspicion struct {
	until time.Time
	timer *time.Timer
}

// suspicionExpiry is memberlist's shortest suspicion timeout at the current
// size (its suspicionTimeout: SuspicionMult × max(1, log10 N) × ProbeInterval):
// by then memberlist has either started declaring the peer dead, and the
// failed probes of the others renew the suspicion, or kept it alive.
func (m *Mesh) suspicionExpiry() time.Duration {
	scale := max(1, math.Log10(float64(m.numNodes())))
	return time.Duration(float64(m.cfg.SuspicionMult) * scale * float64(m.cfg.ProbeInterval))
}

// privateSuspicionExpiry is how long a suspicion nobody else heard of lasts
// (its note was suppressed), in probe intervals: memberlist's indirect and
// TCP probes end within one, and if they failed too, memberlist's own
// suspicion takes over. Nobody else holds it, so no alive note would end it.
const privateSuspicionExpiry = 2

// renewSuspicion extends the expiry of name's suspicion, if it is suspect
// here, to suspicionExpiry from now, or privateSuspicionExpiry probe
// intervals for a private one. O(1).
func (m *Mesh) renewSuspicion(name string, private bool) {
	wait := m.suspicionExpiry()
	if private {
		wait = privateSuspicionExpiry * m.cfg.ProbeInterval
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.peers[name]
	if m.shut || !ok || p.State != StateSuspect {
		return
	}
	until := time.Now().Add(wait)
	if s, ok := m.suspects[name]; ok {
		if until.After(s.until) {
			s.until = until // the timer, due earlier, re-arms itself
		}
		return
	}
	m.suspects[name] = &suspicion{until: until, timer: time.AfterFunc(wait, func() { m.expireSuspicion(name) })}
}

// expireSuspicion turns name back to alive here if its suspicion was not
// renewed; no note goes out (each peer's suspicions expire on their own).
func (m *Mesh) expireSuspicion(name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.suspects[name]
	if !ok || m.shut {
		return
	}
	if wait := time.Until(s.until); wait > 0 {
		s.timer.Reset(wait)
		return
	}
	delete(m.suspects, name)
	p, ok := m.peers[name]
	if !ok || p.State != StateSuspect {
		return
	}
	p.State, p.Since = StateAlive, time.Now()
	m.emitLocked(EventAlive, p, StateSuspect)
	m.notes.forget(name)
	m.metrics.suspicionExpired.Inc()
}

// markLeaving records a leave intent; a peer already declared dead a short while ago is turned into left.
func (m *Mesh) markLeaving(name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.peers[name]
	if m.shut || !ok || p.Self {
		return
	}
	switch {
	case p.Up():
		m.leaving[name] = struct{}{}
	case p.State == StateDead:
		if time.Since(p.Since) < leaveIntentWindow {
			p.State = StateLeft
			m.coords.forget(name)
			m.emitLocked(EventLeave, p, StateDead)
		}
	}
}

// leaveIntent is the broadcast Leave waits for: Finished is called once
// memberlist has sent it as often as it retransmits anything.
type leaveIntent struct {
	msg  []byte
	once sync.Once
	done chan struct{}
}

func (l *leaveIntent) Invalidates(memberlist.Broadcast) bool { return false }
func (l *leaveIntent) Message() []byte                       { return l.msg }
func (l *leaveIntent) Finished()                             { l.once.Do(func() { close(l.done) }) }

// UniqueBroadcast: see broadcast's; queueing is O(log Q), not O(Q).
func (l *leaveIntent) UniqueBroadcast() {}
