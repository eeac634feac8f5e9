// Command dns measures weft's DNS server against dnsmasq with dnsperf: the
// same names (n containers under weft.local), the same A queries, the same
// run, interleaved (weft, dnsmasq, weft, dnsmasq …) so that noise hits both
// alike.
//
//	go run ./chaos-tests/bench/dns [-n 1000] [-d 10s] [-rounds 2] [-rate 10000] [-ld 5s]
//
// Needs dnsperf and dnsmasq on PATH (Debian: apt-get install dnsperf
// dnsmasq-base; `make bench` installs them). Everything listens on
// 127.0.0.1 only.
//
// Two measurements per server and round:
//
//   - Throughput: dnsperf at full speed (-q outstanding queries, default
//     100) for -d; its "Queries per second". Latency at saturation is
//     queueing (outstanding / QPS), so it is shown but not held to the
//     target.
//   - Latency: dnsperf at a fixed rate (-rate, well below either server's
//     capacity) for -ld with -v, which prints every answer with its
//     latency; p50/p99/max come from those lines (dnsperf 2.10 itself
//     reports only average, min and max).
//
// The weft server runs in a child process (this binary, re-executed), not
// in the harness: like dnsmasq it then has its own process, scheduler and
// GC, and the harness reading dnsperf's output cannot steal its threads.
// Its Records are filled directly (no mesh): n names over three peers, one
// IPv4 address each. dnsmasq serves the same names from a hosts file
// (--addn-hosts, no upstreams, TTL 30 like weft). On a 2-core machine
// dnsperf competes with the server for CPU in both cases; dnsmasq is
// single-threaded, weft uses GOMAXPROCS threads (-procs).
//
// The targets (issue): weft's QPS ≥ dnsmasq's, weft's p99 ≤ 1 ms. They are
// reported, never enforced: the exit status is non-zero only when something
// fails (a tool missing or crashing, a wrong answer, output not parsed).
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/weftnet/weft/dns"
)

// childEnv, when set in the environment, makes this binary the weft server
// child; its value is the number of names.
const childEnv = "WEFT_DNSBENCH_SERVE"

// profileEnv, when set for the child, names the file it writes a CPU
// profile of its whole life to (-cpuprofile).
const profileEnv = "WEFT_DNSBENCH_CPUPROFILE"

func main() {
	if v := os.Getenv(childEnv); v != "" {
		if err := serveChild(v); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type options struct {
	n           int
	dur, latDur time.Duration
	rounds      int
	rate        int
	outstanding int
	procs       int
	cpuprofile  string
}

func run() error {
	var o options
	flag.IntVar(&o.n, "n", 1000, "names (containers) served by both")
	flag.DurationVar(&o.dur, "d", 10*time.Second, "duration of each throughput run")
	flag.DurationVar(&o.latDur, "ld", 5*time.Second, "duration of each fixed-rate latency run")
	flag.IntVar(&o.rounds, "rounds", 2, "interleaved rounds (weft then dnsmasq in each)")
	flag.IntVar(&o.rate, "rate", 10000, "queries per second of the latency runs")
	flag.IntVar(&o.outstanding, "q", 100, "dnsperf's outstanding queries in the throughput runs")
	flag.IntVar(&o.procs, "procs", 0, "GOMAXPROCS of the weft server (0: Go's default, the CPU count)")
	flag.StringVar(&o.cpuprofile, "cpuprofile", "", "write a CPU profile of the weft server process to this file")
	flag.Parse()
	if o.n < 1 || o.n > 60000 || o.rounds < 1 || o.rate < 1 || o.dur < time.Second || o.latDur < time.Second {
		return errors.New("need 1 ≤ -n ≤ 60000, -rounds ≥ 1, -rate ≥ 1, -d and -ld ≥ 1s")
	}
	for _, tool := range []string{"dnsperf", "dnsmasq"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found (apt-get install dnsperf dnsmasq-base): %w", tool, err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dir, err := os.MkdirTemp("", "weft-dnsbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// dnsmasq drops root to nobody before it reads the hosts file.
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	names := benchNames(o.n)
	hosts, queries := filepath.Join(dir, "hosts"), filepath.Join(dir, "queries")
	if err := writeFiles(names, hosts, queries); err != nil {
		return err
	}

	weft, err := startWeft(ctx, o)
	if err != nil {
		return err
	}
	defer weft.stop()
	dm, err := startDnsmasq(ctx, dir, hosts)
	if err != nil {
		return err
	}
	defer dm.stop()

	// Same answers from both, before any timing.
	for _, s := range []*server{weft, dm} {
		if err := checkAnswers(s.addr, names); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}

	fmt.Printf("dns bench: %d names, %d CPUs, weft GOMAXPROCS %s, %s, %s\n", o.n, runtime.NumCPU(),
		procsLabel(o.procs), toolVersion("dnsperf", "-h"), toolVersion("dnsmasq", "--version"))
	res := map[string]*result{weft.name: {}, dm.name: {}}
	for round := 1; round <= o.rounds; round++ {
		for _, s := range []*server{weft, dm} {
			if !s.alive() {
				return fmt.Errorf("%s exited", s.name)
			}
			fmt.Printf("round %d: %s throughput (%v)…\n", round, s.name, o.dur)
			t, err := dnsperf(ctx, s.addr, queries, o.dur, 0, o.outstanding)
			if err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			res[s.name].tput = append(res[s.name].tput, t)
			fmt.Printf("round %d: %s latency at %d qps (%v)…\n", round, s.name, o.rate, o.latDur)
			l, err := dnsperf(ctx, s.addr, queries, o.latDur, o.rate, o.outstanding)
			if err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			res[s.name].lat = append(res[s.name].lat, l)
		}
	}
	report(os.Stdout, o, res[weft.name], res[dm.name])
	return nil
}

// result holds one server's runs.
type result struct {
	tput []*perf // throughput runs
	lat  []*perf // fixed-rate runs, with per-query latencies
}

// perf is what one dnsperf run gives.
type perf struct {
	qps          float64
	sent, lost   int
	avg, min, mx time.Duration // dnsperf's own figures
	rcodes       string
	samples      []time.Duration // per query, with -v
}

func benchNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("c%05d", i)
	}
	return out
}

// addrOf is name i's address: 10.40.0.0/16 from 10.40.0.1 on.
func addrOf(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 40, byte((i + 1) >> 8), byte(i + 1)})
}

func writeFiles(names []string, hosts, queries string) error {
	var h, q strings.Builder
	for i, n := range names {
		fmt.Fprintf(&h, "%s %s.weft.local\n", addrOf(i), n)
		fmt.Fprintf(&q, "%s.weft.local A\n", n)
	}
	if err := os.WriteFile(hosts, []byte(h.String()), 0o644); err != nil {
		return err
	}
	return os.WriteFile(queries, []byte(q.String()), 0o644)
}

// server is a DNS server process under test.
type server struct {
	name string
	addr string // 127.0.0.1:port
	cmd  *exec.Cmd
	done chan struct{} // closed when the process exited
	err  error         // of Wait, once done
	// stdin is held open for the weft child, which exits when it closes.
	stdin io.WriteCloser
}

func (s *server) alive() bool {
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// stop ends the process this bench started: SIGTERM, then SIGKILL after 3s.
func (s *server) stop() {
	if !s.alive() {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(3 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// start runs cmd, dying with the bench (Pdeathsig), and watches its exit.
func start(name string, cmd *exec.Cmd) (*server, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	s := &server{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		s.err = cmd.Wait()
		close(s.done)
	}()
	return s, nil
}

// startWeft re-executes this binary as the weft server and reads the address
// it listens on from its first line of output.
func startWeft(ctx context.Context, o options) (*server, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), childEnv+"="+strconv.Itoa(o.n))
	if o.procs > 0 {
		cmd.Env = append(cmd.Env, "GOMAXPROCS="+strconv.Itoa(o.procs))
	}
	if o.cpuprofile != "" {
		p, err := filepath.Abs(o.cpuprofile)
		if err != nil {
			return nil, err
		}
		cmd.Env = append(cmd.Env, profileEnv+"="+p)
	}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	s, err := start("weft", cmd)
	if err != nil {
		return nil, err
	}
	s.stdin = stdin
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(out).ReadString('\n')
		line <- strings.TrimSpace(l)
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case l := <-line:
		addr, ok := strings.CutPrefix(l, "listening ")
		if !ok {
			s.stop()
			return nil, fmt.Errorf("weft server: unexpected first line %q", l)
		}
		s.addr = addr
	case <-time.After(10 * time.Second):
		s.stop()
		return nil, errors.New("weft server did not start within 10s")
	case <-ctx.Done():
		s.stop()
		return nil, ctx.Err()
	}
	return s, waitServing(ctx, s)
}

// startDnsmasq runs dnsmasq in the foreground on a free port of 127.0.0.1,
// retrying another port if the one picked was taken meanwhile.
func startDnsmasq(ctx context.Context, dir, hosts string) (*server, error) {
	var last error
	for try := 0; try < 5; try++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		logf, err := os.Create(filepath.Join(dir, "dnsmasq.log"))
		if err != nil {
			return nil, err
		}
		cmd := exec.Command("dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--pid-file=",
			"--no-resolv", "--no-hosts", "--addn-hosts="+hosts, "--local-ttl=30",
			"--listen-address=127.0.0.1", "--bind-interfaces", "--port="+strconv.Itoa(port),
			"--cache-size=10000", "--no-negcache")
		cmd.Stdout, cmd.Stderr = logf, logf
		s, err := start("dnsmasq", cmd)
		logf.Close()
		if err != nil {
			return nil, err
		}
		s.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if last = waitServing(ctx, s); last == nil {
			return s, nil
		}
		s.stop()
		log, _ := os.ReadFile(filepath.Join(dir, "dnsmasq.log"))
		last = fmt.Errorf("%w; dnsmasq said: %s", last, strings.TrimSpace(string(log)))
	}
	return nil, last
}

// freePort returns a port free for UDP and TCP on 127.0.0.1 right now.
func freePort() (int, error) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer pc.Close()
	port := pc.LocalAddr().(*net.UDPAddr).Port
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return 0, err
	}
	l.Close()
	return port, nil
}

// waitServing polls s with a query until it answers (deadline 10s).
func waitServing(ctx context.Context, s *server) error {
	c := &mdns.Client{Timeout: 200 * time.Millisecond}
	deadline := time.Now().Add(10 * time.Second)
	for {
		m := new(mdns.Msg)
		m.SetQuestion("c00000.weft.local.", mdns.TypeA)
		if _, _, err := c.ExchangeContext(ctx, m, s.addr); err == nil {
			return nil
		} else if !s.alive() {
			return fmt.Errorf("%s exited: %v", s.name, s.err)
		} else if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s not answering on %s: %w", s.name, s.addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkAnswers queries a sample of the names and compares with the truth.
func checkAnswers(addr string, names []string) error {
	c := &mdns.Client{Timeout: time.Second}
	step := max(1, len(names)/50)
	for i := 0; i < len(names); i += step {
		m := new(mdns.Msg)
		m.SetQuestion(names[i]+".weft.local.", mdns.TypeA)
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			return fmt.Errorf("query %s: %w", names[i], err)
		}
		if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
			return fmt.Errorf("query %s: rcode %s, %d answers", names[i], mdns.RcodeToString[r.Rcode], len(r.Answer))
		}
		a, ok := r.Answer[0].(*mdns.A)
		if !ok {
			return fmt.Errorf("query %s: answer %v, want an A record", names[i], r.Answer[0])
		}
		if got, _ := netip.AddrFromSlice(a.A.To4()); got != addrOf(i) {
			return fmt.Errorf("query %s: answer %v, want %v", names[i], r.Answer[0], addrOf(i))
		}
	}
	return nil
}

// dnsperf runs one dnsperf against addr for d: at full speed when rate is 0,
// else at rate qps with every answer's latency printed (-v) and collected.
func dnsperf(ctx context.Context, addr, queries string, d time.Duration, rate, outstanding int) (*perf, error) {
	host, port, _ := net.SplitHostPort(addr)
	// -c 4: four client sockets, as many containers asking at once would be; both servers
	// get the same load.
	args := []string{"-s", host, "-p", port, "-d", queries, "-l", strconv.Itoa(int(d / time.Second)),
		"-q", strconv.Itoa(outstanding), "-t", "2", "-c", "4"}
	if rate > 0 {
		args = append(args, "-Q", strconv.Itoa(rate), "-v")
	}
	// Output goes to a file, parsed afterwards: the harness stays idle while
	// dnsperf and the server run.
	outf, err := os.CreateTemp(filepath.Dir(queries), "dnsperf-*.out")
	if err != nil {
		return nil, err
	}
	defer os.Remove(outf.Name())
	defer outf.Close()
	cmd := exec.CommandContext(ctx, "dnsperf", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stdout, cmd.Stderr = outf, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("dnsperf %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	if _, err := outf.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	p, err := parseDnsperf(outf, rate > 0)
	if err != nil {
		return nil, fmt.Errorf("dnsperf output: %w", err)
	}
	if !strings.HasPrefix(p.rcodes, "NOERROR") || strings.Contains(p.rcodes, ",") {
		return nil, fmt.Errorf("dnsperf saw response codes %q, want only NOERROR", p.rcodes)
	}
	return p, nil
}

// parseDnsperf reads dnsperf 2.x's report, and with verbose its per-query
// lines "> NOERROR c00001.weft.local A 0.000102".
func parseDnsperf(r io.Reader, verbose bool) (*perf, error) {
	p := &perf{}
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if verbose && strings.HasPrefix(line, "> ") {
			f := strings.Fields(line)
			if sec, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil && len(f) >= 4 && f[1] != "T" {
				p.samples = append(p.samples, time.Duration(sec*float64(time.Second)))
			}
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		first := strings.Fields(val + " ")
		var err error
		switch key {
		case "Queries sent":
			p.sent, err = strconv.Atoi(first[0])
		case "Queries lost":
			p.lost, err = strconv.Atoi(first[0])
		case "Queries per second":
			p.qps, err = strconv.ParseFloat(first[0], 64)
		case "Response codes":
			p.rcodes = val
		case "Average Latency (s)":
			// 0.000739 (min 0.000009, max 0.009587)
			var avg, mn, mx float64
			if _, err = fmt.Sscanf(val, "%g (min %g, max %g)", &avg, &mn, &mx); err == nil {
				p.avg, p.min, p.mx = secs(avg), secs(mn), secs(mx)
			}
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%q: %w", line, err)
		}
		seen[key] = true
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for _, k := range []string{"Queries sent", "Queries lost", "Queries per second", "Response codes", "Average Latency (s)"} {
		if !seen[k] {
			return nil, fmt.Errorf("no %q line", k)
		}
	}
	if verbose && len(p.samples) == 0 {
		return nil, errors.New("no per-query latency lines")
	}
	return p, nil
}

func secs(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func procsLabel(p int) string {
	if p == 0 {
		return "default"
	}
	return strconv.Itoa(p)
}

// toolVersion returns "tool X.Y" from its version output, or "tool".
func toolVersion(tool, flag string) string {
	out, _ := exec.Command(tool, flag).CombinedOutput()
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		for i, w := range f {
			if strings.EqualFold(w, "version") && i+1 < len(f) {
				return tool + " " + f[i+1]
			}
		}
	}
	return tool
}

// report prints the side-by-side table.
func report(out io.Writer, o options, w, d *result) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\t weft\t dnsmasq\t weft/dnsmasq\t target\t")
	for i := range w.tput {
		fmt.Fprintf(tw, "QPS, round %d\t %.0f\t %.0f\t %.2f\t\t\n", i+1, w.tput[i].qps, d.tput[i].qps, w.tput[i].qps/d.tput[i].qps)
	}
	wq, dq := meanQPS(w.tput), meanQPS(d.tput)
	fmt.Fprintf(tw, "QPS, mean\t %.0f\t %.0f\t %.2f\t ≥ dnsmasq: %s\t\n", wq, dq, wq/dq, verdict(wq >= dq))
	fmt.Fprintf(tw, "lost at full speed\t %s\t %s\t\t\t\n", lostPct(w.tput), lostPct(d.tput))
	fmt.Fprintf(tw, "avg latency at full speed (q=%d)\t %s\t %s\t %.2f\t\t\n", o.outstanding, ms(meanAvg(w.tput)), ms(meanAvg(d.tput)),
		float64(meanAvg(w.tput))/float64(meanAvg(d.tput)))
	ws, ds := allSamples(w.lat), allSamples(d.lat)
	for _, q := range []float64{50, 99, 99.9} {
		target := ""
		if q == 99 {
			target = "≤ 1 ms: " + verdict(pct(ws, q) <= time.Millisecond)
		}
		fmt.Fprintf(tw, "p%g at %d qps\t %s\t %s\t %.2f\t %s\t\n", q, o.rate, ms(pct(ws, q)), ms(pct(ds, q)),
			float64(pct(ws, q))/float64(pct(ds, q)), target)
	}
	fmt.Fprintf(tw, "max at %d qps\t %s\t %s\t\t\t\n", o.rate, ms(pct(ws, 100)), ms(pct(ds, 100)))
	fmt.Fprintf(tw, "answers timed at %d qps\t %d\t %d\t\t\t\n", o.rate, len(ws), len(ds))
	fmt.Fprintf(tw, "lost at %d qps\t %s\t %s\t\t\t\n", o.rate, lostPct(w.lat), lostPct(d.lat))
	tw.Flush()
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func meanQPS(ps []*perf) float64 {
	s := 0.0
	for _, p := range ps {
		s += p.qps
	}
	return s / float64(len(ps))
}

func meanAvg(ps []*perf) time.Duration {
	var s time.Duration
	for _, p := range ps {
		s += p.avg
	}
	return s / time.Duration(len(ps))
}

func lostPct(ps []*perf) string {
	sent, lost := 0, 0
	for _, p := range ps {
		sent, lost = sent+p.sent, lost+p.lost
	}
	return fmt.Sprintf("%.3f%%", 100*float64(lost)/float64(max(sent, 1)))
}

func allSamples(ps []*perf) []time.Duration {
	var all []time.Duration
	for _, p := range ps {
		all = append(all, p.samples...)
	}
	slices.Sort(all)
	return all
}

// pct returns the q-th percentile (nearest rank) of sorted ds.
func pct(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	i := int(q/100*float64(len(ds))+0.5) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3f ms", float64(d)/float64(time.Millisecond)) }

// serveChild is the weft server process: n names over three peers, served on
// 127.0.0.1 until SIGTERM/SIGINT or until the bench closes its stdin.
func serveChild(v string) error {
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		return fmt.Errorf("bad %s=%q", childEnv, v)
	}
	if p := os.Getenv(profileEnv); p != "" {
		f, err := os.Create(p)
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
	var peers []*dns.Records
	for _, p := range []string{"peer-a", "peer-b", "peer-c"} {
		r, err := dns.NewRecords(p, nil)
		if err != nil {
			return err
		}
		peers = append(peers, r)
	}
	recs := peers[0]
	for i, name := range benchNames(n) {
		d, err := peers[i%len(peers)].AddAddr(name, addrOf(i))
		if err != nil {
			return err
		}
		recs.Merge(d)
	}
	cfg := dns.DefaultConfig()
	cfg.Listen = []string{"127.0.0.1:0"}
	cfg.Networks = []dns.NetworkRange{{Name: "default", Prefix: netip.MustParsePrefix("10.40.0.0/16")}}
	cfg.Upstreams = []string{"127.0.0.1:1"} // every query is a weft name: never used
	s, err := dns.NewServer(cfg, recs, dns.Deps{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer s.Close()
	if err := s.Start(); err != nil {
		return err
	}
	fmt.Printf("listening %s\n", s.Addrs()[0])
	go func() {
		// The parent going away closes our stdin (Pdeathsig backs this up).
		_, _ = io.Copy(io.Discard, os.Stdin)
		stop()
	}()
	<-ctx.Done()
	return nil
}
