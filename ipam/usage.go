package ipam

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Block usage travels by gossip so that `weft status ipam` on any peer shows how full every
// peer's blocks are. Each peer sends its own report when it changes (a delta: one peer's
// counts) and full state is exchanged on join and push/pull. The table holds one report per
// peer (O(N) memory, O(N · blocks per peer) per push/pull) and forgets peers that left the
// membership (Prune).

// UsageChannel is the gossip channel of block usage.
const UsageChannel = "ipam-usage"

// Bounds on untrusted usage reports.
const (
	// maxUsageBlocks bounds the blocks in one report (a peer with more is refused, not cut).
	maxUsageBlocks = 256
	// maxUsageStateBytes bounds one push/pull state.
	maxUsageStateBytes = 4 << 20
	// maxUsageSkew: a report versioned (by its sender's clock) further ahead than this is
	// from the future.
	maxUsageSkew = time.Hour
)

// UsageReport is one peer's block usage. Version (its sender's clock, in nanoseconds) orders
// reports from the same peer.
type UsageReport struct {
	Peer    string         `json:"peer"`
	Version int64          `json:"version"`
	Used    map[string]int `json:"used"` // block CIDR → addresses in use
}

// UsageConfig configures a UsageTable.
type UsageConfig struct {
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// UsageTable holds the latest report of every peer. It implements mesh.ChannelHandler
// (structurally: ipam does not import mesh); safe for concurrent use.
type UsageTable struct {
	log      *slog.Logger
	now      func() time.Time
	rejected *prometheus.CounterVec

	mu      sync.Mutex // guards reports and lastSent
	reports map[string]UsageReport
	// lastSent is the local report last published, to send only changes.
	lastSent map[string]int
}

// NewUsageTable makes an empty table.
func NewUsageTable(cfg UsageConfig) *UsageTable {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	u := &UsageTable{log: cfg.Logger, now: cfg.Now, reports: map[string]UsageReport{},
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_ipam_usage_rejected_total", Help: "Gossiped block-usage reports rejected, by reason.",
		}, []string{"reason"})}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(u.rejected)
	}
	return u
}

// validate says what is wrong with a received report.
func (u *UsageTable) validate(r UsageReport) (reason string, err error) {
	switch {
	case r.Peer == "" || len(r.Peer) > maxNameLen:
		return "invalid", fmt.Errorf("usage report names peer %q", r.Peer)
	case r.Version <= 0:
		return "invalid", fmt.Errorf("usage report of %s has version %d", r.Peer, r.Version)
	case r.Version > u.now().Add(maxUsageSkew).UnixNano():
		return "future", fmt.Errorf("usage report of %s has version %s, more than %s ahead", r.Peer, time.Unix(0, r.Version).UTC().Format(time.RFC3339), maxUsageSkew)
	case len(r.Used) > maxUsageBlocks:
		return "oversize", fmt.Errorf("usage report of %s lists %d blocks, at most %d", r.Peer, len(r.Used), maxUsageBlocks)
	}
	for cidr, n := range r.Used {
		p, err := netip.ParsePrefix(cidr)
		if err != nil || p.Masked() != p {
			return "invalid", fmt.Errorf("usage report of %s has block %q", r.Peer, cidr)
		}
		if n < 0 || n > 1<<16 {
			return "invalid", fmt.Errorf("usage report of %s counts %d used in %s", r.Peer, n, cidr)
		}
	}
	return "", nil
}

// merge keeps r if it is valid and newer than what is known of its peer.
func (u *UsageTable) merge(r UsageReport) {
	if reason, err := u.validate(r); err != nil {
		u.rejected.WithLabelValues(reason).Inc()
		u.log.Warn("rejected block usage report", "reason", reason, "err", err)
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if cur, ok := u.reports[r.Peer]; ok && cur.Version >= r.Version {
		return
	}
	u.reports[r.Peer] = r
}

// Used says how many addresses of block cidr peer uses, if its report says.
func (u *UsageTable) Used(peer, cidr string) (int, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	r, ok := u.reports[peer]
	if !ok {
		return 0, false
	}
	n, ok := r.Used[cidr]
	return n, ok
}

// Publish records this peer's usage and returns the message to broadcast, or nil when it did
// not change since the last call.
func (u *UsageTable) Publish(peer string, used map[string]int) []byte {
	u.mu.Lock()
	if u.lastSent != nil && maps.Equal(u.lastSent, used) {
		u.mu.Unlock()
		return nil
	}
	u.lastSent = maps.Clone(used)
	r := UsageReport{Peer: peer, Version: u.now().UnixNano(), Used: maps.Clone(used)}
	u.reports[peer] = r
	u.mu.Unlock()
	b, _ := json.Marshal(r)
	return b
}

// Prune forgets the reports of peers for which known is false (gone from the membership).
// O(N).
func (u *UsageTable) Prune(known func(peer string) bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for name := range u.reports {
		if !known(name) {
			delete(u.reports, name)
		}
	}
}

// NotifyMsg implements mesh.ChannelHandler: one peer's report.
func (u *UsageTable) NotifyMsg(b []byte) {
	var r UsageReport
	if err := json.Unmarshal(b, &r); err != nil {
		u.rejected.WithLabelValues("malformed").Inc()
		u.log.Warn("rejected block usage report", "reason", "malformed", "err", err)
		return
	}
	u.merge(r)
}

// LocalState implements mesh.ChannelHandler: every report known.
func (u *UsageTable) LocalState(bool) []byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	all := make([]UsageReport, 0, len(u.reports))
	for _, r := range u.reports {
		all = append(all, r)
	}
	b, _ := json.Marshal(all)
	return b
}

// MergeRemoteState implements mesh.ChannelHandler.
func (u *UsageTable) MergeRemoteState(b []byte, _ bool) {
	if len(b) > maxUsageStateBytes {
		u.rejected.WithLabelValues("oversize").Inc()
		u.log.Warn("rejected block usage state", "reason", "oversize", "bytes", len(b))
		return
	}
	var all []UsageReport
	if err := json.Unmarshal(b, &all); err != nil {
		u.rejected.WithLabelValues("malformed").Inc()
		u.log.Warn("rejected block usage state", "reason", "malformed", "err", err)
		return
	}
	for _, r := range all {
		u.merge(r)
	}
}
