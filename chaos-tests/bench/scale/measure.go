package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// cluster is one membership system running on a lab's hosts: weft peers or serf agents.
// Its methods may be called from several goroutines for different hosts at once.
type cluster interface {
	// launch starts the host's process and returns once it runs.
	launch(h *lab.Host) error
	// pid returns the host's process ID, 0 when it does not run.
	pid(h *lab.Host) int
	// ready returns nil once the host's process answers its API.
	ready(ctx context.Context, h *lab.Host) error
	// alive returns how many members (itself included) the host sees alive.
	alive(ctx context.Context, h *lab.Host) (int, error)
	// logTail returns the last n lines of the host's process log.
	logTail(h *lab.Host, n int) string
	// stopAll kills every process the cluster started and waits for them.
	stopAll()
}

// measureConfig bounds and shapes one measurement.
type measureConfig struct {
	batch        int           // processes started together after the three seeds
	startTimeout time.Duration // longest wait for one batch to answer
	seeAllWait   time.Duration // longest wait for all to see all
	poll         time.Duration // between two polls of one peer's view
	settle       time.Duration // after convergence, before the idle window
	window       time.Duration // idle CPU window
	workers      int           // concurrent API polls
	// onIdle, when set, runs alongside the idle window (e.g. to take a profile); it must
	// return within the window.
	onIdle func(ctx context.Context, window time.Duration)
}

// measure starts the cluster on every host of l (host 0 first, then the seeds 1 and 2,
// then batches), waits until every peer sees all alive, then measures idle CPU and RSS.
// It fills r and returns an error only when nothing more can be measured (the first peer
// did not start, or ctx ended).
func measure(ctx context.Context, cfg measureConfig, l *lab.Lab, c cluster, r *result) error {
	hosts := l.Hosts()
	r.n = len(hosts)
	r.loadStart = loadAvg()

	// Start. Host 0 must answer before anyone joins it; the two other seeds next, so that
	// the rest find three seeds up, as on a real cluster.
	groups := [][]*lab.Host{hosts[:1]}
	if len(hosts) > 1 {
		groups = append(groups, hosts[1:min(3, len(hosts))])
	}
	for i := 3; i < len(hosts); i += cfg.batch {
		groups = append(groups, hosts[i:min(i+cfg.batch, len(hosts))])
	}
	first := time.Now()
	var lastStart time.Time
	for gi, g := range groups {
		for _, h := range g {
			if err := c.launch(h); err != nil {
				r.note("start %s: %v", h.Name, err)
				continue
			}
			lastStart = time.Now()
		}
		bctx, cancel := context.WithTimeout(ctx, cfg.startTimeout)
		var mu sync.Mutex
		parallel(g, len(g), func(h *lab.Host) {
			if c.pid(h) == 0 {
				return
			}
			err := waitReady(bctx, c, h)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				r.note("%s not ready: %v\n--- log tail ---\n%s", h.Name, err, c.logTail(h, 10))
				return
			}
			r.started++
		})
		cancel()
		if err := ctx.Err(); err != nil {
			return err
		}
		if gi == 0 && r.started == 0 {
			return fmt.Errorf("%s: first peer did not start: %s", r.system, r.notes[len(r.notes)-1])
		}
	}
	r.startTook = lastStart.Sub(first)
	progress("%s N=%d: %d started in %s; waiting until every peer sees all alive (at most %s)", r.system, r.n, r.started, secs(r.startTook), cfg.seeAllWait)

	// All see all: each peer is polled until it sees n alive; from then on it is left
	// alone, so that polling does not load the peers more than needed. The time of the
	// last peer to get there counts.
	n := len(hosts)
	done := make([]bool, n)
	seen := make([]int, n)
	r.seeAllEach = make([]time.Duration, n)
	for i := range r.seeAllEach {
		r.seeAllEach[i] = -1
	}
	sctx, cancel := context.WithTimeout(ctx, cfg.seeAllWait)
	defer cancel()
	tick := time.NewTicker(cfg.poll)
	defer tick.Stop()
	for {
		var todo []*lab.Host
		for i, h := range hosts {
			if !done[i] {
				todo = append(todo, h)
			}
		}
		if len(todo) == 0 {
			r.seeAllOK = true
			break
		}
		var mu sync.Mutex
		parallel(todo, cfg.workers, func(h *lab.Host) {
			pctx, pcancel := context.WithTimeout(sctx, 5*time.Second)
			k, err := c.alive(pctx, h)
			pcancel()
			if err != nil {
				return
			}
			mu.Lock()
			seen[h.Index] = k
			if k == n && !done[h.Index] {
				done[h.Index] = true
				r.seeAll = time.Since(lastStart)
				r.seeAllEach[h.Index], r.last = r.seeAll, h.Name
			}
			mu.Unlock()
		})
		select {
		case <-sctx.Done():
		case <-tick.C:
			continue
		}
		break
	}
	cancel()
	if err := ctx.Err(); err != nil {
		return err
	}
	r.reached, r.minSeen = 0, n
	for i := range hosts {
		if done[i] {
			r.reached++
		}
		r.minSeen = min(r.minSeen, seen[i])
	}
	if !r.seeAllOK {
		r.seeAll = time.Since(lastStart)
		r.note("not every peer saw all %d alive within %s: %d did; the fewest any peer saw was %d", n, cfg.seeAllWait, r.reached, r.minSeen)
	}

	// Idle: no polling from here on.
	progress("%s N=%d: all see all: %s; idle window of %s after %s", r.system, r.n, r.seeAllText(), cfg.window, cfg.settle)
	if err := sleep(ctx, cfg.settle); err != nil {
		return err
	}
	if cfg.onIdle != nil {
		done := make(chan struct{})
		go func() { defer close(done); cfg.onIdle(ctx, cfg.window) }()
		defer func() { <-done }()
	}
	return idle(ctx, cfg.window, hosts, c, r)
}

// waitReady polls the host's API until it answers, its process exits or ctx ends.
func waitReady(ctx context.Context, c cluster, h *lab.Host) error {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if c.pid(h) == 0 {
			return errors.New("process exited")
		}
		err := c.ready(ctx, h)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %w)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

// idle measures every running peer's CPU over window and its RSS at the end.
func idle(ctx context.Context, window time.Duration, hosts []*lab.Host, c cluster, r *result) error {
	type probe struct {
		pid   int
		ticks uint64
	}
	before := make([]probe, len(hosts))
	for i, h := range hosts {
		pid := c.pid(h)
		if pid == 0 {
			continue
		}
		t, err := cpuTicks(pid)
		if err != nil {
			r.note("cpu of %s: %v", h.Name, err)
			continue
		}
		before[i] = probe{pid, t}
	}
	busy0, total0, cerr := cpuTimes()
	start := time.Now()
	if err := sleep(ctx, window); err != nil {
		return err
	}
	r.window = time.Since(start).Round(100 * time.Millisecond)
	r.loadWindow = loadAvg()
	if busy1, total1, err := cpuTimes(); err == nil && cerr == nil && total1 > total0 {
		// Busy share of all cores, times the core count: % of one core, like the peers.
		r.machineBusy = float64(busy1-busy0) / float64(total1-total0) * 100 * float64(runtime.NumCPU())
		if r.machineBusy >= 95*float64(runtime.NumCPU()) {
			r.note("the machine was saturated during the idle window (%.0f%% of %d cores' %d%%): the peers may have got less CPU than they asked for, so their figures may be lower bounds",
				r.machineBusy, runtime.NumCPU(), 100*runtime.NumCPU())
		}
	}
	r.cpuByHost = map[string]float64{}
	for i, h := range hosts {
		b := before[i]
		if b.pid == 0 {
			continue
		}
		if c.pid(h) != b.pid {
			r.note("%s exited during the idle window", h.Name)
			continue
		}
		t, err := cpuTicks(b.pid)
		if err != nil {
			r.note("cpu of %s: %v", h.Name, err)
			continue
		}
		rss, err := rssBytes(b.pid)
		if err != nil {
			r.note("rss of %s: %v", h.Name, err)
			continue
		}
		r.cpu = append(r.cpu, float64(t-b.ticks)/userHZ/r.window.Seconds()*100)
		r.cpuByHost[h.Name] = r.cpu[len(r.cpu)-1]
		r.rss = append(r.rss, float64(rss.rss)/(1<<20))
		r.rssAnon = append(r.rssAnon, float64(rss.anon)/(1<<20))
		r.pss = append(r.pss, float64(rss.pss)/(1<<20))
	}
	return nil
}

// progress tells the operator what the run is doing (stderr, so stdout is the report).
func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().UTC().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// parallel calls fn for every item, at most workers at a time, and waits for all.
func parallel[T any](items []T, workers int, fn func(T)) {
	sem := make(chan struct{}, max(1, workers))
	var wg sync.WaitGroup
	for _, it := range items {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			fn(it)
		}()
	}
	wg.Wait()
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
