package mesh

import (
	"fmt"
	"net/netip"
	"time"
)

// State is a peer's membership state as this peer sees it.
type State int

const (
	// StateAlive: the peer answers probes.
	StateAlive State = iota
	// StateSuspect: a probe of the peer failed; the mesh waits for it to
	// refute before declaring it dead. Advisory (see Mesh.Peers).
	StateSuspect
	// StateDead: the peer failed to refute a suspicion in time.
	StateDead
	// StateLeft: the peer announced that it leaves (Mesh.Leave).
	StateLeft
)

var stateNames = [...]string{"alive", "suspect", "dead", "left"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// MarshalText encodes the state as its name, for JSON status output.
func (s State) MarshalText() ([]byte, error) {
	if s < 0 || int(s) >= len(stateNames) {
		return nil, fmt.Errorf("mesh: unknown state %d", int(s))
	}
	return []byte(s.String()), nil
}

// UnmarshalText parses a state name.
func (s *State) UnmarshalText(b []byte) error {
	for i, n := range stateNames {
		if string(b) == n {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("mesh: unknown state %q", b)
}

// Peer is one member of the mesh as this peer sees it. Values returned by
// the Mesh are copies the caller owns.
type Peer struct {
	Name string
	// Addr is the peer's gossip address.
	Addr  netip.AddrPort
	State State
	// Since is when this peer observed the current State.
	Since time.Time
	// Meta is the peer's last valid metadata.
	Meta Metadata
	// Self is true for the local peer.
	Self bool
}

// Up reports whether the peer is a member that traffic may use: alive or
// suspect (suspicion is advisory, see suspicion.go). Dead and left are down.
func (p Peer) Up() bool { return p.State == StateAlive || p.State == StateSuspect }

func (p Peer) clone() Peer {
	p.Meta = p.Meta.Clone()
	return p
}

// EventType says what changed about a peer.
type EventType int

const (
	// EventJoin: a peer became alive (new, or back after dead/left).
	EventJoin EventType = iota
	// EventUpdate: an alive peer changed its metadata or address.
	EventUpdate
	// EventSuspect: a peer became suspect.
	EventSuspect
	// EventAlive: a suspect peer refuted the suspicion.
	EventAlive
	// EventDead: a peer was declared dead.
	EventDead
	// EventLeave: a peer left on purpose.
	EventLeave
	// EventOverflow: the subscriber's channel was full and events were
	// dropped since the last one delivered; re-read Mesh.Peers.
	EventOverflow
)

var eventNames = [...]string{"join", "update", "suspect", "alive", "dead", "leave", "overflow"}

func (t EventType) String() string {
	if t >= 0 && int(t) < len(eventNames) {
		return eventNames[t]
	}
	return fmt.Sprintf("event(%d)", int(t))
}

// Event is one change of a remote peer. Events about the local peer are not
// sent: the local peer changes only through calls of the owner.
type Event struct {
	Type EventType
	// Peer is the peer after the change (zero for EventOverflow).
	Peer Peer
	// Prev is the peer's state before the change.
	Prev State
}
