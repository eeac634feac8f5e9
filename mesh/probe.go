package mesh

// Probing: each peer measures its links to the others with small UDP
// probes carrying four timestamps (as in NTP and TWAMP):
//
//	T1  the prober sends the request          (prober's clock)
//	T2  the responder receives it              (responder's clock)
//	T3  the responder sends the reply          (responder's clock)
//	T4  the prober receives the reply          (prober's clock)
//
//	RTT = (T4 − T1) − (T3 − T2)
//
// Only differences of one clock are used, so the peers' clocks need not
// agree, and the responder's processing time is taken out.
//
// Wire format (big endian), fixed header then two bounded names and an
// optional MAC:
//
//	offset size
//	0      2    magic "wP" (0x77 0x50)
//	2      1    version (1)
//	3      1    kind: 1 request, 2 reply
//	4      1    flags: bit 0 = authenticated (a 16-byte MAC trails the packet)
//	5      3    reserved, zero
//	8      8    seq
//	16     8    T1 (ns, prober's clock)
//	24     8    T2 (ns, responder's clock; 0 in a request)
//	32     8    T3 (ns, responder's clock; 0 in a request)
//	40     1+n  from: the sender's peer name (1..64 bytes, see validName)
//	       1+m  path: the prober's name for this target (1..64 bytes of
//	            [A-Za-z0-9._:/-]), echoed back unchanged in the reply
//	       16   MAC (only with the flag): HMAC-SHA256 truncated to 128 bits
//	            over every byte before it, keyed with ProberConfig.Key
//
// A packet is at most 40+65+65+16 = 186 bytes. When a key is set, packets
// without a valid MAC are dropped and counted; without a key, packets that
// carry a MAC are dropped too (the two sides disagree on authentication).

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ErrBadProbe: a probe packet could not be decoded (garbage, truncated,
// unknown version, bad names) or failed authentication.
var ErrBadProbe = errors.New("mesh: bad probe packet")

// Probe kinds.
const (
	ProbeRequest = 1
	ProbeReply   = 2
)

const (
	probeVersion    = 1
	probeHeaderLen  = 40
	probeMACLen     = 16
	probeFlagAuth   = 1
	maxProbePathLen = 64
	// MaxProbeSize bounds an encoded probe.
	MaxProbeSize = probeHeaderLen + 1 + maxNameLen + 1 + maxProbePathLen + probeMACLen
)

var probeMagic = [2]byte{'w', 'P'}

// Probe is one decoded probe packet.
type Probe struct {
	Kind       byte   // ProbeRequest or ProbeReply
	Seq        uint64 // chosen by the prober
	T1, T2, T3 int64  // ns; see the package comment of probe.go
	From       string // sender's peer name
	Path       string // prober's name for the target, echoed in the reply
}

// AppendProbe appends p's encoding to b, with a MAC when key is not empty.
func AppendProbe(b []byte, p Probe, key []byte) ([]byte, error) {
	return appendProbe(b, p, newProbeKey(key))
}

func appendProbe(b []byte, p Probe, key *probeKey) ([]byte, error) {
	if p.Kind != ProbeRequest && p.Kind != ProbeReply {
		return b, fmt.Errorf("%w: kind %d", ErrBadProbe, p.Kind)
	}
	if err := validName(p.From); err != nil {
		return b, fmt.Errorf("%w: from name %q: %v", ErrBadProbe, p.From, err)
	}
	if err := validProbePath(p.Path); err != nil {
		return b, fmt.Errorf("%w: path name %q: %v", ErrBadProbe, p.Path, err)
	}
	start := len(b)
	var flags byte
	if key != nil {
		flags |= probeFlagAuth
	}
	b = append(b, probeMagic[0], probeMagic[1], probeVersion, p.Kind, flags, 0, 0, 0)
	b = binary.BigEndian.AppendUint64(b, p.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(p.T1))
	b = binary.BigEndian.AppendUint64(b, uint64(p.T2))
	b = binary.BigEndian.AppendUint64(b, uint64(p.T3))
	b = append(b, byte(len(p.From)))
	b = append(b, p.From...)
	b = append(b, byte(len(p.Path)))
	b = append(b, p.Path...)
	if key != nil {
		b = key.appendMAC(b, start)
	}
	return b, nil
}

// DecodeProbe parses and, when key is not empty, authenticates one probe
// packet. Every error wraps ErrBadProbe. The result does not alias b.
func DecodeProbe(b, key []byte) (Probe, error) {
	v, err := decodeProbe(b, newProbeKey(key))
	if err != nil {
		return Probe{}, err
	}
	p := v.Probe
	p.From, p.Path = string(v.from), string(v.path)
	return p, nil
}

// probeView is a decoded probe whose names alias the packet, so that the receive path
// allocates nothing per packet; Probe.From and Probe.Path are empty.
type probeView struct {
	Probe
	from, path []byte
}

func decodeProbe(b []byte, key *probeKey) (probeView, error) {
	bad := func(format string, a ...any) (probeView, error) {
		return probeView{}, fmt.Errorf("%w: %s", ErrBadProbe, fmt.Sprintf(format, a...))
	}
	if len(b) < probeHeaderLen+2 {
		return bad("%d bytes, too short", len(b))
	}
	if b[0] != probeMagic[0] || b[1] != probeMagic[1] {
		return bad("wrong magic %#x%02x", b[0], b[1])
	}
	if b[2] != probeVersion {
		return bad("version %d, this peer understands %d", b[2], probeVersion)
	}
	kind, flags := b[3], b[4]
	if kind != ProbeRequest && kind != ProbeReply {
		return bad("kind %d", kind)
	}
	if flags&^probeFlagAuth != 0 || b[5]|b[6]|b[7] != 0 {
		return bad("unknown flags %#x", b[4:8])
	}
	authed := flags&probeFlagAuth != 0
	switch {
	case authed && key == nil:
		return bad("authenticated probe, but this peer has no probe key")
	case !authed && key != nil:
		return bad("unauthenticated probe, but this peer requires authentication")
	}
	body := b
	if authed {
		if len(b) < probeHeaderLen+2+probeMACLen {
			return bad("%d bytes, too short for a MAC", len(b))
		}
		body = b[:len(b)-probeMACLen]
		if !key.verify(body, b[len(body):]) {
			return bad("MAC mismatch (wrong key or forged packet)")
		}
	}
	v := probeView{Probe: Probe{
		Kind: kind,
		Seq:  binary.BigEndian.Uint64(b[8:]),
		T1:   int64(binary.BigEndian.Uint64(b[16:])),
		T2:   int64(binary.BigEndian.Uint64(b[24:])),
		T3:   int64(binary.BigEndian.Uint64(b[32:])),
	}}
	off := probeHeaderLen
	readName := func() ([]byte, bool) {
		if off >= len(body) {
			return nil, false
		}
		n := int(body[off])
		if len(body)-off-1 < n {
			return nil, false
		}
		s := body[off+1 : off+1+n]
		off += 1 + n
		return s, true
	}
	var ok bool
	if v.from, ok = readName(); !ok {
		return bad("from name overruns the packet")
	}
	if !nameBytesOK(v.from, maxNameLen, false) {
		return bad("from name %q: %v", v.from, validName(string(v.from)))
	}
	if v.path, ok = readName(); !ok {
		return bad("path name overruns the packet")
	}
	if !nameBytesOK(v.path, maxProbePathLen, true) {
		return bad("path name %q: %v", v.path, validProbePath(string(v.path)))
	}
	if off != len(body) {
		return bad("%d trailing bytes", len(body)-off)
	}
	if kind == ProbeReply && v.T3 < v.T2 {
		return bad("reply sent (T3) before the request was received (T2)")
	}
	return v, nil
}

// nameBytesOK is validName (slash false) or validProbePath (slash true) without the error,
// for the receive path: it allocates nothing.
func nameBytesOK(s []byte, maxLen int, slash bool) bool {
	if len(s) == 0 || len(s) > maxLen {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-' || slash && c == '/') {
			return false
		}
	}
	return true
}

// probeKey is a probe MAC key with its keyed HMAC, kept for reuse: hmac.New
// per packet hashed the key's pads again and allocated (6 % of an idle
// client peer's CPU at N=50); Reset restores the pads from a saved state.
// Safe for concurrent use (the send and read loops share one). nil: no key.
// O(1) per packet.
type probeKey struct {
	mu  sync.Mutex // guards h and sum
	h   hash.Hash
	sum []byte
}

// newProbeKey returns nil for an empty key (probes unauthenticated).
func newProbeKey(key []byte) *probeKey {
	if len(key) == 0 {
		return nil
	}
	return &probeKey{h: hmac.New(sha256.New, key), sum: make([]byte, 0, sha256.Size)}
}

// mac computes the MAC of msg into k.sum; the caller holds k.mu.
func (k *probeKey) mac(msg []byte) []byte {
	k.h.Reset()
	k.h.Write(msg)
	k.sum = k.h.Sum(k.sum[:0])
	return k.sum[:probeMACLen]
}

// appendMAC appends the MAC of b[start:] to b.
func (k *probeKey) appendMAC(b []byte, start int) []byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append(b, k.mac(b[start:])...)
}

// verify reports whether mac is msg's MAC, in constant time.
func (k *probeKey) verify(msg, mac []byte) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return hmac.Equal(mac, k.mac(msg))
}

// validProbePath checks a target name: 1–64 bytes of [A-Za-z0-9._:/-], so
// that a caller can name several paths to one peer ("b/underlay").
func validProbePath(s string) error {
	if s == "" {
		return errors.New("empty")
	}
	if len(s) > maxProbePathLen {
		return fmt.Errorf("%d bytes, at most %d", len(s), maxProbePathLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-' || c == '/') {
			return fmt.Errorf("byte %q not allowed", c)
		}
	}
	return nil
}

// ProberConfig configures a Prober. Self and Conn are required.
type ProberConfig struct {
	// Self is this peer's name, sent in every probe.
	Self string
	// Conn is the UDP socket probes are sent from and replies (to this
	// peer's probes and others') are read on. The caller binds it and
	// closes it after Run returns; Run sets its read deadline to stop.
	Conn net.PacketConn
	// Interval between two probes to one target; each wait is jittered by
	// ±20% so that peers do not synchronise. Default 1s.
	Interval time.Duration
	// IdleInterval, when longer than Interval, is the interval for an idle
	// target: one that is settled, up, answered its last probe and is not
	// marked active (SetActive). Probe packets are most of an idle peer's
	// CPU, so quiet links are probed slower; a single loss brings the
	// target back to Interval at once, so a broken link is confirmed down
	// within IdleInterval + Timeout + (DownAfter−1) × Interval. Default:
	// Interval (no idle slowdown).
	IdleInterval time.Duration
	// Timeout after which an unanswered probe counts as lost. Default 1s.
	Timeout time.Duration
	// Window is the number of recent probes that Loss and MinRTT are
	// computed over. Default 20.
	Window int
	// DownAfter consecutive lost probes mark a link down (LinkStats.Up).
	// Default 3.
	DownAfter int
	// Key, when set, authenticates probes with HMAC-SHA256: probes and
	// replies without a valid MAC are dropped (and counted). All peers must
	// use the same key (the daemon derives it from the gossip password).
	Key []byte
	// Now is the clock for the timestamps. Default time.Now. It must return
	// times with a monotonic reading for RTTs to be immune to clock steps.
	Now func() time.Time
	// Logger receives debug lines about dropped packets. Default: discard.
	Logger *slog.Logger
}

func (c *ProberConfig) validate() error {
	if err := validName(c.Self); err != nil {
		return fmt.Errorf("%w: prober self name %q: %v", ErrInvalidConfig, c.Self, err)
	}
	if c.Conn == nil {
		return fmt.Errorf("%w: prober needs a Conn", ErrInvalidConfig)
	}
	if c.Interval == 0 {
		c.Interval = time.Second
	}
	if c.Timeout == 0 {
		c.Timeout = time.Second
	}
	if c.Window == 0 {
		c.Window = 20
	}
	if c.IdleInterval < c.Interval {
		c.IdleInterval = c.Interval
	}
	if c.DownAfter == 0 {
		c.DownAfter = 3
	}
	switch {
	case c.Interval < time.Millisecond:
		return fmt.Errorf("%w: probe interval %v below 1ms", ErrInvalidConfig, c.Interval)
	case c.IdleInterval > time.Hour:
		return fmt.Errorf("%w: idle probe interval %v above 1h", ErrInvalidConfig, c.IdleInterval)
	case c.Timeout < time.Millisecond:
		return fmt.Errorf("%w: probe timeout %v below 1ms", ErrInvalidConfig, c.Timeout)
	case c.Window < 1 || c.Window > 1000:
		return fmt.Errorf("%w: probe window %d out of range 1..1000", ErrInvalidConfig, c.Window)
	case c.DownAfter < 1 || c.DownAfter > c.Window:
		return fmt.Errorf("%w: probe DownAfter %d out of range 1..Window(%d)", ErrInvalidConfig, c.DownAfter, c.Window)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// LinkStats are one target's measured figures.
type LinkStats struct {
	// RTT is an exponentially weighted moving average of the samples
	// (weight 1/8 for the new sample, as TCP's SRTT).
	RTT time.Duration
	// MinRTT is the smallest RTT among the last Window probes.
	MinRTT time.Duration
	// Jitter is a moving average of |RTT(i) − RTT(i−1)| (weight 1/16, as
	// RFC 3550's interarrival jitter), the plain mean over the first 16
	// differences: from zero at weight 1/16 it would take dozens of samples
	// to show the noise a fresh link has, and path choice, whose switch
	// margin scales with jitter, moved traffic to relays on the noise of a
	// busy start (N=50: over 100 switches in the first 20 s, all undone).
	Jitter time.Duration
	// Loss is the fraction of the last Window probes (answered or timed
	// out; probes still in flight are not counted) that got no reply.
	Loss float64
	// Up is false before the first reply and after DownAfter consecutive
	// probes were lost.
	Up bool
	// LastHeard is when the last valid reply arrived (zero: never).
	LastHeard time.Time
	// Samples counts the replies received since the target was added.
	Samples int
	// Settled: the target has answered settleAnswers probes in a row since it was added,
	// so its path is built; losses before that were cleared from Loss.
	Settled bool
}

// SettledMinRTT is the smallest RTT of the window once the target is settled and up, false
// otherwise. It is what ranks a current probe target (ProbeTargetInput.Measured): the
// smallest, not the average, because on a loaded host the average carries the scheduling
// delay of the start, and ranked by it the current targets looked far and were swapped out
// (N=100: all see all in 14.6 and 15.6 s instead of 2–5 s).
func (s LinkStats) SettledMinRTT() (time.Duration, bool) {
	if !s.Settled || !s.Up || s.MinRTT <= 0 {
		return 0, false
	}
	return s.MinRTT, true
}

// ProberCounters count a Prober's packets since it was created.
type ProberCounters struct {
	Sent       uint64 // requests sent
	Replies    uint64 // valid replies to our requests
	Answered   uint64 // requests of others answered
	Timeouts   uint64 // our requests that got no reply in time
	Bad        uint64 // packets dropped: garbage or failed authentication
	Late       uint64 // replies after their timeout, within lateFor: the loss taken back unless the target went down
	Unexpected uint64 // valid replies matching no outstanding request (too late, duplicate, spoofed)
	SendErrors uint64 // failed writes
}

// Prober measures RTT, jitter and loss to a set of targets, and answers
// other peers' probes on the same socket.
//
// Concurrency: all methods are safe for concurrent use. Run owns the
// socket's reads; mu guards the target table.
type Prober struct {
	cfg ProberConfig
	key *probeKey // cfg.Key with its HMAC state; nil: no authentication

	mu      sync.Mutex // guards following
	targets map[string]*probeTarget
	pending map[uint64]pendingProbe
	late    map[uint64]lateProbe // timed-out requests whose reply may still come (lateFor)
	active  map[string]struct{}  // targets probed at Interval even when idle (SetActive)
	seq     uint64
	kick    chan struct{} // SetTargets wakes the send loop
	changed chan struct{} // a target went up or down, or settled (Changed)

	sent, replies, answered, timeouts, lateReplies, bad, unexpected, sendErrors atomic.Uint64
}

type probeTarget struct {
	addr netip.AddrPort
	// primed: a reply has come since the target was added or last went down. The first
	// reply only primes the path — it often waited for ARP, a WireGuard handshake or a
	// cold cache — so it counts as answered but is no RTT sample.
	primed bool
	// settled: the target has answered settleAnswers probes in a row since it was added.
	// Probes lost before that are not loss of a working link — the path is still being
	// built (a VXLAN FDB entry, a probe route or a WireGuard peer not installed yet at one
	// end) — so settling clears them from the loss window; until then a silent or flaky
	// target shows the loss it has. okRun counts the answers in a row.
	settled  bool
	okRun    int
	recent   [3]time.Duration // last RTT samples, for the despiking median
	next     time.Time        // when the next probe is due
	sent     time.Time        // when the last probe was sent
	outcomes []bool           // ring of the last Window outcomes (true: answered)
	rtts     []time.Duration
	pos, n   int    // ring write position, filled entries
	gen      uint32 // bumped when the window is cleared, so a late reply finds its slot gone
	total    uint64 // outcomes recorded since the target was added
	lostRun  int    // consecutive losses
	srtt     time.Duration
	jitter   time.Duration
	last     time.Duration // previous sample, for jitter
	heard    time.Time
	samples  int
}

// settleAnswers answers in a row end a new target's set-up phase (see probeTarget.settled).
const settleAnswers = 3

type pendingProbe struct {
	target string
	t1     time.Time
}

// lateFor: a request that timed out stays answerable this many Timeouts longer. On a loaded
// host (scheduling delays of seconds, measured at N=100 on 2 cores) replies come late, not
// never; counting them as loss put every link on the full probe rate and republished its
// loss figure, which loaded the host further. A broken link sends no late reply, so down is
// noticed as fast as before.
const lateFor = 2

// lateProbe is a timed-out request whose loss is taken back if its reply still comes.
type lateProbe struct {
	target string
	tg     *probeTarget // the target as it was: one re-added under the same name starts over
	t1     time.Time
	gen    uint32 // the target's window generation when the loss was recorded
	pos    int    // the loss's slot in the window
	at     uint64 // the loss's index among the target's outcomes (probeTarget.total)
}

// NewProber validates cfg; it does no I/O until Run.
func NewProber(cfg ProberConfig) (*Prober, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Prober{
		cfg:     cfg,
		key:     newProbeKey(cfg.Key),
		targets: map[string]*probeTarget{},
		pending: map[uint64]pendingProbe{},
		late:    map[uint64]lateProbe{},
		active:  map[string]struct{}{},
		seq:     rand.Uint64(),
		kick:    make(chan struct{}, 1),
		changed: make(chan struct{}, 1),
	}, nil
}

// SetTargets replaces the set of targets (name → address). Targets that
// stay keep their statistics; a target whose address changed starts over.
// Names are 1–64 bytes of [A-Za-z0-9._:/-]; several names may point at one
// peer to measure several paths to it ("b/underlay", "b/overlay").
func (p *Prober) SetTargets(targets map[string]netip.AddrPort) error {
	for name, a := range targets {
		if err := validProbePath(name); err != nil {
			return fmt.Errorf("%w: probe target name %q: %v", ErrInvalidConfig, name, err)
		}
		if !a.IsValid() || a.Port() == 0 {
			return fmt.Errorf("%w: probe target %q: invalid address %v", ErrInvalidConfig, name, a)
		}
	}
	now := p.cfg.Now()
	p.mu.Lock()
	for name, t := range p.targets {
		if a, ok := targets[name]; !ok || a != t.addr {
			delete(p.targets, name)
		}
	}
	for name, a := range targets {
		if _, ok := p.targets[name]; ok {
			continue
		}
		p.targets[name] = &probeTarget{
			addr:     a,
			next:     now.Add(time.Duration(rand.Int64N(int64(p.cfg.Interval/10) + 1))), // spread the first probes
			outcomes: make([]bool, p.cfg.Window),
			rtts:     make([]time.Duration, p.cfg.Window),
		}
	}
	for seq, pp := range p.pending {
		if _, ok := p.targets[pp.target]; !ok {
			delete(p.pending, seq)
		}
	}
	for seq, lp := range p.late {
		if p.targets[lp.target] != lp.tg {
			delete(p.late, seq)
		}
	}
	p.mu.Unlock()
	p.wake()
	return nil
}

// Changed is signalled (without blocking; several changes may come as one signal) when a
// target goes up or down or settles, so that a caller polling All or Stats on a slow timer
// reacts to a broken link at once.
func (p *Prober) Changed() <-chan struct{} { return p.changed }

// SetActive replaces the set of targets that are probed at Interval even when idle: the
// links that carry traffic or relays, whose failure must be seen fastest. Names that are not
// targets are kept, and apply once they become targets. O(len(names)).
func (p *Prober) SetActive(names []string) {
	p.mu.Lock()
	if p.sameActiveLocked(names) {
		// Callers set it every round; an unchanged set must not wake the send loop.
		p.mu.Unlock()
		return
	}
	clear(p.active)
	for _, n := range names {
		p.active[n] = struct{}{}
	}
	for name, t := range p.targets {
		// A target that turned active is probed at the full rate from now on, not after
		// the idle wait it was scheduled with.
		if _, ok := p.active[name]; ok {
			t.next = minTime(t.next, t.sent.Add(jittered(p.cfg.Interval)))
		}
	}
	p.mu.Unlock()
	p.wake()
}

// sameActiveLocked says whether names (duplicates allowed) is the active set already.
func (p *Prober) sameActiveLocked(names []string) bool {
	if len(names) == 0 {
		return len(p.active) == 0
	}
	for _, n := range names {
		if _, ok := p.active[n]; !ok {
			return false
		}
	}
	// Every name is in the set; it is the same set if the set holds no other.
	distinct := 0
	seen := make(map[string]struct{}, len(names))
	for _, n := range names {
		if _, ok := seen[n]; !ok {
			seen[n] = struct{}{}
			distinct++
		}
	}
	return distinct == len(p.active)
}

func (p *Prober) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// intervalLocked is the wait before t's next probe: Interval while the target is active,
// being set up, down or just lost a probe; IdleInterval once it is quiet and healthy.
func (p *Prober) intervalLocked(name string, t *probeTarget) time.Duration {
	if _, ok := p.active[name]; ok || !t.settled || t.lostRun > 0 || t.samples == 0 {
		return p.cfg.Interval
	}
	return p.cfg.IdleInterval
}

// Stats returns one target's figures.
func (p *Prober) Stats(name string) (LinkStats, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.targets[name]
	if !ok {
		return LinkStats{}, false
	}
	return p.statsLocked(t), true
}

// All returns every target's figures.
func (p *Prober) All() map[string]LinkStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]LinkStats, len(p.targets))
	for name, t := range p.targets {
		out[name] = p.statsLocked(t)
	}
	return out
}

func (p *Prober) statsLocked(t *probeTarget) LinkStats {
	s := LinkStats{RTT: t.srtt, Jitter: t.jitter, LastHeard: t.heard, Samples: t.samples, Settled: t.settled}
	lost := 0
	for i := 0; i < t.n; i++ {
		if !t.outcomes[i] {
			lost++
			continue
		}
		if r := t.rtts[i]; r >= 0 && (s.MinRTT == 0 || r < s.MinRTT) {
			s.MinRTT = r
		}
	}
	if t.n > 0 {
		s.Loss = float64(lost) / float64(t.n)
	}
	s.Up = p.upLocked(t)
	return s
}

func (p *Prober) upLocked(t *probeTarget) bool { return t.samples > 0 && t.lostRun < p.cfg.DownAfter }

// Counters returns the packet counters.
func (p *Prober) Counters() ProberCounters {
	return ProberCounters{
		Sent: p.sent.Load(), Replies: p.replies.Load(), Answered: p.answered.Load(),
		Timeouts: p.timeouts.Load(), Late: p.lateReplies.Load(), Bad: p.bad.Load(), Unexpected: p.unexpected.Load(),
		SendErrors: p.sendErrors.Load(),
	}
}

// record adds one outcome to a target's window. The moving average is fed the median of
// the last three samples, so that one late reply (a pause, a burst) does not inflate the
// RTT for the dozens of samples an EWMA takes to forget it, while a lasting change passes
// after two samples. Jitter is computed on the raw samples.
func (p *Prober) recordLocked(t *probeTarget, ok bool, rtt time.Duration) {
	up, settled := p.upLocked(t), t.settled
	defer func() {
		if p.upLocked(t) != up || t.settled != settled {
			select {
			case p.changed <- struct{}{}:
			default:
			}
		}
	}()
	if !t.settled {
		if !ok {
			t.okRun = 0
		} else if t.okRun++; t.okRun >= settleAnswers {
			t.settled, t.pos, t.n = true, 0, 0
			t.gen++
		}
	}
	if ok && !t.primed {
		if t.settled && t.lostRun >= p.cfg.DownAfter {
			// Back after being down (a target still being set up keeps its losses until it
			// settles): the outage was reported as down, not as loss, and
			// the link is judged afresh, as a settled one would be. Otherwise the old
			// losses would hold the link at tens of percent for a whole window after it
			// healed, and the published figure (rate-limited) would keep others relaying.
			t.pos, t.n = 0, 0
			t.gen++
		}
		t.primed, t.lostRun = true, 0
		p.recordOutcomeLocked(t, true, -1) // answered, no sample
		return
	}
	p.recordOutcomeLocked(t, ok, rtt)
	if !ok {
		t.lostRun++
		if t.lostRun >= p.cfg.DownAfter {
			t.primed = false
		}
		// An idle target that lost a probe is probed again at the full rate, so a broken
		// link is confirmed as fast as an active one.
		t.next = minTime(t.next, t.sent.Add(jittered(p.cfg.Interval)))
		return
	}
	t.lostRun = 0
	t.recent[t.samples%len(t.recent)] = rtt
	filtered := median(t.recent[:min(t.samples+1, len(t.recent))])
	if t.samples == 0 {
		t.srtt, t.jitter = rtt, 0
	} else {
		t.srtt += (filtered - t.srtt) / 8
		d := rtt - t.last
		if d < 0 {
			d = -d
		}
		t.jitter += (d - t.jitter) / time.Duration(min(t.samples, 16))
	}
	t.last = rtt
	t.samples++
}

// recordOutcomeLocked adds one outcome to the loss and MinRTT window.
func (p *Prober) recordOutcomeLocked(t *probeTarget, ok bool, rtt time.Duration) {
	t.outcomes[t.pos], t.rtts[t.pos] = ok, rtt
	t.pos = (t.pos + 1) % len(t.outcomes)
	t.total++
	if t.n < len(t.outcomes) {
		t.n++
	}
}

// median of up to three samples; of two, the smaller (a spike is the larger one).
func median(d []time.Duration) time.Duration {
	switch len(d) {
	case 1:
		return d[0]
	case 2:
		return min(d[0], d[1])
	}
	return max(min(d[0], d[1]), min(max(d[0], d[1]), d[2]))
}

// Run sends probes and answers others' until ctx is cancelled (then it
// returns nil) or the socket fails (then it returns the error). Run must
// be called once.
func (p *Prober) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	readErr := make(chan error, 1)
	go func() { readErr <- p.readLoop() }()
	stop := func() {
		// Unblock ReadFrom; the caller owns (and closes) the socket.
		p.cfg.Conn.SetReadDeadline(time.Unix(1, 0))
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	var sc tickScratch
	for {
		select {
		case <-ctx.Done():
			stop()
			<-readErr
			return nil
		case err := <-readErr:
			return err
		case <-p.kick:
		case <-timer.C:
		}
		wait := p.tick(&sc)
		timer.Reset(wait)
	}
}

// tick sends the probes that are due, expires lost ones, and returns how
// long to wait until the next thing is due. The encoded requests go into
// one reused buffer: no allocation per probe beyond the pending entry.
// O(targets + pending + late) per call.
func (p *Prober) tick(sc *tickScratch) time.Duration {
	now := p.cfg.Now()
	sc.buf, sc.sends = sc.buf[:0], sc.sends[:0]
	p.mu.Lock()
	next := now.Add(p.cfg.IdleInterval)
	for seq, pp := range p.pending {
		deadline := pp.t1.Add(p.cfg.Timeout)
		if !now.Before(deadline) {
			delete(p.pending, seq)
			if t := p.targets[pp.target]; t != nil {
				p.recordLocked(t, false, 0)
				p.late[seq] = lateProbe{target: pp.target, tg: t, t1: pp.t1, gen: t.gen,
					pos: (t.pos + len(t.outcomes) - 1) % len(t.outcomes), at: t.total - 1}
			}
			p.timeouts.Add(1)
		} else if deadline.Before(next) {
			next = deadline
		}
	}
	// Late entries need no wake-up of their own: they only end.
	for seq, lp := range p.late {
		if !now.Before(lp.t1.Add((1 + lateFor) * p.cfg.Timeout)) {
			delete(p.late, seq)
		}
	}
	// Probes due within sendAhead go now with the one that woke the loop: each wake-up of an
	// idle process costs about as much as the packet it sends, and 16 targets with their own
	// jittered times woke it once per probe.
	ahead := now.Add(p.cfg.Interval / sendAheadDiv)
	for name, t := range p.targets {
		if t.next.Before(ahead) {
			p.seq++
			start := len(sc.buf)
			var err error
			sc.buf, err = appendProbe(sc.buf, Probe{Kind: ProbeRequest, Seq: p.seq, T1: now.UnixNano(), From: p.cfg.Self, Path: name}, p.key)
			if err == nil {
				p.pending[p.seq] = pendingProbe{target: name, t1: now}
				sc.sends = append(sc.sends, probeSend{dest: t.addr, from: start, to: len(sc.buf)})
			} else {
				sc.buf = sc.buf[:start]
			}
			// A probe sent early is scheduled from when it was due, so the rate is unchanged.
			t.sent = now
			t.next = maxTime(t.next, now).Add(jittered(p.intervalLocked(name, t)))
		}
		if t.next.Before(next) {
			next = t.next
		}
	}
	p.mu.Unlock()
	for _, s := range sc.sends {
		if err := p.writeTo(sc.buf[s.from:s.to], s.dest); err != nil {
			p.sendErrors.Add(1)
			p.cfg.Logger.Debug("probe: send failed", "to", s.dest, "err", err)
			continue
		}
		p.sent.Add(1)
	}
	return max(next.Sub(now), time.Millisecond)
}

// sendAheadDiv: a tick also sends the probes due within Interval/sendAheadDiv (see tick).
const sendAheadDiv = 4

// tickScratch is the send loop's reused memory.
type tickScratch struct {
	buf   []byte
	sends []probeSend
}

type probeSend struct {
	dest     netip.AddrPort
	from, to int // the request's bytes in tickScratch.buf
}

// udpAddrPortConn is what *net.UDPConn offers to send and receive without allocating an
// address per packet.
type udpAddrPortConn interface {
	WriteToUDPAddrPort(b []byte, addr netip.AddrPort) (int, error)
	ReadFromUDPAddrPort(b []byte) (int, netip.AddrPort, error)
}

func (p *Prober) writeTo(b []byte, to netip.AddrPort) error {
	var err error
	if c, ok := p.cfg.Conn.(udpAddrPortConn); ok {
		_, err = c.WriteToUDPAddrPort(b, to)
	} else {
		_, err = p.cfg.Conn.WriteTo(b, net.UDPAddrFromAddrPort(to))
	}
	return err
}

// jittered returns d ± 20%.
func jittered(d time.Duration) time.Duration {
	return d*4/5 + time.Duration(rand.Int64N(int64(d)*2/5+1))
}

// readLoop reads the socket until it fails; a deadline error after Run
// stopped is the normal end.
func (p *Prober) readLoop() error {
	buf := make([]byte, 2048)
	out := make([]byte, 0, MaxProbeSize)
	ap, fast := p.cfg.Conn.(udpAddrPortConn)
	for {
		var (
			n    int
			from netip.AddrPort
			err  error
		)
		if fast {
			n, from, err = ap.ReadFromUDPAddrPort(buf)
		} else {
			var a net.Addr
			n, a, err = p.cfg.Conn.ReadFrom(buf)
			if ua, ok := a.(*net.UDPAddr); ok {
				from = ua.AddrPort()
			}
		}
		now := p.cfg.Now()
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			return fmt.Errorf("mesh: probe socket: %w", err)
		}
		out = p.handle(buf[:n], from, now, out)
	}
}

// handle processes one received packet: answers a request, or accounts a
// reply. It returns the scratch buffer for reuse. Nothing is allocated per
// valid packet.
func (p *Prober) handle(pkt []byte, from netip.AddrPort, now time.Time, out []byte) []byte {
	m, err := decodeProbe(pkt, p.key)
	if err != nil {
		p.bad.Add(1)
		p.cfg.Logger.Debug("probe: dropped packet", "from", from, "err", err)
		return out
	}
	switch m.Kind {
	case ProbeRequest:
		t2 := now.UnixNano()
		t3 := max(p.cfg.Now().UnixNano(), t2)
		out = appendReply(out[:0], m, t2, t3, p.cfg.Self, p.key)
		if err := p.writeTo(out, from); err != nil {
			p.sendErrors.Add(1)
			return out
		}
		p.answered.Add(1)
	case ProbeReply:
		p.mu.Lock()
		defer p.mu.Unlock()
		pp, ok := p.pending[m.Seq]
		if !ok {
			if lp, ok := p.late[m.Seq]; ok && lp.target == string(m.path) && lp.t1.UnixNano() == m.T1 {
				delete(p.late, m.Seq)
				p.lateReplyLocked(lp, now)
				p.lateReplies.Add(1)
				return out
			}
		}
		if !ok || pp.target != string(m.path) || pp.t1.UnixNano() != m.T1 {
			p.unexpected.Add(1)
			return out
		}
		delete(p.pending, m.Seq)
		t := p.targets[pp.target]
		if t == nil {
			p.unexpected.Add(1)
			return out
		}
		rtt := now.Sub(pp.t1) - time.Duration(m.T3-m.T2)
		if rtt < 0 {
			rtt = 0 // the responder claims more processing time than elapsed
		}
		p.recordLocked(t, true, rtt)
		t.heard = now
		p.replies.Add(1)
	}
	return out
}

// lateReplyLocked takes back the loss a late reply's request was counted as: its slot in the
// window is answered (no RTT sample: its delay is the host's, not the link's), the run of
// losses ends at it, and a quiet link returns to the idle rate. A target that went down
// since is left to the normal recovery (its next reply primes it), so up and down are
// decided exactly as without late replies. O(1).
func (p *Prober) lateReplyLocked(lp lateProbe, now time.Time) {
	t := p.targets[lp.target]
	if t == nil || t != lp.tg || !p.upLocked(t) || !t.primed {
		return
	}
	t.heard = now
	// The slot is still this probe's unless the window was cleared or wrapped since.
	if t.gen == lp.gen && t.total-lp.at <= uint64(len(t.outcomes)) && !t.outcomes[lp.pos] {
		t.outcomes[lp.pos], t.rtts[lp.pos] = true, -1
	}
	// Losses after this one still count; a run that started before it ends here.
	if after := int(t.total - 1 - lp.at); t.lostRun > after {
		t.lostRun = after
	}
	if t.lostRun == 0 {
		t.next = maxTime(t.next, t.sent.Add(jittered(p.intervalLocked(lp.target, t))))
	}
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// appendReply appends the reply to request m (validated by decodeProbe, so its path needs
// no check; self was validated by NewProber), as AppendProbe would encode it.
func appendReply(b []byte, m probeView, t2, t3 int64, self string, key *probeKey) []byte {
	start := len(b)
	var flags byte
	if key != nil {
		flags |= probeFlagAuth
	}
	b = append(b, probeMagic[0], probeMagic[1], probeVersion, ProbeReply, flags, 0, 0, 0)
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(m.T1))
	b = binary.BigEndian.AppendUint64(b, uint64(t2))
	b = binary.BigEndian.AppendUint64(b, uint64(t3))
	b = append(b, byte(len(self)))
	b = append(b, self...)
	b = append(b, byte(len(m.path)))
	b = append(b, m.path...)
	if key != nil {
		b = key.appendMAC(b, start)
	}
	return b
}
