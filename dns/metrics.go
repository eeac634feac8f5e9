package dns

import (
	"errors"
	"fmt"
	"sync/atomic"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics of one Server. Registered on the registry passed to NewServer;
// with a nil registry they are kept but not exported.
type metrics struct {
	queries       *prometheus.CounterVec // type, rcode; use query() on the hot path
	queryCache    [len(typeLabels)][numRcodeSlots]atomic.Pointer[queryCounter]
	forwards      *prometheus.CounterVec // result
	forwardTime   prometheus.Histogram
	cacheHits     prometheus.Counter
	cacheMisses   prometheus.Counter
	cacheEntries  prometheus.GaugeFunc
	panics        prometheus.Counter
	truncated     prometheus.Counter
	recordEntries prometheus.GaugeFunc
	// networksRefused counts network lists SetNetworks refused (bad input).
	networksRefused prometheus.Counter
	// listenErrors counts listen addresses SetListen could not bind.
	listenErrors prometheus.Counter
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
		networksRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_networks_refused_total",
			Help: "Network lists refused by SetNetworks (bad name, range, duplicate or overlap); the previous list stays.",
		}),
		listenErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_dns_listen_errors_total",
			Help: "Gateway addresses SetListen could not listen on (retried at the next change).",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.queries, m.forwards, m.forwardTime, m.cacheHits,
		m.cacheMisses, m.cacheEntries, m.panics, m.truncated, m.recordEntries, m.networksRefused, m.listenErrors} {
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

// queryCounter is one child of weft_dns_queries_total.
type queryCounter struct{ prometheus.Counter }

// Slots of the query counter cache: rcodes 0-23 by value, then these.
const (
	rcodeSlotOther   = 24 // an rcode outside 0-23
	rcodeSlotDropped = 25 // nothing answered
	numRcodeSlots    = 26
)

// query returns the counter of weft_dns_queries_total for a query of type
// index ti (typeIndex) answered with rcode (rcode < 0: dropped). Children are
// created on first use, as WithLabelValues would, and then cached, so that
// the hot path does no label hashing or map lookup.
func (m *metrics) query(ti int, rcode int) prometheus.Counter {
	slot, label := rcodeSlotDropped, "dropped"
	switch {
	case rcode >= 0 && rcode < rcodeSlotOther:
		slot, label = rcode, rcodeLabel(rcode)
	case rcode >= 0:
		slot, label = rcodeSlotOther, "other"
	}
	p := &m.queryCache[ti][slot]
	if c := p.Load(); c != nil {
		return c.Counter
	}
	c := &queryCounter{m.queries.WithLabelValues(typeLabels[ti], label)}
	p.Store(c) // a racing Store stores the same child
	return c.Counter
}

// typeLabels are the values of the type label: well-known types, then
// "other", then "none" (no question).
var typeLabels = [...]string{"A", "AAAA", "PTR", "SRV", "SOA", "NS", "CNAME", "MX", "TXT", "ANY",
	"HTTPS", "SVCB", "DS", "DNSKEY", "CAA", "other", "none"}

const (
	typeIndexOther = 15
	typeIndexNone  = 16
)

// typeIndex bounds the type label to well-known types: it returns the index
// of qtype's label in typeLabels.
func typeIndex(qtype uint16) int {
	switch qtype {
	case mdns.TypeA:
		return 0
	case mdns.TypeAAAA:
		return 1
	case mdns.TypePTR:
		return 2
	case mdns.TypeSRV:
		return 3
	case mdns.TypeSOA:
		return 4
	case mdns.TypeNS:
		return 5
	case mdns.TypeCNAME:
		return 6
	case mdns.TypeMX:
		return 7
	case mdns.TypeTXT:
		return 8
	case mdns.TypeANY:
		return 9
	case mdns.TypeHTTPS:
		return 10
	case mdns.TypeSVCB:
		return 11
	case mdns.TypeDS:
		return 12
	case mdns.TypeDNSKEY:
		return 13
	case mdns.TypeCAA:
		return 14
	}
	return typeIndexOther
}

func rcodeLabel(rcode int) string {
	if s, ok := mdns.RcodeToString[rcode]; ok {
		return s
	}
	return "other"
}
