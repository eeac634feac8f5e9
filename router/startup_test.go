package router

import (
	"testing"
	"time"

	"github.com/weftnet/weft/mesh"
)

// The datapath's start-up phase (only add) ends when the peer has rejoined and settled, not
// on a timer: a restarted peer that has not found the others must keep its routes.
func TestStartupEndsOnRejoinNotOnATimer(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	self := mesh.Peer{Name: "me", Self: true, State: mesh.StateAlive}
	dead := mesh.Peer{Name: "b", State: mesh.StateDead}
	alive := mesh.Peer{Name: "b", State: mesh.StateAlive}
	const settle = 3 * time.Second
	s := startup{start: t0}

	// Alone (others dead or unknown), or no leader: not over, however long, up to keepAppliedFor.
	for _, d := range []time.Duration{time.Second, 30 * time.Second, 5 * time.Minute} {
		if s.over(t0.Add(d), []mesh.Peer{self, dead}, true, settle) {
			t.Fatalf("over after %v without any other peer alive", d)
		}
		if s.over(t0.Add(d), []mesh.Peer{self, alive}, false, settle) {
			t.Fatalf("over after %v without a raft leader", d)
		}
	}
	// Rejoined with a leader: over once that has held for settle.
	at := t0.Add(6 * time.Minute)
	if s.over(at, []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("over at the moment of the rejoin; want settle first")
	}
	if s.over(at.Add(settle-time.Millisecond), []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("over before settle passed")
	}
	// Losing the others again restarts the settle time.
	if s.over(at.Add(settle), []mesh.Peer{self, dead}, true, settle) {
		t.Fatal("over while alone again")
	}
	if s.over(at.Add(settle+time.Second), []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("over right after rejoining a second time")
	}
	if !s.over(at.Add(2*settle+time.Second), []mesh.Peer{self, alive}, true, settle) {
		t.Fatal("not over after rejoining and settling")
	}

	// Never rejoined: over at keepAppliedFor.
	lone := startup{start: t0}
	if lone.over(t0.Add(keepAppliedFor-time.Second), []mesh.Peer{self}, false, settle) {
		t.Fatal("over before keepAppliedFor while alone")
	}
	if !lone.over(t0.Add(keepAppliedFor), []mesh.Peer{self}, false, settle) || !lone.joined.IsZero() {
		t.Fatal("not over at keepAppliedFor while alone")
	}
}
