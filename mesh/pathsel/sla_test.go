package pathsel

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func ms(f float64) time.Duration { return time.Duration(f * float64(time.Millisecond)) }

func TestParseSLA(t *testing.T) {
	good := []struct {
		in   string
		want SLA
	}{
		{"gold: rtt<=5ms,jitter<=2ms,loss<=0.1%", SLA{"gold", ms(5), ms(2), 0.001}},
		{" silver :rtt <= 20ms , loss<=0.02", SLA{Name: "silver", MaxRTT: ms(20), MaxLoss: 0.02}},
		{"bulk: loss<=5%", SLA{Name: "bulk", MaxLoss: 0.05}},
	}
	for _, c := range good {
		got, err := ParseSLA(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseSLA(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
			continue
		}
		if again, err := ParseSLA(got.String()); err != nil || again != got {
			t.Errorf("String() %q does not parse back: %+v %v", got.String(), again, err)
		}
	}
	bad := []struct{ in, want string }{
		{"rtt<=5ms", "want \"name:"},
		{"Gold: rtt<=5ms", "class name \"Gold\""},
		{"gold:", "no bounds"},
		{"gold: rtt<5ms", "term \"rtt<5ms\""},
		{"gold: rtt<=5", "not a duration"},
		{"gold: rtt<=0ms", "positive"},
		{"gold: latency<=5ms", "unknown bound \"latency\""},
		{"gold: rtt<=5ms,rtt<=6ms", "rtt given twice"},
		{"gold: loss<=abc%", "not a number"},
		{"gold: loss<=150%", "at most 100%"},
		{"gold: loss<=0%", "above 0"},
		{"gold: rtt<=5ms,,loss<=1%", "empty term"},
		{"gold: jitter<=-1ms", "positive"},
	}
	for _, c := range bad {
		_, err := ParseSLA(c.in)
		if !errors.Is(err, ErrBadSLA) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseSLA(%q) error %v, want ErrBadSLA mentioning %q", c.in, err, c.want)
		}
	}
	if d := DefaultSLA(); d.Check(time.Hour, time.Hour, 1) != "" {
		t.Error("the default class rejects a working link")
	}
}

func TestSLAMeetsAgreesWithCheck(t *testing.T) {
	sla, _ := ParseSLA("gold: rtt<=5ms,jitter<=1ms,loss<=1%")
	for _, c := range []struct {
		rtt, jitter time.Duration
		loss        float64
	}{{ms(5), ms(1), 0.01}, {ms(5.1), 0, 0}, {0, ms(1.1), 0}, {0, 0, 0.011}, {0, 0, 0}} {
		if got, want := sla.Meets(c.rtt, c.jitter, c.loss), sla.Check(c.rtt, c.jitter, c.loss) == ""; got != want {
			t.Errorf("%+v: Meets %v, Check says %v", c, got, want)
		}
	}
}
