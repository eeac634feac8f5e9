package chaostest

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/router"
	"golang.org/x/sys/unix"
)

// cpuPair places the two ends of a throughput test: the sender on one CPU, the receiver on
// another (the same one when only one is allowed). all is the test's own CPU list, which the
// peers it started inherited: what they are given back.
type cpuPair struct {
	sender, receiver int
	all              string
}

// newCPUPair takes the first two CPUs this process may run on (a cpuset need not start at 0).
func newCPUPair() (cpuPair, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return cpuPair{}, fmt.Errorf("sched_getaffinity: %w", err)
	}
	var cpus []string
	p := cpuPair{sender: -1, receiver: -1}
	for cpu := range len(set) * 64 {
		if !set.IsSet(cpu) {
			continue
		}
		cpus = append(cpus, strconv.Itoa(cpu))
		switch {
		case p.sender < 0:
			p.sender = cpu
		case p.receiver < 0:
			p.receiver = cpu
		}
	}
	if p.sender < 0 {
		return cpuPair{}, fmt.Errorf("no CPU in this process's affinity mask")
	}
	if p.receiver < 0 {
		p.receiver = p.sender
	}
	p.all = strings.Join(cpus, ",")
	return p, nil
}

// iperf3Rate runs one iperf3 TCP test from src to an iperf3 server at dst (port 5201), its
// client and server on cpus, and returns the receiver's rate in bits/s. The server (-1: one
// test) is started here, in dst's namespace, and killed by its PID if it outlives the test.
func iperf3Rate(t *testing.T, ctx context.Context, src, dst placed, secs int, cpus cpuPair) float64 {
	t.Helper()
	srv := exec.Command("ip", "netns", "exec", dst.ctr.Name, "taskset", "-c", strconv.Itoa(cpus.receiver), "iperf3", "-s", "-1", "-p", "5201")
	var srvOut strings.Builder
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		t.Fatalf("start iperf3 server: %v", err)
	}
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	defer func() {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			srv.Process.Kill()
			<-done
		}
	}()
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	args := []string{"-c", strconv.Itoa(cpus.sender), "iperf3", "-c", dst.addr.String(), "-p", "5201", "-t", fmt.Sprint(secs), "-J", "-N"}
	defer func() {
		if t.Failed() {
			t.Logf("iperf3 server: %s", srvOut.String())
		}
	}()
	waitFor(t, ctx, 20*time.Second, "an iperf3 run", func() error {
		out, err := src.ctr.Exec(ctx, "taskset", args...)
		res.Error = "" // a failed attempt's error stays unless cleared: a good answer has none
		if jerr := json.Unmarshal(out, &res); jerr != nil {
			return fmt.Errorf("iperf3: %v, output %v: %s", err, jerr, out)
		}
		if res.Error != "" || res.End.SumReceived.BitsPerSecond <= 0 { // refused until the server listens
			ss, _ := dst.ctr.Exec(ctx, "ss", "-ltnp")
			return fmt.Errorf("iperf3: %v: %s; listening in %s: %s", err, res.Error, dst.ctr.Name, ss)
		}
		return nil
	})
	return res.End.SumReceived.BitsPerSecond
}

// pinPeer runs every thread of h's peer process on cpus (a taskset list such as "0" or
// "0-1"); threads it starts later inherit it.
func pinPeer(ctx context.Context, h *lab.Host, cpus string) error {
	pid := h.PID()
	out, err := exec.CommandContext(ctx, "taskset", "-a", "-p", "-c", cpus, strconv.Itoa(pid)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("taskset %s on %s (pid %d): %v: %s", cpus, h.Name, pid, err, out)
	}
	return nil
}

func runPerf(ctx context.Context, h *lab.Host, args ...string) (router.PerfResult, error) {
	var r router.PerfResult
	err := cliJSON(ctx, h, &r, append([]string{"perf"}, args...)...)
	return r, err
}

// perfLeftovers names what a test may leave behind: test namespaces and attachments.
func perfLeftovers(t *testing.T, ctx context.Context, hosts []*lab.Host) error {
	t.Helper()
	var left []string
	for _, h := range hosts {
		ns, _ := filepath.Glob("/run/netns/" + h.Name + "-perf-*")
		left = append(left, ns...)
		for _, a := range mustStatus(t, ctx, h).Attachments {
			if strings.HasPrefix(a.ContainerID, "weft-perf-") {
				left = append(left, h.Name+": attachment "+a.ContainerID)
			}
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("left behind: %v", left)
	}
	return nil
}

// weft perf between two real peers: its throughput matches iperf3's between the same two
// containers in the same run, it never exceeds its --rate cap at the receiver, a second test
// at a busy peer is refused, and nothing is left behind. weft trace and weft top show the path.
func TestPerf(t *testing.T) {
	requireTool(t, "iperf3")
	l := newMeshLab(t, "wpfperf", 3, "--perf-max-rate", "100gbit", "--probe-interval", "300ms")
	ctx := testCtx(t, 5*time.Minute)
	a, b, c := l.Host(0), l.Host(1), l.Host(2)
	cs := onePerHost(t, ctx, l)
	waitPing(t, ctx, cs[0].ctr, cs[1].addr)

	t.Run("throughput within 0.7-1.2x of iperf3 between the same containers", func(t *testing.T) {
		const secs = 3
		// iperf3 and weft perf in turn, five runs each, compared by their medians: on a shared
		// machine single runs of both swing by ±10 %, and best against best was decided by
		// one outlier (a weft perf run 15 % above its other two put the ratio at 1.22).
		// Both tools run their sender on one CPU and their receiver on the other (weft perf's
		// ends are peers a and b themselves): unpinned, each run's rate depended on where the
		// scheduler put the two ends, iperf3's runs fell in two groups (10.7-10.9 and
		// 12.9-13.8 Gbit/s) and the medians of the two tools could come from different
		// groups (ratio 1.33 in CI). iperf3 runs with -N, TCP_NODELAY, as Go sets it on every
		// TCP socket: with Nagle on iperf3 was the slower tool (ratio 1.17-1.22 pinned), with
		// it off the faster (0.82-0.91 in six pinned runs). What is left is weft's own cost
		// (a Go sender inside a running peer against a C program doing nothing else), hence
		// 0.7 below; above, 1.2 still catches a count or a clock that inflates the rate (a
		// late first-read stamp once gave 1.33).
		cpus, err := newCPUPair()
		if err != nil {
			t.Fatal(err)
		}
		for _, pin := range []struct {
			h   *lab.Host
			cpu int
		}{{a, cpus.sender}, {b, cpus.receiver}} {
			if err := pinPeer(ctx, pin.h, strconv.Itoa(pin.cpu)); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := pinPeer(context.Background(), pin.h, cpus.all); err != nil {
					t.Error(err)
				}
			})
		}
		var ips, perfs []float64
		var r router.PerfResult
		for i := range 10 {
			if i%2 == 0 {
				ips = append(ips, iperf3Rate(t, ctx, cs[0], cs[1], secs, cpus))
				continue
			}
			// A cap far above what the path carries: the path limits both.
			var err error
			if r, err = runPerf(ctx, a, b.Name, "--seconds", fmt.Sprint(secs), "--rate", "50gbit"); err != nil {
				t.Fatal(err)
			}
			perfs = append(perfs, r.Throughput)
			if r.From != a.Name || r.To != b.Name || r.Probes == 0 || r.RTTP50ms <= 0 || r.Received == 0 || r.Error != "" {
				t.Errorf("result %+v", r)
			}
		}
		ref, got := median(ips), median(perfs)
		ratio := got / ref
		t.Logf("iperf3 %v Gbit/s, weft perf %v Gbit/s: median %.2f against %.2f, ratio %.2f; last rtt p50 %.3f ms p99 %.3f ms, jitter %.3f ms, loss %.1f%% of %d probes",
			gbit(ips), gbit(perfs), got/1e9, ref/1e9, ratio, r.RTTP50ms, r.RTTP99ms, r.JitterMs, r.Loss*100, r.Probes)
		if ratio < 0.7 || ratio > 1.2 {
			t.Errorf("weft perf %.2f Gbit/s against iperf3 %.2f Gbit/s: ratio %.2f, want 0.7-1.2", got/1e9, ref/1e9, ratio)
		}
	})

	t.Run("never over its rate cap at the receiver", func(t *testing.T) {
		r, err := runPerf(ctx, a, b.Name, "--seconds", "4", "--rate", "20mbit")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("cap 20 Mbit/s: received %.2f Mbit/s (%d bytes), loss %.1f%%", r.Throughput/1e6, r.Received, r.Loss*100)
		if r.Throughput > 1.05*20e6 || r.Throughput < 0.8*20e6 {
			t.Errorf("receiver saw %.2f Mbit/s with --rate 20mbit, want 16-21", r.Throughput/1e6)
		}
		if avg := float64(r.Received) * 8 / r.Seconds; avg > 1.05*20e6 {
			t.Errorf("%d bytes in %.1f s is %.2f Mbit/s, over the cap", r.Received, r.Seconds, avg/1e6)
		}
	})

	t.Run("one test at a time: a second at a busy peer is refused", func(t *testing.T) {
		var wg sync.WaitGroup
		var first router.PerfResult
		var firstErr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			first, firstErr = runPerf(ctx, a, b.Name, "--seconds", "6", "--rate", "10mbit")
		}()
		waitFor(t, ctx, 20*time.Second, "a test endpoint on "+b.Name, func() error {
			for _, at := range mustStatus(t, ctx, b).Attachments {
				if strings.HasPrefix(at.ContainerID, "weft-perf-") {
					return nil
				}
			}
			return fmt.Errorf("none yet")
		})
		_, err := runPerf(ctx, c, b.Name, "--seconds", "2")
		if err == nil || !strings.Contains(err.Error(), "already running") || !strings.Contains(err.Error(), a.Name) {
			t.Errorf("a second test at %s = %v, want refused naming the running test", b.Name, err)
		}
		wg.Wait()
		if firstErr != nil {
			t.Errorf("the first test failed: %v", firstErr)
		}
		var results []router.PerfResult
		if err := cliJSON(ctx, a, &results, "perf", "--last"); err != nil || len(results) == 0 || results[len(results)-1].ID != first.ID {
			t.Errorf("perf --last on %s: %+v, %v; want this run's last", a.Name, results, err)
		}
	})

	t.Run("nothing left behind", func(t *testing.T) {
		waitFor(t, ctx, 20*time.Second, "no test namespace or attachment", func() error { return perfLeftovers(t, ctx, l.Hosts()) })
	})

	t.Run("trace and top show the path", func(t *testing.T) {
		var tr router.Trace
		if err := cliJSON(ctx, a, &tr, "trace", cs[1].addr.String()); err != nil {
			t.Fatal(err)
		}
		if tr.Owner != b.Name || tr.Local || len(tr.Path) == 0 || tr.Path[len(tr.Path)-1] != b.Name || tr.Mode == "" || len(tr.Hops) == 0 {
			t.Errorf("trace of %s from %s: %+v", cs[1].addr, a.Name, tr)
		}
		if err := cliJSON(ctx, a, &tr, "trace", cs[0].ctr.ID); err != nil || !tr.Local || tr.Owner != a.Name {
			t.Errorf("trace of a local container: %+v, %v", tr, err)
		}
		out, err := a.CLI(ctx, "top", "--once")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"weft top — " + a.Name, "3 peers (3 alive)", b.Name, c.Name, "last perf: " + a.Name + " → " + b.Name} {
			if !strings.Contains(string(out), want) {
				t.Errorf("top --once lacks %q:\n%s", want, out)
			}
		}
	})
}

func gbit(v []float64) string {
	out := make([]string, len(v))
	for i, x := range v {
		out[i] = fmt.Sprintf("%.2f", x/1e9)
	}
	return strings.Join(out, " ")
}

func requireTool(t *testing.T, tool string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Fatalf("this test needs %s (Debian package %s; make bench-deps installs it): %v", tool, tool, err)
	}
}

// median of an odd number of figures.
func median(xs []float64) float64 {
	s := slices.Sorted(slices.Values(xs))
	return s[len(s)/2]
}
