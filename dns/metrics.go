package dns

import (
	"errors"
	"fmt"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics of one Server. Registered on the registry passed to NewServer;
// with a nil registry they are kept but not exported.
type metrics struct {
	queries       *prometheus.CounterVec // type, rcode
	forwards      *prometheus.CounterVec // result
	forwardTime   prometheus.Histogram
	cacheHits     prometheus.Counter
	cacheMisses   prometheus.Counter
	cacheEntries  prometheus.GaugeFunc
	panics        prometheus.Counter
	truncated     prometheus.Counter
	recordEntries prometheus.GaugeFunc
}

// Forward results, the values of weft_dns_forward_total{result}.
const (
	forwardOK       = "ok"       // an upstream answered
	forwardError    = "error"    // one try failed (timeout, network, bad answer)
	forwardRcode    = "rcode"    // one try answered SERVFAIL/REFUSED; next upstream tried
	forwardAllFail  = "servfail" // every upstream failed; SERVFAIL answered
	forwardNoServer = "noserver" // no upstream configured
)

func newMetrics(reg prometheus.Registerer, cacheLen func() int, recordsLen func() int) (*metrics, error) {
	m := &metrics{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_dns_queries_total",
			Help: "DNS queries answered, by query type and response code.",
		}, []string{"type", "rcode"}),
		forwards: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_dns_forward_total",
			Help: "Tries to forward a query to an upstream resolver, by result.",
		}, []string{"result"}),
		forwardTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "weft_dns_forward_duration_seconds",
			Help:    "Time to get an answer from an upstream resolver.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 8),
		}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_cache_hits_total",
			Help: "Forwarded queries answered from the cache.",
		}),
		cacheMisses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_cache_misses_total",
			Help: "Forwarded queries not found in the cache.",
		}),
		cacheEntries: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "weft_dns_cache_entries",
			Help: "Answers held in the forwarding cache.",
		}, func() float64 { return float64(cacheLen()) }),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_panics_total",
			Help: "Queries whose handling panicked (recovered; SERVFAIL answered).",
		}),
		truncated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_truncated_total",
			Help: "UDP answers truncated (TC set) to fit the client's buffer.",
		}),
		recordEntries: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "weft_dns_records",
			Help: "Live weft records (addresses and SRV entries) known to this peer.",
		}, func() float64 { return float64(recordsLen()) }),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.queries, m.forwards, m.forwardTime, m.cacheHits,
		m.cacheMisses, m.cacheEntries, m.panics, m.truncated, m.recordEntries} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("dns metrics: %w (one registry per server)", err)
			}
			return nil, fmt.Errorf("dns metrics: %w", err)
		}
	}
	return m, nil
}

// typeLabel bounds the type label to well-known types.
func typeLabel(qtype uint16) string {
	switch qtype {
	case mdns.TypeA, mdns.TypeAAAA, mdns.TypePTR, mdns.TypeSRV, mdns.TypeSOA, mdns.TypeNS,
		mdns.TypeCNAME, mdns.TypeMX, mdns.TypeTXT, mdns.TypeANY, mdns.TypeHTTPS, mdns.TypeSVCB,
		mdns.TypeDS, mdns.TypeDNSKEY, mdns.TypeCAA:
		return mdns.TypeToString[qtype]
	}
	return "other"
}

func rcodeLabel(rcode int) string {
	if s, ok := mdns.RcodeToString[rcode]; ok {
		return s
	}
	return "other"
}
