package mesh

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
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
//   - in a mesh: every RejoinInterval, try the targets that are not alive
//     members, which heals a partition between seeds;
//   - Connect wakes it to try a new target at once;
//   - after Leave it tries nothing.
func (m *Mesh) joinLoop(ctx context.Context) {
	b := backoff{min: m.cfg.JoinBackoffMin, max: m.cfg.JoinBackoffMax, cur: m.cfg.JoinBackoffMin}
	var lastFull time.Time
	for {
		wait := m.cfg.RejoinInterval
		if due, full := m.dueTargets(lastFull); len(due) > 0 || full {
			if full {
				lastFull = time.Now()
			}
			for _, t := range due {
				if ctx.Err() != nil {
					return
				}
				m.tryJoin(t)
			}
			// While any target is not a member, retry with backoff, whether or not this
			// peer already belongs to some mesh: two groups that formed while their
			// seeds were still starting must merge in seconds, not at the rejoin interval.
			if m.missingTargets() {
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
		if p.State == StateAlive || p.State == StateSuspect {
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
		} else if p.State == StateAlive || p.State == StateSuspect {
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
		if !p.Self && (p.State == StateAlive || p.State == StateSuspect) {
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
