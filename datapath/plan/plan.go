// Package plan decides the datapath: for every remote peer and every network, which link
// mode carries that network's traffic to the peer (or why none can), and from that the
// desired state of every link driver — the remote peers each driver must serve, with the
// blocks of the networks that use it — plus the rows of `weft status connections`, one per
// (peer, network).
//
// Per network: the pair's link (ChooseLink, the hosts' policies) decides unless the network
// has an encryption policy of its own (ChooseNetworkLink): "always" is WireGuard whatever
// the hosts trust, "never" the cheapest plaintext mode. Each network's VXLAN traffic has its
// own VNI (VNIs) and so its own device, keyed in Desired by DriverKey.
//
// It is pure: no I/O, no clock, no mesh or Raft types. The router turns gossip (who is up,
// where, with which capabilities), the block table (who owns which blocks) and the chosen
// relays into an Input, calls Compute, and hands each driver its list; that is all the
// router does with it. Both ends of a pair compute the same link from the same gossip, so
// links are symmetric.
package plan

import (
	"fmt"
	"hash/fnv"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/vxlan"
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

// Network is one network of the cluster as the plan needs it.
type Network struct {
	Name   string
	Subnet netip.Prefix
	// Encrypt is the network's encryption policy: EncryptAlways, EncryptNever, or
	// EncryptAuto / "" (the pair's own decision). Any other value routes nothing of the
	// network (the row says why).
	Encrypt string
	// Fabric: the network's containers sit on the physical network (SR-IOV VFs, issue #14),
	// which carries their traffic between hosts. Its blocks are in range but get no route,
	// device or VNI; its rows say so.
	Fabric bool
}

// Encryption policies of a network.
const (
	EncryptNever  = "never"
	EncryptAuto   = "auto"
	EncryptAlways = "always"
)

// Connection is one row of `weft status connections`: one remote peer on one network.
type Connection struct {
	Peer string `json:"peer"`
	// Network names the network the row is about; "" when the cluster's networks are not
	// known yet (then nothing is routed).
	Network string   `json:"network"`
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

// Desired is the desired state of the drivers: per driver (DriverKey: the link mode, and
// for VXLAN the network), the remote peers it must serve, sorted by name.
type Desired = map[string][]datapath.RemotePeer

// Input is everything the plan depends on.
type Input struct {
	// Self is this peer's name.
	Self   string
	Policy Policy
	Peers  []Peer
	// Blocks are the address blocks per owner (the block table).
	Blocks map[string][]netip.Prefix
	// Networks are the networks the cluster defines. Only blocks inside one of their
	// subnets are routed; none (not known yet) routes no block at all.
	Networks []Network
	// Relays maps a destination peer to the peer that relays its traffic (path selection);
	// nil or empty: every peer is reached over its own link.
	Relays map[string]string
	// NetRelays are the relays of the networks with an SLA class of their own, per network
	// then destination (path selection runs once per class). A network listed here uses its
	// own map, even an empty one (no relays); a network not listed uses Relays. Both ends of
	// a pair see the same class for a network (networks are replicated), so with the same
	// link state they choose mirror paths per network, as they do with Relays.
	NetRelays map[string]map[string]string
	// Now is the time of the decision; DownGrace is how long a peer that is not up keeps
	// its routes (a restarting peer must not disturb its containers' traffic).
	Now       time.Time
	DownGrace time.Duration
	// WireGuardPort is the WireGuard port every peer listens on.
	WireGuardPort uint16
}

// Compute is the whole plan: the links of every peer, the drivers' desired state and the
// connection rows, with the relays applied. O(N·M + B·M + R·M) for N peers, M networks
// (a handful), B blocks and R relays (plus sorting each driver's list, O(N log N)).
func Compute(in Input) (Desired, []Connection) {
	want, conns := Links(in)
	return ApplyNetworkRelays(want, conns, in.Relays, in.NetRelays)
}

// ChooseLink decides one link as Weave does: encryption policy first — the link is
// encrypted unless each end trusts the other's underlay address, and if either end wants
// encryption without trusting the other, only WireGuard will do (or nothing, and the reason
// says why) — then the cheapest plaintext mode both ends support: direct when the peer is on
// our L2 segment, else VXLAN. Both ends compute the same answer from the same gossip, so
// links are symmetric. This is the pair's link: networks with no encryption policy of
// their own use it, and it carries the link probes. O(modes + trusted subnets).
func ChooseLink(pol Policy, remote Peer) Choice {
	local := pol.UnderlayPrefix.Addr()
	var must []string
	if pol.Encrypt && !trusts(pol.Trusted, remote.Underlay) {
		must = append(must, fmt.Sprintf("we do not trust %s", remote.Underlay))
	}
	if remote.Encrypt && !trusts(remote.Trusted, local) {
		must = append(must, fmt.Sprintf("%s does not trust %s", remote.Name, local))
	}
	if len(must) > 0 {
		return wireGuard(pol, remote, "encryption required ("+joinReasons(must)+")", "encrypted: "+joinReasons(must))
	}
	var why []string
	if pol.Encrypt || remote.Encrypt {
		why = append(why, "plaintext: both ends trust each other")
	}
	c, why := plaintext(pol, remote, why)
	if c.Mode != "" || c.Reason != "" {
		return c
	}
	if both(pol, remote, datapath.ModeWireGuard) && remote.WireGuardKey != [32]byte{} {
		return Choice{Mode: datapath.ModeWireGuard, Reason: joinReasons(why) + "; wireguard"}
	}
	return Choice{Reason: "no link mode both peers support: " + joinReasons(why)}
}

// ChooseNetworkLink decides the link of one network to one remote peer, given the pair's
// link (ChooseLink): a network without a policy of its own ("" or auto) uses the pair's
// link; "always" is WireGuard whatever the hosts trust (or nothing, naming the network,
// when one side cannot run it); "never" is the cheapest plaintext mode both ends support
// even where the hosts would encrypt (the operator's explicit choice). Each input is the
// same at both ends, so the answer is too (symmetry). O(modes + trusted subnets).
func ChooseNetworkLink(pol Policy, remote Peer, n Network, pair Choice) Choice {
	switch n.Encrypt {
	case "", EncryptAuto:
		return pair
	case EncryptAlways:
		return wireGuard(pol, remote, "network "+n.Name+" is --encrypt always", "encrypted: network "+n.Name+" is --encrypt always")
	case EncryptNever:
		c, why := plaintext(pol, remote, []string{"plaintext: network " + n.Name + " is --encrypt never"})
		if c.Mode != "" || c.Reason != "" {
			return c
		}
		return Choice{Reason: "network " + n.Name + " is --encrypt never but no plaintext mode both peers support: " + joinReasons(why)}
	}
	return Choice{Reason: fmt.Sprintf("network %s has an unknown encryption policy %q; not routed", n.Name, n.Encrypt)}
}

// wireGuard is the choice of a link that must be encrypted.
func wireGuard(pol Policy, remote Peer, required, ok string) Choice {
	switch {
	case !both(pol, remote, datapath.ModeWireGuard):
		return Choice{Reason: required + " but one side cannot run WireGuard (--encrypt=never?)"}
	case remote.WireGuardKey == [32]byte{}:
		return Choice{Reason: required + " but the peer has announced no WireGuard key yet"}
	}
	return Choice{Mode: datapath.ModeWireGuard, Reason: ok}
}

// plaintext is the cheapest plaintext mode both ends support: direct on our L2 segment,
// else VXLAN. A zero Choice means neither; why then says what is missing.
func plaintext(pol Policy, remote Peer, why []string) (Choice, []string) {
	if both(pol, remote, datapath.ModeDirect) {
		if pol.UnderlayPrefix.Contains(remote.Underlay) {
			return Choice{Mode: datapath.ModeDirect, Reason: joinReasons(append(why, fmt.Sprintf("same L2 segment %s", pol.UnderlayPrefix.Masked())))}, why
		}
		why = append(why, fmt.Sprintf("not on our L2 segment %s", pol.UnderlayPrefix.Masked()))
	} else {
		why = append(why, "direct off on one side")
	}
	if both(pol, remote, datapath.ModeVXLAN) {
		if len(remote.VTEPMAC) != 6 {
			return Choice{Reason: "peer has announced no VXLAN MAC yet"}, why
		}
		return Choice{Mode: datapath.ModeVXLAN, Reason: joinReasons(why) + "; vxlan"}, why
	}
	return Choice{}, append(why, "no vxlan on one side")
}

func both(pol Policy, remote Peer, mode string) bool {
	return slices.Contains(pol.Modes, mode) && slices.Contains(remote.Capabilities, mode)
}

// DefaultNetwork is the network that exists from bootstrap; its VXLAN traffic keeps VNI
// DefaultVNI and the device of old, so an upgrade changes nothing on the wire for it.
const DefaultNetwork = "default"

// The VNIs of the networks (see VNIs).
const (
	DefaultVNI = 4242
	// VNIBase and VNISpan are the reserved VNI range of every other network:
	// 0x570000-0x57ffff (0x57 is weft's route protocol), outside DefaultVNI.
	VNIBase = 0x570000
	VNISpan = 1 << 16
)

// VNIs gives every network its VXLAN network identifier, a pure function of the cluster's
// network names, so every peer derives the same one without new gossip: DefaultNetwork has
// DefaultVNI; every other network hashes its name (FNV-1a) into the reserved range, and
// when two hash alike the first in sorted order keeps the slot and the next takes the next
// free one (linear probing, wrapping). A name's VNI therefore changes only when a network
// sorting before it and hashing into its slot (or the slots it probed) is created — about
// one chance in 65536 per network pair; every peer then moves together, as every peer sees
// the same list. Duplicate names count once; names beyond VNISpan get none. O(M log M) in
// the M networks (probing is O(1) expected at the few networks a cluster has).
func VNIs(names []string) map[string]uint32 {
	sorted := slices.Clone(names)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	out := make(map[string]uint32, len(sorted))
	taken := map[uint32]bool{}
	for _, name := range sorted {
		if name == DefaultNetwork {
			out[name] = DefaultVNI
			continue
		}
		if len(taken) >= VNISpan {
			continue
		}
		h := fnv.New32a()
		h.Write([]byte(name))
		slot := h.Sum32() % VNISpan
		for taken[slot] {
			slot = (slot + 1) % VNISpan
		}
		taken[slot] = true
		out[name] = VNIBase + slot
	}
	return out
}

// DriverKey is the key in Desired of the driver that carries network's traffic in mode:
// the mode itself, except VXLAN on a network other than DefaultNetwork, which has a device
// (and a driver) of its own: "vxlan/" + network.
func DriverKey(mode, network string) string {
	if mode == datapath.ModeVXLAN && network != DefaultNetwork && network != "" {
		return mode + "/" + network
	}
	return mode
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

// OutOfRange counts the blocks the connection rows say were not routed. O(N·M).
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

// Links computes, without relays, for every driver the remote peers it must serve, plus
// the connection table: per peer and network, the network's link (ChooseNetworkLink) and
// the peer's blocks inside the network's subnet. Each peer is also listed, without blocks,
// under the driver of its pair link (ChooseLink) — or, when that has no mode, of its first
// network with one — which carries its link probes; every other entry of the peer has
// NoProbe set, so exactly one driver routes its probes. A VXLAN entry of a network other
// than DefaultNetwork carries the peer's VTEP MAC for that network's VNI (derived, as the
// peer's own device derives it). A peer that has not been up for less than DownGrace keeps
// its routes: a peer restarting must not disturb its containers' traffic. Blocks outside
// every network are listed (OutOfRange) on the peer's first row and routed nowhere.
// O(N·M + B·M) for N peers, M networks and B blocks, plus O(N log N) to sort each list.
func Links(in Input) (Desired, []Connection) {
	want := Desired{}
	conns := []Connection{}
	nets := slices.Clone(in.Networks)
	slices.SortFunc(nets, func(a, b Network) int { return strings.Compare(a.Name, b.Name) })
	names := make([]string, 0, len(nets))
	ranges := make([]netip.Prefix, len(nets))
	for i, n := range nets {
		ranges[i] = n.Subnet
		if !n.Fabric {
			names = append(names, n.Name)
		}
	}
	vnis := VNIs(names)
	for _, pr := range in.Peers {
		if pr.Self || pr.Name == in.Self {
			continue
		}
		pair := ChooseLink(in.Policy, pr)
		kept, dropped := InRange(in.Blocks[pr.Name], ranges)
		var outOfRange []string
		for _, b := range dropped {
			outOfRange = append(outOfRange, b.String())
		}
		gone := !pr.Up && in.Now.Sub(pr.Since) >= in.DownGrace
		row := func(network string, c Choice, blocks []netip.Prefix) Connection {
			conn := Connection{Peer: pr.Name, Network: network, Address: pr.Underlay.String(), Since: pr.Since,
				Blocks: []string{}, Mode: c.Mode, Reason: c.Reason}
			for _, b := range blocks {
				conn.Blocks = append(conn.Blocks, b.String())
			}
			switch {
			case c.Mode == "":
				conn.State = StateNone
			case gone:
				conn.State, conn.Reason = StateDown, fmt.Sprintf("peer %s since %s; routes withdrawn", pr.State, pr.Since.Format(time.RFC3339))
			default:
				conn.State = StateEstablished
				if !pr.Up {
					conn.Reason = fmt.Sprintf("peer %s; routes kept for %s in case it is restarting", pr.State, in.DownGrace)
				}
			}
			return conn
		}
		entries := map[string]*datapath.RemotePeer{} // driver key → this peer's entry
		var order []string                           // keys in the order the networks used them
		entry := func(mode, network string) *datapath.RemotePeer {
			key := DriverKey(mode, network)
			if e, ok := entries[key]; ok {
				return e
			}
			e := &datapath.RemotePeer{Name: pr.Name, Underlay: pr.Underlay, VTEPMAC: pr.VTEPMAC,
				WireGuardKey: pr.WireGuardKey, WireGuardPort: in.WireGuardPort, NoProbe: true}
			if key != mode { // a network's own VXLAN device: its MAC follows from its VNI
				e.VTEPMAC = vxlan.DeriveMAC(pr.Underlay, vnis[network])
			}
			entries[key] = e
			order = append(order, key)
			return e
		}
		first := len(conns)
		if len(nets) == 0 {
			conns = append(conns, row("", pair, nil))
		}
		for _, n := range nets {
			var blocks []netip.Prefix
			for _, b := range kept {
				if n.Subnet.Bits() <= b.Bits() && n.Subnet.Contains(b.Addr()) {
					blocks = append(blocks, b)
				}
			}
			c := ChooseNetworkLink(in.Policy, pr, n, pair)
			if n.Fabric {
				c = Choice{Reason: fmt.Sprintf("network %s is carried by the physical network (sr-iov), not by weft", n.Name)}
			}
			if _, ok := vnis[n.Name]; c.Mode == datapath.ModeVXLAN && !ok {
				c = Choice{Reason: fmt.Sprintf("network %s has no VNI left (more than %d networks)", n.Name, VNISpan)}
			}
			conn := row(n.Name, c, blocks)
			if conn.State == StateEstablished {
				e := entry(c.Mode, n.Name)
				e.Blocks = append(e.Blocks, blocks...)
			}
			conns = append(conns, conn)
		}
		if len(conns) > first {
			conns[first].OutOfRange = outOfRange
		}
		if gone || (pair.Mode == "" && len(order) == 0) {
			continue
		}
		probe := DriverKey(pair.Mode, DefaultNetwork)
		if pair.Mode == "" {
			probe = order[0]
		} else {
			entry(pair.Mode, DefaultNetwork)
		}
		entries[probe].NoProbe = false
		for _, key := range order {
			want[key] = append(want[key], *entries[key])
		}
	}
	for _, list := range want {
		slices.SortFunc(list, func(a, b datapath.RemotePeer) int { return strings.Compare(a.Name, b.Name) })
	}
	return want, conns
}

// ApplyRelays sends each relayed destination's blocks to its relay, network by network:
// the destination's blocks of a network join the relay's entry for that network (routes and
// WireGuard AllowedIPs follow), and the destination keeps its own entries without those
// blocks — its tunnels stay up and keep carrying the link probes, so the direct link is
// measured while it is not used and traffic comes back when it heals. A network is relayed
// only when the relay has an established link of its own on it (else the destination keeps
// it on its own link), and a network that must be reached encrypted only over an encrypted
// link: the encryption policy holds for every hop. The relay forwards with its own routes.
// Relays are applied in the order of their destinations' names, so the result does not
// depend on map order. want is not modified; conns is updated in place and returned.
// O((N·M + B) + R log R) for N peers, M networks, B blocks and R relays.
func ApplyRelays(want Desired, conns []Connection, relays map[string]string) (Desired, []Connection) {
	return ApplyNetworkRelays(want, conns, relays, nil)
}

// ApplyNetworkRelays is ApplyRelays with a relay per network: a network in netRelays takes
// its destinations' relays from its own map (an empty one relays nothing), every other
// network from relays (see Input.NetRelays). The cost is ApplyRelays' with R the
// destinations relayed in any map (O(K·N) for K classes).
func ApplyNetworkRelays(want Desired, conns []Connection, relays map[string]string, netRelays map[string]map[string]string) (Desired, []Connection) {
	relayOf := func(network, dest string) (string, bool) {
		if m, own := netRelays[network]; own {
			r, ok := m[dest]
			return r, ok
		}
		r, ok := relays[dest]
		return r, ok
	}
	destSet := map[string]struct{}{}
	for dest := range relays {
		destSet[dest] = struct{}{}
	}
	for _, m := range netRelays {
		for dest := range m {
			destSet[dest] = struct{}{}
		}
	}
	if len(destSet) == 0 {
		return want, conns
	}
	type pn struct{ peer, network string }
	type pk struct{ peer, key string }
	rows := map[pn]int{}         // (peer, network) → index of its established row
	byPeer := map[string][]int{} // peer → indexes of its established rows
	for i, c := range conns {
		if c.State == StateEstablished && c.Mode != "" {
			rows[pn{c.Peer, c.Network}] = i
			byPeer[c.Peer] = append(byPeer[c.Peer], i)
		}
	}
	served := map[pk]bool{}
	for key, list := range want {
		for _, rp := range list {
			served[pk{rp.Name, key}] = true
		}
	}
	dests := make([]string, 0, len(destSet))
	for dest := range destSet {
		dests = append(dests, dest)
	}
	slices.Sort(dests)
	removed := map[pk]map[netip.Prefix]bool{} // (destination, key) → blocks moved away
	moved := map[pk][]netip.Prefix{}          // (relay, key) → blocks it carries for others
	type relayed struct {
		row   int
		relay string
		mode  string
	}
	var done []relayed
	for _, dest := range dests {
		for _, i := range byPeer[dest] {
			c := conns[i]
			relay, ok := relayOf(c.Network, dest)
			if !ok || relay == dest {
				continue
			}
			ri, ok := rows[pn{relay, c.Network}]
			if !ok {
				continue
			}
			r := conns[ri]
			dkey, rkey := DriverKey(c.Mode, c.Network), DriverKey(r.Mode, r.Network)
			if !served[pk{dest, dkey}] || !served[pk{relay, rkey}] {
				continue
			}
			if c.Mode == datapath.ModeWireGuard && r.Mode != datapath.ModeWireGuard {
				continue
			}
			for _, s := range c.Blocks {
				b, err := netip.ParsePrefix(s)
				if err != nil {
					continue
				}
				if removed[pk{dest, dkey}] == nil {
					removed[pk{dest, dkey}] = map[netip.Prefix]bool{}
				}
				removed[pk{dest, dkey}][b] = true
				moved[pk{relay, rkey}] = append(moved[pk{relay, rkey}], b)
			}
			done = append(done, relayed{i, relay, r.Mode})
		}
	}
	out := make(Desired, len(want))
	for key, list := range want {
		for _, rp := range list {
			if gone := removed[pk{rp.Name, key}]; len(gone) > 0 {
				var keep []netip.Prefix
				for _, b := range rp.Blocks {
					if !gone[b] {
						keep = append(keep, b)
					}
				}
				rp.Blocks = keep
			}
			if extra := moved[pk{rp.Name, key}]; len(extra) > 0 {
				rp.Blocks = append(slices.Clone(rp.Blocks), extra...)
			}
			out[key] = append(out[key], rp)
		}
	}
	for _, d := range done {
		conns[d.row].State = StateRelayed
		conns[d.row].Mode = d.mode
		conns[d.row].Reason = fmt.Sprintf("via %s (measured paths: the direct link is down or misses the SLA)", d.relay)
	}
	return out, conns
}
