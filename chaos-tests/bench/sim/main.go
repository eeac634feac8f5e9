// Command sim is the in-process scale simulation of weft's control plane
// (issue #11, item 8): N peers in one process, each on its own loopback
// address, with real memberlist gossip (mesh.Mesh), real probers on UDP
// sockets, real link state (LinkTable on its gossip channel) and path choice
// as the router does it today, fed to a recording fake datapath. No Raft,
// DNS, kernel or network namespaces.
//
//	go run ./chaos-tests/bench/sim -n 50,100,200,500 [-membership-only-n 1000] [-seconds 30]
//
// Per N it reports: the time until all see all (every peer's Peers() has N
// alive), counted from the last peer's start and from the first's; the
// bytes and messages per second per peer, by kind, over an idle window after
// convergence; process CPU over the window ÷ N (in % of one core); heap in
// use after GC ÷ N; path-compute time per run (median, p99) and the
// destinations with a path (min over peers, should be N−1); and across the
// Ns the exponent of each cost in N (least-squares slope of log(cost) over
// log(N)). The window opens only after the join's alive messages and then
// its link-state backlog have drained (-drain-max, -ls-drain-max), and after
// it -publish-probes peers in turn publish a link going down, timed until
// every peer's table holds it. With -membership-only-n it also runs the mesh alone (no probers,
// link state or paths, and no router behaviour: no push/pull with every
// joiner) at that N, the memberlist baseline.
//
// Gossip runs without a password so that it can be classified (see
// traffic.go); encryption would add a constant 29 bytes per packet.
//
// Path computations of all peers share one slot (one at a time), so that
// a super-linear path cost shows as a long compute time and fewer runs per
// second per peer (the router wants one per -path-interval) rather than
// starving the gossip goroutines of CPU: the other costs stay measurable
// even when path choice alone would need more than the machine.
//
// The targets are printed next to the numbers (met/MISSED), never
// asserted; the exit status is non-zero only when the harness itself fails
// (a socket cannot be bound, peers cannot be closed). Every wait has a
// deadline. All traffic stays on 127.0.0.0/8. It is not part of `go test`.
package main

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	_ "net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/weftnet/weft/mesh"
)

type options struct {
	ns               []int
	membershipOnlyN  int
	window           time.Duration
	settle           time.Duration
	drainMax         time.Duration
	lsDrainMax       time.Duration
	lsDrainBelow     int
	publishProbes    int
	publishTimeout   time.Duration
	convergeTimeout  time.Duration
	batch            int
	batchPause       time.Duration
	base             netip.Addr
	meshPort         int
	probePort        int
	linkProbePort    int
	probeInterval    time.Duration
	probeTargets     int
	pathInterval     time.Duration
	syncOnJoin       bool
	lsRetransmit     int
	movedSpacing     time.Duration
	rttMinChange     time.Duration
	memberRetransmit int
	logWarnings      bool
	compress         bool
	swimTimeout      time.Duration
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sim:", err)
		os.Exit(1)
	}
}

func run() error {
	var o options
	var ns, base string
	var seconds float64
	flag.StringVar(&ns, "n", "50,100,200", "comma-separated peer counts, each a full run (mesh, probers, link state, paths)")
	flag.IntVar(&o.membershipOnlyN, "membership-only-n", 0, "also run the mesh alone (no probers, link state or paths) at this N; 0: no")
	flag.Float64Var(&seconds, "seconds", 30, "idle measurement window after convergence, seconds")
	flag.DurationVar(&o.settle, "settle", 5*time.Second, "wait after convergence before the window opens (join gossip dies down)")
	flag.DurationVar(&o.drainMax, "drain-max", 3*time.Minute, "after -settle, wait at most this long for the join's alive messages to stop being retransmitted (0: do not wait); see waitDrained")
	flag.DurationVar(&o.lsDrainMax, "ls-drain-max", 3*time.Minute, "after the alive drain, wait at most this long for every peer's link-state queue to hold at most -ls-drain-below broadcasts (0: do not wait); see waitLinkStateDrained")
	flag.IntVar(&o.lsDrainBelow, "ls-drain-below", 5, "the link-state queue length (largest over peers) at which the join's link-state backlog counts as drained")
	flag.IntVar(&o.publishProbes, "publish-probes", 3, "full runs: after the window, this many peers in turn publish one of their links as down; the time until every peer's table holds that publication is reported (0: none)")
	flag.DurationVar(&o.publishTimeout, "publish-timeout", 30*time.Second, "a publish probe that has not reached every peer after this counts as not reaching all")
	flag.DurationVar(&o.convergeTimeout, "converge-timeout", 3*time.Minute, "give up waiting for all-see-all after this (then measure anyway)")
	// 10 peers a second: the real-process lab starts 100 peers in 12-24 s. At
	// 100 a second (the old 25 per 250 ms) the one process starves: goroutines
	// waited up to 7.5 s for a CPU (p99 0.8 s) at N=200, memberlist declared
	// live peers dead, and the mesh never converged.
	flag.IntVar(&o.batch, "batch", 5, "peers started per batch")
	flag.DurationVar(&o.batchPause, "batch-pause", 500*time.Millisecond, "pause between batches")
	flag.StringVar(&base, "addr-base", "127.1.0.0", "peers get 127.B.x.y in this address's /16 (must be in 127.0.0.0/8)")
	flag.IntVar(&o.meshPort, "mesh-port", 7946, "gossip port (tcp+udp) on every peer address")
	flag.IntVar(&o.probePort, "probe-port", 7947, "underlay probe port (udp)")
	flag.IntVar(&o.linkProbePort, "link-probe-port", 7948, "link probe port (udp), 0: no link prober (weft peer's default has one)")
	flag.DurationVar(&o.probeInterval, "probe-interval", time.Second, "probe interval per target (weft peer's --probe-interval)")
	flag.DurationVar(&o.pathInterval, "path-interval", time.Second, "path recompute period per peer (the router's datapathTick)")
	flag.BoolVar(&o.syncOnJoin, "sync-on-join", false, "full runs: every peer starts a full push/pull with each joiner (the router did before it synced only when DNS refused records); never in the membership-only run")
	flag.IntVar(&o.probeTargets, "probe-targets", 16, "peers each peer measures directly (weft peer's --probe-targets)")
	flag.IntVar(&o.lsRetransmit, "ls-retransmit-mult", 0, "link-state retransmit multiplier per peer (mesh.Config.LinkStateRetransmitMult); 0: the mesh default")
	flag.DurationVar(&o.movedSpacing, "ls-moved-spacing", 400*time.Millisecond, "moved link figures wait max(20s, N × this) (router/paths.go linkStateMovedSpacing); 0: every 20 s whatever N")
	flag.DurationVar(&o.rttMinChange, "ls-rtt-min-change", time.Millisecond, "an RTT or jitter moving by less is not republished (router/paths.go linkStateMinChange)")
	flag.IntVar(&o.memberRetransmit, "membership-retransmit-mult", 0, "memberlist's own retransmit multiplier for alive/suspect/dead (mesh.Config.MembershipRetransmitMult); 0: the mesh default")
	// 900 ms, not weft's 500 ms: N peers share two cores here, and a peer whose
	// packet goroutine waits half a second for a CPU is not a lost packet. A
	// real peer has its own CPU. -swim-probe-timeout 500ms measures weft's default.
	flag.DurationVar(&o.swimTimeout, "swim-probe-timeout", 900*time.Millisecond, "memberlist's probe timeout (mesh.Config.ProbeTimeout; weft peer's is 500ms), below the 1 s probe interval")
	flag.BoolVar(&o.compress, "compress", false, "memberlist compression on (mesh.Config.Compress; weft peer's default is off)")
	flag.BoolVar(&o.logWarnings, "log-warnings", false, "print every peer's mesh warnings and errors (memberlist's too) to stderr")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	pprofAddr := flag.String("pprof", "", "serve net/http/pprof on this loopback address (e.g. 127.0.0.1:6061) to inspect a run")
	flag.Parse()

	for _, f := range strings.Split(ns, ",") {
		if strings.TrimSpace(ns) == "" {
			break // -n "": only the membership-only run
		}
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 4 || n > 20000 {
			return fmt.Errorf("-n: %q is not a peer count in 4..20000", f)
		}
		o.ns = append(o.ns, n)
	}
	if o.membershipOnlyN != 0 && (o.membershipOnlyN < 4 || o.membershipOnlyN > 20000) {
		return fmt.Errorf("-membership-only-n %d out of range 4..20000", o.membershipOnlyN)
	}
	if math.IsNaN(seconds) || seconds <= 0 || seconds > 3600 {
		return fmt.Errorf("-seconds %v out of range (0, 3600]", seconds)
	}
	o.window = time.Duration(seconds * float64(time.Second))
	if o.lsDrainBelow < 0 || o.publishProbes < 0 {
		return fmt.Errorf("-ls-drain-below and -publish-probes must not be negative")
	}
	if o.batch < 1 {
		return fmt.Errorf("-batch %d must be at least 1", o.batch)
	}
	if o.swimTimeout < 0 || o.swimTimeout >= time.Second {
		return fmt.Errorf("-swim-probe-timeout %v must be below the 1s SWIM probe interval", o.swimTimeout)
	}
	if o.pathInterval <= 0 || o.probeInterval < 50*time.Millisecond {
		return fmt.Errorf("-path-interval must be positive and -probe-interval at least 50ms")
	}
	var err error
	if o.base, err = netip.ParseAddr(base); err != nil {
		return fmt.Errorf("-addr-base: %w", err)
	}
	if _, err := nodeAddr(o.base, 0); err != nil {
		return fmt.Errorf("-addr-base: %w", err)
	}
	raiseFileLimit()
	if *pprofAddr != "" {
		a, err := netip.ParseAddrPort(*pprofAddr)
		if err != nil || !a.Addr().IsLoopback() {
			return fmt.Errorf("-pprof %q: want a loopback address:port", *pprofAddr)
		}
		ln, err := net.Listen("tcp", a.String())
		if err != nil {
			return fmt.Errorf("-pprof: %w", err)
		}
		defer ln.Close()
		// Lock waits are what starve a peer's packet loop without using CPU:
		// record them for /debug/pprof/mutex and /debug/pprof/block.
		runtime.SetMutexProfileFraction(10)
		runtime.SetBlockProfileRate(int(time.Millisecond))
		go http.Serve(ln, nil) // net/http/pprof registers on the default mux
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	fmt.Printf("weft in-process scale simulation: GOMAXPROCS=%d, %d CPUs, gossip unencrypted, probe interval %v, link prober %v, path interval %v, sync on join %v, window %v, start %d peers per %v, SWIM probe timeout %v\n",
		runtime.GOMAXPROCS(0), runtime.NumCPU(), o.probeInterval, o.linkProbePort != 0, o.pathInterval, o.syncOnJoin, o.window, o.batch, o.batchPause, o.swimTimeout)
	var results []*result
	for _, n := range o.ns {
		r, err := simulate(ctx, o, n, false)
		if err != nil {
			return err
		}
		results = append(results, r)
	}
	var mo *result
	if o.membershipOnlyN > 0 {
		if mo, err = simulate(ctx, o, o.membershipOnlyN, true); err != nil {
			return err
		}
	}
	if len(results) > 0 {
		summary(os.Stdout, results, mo)
	}
	return nil
}

// raiseFileLimit lifts the soft open-file limit to the hard one: each peer
// holds 4 sockets plus its push/pull connections.
func raiseFileLimit() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

// rate is one kind's traffic per peer and second.
type rate struct{ bytes, msgs float64 }

type result struct {
	n              int
	membershipOnly bool

	converged          bool
	seeAllSinceLast    time.Duration // from the last peer's start
	seeAllSinceFirst   time.Duration
	minAlive           int // at the deadline, when not converged
	joinBytesPerPeer   float64
	window             time.Duration
	traffic            map[string]rate
	totalBytes         float64 // per peer per second, all kinds
	gossipBytes        float64 // memberlist's part
	udpPackets         float64 // gossip datagrams per peer per second
	cpuPct             float64 // per peer, % of one core
	heapPerPeer        float64 // bytes
	pathRuns           int
	pathInterval       time.Duration // the rate the router wants
	pathRunsPerPeerSec float64
	pathMedian         time.Duration
	pathP99            time.Duration
	switchesPerPeerMin float64 // path switches (Choice.Switch) per peer per minute in the window
	minWithPath        int
	maxRelayed         int
	loadBefore         string
	loadAfter          string
	// Mesh counters (events by type, suppressed notes, join attempts):
	// per peer over the join phase, and per peer per second in the window.
	joinCPUCores float64 // process CPU from the first start to all-see-all, in cores
	// Run-queue waits of goroutines (p50, p99, p99.99) and how many waited
	// 100 ms or more: the one process's own starvation (see schedHist).
	joinSched, windowSched         []time.Duration
	joinSchedOver, windowSchedOver uint64
	drained                        time.Duration // how long the join's alive retransmissions took to die down after -settle
	lsDrained                      time.Duration // then how long until every link-state queue held at most -ls-drain-below
	lsQueuedMax                    int           // the largest link-state queue when the window opened
	lsQueuedMean                   float64
	pubToHalf, pubToAll            []time.Duration // per publish probe; a timed-out probe is missing from pubToAll
	pubTimedOut                    int
	publishTimeout                 time.Duration
	joinCounters                   map[string]float64
	windowCounters                 map[string]float64
}

// simulate runs one N: start, converge, settle, measure, close.
func simulate(ctx context.Context, o options, n int, membershipOnly bool) (*result, error) {
	r := &result{n: n, membershipOnly: membershipOnly, window: o.window, publishTimeout: o.publishTimeout, pathInterval: o.pathInterval, traffic: map[string]rate{}}
	label := "full"
	if membershipOnly {
		label = "membership only"
	}
	fmt.Fprintf(os.Stderr, "sim: N=%d (%s): starting peers in batches of %d\n", n, label, o.batch)
	slot := make(chan struct{}, 1)
	paths := &durations{}
	switches := &atomic.Int64{}
	counters := make([]*counter, n)
	nodes := make([]*node, 0, n)
	defer func() {
		// Close in parallel, bounded: memberlist's Shutdown is quick, a join in
		// flight may take its TCP timeout (10 s).
		done := make(chan struct{})
		go func() {
			var wg sync.WaitGroup
			for _, nd := range nodes {
				wg.Add(1)
				go func() { defer wg.Done(); nd.close() }()
			}
			wg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			name := filepath.Join(os.TempDir(), fmt.Sprintf("weft-sim-goroutines-%d.txt", os.Getpid()))
			if f, err := os.Create(name); err == nil {
				pprof.Lookup("goroutine").WriteTo(f, 2)
				f.Close()
			}
			fmt.Fprintf(os.Stderr, "sim: peers did not close within 60s (goroutines in %s); exiting\n", name)
			os.Exit(1)
		}
	}()

	var seeds []string
	for i := range min(3, n) {
		a, _ := nodeAddr(o.base, i)
		seeds = append(seeds, netip.AddrPortFrom(a, uint16(o.meshPort)).String())
	}
	first := time.Now()
	cpuFirst := processCPU()
	schedFirst := readSched()
	var last time.Time
	for i := range n {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		a, err := nodeAddr(o.base, i)
		if err != nil {
			return nil, err
		}
		counters[i] = newCounter()
		nd, err := startNode(ctx, nodeConfig{
			Name: fmt.Sprintf("sim-%04d", i), Addr: a,
			MeshPort: o.meshPort, ProbePort: o.probePort, LinkProbePort: o.linkProbePort,
			Seeds: seeds, MembershipOnly: membershipOnly, SyncOnJoin: o.syncOnJoin && !membershipOnly,
			ProbeInterval: o.probeInterval, ProbeTargets: o.probeTargets, PathInterval: o.pathInterval,
			LinkStateRetransmitMult: o.lsRetransmit, MovedSpacing: o.movedSpacing, RTTMinChange: o.rttMinChange, MembershipRetransmitMult: o.memberRetransmit, LogWarnings: o.logWarnings, Compress: o.compress, SWIMProbeTimeout: o.swimTimeout,
			PathSlot: slot, Paths: paths, Switches: switches, Traffic: counters[i],
		})
		if err != nil {
			return nil, fmt.Errorf("peer %d on %s: %w", i, a, err)
		}
		nodes = append(nodes, nd)
		last = time.Now()
		if (i+1)%o.batch == 0 && i+1 < n {
			select {
			case <-time.After(o.batchPause):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}

	converged, minAlive, err := waitAllSeeAll(ctx, nodes, o.convergeTimeout)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	r.converged, r.minAlive = converged, minAlive
	r.seeAllSinceLast, r.seeAllSinceFirst = now.Sub(last), now.Sub(first)
	joinTotal := 0.0
	for _, c := range counters {
		for _, k := range c.snapshot() {
			joinTotal += k.bytes
		}
	}
	r.joinBytesPerPeer = joinTotal / float64(n)
	r.joinCPUCores = (processCPU() - cpuFirst).Seconds() / now.Sub(first).Seconds()
	r.joinSched, r.joinSchedOver = readSched().quantilesSince(schedFirst, 0.1, 0.5, 0.99, 0.9999)
	r.joinCounters = map[string]float64{}
	for k, v := range meshCounters(nodes) {
		r.joinCounters[k] = v / float64(n)
	}
	fmt.Fprintf(os.Stderr, "sim: N=%d: all see all: %v (%v after the last start); settling %v, then measuring %v\n",
		n, converged, r.seeAllSinceLast.Round(time.Millisecond), o.settle, o.window)

	select {
	case <-time.After(o.settle):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if r.drained, err = waitDrained(ctx, n, counters, o.drainMax); err != nil {
		return nil, err
	}
	if !membershipOnly {
		if r.lsDrained, err = waitLinkStateDrained(ctx, nodes, o.lsDrainBelow, o.lsDrainMax); err != nil {
			return nil, err
		}
		r.lsQueuedMax, r.lsQueuedMean = linkStateQueued(nodes)
		fmt.Fprintf(os.Stderr, "sim: N=%d: link-state queues drained to max %d (mean %.1f) in %v\n", n, r.lsQueuedMax, r.lsQueuedMean, r.lsDrained.Round(time.Second))
	}
	r.loadBefore = loadAverage()
	before := sumCounters(counters)
	mc0 := meshCounters(nodes)
	cpu0 := processCPU()
	sched0 := readSched()
	paths.take()
	switches0 := switches.Load()
	start := time.Now()
	select {
	case <-time.After(o.window):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	elapsed := time.Since(start)
	cpu := processCPU() - cpu0
	r.windowSched, r.windowSchedOver = readSched().quantilesSince(sched0, 0.1, 0.5, 0.99, 0.9999)
	after := sumCounters(counters)
	mc1 := meshCounters(nodes)
	runs := paths.take()
	r.switchesPerPeerMin = float64(switches.Load()-switches0) / float64(n) / elapsed.Minutes()
	r.loadAfter = loadAverage()
	if !membershipOnly {
		// After the window's figures are taken: the probes' publications are not idle traffic.
		for i := range o.publishProbes {
			half, all, ok, err := publishProbe(ctx, nodes, (i*n)/max(1, o.publishProbes), o.publishTimeout)
			if err != nil {
				return nil, err
			}
			r.pubToHalf = append(r.pubToHalf, half)
			if ok {
				r.pubToAll = append(r.pubToAll, all)
			} else {
				r.pubTimedOut++
			}
		}
	}

	perPeerSec := float64(n) * elapsed.Seconds()
	r.windowCounters = map[string]float64{}
	for k, v := range mc1 {
		r.windowCounters[k] = (v - mc0[k]) / perPeerSec
	}
	for kind, a := range after {
		b := before[kind]
		rt := rate{bytes: (a.bytes - b.bytes) / perPeerSec, msgs: float64(a.msgs-b.msgs) / perPeerSec}
		if kind == kindUDPPackets {
			r.udpPackets = rt.msgs
			continue
		}
		r.traffic[kind] = rt
		r.totalBytes += rt.bytes
		if kind != kindProbeUnderlay && kind != kindProbeLink {
			r.gossipBytes += rt.bytes
		}
	}
	r.cpuPct = 100 * cpu.Seconds() / elapsed.Seconds() / float64(n)
	r.pathRuns = len(runs)
	r.pathRunsPerPeerSec = float64(len(runs)) / perPeerSec
	r.pathMedian, r.pathP99 = quantile(runs, 0.5), quantile(runs, 0.99)
	if !membershipOnly {
		r.minWithPath = n
		for _, nd := range nodes {
			p, relayed := nd.dp.withPath()
			r.minWithPath = min(r.minWithPath, p)
			r.maxRelayed = max(r.maxRelayed, relayed)
		}
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	r.heapPerPeer = float64(ms.HeapInuse) / float64(n)
	r.print(os.Stdout) // before the peers close, should closing hang
	return r, nil
}

// waitDrained waits until the peers send fewer than one alive message per
// peer per second, or max. Every peer retransmits every alive message
// RetransmitMult × ⌈log₁₀(N+1)⌉ times (18 at N=200) within memberlist's gossip
// budget (3 packets per 200 ms), so a mass start of N peers keeps every
// peer's gossip full for about N × 18 × 160 B / 21 kB/s ≈ 30 s at N=200 after
// all see all; a window opened inside that measures the join, not idle.
func waitDrained(ctx context.Context, n int, counters []*counter, max time.Duration) (time.Duration, error) {
	start := time.Now()
	const step = 2 * time.Second
	prev := sumCounters(counters)[kindSWIMAlive].msgs
	for time.Since(start) < max {
		select {
		case <-time.After(step):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		cur := sumCounters(counters)[kindSWIMAlive].msgs
		if float64(cur-prev)/float64(n)/step.Seconds() < 1 {
			return time.Since(start), nil
		}
		prev = cur
	}
	return time.Since(start), nil
}

// waitLinkStateDrained waits until no peer holds more than below link-state
// broadcasts in its queue, or max. At the join every peer's first
// publication (all its links) reaches every peer and is relayed
// LinkStateRetransmitMult × ⌈log₁₀(N+1)⌉ times, and memberlist fills its
// gossip budget while anything is queued; a window opened before the queues
// empty measures that backlog, not steady state.
func waitLinkStateDrained(ctx context.Context, nodes []*node, below int, max time.Duration) (time.Duration, error) {
	start := time.Now()
	const step = time.Second
	for time.Since(start) < max {
		if most, _ := linkStateQueued(nodes); most <= below {
			return time.Since(start), nil
		}
		select {
		case <-time.After(step):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return time.Since(start), nil
}

// linkStateQueued is the largest and the mean link-state queue over the peers.
func linkStateQueued(nodes []*node) (most int, mean float64) {
	sum := 0
	for _, nd := range nodes {
		q := nd.mesh.LinkStateQueued()
		most = max(most, q)
		sum += q
	}
	return most, float64(sum) / float64(max(1, len(nodes)))
}

// publishProbe has peer i publish one of its live links as down, as its path
// loop does when a link fails (an up/down flip goes out at once), and times
// until half and then every other peer has merged that link as down. The
// link is held down (holdDown) until every peer has it or the timeout, as a
// failure that lasts: without the hold its path loop published it up again
// within a path interval, and a peer that got the up first never relayed the
// older down, so the probe timed a race (at N=100, 2 of 3 probes "reached"
// fewer than half the peers in 30 s, all of which held the newer up). ok is
// false when not every peer had it within timeout; all is then the timeout.
func publishProbe(ctx context.Context, nodes []*node, i int, timeout time.Duration) (half, all time.Duration, ok bool, err error) {
	// Peer i, or the next one with a link up (a peer may have none published yet).
	var nd *node
	var links map[string]mesh.LinkMetrics
	var victim string
	for k := range nodes {
		nd = nodes[(i+k)%len(nodes)]
		links = nd.table.Graph()[nd.cfg.Name]
		for _, name := range slices.Sorted(maps.Keys(links)) {
			if links[name].Up {
				victim = name
				break
			}
		}
		if victim != "" {
			break
		}
	}
	if victim == "" {
		return 0, 0, false, fmt.Errorf("publish probe: no peer has a live link up to take down")
	}
	m := links[victim]
	m.Up = false
	links[victim] = m
	start := time.Now()
	nd.holdDown(victim, start.Add(timeout))
	defer nd.holdDown(victim, time.Time{})
	msgs, _ := nd.table.PublishLinks(nd.cfg.Name, links)
	for _, msg := range msgs {
		nd.mesh.Broadcast(mesh.LinkStateChannelName, msg)
	}
	if len(msgs) == 0 {
		return 0, 0, false, fmt.Errorf("publish probe: %s published nothing for %s going down", nd.cfg.Name, victim)
	}
	pending := map[*node]bool{}
	for _, o := range nodes {
		if o != nd {
			pending[o] = true
		}
	}
	others := len(pending)
	for len(pending) > 0 {
		if time.Since(start) > timeout {
			if half == 0 {
				half = timeout
			}
			return half, timeout, false, nil
		}
		for o := range pending {
			if o.sawDown(nd.cfg.Name, victim, start) {
				delete(pending, o)
			}
		}
		if half == 0 && 2*len(pending) <= others {
			half = time.Since(start)
		}
		if len(pending) == 0 {
			break
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			return 0, 0, false, ctx.Err()
		}
	}
	return half, time.Since(start), true, nil
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

// waitAllSeeAll polls until every peer sees all n alive, or the timeout. To
// keep the poll cheap (Peers() is O(N), all peers O(N²)) only peers not yet
// seen complete are checked, then one full pass confirms. It returns the
// smallest alive count seen in the last pass.
func waitAllSeeAll(ctx context.Context, nodes []*node, timeout time.Duration) (bool, int, error) {
	n := len(nodes)
	deadline := time.Now().Add(timeout)
	pending := slices.Clone(nodes)
	minAlive := 0
	start, lastReport := time.Now(), time.Now()
	for {
		passStart := time.Now()
		var still []*node
		var worst *node
		minAlive = n
		for _, nd := range pending {
			if ctx.Err() != nil {
				return false, minAlive, ctx.Err()
			}
			if c := nd.aliveSeen(); c != n {
				still = append(still, nd)
				if c < minAlive || worst == nil {
					minAlive, worst = c, nd
				}
			}
		}
		if len(still) == 0 {
			// Confirm on everyone at once.
			for _, nd := range nodes {
				if c := nd.aliveSeen(); c != n {
					still = append(still, nd)
					minAlive = min(minAlive, c)
				}
			}
			if len(still) == 0 {
				return true, n, nil
			}
		}
		pending = still
		if time.Since(lastReport) >= 5*time.Second {
			lastReport = time.Now()
			fmt.Fprintf(os.Stderr, "sim: N=%d: %v: %d peers do not see all yet; the worst sees %d alive; load average %s\n",
				n, time.Since(start).Round(time.Second), len(still), minAlive, loadAverage())
			if worst != nil {
				// Which peers it misses, and in what state: tells a stuck suspicion
				// from a peer it never heard of.
				states := map[string]string{}
				for _, p := range worst.mesh.Peers() {
					states[p.Name] = p.State.String()
				}
				for _, nd := range nodes {
					if st := states[nd.cfg.Name]; st != mesh.StateAlive.String() {
						fmt.Fprintf(os.Stderr, "sim:   worst %s: sees %s as %q\n", worst.cfg.Name, nd.cfg.Name, st)
					}
				}
				for _, t := range worst.mesh.Targets() {
					fmt.Fprintf(os.Stderr, "sim:   worst %s: seed %s: last join %v ago: %v\n",
						worst.cfg.Name, t.Addr, time.Since(t.LastAttempt).Round(time.Second), t.LastError)
				}
			}
		}
		if time.Now().After(deadline) {
			return false, minAlive, nil
		}
		// A pass costs O(N) per pending peer; waiting 4 passes' time between
		// passes keeps the poll below a fifth of the CPU at large N.
		select {
		case <-time.After(max(50*time.Millisecond, 4*time.Since(passStart))):
		case <-ctx.Done():
			return false, minAlive, ctx.Err()
		}
	}
}

func sumCounters(cs []*counter) map[string]kindCount {
	out := map[string]kindCount{}
	for _, c := range cs {
		for k, v := range c.snapshot() {
			s := out[k]
			s.bytes += v.bytes
			s.msgs += v.msgs
			out[k] = s
		}
	}
	return out
}

// processCPU is this process's user+system CPU time.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func (r *result) print(w *os.File) {
	mode := "full: mesh + probers + link state + paths"
	if r.membershipOnly {
		mode = "membership only: mesh alone"
	}
	fmt.Fprintf(w, "\n== N=%d (%s)\n", r.n, mode)
	if r.converged {
		fmt.Fprintf(w, "all see all:        %v after the last peer started (%v after the first)\n",
			r.seeAllSinceLast.Round(time.Millisecond), r.seeAllSinceFirst.Round(time.Millisecond))
	} else {
		fmt.Fprintf(w, "all see all:        NOT within the deadline (%v after the last start); the worst peer saw %d of %d alive\n",
			r.seeAllSinceLast.Round(time.Millisecond), r.minAlive, r.n)
	}
	fmt.Fprintf(w, "join phase:         %.0f kB sent per peer from the first start to all-see-all; the process used %.2f of %d cores\n", r.joinBytesPerPeer/1000, r.joinCPUCores, runtime.NumCPU())
	fmt.Fprintf(w, "run-queue waits:    join phase p50 %v p99 %v p99.99 %v, %d waits >= 100 ms; idle window p50 %v p99 %v p99.99 %v, %d >= 100 ms\n",
		r.joinSched[0], r.joinSched[1], r.joinSched[2], r.joinSchedOver, r.windowSched[0], r.windowSched[1], r.windowSched[2], r.windowSchedOver)
	fmt.Fprintf(w, "join backlog:       alive retransmissions died down %v after the settle\n", r.drained.Round(time.Second))
	if !r.membershipOnly {
		fmt.Fprintf(w, "link-state backlog: queues at most %d (largest over peers; mean %.1f) %v after the alive drain\n", r.lsQueuedMax, r.lsQueuedMean, r.lsDrained.Round(time.Second))
	}
	fmt.Fprintf(w, "idle window:        %v, load average %s -> %s\n", r.window, r.loadBefore, r.loadAfter)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "kind\tbytes/s/peer\tmsgs/s/peer\t")
	kinds := make([]string, 0, len(r.traffic))
	for k := range r.traffic {
		kinds = append(kinds, k)
	}
	sort.Slice(kinds, func(i, j int) bool { return r.traffic[kinds[i]].bytes > r.traffic[kinds[j]].bytes })
	for _, k := range kinds {
		fmt.Fprintf(tw, "%s\t%.0f\t%.2f\t\n", k, r.traffic[k].bytes, r.traffic[k].msgs)
	}
	fmt.Fprintf(tw, "total\t%.0f\t\t\n", r.totalBytes)
	fmt.Fprintf(tw, "gossip datagrams\t\t%.2f\t\n", r.udpPackets)
	tw.Flush()
	printCounters(w, "mesh counters per peer, join phase (start to all-see-all):", r.joinCounters, "%.1f")
	printCounters(w, "mesh counters per peer per second, idle window:", r.windowCounters, "%.3f")
	fmt.Fprintf(w, "CPU per peer:       %.3f %% of one core (the process: %.2f of %d cores)\n", r.cpuPct, r.cpuPct*float64(r.n)/100, runtime.NumCPU())
	fmt.Fprintf(w, "heap per peer:      %.0f kB (HeapInuse after GC / N)\n", r.heapPerPeer/1000)
	if !r.membershipOnly {
		fmt.Fprintf(w, "path compute:       median %v, p99 %v per run; %d runs in the window = %.2f runs/s/peer (the router wants %.1f)\n",
			r.pathMedian.Round(time.Microsecond), r.pathP99.Round(time.Microsecond), r.pathRuns, r.pathRunsPerPeerSec, 1/r.pathInterval.Seconds())
		fmt.Fprintf(w, "destinations with a path: min over peers %d of %d; most relayed at one peer %d\n", r.minWithPath, r.n-1, r.maxRelayed)
		fmt.Fprintf(w, "path switches:      %.2f per peer per minute in the window\n", r.switchesPerPeerMin)
		if len(r.pubToHalf) > 0 {
			fmt.Fprintf(w, "publication reach:  a link going down reached half the peers in %v, all in %v (each probe; median to all %v); %d of %d probes did not reach all within %v\n",
				roundAll(r.pubToHalf), roundAll(r.pubToAll), quantile(r.pubToAll, 0.5).Round(time.Millisecond), r.pubTimedOut, len(r.pubToHalf), r.publishTimeout)
		}
	}
	targets(w, r)
}

// targets prints the simulation targets for one run.
func targets(w *os.File, r *result) {
	if r.n == 200 && !r.membershipOnly {
		fmt.Fprintf(w, "target N=200 all see all <= 3 s: %s\n", metTag(r.converged && r.seeAllSinceLast <= 3*time.Second))
	}
	fmt.Fprintf(w, "target traffic <= 10 kB/s/peer: %s (%.1f kB/s)\n", metTag(r.totalBytes <= 10000), r.totalBytes/1000)
}

// summary prints the runs side by side and each cost's exponent in N.
func summary(w *os.File, rs []*result, mo *result) {
	fmt.Fprintln(w, "\n== summary")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "N\tsee-all s\tls drain s\tbytes/s/peer\tgossip B/s/peer\tlink state B/s/peer\tprobe B/s/peer\tdgrams/s/peer\tCPU %/peer\theap kB/peer\tpath med ms\tpath p99 ms\twith path\tpub to all ms (median)\t")
	row := func(r *result, label string) {
		seeAll := "-"
		if r.converged {
			seeAll = fmt.Sprintf("%.2f", r.seeAllSinceLast.Seconds())
		}
		probe := r.traffic[kindProbeUnderlay].bytes + r.traffic[kindProbeLink].bytes
		withPath := "-"
		if !r.membershipOnly {
			withPath = fmt.Sprintf("%d/%d", r.minWithPath, r.n-1)
		}
		lsDrain, pub := "-", "-"
		if !r.membershipOnly {
			lsDrain = fmt.Sprintf("%.0f", r.lsDrained.Seconds())
		}
		if len(r.pubToAll) > 0 {
			pub = fmt.Sprintf("%.0f", ms(quantile(r.pubToAll, 0.5)))
		}
		if r.pubTimedOut > 0 {
			pub += fmt.Sprintf(" (%d timed out)", r.pubTimedOut)
		}
		fmt.Fprintf(tw, "%d%s\t%s\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%.2f\t%.3f\t%.0f\t%.2f\t%.2f\t%s\t%s\t\n", r.n, label, seeAll, lsDrain, r.totalBytes,
			r.gossipBytes, r.traffic["ch:"+mesh.LinkStateChannelName].bytes, probe, r.udpPackets+r.traffic[kindProbeUnderlay].msgs+r.traffic[kindProbeLink].msgs,
			r.cpuPct, r.heapPerPeer/1000, ms(r.pathMedian), ms(r.pathP99), withPath, pub)
	}
	for _, r := range rs {
		row(r, "")
	}
	if mo != nil {
		row(mo, " (membership only)")
	}
	tw.Flush()
	// A run that did not converge was saturated (its peers flapped or never
	// joined): its per-peer rates are throttled, not scaled, and would bend
	// the fit, so exponents use converged runs only.
	var conv []*result
	for _, r := range rs {
		if r.converged {
			conv = append(conv, r)
		}
	}
	if len(conv) < 2 {
		fmt.Fprintf(w, "exponents: n/a, %d of %d runs converged (at least two needed; a run that did not converge is saturated, its rates do not scale)\n", len(conv), len(rs))
		fmt.Fprintln(w, "target per-peer traffic flat or sub-linear in N: not measurable in this run")
		return
	}
	rs = conv
	x := make([]float64, len(rs))
	for i, r := range rs {
		x[i] = float64(r.n)
	}
	metric := func(f func(r *result) float64) []float64 {
		y := make([]float64, len(rs))
		for i, r := range rs {
			y[i] = f(r)
		}
		return y
	}
	fmt.Fprintf(w, "\nexponents in N over the %d converged runs (least-squares slope of log(cost) over log(N)):\n", len(rs))
	type cost struct {
		name string
		f    func(r *result) float64
	}
	costs := []cost{
		{"all-see-all time", func(r *result) float64 {
			if !r.converged {
				return math.NaN()
			}
			return r.seeAllSinceLast.Seconds()
		}},
		{"bytes/s/peer", func(r *result) float64 { return r.totalBytes }},
		{"gossip bytes/s/peer", func(r *result) float64 { return r.gossipBytes }},
		{"datagrams/s/peer", func(r *result) float64 {
			return r.udpPackets + r.traffic[kindProbeUnderlay].msgs + r.traffic[kindProbeLink].msgs
		}},
		{"CPU/peer", func(r *result) float64 { return r.cpuPct }},
		{"heap/peer", func(r *result) float64 { return r.heapPerPeer }},
		{"path compute median", func(r *result) float64 { return r.pathMedian.Seconds() }},
		{"path compute p99", func(r *result) float64 { return r.pathP99.Seconds() }},
	}
	kinds := map[string]bool{}
	for _, r := range rs {
		for k := range r.traffic {
			kinds[k] = true
		}
	}
	for _, k := range slices.Sorted(maps.Keys(kinds)) {
		costs = append(costs, cost{"  " + k + " bytes/s/peer", func(r *result) float64 { return r.traffic[k].bytes }})
	}
	tw = tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	var trafficExp float64
	for _, c := range costs {
		k := slope(x, metric(c.f))
		if c.name == "bytes/s/peer" {
			trafficExp = k
		}
		fmt.Fprintf(tw, "%s\t~ N^%.2f\t(%s)\n", c.name, k, exponentLabel(k))
	}
	tw.Flush()
	fmt.Fprintf(w, "target per-peer traffic flat or sub-linear in N (exponent < 1): %s (N^%.2f)\n",
		metTag(!math.IsNaN(trafficExp) && trafficExp < 1), trafficExp)
}

// printCounters prints the non-zero counters, sorted by name.
func printCounters(w *os.File, title string, c map[string]float64, format string) {
	fmt.Fprintln(w, title)
	for _, k := range slices.Sorted(maps.Keys(c)) {
		if c[k] != 0 {
			fmt.Fprintf(w, "  %-62s "+format+"\n", k, c[k])
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
