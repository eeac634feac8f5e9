package main

import (
	"slices"
	"testing"
)

// Every round runs every case once, rounds start with different cases, and two neighbours
// in the list (the planes' default and media) swap which runs first from one round to the
// next, whatever the round count.
func TestRoundOrder(t *testing.T) {
	const n = 9
	const a, b = 7, 8 // weft peers default and media
	starts := map[int]bool{}
	var firsts []int
	for r := range 6 {
		var order []int
		for k := range n {
			order = append(order, roundOrder(r, k, n))
		}
		sorted := slices.Clone(order)
		slices.Sort(sorted)
		if !slices.Equal(sorted, []int{0, 1, 2, 3, 4, 5, 6, 7, 8}) {
			t.Fatalf("round %d runs %v, not every case once", r, order)
		}
		if starts[order[0]] {
			t.Fatalf("round %d starts with case %d again", r, order[0])
		}
		starts[order[0]] = true
		ia, ib := slices.Index(order, a), slices.Index(order, b)
		first := a
		if ib < ia {
			first = b
		}
		firsts = append(firsts, first)
	}
	for r := 1; r < len(firsts); r++ {
		if firsts[r] == firsts[r-1] {
			t.Fatalf("rounds %d and %d both run case %d first of the pair (%v)", r-1, r, firsts[r], firsts)
		}
	}
}
