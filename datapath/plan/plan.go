// Package plan decides the datapath: for every remote peer, which link mode carries its
// containers' traffic (or why none can), and from that the desired state of every link
// driver — the remote peers each driver must serve, with their blocks — plus the rows of
// `weft status connections`.
//
// It is pure: no I/O, no clock, no mesh or Raft types. The router turns gossip (who is up,
// where, with which capabilities), the block table (who owns which blocks) and the chosen
// relays into an Input, calls Compute, and hands each driver its list; that is all the
// router does with it. Both ends of a pair compute the same link from the same gossip, so
// links are symmetric.
package plan

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/weftnet/weft/datapath"
)

// Policy is this peer's side of the link decision.
type Policy struct {
	// UnderlayPrefix is this host's underlay address with its prefix length: peers inside
	// it share our L2 segment and can be routed to directly.
	UnderlayPrefix netip.Prefix
	NoDirect       bool
	// Modes are the link modes this peer can run, cheapest first.
	Modes []string
	// Encrypt: this peer wants encrypted links to the peers outside Trusted.
	Encrypt bool
	Trusted []netip.Prefix
}

// Peer is one member of the mesh as the plan needs it (the router fills it from gossip).
type Peer struct {
	Name string
	// Self marks the local peer, which gets no link.
	Self bool
	// Up: the peer is alive or suspect; a peer that is not up keeps its routes for
	// Input.DownGrace after Since.
	Up bool
	// State is its membership state in words ("dead", "left"), for the reasons shown.
	State string
	// Since is when the peer entered State.
	Since time.Time
	// Underlay is its underlay address.
	Underlay netip.Addr
	// Capabilities are the link modes (and other features) it announces.
	Capabilities []string
	// VTEPMAC is its VXLAN device's MAC (nil: not announced yet).
	VTEPMAC net.HardwareAddr
	// WireGuardKey is its WireGuard public key (zero: none yet).
	WireGuardKey [32]byte
	// Encrypt and Trusted are its side of the encryption policy.
	Encrypt bool
	Trusted []netip.Prefix
}

// Choice is the link decision for one remote peer.
type Choice struct {
	Mode   string // "" when no mode works
	Reason string
}

// Connection is one row of `weft status connections`.
type Connection struct {
	Peer    string   `json:"peer"`
	Address string   `json:"address"`
	Mode    string   `json:"mode"`
	State   string   `json:"state"` // established, relayed, down (peer not alive), none (no mode)
	Reason  string   `json:"reason"`
	Blocks  []string `json:"blocks"`
	// OutOfRange lists the peer's blocks in the table that lie inside no defined network's
	// range: they are not routed (a bad table entry must never become a route).
	OutOfRange []string  `json:"out_of_range,omitempty"`
	Since      time.Time `json:"since"`
}

// Connection states.
const (
	StateEstablished = "established"
	StateRelayed     = "relayed"
	StateDown        = "down"
	StateNone        = "none"
)

// Desired is the desired state of the drivers: per link mode, the remote peers its driver
// must serve, sorted by name.
type Desired = map[string][]datapath.RemotePeer

// Input is everything the plan depends on.
type Input struct {
	// Self is this peer's name.
	Self   string
	Policy Policy
	Peers  []Peer
	// Blocks are the address blocks per owner (the block table).
	Blocks map[string][]netip.Prefix
	// Ranges are the ranges of the networks the cluster defines. Only blocks inside one of
	// them are routed; none (not known yet) routes no block at all.
	Ranges []netip.Prefix
	// Relays maps a destination peer to the peer that relays its traffic (path selection);
	// nil or empty: every peer is reached over its own link.
	Relays map[string]string
	// Now is the time of the decision; DownGrace is how long a peer that is not up keeps
	// its routes (a restarting peer must not disturb its containers' traffic).
	Now       time.Time
	DownGrace time.Duration
	// WireGuardPort is the WireGuard port every peer listens on.
	WireGuardPort uint16
}

// Compute is the whole plan: the link of every peer, the drivers' desired state and the
// connection rows, with the relays applied. O(N + B + R log R) for N peers, B blocks and
// R relays (plus sorting each mode's list, O(N log N)).
func Compute(in Input) (Desired, []Connection) {
	want, conns := Links(in)
	return ApplyRelays(want, conns, in.Relays)
}

// ChooseLink decides one link as Weave does: encryption policy first — the link is
// encrypted unless each end trusts the other's underlay address, and if either end wants
// encryption without trusting the other, only WireGuard will do (or nothing, and the reason
// says why) — then the cheapest plaintext mode both ends support: direct when the peer is on
// our L2 segment, else VXLAN. Both ends compute the same answer from the same gossip, so
// links are symmetric. O(modes + trusted subnets).
func ChooseLink(pol Policy, remote Peer) Choice {
	both := func(mode string) bool {
		return slices.Contains(pol.Modes, mode) && slices.Contains(remote.Capabilities, mode)
	}
	local := pol.UnderlayPrefix.Addr()
	var must []string
	if pol.Encrypt && !trusts(pol.Trusted, remote.Underlay) {
		must = append(must, fmt.Sprintf("we do not trust %s", remote.Underlay))
	}
	if remote.Encrypt && !trusts(remote.Trusted, local) {
		must = append(must, fmt.Sprintf("%s does not trust %s", remote.Name, local))
	}
	if len(must) > 0 {
		switch {
		case !both(datapath.ModeWireGuard):
			return Choice{Reason: "encryption required (" + joinReasons(must) + ") but one side cannot run WireGuard (--encrypt=never?)"}
		case remote.WireGuardKey == [32]byte{}:
			return Choice{Reason: "encryption required but the peer has announced no WireGuard key yet"}
		}
		return Choice{Mode: datapath.ModeWireGuard, Reason: "encrypted: " + joinReasons(must)}
	}
	var why []string
	if pol.Encrypt || remote.Encrypt {
		why = append(why, "plaintext: both ends trust each other")
	}
	if both(datapath.ModeDirect) {
		if pol.UnderlayPrefix.Contains(remote.Underlay) {
			return Choice{Mode: datapath.ModeDirect, Reason: joinReasons(append(why, fmt.Sprintf("same L2 segment %s", pol.UnderlayPrefix.Masked())))}
		}
		why = append(why, fmt.Sprintf("not on our L2 segment %s", pol.UnderlayPrefix.Masked()))
	} else {
		why = append(why, "direct off on one side")
	}
	if both(datapath.ModeVXLAN) {
		if len(remote.VTEPMAC) != 6 {
			return Choice{Reason: "peer has announced no VXLAN MAC yet"}
		}
		return Choice{Mode: datapath.ModeVXLAN, Reason: joinReasons(why) + "; vxlan"}
	}
	why = append(why, "no vxlan on one side")
	if both(datapath.ModeWireGuard) && remote.WireGuardKey != [32]byte{} {
		return Choice{Mode: datapath.ModeWireGuard, Reason: joinReasons(why) + "; wireguard"}
	}
	return Choice{Reason: "no link mode both peers support: " + joinReasons(why)}
}

// InRange splits blocks into those inside one of ranges (kept, in their order) and the rest
// (dropped): a block is inside a range when the range contains its whole prefix. A block
// that is not a valid masked prefix is dropped. With no ranges every block is dropped: the
// plan fails closed. Pure; O(blocks × ranges), ranges being the few defined networks.
func InRange(blocks, ranges []netip.Prefix) (kept, dropped []netip.Prefix) {
	for _, b := range blocks {
		inside := false
		if b.IsValid() && b.Masked() == b {
			for _, r := range ranges {
				if r.IsValid() && r.Bits() <= b.Bits() && r.Contains(b.Addr()) {
					inside = true
					break
				}
			}
		}
		if inside {
			kept = append(kept, b)
		} else {
			dropped = append(dropped, b)
		}
	}
	return kept, dropped
}

// OutOfRange counts the blocks the connection rows say were not routed. O(N).
func OutOfRange(conns []Connection) int {
	n := 0
	for _, c := range conns {
		n += len(c.OutOfRange)
	}
	return n
}

// trusts says whether a peer with these trusted subnets trusts addr.
func trusts(trusted []netip.Prefix, addr netip.Addr) bool {
	for _, p := range trusted {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

func joinReasons(r []string) string { return strings.Join(r, ", ") }

// Links computes, without relays, for every mode the remote peers its driver must serve,
// plus the connection table. A peer that has not been up for less than DownGrace keeps its
// routes: a peer restarting must not disturb its containers' traffic. O(N + B), plus
// O(N log N) to sort each mode's list.
func Links(in Input) (Desired, []Connection) {
	want := Desired{}
	conns := []Connection{}
	for _, pr := range in.Peers {
		if pr.Self || pr.Name == in.Self {
			continue
		}
		c := Connection{Peer: pr.Name, Address: pr.Underlay.String(), Since: pr.Since, Blocks: []string{}}
		blocks, dropped := InRange(in.Blocks[pr.Name], in.Ranges)
		for _, b := range blocks {
			c.Blocks = append(c.Blocks, b.String())
		}
		for _, b := range dropped {
			c.OutOfRange = append(c.OutOfRange, b.String())
		}
		choice := ChooseLink(in.Policy, pr)
		c.Mode, c.Reason = choice.Mode, choice.Reason
		switch {
		case choice.Mode == "":
			c.State = StateNone
		case !pr.Up && in.Now.Sub(pr.Since) >= in.DownGrace:
			c.State, c.Reason = StateDown, fmt.Sprintf("peer %s since %s; routes withdrawn", pr.State, pr.Since.Format(time.RFC3339))
		default:
			c.State = StateEstablished
			if !pr.Up {
				c.Reason = fmt.Sprintf("peer %s; routes kept for %s in case it is restarting", pr.State, in.DownGrace)
			}
			want[choice.Mode] = append(want[choice.Mode], datapath.RemotePeer{
				Name: pr.Name, Underlay: pr.Underlay, VTEPMAC: pr.VTEPMAC,
				WireGuardKey: pr.WireGuardKey, WireGuardPort: in.WireGuardPort, Blocks: blocks,
			})
		}
		conns = append(conns, c)
	}
	for _, list := range want {
		slices.SortFunc(list, func(a, b datapath.RemotePeer) int { return strings.Compare(a.Name, b.Name) })
	}
	return want, conns
}

// ApplyRelays sends the blocks of each relayed destination to its relay: they join the
// relay's entry in the relay's link mode (routes and WireGuard AllowedIPs follow), and the
// destination keeps its own entry without blocks — its tunnel stays up and keeps carrying
// the link probes, so the direct link is measured while it is not used and traffic comes
// back when it heals. A relay without an established link of its own is not used. The relay
// forwards with its own routes. A destination that must be reached encrypted is relayed only
// over an encrypted link: the encryption policy holds for every hop. Relays are applied in
// the order of their destinations' names, so the result does not depend on map order.
// want is not modified; conns is updated in place and returned. O(N + B + R log R).
func ApplyRelays(want Desired, conns []Connection, relays map[string]string) (Desired, []Connection) {
	if len(relays) == 0 {
		return want, conns
	}
	type entry struct {
		mode   string
		blocks []netip.Prefix
	}
	where := map[string]entry{} // peer → its entry
	for mode, list := range want {
		for _, rp := range list {
			where[rp.Name] = entry{mode, rp.Blocks}
		}
	}
	dests := make([]string, 0, len(relays))
	for dest := range relays {
		dests = append(dests, dest)
	}
	slices.Sort(dests)
	moved := map[string][]netip.Prefix{} // relay → blocks it carries for others
	used := map[string]string{}          // destination → relay actually used
	for _, dest := range dests {
		relay := relays[dest]
		r, ok := where[relay]
		d, served := where[dest]
		if !ok || !served || relay == dest {
			continue
		}
		if d.mode == datapath.ModeWireGuard && r.mode != datapath.ModeWireGuard {
			continue
		}
		moved[relay] = append(moved[relay], d.blocks...)
		used[dest] = relay
	}
	out := make(Desired, len(want))
	for mode, list := range want {
		for _, rp := range list {
			if _, relayed := used[rp.Name]; relayed {
				rp.Blocks = nil
			}
			if extra := moved[rp.Name]; len(extra) > 0 {
				rp.Blocks = append(slices.Clone(rp.Blocks), extra...)
			}
			out[mode] = append(out[mode], rp)
		}
	}
	for i, c := range conns {
		if relay, ok := used[c.Peer]; ok {
			conns[i].State = StateRelayed
			conns[i].Mode = where[relay].mode
			conns[i].Reason = fmt.Sprintf("via %s (measured paths: the direct link is down or misses the SLA)", relay)
		}
	}
	return out, conns
}
