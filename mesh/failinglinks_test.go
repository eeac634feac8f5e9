package mesh

import (
	"slices"
	"testing"
	"time"
)

// TestFailingLinks: with link probes on, only links whose link probe is down or lost a
// probe in its window get underlay probes at the full rate; healthy ones wait for the long
// period.
func TestFailingLinks(t *testing.T) {
	links := map[string]LinkMetrics{
		"healthy": {RTT: time.Millisecond, Up: true},
		"down":    {Up: false},
		"lossy":   {RTT: time.Millisecond, Up: true, Loss: 0.05},
	}
	got := FailingLinks(links)
	slices.Sort(got)
	if want := []string{"down", "lossy"}; !slices.Equal(got, want) {
		t.Fatalf("FailingLinks = %v, want %v", got, want)
	}
	if got := FailingLinks(map[string]LinkMetrics{"a": {Up: true}}); len(got) != 0 {
		t.Fatalf("all healthy: FailingLinks = %v, want none", got)
	}
}
