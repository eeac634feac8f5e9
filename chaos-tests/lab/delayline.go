package lab

// A delay line: latency, jitter and loss for routed traffic without netem
// (this kernel has none). A TUN device is created in a router namespace R;
// policy routing sends the chosen destinations into it; a goroutine reads
// each packet, holds it for Delay ± Jitter (or drops it with probability
// Loss) and writes it back into the TUN, and R's kernel forwards it on.
//
// Routing, inside R:
//
//	ip rule add not iif <tun> lookup <table> priority <prio>
//	ip route add <prefix> dev <tun> table <table>       (for each Route)
//
// A packet arriving on any interface but the TUN (or sent by R itself)
// looks up <table> first: if its destination is a delayed prefix it goes
// into the TUN, otherwise the lookup falls through to the main table as
// usual. A packet written back by the delay line arrives with iif=<tun>,
// skips the rule and is routed by the main table out of the real interface:
// no loop, no marks. (Two delay lines in one namespace must have disjoint
// Routes, or a packet would bounce between them.)
//
// Which direction is delayed is up to the caller's Routes: to delay both
// directions between A and B, route both A's and B's prefixes into the
// line; a round trip then takes base + 2 × Delay. Loss applies to each
// packet on each pass, so with both directions routed a ping and its reply
// each risk it: a round trip survives with probability (1 − Loss)².
//
// Reverse-path filtering: packets come out of the TUN with foreign source
// addresses, so the TUN gets rp_filter=2 (loose). With both directions
// delayed, R's ingress interfaces must not use strict rp_filter (=1),
// because the reverse route of their sources then points into the TUN.
// Fresh namespaces default to 0.

import (
	"container/heap"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/nslab"
)

// DelayConfig describes a delay line. NSPath, Name and Routes are required.
type DelayConfig struct {
	// NSPath is the router namespace (created by the caller) whose
	// forwarded traffic passes the delay line.
	NSPath string
	// Name is the TUN device's name (1–15 bytes), created in NSPath.
	Name string
	// Routes are the destinations routed into the delay line.
	Routes []netip.Prefix
	// Delay and Jitter: each packet is held Delay plus a uniform random
	// amount in [−Jitter, +Jitter] (at least 0). With Jitter 0 packets keep
	// their order; with jitter they may be reordered, like netem.
	Delay, Jitter time.Duration
	// Loss is the probability, 0..1, that a packet is dropped.
	Loss float64
	// Seed seeds the loss and jitter random source.
	Seed int64
	// Table is the routing table of the delayed routes; default 10000 +
	// the TUN's interface index.
	Table int
	// Priority is the policy rule's priority; default 100.
	Priority int
	// QueueLimit bounds the packets held at once; more are dropped and
	// counted as overflow. Default 10000.
	QueueLimit int
}

// DelayStats counts a delay line's packets.
type DelayStats struct {
	Received    uint64 // packets read from the TUN
	Forwarded   uint64 // packets written back
	Lost        uint64 // dropped by the Loss probability
	Overflow    uint64 // dropped because QueueLimit packets were held
	WriteErrors uint64 // packets the TUN refused
	Queued      int    // packets held now
}

// DelayLine is a running delay line. Its methods are safe for concurrent
// use.
type DelayLine struct {
	cfg    DelayConfig
	tun    *os.File
	link   netlink.Link
	rules  []*netlink.Rule
	wake   chan struct{} // reader → writer: a packet was queued
	done   chan struct{} // closed by Close
	wg     sync.WaitGroup
	closed sync.Once
	errc   error // Close's result

	mu     sync.Mutex // guards following
	delay  time.Duration
	jitter time.Duration
	loss   float64
	rng    *rand.Rand
	queue  delayQueue
	seq    uint64

	received, forwarded, lost, overflow, writeErrors atomic.Uint64
}

func validDelayParams(delay, jitter time.Duration, loss float64) error {
	switch {
	case delay < 0 || delay > time.Minute:
		return fmt.Errorf("lab: delay %v out of range 0..1m", delay)
	case jitter < 0 || jitter > time.Minute:
		return fmt.Errorf("lab: jitter %v out of range 0..1m", jitter)
	case !(loss >= 0 && loss <= 1):
		return fmt.Errorf("lab: loss %v out of range 0..1", loss)
	}
	return nil
}

// NewDelayLine creates the TUN device in cfg.NSPath, routes cfg.Routes into
// it and starts forwarding. On error nothing is left behind.
func NewDelayLine(cfg DelayConfig) (_ *DelayLine, err error) {
	if cfg.Name == "" || len(cfg.Name) > unix.IFNAMSIZ-1 {
		return nil, fmt.Errorf("lab: delay line name %q must be 1-15 bytes", cfg.Name)
	}
	if len(cfg.Routes) == 0 {
		return nil, fmt.Errorf("lab: delay line %s: no routes", cfg.Name)
	}
	for _, r := range cfg.Routes {
		if !r.IsValid() {
			return nil, fmt.Errorf("lab: delay line %s: invalid route %v", cfg.Name, r)
		}
	}
	if err := validDelayParams(cfg.Delay, cfg.Jitter, cfg.Loss); err != nil {
		return nil, err
	}
	if cfg.Priority == 0 {
		cfg.Priority = 100
	}
	if cfg.QueueLimit == 0 {
		cfg.QueueLimit = 10000
	}
	target, err := ns.GetNS(cfg.NSPath)
	if err != nil {
		return nil, fmt.Errorf("lab: delay line %s: %w", cfg.Name, err)
	}
	defer target.Close()

	d := &DelayLine{
		cfg: cfg, wake: make(chan struct{}, 1), done: make(chan struct{}),
		delay: cfg.Delay, jitter: cfg.Jitter, loss: cfg.Loss,
		rng: rand.New(rand.NewPCG(uint64(cfg.Seed), uint64(cfg.Seed)^0x9e3779b97f4a7c15)),
	}
	// The TUN belongs to the namespace of the thread that opens
	// /dev/net/tun, so open it (and write the sysctl, also resolved per
	// thread) on a locked thread inside R.
	var fd int
	err = target.Do(func(ns.NetNS) error {
		var err error
		fd, err = openTUN(cfg.Name)
		if err != nil {
			return err
		}
		if err := os.WriteFile(fmt.Sprintf("/proc/sys/net/ipv4/conf/%s/rp_filter", cfg.Name), []byte("2"), 0o644); err != nil {
			unix.Close(fd)
			return fmt.Errorf("loose rp_filter on %s: %w", cfg.Name, err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lab: delay line %s: %w", cfg.Name, err)
	}
	// Non-blocking, so that os.File uses the poller and Close interrupts
	// a pending Read.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("lab: delay line %s: %w", cfg.Name, err)
	}
	d.tun = os.NewFile(uintptr(fd), "/dev/net/tun:"+cfg.Name)
	defer func() {
		if err != nil {
			d.teardown()
		}
	}()

	h, err := nslab.HandleAt(cfg.NSPath)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	if d.link, err = h.LinkByName(cfg.Name); err != nil {
		return nil, fmt.Errorf("lab: delay line %s: find tun: %w", cfg.Name, err)
	}
	if err := h.LinkSetUp(d.link); err != nil {
		return nil, fmt.Errorf("lab: delay line %s: set up: %w", cfg.Name, err)
	}
	if d.cfg.Table == 0 {
		d.cfg.Table = 10000 + d.link.Attrs().Index
	}
	families := map[int]bool{}
	for _, p := range cfg.Routes {
		p = p.Masked()
		r := &netlink.Route{
			LinkIndex: d.link.Attrs().Index,
			Dst:       datapath.PrefixToIPNet(p),
			Table:     d.cfg.Table,
			Scope:     netlink.SCOPE_LINK,
		}
		if err := h.RouteReplace(r); err != nil {
			return nil, fmt.Errorf("lab: delay line %s: route %s: %w", cfg.Name, p, err)
		}
		if p.Addr().Is4() {
			families[netlink.FAMILY_V4] = true
		} else {
			families[netlink.FAMILY_V6] = true
		}
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !families[fam] {
			continue
		}
		rule := netlink.NewRule()
		rule.Family = fam
		rule.IifName = cfg.Name
		rule.Invert = true
		rule.Table = d.cfg.Table
		rule.Priority = cfg.Priority
		if err := h.RuleAdd(rule); err != nil {
			return nil, fmt.Errorf("lab: delay line %s: rule: %w", cfg.Name, err)
		}
		d.rules = append(d.rules, rule)
	}

	d.wg.Add(2)
	go d.readLoop()
	go d.writeLoop()
	return d, nil
}

// openTUN creates a TUN device (no packet information header) on the
// calling thread's namespace and returns its descriptor.
func openTUN(name string) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("create tun %s: %w", name, err)
	}
	return fd, nil
}

// SetParams changes delay, jitter and loss for packets that arrive from now
// on; packets already held keep their release time.
func (d *DelayLine) SetParams(delay, jitter time.Duration, loss float64) error {
	if err := validDelayParams(delay, jitter, loss); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.delay, d.jitter, d.loss = delay, jitter, loss
	return nil
}

// Stats returns the packet counters.
func (d *DelayLine) Stats() DelayStats {
	d.mu.Lock()
	q := d.queue.Len()
	d.mu.Unlock()
	return DelayStats{Received: d.received.Load(), Forwarded: d.forwarded.Load(), Lost: d.lost.Load(),
		Overflow: d.overflow.Load(), WriteErrors: d.writeErrors.Load(), Queued: q}
}

// Close stops forwarding, waits for the goroutines and removes the rules,
// routes and TUN device. Held packets are dropped. Safe to call twice.
func (d *DelayLine) Close() error {
	d.closed.Do(func() { d.errc = d.teardown() })
	return d.errc
}

func (d *DelayLine) teardown() error {
	close(d.done)
	var errs []error
	if d.tun != nil {
		// Closing the last descriptor of a non-persistent TUN deletes the
		// device, and the routes through it with it.
		errs = append(errs, d.tun.Close())
	}
	d.wg.Wait()
	h, err := nslab.HandleAt(d.cfg.NSPath)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer h.Close()
	for _, r := range d.rules {
		if err := h.RuleDel(r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("lab: delay line %s: delete rule: %w", d.cfg.Name, err))
		}
	}
	if l, err := h.LinkByName(d.cfg.Name); err == nil {
		if err := h.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("lab: delay line %s: delete tun: %w", d.cfg.Name, err))
		}
	}
	return errors.Join(errs...)
}

// readLoop reads packets and queues or drops them.
func (d *DelayLine) readLoop() {
	defer d.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, err := d.tun.Read(buf)
		if err != nil {
			select {
			case <-d.done:
				return
			default:
			}
			if errors.Is(err, os.ErrClosed) {
				return
			}
			continue // e.g. EINVAL for a runt packet; keep going
		}
		now := time.Now()
		d.received.Add(1)
		d.mu.Lock()
		if d.loss > 0 && d.rng.Float64() < d.loss {
			d.mu.Unlock()
			d.lost.Add(1)
			continue
		}
		if d.queue.Len() >= d.cfg.QueueLimit {
			d.mu.Unlock()
			d.overflow.Add(1)
			continue
		}
		hold := d.delay
		if d.jitter > 0 {
			hold += time.Duration(d.rng.Int64N(2*int64(d.jitter)+1)) - d.jitter
		}
		d.seq++
		heap.Push(&d.queue, &heldPacket{due: now.Add(max(hold, 0)), seq: d.seq, data: append([]byte(nil), buf[:n]...)})
		d.mu.Unlock()
		select {
		case d.wake <- struct{}{}:
		default:
		}
	}
}

// writeLoop writes each held packet back when it is due.
func (d *DelayLine) writeLoop() {
	defer d.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		d.mu.Lock()
		var due []*heldPacket
		now := time.Now()
		for d.queue.Len() > 0 && !d.queue[0].due.After(now) {
			due = append(due, heap.Pop(&d.queue).(*heldPacket))
		}
		wait := time.Hour
		if d.queue.Len() > 0 {
			wait = d.queue[0].due.Sub(now)
		}
		d.mu.Unlock()
		for _, p := range due {
			if _, err := d.tun.Write(p.data); err != nil {
				d.writeErrors.Add(1)
				continue
			}
			d.forwarded.Add(1)
		}
		if len(due) > 0 {
			continue // time passed while writing; look again
		}
		timer.Reset(wait)
		select {
		case <-d.done:
			return
		case <-d.wake: // Reset above discards a pending expiry (Go ≥ 1.23 timers)
		case <-timer.C:
		}
	}
}

// heldPacket is a packet waiting for its release time.
type heldPacket struct {
	due  time.Time
	seq  uint64 // arrival order, to keep it among equal release times
	data []byte
}

// delayQueue is a min-heap of held packets by (due, seq).
type delayQueue []*heldPacket

func (q delayQueue) Len() int { return len(q) }
func (q delayQueue) Less(i, j int) bool {
	if q[i].due.Equal(q[j].due) {
		return q[i].seq < q[j].seq
	}
	return q[i].due.Before(q[j].due)
}
func (q delayQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *delayQueue) Push(x any)   { *q = append(*q, x.(*heldPacket)) }
func (q *delayQueue) Pop() any {
	old := *q
	p := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	return p
}
