package mesh

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the mesh's Prometheus collectors, registered on the
// Config.Registerer by New and unregistered by Close, so that a Mesh can be
// recreated on the same registry (restart in tests, or in the daemon).
type metrics struct {
	reg        prometheus.Registerer
	collectors []prometheus.Collector

	members              *prometheus.GaugeVec   // state
	joinAttempts         prometheus.Counter     //
	joinFailures         *prometheus.CounterVec // reason
	events               *prometheus.CounterVec // type
	eventsDropped        prometheus.Counter     //
	messagesReceived     *prometheus.CounterVec // channel (registered channels only)
	messagesRejected     *prometheus.CounterVec // reason
	broadcasts           *prometheus.CounterVec // channel (registered channels only)
	broadcastsDropped    prometheus.Counter     //
	metadataRejected     prometheus.Counter     //
	coordUpdates         prometheus.Counter     //
	coordRejected        *prometheus.CounterVec // reason
	keyRejected          *prometheus.CounterVec // reason
	suspicionSuppressed  *prometheus.CounterVec // kind (suspect, alive)
	suspicionExpired     prometheus.Counter     //
	suspicionUnconfirmed prometheus.Counter     // a failed direct probe whose confirming ping was answered
}

// Join failure reasons (label values of weft_mesh_join_failures_total).
const (
	joinFailPassword    = "password"
	joinFailUnreachable = "unreachable"
	joinFailOther       = "other"
)

func newMetrics(reg prometheus.Registerer, queued func() float64) (*metrics, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reg: reg,
		members: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "weft_mesh_members",
			Help: "Peers known to this peer, itself included, by membership state.",
		}, []string{"state"}),
		joinAttempts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_mesh_join_attempts_total",
			Help: "Attempts to join a seed or connect target.",
		}),
		joinFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_join_failures_total",
			Help: "Failed join attempts by reason (password, unreachable, other).",
		}, []string{"reason"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_events_total",
			Help: "Membership changes of remote peers, by event type.",
		}, []string{"type"}),
		eventsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_mesh_events_dropped_total",
			Help: "Events not delivered because a subscriber's channel was full.",
		}),
		messagesReceived: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_messages_received_total",
			Help: "Gossip messages delivered to a registered channel.",
		}, []string{"channel"}),
		messagesRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_messages_rejected_total",
			Help: "Gossip messages and push/pull states dropped, by reason.",
		}, []string{"reason"}),
		broadcasts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_broadcasts_total",
			Help: "Messages queued for broadcast, by channel.",
		}, []string{"channel"}),
		broadcastsDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_mesh_broadcasts_dropped_total",
			Help: "Queued broadcasts dropped because the queue was full.",
		}),
		metadataRejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_mesh_metadata_rejected_total",
			Help: "Alive messages refused because their metadata did not decode.",
		}),
	}
	m.coordUpdates = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "weft_mesh_coordinate_updates_total",
		Help: "Network coordinate updates from acknowledged memberlist probes.",
	})
	m.coordRejected = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weft_mesh_coordinate_rejected_total",
		Help: "Coordinates in probe acks refused, by reason (empty, decode, dimensions, value, rtt, peer, update, unknown_key, signature, stale).",
	}, []string{"reason"})
	m.keyRejected = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weft_mesh_identity_rejected_total",
		Help: "Alive messages refused for their identity key, by reason (no_key, mismatch: another key than the one pinned for the name).",
	}, []string{"reason"})
	m.suspicionSuppressed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weft_mesh_suspicion_notes_suppressed_total",
		Help: "Suspect notes this peer did not broadcast because its budget (one per N probe intervals) was spent, and alive notes not needed because that suspicion was never published; the local state changed anyway.",
	}, []string{"kind"})
	for _, k := range []string{"suspect", "alive"} {
		m.suspicionSuppressed.WithLabelValues(k)
	}
	m.suspicionExpired = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "weft_mesh_suspicions_expired_total",
		Help: "Peers this peer held suspect that went back to alive because nothing renewed the suspicion within memberlist's shortest suspicion timeout (memberlist kept them alive).",
	})
	m.suspicionUnconfirmed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "weft_mesh_suspicions_unconfirmed_total",
		Help: "Failed direct probes not taken as suspicion: the ping that confirms one, a probe interval later, was answered (a stall or one lost packet, not a failed peer).",
	})
	queue := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "weft_mesh_broadcast_queue_messages",
		Help: "Broadcasts waiting in the gossip queue.",
	}, queued)
	m.collectors = []prometheus.Collector{
		m.members, m.joinAttempts, m.joinFailures, m.events, m.eventsDropped,
		m.messagesReceived, m.messagesRejected, m.broadcasts, m.broadcastsDropped,
		m.metadataRejected, m.coordUpdates, m.coordRejected, m.keyRejected, m.suspicionSuppressed, m.suspicionExpired, m.suspicionUnconfirmed, queue,
	}
	for _, s := range []State{StateAlive, StateSuspect, StateDead, StateLeft} {
		m.members.WithLabelValues(s.String()).Set(0)
	}
	for i, c := range m.collectors {
		if err := reg.Register(c); err != nil {
			for _, done := range m.collectors[:i] {
				reg.Unregister(done)
			}
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("mesh: register metrics: %w (is another Mesh using this registry?)", err)
			}
			return nil, fmt.Errorf("mesh: register metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) unregister() {
	for _, c := range m.collectors {
		m.reg.Unregister(c)
	}
}
