// Package shape limits a container's bandwidth on the host side of its attachment, with tc:
// the container's ingress is the host veth's egress (a tbf root qdisc there), the
// container's egress is the host veth's ingress, redirected (ingress qdisc, u32 match-all,
// mirred) to an ifb device named after the veth and shaped by a tbf on the ifb's egress.
// Nothing is ever put inside the container's netns: rules there are visible to the
// application and it could change them.
//
// The decisions (queue length, burst) are the pure function PlanFor; Shaper is the thin
// netlink code around them.
package shape

import (
	"errors"
	"fmt"
	"time"
)

// Errors.
var (
	// ErrBadRates: rates that cannot be shaped (too low, a burst without its rate, too high).
	ErrBadRates = errors.New("bad bandwidth rates")
	// ErrNoInterface: the host interface to shape does not exist.
	ErrNoInterface = errors.New("host interface not found")
	// ErrMismatch: the kernel's shaping is not what the plan says (CHECK).
	ErrMismatch = errors.New("shaping differs from the configured rates")
)

// Rates are one attachment's limits as the CNI bandwidth capability counts them: bits per
// second and bits of burst; a rate of 0 is unlimited, a burst of 0 is the default burst.
type Rates struct {
	IngressRate  uint64 `json:"ingress_rate,omitempty"`
	IngressBurst uint64 `json:"ingress_burst,omitempty"`
	EgressRate   uint64 `json:"egress_rate,omitempty"`
	EgressBurst  uint64 `json:"egress_burst,omitempty"`
}

// Limited says whether any direction is limited.
func (r Rates) Limited() bool { return r.IngressRate != 0 || r.EgressRate != 0 }

// Bounds of what PlanFor accepts.
const (
	// MinRate: below 8 kbit/s one full frame takes more than a second to drain.
	MinRate = 8_000
	// MaxRate: 1 Tbit/s, as ipam.MaxRate; keeps byte arithmetic far from overflow.
	MaxRate = 1_000_000_000_000
)

// Queue and burst sizing. The reference bandwidth plugin queues a fixed 25 ms (plugins
// #1025: every shaped flow adds that much latency under load) and takes the runtime's burst
// as it comes (Kubernetes sends 2^31 bits when none is set, so the first second runs at
// line rate, plugins #609). Here the queue holds minQueue of traffic or queueFrames full
// frames, whichever is longer, and the bucket holds at most maxBurst of the rate (never
// more than the queue, never less than one frame, which would drop every full-size packet).
//
// Measured in the chaos lab (TestBandwidthHoldsItsRate, 10 and 20 Mbit/s, MTU 1420, TCP
// over 10 s; goodput can reach 0.95× of the rate, the rest is headers):
//   - Frames: between containers the round trip is far below a millisecond, so a TCP
//     sender's window is about the queue. Three frames (4 ms at 10 Mbit/s) is too small a
//     window for three duplicate ACKs after a loss, so losses wait for a 200 ms
//     retransmit timeout: 0.7×. Six frames: 0.94×, once 0.82×; eight: 0.95× with ping
//     under load up to 8 ms; seven (10 kB: 8 ms at 10 Mbit/s, 4 ms at 20): 0.93–0.95× in
//     every run, also on a host at load 30, ping under load 1.4–3.6 ms on average, 7 ms
//     at worst.
//   - Burst: the bucket lets TCP see line rate, so its window grows past what the queue
//     holds and losses come in runs that end in timeouts. A bucket as big as the queue
//     measured 0.8×, 20 ms of the rate 0.6×, 2 ms 0.95×. So a larger burst from the
//     runtime is clamped to maxBurst.
const (
	minQueue      = 4 * time.Millisecond
	queueFrames   = 7
	maxBurst      = 2 * time.Millisecond // also the burst when none is given
	frameOverhead = 18                   // Ethernet header and a VLAN tag on top of the MTU, what tc counts
)

// Direction is the tbf of one direction.
type Direction struct {
	// RateBytes is the rate in bytes per second.
	RateBytes uint64
	// BurstBytes is the token bucket: bytes that may pass at line rate after idle.
	BurstBytes uint32
	// LimitBytes is the queue: bytes that may wait for tokens; LimitBytes/RateBytes is the
	// longest a packet waits.
	LimitBytes uint32
}

// Latency is the longest a packet waits in the queue.
func (d Direction) Latency() time.Duration {
	return time.Duration(float64(d.LimitBytes) / float64(d.RateBytes) * float64(time.Second))
}

// Plan is what Shaper.Apply converges an attachment to; a nil direction is unlimited.
type Plan struct {
	// Ingress is the container's ingress, shaped on the host veth's egress.
	Ingress *Direction
	// Egress is the container's egress, shaped on the ifb the host veth's ingress goes to.
	Egress *Direction
}

// PlanFor sizes the queues and bursts of rates on an interface of MTU mtu. Pure.
func PlanFor(r Rates, mtu int) (Plan, error) {
	if mtu < 68 || mtu > 65535 {
		return Plan{}, fmt.Errorf("%w: mtu %d out of range", ErrBadRates, mtu)
	}
	in, err := direction("ingress", r.IngressRate, r.IngressBurst, mtu)
	if err != nil {
		return Plan{}, err
	}
	out, err := direction("egress", r.EgressRate, r.EgressBurst, mtu)
	if err != nil {
		return Plan{}, err
	}
	return Plan{Ingress: in, Egress: out}, nil
}

func direction(dir string, rate, burst uint64, mtu int) (*Direction, error) {
	switch {
	case rate == 0 && burst != 0:
		return nil, fmt.Errorf("%w: %s burst %d bits without an %s rate", ErrBadRates, dir, burst, dir)
	case rate == 0:
		return nil, nil
	case rate < MinRate:
		return nil, fmt.Errorf("%w: %s rate %d bit/s is below the minimum %d bit/s", ErrBadRates, dir, rate, MinRate)
	case rate > MaxRate:
		return nil, fmt.Errorf("%w: %s rate %d bit/s is above the maximum %d bit/s", ErrBadRates, dir, rate, uint64(MaxRate))
	}
	rateBytes := rate / 8
	frame := uint64(mtu + frameOverhead)
	limit := max(bytesIn(rateBytes, minQueue), queueFrames*frame)
	b := bytesIn(rateBytes, maxBurst)
	if burst != 0 {
		b = min(b, burst/8)
	}
	b = max(min(b, limit), frame)
	// tbf's limit and buffer are 32-bit; at MaxRate 4 ms is 500 MB, so clamp.
	const max32 = 1<<32 - 1
	return &Direction{RateBytes: rateBytes, BurstBytes: uint32(min(b, max32)), LimitBytes: uint32(min(limit, max32))}, nil
}

// bytesIn is how many bytes rateBytes per second carries in d.
func bytesIn(rateBytes uint64, d time.Duration) uint64 {
	return uint64(float64(rateBytes) * d.Seconds())
}
