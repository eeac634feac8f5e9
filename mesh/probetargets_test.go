package mesh

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// peerNames returns p000 … p(n-1), sorted.
func peerNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("p%03d", i)
	}
	return out
}

// byIndex estimates peer pNNN at NNN ms (so p001 is nearest); peers in
// unknown have no estimate.
func byIndex(unknown ...string) func(string) (time.Duration, bool) {
	return func(p string) (time.Duration, bool) {
		if slices.Contains(unknown, p) {
			return 0, false
		}
		var i int
		fmt.Sscanf(p, "p%d", &i)
		return time.Duration(i) * time.Millisecond, true
	}
}

func TestChooseProbeTargets(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1_000_000, 0)
	cfg := ProbeTargetConfig{K: 8, Random: 2, Reshuffle: time.Minute}
	tests := []struct {
		name      string
		live      []string
		est       func(string) (time.Duration, bool)
		measured  func(string) (time.Duration, bool) // nil: none
		must      []string
		current   ProbeTargets
		now       time.Time
		wantMust  []string
		wantNear  []string
		wantRand  int      // number of random picks
		keepRand  []string // random picks that must be kept
		wantDrawn time.Time
	}{
		{
			name:     "small mesh: everyone, self skipped",
			live:     peerNames(9), // p000 is self: 8 others = K
			est:      byIndex(),
			must:     []string{"p005"},
			now:      t0,
			wantMust: []string{"p005"},
			wantNear: []string{"p001", "p002", "p003", "p004", "p005", "p006", "p007", "p008"},
		},
		{
			name:      "large mesh: must, nearest, random",
			live:      peerNames(100),
			est:       byIndex(),
			must:      []string{"p050", "p099", "gone"}, // gone is not live
			now:       t0,
			wantMust:  []string{"p050", "p099"},
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p006"}, // 8 - 2 random; must on top
			wantRand:  2,
			wantDrawn: t0,
		},
		{
			name:      "peers without an estimate are never nearest",
			live:      peerNames(100),
			est:       byIndex("p001", "p003"),
			now:       t0,
			wantNear:  []string{"p002", "p004", "p005", "p006", "p007", "p008"},
			wantRand:  2,
			wantDrawn: t0,
		},
		{
			name: "current nearest kept against a slightly nearer peer",
			live: peerNames(100),
			// p007 was chosen when it looked nearest; p006 is only 14 % nearer.
			est:       byIndex(),
			current:   ProbeTargets{Nearest: []string{"p001", "p002", "p003", "p004", "p005", "p007"}, Random: []string{"p070", "p080"}, Drawn: t0},
			now:       t0.Add(time.Second),
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p007"},
			wantRand:  2,
			keepRand:  []string{"p070", "p080"},
			wantDrawn: t0,
		},
		{
			name:      "a clearly nearer peer replaces the farthest",
			live:      peerNames(100),
			est:       byIndex(),
			current:   ProbeTargets{Nearest: []string{"p001", "p002", "p003", "p004", "p005", "p040"}, Random: []string{"p070", "p080"}, Drawn: t0},
			now:       t0.Add(time.Second),
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p006"},
			wantRand:  2,
			keepRand:  []string{"p070", "p080"},
			wantDrawn: t0,
		},
		{
			// p040's estimate is 40 ms but it measures 0.5 ms: estimate noise, not a far peer.
			name:    "a current target is ranked by what it measures, not by its estimate",
			live:    peerNames(100),
			est:     byIndex(),
			current: ProbeTargets{Nearest: []string{"p001", "p002", "p003", "p004", "p005", "p040"}, Random: []string{"p070", "p080"}, Drawn: t0},
			measured: func(p string) (time.Duration, bool) {
				if p == "p040" {
					return 500 * time.Microsecond, true
				}
				return 0, false
			},
			now:       t0.Add(time.Second),
			wantNear:  []string{"p040", "p001", "p002", "p003", "p004", "p005"},
			wantRand:  2,
			keepRand:  []string{"p070", "p080"},
			wantDrawn: t0,
		},
		{
			name:      "a dead random pick is replaced, the other kept",
			live:      slices.DeleteFunc(peerNames(100), func(p string) bool { return p == "p080" }),
			est:       byIndex(),
			current:   ProbeTargets{Nearest: []string{"p001", "p002", "p003", "p004", "p005", "p006"}, Random: []string{"p070", "p080"}, Drawn: t0},
			now:       t0.Add(time.Second),
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p006"},
			wantRand:  2,
			keepRand:  []string{"p070"},
			wantDrawn: t0,
		},
		{
			name:      "random part redrawn when due",
			live:      peerNames(100),
			est:       byIndex(),
			current:   ProbeTargets{Nearest: []string{"p001", "p002", "p003", "p004", "p005", "p006"}, Random: []string{"p070", "p080"}, Drawn: t0},
			now:       t0.Add(time.Minute),
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p006"},
			wantRand:  2,
			wantDrawn: t0.Add(time.Minute),
		},
		{
			name:      "more must-probe peers than K: all of them, and the K chosen as usual",
			live:      peerNames(100),
			est:       byIndex(),
			must:      peerNames(100)[40:50],
			now:       t0,
			wantMust:  peerNames(100)[40:50],
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p006"},
			wantRand:  2,
			wantDrawn: t0,
		},
		{
			name:      "a nearest peer that became must stays nearest too (no slot changes hands)",
			live:      peerNames(100),
			est:       byIndex(),
			must:      []string{"p001"},
			current:   ProbeTargets{Nearest: []string{"p001", "p002", "p003", "p004", "p005", "p006"}, Random: []string{"p070", "p080"}, Drawn: t0},
			now:       t0.Add(time.Second),
			wantMust:  []string{"p001"},
			wantNear:  []string{"p001", "p002", "p003", "p004", "p005", "p006"},
			wantRand:  2,
			keepRand:  []string{"p070", "p080"},
			wantDrawn: t0,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := ProbeTargetInput{
				Self: "p000", Live: tc.live, Estimate: tc.est, Measured: tc.measured, Must: tc.must,
				Current: tc.current, Now: tc.now, Rand: rand.New(rand.NewPCG(7, 7)),
			}
			got := ChooseProbeTargets(in, cfg)
			if !slices.Equal(got.Must, tc.wantMust) {
				t.Errorf("Must = %v, want %v", got.Must, tc.wantMust)
			}
			if !slices.Equal(got.Nearest, tc.wantNear) {
				t.Errorf("Nearest = %v, want %v", got.Nearest, tc.wantNear)
			}
			if len(got.Random) != tc.wantRand {
				t.Errorf("Random = %v, want %d picks", got.Random, tc.wantRand)
			}
			for _, k := range tc.keepRand {
				if !slices.Contains(got.Random, k) {
					t.Errorf("Random = %v dropped %s", got.Random, k)
				}
			}
			if !got.Drawn.Equal(tc.wantDrawn) {
				t.Errorf("Drawn = %v, want %v", got.Drawn, tc.wantDrawn)
			}
			all := got.All()
			for _, p := range got.Random {
				if slices.Contains(got.Nearest, p) {
					t.Errorf("%s is both nearest and random: %+v", p, got)
				}
			}
			for _, p := range all {
				if p == "p000" || !slices.Contains(tc.live, p) {
					t.Errorf("target %s is self or not live", p)
				}
			}
			if bound := cfg.K + len(got.Must); len(all) > bound {
				t.Errorf("%d targets, bound %d", len(all), bound)
			}
			// Pure: the same input (and seed) gives the same output.
			in.Rand = rand.New(rand.NewPCG(7, 7))
			if again := ChooseProbeTargets(in, cfg); !slices.Equal(again.All(), all) {
				t.Errorf("not deterministic: %v then %v", all, again.All())
			}
		})
	}
}

// TestProbeTargetsStable: fed its own output, with estimates that jitter a
// little around fixed values, the choice does not churn between reshuffles.
func TestProbeTargetsStable(t *testing.T) {
	t.Parallel()
	live := peerNames(500)
	rng := rand.New(rand.NewPCG(3, 4))
	cfg := DefaultProbeTargetConfig()
	t0 := time.Unix(1_000_000, 0)
	var cur ProbeTargets
	var first []string
	for i := range 100 {
		jitter := func(p string) (time.Duration, bool) {
			d, ok := byIndex()(p)
			return d + time.Duration(rng.IntN(200))*time.Microsecond, ok
		}
		cur = ChooseProbeTargets(ProbeTargetInput{
			Self: "p000", Live: live, Estimate: jitter, Current: cur,
			Now: t0.Add(time.Duration(i) * time.Second), Rand: rng,
		}, cfg)
		if i == 0 {
			first = cur.All()
			if len(first) != cfg.K {
				t.Fatalf("%d targets, want %d", len(first), cfg.K)
			}
			continue
		}
		if got := cur.All(); !slices.Equal(got, first) {
			t.Fatalf("round %d: targets changed from %v to %v", i, first, got)
		}
	}
}

// BenchmarkProbeTargets is one choice at N=1000 with 16 targets, 4 of them
// must-probe, fed back its previous result (the steady state).
func BenchmarkProbeTargets(b *testing.B) {
	for _, n := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			live := peerNames(n)
			est := make(map[string]time.Duration, n)
			rng := rand.New(rand.NewPCG(1, 1))
			for _, p := range live {
				est[p] = time.Duration(rng.IntN(100_000)) * time.Microsecond
			}
			estimate := func(p string) (time.Duration, bool) { d, ok := est[p]; return d, ok }
			in := ProbeTargetInput{
				Self: live[0], Live: live, Estimate: estimate,
				Must: []string{live[10], live[20], live[30], live[40]},
				Now:  time.Unix(1_000_000, 0), Rand: rng,
			}
			cfg := DefaultProbeTargetConfig()
			in.Current = ChooseProbeTargets(in, cfg)
			b.ReportAllocs()
			for b.Loop() {
				in.Current = ChooseProbeTargets(in, cfg)
			}
		})
	}
}

// TestProbeTargetsMustDoesNotDisplace: a relay that comes and goes adds and removes only
// itself; the nearest and random picks stay, so link state does not churn with relays.
func TestProbeTargetsMustDoesNotDisplace(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1_000_000, 0)
	cfg := ProbeTargetConfig{K: 8, Random: 2, Reshuffle: time.Minute}
	in := ProbeTargetInput{Self: "p000", Live: peerNames(100), Estimate: byIndex(), Now: t0, Rand: rand.New(rand.NewPCG(1, 2))}
	before := ChooseProbeTargets(in, cfg)
	in.Current, in.Must, in.Now = before, []string{"p090"}, t0.Add(time.Second)
	with := ChooseProbeTargets(in, cfg)
	in.Current, in.Must, in.Now = with, nil, t0.Add(2*time.Second)
	after := ChooseProbeTargets(in, cfg)
	if got, want := with.All(), append(slices.Clone(before.All()), "p090"); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
		t.Errorf("with a relay: %v, want %v plus p090", got, before.All())
	}
	if !slices.Equal(after.All(), before.All()) {
		t.Errorf("after the relay: %v, want %v again", after.All(), before.All())
	}
}
