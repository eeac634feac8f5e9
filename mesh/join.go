package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// target is a seed or Connect address the join loop keeps trying.
type target struct {
	addr        string // normalized host:port
	fresh       bool   // added or re-added by Connect, not tried since
	lastAttempt time.Time
	lastErr     error
}

// TargetStatus is the join loop's view of one seed or Connect target.
type TargetStatus struct {
	Addr        string
	LastAttempt time.Time // zero: not tried yet
	// LastError is the last attempt's error, nil if it succeeded. It
	// wraps ErrPasswordMismatch when the passwords differ.
	LastError error
}

// Connect adds addr ("host[:port]") to the targets the join loop keeps
// trying, and has it tried at once in the background: the outcome shows in
// Targets, Peers, the log and the metrics. Connecting to a known target
// retries it now. Only a malformed address is an error.
func (m *Mesh) Connect(addr string) error {
	t, err := normalizeTarget(addr)
	if err != nil {
		return fmt.Errorf("mesh: connect: %w", err)
	}
	m.mu.Lock()
	m.addTargetLocked(t)
	m.mu.Unlock()
	m.poke()
	return nil
}

// Forget removes addr from the targets (seeds included). Peers already in
// the mesh stay; forgetting an unknown address is not an error.
func (m *Mesh) Forget(addr string) error {
	t, err := normalizeTarget(addr)
	if err != nil {
		return fmt.Errorf("mesh: forget: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, x := range m.targets {
		if x.addr == t {
			m.targets = append(m.targets[:i], m.targets[i+1:]...)
			break
		}
	}
	return nil
}

// Targets returns the seeds and Connect targets with their last attempt.
func (m *Mesh) Targets() []TargetStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]TargetStatus, len(m.targets))
	for i, t := range m.targets {
		out[i] = TargetStatus{Addr: t.addr, LastAttempt: t.lastAttempt, LastError: t.lastErr}
	}
	return out
}

func (m *Mesh) addTarget(t string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.addTargetLocked(t)
}

func (m *Mesh) addTargetLocked(addr string) {
	for _, x := range m.targets {
		if x.addr == addr {
			x.fresh = true
			return
		}
	}
	m.targets = append(m.targets, &target{addr: addr, fresh: true})
}

// joinLoop keeps this peer in a mesh:
//
//   - alone (no other alive or suspect peer) with targets: try them all,
//     then wait an exponentially growing, jittered backoff
//     (JoinBackoffMin..JoinBackoffMax) and try again — at start, after a
//     restart, and whenever every other peer died;
//   - at start, alone, also the members of the snapshot (Config.SnapshotPath),
//     snapshotJoinBatch per round, most recently seen first, until one join
//     succeeds: a restarted peer without seeds finds its mesh again;
//   - in a mesh: every RejoinInterval, try the targets that are not alive
//     members, which heals a partition between seeds;
//   - Connect wakes it to try a new target at once;
//   - after Leave it tries nothing.
//
// It also runs, until ctx ends, the loop that retries dead members
// (deadRetryLoop) and the one that keeps the snapshot (snapshotLoop).
func (m *Mesh) joinLoop(ctx context.Context) {
	rm := newRejoinMetrics(m.cfg.Registerer, m.log)
	defer rm.unregister()
	snap := m.loadSnapshot(rm)
	var bg sync.WaitGroup
	defer bg.Wait()
	bg.Add(1)
	go func() {
		defer bg.Done()
		m.deadRetryLoop(ctx, rm)
	}()
	if m.cfg.SnapshotPath != "" {
		bg.Add(1)
		go func() {
			defer bg.Done()
			m.snapshotLoop(ctx, rm, snap)
		}()
	}
	rejoin := make([]string, 0, len(snap)) // snapshot members still to try, most recent first
	for _, s := range snap {
		rejoin = append(rejoin, s.Addr.String())
	}

	b := backoff{min: m.cfg.JoinBackoffMin, max: m.cfg.JoinBackoffMax, cur: m.cfg.JoinBackoffMin}
	var lastFull time.Time
	for {
		wait := m.cfg.RejoinInterval
		if len(rejoin) > 0 && !m.alone() {
			// In a mesh (joined, or found by a member that retried us): the snapshot served.
			rejoin = nil
		}
		due, full := m.dueTargets(lastFull)
		if len(due) > 0 || full {
			if full {
				lastFull = time.Now()
			}
			var batch []string
			if full && len(rejoin) > 0 {
				batch, rejoin = nextSnapshotBatch(rejoin)
			}
			for _, t := range due {
				if ctx.Err() != nil {
					return
				}
				m.tryJoin(t)
			}
			if len(batch) > 0 && m.alone() && m.joinSnapshotMembers(ctx, batch) {
				rejoin = nil
			}
			// While any target is not a member, retry with backoff, whether or not this
			// peer already belongs to some mesh: two groups that formed while their
			// seeds were still starting must merge in seconds, not at the rejoin interval.
			if m.missingTargets() || len(rejoin) > 0 {
				wait = b.next()
			} else {
				b.reset()
			}
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-m.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// snapshotJoinBatch is how many snapshot members one round tries, at once: enough that a
// few dead ones do not delay the rejoin, few enough that a restart is not a join storm.
const snapshotJoinBatch = 4

// nextSnapshotBatch takes the first snapshotJoinBatch addresses and moves them to the end of
// the rotation, so every member is tried in turn while none answers.
func nextSnapshotBatch(rejoin []string) (batch, rest []string) {
	n := min(snapshotJoinBatch, len(rejoin))
	batch = slices.Clone(rejoin[:n])
	rest = append(rejoin[n:], batch...)
	return batch, rest
}

// joinSnapshotMembers tries each address in parallel (each attempt is bounded by
// memberlist's TCP timeout) and reports whether one join succeeded. Failures are expected —
// members come and go — so they are logged at debug level only; they are counted like
// every join attempt.
func (m *Mesh) joinSnapshotMembers(ctx context.Context, addrs []string) bool {
	ml := m.ml.Load()
	var (
		wg sync.WaitGroup
		ok atomic.Bool
	)
	for _, a := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if ctx.Err() != nil {
				return
			}
			m.metrics.joinAttempts.Inc()
			n, err := ml.Join([]string{a})
			if err == nil && n == 0 {
				err = errors.New("no node answered")
			}
			if err != nil {
				reason, err := classifyJoinError(a, err)
				m.metrics.joinFailures.WithLabelValues(reason).Inc()
				m.log.Debug("mesh: snapshot member did not answer", "addr", a, "err", err)
				return
			}
			ok.Store(true)
			m.log.Info("mesh: rejoined through a member of the snapshot", "addr", a)
		}()
	}
	wg.Wait()
	return ok.Load()
}

// Retrying dead members. memberlist never contacts a node it declared dead again, and a
// restarted peer without seeds knows nobody (before its snapshot, or without one), so
// without this a peer that comes back alone stays alone until someone's seeds or
// RejoinInterval reach it (a seed's own retries back off to JoinBackoffMax meanwhile,
// which is how a first peer down for 10 s took 28–49 s to be seen again). Serf's reconnect
// does the same, for failed members only; weft retries members that left too, because
// `weft peer` leaves on SIGTERM, which is also how a peer is restarted.
//
// Cost: each peer makes at most deadRetryMax attempts per round, about
// deadRetryFanout·dead/alive of them on average, so the mesh as a whole tries each dead
// member about deadRetryFanout times per round whatever N is (O(1) join attempts per peer
// and round, O(1) per dead member and round for the mesh), instead of N peers hammering a
// peer the moment it is back. Picking them scans the peer table in memory: O(N) per round.
const (
	deadRetryFanout = 2
	deadRetryMax    = 3
)

// deadRetryCount is how many dead members to try this round: deadRetryFanout·dead/alive,
// its fraction rounded up with probability equal to it (u uniform in [0,1)), at most
// deadRetryMax and dead. alive counts this peer.
func deadRetryCount(dead, alive int, u float64) int {
	if dead <= 0 {
		return 0
	}
	expected := float64(deadRetryFanout*dead) / float64(max(alive, 1))
	n := int(expected)
	if u < expected-float64(n) {
		n++
	}
	return min(n, deadRetryMax, dead)
}

// deadRetryLoop tries, every DeadRetryInterval (jittered ±50%), a few members that died or
// left less than DeadRetryFor ago. Attempts run in the background, at most deadRetryMax at
// a time: an address that swallows packets holds a slot for memberlist's TCP timeout but
// does not delay the rounds. While no member is a candidate (the usual idle mesh) it sleeps
// until one dies or leaves (Mesh.downed), not waking every second to find nobody.
func (m *Mesh) deadRetryLoop(ctx context.Context, rm *rejoinMetrics) {
	if m.cfg.DeadRetryFor <= 0 {
		return
	}
	slots := make(chan struct{}, deadRetryMax)
	var wg sync.WaitGroup
	defer wg.Wait()
	idle := false // the last round found no candidate
	for {
		if idle {
			select {
			case <-ctx.Done():
				return
			case <-m.downed:
			}
		}
		d := m.cfg.DeadRetryInterval
		timer := time.NewTimer(d/2 + rand.N(d+1))
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
		picks, pending := m.deadRetryPicks(time.Now())
		idle = !pending
		for _, p := range picks {
			select {
			case slots <- struct{}{}:
			default:
				continue // every slot busy: this one waits for a later round
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-slots }()
				m.retryDead(ctx, p, rm)
			}()
		}
	}
}

// deadRetryPicks chooses this round's dead members at random among those dead or left for
// less than DeadRetryFor, and reports whether there is any such candidate (picked or not).
// O(N) scan of the peer table, O(1) picks.
func (m *Mesh) deadRetryPicks(now time.Time) (picks []Peer, pending bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.left || m.shut {
		return nil, false
	}
	var dead []*Peer
	alive := 1 // this peer
	for _, p := range m.peers {
		switch {
		case p.Self:
		case p.Up():
			alive++
		case p.Addr.IsValid() && now.Sub(p.Since) < m.cfg.DeadRetryFor:
			dead = append(dead, p)
		}
	}
	n := deadRetryCount(len(dead), alive, rand.Float64())
	out := make([]Peer, 0, n)
	for i := range n {
		j := i + rand.N(len(dead)-i)
		dead[i], dead[j] = dead[j], dead[i]
		out = append(out, dead[i].clone())
	}
	return out, len(dead) > 0
}

// retryDead makes one join attempt to a dead member's last address.
func (m *Mesh) retryDead(ctx context.Context, p Peer, rm *rejoinMetrics) {
	if ctx.Err() != nil {
		return
	}
	ml := m.ml.Load()
	n, err := ml.Join([]string{p.Addr.String()})
	if err == nil && n == 0 {
		err = errors.New("no node answered")
	}
	if err != nil {
		rm.deadRetries.WithLabelValues("failed").Inc()
		_, err = classifyJoinError(p.Addr.String(), err)
		m.log.Debug("mesh: dead member still unreachable", "peer", p.Name, "state", p.State, "err", err)
		return
	}
	rm.deadRetries.WithLabelValues("reached").Inc()
	m.log.Info("mesh: reached a dead member again", "peer", p.Name, "addr", p.Addr, "was", p.State, "since", p.Since)
}

// rejoinMetrics count the snapshot and the retries of dead members. They live with the
// join loop (registered when it starts, unregistered when it ends) so that a Mesh can be
// recreated on the same registry.
type rejoinMetrics struct {
	reg            prometheus.Registerer
	registered     []prometheus.Collector
	snapshotWrites prometheus.Counter
	snapshotErrors *prometheus.CounterVec // reason: read, entry, write
	deadRetries    *prometheus.CounterVec // result: reached, failed
}

// Snapshot error reasons (label values of weft_mesh_snapshot_errors_total).
const (
	snapErrRead  = "read"  // the whole file was ignored
	snapErrEntry = "entry" // one entry was skipped
	snapErrWrite = "write"
)

func newRejoinMetrics(reg prometheus.Registerer, log *slog.Logger) *rejoinMetrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	rm := &rejoinMetrics{
		reg: reg,
		snapshotWrites: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "weft_mesh_snapshot_writes_total",
			Help: "Times the member snapshot file was rewritten.",
		}),
		snapshotErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_snapshot_errors_total",
			Help: "Member snapshot problems: read (file ignored), entry (entry skipped), write.",
		}, []string{"reason"}),
		deadRetries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weft_mesh_dead_retries_total",
			Help: "Join attempts to members that died or left, by result (reached, failed).",
		}, []string{"result"}),
	}
	for _, c := range []prometheus.Collector{rm.snapshotWrites, rm.snapshotErrors, rm.deadRetries} {
		if err := reg.Register(c); err != nil {
			// Counting still works; only the export is lost.
			log.Warn("mesh: rejoin metrics not registered", "err", err)
			continue
		}
		rm.registered = append(rm.registered, c)
	}
	return rm
}

func (rm *rejoinMetrics) unregister() {
	for _, c := range rm.registered {
		rm.reg.Unregister(c)
	}
}

// dueTargets picks the targets to try now and whether this is a full round
// (all targets that are not members) rather than just the fresh ones.
func (m *Mesh) dueTargets(lastFull time.Time) (due []string, full bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.left {
		return nil, false
	}
	members := make(map[string]bool)
	alone := true
	self := ""
	for _, p := range m.peers {
		if p.Self {
			self = p.Addr.String()
			continue
		}
		if p.Up() {
			members[p.Addr.String()] = true
			alone = false
		}
	}
	missing := false
	for _, t := range m.targets {
		if t.addr != self && !members[t.addr] {
			missing = true
		}
	}
	full = alone || missing || time.Since(lastFull) >= m.cfg.RejoinInterval
	for _, t := range m.targets {
		// A seed list shared by every host names this one too.
		if t.addr == self {
			t.fresh = false
			continue
		}
		if t.fresh || (full && !members[t.addr]) {
			due = append(due, t.addr)
		}
		t.fresh = false
	}
	return due, full
}

// alone reports whether no other peer is alive or suspect.
// Sync exchanges full state (push/pull) with the named peer now. A subsystem that has just
// marked a peer as back calls it, so that state the peer sent while it was still considered
// gone (and so was refused) arrives again instead of at the next periodic push/pull. It
// blocks for one TCP exchange; call it off the event loop.
func (m *Mesh) Sync(name string) error {
	p, ok := m.Peer(name)
	if !ok {
		return fmt.Errorf("mesh: sync: unknown peer %q", name)
	}
	ml := m.ml.Load()
	if ml == nil {
		return errors.New("mesh: sync: not started")
	}
	if _, err := ml.Join([]string{p.Addr.String()}); err != nil {
		return fmt.Errorf("mesh: sync with %s: %w", name, err)
	}
	return nil
}

// missingTargets says whether some target (other than this peer) is not an alive member.
func (m *Mesh) missingTargets() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	members := make(map[string]bool)
	self := ""
	for _, p := range m.peers {
		if p.Self {
			self = p.Addr.String()
		} else if p.Up() {
			members[p.Addr.String()] = true
		}
	}
	for _, t := range m.targets {
		if t.addr != self && !members[t.addr] {
			return true
		}
	}
	return false
}

func (m *Mesh) alone() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.peers {
		if !p.Self && p.Up() {
			return false
		}
	}
	return true
}

// tryJoin makes one join attempt (a TCP push/pull with the target) and
// records, counts and logs its outcome. A failure is logged at warning
// level when it differs from the target's previous outcome, else at debug,
// so that a dead seed does not flood the log; a password mismatch is
// always an error.
func (m *Mesh) tryJoin(addr string) bool {
	ml := m.ml.Load()
	m.metrics.joinAttempts.Inc()
	n, err := ml.Join([]string{addr})
	if err == nil && n == 0 {
		err = errors.New("no node answered")
	}
	var reason string
	if err != nil {
		reason, err = classifyJoinError(addr, err)
	}

	m.mu.Lock()
	var prevErr error
	for _, t := range m.targets {
		if t.addr == addr {
			prevErr = t.lastErr
			t.lastAttempt, t.lastErr = time.Now(), err
		}
	}
	m.mu.Unlock()

	if err == nil {
		if prevErr != nil {
			m.log.Info("mesh: joined", "target", addr, "after", prevErr)
		} else {
			m.log.Debug("mesh: joined", "target", addr)
		}
		return true
	}
	m.metrics.joinFailures.WithLabelValues(reason).Inc()
	switch {
	case reason == joinFailPassword:
		m.log.Error("mesh: join refused: gossip password mismatch", "target", addr, "err", err, "hint", passwordHint)
	case prevErr == nil || prevErr.Error() != err.Error():
		m.log.Warn("mesh: join failed", "target", addr, "err", err)
	default:
		m.log.Debug("mesh: join failed", "target", addr, "err", err)
	}
	return false
}

// classifyJoinError names the reason of a failed join and returns a
// one-line error, wrapping ErrPasswordMismatch when keys differ. memberlist
// reports a key mismatch on the joining side as "no installed keys could
// decrypt the message" (both encrypt, keys differ), "remote state is
// encrypted and encryption is not configured" (only the seed encrypts) or
// "encryption is configured but remote state is not encrypted" (only this
// peer encrypts).
func classifyJoinError(addr string, err error) (string, error) {
	msg := strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "1 error occurred:", "")), " ")
	msg = strings.TrimPrefix(msg, "* ")
	if i := strings.Index(msg, ": "); strings.HasPrefix(msg, "failed to join ") && i > 0 {
		msg = msg[i+2:]
	}
	lower := strings.ToLower(msg)
	switch {
	case isPasswordError(lower):
		return joinFailPassword, fmt.Errorf("%w: join %s: %s", ErrPasswordMismatch, addr, msg)
	case strings.Contains(lower, "connection refused"), strings.Contains(lower, "i/o timeout"),
		strings.Contains(lower, "no route to host"), strings.Contains(lower, "network is unreachable"),
		strings.Contains(lower, "failed to resolve"), strings.Contains(lower, "no such host"):
		return joinFailUnreachable, fmt.Errorf("mesh: join %s: %s", addr, msg)
	default:
		return joinFailOther, fmt.Errorf("mesh: join %s: %s", addr, msg)
	}
}

// backoff is exponential backoff with "equal jitter": each wait is uniform
// in [d/2, d] where d doubles from min to max, so peers restarted together
// do not retry in lockstep.
type backoff struct {
	min, max, cur time.Duration
}

func (b *backoff) next() time.Duration {
	d := b.cur
	b.cur = min(b.cur*2, b.max)
	half := d / 2
	return half + rand.N(d-half+1)
}

func (b *backoff) reset() { b.cur = b.min }
