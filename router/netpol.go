package router

// Network policy wired into the peer (issue #15, Policy 2–5). datapath/netpol decides
// (Parse, Compile, Explain), datapath/netpol/nftpol enforces; this file only gathers the
// inputs and calls them:
//
//   - Every host enforces the whole set: the policies of the Raft table and the endpoints of
//     every host (this peer's attachments, the others' from label gossip). The forward hook
//     sees a packet on the host of its source and, across hosts, on the host of its
//     destination too; both hold the same Ruleset, so both decide alike.
//   - Inputs change through the policy table (syncPolicies), a local ADD or DEL, a label
//     change here or in gossip (labelsChanged). Every change asks for one compile and apply;
//     requests that arrive while an apply runs are served together by the next one (sync).
//     A compile is O(policies × endpoints of their network) (netpol.Compile), an apply of
//     an endpoint change O(changed elements) in one transaction (nftpol).
//   - ADD applies with the new endpoint before it returns, so a selected container is
//     policed from its first packet; DEL applies without it before its address is released,
//     so a reused address never inherits the old container's rights. Bridge-mode attachments
//     only: an SR-IOV VF bypasses the host's forward hook, so its own traffic is not policed
//     (its address still counts as a peer in other endpoints' rules).
//   - At start, before the API serves, the stored policies and attachments are applied again
//     (the kernel's table survives a restart; this converges it), with the other hosts'
//     endpoints as they were saved at the last apply, until gossip brings them back.
//   - A slow Reconcile repairs what was changed by hand.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/weftnet/weft/datapath/netpol"
	"github.com/weftnet/weft/datapath/netpol/nftpol"
	"github.com/weftnet/weft/ipam"
)

// Timings of the policy loop.
const (
	// policyReconcile is how often the kernel's policy objects are read back and repaired.
	policyReconcile = time.Minute
	// policySavedRemoteFor is how long after start the saved endpoints of other hosts stand in
	// while gossip has brought none yet.
	policySavedRemoteFor = time.Minute
)

// keyPolicyRemote is the key, in bucketDatapath, of the other hosts' endpoints at the last
// apply (restored at start).
var keyPolicyRemote = []byte("policy-remote-endpoints")

// bridgeNFPath is the sysctl that makes bridged (same-host) traffic reach the forward hook.
const bridgeNFPath = "/proc/sys/net/bridge/bridge-nf-call-iptables"

// validatePolicy is the peer's ipam.PolicyValidator: netpol's parser, the canonical spec its
// JSON. Every real peer uses it unless Config names another.
func validatePolicy(name string, file []byte) ([]byte, string, error) {
	p, err := netpol.Parse(name, file)
	if err != nil {
		return nil, "", err
	}
	c, err := json.Marshal(p)
	return c, p.Network, err
}

// policyDeps are what the policy part reads of the peer; functions, so tests build it alone.
type policyDeps struct {
	Enforcer *nftpol.Enforcer
	Local    func() []EndpointInfo // this peer's attachments
	Remote   func() []EndpointInfo // the others', from gossip
	DB       *bolt.DB              // nil: the remote endpoints are not saved
	Registry prometheus.Registerer
	Logger   *slog.Logger
}

// policyPart compiles and applies network policy. Safe for concurrent use.
type policyPart struct {
	d       policyDeps
	started time.Time

	applySeconds prometheus.Histogram
	syncSeconds  *prometheus.HistogramVec
	skipped      prometheus.Gauge
	failures     prometheus.Counter

	req atomic.Uint64 // apply requests so far; sync serves each by an apply started after it

	inMu       sync.Mutex // guards the inputs below (never held across an apply)
	policies   []netpol.Policy
	polSkipped []string
	polCreated map[string]polStamp // by policy name: its version and when it was applied
	leaving    map[ipam.Key]bool   // attachments being deleted: left out of the endpoints
	saved      []EndpointInfo      // other hosts' endpoints at the last apply before start

	mu          sync.Mutex // serialises compile and apply; guards the fields below
	done        uint64     // the requests the last apply served
	lastErr     error
	rs          netpol.Ruleset
	appliedAt   time.Time
	seen        map[string]uint64 // remote endpoint → the record version already measured
	polSeen     map[string]uint64 // policy → the version already measured
	lastSkipped string
	lastRemote  []EndpointInfo
}

func newPolicyPart(d policyDeps) (*policyPart, error) {
	if d.Logger == nil {
		d.Logger = slog.New(slog.DiscardHandler)
	}
	pp := &policyPart{d: d, started: time.Now(), leaving: map[ipam.Key]bool{}, seen: map[string]uint64{},
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "weft_policy_apply_seconds",
			Help:    "Time to compile the network policy and apply it to the kernel.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
		syncSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "weft_policy_sync_seconds",
			Help: "From a change to the policy apply that includes it: local (an ADD's arrival), gossip (a label " +
				"record's creation on its owner) or policy (the apply reaching a peer); the latter two by the origin's clock.",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2, 5, 10},
		}, []string{"source"}),
		skipped: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "weft_policy_skipped",
			Help: "Policies and endpoints the last compile left out (invalid, duplicate, not IPv4); the peer logs why.",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_policy_apply_failures_total",
			Help: "Policy applies that failed (nothing changed in the kernel; retried on the next change or reconcile).",
		}),
	}
	if d.Registry != nil {
		for _, c := range []prometheus.Collector{pp.applySeconds, pp.syncSeconds, pp.skipped, pp.failures, d.Enforcer.DropsCollector()} {
			if err := d.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("register policy metrics: %w", err)
			}
		}
	}
	if d.DB != nil {
		saved, err := loadPolicyRemote(d.DB)
		if err != nil {
			d.Logger.Warn("saved endpoints of other hosts unusable; policy waits for gossip to learn them", "err", err)
		}
		pp.saved = saved
	}
	return pp, nil
}

// polStamp is a stored policy's version and creation (ipam.PolicyObject.Created).
type polStamp struct {
	version uint64
	created time.Time
}

// setPolicies takes the cluster's policy table. A stored spec that does not decode (another
// validator wrote it) is left out and reported with the compile's skipped entries. O(policies).
func (pp *policyPart) setPolicies(objs []ipam.PolicyObject) {
	pols, skipped := decodePolicies(objs)
	stamps := make(map[string]polStamp, len(objs))
	for _, o := range objs {
		if o.Created > 0 {
			stamps[o.Name] = polStamp{o.Version, time.Unix(0, o.Created)}
		}
	}
	pp.inMu.Lock()
	pp.policies, pp.polSkipped, pp.polCreated = pols, skipped, stamps
	pp.inMu.Unlock()
}

// decodePolicies reads the canonical specs of the table. Pure.
func decodePolicies(objs []ipam.PolicyObject) ([]netpol.Policy, []string) {
	var pols []netpol.Policy
	var skipped []string
	for _, o := range objs {
		var p netpol.Policy
		dec := json.NewDecoder(bytes.NewReader(o.Spec))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			skipped = append(skipped, fmt.Sprintf("policy %s: stored spec is not a netpol policy: %v", o.Name, err))
			continue
		}
		if p.Name == "" {
			p.Name = o.Name
		}
		if p.Network == "" {
			p.Network = o.Network
		}
		pols = append(pols, p)
	}
	return pols, skipped
}

// sync compiles and applies the current inputs, unless an apply that started after this
// call began has already done so (then its result is this call's): a burst of requests costs
// one apply running and at most one more.
func (pp *policyPart) sync() error {
	want := pp.req.Add(1)
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.done >= want {
		return pp.lastErr
	}
	upTo := pp.req.Load()
	pp.lastErr = pp.applyLocked(false)
	pp.done = upTo
	return pp.lastErr
}

// reconcile is sync reading the kernel back (repairs hand edits).
func (pp *policyPart) reconcile() error {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return pp.applyLocked(true)
}

// applyLocked gathers the inputs, compiles and applies. Caller holds mu.
func (pp *policyPart) applyLocked(reconcile bool) error {
	start := time.Now()
	pp.inMu.Lock()
	pols, polSkipped, stamps := pp.policies, pp.polSkipped, pp.polCreated
	leaving := make(map[ipam.Key]bool, len(pp.leaving))
	for k := range pp.leaving {
		leaving[k] = true
	}
	saved := pp.saved
	pp.inMu.Unlock()

	local := pp.d.Local()
	remote := pp.d.Remote()
	if len(remote) == 0 && len(saved) > 0 && time.Since(pp.started) < policySavedRemoteFor {
		remote = saved // gossip has not brought the others' endpoints back yet
	}
	eps := policyEndpoints(local, remote, leaving)
	rs := netpol.Compile(pols, eps)
	rs.Skipped = append(polSkipped, rs.Skipped...)
	var err error
	var st nftpol.Stats
	if reconcile {
		st, err = pp.d.Enforcer.Reconcile(rs)
	} else {
		st, err = pp.d.Enforcer.Apply(rs)
	}
	took := time.Since(start)
	pp.applySeconds.Observe(took.Seconds())
	if err != nil {
		pp.failures.Inc()
		return fmt.Errorf("apply network policy: %w", err)
	}
	now := time.Now()
	pp.rs, pp.appliedAt = rs, now
	pp.skipped.Set(float64(len(rs.Skipped)))
	if s := strings.Join(rs.Skipped, "; "); s != pp.lastSkipped {
		pp.lastSkipped = s
		if s != "" {
			pp.d.Logger.Warn("network policy left out what it cannot enforce", "skipped", rs.Skipped)
		}
	}
	pp.observeRemote(remote, now)
	pp.observePolicies(stamps, now)
	if st != (nftpol.Stats{}) {
		pp.d.Logger.Debug("network policy applied", "took", took, "clauses", len(rs.Egress)+len(rs.Ingress),
			"elements", rs.Elements(), "stats", st)
	}
	return nil
}

// observeRemote measures the lag of the gossiped records this apply is the first to hold,
// and saves the others' endpoints when they changed. O(remote endpoints).
func (pp *policyPart) observeRemote(remote []EndpointInfo, now time.Time) {
	seen := make(map[string]uint64, len(remote))
	for _, e := range remote {
		k := e.Peer + "/" + e.Address.String()
		v := uint64(e.Changed.UnixNano())
		seen[k] = v
		if e.Changed.IsZero() || pp.seen[k] == v || e.Changed.Before(pp.started) {
			continue // not measured, already measured, or older than this peer's start
		}
		pp.syncSeconds.WithLabelValues("gossip").Observe(max(0, now.Sub(e.Changed).Seconds()))
	}
	pp.seen = seen
	if pp.d.DB == nil || slices.EqualFunc(remote, pp.lastRemote, endpointEqual) {
		return
	}
	pp.lastRemote = remote
	if err := savePolicyRemote(pp.d.DB, remote); err != nil {
		pp.d.Logger.Warn("could not save the other hosts' endpoints for a restart", "err", err)
	}
}

// observePolicies measures the lag of the policy versions this apply is the first to hold,
// from their apply on the peer that took it (its clock). O(policies).
func (pp *policyPart) observePolicies(stamps map[string]polStamp, now time.Time) {
	seen := make(map[string]uint64, len(stamps))
	for name, s := range stamps {
		seen[name] = s.version
		if pp.polSeen[name] == s.version || s.created.Before(pp.started) {
			continue
		}
		pp.syncSeconds.WithLabelValues("policy").Observe(max(0, now.Sub(s.created).Seconds()))
	}
	pp.polSeen = seen
}

func endpointEqual(a, b EndpointInfo) bool {
	if a.Peer != b.Peer || a.Address != b.Address || a.Network != b.Network || len(a.Labels) != len(b.Labels) {
		return false
	}
	for k, v := range a.Labels {
		if w, ok := b.Labels[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// policyEndpoints are the compiler's endpoints: this peer's attachments but those leaving,
// and the others'. Pure; O(endpoints).
func policyEndpoints(local, remote []EndpointInfo, leaving map[ipam.Key]bool) []netpol.Endpoint {
	out := make([]netpol.Endpoint, 0, len(local)+len(remote))
	for _, e := range local {
		if leaving[ipam.Key{ContainerID: e.ContainerID, IfName: e.IfName}] {
			continue
		}
		out = append(out, netpol.Endpoint{Key: e.Peer + "/" + e.ContainerID + "/" + e.IfName, Network: e.Network, Addr: e.Address, Labels: e.Labels})
	}
	for _, e := range remote {
		out = append(out, netpol.Endpoint{Key: e.Peer + "/" + e.Address.String(), Network: e.Network, Addr: e.Address, Labels: e.Labels})
	}
	return out
}

// added applies with a new local attachment; arrived is when its ADD arrived.
func (pp *policyPart) added(arrived time.Time) error {
	if err := pp.sync(); err != nil {
		return err
	}
	pp.syncSeconds.WithLabelValues("local").Observe(time.Since(arrived).Seconds())
	return nil
}

// leave applies without the attachment key and returns the function that forgets it, to be
// called once the allocator no longer lists it.
func (pp *policyPart) leave(key ipam.Key) (forget func(), err error) {
	pp.inMu.Lock()
	pp.leaving[key] = true
	pp.inMu.Unlock()
	return func() {
		pp.inMu.Lock()
		delete(pp.leaving, key)
		pp.inMu.Unlock()
	}, pp.sync()
}

// run applies on every change of the endpoints' labels, and reconciles on a slow timer.
// Policy table changes arrive through setPolicies and a kick.
func (pp *policyPart) run(ctx context.Context, labels <-chan struct{}, kick <-chan struct{}) {
	tick := time.NewTicker(policyReconcile)
	defer tick.Stop()
	for {
		var err error
		select {
		case <-ctx.Done():
			return
		case <-labels:
			err = pp.sync()
		case <-kick:
			err = pp.sync()
		case <-tick.C:
			err = pp.reconcile()
		}
		if err != nil {
			pp.d.Logger.Warn("network policy not applied; retried on the next change", "err", err)
		}
	}
}

// ruleset is the last Ruleset applied and when.
func (pp *policyPart) ruleset() (netpol.Ruleset, time.Time) {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return pp.rs, pp.appliedAt
}

// ensureBridgeNF turns on bridge-nf-call-iptables in this netns when it is off, so that
// same-bridge traffic is policed too (as kube-proxy requires it). Idempotent; what it did is
// logged; a host without br_netfilter is told so (cross-host traffic is still policed).
func ensureBridgeNF(log *slog.Logger) {
	err := nftpol.CheckBridged()
	if err == nil {
		return
	}
	if _, serr := os.Stat(bridgeNFPath); serr != nil {
		log.Warn("same-bridge traffic is not policed: load br_netfilter (modprobe br_netfilter)", "err", err)
		return
	}
	if werr := os.WriteFile(bridgeNFPath, []byte("1\n"), 0o644); werr != nil {
		log.Warn("same-bridge traffic is not policed: cannot set net.bridge.bridge-nf-call-iptables=1", "err", werr)
		return
	}
	log.Info("set net.bridge.bridge-nf-call-iptables=1 so that same-bridge traffic is policed", "was", err)
}

func savePolicyRemote(db *bolt.DB, eps []EndpointInfo) error {
	data, err := json.Marshal(eps)
	if err != nil {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketDatapath)
		if err != nil {
			return err
		}
		return b.Put(keyPolicyRemote, data)
	})
}

func loadPolicyRemote(db *bolt.DB) ([]EndpointInfo, error) {
	var eps []EndpointInfo
	err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDatapath)
		if b == nil {
			return nil
		}
		if data := b.Get(keyPolicyRemote); data != nil {
			return json.Unmarshal(data, &eps)
		}
		return nil
	})
	return eps, err
}

// startPolicy builds the enforcer (after the isolation, whose table it shares), makes
// same-bridge traffic visible to it, and applies the stored policies and attachments before
// the control API serves any ADD. A host where policy cannot be applied does not start: its
// selected containers would be open.
func (p *Peer) startPolicy() error {
	log := p.log.With("component", "policy")
	enf, err := nftpol.New(nftpol.Deps{Logger: log, Registry: p.reg})
	if err != nil {
		return err
	}
	ensureBridgeNF(log)
	pp, err := newPolicyPart(policyDeps{Enforcer: enf, Local: p.endpoints, Remote: p.remoteEndpoints,
		DB: p.db, Registry: p.reg, Logger: log})
	if err != nil {
		return err
	}
	list, _ := p.cluster.Policies()
	pp.setPolicies(list)
	if err := pp.sync(); err != nil {
		return err
	}
	p.policy = pp
	p.policyKick = make(chan struct{}, 1)
	return nil
}

// runPolicy is the policy loop; it returns when ctx ends.
func (p *Peer) runPolicy(ctx context.Context) {
	if p.policy != nil {
		p.policy.run(ctx, p.labelsChanged(), p.policyKick)
	}
}

// policyTable hands a changed policy table to the policy part and wakes its loop.
func (p *Peer) policyTable(list []ipam.PolicyObject) {
	if p.policy == nil {
		return
	}
	p.policy.setPolicies(list)
	select {
	case p.policyKick <- struct{}{}:
	default:
	}
}

// policyAdded applies with a bridge attachment just made; nil without policy (tests).
func (p *Peer) policyAdded(arrived time.Time) error {
	if p.policy == nil {
		return nil
	}
	if err := p.policy.added(arrived); err != nil {
		return errCNI(types.ErrTryAgainLater, "network policy could not be applied with the new container: %v", err)
	}
	return nil
}

// policyLeave applies without an attachment being deleted; the returned function forgets
// it once released. A failure is logged: DEL must succeed, and the next apply (the next ADD
// of the address at the latest) converges.
func (p *Peer) policyLeave(key ipam.Key) func() {
	if p.policy == nil {
		return func() {}
	}
	forget, err := p.policy.leave(key)
	if err != nil {
		p.log.Warn("network policy not applied without a deleted container; the next change converges", "container", key.ContainerID, "err", err)
	}
	return forget
}

// PolicyExplainVerdict is one direction's decision.
type PolicyExplainVerdict struct {
	Allowed  bool   `json:"allowed"`
	Selected bool   `json:"selected"`
	Policy   string `json:"policy,omitempty"`
	Rule     int    `json:"rule"` // the deciding rule's index; -1: the policy's default deny, or not selected
	Counter  string `json:"counter,omitempty"`
	Reason   string `json:"reason"`
}

// PolicyExplain answers GET /v1/policy/explain: what the applied policy does with the first
// packet of a new connection from Src to Dst.
type PolicyExplain struct {
	Src     netip.Addr           `json:"src"`
	Dst     netip.Addr           `json:"dst"`
	Proto   string               `json:"proto"`
	Port    uint16               `json:"port,omitempty"`
	Allowed bool                 `json:"allowed"`
	Reason  string               `json:"reason"`
	Egress  PolicyExplainVerdict `json:"egress"`
	Ingress PolicyExplainVerdict `json:"ingress"`
	Applied time.Time            `json:"applied"` // when the Ruleset explained was applied
}

func explainVerdict(v netpol.Verdict) PolicyExplainVerdict {
	return PolicyExplainVerdict{Allowed: v.Allowed, Selected: v.Selected, Policy: v.Policy, Rule: v.Index, Counter: v.Counter, Reason: v.Reason}
}

// errExplain is a refused explain question.
var errExplain = errors.New("policy explain")

// parseExplainPort reads proto and port: proto tcp, udp, sctp or icmp (default tcp), port
// 1–65535 (none for icmp). Pure.
func parseExplainPort(proto, port string) (netpol.Proto, uint16, error) {
	pr := netpol.Proto(strings.ToLower(proto))
	if pr == "" {
		pr = netpol.TCP
	}
	if pr.Number() == 0 {
		return "", 0, fmt.Errorf("%w: protocol %q: want tcp, udp, sctp or icmp", errExplain, proto)
	}
	if pr == netpol.ICMP {
		if port != "" && port != "0" {
			return "", 0, fmt.Errorf("%w: icmp has no port (got %q)", errExplain, port)
		}
		return pr, 0, nil
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("%w: port %q: want 1-65535", errExplain, port)
	}
	return pr, uint16(n), nil
}

// resolveEndpoint reads an address, or names an endpoint by container ID or name among eps
// (refused when it names several addresses). Pure; O(endpoints).
func resolveEndpoint(s string, eps []EndpointInfo) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, fmt.Errorf("%w: no endpoint given", errExplain)
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return a, nil
	}
	var found []netip.Addr
	for _, e := range eps {
		if (e.ContainerID == s || e.Name == s) && !slices.Contains(found, e.Address) {
			found = append(found, e.Address)
		}
	}
	switch len(found) {
	case 0:
		return netip.Addr{}, fmt.Errorf("%w: %q is neither an address nor a container known to this peer", errExplain, s)
	case 1:
		return found[0], nil
	}
	return netip.Addr{}, fmt.Errorf("%w: %q names several addresses %v; give one", errExplain, s, found)
}

// policyExplain serves GET /v1/policy/explain?src=&dst=&proto=&port=.
func (p *Peer) policyExplain(r *http.Request) (any, error) {
	bad := func(err error) error {
		return newAPIError(http.StatusBadRequest, types.ErrInvalidNetworkConfig, "%v", err)
	}
	if p.policy == nil {
		return nil, newAPIError(http.StatusServiceUnavailable, types.ErrTryAgainLater, "policy explain: network policy is not running on peer %s", p.cfg.Name)
	}
	q := r.URL.Query()
	proto, port, err := parseExplainPort(q.Get("proto"), q.Get("port"))
	if err != nil {
		return nil, bad(err)
	}
	eps := append(p.endpoints(), p.remoteEndpoints()...)
	src, err := resolveEndpoint(q.Get("src"), eps)
	if err != nil {
		return nil, bad(fmt.Errorf("src: %w", err))
	}
	dst, err := resolveEndpoint(q.Get("dst"), eps)
	if err != nil {
		return nil, bad(fmt.Errorf("dst: %w", err))
	}
	rs, at := p.policy.ruleset()
	d := rs.Explain(src, dst, proto, port)
	return PolicyExplain{Src: src, Dst: dst, Proto: string(proto), Port: port, Allowed: d.Allowed, Reason: d.Reason,
		Egress: explainVerdict(d.Egress), Ingress: explainVerdict(d.Ingress), Applied: at}, nil
}
