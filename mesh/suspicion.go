package mesh

import (
	"fmt"
	"strings"
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
// shadows Node.State (hashicorp/memberlist#266). So polling Members() can
// see neither suspicion nor the difference between dead and left.
//
// What memberlist does expose exactly:
//
//   - on the peer whose probe failed, the log line "Suspect <name> has
//     failed, no acks received", printed right before memberlist marks that
//     peer suspect (state.go, probeNode); the log is ours (Config.Logger),
//     so the line is a synchronous hook;
//   - on the suspected peer, "Refuting a suspect message" / "Refuting a
//     dead message", printed when it announces that it is alive;
//   - PingDelegate.NotifyPingComplete, when a direct probe was answered.
//
// The mesh turns those into gossip of its own on an internal channel
// (relayed by every peer like any channel message), like Serf does for
// leave intents: the prober broadcasts "suspect <name>", the
// refuting peer "alive <name>", and Leave broadcasts "leaving <name>"
// before memberlist's leave message. The peer table then is:
//
//	alive → suspect   on a local failed probe or a "suspect" message
//	suspect → alive   on a direct ack or an "alive" message
//	→ dead / left     on NotifyLeave: left if a leave intent arrived,
//	                  else dead (a late intent turns dead into left)
//	→ alive (join)    on NotifyJoin
//
// Alive, dead, left and join are memberlist's decisions. Suspect follows
// memberlist's suspicion with gossip delay and is advisory: messages can be
// lost or reordered, and a later ack or refutation corrects the state. The
// log texts are those of the memberlist version in go.mod; the suspect and
// leave tests fail if an upgrade changes them.

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

const (
	logSuspectPrefix = "memberlist: Suspect "
	logSuspectSuffix = " has failed, no acks received"
	logRefuteSuspect = "memberlist: Refuting a suspect message"
	logRefuteDead    = "memberlist: Refuting a dead message"
)

// onMemberlistLog inspects each memberlist log line (called synchronously
// by memberlist, possibly under its node lock: no memberlist calls here).
func (m *Mesh) onMemberlistLog(msg string) {
	switch {
	case strings.HasPrefix(msg, logSuspectPrefix) && strings.HasSuffix(msg, logSuspectSuffix):
		name := msg[len(logSuspectPrefix) : len(msg)-len(logSuspectSuffix)]
		if m.markSuspect(name) {
			m.broadcastInternal(msgSuspect, name)
		}
	case strings.HasPrefix(msg, logRefuteSuspect), strings.HasPrefix(msg, logRefuteDead):
		m.broadcastInternal(msgAlive, m.cfg.Name)
	}
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

// markLeaving records a leave intent; a peer already declared dead a short while ago is turned into left.
func (m *Mesh) markLeaving(name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.peers[name]
	if m.shut || !ok || p.Self {
		return
	}
	switch p.State {
	case StateAlive, StateSuspect:
		m.leaving[name] = struct{}{}
	case StateDead:
		if time.Since(p.Since) < leaveIntentWindow {
			p.State = StateLeft
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
