package pathsel

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// benchSelector holds n peers with deg random links each (both directions
// published for most), every other peer a destination of p0.
func benchSelector(b *testing.B, n, deg int) (*Selector, graph) {
	rng := rand.New(rand.NewPCG(uint64(n), uint64(deg)))
	g := randomGraph(rng, n, deg)
	s, err := New(Config{Self: "p0"})
	if err != nil {
		b.Fatal(err)
	}
	load(b, s, nil, g)
	dests := make(map[string]Dest, n)
	for i := 1; i < n; i++ {
		dests[fmt.Sprintf("p%d", i)] = Dest{Encrypted: i%4 == 0}
	}
	s.SetDestinations(dests)
	return s, g
}

// BenchmarkFullRecompute evaluates every destination (as after an SLA
// change or at start).
func BenchmarkFullRecompute(b *testing.B) {
	for _, n := range []int{100, 200, 1000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			s, _ := benchSelector(b, n, 20)
			now := time.Unix(1000, 0)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				now = now.Add(time.Second)
				markAll(s)
				s.Select(now)
			}
		})
	}
}

// BenchmarkOneLinkChanged changes one of self's links (the worst case: it
// dirties the link's other end and every destination it can relay to) and
// selects.
func BenchmarkOneLinkChanged(b *testing.B) {
	for _, n := range []int{100, 200, 1000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			s, g := benchSelector(b, n, 20)
			now := time.Unix(1000, 0)
			s.Select(now)
			var to string
			for to = range g["p0"] {
				break
			}
			rng := rand.New(rand.NewPCG(1, 1))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				now = now.Add(time.Second)
				l := randomLink(rng)
				l.Up = true
				if err := s.SetLink("p0", to, l); err != nil {
					b.Fatal(err)
				}
				s.Select(now)
			}
		})
	}
}

// BenchmarkRemoteLinkChanged changes a link between two other peers.
func BenchmarkRemoteLinkChanged(b *testing.B) {
	s, _ := benchSelector(b, 1000, 20)
	now := time.Unix(1000, 0)
	s.Select(now)
	rng := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		now = now.Add(time.Second)
		from, to := fmt.Sprintf("p%d", 1+i%999), fmt.Sprintf("p%d", 1+(i*7+3)%999)
		if from != to {
			_ = s.SetLink(from, to, randomLink(rng))
		}
		s.Select(now)
	}
}
