package router

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/mesh"
)

// Link choice and the desired datapath state, computed from gossip (who is up, where, with
// which capabilities) and Raft (who owns which blocks). Pure functions here; the loop that
// applies them to the drivers is in datapath.go.

// linkPolicy is this peer's side of the link decision.
type linkPolicy struct {
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

// trusts says whether a peer with these trusted subnets trusts addr.
func trusts(trusted []netip.Prefix, addr netip.Addr) bool {
	for _, p := range trusted {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// linkChoice is the decision for one remote peer.
type linkChoice struct {
	Mode   string // "" when no mode works
	Reason string
}

// chooseLink decides one link as Weave does: encryption policy first — the link is
// encrypted unless each end trusts the other's underlay address, and if either end wants
// encryption without trusting the other, only WireGuard will do (or nothing, and the reason
// says why) — then the cheapest plaintext mode both ends support: direct when the peer is on
// our L2 segment, else VXLAN. Both ends compute the same answer from the same gossip, so
// links are symmetric.
func chooseLink(pol linkPolicy, remote mesh.Metadata) linkChoice {
	both := func(mode string) bool {
		return slices.Contains(pol.Modes, mode) && remote.HasCapability(mode)
	}
	local := pol.UnderlayPrefix.Addr()
	var must []string
	if pol.Encrypt && !trusts(pol.Trusted, remote.Underlay) {
		must = append(must, fmt.Sprintf("we do not trust %s", remote.Underlay))
	}
	if remote.Encrypt && !trusts(remote.TrustedSubnets, local) {
		must = append(must, fmt.Sprintf("%s does not trust %s", remote.Name, local))
	}
	if len(must) > 0 {
		switch {
		case !both(datapath.ModeWireGuard):
			return linkChoice{Reason: "encryption required (" + joinReasons(must) + ") but one side cannot run WireGuard (--encrypt=never?)"}
		case remote.WireGuardKey == [32]byte{}:
			return linkChoice{Reason: "encryption required but the peer has announced no WireGuard key yet"}
		}
		return linkChoice{Mode: datapath.ModeWireGuard, Reason: "encrypted: " + joinReasons(must)}
	}
	var why []string
	if pol.Encrypt || remote.Encrypt {
		why = append(why, "plaintext: both ends trust each other")
	}
	if both(datapath.ModeDirect) {
		if pol.UnderlayPrefix.Contains(remote.Underlay) {
			return linkChoice{Mode: datapath.ModeDirect, Reason: joinReasons(append(why, fmt.Sprintf("same L2 segment %s", pol.UnderlayPrefix.Masked())))}
		}
		why = append(why, fmt.Sprintf("not on our L2 segment %s", pol.UnderlayPrefix.Masked()))
	} else {
		why = append(why, "direct off on one side")
	}
	if both(datapath.ModeVXLAN) {
		if len(remote.VTEPMAC) != 6 {
			return linkChoice{Reason: "peer has announced no VXLAN MAC yet"}
		}
		return linkChoice{Mode: datapath.ModeVXLAN, Reason: joinReasons(why) + "; vxlan"}
	}
	why = append(why, "no vxlan on one side")
	if both(datapath.ModeWireGuard) && remote.WireGuardKey != [32]byte{} {
		return linkChoice{Mode: datapath.ModeWireGuard, Reason: joinReasons(why) + "; wireguard"}
	}
	return linkChoice{Reason: "no link mode both peers support: " + joinReasons(why)}
}

func joinReasons(r []string) string {
	var b bytes.Buffer
	for i, s := range r {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(s)
	}
	return b.String()
}

// Connection is one row of `weft status connections`.
type Connection struct {
	Peer    string    `json:"peer"`
	Address string    `json:"address"`
	Mode    string    `json:"mode"`
	State   string    `json:"state"` // established, down (peer not alive), none (no mode)
	Reason  string    `json:"reason"`
	Blocks  []string  `json:"blocks"`
	Since   time.Time `json:"since"`
}

// desiredState computes, for every mode, the remote peers its driver must serve, plus the
// connection table. A peer dead or gone for less than downGrace keeps its routes: a peer
// restarting must not disturb its containers' traffic.
func desiredState(self string, pol linkPolicy, peers []mesh.Peer, blocks map[string][]netip.Prefix, now time.Time, downGrace time.Duration, wgPort uint16) (map[string][]datapath.RemotePeer, []Connection) {
	want := map[string][]datapath.RemotePeer{}
	conns := []Connection{}
	for _, pr := range peers {
		if pr.Self || pr.Name == self {
			continue
		}
		up := pr.State == mesh.StateAlive || pr.State == mesh.StateSuspect
		c := Connection{Peer: pr.Name, Address: pr.Meta.Underlay.String(), Since: pr.Since, Blocks: []string{}}
		for _, b := range blocks[pr.Name] {
			c.Blocks = append(c.Blocks, b.String())
		}
		choice := chooseLink(pol, pr.Meta)
		c.Mode, c.Reason = choice.Mode, choice.Reason
		switch {
		case choice.Mode == "":
			c.State = "none"
		case !up && now.Sub(pr.Since) >= downGrace:
			c.State, c.Reason = "down", fmt.Sprintf("peer %s since %s; routes withdrawn", pr.State, pr.Since.Format(time.RFC3339))
		default:
			c.State = "established"
			if !up {
				c.Reason = fmt.Sprintf("peer %s; routes kept for %s in case it is restarting", pr.State, downGrace)
			}
			want[choice.Mode] = append(want[choice.Mode], datapath.RemotePeer{
				Name: pr.Name, Underlay: pr.Meta.Underlay, VTEPMAC: pr.Meta.VTEPMAC,
				WireGuardKey: pr.Meta.WireGuardKey, WireGuardPort: wgPort, Blocks: blocks[pr.Name],
			})
		}
		conns = append(conns, c)
	}
	for _, list := range want {
		sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	}
	return want, conns
}

// applyRelays sends the blocks of each relayed destination to its relay: they join the
// relay's entry in the relay's link mode (routes and WireGuard AllowedIPs follow), and the
// destination keeps its own entry without blocks — its tunnel stays up and keeps carrying
// the link probes, so the direct link is measured while it is not used and traffic comes
// back when it heals. A relay without an established link of its own is not used. The relay
// forwards with its own routes. A destination that must be reached encrypted is relayed only
// over an encrypted link: the encryption policy holds for every hop.
func applyRelays(want map[string][]datapath.RemotePeer, conns []Connection, relays map[string]string) (map[string][]datapath.RemotePeer, []Connection) {
	if len(relays) == 0 {
		return want, conns
	}
	where := map[string]string{} // peer → mode it is served in
	for mode, list := range want {
		for _, rp := range list {
			where[rp.Name] = mode
		}
	}
	out := map[string][]datapath.RemotePeer{}
	moved := map[string][]netip.Prefix{} // relay → blocks it carries for others
	used := map[string]string{}          // destination → relay actually used
	for dest, relay := range relays {
		if _, ok := where[relay]; !ok || relay == dest {
			continue
		}
		if where[dest] == datapath.ModeWireGuard && where[relay] != datapath.ModeWireGuard {
			continue
		}
		for _, list := range want {
			for _, rp := range list {
				if rp.Name == dest {
					moved[relay] = append(moved[relay], rp.Blocks...)
					used[dest] = relay
				}
			}
		}
	}
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
			conns[i].State = "relayed"
			conns[i].Mode = where[relay]
			conns[i].Reason = fmt.Sprintf("via %s (measured paths: the direct link is down or misses the SLA)", relay)
		}
	}
	return out, conns
}

// The last state applied to the drivers is kept in the database so that a restarted peer
// reinstalls it at once, before the mesh and the Raft log have caught up, and removes
// nothing it cannot yet know to be stale.

var bucketDatapath = []byte("datapath-applied")

func saveApplied(db *bolt.DB, want map[string][]datapath.RemotePeer) error {
	data, err := json.Marshal(want)
	if err != nil {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketDatapath)
		if err != nil {
			return err
		}
		return b.Put([]byte("desired"), data)
	})
}

func loadApplied(db *bolt.DB) (map[string][]datapath.RemotePeer, error) {
	want := map[string][]datapath.RemotePeer{}
	err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDatapath)
		if b == nil {
			return nil
		}
		if data := b.Get([]byte("desired")); data != nil {
			return json.Unmarshal(data, &want)
		}
		return nil
	})
	return want, err
}
