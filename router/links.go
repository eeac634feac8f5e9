package router

import (
	"encoding/json"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/plan"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// The link choice and the desired datapath state are decided by package datapath/plan, a
// pure function of plain structs; this file only converts the mesh's view to its input.
// The loop that applies the result to the drivers is in datapath.go.

// linkPolicy is this peer's side of the link decision.
type linkPolicy = plan.Policy

// Connection is one row of `weft status connections`.
type Connection = plan.Connection

// planPeer is a mesh peer as the plan sees it. O(1) (its metadata is shared, not copied).
func planPeer(pr mesh.Peer) plan.Peer {
	return plan.Peer{
		Name: pr.Name, Self: pr.Self, Up: pr.Up(),
		State: pr.State.String(), Since: pr.Since, Underlay: pr.Meta.Underlay,
		Capabilities: pr.Meta.Capabilities, VTEPMAC: pr.Meta.VTEPMAC, WireGuardKey: pr.Meta.WireGuardKey,
		Encrypt: pr.Meta.Encrypt, Trusted: pr.Meta.TrustedSubnets,
	}
}

// chooseLink is plan.ChooseLink for a peer's gossiped metadata.
func chooseLink(pol linkPolicy, remote mesh.Metadata) plan.Choice {
	return plan.ChooseLink(pol, planPeer(mesh.Peer{Name: remote.Name, Meta: remote}))
}

// desiredState is plan.Links over the mesh's peers: the remote peers each driver (per
// mode, and per network for VXLAN) must serve, and the connection table, one row per
// (peer, network). Only blocks inside the networks' subnets (see planNetworks) are routed.
// O(N·M + blocks·M) for M networks.
func desiredState(self string, pol linkPolicy, peers []mesh.Peer, blocks map[string][]netip.Prefix, networks []plan.Network, now time.Time, downGrace time.Duration, wgPort uint16) (map[string][]datapath.RemotePeer, []Connection) {
	in := plan.Input{Self: self, Policy: pol, Blocks: blocks, Networks: networks, Now: now, DownGrace: downGrace, WireGuardPort: wgPort,
		Peers: make([]plan.Peer, 0, len(peers))}
	for _, pr := range peers {
		in.Peers = append(in.Peers, planPeer(pr))
	}
	return plan.Links(in)
}

// planNetworks are the networks the cluster defines (in the Raft state) as the plan needs
// them: their subnets are the only space the datapath routes to other peers, and each has
// its encryption policy. O(networks).
func planNetworks(nets []ipam.Network) []plan.Network {
	out := make([]plan.Network, 0, len(nets))
	for _, n := range nets {
		out = append(out, plan.Network{Name: n.Name, Subnet: n.Subnet, Encrypt: n.Encrypt, Fabric: n.Mode == ipam.ModeSRIOV})
	}
	return out
}

// registerRangeMetrics exports how many blocks of the table the plan refused to route
// because they lie inside no defined network (conns: the last connection rows).
func registerRangeMetrics(reg prometheus.Registerer, conns func() []Connection) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "weft_datapath_blocks_out_of_range",
		Help: "Blocks in the block table outside every defined network's range, not routed (a nonzero value means a bad table entry).",
	}, func() float64 { return float64(plan.OutOfRange(conns())) }))
}

// applyRelays is plan.ApplyNetworkRelays: relayed destinations' blocks ride on their
// relays, network by network — a network with an SLA class of its own on its class's relay
// (netRelays, nil when none has one), every other network on relays.
func applyRelays(want map[string][]datapath.RemotePeer, conns []Connection, relays map[string]string, netRelays map[string]map[string]string) (map[string][]datapath.RemotePeer, []Connection) {
	return plan.ApplyNetworkRelays(want, conns, relays, netRelays)
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
