package ipam

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	allocations prometheus.Counter
	releases    prometheus.Counter
	claims      prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, a *Allocator) *metrics {
	m := &metrics{
		allocations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_allocations_total", Help: "Addresses handed out to attachments.",
		}),
		releases: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_releases_total", Help: "Addresses released by DEL or GC.",
		}),
		claims: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_block_claims_total", Help: "Blocks this peer claimed.",
		}),
	}
	if reg == nil {
		return m
	}
	used := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "weft_ipam_addresses_used", Help: "Addresses in use on this peer.",
	}, func() float64 {
		a.mu.Lock()
		defer a.mu.Unlock()
		return float64(len(a.attachments))
	})
	blocks := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "weft_ipam_blocks_owned", Help: "Blocks owned by this peer, all networks.",
	}, func() float64 {
		a.mu.Lock()
		defer a.mu.Unlock()
		n := 0
		for _, ns := range a.networks {
			n += len(ns.blocks)
		}
		return float64(n)
	})
	reg.MustRegister(m.allocations, m.releases, m.claims, used, blocks)
	return m
}
