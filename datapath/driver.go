package datapath

import (
	"context"
	"net"
	"net/netip"
)

// Link modes between two peers, cheapest first.
const (
	ModeDirect    = "direct"
	ModeVXLAN     = "vxlan"
	ModeWireGuard = "wireguard"
)

// RemotePeer is one remote peer as a link driver needs it. The router builds the full set
// from gossip (metadata) and Raft (blocks) and hands each driver the peers assigned to it.
type RemotePeer struct {
	Name string
	// Underlay is the peer's underlay address (gossiped --advertise-addr).
	Underlay netip.Addr
	// VTEPMAC is the MAC of the peer's VXLAN device (vxlan).
	VTEPMAC net.HardwareAddr
	// WireGuardKey is the peer's public key and WireGuardPort its listen port (wireguard).
	WireGuardKey  [32]byte
	WireGuardPort uint16
	// Blocks are the address blocks the peer owns, on every network; traffic to them goes
	// to this peer.
	Blocks []netip.Prefix
	// NoProbe: the link probes to this peer go through another driver (a peer served by
	// several drivers, one per network, is probed through one): no link-probe route here.
	NoProbe bool `json:",omitempty"`
}

// Driver forwards container traffic to a set of remote peers over one link mode.
//
// Drivers are declarative: Set takes the whole desired set of peers for this driver and
// converges the kernel to it — adds what is missing, removes what is stale (routes, FDB and
// neighbour entries, WireGuard peers of peers no longer in the set), leaves the rest
// untouched — so calling it again with the same set changes nothing. Up creates the
// driver's devices (idempotent, keeps existing ones that are right); Close removes what the
// driver made. Methods are called from one goroutine at a time (the router's datapath loop);
// implementations need no locking of their own beyond what their own goroutines need.
//
// Bad peers, one rule for every driver: a peer Set cannot serve (a field missing or
// unusable for this mode, or a key, address or MAC another peer of the same set already
// has — the first in the set keeps it) is left out, and only it; a block another peer of
// the set already has is left out of the later peer alone. Every other peer still converges, so one broken peer in gossip cannot cut this host off from the rest.
// The peer is made visible three ways, all through RejectPeer: a log line naming the peer
// and the reason, the counter weft_datapath_bad_peers_total{mode}, and an error wrapping
// ErrBadPeer that names the peer, joined (errors.Join) into Set's result with any kernel
// errors. A caller tells "converged except for bad peers" from a kernel failure with
// errors.Is(err, ErrBadPeer) on each joined error.
type Driver interface {
	// Mode is the link mode ("vxlan", "direct", "wireguard").
	Mode() string
	Up(ctx context.Context) error
	Set(peers []RemotePeer) error
	Close() error
}
