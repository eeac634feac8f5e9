// Command scale measures weft's control plane with real processes, side by side with
// serf (issue 11, item 8):
//
//	make build && go run ./chaos-tests/bench/scale -bin bin -n 50,100 [-serf] [-samples 5]
//
// For every N it builds a lab of N hosts (network namespaces on one underlay bridge,
// chaos-tests/lab) and runs a real `weft peer --encrypt=never` on each (the control plane
// alone; with the lab's cluster key, so gossip is encrypted): host 0 without seeds, as the first peer of a new cluster, every other host
// seeded with hosts 0..2. Hosts 0, then 1 and 2, then batches of -batch are started
// together, each batch waited for until its peers answer on their control sockets. Then:
//
//	see-all    time from the start of the last peer until every peer's /v1/peers lists
//	           all N alive (each peer is polled every -poll until it does, then left alone)
//	idle CPU   after -settle, utime+stime of every peer process over -window, in % of
//	           one core (/proc/<pid>/stat); median, max and the sum over all peers
//	RSS        VmRSS of every peer at the end of the window; median and max
//	pings      a Raft leader is waited for, one container is attached through the CNI
//	           plugin on each of -samples hosts spread over the lab, and every ordered
//	           pair pings until it answers once (ok/total)
//
// With -serf the same lab shape runs Debian's `serf agent` (hashicorp memberlist, the
// anchor) with the same seeding and the lab's key as its -encrypt key, so both encrypt gossip, and the same see-all, idle CPU and RSS are measured.
// The 1-minute load average is printed with every figure: the machine is shared. Targets
// of issue 11 are printed next to weft's numbers, never asserted; a step that does not
// finish in time is reported with what it reached, and the run goes on.
//
// The kernel's neighbour-table limits (global: the table is shared by every namespace)
// are raised for the run and restored after. Every wait is bounded; Ctrl-C (SIGINT) or
// SIGTERM tears down what runs. Only processes this command started are signalled, by
// PID; all traffic stays inside the labs' namespaces. Needs root. Not part of `make test`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "scale:", err)
		os.Exit(1)
	}
}

type options struct {
	bin        string
	ns         []int
	serf       bool
	serfBin    string
	samples    int
	weftPrefix string
	serfPrefix string
	keepLogs   string
	profile    string   // directory for CPU and allocation profiles of host 1 and the last host
	profiles   int      // how many hosts are profiled (host 1, then clients from the last one down)
	weftArgs   []string // extra `weft peer` flags for every host
	mc         measureConfig
	pingWait   time.Duration
	logger     *slog.Logger
}

// parseNs parses "50,100" into sorted-as-given peer counts within the lab's limits.
func parseNs(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 3 || n > 200 {
			return nil, fmt.Errorf("-n: %q is not a peer count in 3..200", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("-n: no peer count given")
	}
	return out, nil
}

func run() error {
	var (
		o       options
		nsFlag  = flag.String("n", "50,100", "peer counts, comma-separated (3..200)")
		verbose = flag.Bool("v", false, "log the labs' steps")
	)
	flag.StringVar(&o.bin, "bin", "bin", "directory holding the weft and weft-cni binaries")
	flag.BoolVar(&o.serf, "serf", false, "also run serf agents at every N, for the side-by-side table")
	flag.StringVar(&o.serfBin, "serf-bin", "serf", "the serf binary (Debian package serf)")
	flag.IntVar(&o.samples, "samples", 5, "hosts that get a container for the ping matrix")
	flag.StringVar(&o.weftPrefix, "prefix", "wscl", "namespace prefix of the weft labs")
	flag.StringVar(&o.serfPrefix, "serf-prefix", "wsrf", "namespace prefix of the serf labs")
	flag.StringVar(&o.keepLogs, "keep-logs", "", "copy every peer's log into this directory before teardown")
	flag.StringVar(&o.profile, "profile", "", "take a CPU profile (over the idle window) and a heap profile of weft host 1 (a Raft voter) and the last host (a client) into this directory (adds --pprof)")
	flag.IntVar(&o.profiles, "profile-hosts", 2, "with -profile: how many hosts to profile (host 1, then clients from the last one down); an idle peer gives a few samples a second, so merging many (go tool pprof a b c) is what ranks its parts")
	weftArgs := flag.String("weft-args", "", "extra weft peer flags for every host, space-separated (e.g. \"--log-level warn\")")
	flag.IntVar(&o.mc.batch, "batch", 10, "processes started together after the three seeds")
	flag.DurationVar(&o.mc.startTimeout, "start-timeout", 60*time.Second, "longest wait for one batch to answer")
	flag.DurationVar(&o.mc.seeAllWait, "timeout", 90*time.Second, "longest wait for all peers to see all")
	flag.DurationVar(&o.mc.poll, "poll", 200*time.Millisecond, "time between two polls of one peer's member list")
	flag.DurationVar(&o.mc.settle, "settle", 5*time.Second, "wait after convergence before the idle window")
	flag.DurationVar(&o.mc.window, "window", 30*time.Second, "idle CPU window")
	flag.DurationVar(&o.pingWait, "ping-timeout", 60*time.Second, "longest wait for the Raft leader, each attachment, and the ping matrix")
	flag.Parse()
	o.weftArgs = strings.Fields(*weftArgs)
	if o.profile != "" {
		o.weftArgs = append(o.weftArgs, "--pprof")
	}
	var err error
	if o.ns, err = parseNs(*nsFlag); err != nil {
		return err
	}
	if o.samples < 2 || o.mc.batch < 1 || o.mc.window < time.Second || o.mc.poll < 10*time.Millisecond {
		return errors.New("-samples must be ≥ 2, -batch ≥ 1, -window ≥ 1s, -poll ≥ 10ms")
	}
	o.mc.workers = 8
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces)")
	}
	if o.serf {
		if o.serfBin, err = exec.LookPath(o.serfBin); err != nil {
			return fmt.Errorf("-serf: %w (apt-get install serf)", err)
		}
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	o.logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	restore, err := raiseNeighLimits()
	if err != nil {
		return err
	}
	defer func() {
		if rerr := restore(); rerr != nil {
			fmt.Fprintln(os.Stderr, "scale: restore neighbour limits:", rerr)
		}
	}()

	weft, serf := map[int]*result{}, map[int]*result{}
	for _, n := range o.ns {
		r, err := runWeft(ctx, o, n)
		weft[n] = r
		writeDetail(os.Stdout, r)
		if err != nil {
			return err
		}
		if !o.serf {
			continue
		}
		r, err = runSerf(ctx, o, n)
		serf[n] = r
		writeDetail(os.Stdout, r)
		if err != nil {
			return err
		}
	}
	writeSummary(os.Stdout, o.ns, weft, serf)
	return nil
}

// newLab builds a lab of n hosts with nothing started.
func newLab(ctx context.Context, o options, prefix string, n int, peerArgs func(int) []string) (*lab.Lab, error) {
	return lab.New(ctx, lab.Config{Prefix: prefix, Hosts: n, BinDir: o.bin, Logger: o.logger,
		NoStart: true, PeerArgs: peerArgs})
}

// teardown stops the cluster, keeps the logs if asked, and closes the lab.
func teardown(o options, l *lab.Lab, c cluster, system string, err *error) {
	c.stopAll()
	if o.keepLogs != "" {
		keepLogs(o.keepLogs, l, system)
	}
	if cerr := l.Close(); cerr != nil {
		*err = errors.Join(*err, fmt.Errorf("close %s lab: %w", system, cerr))
	}
}

func runWeft(ctx context.Context, o options, n int) (r *result, err error) {
	r = &result{system: "weft", n: n}
	progress("weft N=%d: building the lab", n)
	var l *lab.Lab
	l, err = newLab(ctx, o, o.weftPrefix, n, weftPeerArgs(&l, o.weftArgs))
	if err != nil {
		return r, err
	}
	w := newWeftCluster(l)
	defer teardown(o, l, w, "weft", &err)
	mc := o.mc
	var rmu sync.Mutex // guards r's switch figures, written alongside the window
	mc.onIdle = func(ctx context.Context, window time.Duration) {
		var wg sync.WaitGroup
		// Every peer's path switches over the window: relay flapping, the cost #11 chased.
		wg.Go(func() { switchesOver(ctx, l.Hosts(), window, r, &rmu) })
		if o.profile != "" {
			for _, i := range profiledHosts(n, o.profiles) {
				wg.Go(func() { profileHost(ctx, o.profile, l.Host(i), n, window) })
			}
		}
		wg.Wait()
	}
	if err := measure(ctx, mc, l, w, r); err != nil {
		return r, err
	}
	return r, containerPings(ctx, l, w, o.samples, o.pingWait, r)
}

func runSerf(ctx context.Context, o options, n int) (r *result, err error) {
	r = &result{system: "serf", n: n}
	progress("serf N=%d: building the lab", n)
	l, err := newLab(ctx, o, o.serfPrefix, n, nil)
	if err != nil {
		return r, err
	}
	s := newSerfCluster(o.serfBin, l)
	defer teardown(o, l, s, "serf", &err)
	return r, measure(ctx, o.mc, l, s, r)
}

// profiledHosts: host 1, a Raft voter, then clients (as most peers are) from the last host
// down, count in all (at least 1, at most n-1).
func profiledHosts(n, count int) []int {
	out := []int{1}
	for i := n - 1; i > 1 && len(out) < count; i-- {
		out = append(out, i)
	}
	return out
}

// profileHost saves a CPU profile of h's peer over most of window, then its heap profile
// (allocations since start included), and its metrics at both ends of the CPU profile, as
// DIR/weft-N<n>-<host>-{cpu,heap}.pprof and DIR/weft-N<n>-<host>-metrics-{start,end}.txt. Failures are
// reported, not fatal: the figures matter more than the profile.
func profileHost(ctx context.Context, dir string, h *lab.Host, n int, window time.Duration) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "scale: profile:", err)
		return
	}
	secs := max(1, int((window - 2*time.Second).Seconds()))
	base := filepath.Join(dir, fmt.Sprintf("weft-N%d-%s-", n, h.Name))
	get := func(path, file string) {
		if out, err := h.Exec(ctx, "curl", "-sf", "-o", base+file, "http://127.0.0.1:6782/debug/pprof/"+path); err != nil {
			fmt.Fprintln(os.Stderr, "scale: profile:", err, string(out))
		}
	}
	metrics := func(file string) {
		if out, err := h.Exec(ctx, "curl", "-sf", "-o", base+file, "http://127.0.0.1:6782/metrics"); err != nil {
			fmt.Fprintln(os.Stderr, "scale: metrics:", err, string(out))
		}
	}
	metrics("metrics-start.txt")
	get(fmt.Sprintf("profile?seconds=%d", secs), "cpu.pprof")
	metrics("metrics-end.txt")
	get("heap", "heap.pprof")
	progress("weft N=%d: profiles of %s in %s", n, h.Name, base+"*.pprof")
}

// keepLogs copies every host's peer.log and serf.log to dir/<system>-<host>.log.
func keepLogs(dir string, l *lab.Lab, system string) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "scale: keep logs:", err)
		return
	}
	for _, h := range l.Hosts() {
		for _, name := range []string{"peer.log", "serf.log"} {
			b, err := os.ReadFile(filepath.Join(h.Dir, name))
			if err != nil {
				continue
			}
			os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%s-%s", system, h.Name, name)), b, 0o644)
		}
	}
}
