package ipam

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	allocations prometheus.Counter
	releases    prometheus.Counter
	claims      prometheus.Counter
	// blockReleases: emptied blocks of created networks handed back (ReleaseIdleBlocks);
	// networksRefused: network definitions SetNetworks would not serve (invalid, or
	// redefined while attached here).
	blockReleases   prometheus.Counter
	networksRefused prometheus.Counter
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
		blockReleases: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_block_releases_total", Help: "Emptied blocks of created networks this peer handed back to the pool.",
		}),
		networksRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_networks_refused_total", Help: "Cluster network definitions this peer would not serve (invalid, or redefined while attached here).",
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
	orphans := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "weft_ipam_orphaned_attachments", Help: "Attachments whose address lies in a block this peer no longer owns (rmpeer --force or a reclaim while it was partitioned).",
	}, func() float64 {
		a.mu.Lock()
		defer a.mu.Unlock()
		return float64(len(a.orphans))
	})
	reg.MustRegister(m.allocations, m.releases, m.claims, m.blockReleases, m.networksRefused, used, blocks, orphans)
	return m
}

// clusterMetrics count the Raft side's decisions and rejections.
type clusterMetrics struct {
	foreignRefused prometheus.Counter
	tableRejected  *prometheus.CounterVec
	tableFetches   prometheus.Counter
	tableDeltas    prometheus.Counter
	forwardHops    prometheus.Counter
	claimsRepeated prometheus.Counter
	refused        *prometheus.CounterVec
	mismatch       prometheus.Gauge
}

func newClusterMetrics(reg prometheus.Registerer) *clusterMetrics {
	m := &clusterMetrics{
		foreignRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_raft_foreign_refused_total", Help: "Times the leader refused to add a peer of another (or an unnamed) Raft cluster.",
		}),
		tableRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_ipam_table_rejected_total", Help: "Gossiped block-table deltas, states and fetched tables rejected, by reason.",
		}, []string{"reason"}),
		tableFetches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_table_fetches_total", Help: "Block tables this client fetched from a Raft member.",
		}),
		tableDeltas: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_table_deltas_applied_total", Help: "Gossiped block-table deltas applied to this peer's view.",
		}),
		forwardHops: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_forward_hops_total", Help: "Client commands this member passed on to its leader.",
		}),
		claimsRepeated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_ipam_claims_repeated_total", Help: "Claims sent again after a lost answer and given the block their first send got (not a second one).",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_ipam_commands_refused_total", Help: "Raft commands refused by the leader or the state machine (nothing changed), by reason.",
		}, []string{"reason"}),
		mismatch: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "weft_ipam_network_config_mismatch", Help: "1 when this peer's --ipalloc-range/--ipalloc-block differ from the cluster's (it gets no block).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.foreignRefused, m.tableRejected, m.tableFetches, m.tableDeltas, m.forwardHops, m.claimsRepeated, m.refused, m.mismatch)
	}
	return m
}
