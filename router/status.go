package router

import (
	"net/netip"
	"time"

	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh"
)

// Status is what GET /v1/status answers and `weft status --json` prints.
type Status struct {
	Name        string             `json:"name"`
	Version     string             `json:"version"`
	Started     time.Time          `json:"started"`
	Uptime      string             `json:"uptime"`
	DataDir     string             `json:"data_dir"`
	Networks    []NetworkStatus    `json:"networks"`
	Attachments []AttachmentStatus `json:"attachments"`
	// Segments: per-segment figures and interface counters (#16); absent before the peer
	// measures.
	Segments *SegmentsStatus `json:"segments,omitempty"`
}

// NetworkStatus is one network as this peer serves it.
type NetworkStatus struct {
	Name    string             `json:"name"`
	Subnet  netip.Prefix       `json:"subnet"`
	Bridge  string             `json:"bridge"`
	Gateway netip.Addr         `json:"gateway"`
	MTU     int                `json:"mtu"`
	Blocks  []ipam.BlockStatus `json:"blocks"`
}

// AttachmentStatus is one container interface attached by this peer.
type AttachmentStatus struct {
	ContainerID string       `json:"container_id"`
	IfName      string       `json:"ifname"`
	Network     string       `json:"network"`
	CNINetwork  string       `json:"cni_network"`
	Name        string       `json:"name"`
	Address     netip.Prefix `json:"address"`
	HostIfName  string       `json:"host_ifname"`
	NetNS       string       `json:"netns"`
	Created     time.Time    `json:"created"`
	// Labels are the container's labels (issue #15).
	Labels map[string]string `json:"labels,omitempty"`
}

func (p *Peer) status() Status {
	st := Status{
		Name:        p.cfg.Name,
		Version:     p.cfg.Version,
		Started:     p.started,
		Uptime:      time.Since(p.started).Round(time.Second).String(),
		DataDir:     p.cfg.DataDir,
		Networks:    []NetworkStatus{},
		Attachments: []AttachmentStatus{},
	}
	bits := map[string]int{}
	for _, n := range p.alloc.Networks() {
		bits[n.Name] = n.Subnet.Bits()
		st.Networks = append(st.Networks, NetworkStatus{
			Name: n.Name, Subnet: n.Subnet, Bridge: bridgeName(n.Name), Gateway: n.Gateway(),
			MTU: p.cfg.MTU, Blocks: n.Blocks,
		})
	}
	for _, a := range p.alloc.Attachments() {
		st.Attachments = append(st.Attachments, AttachmentStatus{
			ContainerID: a.ContainerID, IfName: a.IfName, Network: a.Network, CNINetwork: a.CNINetwork,
			Name: a.Name, Address: netip.PrefixFrom(a.Address, bits[a.Network]), HostIfName: a.HostIfName,
			NetNS: a.NetNS, Created: a.Created, Labels: a.Labels,
		})
	}
	st.Segments = p.segmentsStatus()
	return st
}

// PFStatus is one SR-IOV physical function of a peer in `weft status peers`.
type PFStatus struct {
	PF string `json:"pf"`
	// Free counts the VFs the peer could hand out now, of either kind; FreeDPDK those of
	// them bound to a userspace driver; Total every VF of the PF.
	Free     int `json:"free"`
	FreeDPDK int `json:"free_dpdk"`
	Total    int `json:"total"`
}

// pfStatus lists a peer's announced PFs; empty, not nil, when it has none.
func pfStatus(pfs []mesh.PFCapacity) []PFStatus {
	out := make([]PFStatus, 0, len(pfs))
	for _, c := range pfs {
		out = append(out, PFStatus{PF: c.PF, Free: c.Free, FreeDPDK: c.FreeDPDK, Total: c.Total})
	}
	return out
}
