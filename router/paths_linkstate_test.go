package router

import (
	"testing"
	"time"

	"github.com/weftnet/weft/mesh"
)

// TestLinkStateMovedInterval: the router's link-state pacing keeps 20 s up to 50 peers (the
// SLA chaos test's meshes: the other end of a link learns an RTT that fell back within 20 s),
// stretches above, and bounds the mesh-wide rate of moved-figure publications to 2.5 a
// second at every N.
func TestLinkStateMovedInterval(t *testing.T) {
	for _, c := range []struct {
		n    int
		want time.Duration
	}{{3, 20 * time.Second}, {10, 20 * time.Second}, {50, 20 * time.Second}, {100, 40 * time.Second}, {200, 80 * time.Second}, {1000, 400 * time.Second}} {
		got := mesh.MovedInterval(linkStateMinInterval, linkStateMovedSpacing, c.n)
		if got != c.want {
			t.Errorf("N=%d: moved figures every %v, want %v", c.n, got, c.want)
		}
		if rate := float64(c.n) / got.Seconds(); rate > 2.5+1e-9 {
			t.Errorf("N=%d: %.2f moved-figure publications a second mesh-wide, want <= 2.5", c.n, rate)
		}
	}
}
