package datapath

import (
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the counters the link drivers share. One Metrics serves every driver of a
// peer (the mode is a label), so it is registered once. A nil *Metrics counts nothing.
type Metrics struct {
	badPeers *prometheus.CounterVec
}

// NewMetrics makes the drivers' counters and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		badPeers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_datapath_bad_peers_total",
			Help: "Remote peers a link driver left out of Set because it cannot serve them (once per Set), by link mode.",
		}, []string{"mode"}),
	}
	reg.MustRegister(m.badPeers)
	return m
}

// RejectPeer applies the bad-peer rule of Driver for one peer: it logs why the peer is
// left out, counts it, and returns the error (wrapping ErrBadPeer, naming the peer) that
// Set joins into its result.
func RejectPeer(log *slog.Logger, m *Metrics, mode, peer, format string, args ...any) error {
	reason := fmt.Sprintf(format, args...)
	if log != nil {
		log.Warn("remote peer left out: "+reason, "peer", peer)
	}
	if m != nil {
		m.badPeers.WithLabelValues(mode).Inc()
	}
	return fmt.Errorf("%w: %s: %s", ErrBadPeer, peer, reason)
}
