package router

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_api_requests_total", Help: "Control API requests by verb and CNI result code (0 = success).",
		}, []string{"verb", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "weft_api_request_duration_seconds", Help: "Control API request latency by verb.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"verb"}),
	}
	reg.MustRegister(m.requests, m.duration)
	return m
}

func (m *metrics) observe(verb string, code uint, d time.Duration) {
	m.requests.WithLabelValues(verb, strconv.FormatUint(uint64(code), 10)).Inc()
	m.duration.WithLabelValues(verb).Observe(d.Seconds())
}
