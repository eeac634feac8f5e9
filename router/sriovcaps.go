package router

import (
	"cmp"
	"fmt"
	"log/slog"
	"net/http"
	"slices"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// SR-IOV capacity in gossip (#14): each peer announces, per PF, how many VFs it has and how
// many it could hand out now, in its mesh metadata; `weft status peers` shows them and
// GET /v1/capacity answers where a container of a network fits.

// capacitySource reports this host's SR-IOV PFs with their VF counts (the VF pool's view).
// It is called from the membership goroutine once a tick, while ADD and DEL run: it must be
// safe for concurrent use, cheap (O(VFs)) and must not call the mesh. nil: no SR-IOV.
type capacitySource func() []mesh.PFCapacity

// capacityFrom adapts a source returning any struct of PFCapacity's layout — the VF pool's
// router.SRIOVCapacity — so that wiring it is one line:
//
//	p.sriovSource = capacityFrom(p.sriovCapacity)
func capacityFrom[C ~struct {
	PF                    string
	Free, Total, FreeDPDK int
}](f func() []C) capacitySource {
	return func() []mesh.PFCapacity {
		in := f()
		out := make([]mesh.PFCapacity, len(in))
		for i, c := range in {
			out[i] = mesh.PFCapacity(c)
		}
		return out
	}
}

// maxVFCount is the largest count metadata carries (mesh bounds counts at 256).
const maxVFCount = 256

// sriovAnnouncement turns what the source reports into what metadata may carry. Counts are
// clamped, never raised: total to the bound (a scheduler learns "at least 256"), free to the
// total and free DPDK VFs to the free ones — the pool's counts and sysfs's can disagree for
// a moment during a rescan, and announcing less than there is only sends a container
// elsewhere. PFs metadata would refuse (a bad name, one named twice) are dropped with the
// reason; the rest are sorted by PF name, so an unchanged pool reads the same every tick.
// Pure; O(P log P).
func sriovAnnouncement(in []mesh.PFCapacity) (out []mesh.PFCapacity, dropped []string) {
	for _, c := range in {
		c.Total = min(max(c.Total, 0), maxVFCount)
		c.Free = min(max(c.Free, 0), c.Total)
		c.FreeDPDK = min(max(c.FreeDPDK, 0), c.Free)
		if err := c.Validate(); err != nil {
			dropped = append(dropped, err.Error())
			continue
		}
		if slices.ContainsFunc(out, func(o mesh.PFCapacity) bool { return o.PF == c.PF }) {
			dropped = append(dropped, fmt.Sprintf("%s reported twice; the first kept", c.PF))
			continue
		}
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b mesh.PFCapacity) int { return cmp.Compare(a.PF, b.PF) })
	return out, dropped
}

// fitAnnouncement drops PFs from the end of pfs until md carrying them encodes: metadata
// is at most mesh.MaxMetadataSize bytes, and many trusted subnets leave less room than
// eight PFs need. O(P) encodes of at most 512 bytes.
func fitAnnouncement(md mesh.Metadata, pfs []mesh.PFCapacity) (fit []mesh.PFCapacity, dropped []string) {
	for n := len(pfs); n >= 0; n-- {
		md.SRIOV = pfs[:n]
		if _, err := md.Encode(); err == nil {
			for _, c := range pfs[n:] {
				dropped = append(dropped, fmt.Sprintf("%s: no room left in the %d bytes of metadata", c.PF, mesh.MaxMetadataSize))
			}
			return pfs[:n], dropped
		}
	}
	return nil, nil // md is bad without any PF: not this function's to report
}

// metaPublisher is what announcing capacity needs of the mesh (*mesh.Mesh). Both methods are
// safe for concurrent use; UpdateMetadata may block for a few gossip intervals while
// memberlist sends the alive message that carries the change.
type metaPublisher interface {
	Local() mesh.Peer
	UpdateMetadata(func(*mesh.Metadata)) error
}

// publishCapacity puts the source's current counts in this peer's metadata when they differ
// from what it announces; mesh.UpdateMetadata gossips the change at once (memberlist
// UpdateNode), and push/pull repairs a lost one. The router calls it once a membership tick
// (membershipLight, every second), so a change is re-published at most once a second and
// coalesced with any others of that second, and other peers see it within about a second
// plus a gossip round. It reports whether it published. O(VFs) for the source, O(PFs) and one
// encode here (at most nine when PFs do not fit); no gossip when nothing changed.
func publishCapacity(m metaPublisher, src capacitySource, log *slog.Logger) bool {
	var reported []mesh.PFCapacity
	if src != nil {
		reported = src()
	}
	local := m.Local().Meta
	pfs, dropped := sriovAnnouncement(reported)
	pfs, unfit := fitAnnouncement(local, pfs)
	if slices.Equal(pfs, local.SRIOV) {
		return false
	}
	if err := m.UpdateMetadata(func(md *mesh.Metadata) { md.SRIOV = pfs }); err != nil {
		log.Warn("SR-IOV capacity not announced; will retry", "err", err)
		return false
	}
	if dropped = append(dropped, unfit...); len(dropped) > 0 {
		log.Warn("SR-IOV PFs left out of the capacity this peer announces", "dropped", dropped)
	}
	log.Debug("announced SR-IOV capacity", "pfs", pfs)
	return true
}

// publishSRIOVCapacity announces this peer's VF counts (see publishCapacity).
func (p *Peer) publishSRIOVCapacity() {
	publishCapacity(p.mesh, p.sriovSource, p.log)
}

// Capacity answers GET /v1/capacity?network=NAME: where a container of the network fits.
type Capacity struct {
	Network string `json:"network"`
	// Mode is "bridge" or "sriov".
	Mode string `json:"mode"`
	// PF and DPDK are an SR-IOV network's physical function and the kind of VF it takes
	// (auto: either kind, on: bound to a userspace driver, off: netdevs).
	PF   string `json:"pf,omitempty"`
	DPDK string `json:"dpdk,omitempty"`
	// Peers are, for an SR-IOV network, the alive peers whose PF has a free VF of the kind it
	// takes, most free first; for a bridge network, every alive peer, by name.
	Peers []PeerCapacity `json:"peers"`
}

// PeerCapacity is one peer a container fits on.
type PeerCapacity struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	// Free counts the free VFs of the network's kind on its PF, Total the PF's VFs; both
	// absent for a bridge network.
	Free  int `json:"free,omitempty"`
	Total int `json:"total,omitempty"`
}

// capacityFor says which peers a container of network n fits on, from the peers' gossiped
// metadata. Alive peers only: a suspect one may be gone. Pure; O(N·PFs + N log N).
func capacityFor(n ipam.Network, peers []mesh.Peer) Capacity {
	out := Capacity{Network: n.Name, Mode: "bridge", Peers: []PeerCapacity{}}
	if n.Mode == ipam.ModeSRIOV {
		out.Mode, out.PF, out.DPDK = ipam.ModeSRIOV, n.PF, cmp.Or(n.DPDK, ipam.DPDKAuto)
	}
	for _, pr := range peers {
		if pr.State != mesh.StateAlive {
			continue
		}
		row := PeerCapacity{Name: pr.Name, Address: pr.Meta.Underlay.String()}
		if n.Mode == ipam.ModeSRIOV {
			i := slices.IndexFunc(pr.Meta.SRIOV, func(c mesh.PFCapacity) bool { return c.PF == n.PF })
			if i < 0 {
				continue
			}
			c := pr.Meta.SRIOV[i]
			if row.Free, row.Total = freeOfKind(c, out.DPDK), c.Total; row.Free == 0 {
				continue
			}
		}
		out.Peers = append(out.Peers, row)
	}
	slices.SortStableFunc(out.Peers, func(a, b PeerCapacity) int {
		return cmp.Or(cmp.Compare(b.Free, a.Free), cmp.Compare(a.Name, b.Name))
	})
	return out
}

// freeOfKind counts the free VFs an SR-IOV network with DPDK choice dpdk can take.
func freeOfKind(c mesh.PFCapacity, dpdk string) int {
	switch dpdk {
	case ipam.DPDKOn:
		return c.FreeDPDK
	case ipam.DPDKOff:
		return c.Free - c.FreeDPDK
	}
	return c.Free
}

// capacityEndpoint serves GET /v1/capacity?network=NAME.
func (p *Peer) capacityEndpoint(r *http.Request) (any, error) {
	name := r.URL.Query().Get("network")
	if name == "" {
		return nil, newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "capacity: no network named: use /v1/capacity?network=NAME")
	}
	n, ok := p.cluster.Network(name)
	if !ok {
		return nil, newAPIError(http.StatusNotFound, types.ErrInvalidNetworkConfig, "capacity: %v: %q", ipam.ErrUnknownNetwork, name)
	}
	return capacityFor(n, p.mesh.Peers()), nil
}
