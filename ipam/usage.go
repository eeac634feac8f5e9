package ipam

import (
	"crypto/ed25519"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/weftnet/weft/mesh/identity"
)

// Block usage travels by gossip so that `weft status ipam` on any peer shows how full every
// peer's blocks are. Each peer sends its own report when it changes (a delta: one peer's
// counts) and full state is exchanged on join and push/pull. The table holds one report per
// peer (O(N) memory, O(N · blocks per peer) per push/pull) and forgets peers that left the
// membership (Prune).
//
// Trust: in a signed table (UsageConfig.Signer and Keys set) every report carries its peer's
// ed25519 signature and is verified against that peer's key before it is kept, whoever
// relayed it; so a member can report only its own usage. A report that would change nothing
// (not newer than the one held) is not verified. This peer's own report is authoritative:
// one of its own from gossip (an older session's) is never kept, and a newer one makes the
// next Publish re-assert the real figures.

// UsageChannel is the gossip channel of block usage.
const UsageChannel = "ipam-usage"

// UsageDomain is the signature domain of usage reports (identity.Sign).
const UsageDomain = "weft ipam usage v1"

// Bounds on untrusted usage reports.
const (
	// maxUsageBlocks bounds the blocks in one report (a peer with more is refused, not cut).
	maxUsageBlocks = 256
	// maxUsageStateBytes bounds one push/pull state.
	maxUsageStateBytes = 4 << 20
	// maxUsageSkew: a report versioned (by its sender's clock) further ahead than this is
	// from the future. As for link state and DNS records: clocks agree within seconds.
	maxUsageSkew = 5 * time.Minute
	// maxUsageAddrs bounds the addresses one peer reports in use, all blocks together: a
	// host holds at most thousands of containers, never a million.
	maxUsageAddrs = 1 << 20
	// DefaultMaxUsageReports bounds the reports held and those one push/pull state may list:
	// one per member, above the 5,000 hosts the design targets.
	DefaultMaxUsageReports = 8192
)

// Reasons a report is rejected: the values of weft_ipam_usage_rejected_total{reason}.
const (
	usageMalformed     = "malformed"        // not JSON of a report (or a list of them)
	usageInvalid       = "invalid"          // bad peer name, version or block
	usageFuture        = "future"           // version beyond now + maxUsageSkew
	usageOversize      = "oversize"         // too many blocks, or a state over maxUsageStateBytes
	usageOverCapacity  = "over_capacity"    // more addresses in use than the block (or a host) has
	usageUnknownOrigin = "unknown_origin"   // the reporting peer's key is not known (yet)
	usageBadSignature  = "bad_signature"    // not signed by the peer it names
	usageTooMany       = "too_many_reports" // a state listing more reports than MaxReports
	usageTableFull     = "table_full"       // MaxReports peers already held
	// usageAfterForgery: a state's reports left unchecked after maxUsageForgeries bad
	// signatures in it. Honest peers relay only reports they verified, so such a state
	// comes from a forger; checking the rest would spend a verification each.
	usageAfterForgery = "after_forgery"
	maxUsageForgeries = 8
)

// UsageReport is one peer's block usage. Version (its sender's clock, in nanoseconds) orders
// reports from the same peer. Sig is the peer's signature of the rest (signedBytes).
type UsageReport struct {
	Peer    string         `json:"peer"`
	Version int64          `json:"version"`
	Used    map[string]int `json:"used"` // block CIDR → addresses in use
	Sig     []byte         `json:"sig,omitempty"`
}

// signedBytes is the canonical form a report's signature covers: peer, version, then every
// block with its count, in block order (a map has no order of its own).
func (r UsageReport) signedBytes() []byte {
	b := make([]byte, 0, len(r.Peer)+9+len(r.Used)*24)
	b = append(b, r.Peer...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Version))
	for _, cidr := range slices.Sorted(maps.Keys(r.Used)) {
		b = append(b, cidr...)
		b = append(b, 0)
		b = binary.BigEndian.AppendUint64(b, uint64(int64(r.Used[cidr])))
	}
	return b
}

// UsageSigner signs this peer's reports; *identity.Identity is one. Public is the key other
// peers verify them with; the table checks its own reports coming back against it.
type UsageSigner interface {
	Sign(domain string, msg []byte) []byte
	Public() ed25519.PublicKey
}

// UsageConfig configures a UsageTable.
type UsageConfig struct {
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Signer signs this peer's reports and Keys returns other peers' keys (the mesh's
	// PublicKey). A peer sets both; with both nil the table signs and verifies nothing
	// (tests, simulations). One without the other is a programming error: NewUsageTable
	// panics, as MustRegister does.
	Signer UsageSigner
	Keys   identity.KeyLookup
	// MaxReports bounds the reports held and listed in one state (default
	// DefaultMaxUsageReports).
	MaxReports int
	// ResendAfter: once this peer's usage has stayed the same this long after a change,
	// Publish returns the last report once more (default DefaultUsageResendAfter). A burst of
	// attachments publishes many reports; if the last one is lost, only push/pull (30 s
	// and more) would correct every other peer's count.
	ResendAfter time.Duration
}

// DefaultUsageResendAfter is UsageConfig.ResendAfter's default.
const DefaultUsageResendAfter = 3 * time.Second

// UsageTable holds the latest report of every peer. It implements mesh.ChannelHandler
// (structurally: ipam does not import mesh); safe for concurrent use.
type UsageTable struct {
	log        *slog.Logger
	now        func() time.Time
	signer     UsageSigner
	keys       identity.KeyLookup
	maxReports int
	resend     time.Duration
	rejected   *prometheus.CounterVec

	mu      sync.Mutex // guards the fields below
	reports map[string]UsageReport
	// self is the name this peer publishes under (set by Publish); lastSent its report last
	// published, to send only changes; clock the last version it used.
	self     string
	lastSent map[string]int
	clock    int64
	// lastMsg is the last report published and changedAt when; resent says it went out
	// again after ResendAfter.
	lastMsg   []byte
	changedAt time.Time
	resent    bool
}

// NewUsageTable makes an empty table.
func NewUsageTable(cfg UsageConfig) *UsageTable {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if (cfg.Signer == nil) != (cfg.Keys == nil) {
		panic("ipam: usage table needs both a signer and a key lookup, or neither")
	}
	if cfg.MaxReports <= 0 {
		cfg.MaxReports = DefaultMaxUsageReports
	}
	if cfg.ResendAfter <= 0 {
		cfg.ResendAfter = DefaultUsageResendAfter
	}
	u := &UsageTable{log: cfg.Logger, now: cfg.Now, signer: cfg.Signer, keys: cfg.Keys, maxReports: cfg.MaxReports,
		resend:  cfg.ResendAfter,
		reports: map[string]UsageReport{},
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_ipam_usage_rejected_total", Help: "Gossiped block-usage reports rejected, by reason.",
		}, []string{"reason"})}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(u.rejected)
	}
	return u
}

// validate says what is wrong with a received report, from its content alone.
func (u *UsageTable) validate(r UsageReport) (reason string, err error) {
	switch {
	case r.Peer == "" || len(r.Peer) > maxNameLen:
		return usageInvalid, fmt.Errorf("usage report names peer %q", r.Peer)
	case r.Version <= 0:
		return usageInvalid, fmt.Errorf("usage report of %s has version %d", r.Peer, r.Version)
	case r.Version > u.now().Add(maxUsageSkew).UnixNano():
		return usageFuture, fmt.Errorf("usage report of %s has version %d, more than %s ahead of our clock", r.Peer, r.Version, maxUsageSkew)
	case len(r.Used) > maxUsageBlocks:
		return usageOversize, fmt.Errorf("usage report of %s lists %d blocks, at most %d", r.Peer, len(r.Used), maxUsageBlocks)
	case len(r.Sig) != 0 && len(r.Sig) != ed25519.SignatureSize:
		return usageInvalid, fmt.Errorf("usage report of %s has a signature of %d bytes", r.Peer, len(r.Sig))
	}
	total := 0
	for cidr, n := range r.Used {
		p, err := netip.ParsePrefix(cidr)
		if err != nil || p.Masked() != p {
			return usageInvalid, fmt.Errorf("usage report of %s has block %q", r.Peer, cidr)
		}
		if n < 0 {
			return usageInvalid, fmt.Errorf("usage report of %s counts %d used in %s", r.Peer, n, cidr)
		}
		if size := blockSize(p); n > size {
			return usageOverCapacity, fmt.Errorf("usage report of %s counts %d used in %s, which has %d addresses", r.Peer, n, cidr, size)
		}
		if total += n; total > maxUsageAddrs {
			return usageOverCapacity, fmt.Errorf("usage report of %s counts more than %d addresses in use", r.Peer, maxUsageAddrs)
		}
	}
	return "", nil
}

// blockSize is the number of addresses in p, capped at maxUsageAddrs (so no shift overflows).
func blockSize(p netip.Prefix) int {
	host := p.Addr().BitLen() - p.Bits()
	if host >= 20 {
		return maxUsageAddrs
	}
	return 1 << host
}

// reject counts and logs a refused report or state.
func (u *UsageTable) reject(reason string, err error) {
	u.rejected.WithLabelValues(reason).Inc()
	u.log.Warn("rejected block usage report", "reason", reason, "err", err)
}

// merge keeps r if it is valid, newer than what is known of its peer, and signed by that
// peer. The signature is checked outside the lock, and only for a report that would change
// the table. It returns the reason r was rejected, or "".
func (u *UsageTable) merge(r UsageReport) string {
	if reason, err := u.validate(r); err != nil {
		u.reject(reason, err)
		return reason
	}
	u.mu.Lock()
	cur, ok := u.reports[r.Peer]
	own := r.Peer == u.self
	u.mu.Unlock()
	if ok && cur.Version >= r.Version {
		return ""
	}
	if u.keys != nil {
		var pub ed25519.PublicKey
		var known bool
		if own {
			pub, known = u.signer.Public(), true
		} else {
			pub, known = u.keys(r.Peer)
		}
		switch {
		case !known:
			u.reject(usageUnknownOrigin, fmt.Errorf("usage report of %s: the peer's key is not known yet", r.Peer))
			return usageUnknownOrigin
		case !identity.Verify(pub, UsageDomain, r.signedBytes(), r.Sig):
			u.reject(usageBadSignature, fmt.Errorf("usage report of %s version %d: not signed by the peer", r.Peer, r.Version))
			return usageBadSignature
		}
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if r.Peer == u.self {
		// Ours, from an older session with a clock ahead: never kept; the next Publish
		// re-asserts the real figures at a newer version.
		u.clock = max(u.clock, r.Version)
		u.lastSent = nil
		return ""
	}
	cur, ok = u.reports[r.Peer]
	switch {
	case ok && cur.Version >= r.Version:
		return ""
	case !ok && len(u.reports) >= u.maxReports:
		u.rejected.WithLabelValues(usageTableFull).Inc()
		u.log.Warn("rejected block usage report", "reason", usageTableFull, "peer", r.Peer, "held", len(u.reports))
		return usageTableFull
	}
	u.reports[r.Peer] = r
	return ""
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
// not change since the last call, except that the last report goes out once more when it
// has stood for ResendAfter. Its version is the clock in ns, above every version used (or
// seen from an older session of this peer) before.
func (u *UsageTable) Publish(peer string, used map[string]int) []byte {
	u.mu.Lock()
	now := u.now()
	if u.self == peer && u.lastSent != nil && maps.Equal(u.lastSent, used) {
		defer u.mu.Unlock()
		if u.resent || now.Sub(u.changedAt) < u.resend {
			return nil
		}
		u.resent = true
		return u.lastMsg
	}
	u.self = peer
	u.lastSent = maps.Clone(used)
	if cur, ok := u.reports[peer]; ok {
		u.clock = max(u.clock, cur.Version) // one of ours kept before we knew our name
	}
	u.clock = max(now.UnixNano(), u.clock+1)
	r := UsageReport{Peer: peer, Version: u.clock, Used: maps.Clone(used)}
	if u.signer != nil {
		r.Sig = u.signer.Sign(UsageDomain, r.signedBytes())
	}
	u.reports[peer] = r
	b, _ := json.Marshal(r)
	u.lastMsg, u.changedAt, u.resent = b, now, false
	u.mu.Unlock()
	return b
}

// Prune forgets the reports of peers for which known is false (gone from the membership).
// O(N).
func (u *UsageTable) Prune(known func(peer string) bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for name := range u.reports {
		if !known(name) && name != u.self {
			delete(u.reports, name)
		}
	}
}

// NotifyMsg implements mesh.ChannelHandler: one peer's report.
func (u *UsageTable) NotifyMsg(b []byte) {
	var r UsageReport
	if err := json.Unmarshal(b, &r); err != nil {
		u.reject(usageMalformed, err)
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

// MergeRemoteState implements mesh.ChannelHandler. A state over maxUsageStateBytes, or listing
// more reports than MaxReports (one per member), is refused whole before any report in it
// is checked: each would cost a signature verification.
func (u *UsageTable) MergeRemoteState(b []byte, _ bool) {
	if len(b) > maxUsageStateBytes {
		u.reject(usageOversize, fmt.Errorf("usage state of %d bytes, at most %d", len(b), maxUsageStateBytes))
		return
	}
	var all []UsageReport
	if err := json.Unmarshal(b, &all); err != nil {
		u.reject(usageMalformed, err)
		return
	}
	if len(all) > u.maxReports {
		u.reject(usageTooMany, fmt.Errorf("usage state lists %d reports, at most %d", len(all), u.maxReports))
		return
	}
	forged := 0
	for i, r := range all {
		if u.merge(r) == usageBadSignature {
			if forged++; forged >= maxUsageForgeries {
				rest := len(all) - i - 1
				u.rejected.WithLabelValues(usageAfterForgery).Add(float64(rest))
				u.log.Warn("rejected the rest of a block usage state", "reason", usageAfterForgery, "forged", forged, "unchecked", rest)
				return
			}
		}
	}
}
