package shape

import (
	"errors"
	"testing"
	"time"
)

func TestPlanForSizesQueueAndBurst(t *testing.T) {
	const mtu = 1500
	frame := uint32(mtu + frameOverhead)
	for _, tc := range []struct {
		name              string
		r                 Rates
		wantIn, wantOut   bool
		maxLatency        time.Duration
		inBurst, outBurst uint32 // 0: not checked
	}{
		{name: "unlimited", r: Rates{}},
		{name: "20/10 mbit, default burst", r: Rates{IngressRate: 10e6, EgressRate: 20e6}, wantIn: true, wantOut: true,
			maxLatency: 10 * time.Millisecond, inBurst: 2500, outBurst: 5000},
		// Kubernetes sends 2^31 bits when no burst is set (plugins #609): clamped to 2 ms.
		{name: "huge burst clamped", r: Rates{EgressRate: 20e6, EgressBurst: 1 << 31}, wantOut: true,
			maxLatency: 5 * time.Millisecond, outBurst: 5000},
		// A smaller burst than the default is kept.
		{name: "small burst kept", r: Rates{EgressRate: 100e6, EgressBurst: 8 * 4000}, wantOut: true,
			maxLatency: 5 * time.Millisecond, outBurst: 4000},
		// A burst below one frame would drop every full-size packet.
		{name: "tiny burst raised to a frame", r: Rates{IngressRate: 100e6, IngressBurst: 8}, wantIn: true,
			maxLatency: 5 * time.Millisecond, inBurst: frame},
		// 64 kbit/s: a frame takes 190 ms; the queue is still seven frames, not 4 ms.
		{name: "slow rate queues seven frames", r: Rates{IngressRate: 64000}, wantIn: true, maxLatency: 1400 * time.Millisecond, inBurst: frame},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := PlanFor(tc.r, mtu)
			if err != nil {
				t.Fatal(err)
			}
			if (p.Ingress != nil) != tc.wantIn || (p.Egress != nil) != tc.wantOut {
				t.Fatalf("plan %+v: ingress %v egress %v, want %v %v", p, p.Ingress != nil, p.Egress != nil, tc.wantIn, tc.wantOut)
			}
			for _, d := range []struct {
				d     *Direction
				rate  uint64
				burst uint32
			}{{p.Ingress, tc.r.IngressRate, tc.inBurst}, {p.Egress, tc.r.EgressRate, tc.outBurst}} {
				if d.d == nil {
					continue
				}
				if d.d.RateBytes != d.rate/8 {
					t.Errorf("rate %d bytes/s, want %d", d.d.RateBytes, d.rate/8)
				}
				if d.d.Latency() > tc.maxLatency {
					t.Errorf("queue %d bytes holds %v, want at most %v", d.d.LimitBytes, d.d.Latency(), tc.maxLatency)
				}
				if d.d.BurstBytes < frame || d.d.BurstBytes > d.d.LimitBytes {
					t.Errorf("burst %d bytes outside [one frame %d, queue %d]", d.d.BurstBytes, frame, d.d.LimitBytes)
				}
				if d.d.LimitBytes < 7*frame {
					t.Errorf("queue %d bytes holds fewer than 7 frames", d.d.LimitBytes)
				}
				if d.burst != 0 && d.d.BurstBytes != d.burst {
					t.Errorf("burst %d bytes, want %d", d.d.BurstBytes, d.burst)
				}
			}
		})
	}
}

func TestPlanForRefusesBadRates(t *testing.T) {
	for name, r := range map[string]Rates{
		"burst without rate": {EgressBurst: 80000},
		"rate below minimum": {IngressRate: 100},
		"rate above maximum": {EgressRate: MaxRate + 1},
	} {
		if _, err := PlanFor(r, 1500); !errors.Is(err, ErrBadRates) {
			t.Errorf("%s: err %v, want ErrBadRates", name, err)
		}
	}
	if _, err := PlanFor(Rates{IngressRate: 1e6}, 0); !errors.Is(err, ErrBadRates) {
		t.Errorf("mtu 0: err %v, want ErrBadRates", err)
	}
}

func TestIfbNameFitsAndIsStable(t *testing.T) {
	a, b := IfbName("weft0123456789a"), IfbName("weft0123456789b")
	if len(a) > 15 || a != IfbName("weft0123456789a") || a == b || a[:len(IfbPrefix)] != IfbPrefix {
		t.Fatalf("IfbName: %q %q", a, b)
	}
}
