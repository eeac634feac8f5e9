// Command relay measures how long traffic stops when a direct link between two weft hosts
// breaks and the mesh moves it onto a relay through a third host (issue 7):
//
//	go build -o bin/ ./cmd/... && go run ./chaos-tests/bench/relay -bin bin [-n 7] [-break link|tunnel]
//
// It builds a 3-host lab (A, B, C; real `weft peer` processes started with --no-direct
// --probe-interval 200ms --raft-voters 3, B and C seeded with A), waits until every peer
// sees the other two alive and A has a measured direct path to C, and attaches one
// container on A and one on C. A UDP echo server runs in C's container; a prober in A's
// container sends it a 16-byte datagram every -interval (10 ms) and records every echo.
//
// Each trial cuts A↔C with nftables drops on both ends (B still reaches both) and measures,
// from the moment both ends' drop rules are in place. With -break link (the default) every
// packet between A and C is dropped (lab.Partition); with -break tunnel only VXLAN's UDP
// port (lab.BreakTunnel), so gossip and underlay probes still work and only the probes
// through the tunnel can notice:
//
//	A→C route      when A's peer chose the path [B C]: the "since" of the route in
//	               `weft status routes --json` on A, which is the reconcile tick that made
//	               the choice and applied it to the datapath (exact, not limited by polling)
//	(seen)         when polling `weft status routes --json` on A every 100 ms first showed
//	               [B C] (an upper bound; includes the CLI's own latency)
//	C→A route      the same for C's path back to A, [B A]: echoes need both directions
//	first reply    when the first echo of a datagram sent after the cut arrived, i.e. the
//	               first application traffic to make it A → B → C → B → A; any echo after
//	               the cut must have crossed B, since the direct link drops everything
//
// Then it heals the link and waits, untimed, until both peers are back on the direct path
// and echoes flow again, before the next trial. It prints each trial, then the median,
// minimum and maximum of each column, with the probe settings that bound detection: a
// peer probe every 200 ms (±20 % jitter), counted lost after 400 ms without an answer (the
// default: twice the interval), a link down after 3 consecutive lost probes, and paths
// re-chosen every 500 ms.
//
// It exits non-zero only when something fails. Needs root. All traffic stays inside the
// lab's namespaces; Ctrl-C tears the lab down.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
)

// What the peers run with. The probe timeout is the default for this interval (twice it);
// DownAfter and the reconcile interval are the daemon's defaults (mesh.ProberConfig,
// router's reconcileInterval), not flags, so they are restated here for the report only.
const (
	peerProbeInterval = 200 * time.Millisecond
	peerProbeTimeout  = 2 * peerProbeInterval
	peerDownAfter     = 3
	peerReconcile     = 500 * time.Millisecond

	echoPort  = 7007
	vxlanPort = 6784
	routePoll = 100 * time.Millisecond
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// trial is what one cut measured; zero durations were not observed.
type trial struct {
	routeA, seenA, routeC, reply time.Duration
	cutTook                      time.Duration // lab.Partition's own duration
}

func run() (err error) {
	var (
		binDir    = flag.String("bin", "bin", "directory holding the weft and weft-cni binaries")
		n         = flag.Int("n", 7, "number of trials (link cuts)")
		interval  = flag.Duration("interval", 10*time.Millisecond, "time between two application probes")
		prefix    = flag.String("prefix", "wbrel", "lab name prefix")
		breakWhat = flag.String("break", "link", "what each trial breaks between A and C: link (every packet) or tunnel (VXLAN's UDP port only)")
		timeout   = flag.Duration("timeout", 60*time.Second, "longest wait for any one step")
		verbose   = flag.Bool("v", false, "log the lab's steps")
	)
	flag.Parse()
	if *n < 1 || *interval < time.Millisecond || *timeout < time.Second {
		return errors.New("-n must be ≥ 1, -interval ≥ 1ms and -timeout ≥ 1s")
	}
	if *breakWhat != "link" && *breakWhat != "tunnel" {
		return fmt.Errorf("-break %q: want link or tunnel", *breakWhat)
	}
	if os.Geteuid() != 0 {
		return errors.New("the benchmark needs root (network namespaces)")
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var l *lab.Lab
	l, err = lab.New(ctx, lab.Config{Prefix: *prefix, Hosts: 3, BinDir: *binDir, Logger: logger, NoStart: true,
		PeerArgs: func(i int) []string {
			args := []string{"--raft-voters", "3", "--no-direct", "--probe-interval", peerProbeInterval.String()}
			if i > 0 {
				args = append(args, "--peers", l.Host(0).Addr.Addr().String())
			}
			return args
		}})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil && ctx.Err() == nil {
			for _, h := range l.Hosts() {
				fmt.Fprintf(os.Stderr, "--- %s peer log (tail) ---\n%s\n", h.Name, h.LogTail(30))
			}
		}
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("lab close: %w", cerr))
		}
	}()
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	step := func(what string, cond func() error) error {
		sctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		if err := lab.Poll(sctx, 100*time.Millisecond, cond); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}

	fmt.Println("starting 3 peers…")
	if err := l.StartAll(ctx); err != nil {
		return err
	}
	if err := step("waiting for the mesh", func() error { return allAlive(ctx, l.Hosts()) }); err != nil {
		return err
	}
	if err := step("waiting for a measured direct path A → C", pathIs(ctx, a, c.Name, c.Name)); err != nil {
		return err
	}

	var addrs []netip.Addr
	var ctrPaths []string
	for _, h := range []*lab.Host{a, c} {
		ctr, err := h.NewContainer()
		if err != nil {
			return err
		}
		cni, err := h.CNI(lab.CNIOptions{})
		if err != nil {
			return err
		}
		res, err := cni.Add(ctx, ctr.RuntimeConf("eth0"))
		if err != nil {
			return fmt.Errorf("attach %s: %w", ctr.Name, err)
		}
		pfx, err := lab.ResultAddress(res)
		if err != nil {
			return fmt.Errorf("attach %s: %w", ctr.Name, err)
		}
		addrs = append(addrs, pfx.Addr())
		ctrPaths = append(ctrPaths, ctr.NSPath)
	}
	srv, err := newEchoServer(ctrPaths[1], echoPort)
	if err != nil {
		return err
	}
	defer srv.Close()
	dst := netip.AddrPortFrom(addrs[1], echoPort)
	pr, err := newProber(ctrPaths[0], dst, *interval)
	if err != nil {
		return err
	}
	defer pr.Close() // runs before srv.Close and l.Close

	// flowing waits for an echo of a datagram sent after now.
	flowing := func(what string) error {
		since := time.Now()
		return step(what, func() error {
			if _, ok := pr.firstSentAfter(since); !ok {
				return errors.New("no echo yet")
			}
			return nil
		})
	}
	// direct waits until both ends are back on the direct path with the link up.
	direct := func() error {
		if err := step("waiting for A's direct path to C", pathIs(ctx, a, c.Name, c.Name)); err != nil {
			return err
		}
		return step("waiting for C's direct path to A", pathIs(ctx, c, a.Name, a.Name))
	}
	if err := direct(); err != nil {
		return err
	}
	if err := flowing("waiting for echoes A → C on the direct path"); err != nil {
		return err
	}

	fmt.Printf("A=%s B=%s C=%s; echo %s (A's container) → %s (C's container) every %v\n",
		a.Name, b.Name, c.Name, addrs[0], dst, *interval)
	var trials []trial
	for i := range *n {
		if err := direct(); err != nil {
			return fmt.Errorf("trial %d: %w", i+1, err)
		}
		if err := flowing(fmt.Sprintf("trial %d: waiting for echoes before the cut", i+1)); err != nil {
			return err
		}
		pr.forget()
		tr, err := cutOnce(ctx, l, pr, *timeout, *breakWhat)
		if err != nil {
			return fmt.Errorf("trial %d: %w", i+1, err)
		}
		trials = append(trials, tr)
		fmt.Printf("trial %d: first reply via relay after %s, A's route switched after %s\n", i+1, sec(tr.reply), sec(tr.routeA))
		if err := l.Heal(); err != nil {
			return fmt.Errorf("trial %d: heal: %w", i+1, err)
		}
		if err := direct(); err != nil {
			return fmt.Errorf("trial %d after heal: %w", i+1, err)
		}
		if err := flowing(fmt.Sprintf("trial %d: waiting for echoes after the heal", i+1)); err != nil {
			return err
		}
	}
	sent, sendErrs := pr.counts()
	report(trials, *interval, sent, sendErrs, *breakWhat)
	return nil
}

// cutOnce cuts A↔C, waits for the first echo through B and for both peers' relayed
// routes, and returns the times measured from the cut. It leaves the cut in place.
func cutOnce(ctx context.Context, l *lab.Lab, pr *prober, timeout time.Duration, breakWhat string) (trial, error) {
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	var wg sync.WaitGroup
	defer wg.Wait() // after cancel below: the watchers stop before cutOnce returns
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	seenA := watchRoute(wctx, &wg, a, c.Name, []string{b.Name, c.Name})
	seenC := watchRoute(wctx, &wg, c, a.Name, []string{b.Name, a.Name})

	start := time.Now()
	cut := l.Partition
	if breakWhat == "tunnel" {
		cut = func(x, y []*lab.Host) error { return l.BreakTunnel(vxlanPort, x, y) }
	}
	if err := cut([]*lab.Host{a}, []*lab.Host{c}); err != nil {
		return trial{}, fmt.Errorf("cut A↔C: %w", err)
	}
	// Time zero: both ends drop A↔C. A datagram sent from here on cannot take the
	// direct link, so its echo proves the relay works.
	cutAt := time.Now()
	tr := trial{cutTook: cutAt.Sub(start)}

	err := lab.Poll(wctx, 2*time.Millisecond, func() error {
		r, ok := pr.firstSentAfter(cutAt)
		if !ok {
			return errors.New("no echo since the cut")
		}
		tr.reply = r.recv.Sub(cutAt)
		return nil
	})
	if err != nil {
		last, _ := pr.lastBefore(cutAt)
		return tr, fmt.Errorf("first echo through the relay: %w (last echo before the cut: seq %d)", err, last.seq)
	}
	for _, w := range []struct {
		name     string
		ch       <-chan routeSeen
		dec, see *time.Duration
	}{{"A's route to C via B", seenA, &tr.routeA, &tr.seenA}, {"C's route to A via B", seenC, &tr.routeC, nil}} {
		var s routeSeen
		select {
		case s = <-w.ch:
		case <-wctx.Done():
			return tr, fmt.Errorf("%s: %w", w.name, wctx.Err())
		}
		if s.err != nil {
			return tr, fmt.Errorf("%s: %w", w.name, s.err)
		}
		*w.dec = s.seen.Sub(cutAt)
		// The route's "since" is the peer's choice; it lies between the cut and the
		// poll that showed it. Outside that (clock step, path flapped in between) keep
		// the poll's time.
		if !s.since.Before(cutAt) && !s.since.After(s.seen) {
			*w.dec = s.since.Sub(cutAt)
		}
		if w.see != nil {
			*w.see = s.seen.Sub(cutAt)
		}
	}
	return tr, nil
}

// routeSeen is the first poll of `status routes` that showed the wanted path.
type routeSeen struct {
	seen  time.Time // when that poll returned
	since time.Time // the route's "since": when the peer chose it (wall clock)
	err   error     // the context ended first (with the last poll error, if any)
}

// watchRoute polls h's route to dest every routePoll until its path is want, and sends
// the result once on the returned channel (buffered, so the goroutine never blocks). It
// stops when it has sent; wg tracks it.
func watchRoute(ctx context.Context, wg *sync.WaitGroup, h *lab.Host, dest string, want []string) <-chan routeSeen {
	out := make(chan routeSeen, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		var last error
		t := time.NewTicker(routePoll)
		defer t.Stop()
		for {
			r, err := routeTo(ctx, h, dest)
			now := time.Now()
			if err == nil && slices.Equal(r.Path, want) {
				out <- routeSeen{seen: now, since: r.Since}
				return
			}
			if err != nil {
				last = err
			}
			select {
			case <-ctx.Done():
				out <- routeSeen{err: errors.Join(ctx.Err(), last)}
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// routeTo returns h's route to dest from `weft status routes --json` (zero when absent).
func routeTo(ctx context.Context, h *lab.Host, dest string) (router.Route, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var routes []router.Route
	if err := cliJSON(cctx, h, &routes, "status", "routes"); err != nil {
		return router.Route{}, err
	}
	for _, r := range routes {
		if r.Peer == dest {
			return r, nil
		}
	}
	return router.Route{}, nil
}

// pathIs returns a condition for lab.Poll: h's path to dest is want and its direct link
// to dest is up (so a direct path is one that was measured, not a leftover).
func pathIs(ctx context.Context, h *lab.Host, dest string, want ...string) func() error {
	return func() error {
		r, err := routeTo(ctx, h, dest)
		if err != nil {
			return err
		}
		if !slices.Equal(r.Path, want) || !r.Direct.Up {
			return fmt.Errorf("%s → %s: path %v, direct up %v (%s)", h.Name, dest, r.Path, r.Direct.Up, r.Reason)
		}
		return nil
	}
}

// allAlive reports whether every host sees every host (itself included) alive.
func allAlive(ctx context.Context, hosts []*lab.Host) error {
	for _, h := range hosts {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var peers []router.PeerStatus
		err := cliJSON(cctx, h, &peers, "status", "peers")
		cancel()
		if err != nil {
			return err
		}
		alive := 0
		for _, p := range peers {
			if p.State == "alive" {
				alive++
			}
		}
		if alive != len(hosts) {
			return fmt.Errorf("%s sees %d of %d alive", h.Name, alive, len(hosts))
		}
	}
	return nil
}

func cliJSON(ctx context.Context, h *lab.Host, v any, args ...string) error {
	out, err := h.CLI(ctx, append(args, "--json")...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("decode weft %s --json on %s: %w", strings.Join(args, " "), h.Name, err)
	}
	return nil
}

func report(trials []trial, interval time.Duration, sent, sendErrs uint64, breakWhat string) {
	fmt.Println()
	what := "every packet between A and C dropped"
	if breakWhat == "tunnel" {
		what = fmt.Sprintf("only VXLAN (udp %d) between A and C dropped; gossip and underlay probes still pass", vxlanPort)
	}
	fmt.Printf("break: %s\n", what)
	fmt.Println("time from the cut (both ends' nftables drops in place) to:")
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "trial\tA→C route via B\t(seen by poll)\tC→A route via B\tfirst reply via relay\tcut took\t")
	col := func(f func(trial) time.Duration) []time.Duration {
		var out []time.Duration
		for _, t := range trials {
			out = append(out, f(t))
		}
		return out
	}
	cols := [][]time.Duration{
		col(func(t trial) time.Duration { return t.routeA }),
		col(func(t trial) time.Duration { return t.seenA }),
		col(func(t trial) time.Duration { return t.routeC }),
		col(func(t trial) time.Duration { return t.reply }),
		col(func(t trial) time.Duration { return t.cutTook }),
	}
	for i := range trials {
		fmt.Fprintf(w, "%d\t", i+1)
		for _, c := range cols {
			fmt.Fprintf(w, "%s\t", sec(c[i]))
		}
		fmt.Fprintln(w)
	}
	for _, s := range []struct {
		name string
		f    func([]time.Duration) time.Duration
	}{{"median", median}, {"min", slices.Min[[]time.Duration]}, {"max", slices.Max[[]time.Duration]}} {
		fmt.Fprintf(w, "%s\t", s.name)
		for _, c := range cols {
			fmt.Fprintf(w, "%s\t", sec(s.f(c)))
		}
		fmt.Fprintln(w)
	}
	w.Flush()
	fmt.Printf("\nbreak → first reply via relay: median %s (min %s, max %s) over %d trials\n",
		sec(median(cols[3])), sec(slices.Min(cols[3])), sec(slices.Max(cols[3])), len(trials))
	fmt.Printf("break → route switched (A):    median %s (min %s, max %s)\n",
		sec(median(cols[0])), sec(slices.Min(cols[0])), sec(slices.Max(cols[0])))
	detect := peerProbeTimeout + (peerDownAfter-1)*peerProbeInterval
	fmt.Printf("\npeer probes: every %v (±20%% jitter), lost after %v unanswered, link down after %d consecutive lost;\n"+
		"paths re-chosen and applied every %v. Detection alone: the first probe after the cut leaves within one\n"+
		"interval and the link is down %v + (%d-1)×%v = %v later, so ≈ %v–%v after the cut; then up to %v more\n"+
		"until the next path choice. Echoes need both A's and C's choice.\n",
		peerProbeInterval, peerProbeTimeout, peerDownAfter, peerReconcile,
		peerProbeTimeout, peerDownAfter, peerProbeInterval, detect, detect, detect+peerProbeInterval*6/5, peerReconcile)
	fmt.Printf("application probe: 16-byte UDP echo every %v (%d sent, %d refused by the kernel); "+
		"route polls every %v; 'A→C route' is the route's own 'since', '(seen by poll)' when a poll first showed it.\n",
		interval, sent, sendErrs, routePoll)
	fmt.Printf("(%s, 3 hosts, --no-direct: VXLAN over one L2 underlay)\n", time.Now().Format(time.RFC3339))
}

// median of ds (the mean of the middle two for an even count).
func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func sec(d time.Duration) string { return fmt.Sprintf("%.3fs", d.Seconds()) }
