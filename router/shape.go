package router

// Per-container bandwidth (issue #15): the rates an ADD asks for (the runtime's bandwidth
// capability over the network's defaults), shaped on the host side of the veth by
// datapath/shape before ADD returns, removed on DEL, compared on CHECK, shown by
// `weft status rates` and exported as weft_shape_* metrics.
//
// Nothing is persisted for it: the qdiscs live with the host veth in the kernel, which
// keeps them while the peer is down or restarting, and status reads them back from there.

import (
	"errors"
	"log/slog"
	"sync"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/datapath/shape"
	"github.com/weftnet/weft/ipam"
)

// shaper is what the router needs of datapath/shape; calls for one interface are serialised
// by the attachment's key lock.
type shaper interface {
	Apply(hostIf string, p shape.Plan) error
	Remove(hostIf string) error
	Read(hostIf string) (shape.State, error)
	Check(hostIf string, p shape.Plan) error
}

// effectiveRates are an attachment's rates: the network's defaults, each direction replaced
// by the container's bandwidth capability where that sets a rate (with its own burst). A
// direction the capability leaves at 0 keeps the network's default, so a network's cap is
// not lifted by a runtime that sends only one direction. Pure.
func effectiveRates(n ipam.Network, bw *cni.Bandwidth) shape.Rates {
	r := shape.Rates{IngressRate: n.IngressRate, IngressBurst: n.IngressBurst, EgressRate: n.EgressRate, EgressBurst: n.EgressBurst}
	if bw == nil {
		return r
	}
	if bw.IngressRate != 0 || bw.IngressBurst != 0 {
		r.IngressRate, r.IngressBurst = bw.IngressRate, bw.IngressBurst
	}
	if bw.EgressRate != 0 || bw.EgressBurst != 0 {
		r.EgressRate, r.EgressBurst = bw.EgressRate, bw.EgressBurst
	}
	return r
}

// shapePlan is the shaping of an attachment of network n with MTU mtu, or a CNI error
// naming what is wrong with its rates (code 7); it changes nothing.
func shapePlan(n ipam.Network, bw *cni.Bandwidth, mtu int) (shape.Plan, error) {
	r := effectiveRates(n, bw)
	if n.Mode == ipam.ModeSRIOV && r.Limited() {
		return shape.Plan{}, errCNI(types.ErrInvalidNetworkConfig,
			"runtimeConfig.bandwidth: network %s is SR-IOV: its VFs bypass the host, so weft cannot shape them", n.Name)
	}
	p, err := shape.PlanFor(r, mtu)
	if err != nil {
		src := "network " + n.Name
		if bw != nil {
			src = "runtimeConfig.bandwidth over network " + n.Name
		}
		return shape.Plan{}, errCNI(types.ErrInvalidNetworkConfig, "%s: %v", src, err)
	}
	return p, nil
}

// shaping is the router's side of per-container bandwidth: the shaper, and the counters of
// qdiscs already removed, so that the exported totals never go down when a container goes.
type shaping struct {
	sh     shaper
	log    *slog.Logger
	errors *prometheus.CounterVec
	// hostIfs lists the host interfaces of this peer's attachments; called on every scrape.
	hostIfs func() []string

	mu sync.Mutex // guards retired; held across a removal and a whole collection, so a
	// removed qdisc's counters are counted once: live or retired, never both
	retired [2]shape.DirState // by direction: ingress, egress
}

var (
	descShapeDrops = prometheus.NewDesc("weft_shape_drops_total",
		"Packets dropped by weft's per-container rate limits (the tbf queues), by the container's direction.", []string{"direction"}, nil)
	descShapeOverlimits = prometheus.NewDesc("weft_shape_overlimits_total",
		"Times a packet had to wait for tokens in weft's per-container rate limits, by the container's direction.", []string{"direction"}, nil)
	descShapeBytes = prometheus.NewDesc("weft_shape_bytes_total",
		"Bytes sent through weft's per-container rate limits, by the container's direction.", []string{"direction"}, nil)
	descShapeShaped = prometheus.NewDesc("weft_shape_attachments",
		"Attachments of this peer with a rate limit, by the container's direction.", []string{"direction"}, nil)
)

func newShaping(sh shaper, reg prometheus.Registerer, log *slog.Logger, hostIfs func() []string) *shaping {
	s := &shaping{sh: sh, log: log, hostIfs: hostIfs,
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_shape_errors_total", Help: "Failed tc operations of per-container rate limits, by operation.",
		}, []string{"op"}),
	}
	reg.MustRegister(s.errors, s)
	return s
}

func (s *shaping) apply(hostIf string, p shape.Plan) error {
	if err := s.sh.Apply(hostIf, p); err != nil {
		s.errors.WithLabelValues("apply").Inc()
		return err
	}
	return nil
}

// remove takes hostIf's shaping away, keeping its final counters.
func (s *shaping) remove(hostIf string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.sh.Read(hostIf)
	if err != nil && !errors.Is(err, shape.ErrNoInterface) {
		s.errors.WithLabelValues("read").Inc()
		s.log.Warn("could not read the final counters of a rate limit", "host_if", hostIf, "err", err)
	}
	if err := s.sh.Remove(hostIf); err != nil {
		s.errors.WithLabelValues("remove").Inc()
		return err
	}
	for i, d := range []*shape.DirState{st.Ingress, st.Egress} {
		if d != nil {
			addCounters(&s.retired[i], d)
		}
	}
	return nil
}

func (s *shaping) check(hostIf string, p shape.Plan) error {
	if err := s.sh.Check(hostIf, p); err != nil {
		return errCNI(cni.CodeCheckFailed, "%v", err)
	}
	return nil
}

func addCounters(sum *shape.DirState, d *shape.DirState) {
	sum.Drops += d.Drops
	sum.Overlimits += d.Overlimits
	sum.Bytes += d.Bytes
	sum.Packets += d.Packets
}

// Describe implements prometheus.Collector.
func (s *shaping) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descShapeDrops, descShapeOverlimits, descShapeBytes, descShapeShaped} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: the retired counters plus every live qdisc's.
// O(attachments of this peer) netlink dumps per scrape; labels bounded to two directions.
func (s *shaping) Collect(ch chan<- prometheus.Metric) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sums := s.retired
	var shaped [2]int
	for _, hostIf := range s.hostIfs() {
		st, err := s.sh.Read(hostIf)
		if err != nil {
			continue // gone (an SR-IOV attachment has no host interface) or racing a DEL
		}
		for i, d := range []*shape.DirState{st.Ingress, st.Egress} {
			if d != nil {
				addCounters(&sums[i], d)
				shaped[i]++
			}
		}
	}
	for i, dir := range []string{"ingress", "egress"} {
		ch <- prometheus.MustNewConstMetric(descShapeDrops, prometheus.CounterValue, float64(sums[i].Drops), dir)
		ch <- prometheus.MustNewConstMetric(descShapeOverlimits, prometheus.CounterValue, float64(sums[i].Overlimits), dir)
		ch <- prometheus.MustNewConstMetric(descShapeBytes, prometheus.CounterValue, float64(sums[i].Bytes), dir)
		ch <- prometheus.MustNewConstMetric(descShapeShaped, prometheus.GaugeValue, float64(shaped[i]), dir)
	}
}

// RateStatus is one attachment's rate limits as the kernel holds them (`weft status rates`).
type RateStatus struct {
	ContainerID string `json:"container_id"`
	IfName      string `json:"ifname"`
	Name        string `json:"name"`
	Network     string `json:"network"`
	HostIfName  string `json:"host_ifname"`
	// Ingress and Egress are the container's directions; nil is unlimited.
	Ingress *shape.DirState `json:"ingress,omitempty"`
	Egress  *shape.DirState `json:"egress,omitempty"`
	// Error says why the limits could not be read.
	Error string `json:"error,omitempty"`
}

// rates lists every attachment of this peer with its limits and counters. O(attachments).
func (p *Peer) rates() []RateStatus {
	out := []RateStatus{}
	for _, a := range p.alloc.Attachments() {
		rs := RateStatus{ContainerID: a.ContainerID, IfName: a.IfName, Name: a.Name, Network: a.Network, HostIfName: a.HostIfName}
		if a.HostIfName == "" { // no host side (an SR-IOV VF): nothing weft can shape
			out = append(out, rs)
			continue
		}
		st, err := p.shape.sh.Read(a.HostIfName)
		if err != nil {
			rs.Error = err.Error()
		}
		rs.Ingress, rs.Egress = st.Ingress, st.Egress
		out = append(out, rs)
	}
	return out
}

// shapedIfs lists the host interfaces of this peer's attachments, for the collector.
func (p *Peer) shapedIfs() []string {
	if p.alloc == nil { // scraped before start: nothing attached yet
		return nil
	}
	atts := p.alloc.Attachments()
	out := make([]string, 0, len(atts))
	for _, a := range atts {
		if a.HostIfName != "" {
			out = append(out, a.HostIfName)
		}
	}
	return out
}
