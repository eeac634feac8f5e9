package router

import (
	"slices"
	"testing"
	"time"

	"github.com/weftnet/weft/mesh"
)

// TestUnderlayActive: with link probes on, only links whose link probe is down or lost a
// probe in its window get underlay probes at the full rate; healthy ones wait for the long
// period.
func TestUnderlayActive(t *testing.T) {
	links := map[string]mesh.LinkMetrics{
		"healthy": {RTT: time.Millisecond, Up: true},
		"down":    {Up: false},
		"lossy":   {RTT: time.Millisecond, Up: true, Loss: 0.05},
	}
	got := underlayActive(links)
	slices.Sort(got)
	if want := []string{"down", "lossy"}; !slices.Equal(got, want) {
		t.Fatalf("underlayActive = %v, want %v", got, want)
	}
	if got := underlayActive(map[string]mesh.LinkMetrics{"a": {Up: true}}); len(got) != 0 {
		t.Fatalf("all healthy: underlayActive = %v, want none", got)
	}
}
