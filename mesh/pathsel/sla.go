package pathsel

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// ErrBadSLA: an SLA class could not be parsed.
var ErrBadSLA = errors.New("pathsel: bad SLA")

// SLA is a service class: bounds on a path's end-to-end figures. A zero
// bound means "no bound", so the zero SLA (and DefaultSLA) is met by any
// working path.
type SLA struct {
	Name      string
	MaxRTT    time.Duration
	MaxJitter time.Duration
	MaxLoss   float64 // fraction, 0..1
}

// DefaultSLA is the class without bounds.
func DefaultSLA() SLA { return SLA{Name: "default"} }

// ParseSLA parses "name: rtt<=5ms,jitter<=2ms,loss<=0.1%". The name is 1–32
// bytes of [a-z0-9_-]; each term is rtt, jitter (Go durations) or loss (a
// percentage with "%", or a fraction), bounded with "<="; each at most once,
// at least one. Bounds must be positive: leave a term out for no bound
// (loss<=0.01% asks for practically none, but note that with the default
// window of 20 probes measured loss moves in steps of 5%).
func ParseSLA(s string) (SLA, error) {
	name, rest, ok := strings.Cut(s, ":")
	name = strings.TrimSpace(name)
	if !ok {
		return SLA{}, fmt.Errorf(`%w: %q: want "name: rtt<=5ms,jitter<=2ms,loss<=0.1%%"`, ErrBadSLA, s)
	}
	if err := validSLAName(name); err != nil {
		return SLA{}, fmt.Errorf("%w: class name %q: %v", ErrBadSLA, name, err)
	}
	sla := SLA{Name: name}
	seen := map[string]bool{}
	for _, term := range strings.Split(rest, ",") {
		term = strings.TrimSpace(term)
		bad := func(format string, a ...any) (SLA, error) {
			return SLA{}, fmt.Errorf("%w: class %q: term %q: %s", ErrBadSLA, name, term, fmt.Sprintf(format, a...))
		}
		if term == "" {
			if strings.TrimSpace(rest) == "" {
				return SLA{}, fmt.Errorf("%w: class %q: no bounds (write at least one of rtt<=, jitter<=, loss<=)", ErrBadSLA, name)
			}
			return bad("empty term")
		}
		key, val, ok := strings.Cut(term, "<=")
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		if !ok {
			return bad("want rtt<=D, jitter<=D or loss<=P%%")
		}
		if seen[key] {
			return bad("%s given twice", key)
		}
		seen[key] = true
		switch key {
		case "rtt", "jitter":
			d, err := time.ParseDuration(val)
			if err != nil {
				return bad("%s bound %q is not a duration like 5ms", key, val)
			}
			if d <= 0 {
				return bad("%s bound must be positive (leave the term out for no bound)", key)
			}
			if key == "rtt" {
				sla.MaxRTT = d
			} else {
				sla.MaxJitter = d
			}
		case "loss":
			num, pct := strings.CutSuffix(val, "%")
			f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
			if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
				return bad("loss bound %q is not a number like 0.1%%", val)
			}
			if pct {
				f /= 100
			}
			if f <= 0 || f > 1 {
				return bad("loss bound must be above 0 and at most 100%% (leave the term out for no bound)")
			}
			sla.MaxLoss = f
		default:
			return bad("unknown bound %q (want rtt, jitter or loss)", key)
		}
	}
	return sla, nil
}

func validSLAName(s string) error {
	if s == "" || len(s) > 32 {
		return fmt.Errorf("want 1-32 bytes, got %d", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("byte %q not allowed (want [a-z0-9_-])", c)
		}
	}
	return nil
}

// String formats s the way ParseSLA reads it.
func (s SLA) String() string {
	var terms []string
	if s.MaxRTT > 0 {
		terms = append(terms, "rtt<="+s.MaxRTT.String())
	}
	if s.MaxJitter > 0 {
		terms = append(terms, "jitter<="+s.MaxJitter.String())
	}
	if s.MaxLoss > 0 {
		terms = append(terms, "loss<="+formatLoss(s.MaxLoss))
	}
	if len(terms) == 0 {
		return s.Name + ": (no bounds)"
	}
	return s.Name + ": " + strings.Join(terms, ",")
}

// formatLoss writes a loss bound as a percentage when that reads back as the same fraction
// (ParseSLA divides by 100, which does not always undo *100 in floating point), else as the
// fraction itself, so that String always round-trips.
func formatLoss(f float64) string {
	pct := strconv.FormatFloat(f*100, 'g', -1, 64)
	if back, err := strconv.ParseFloat(pct, 64); err == nil && back/100 == f {
		return pct + "%"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// Check returns "" when the figures meet s, else what breaks it.
func (s SLA) Check(rtt, jitter time.Duration, loss float64) string {
	var out []string
	if s.MaxRTT > 0 && rtt > s.MaxRTT {
		out = append(out, fmt.Sprintf("rtt %v > %v", rtt, s.MaxRTT))
	}
	if s.MaxJitter > 0 && jitter > s.MaxJitter {
		out = append(out, fmt.Sprintf("jitter %v > %v", jitter, s.MaxJitter))
	}
	// Written as !(<=) so that a NaN loss breaks the bound here as it does in Meets.
	if s.MaxLoss > 0 && !(loss <= s.MaxLoss+1e-12) {
		out = append(out, fmt.Sprintf("loss %.2f%% > %.2f%%", loss*100, s.MaxLoss*100))
	}
	return strings.Join(out, ", ")
}

// Meets reports whether the figures meet s; Check without the explanation
// (and without allocating), for the inner loop of path search.
func (s SLA) Meets(rtt, jitter time.Duration, loss float64) bool {
	return (s.MaxRTT <= 0 || rtt <= s.MaxRTT) && (s.MaxJitter <= 0 || jitter <= s.MaxJitter) &&
		(s.MaxLoss <= 0 || loss <= s.MaxLoss+1e-12)
}
