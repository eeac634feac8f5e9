package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// switchesMetric counts every peer's moves between measured paths, by reason (router).
const switchesMetric = "weft_path_switches_total"

var errMetricFormat = errors.New("unexpected metrics format")

// parseSwitches reads weft_path_switches_total{reason="…"} from a Prometheus text
// exposition: reason → count. A peer without a switch yet has no series; that is zero.
func parseSwitches(text string) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, switchesMetric+"{")
		if !ok {
			continue
		}
		labels, val, ok := strings.Cut(rest, "} ")
		reason, found := "", false
		for l := range strings.SplitSeq(labels, ",") {
			if v, ok := strings.CutPrefix(l, `reason="`); ok {
				reason, found = strings.TrimSuffix(v, `"`), true
			}
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if !ok || !found || err != nil {
			return nil, fmt.Errorf("%w: %q", errMetricFormat, line)
		}
		out[reason] += f
	}
	return out, sc.Err()
}

// scrapeSwitches reads every host's switch counters, 8 at a time; hosts that do not
// answer are left out and counted.
func scrapeSwitches(ctx context.Context, hosts []*lab.Host) (map[string]map[string]float64, int) {
	var (
		mu     sync.Mutex
		out    = map[string]map[string]float64{}
		failed int
		wg     sync.WaitGroup
		sem    = make(chan struct{}, 8)
	)
	for _, h := range hosts {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			b, err := h.Exec(ctx, "curl", "-sf", "--max-time", "5", "http://127.0.0.1:6782/metrics")
			var m map[string]float64
			if err == nil {
				m, err = parseSwitches(string(b))
			}
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				return
			}
			out[h.Name] = m
		})
	}
	wg.Wait()
	return out, failed
}

// switchesOver records, into r, the path switches every peer made over the idle window:
// scraped at its start and again just before its end.
func switchesOver(ctx context.Context, hosts []*lab.Host, window time.Duration, r *result, mu *sync.Mutex) {
	before, f1 := scrapeSwitches(ctx, hosts)
	t := time.NewTimer(max(0, window-3*time.Second))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return
	case <-t.C:
	}
	after, f2 := scrapeSwitches(ctx, hosts)
	byReason := map[string]float64{}
	peers := 0
	for name, a := range after {
		b, ok := before[name]
		if !ok {
			continue
		}
		peers++
		for reason, v := range a {
			byReason[reason] += v - b[reason]
		}
	}
	mu.Lock()
	defer mu.Unlock()
	r.switchPeers, r.switches = peers, byReason
	if f1+f2 > 0 {
		r.note("path switches: %d metric scrapes failed", f1+f2)
	}
}

// switchesText formats the switches over the window: the total per peer and by reason.
func (r *result) switchesText() string {
	total := 0.0
	var parts []string
	for _, reason := range slices.Sorted(maps.Keys(r.switches)) {
		total += r.switches[reason]
		parts = append(parts, fmt.Sprintf("%s %.0f", reason, r.switches[reason]))
	}
	per := 0.0
	if r.switchPeers > 0 {
		per = total / float64(r.switchPeers)
	}
	return fmt.Sprintf("%.0f over %d peers (%.2f per peer; %s)", total, r.switchPeers, per, strings.Join(parts, ", "))
}
