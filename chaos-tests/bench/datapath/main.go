// Command datapath measures weft's forwarding between hosts against the kernel done by
// hand, in one run, on throwaway network namespaces:
//
//	go run ./chaos-tests/bench/datapath -bin bin [-t 3s] [-runs 3] [-planes=false] [-cases REGEXP]
//
// Nine cases, each between two containers (namespaces, MTU 1400) on two hosts:
//
//	raw veth                 the two containers joined by one plain veth pair: the floor
//	                         of any datapath
//	raw vxlan                two hosts on an L2 underlay, containers on a bridge, a kernel
//	                         VXLAN device per host configured by hand with ip(8) (static
//	                         FDB and neighbour, routes)
//	raw routes               the same two hosts, plain routes over the underlay added by
//	                         hand with ip(8)
//	weft direct              the same two hosts, forwarding with datapath/direct
//	weft vxlan               the same two hosts, forwarding with datapath/vxlan
//	standalone wireguard-go  the same two hosts, a userspace WireGuard tunnel per host made
//	                         with golang.zx2c4.com/wireguard directly (TUN, NewDevice,
//	                         IpcSet, Up; a route per remote block), no weft code
//	weft wireguard           the same two hosts, forwarding with datapath/wireguard
//	                         (userspace, wireguard-go on TUN)
//	weft peers default       two hosts of a chaos lab running real `weft peer` processes
//	                         (cluster key, plaintext links), a container on each attached
//	                         by libcni and the real plugin to default (eth0) and to a
//	                         network created at run time, media 10.50.0.0/16 (net1); the
//	                         client measures to the server's default address
//	weft peers media         the same containers, to the server's media address (#13:
//	                         a second network must cost no throughput; see planes.go)
//
// The weft direct, vxlan and wireguard cases use the drivers as libraries (bridge and veths
// from package datapath, then the driver's Up and Set), so they measure weft's datapath,
// not the daemon; the weft peers cases measure the whole daemon, on two planes. The two
// WireGuard cases run each host's tunnel in a child process (this binary re-run with
// -wg-child inside the host namespace, see wireguard.go), so both link the same
// wireguard-go and run under identical conditions: same topology, port, MTU, peer settings
// and process layout; the only difference is weft's driver and its wgctrl/UAPI control path.
// Throughput is
// iperf3's TCP receive rate (-J, -O 1 to skip slow start), latency qperf's tcp_lat (one
// byte ping-pong, half the round trip); each is the median of -runs runs. The runs of the
// cases are interleaved, each round starting with another case and odd rounds running the
// list backwards, so that noise hits all alike; the table shows min–max too, because on a
// small shared machine it is large.
//
// It prints the medians and the ratios weft/baseline with the targets (throughput ≥ 95 %,
// latency within +10 %): direct against raw veth, vxlan against raw vxlan, and direct
// against raw routes; weft wireguard against standalone wireguard-go with throughput
// ≥ 100 % (same crypto and library, so weft's own overhead must be about zero) and latency
// within +10 %; weft peers media against weft peers default (the same two containers and
// peers, only the plane differs), and weft peers default against raw routes (the daemon
// against the same forwarding done by hand). Raw veth is a floor no multi-host topology reaches (every packet
// crosses two bridges, three veth pairs and two routing decisions); raw routes is the
// same topology done by hand, which tells weft's cost from the topology's.
//
// It exits non-zero only when something fails, never because a target is missed. It needs
// root, iperf3 and qperf (Debian packages iperf3 and qperf); it installs nothing. -bin
// holds the weft and weft-cni binaries of the weft peers cases (make build); -planes=false
// leaves those cases out; -cases measures only some cases (all are set up), e.g.
// -cases 'weft peers|raw routes' -runs 11 for many quick rounds of the planes.
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
	"os/exec"
	"os/signal"
	"regexp"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/datapath"
	"github.com/weftnet/weft/datapath/direct"
	"github.com/weftnet/weft/datapath/nslab"
	"github.com/weftnet/weft/datapath/vxlan"
	"github.com/weftnet/weft/datapath/wireguard"
)

const (
	mtu         = 1400 // containers' MTU in every case
	underlayMTU = 1500 // hosts' underlay MTU in every case
	iperfPort   = "5201"
	qperfPort   = "19765"
	minThrough  = 0.95 // target: weft's throughput at least this share of the baseline's
	maxLatency  = 1.10 // target: weft's latency at most this multiple of the baseline's
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// subject is one case: a client and a server namespace and what was measured between them.
type subject struct {
	name           string
	client, server *nslab.NS
	serverAddr     netip.Addr
	bps, lat       []float64 // bits/s, seconds
}

func run() error {
	var (
		binDir   = flag.String("bin", "bin", "directory holding the weft and weft-cni binaries (weft peers cases)")
		withPl   = flag.Bool("planes", true, "also measure through real weft peers on default and a second network")
		only     = flag.String("cases", "", "measure only the cases whose name matches this regular expression (every case is still set up), e.g. 'weft peers' for many quick rounds of the two planes")
		labPfx   = flag.String("lab-prefix", "wbdpl", "the weft peers cases' chaos lab prefix (1-8 of [a-z0-9]; its namespaces are <prefix>-ul, <prefix>-h<i>…)")
		stepWait = flag.Duration("wait", 90*time.Second, "longest wait for any one step of the weft peers cases' setup")
		dur      = flag.Duration("t", 3*time.Second, "length of each iperf3 and qperf run")
		runs     = flag.Int("runs", 3, "runs per case and measure; the median is reported")
		prefix   = flag.String("prefix", fmt.Sprintf("wbdp-%d-", os.Getpid()%100000), "namespace name prefix")
		showLogs = flag.Bool("v", false, "log the drivers' changes")

		// A WireGuard child (see wireguard.go), run by the bench itself.
		child         = flag.String("wg-child", "", "internal: run as a WireGuard child, weft or standalone")
		childName     = flag.String("wg-name", "", "internal: the child's peer name")
		childUnderlay = flag.String("wg-underlay", "", "internal: the child's underlay address")
		childPort     = flag.Int("wg-port", wireguard.DefaultPort, "internal: the child's UDP port")
		childMTU      = flag.Int("wg-mtu", underlayMTU-wireguard.Overhead, "internal: the standalone child's TUN MTU")
		childKey      = flag.String("wg-key", "", "internal: the weft child's private key file")
	)
	flag.Parse()
	if *child != "" {
		u, err := netip.ParseAddr(*childUnderlay)
		if err != nil {
			return fmt.Errorf("-wg-underlay: %w", err)
		}
		return runChild(childConfig{mode: *child, name: *childName, underlay: u, port: *childPort,
			mtu: *childMTU, keyFile: *childKey, verbose: *showLogs})
	}
	if *runs < 1 || *dur < time.Second {
		return errors.New("-runs must be ≥ 1 and -t ≥ 1s")
	}
	casesRE, err := regexp.Compile(*only)
	if err != nil {
		return fmt.Errorf("-cases: %w", err)
	}
	var missing, pkgs []string
	for _, tool := range [][2]string{{"iperf3", "iperf3"}, {"qperf", "qperf"}, {"ip", "iproute2"}, {"bridge", "iproute2"}, {"ss", "iproute2"}, {"ping", "iputils-ping"}} {
		if _, err := exec.LookPath(tool[0]); err != nil {
			missing = append(missing, tool[0])
			if !slices.Contains(pkgs, tool[1]) {
				pkgs = append(pkgs, tool[1])
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s not found; install with: apt-get install -y %s", strings.Join(missing, ", "), strings.Join(pkgs, " "))
	}
	if os.Geteuid() != 0 {
		return errors.New("the benchmark needs root (network namespaces)")
	}
	if *withPl {
		if err := checkBinaries(*binDir); err != nil {
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var subjects []*subject
	var labs []*nslab.Lab
	defer func() {
		for _, l := range labs {
			if err := l.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "bench: cleanup:", err)
			}
		}
	}()
	newLab := func(tag string, hosts int) (*nslab.Lab, error) {
		l, err := nslab.New(nslab.Config{Prefix: *prefix + tag + "-", Hosts: hosts, MTU: mtu, UnderlayMTU: underlayMTU})
		if err == nil {
			labs = append(labs, l)
		}
		return l, err
	}
	keyDir, err := os.MkdirTemp("", "wbdp-wg-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(keyDir)
	wg, err := newWGCases(keyDir)
	if err != nil {
		return err
	}
	// Deferred after the labs' Close, so it runs before: children leave their
	// namespaces before those are deleted.
	defer wg.stop()

	// (a) raw veth.
	s, err := rawVeth(newLab)
	if err != nil {
		return fmt.Errorf("raw veth: %w", err)
	}
	subjects = append(subjects, s)
	// (b)–(g) two hosts each.
	for _, c := range []struct {
		name, tag string
		setup     func(ctx context.Context, l *nslab.Lab, verbose bool) error
	}{
		{"raw vxlan", "rv", rawVXLAN},
		{"raw routes", "rr", rawRoutes},
		{"weft direct", "wd", weftDirect},
		{"weft vxlan", "wv", weftVXLAN},
		{"standalone wireguard-go", "sw", wg.setup(modeStandalone)},
		{"weft wireguard", "ww", wg.setup(modeWeft)},
	} {
		l, err := newLab(c.tag, 2)
		if err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		for _, h := range l.Hosts {
			if _, err := h.AddContainer(); err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
		}
		if err := c.setup(ctx, l, *showLogs); err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		cl, sv := l.Hosts[0].Containers[0], l.Hosts[1].Containers[0]
		subjects = append(subjects, &subject{name: c.name, client: cl.NS, server: sv.NS, serverAddr: sv.Addr.Addr()})
	}
	if err := wg.sameMTU(); err != nil {
		return err
	}
	// (h), (i) real peers, default and media.
	var pl *planes
	if *withPl {
		var ss []*subject
		pl, ss, err = newPlanes(ctx, planesConfig{binDir: *binDir, prefix: *labPfx, timeout: *stepWait, verbose: *showLogs})
		if err != nil {
			return fmt.Errorf("weft peers: %w", err)
		}
		// Deferred after wg.stop, so it runs before it and the labs' Close, and after the
		// servers below are stopped.
		defer func() {
			if err := pl.Close(); err != nil {
				fmt.Fprintln(os.Stderr, "bench: cleanup:", err)
			}
		}()
		subjects = append(subjects, ss...)
	}

	subjects = slices.DeleteFunc(subjects, func(s *subject) bool { return !casesRE.MatchString(s.name) })
	if len(subjects) == 0 {
		return fmt.Errorf("-cases %q matches no case", *only)
	}

	// Servers, and a check that every case forwards at all before timing anything. Cases
	// that share a server namespace (the two planes) share its servers, which listen on
	// every address.
	served := map[string]bool{}
	for _, s := range subjects {
		// A lab's peers may still be installing their routes: give them the step's wait.
		pingCtx, cancel := context.WithTimeout(ctx, max(10*time.Second, *stepWait))
		err := s.client.WaitPing(pingCtx, s.serverAddr, "-M", "do", "-s", strconv.Itoa(mtu-28))
		cancel()
		if err != nil {
			return fmt.Errorf("%s: no path between the containers: %w", s.name, err)
		}
		if served[s.server.Name] {
			continue
		}
		served[s.server.Name] = true
		for _, srv := range [][]string{{"iperf3", "-s", "-p", iperfPort}, {"qperf", "-lp", qperfPort}} {
			stopServer, err := startServer(ctx, s.server, srv[len(srv)-1], srv...)
			if err != nil {
				return fmt.Errorf("%s: %w", s.name, err)
			}
			defer stopServer()
		}
	}

	fmt.Printf("datapath benchmark: %d runs of %s each, interleaved; containers' MTU %d; WireGuard tunnels' MTU %d, wireguard-go %s\n",
		*runs, *dur, mtu, wg.mtu[modeWeft], moduleVersion("golang.zx2c4.com/wireguard"))
	if pl != nil {
		fmt.Println(pl.describe(ctx))
	}
	for r := 0; r < *runs; r++ {
		// Each round starts with another case, so that no case always follows the same one,
		// and odd rounds go the other way round, so that neighbours in the list (the two
		// planes of the weft peers cases) alternate which of them runs first.
		for k := range subjects {
			s := subjects[roundOrder(r, k, len(subjects))]
			bps, err := iperf(ctx, s, *dur)
			if err != nil {
				return fmt.Errorf("%s: iperf3: %w", s.name, err)
			}
			lat, err := qperf(ctx, s, *dur)
			if err != nil {
				return fmt.Errorf("%s: qperf: %w", s.name, err)
			}
			s.bps, s.lat = append(s.bps, bps), append(s.lat, lat)
			fmt.Fprintf(os.Stderr, "  run %d %-24s %8.2f Gbit/s %8.1f µs\n", r+1, s.name, bps/1e9, lat*1e6)
		}
	}

	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "case\tTCP throughput (median)\t(min–max)\ttcp_lat (median)\t(min–max)\t")
	for _, s := range subjects {
		fmt.Fprintf(tw, "%s\t%.2f Gbit/s\t%.2f–%.2f\t%.1f µs\t%.1f–%.1f\t\n", s.name,
			median(s.bps)/1e9, slices.Min(s.bps)/1e9, slices.Max(s.bps)/1e9,
			median(s.lat)*1e6, slices.Min(s.lat)*1e6, slices.Max(s.lat)*1e6)
	}
	tw.Flush()
	fmt.Println()
	tw = tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	// The verdict uses the median of per-round ratios: within a round weft and its baseline
	// run back to back, so the ratio cancels the machine's slow drift, which on a shared
	// 2-core machine is larger than the differences measured. The ratio of the medians is
	// printed beside it.
	fmt.Fprintln(tw, "weft / baseline\tthroughput (paired)\t(of medians)\ttarget\t\tlatency (paired)\t(of medians)\ttarget\t\t")
	by := map[string]*subject{}
	for _, s := range subjects {
		by[s.name] = s
	}
	for _, pair := range []struct {
		weft, base string
		minThrough float64
	}{
		{"weft direct", "raw veth", minThrough},
		{"weft vxlan", "raw vxlan", minThrough},
		{"weft direct", "raw routes", minThrough},
		// Same library, same crypto: weft must add nothing.
		{"weft wireguard", "standalone wireguard-go", 1.00},
		// #13: a second network costs nothing next to default (same containers and peers).
		{"weft peers media", "weft peers default", minThrough},
		// The daemon against the same forwarding done by hand.
		{"weft peers default", "raw routes", minThrough},
	} {
		w, b := by[pair.weft], by[pair.base]
		if w == nil || b == nil {
			continue // a case left out (-planes=false)
		}
		tr, lr := pairedRatio(w.bps, b.bps), pairedRatio(w.lat, b.lat)
		fmt.Fprintf(tw, "%s / %s\t%.1f%%\t%.1f%%\t≥ %.0f%%\t%s\t%+.1f%%\t%+.1f%%\t≤ +%.0f%%\t%s\t\n",
			pair.weft, pair.base, tr*100, median(w.bps)/median(b.bps)*100, pair.minThrough*100, verdict(tr >= pair.minThrough),
			(lr-1)*100, (median(w.lat)/median(b.lat)-1)*100, (maxLatency-1)*100, verdict(lr <= maxLatency))
	}
	tw.Flush()
	return nil
}

// roundOrder is the index of the k-th case run in round r of n cases: rotated by r,
// ascending in even rounds and descending in odd ones.
func roundOrder(r, k, n int) int {
	if r%2 == 1 {
		return ((r-k)%n + n) % n
	}
	return (r + k) % n
}

// moduleVersion is the version of module path linked into this binary.
func moduleVersion(path string) string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, m := range bi.Deps {
			if m.Path == path {
				if m.Replace != nil {
					return m.Version + " => " + m.Replace.Path + " " + m.Replace.Version
				}
				return m.Version
			}
		}
	}
	return "(unknown version)"
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// rawVeth makes two namespaces joined by one veth pair, addressed like two containers.
func rawVeth(newLab func(string, int) (*nslab.Lab, error)) (*subject, error) {
	l, err := newLab("veth", 0)
	if err != nil {
		return nil, err
	}
	a, err := l.NewNS("a")
	if err != nil {
		return nil, err
	}
	b, err := l.NewNS("b")
	if err != nil {
		return nil, err
	}
	addrA, addrB := netip.MustParsePrefix("10.40.1.2/16"), netip.MustParsePrefix("10.40.2.2/16")
	err = a.Do(func() error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: mtu, TxQLen: -1}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(b.Fd()))}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		return addrUp("eth0", addrA)
	})
	if err != nil {
		return nil, err
	}
	if err := b.Do(func() error { return addrUp("eth0", addrB) }); err != nil {
		return nil, err
	}
	return &subject{name: "raw veth", client: a, server: b, serverAddr: addrB.Addr()}, nil
}

func addrUp(name string, p netip.Prefix) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	ipn := &netlink.Addr{IPNet: datapath.PrefixToIPNet(p)}
	if err := netlink.AddrAdd(link, ipn); err != nil {
		return err
	}
	return netlink.LinkSetUp(link)
}

// rawVXLAN configures VXLAN by hand with ip(8), the classic way: a transit address on
// the device, static FDB and neighbour entries, one route per remote block.
func rawVXLAN(ctx context.Context, l *nslab.Lab, _ bool) error {
	macs := []string{"02:00:00:00:aa:01", "02:00:00:00:aa:02"}
	for i, h := range l.Hosts {
		o := l.Hosts[1-i]
		cmds := [][]string{
			{"ip", "link", "add", "vxraw", "address", macs[i], "type", "vxlan", "id", "42", "dstport", "4789",
				"local", h.Underlay.Addr().String(), "dev", nslab.UnderlayDev, "nolearning"},
			{"ip", "link", "set", "vxraw", "mtu", "1450", "up"},
			{"ip", "addr", "add", fmt.Sprintf("10.41.0.%d/24", i+1), "dev", "vxraw"},
			{"bridge", "fdb", "add", macs[1-i], "dev", "vxraw", "dst", o.Underlay.Addr().String(), "self", "permanent"},
			{"ip", "neigh", "add", fmt.Sprintf("10.41.0.%d", 2-i), "lladdr", macs[1-i], "dev", "vxraw", "nud", "permanent"},
			{"ip", "route", "add", o.Block.String(), "via", fmt.Sprintf("10.41.0.%d", 2-i), "dev", "vxraw"},
		}
		for _, c := range cmds {
			if _, err := h.Run(ctx, c[0], c[1:]...); err != nil {
				return err
			}
		}
	}
	return nil
}

// rawRoutes routes by hand with ip(8) on the same topology as weft direct: what direct
// mode does, without weft, to tell weft's cost from the cost of the topology itself.
func rawRoutes(ctx context.Context, l *nslab.Lab, _ bool) error {
	for i, h := range l.Hosts {
		o := l.Hosts[1-i]
		if _, err := h.Run(ctx, "ip", "route", "add", o.Block.String(), "via", o.Underlay.Addr().String(), "dev", nslab.UnderlayDev); err != nil {
			return err
		}
	}
	return nil
}

func weftDirect(ctx context.Context, l *nslab.Lab, verbose bool) error {
	for i, h := range l.Hosts {
		d, err := direct.New(direct.Config{Underlay: h.Underlay.Addr(), Logger: logger(verbose, h.Name)})
		if err != nil {
			return err
		}
		peers := []datapath.RemotePeer{l.Hosts[1-i].RemotePeer(nil)}
		if err := h.Do(func() error {
			if err := d.Up(ctx); err != nil {
				return err
			}
			return d.Set(peers)
		}); err != nil {
			return err
		}
	}
	return nil
}

func weftVXLAN(ctx context.Context, l *nslab.Lab, verbose bool) error {
	drivers := make([]*vxlan.Driver, len(l.Hosts))
	for i, h := range l.Hosts {
		d, err := vxlan.New(vxlan.Config{Underlay: h.Underlay.Addr(), Logger: logger(verbose, h.Name)})
		if err != nil {
			return err
		}
		drivers[i] = d
		if err := h.Do(func() error { return d.Up(ctx) }); err != nil {
			return err
		}
	}
	for i, h := range l.Hosts {
		peers := []datapath.RemotePeer{l.Hosts[1-i].RemotePeer(drivers[1-i].MAC())}
		if err := h.Do(func() error { return drivers[i].Set(peers) }); err != nil {
			return err
		}
	}
	return nil
}

// startServer starts a server in n and waits until it listens on the TCP port; the
// returned func stops it (only that process, by its pid).
func startServer(ctx context.Context, n *nslab.NS, port string, argv ...string) (func(), error) {
	cmd := n.Command(context.Background(), argv[0], argv[1:]...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", argv[0], err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(2 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if o, err := n.Run(ctx, "ss", "-Hltn", "sport", "=", ":"+port); err == nil && strings.TrimSpace(o) != "" {
			return stop, nil
		}
		select {
		case <-exited:
			return nil, fmt.Errorf("%s exited: %s", argv[0], out.String())
		case <-ctx.Done():
			stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			return nil, fmt.Errorf("%s not listening on %s after 10s: %s", argv[0], port, out.String())
		}
	}
}

// iperf runs one iperf3 TCP test and returns the receiver's rate in bits/s.
func iperf(ctx context.Context, s *subject, d time.Duration) (float64, error) {
	secs := strconv.Itoa(int(d.Seconds()))
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	out, err := s.client.Command(ctx, "iperf3", "-c", s.serverAddr.String(), "-p", iperfPort, "-t", secs, "-O", "1", "-J").Output()
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		return 0, fmt.Errorf("%v; output: %.300s", errors.Join(err, jerr), out)
	}
	if res.Error != "" || err != nil {
		return 0, fmt.Errorf("%v %s", err, res.Error)
	}
	if res.End.SumReceived.BitsPerSecond <= 0 {
		return 0, fmt.Errorf("no rate in the output: %.300s", out)
	}
	return res.End.SumReceived.BitsPerSecond, nil
}

var qperfLatency = regexp.MustCompile(`latency\s*=\s*([0-9.]+)\s*(ns|us|ms|sec|s)\b`)

// qperf runs one qperf tcp_lat test and returns the one-way latency in seconds.
func qperf(ctx context.Context, s *subject, d time.Duration) (float64, error) {
	secs := strconv.Itoa(int(d.Seconds()))
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	out, err := s.client.Command(ctx, "qperf", "-lp", qperfPort, "-t", secs, s.serverAddr.String(), "tcp_lat").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%w: %s", err, out)
	}
	m := qperfLatency.FindStringSubmatch(string(out))
	if m == nil {
		return 0, fmt.Errorf("no latency in the output: %s", out)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, err
	}
	scale := map[string]float64{"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "sec": 1, "s": 1}[m[2]]
	return v * scale, nil
}

// pairedRatio is the median over rounds of w[r]/b[r].
func pairedRatio(w, b []float64) float64 {
	rs := make([]float64, 0, len(w))
	for r := range min(len(w), len(b)) {
		rs = append(rs, w[r]/b[r])
	}
	return median(rs)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func logger(verbose bool, host string) *slog.Logger {
	if !verbose {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil)).With("host", host)
}
