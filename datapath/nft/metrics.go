package nft

import "github.com/prometheus/client_golang/prometheus"

// CounterCollector exports a user's named counters as the series of one Prometheus
// counter, read from the kernel on scrape (one netlink dump, O(counters)); a failed read
// is an invalid metric, so the scrape says so.
type CounterCollector struct {
	Desc *prometheus.Desc
	// Read returns the counters' packets by name without the user's prefix (Counters).
	Read func() (map[string]uint64, error)
	// Labels are the label values of the series of the counter called name, in Desc's
	// order; false leaves the counter out.
	Labels func(name string) ([]string, bool)
}

// Describe implements prometheus.Collector.
func (cc CounterCollector) Describe(ch chan<- *prometheus.Desc) { ch <- cc.Desc }

// Collect implements prometheus.Collector.
func (cc CounterCollector) Collect(ch chan<- prometheus.Metric) {
	m, err := cc.Read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(cc.Desc, err)
		return
	}
	for name, v := range m {
		if labels, ok := cc.Labels(name); ok {
			ch <- prometheus.MustNewConstMetric(cc.Desc, prometheus.CounterValue, float64(v), labels...)
		}
	}
}
