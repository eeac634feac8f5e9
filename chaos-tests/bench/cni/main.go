// Command cni measures CNI ADD and DEL latency of weft against the reference bridge +
// host-local plugins, in the same lab host namespace and interleaved in one run so that
// noise hits both alike.
//
//	go build -o bin/ ./cmd/... && go run ./chaos-tests/bench/cni -bin bin -n 150
//
// Then (sriov.go) ADD/DEL of an SR-IOV attachment on stand-in VFs against a veth one
// (-sriov-vfs 0 skips it).
//
// Container namespaces are created before timing; only the libcni AddNetworkList and
// DelNetworkList calls are timed. n attachments of each kind are live at the peak. It
// exits non-zero only when something fails, never because of the ratios. Needs root.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/weftnet/weft/chaos-tests/lab"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// subject is one CNI configuration under test.
type subject struct {
	name     string
	cni      *lab.CNI
	ctrs     []*lab.Container
	add, del []time.Duration
}

func run() error {
	var (
		binDir  = flag.String("bin", "bin", "directory holding the weft and weft-cni binaries")
		n       = flag.Int("n", 150, "attachments per plugin (at least 100 recommended)")
		prefix  = flag.String("prefix", "weftbnch", "lab name prefix")
		verbose = flag.Bool("v", false, "log the lab's steps")
		sriov   = sriovFlags()
	)
	flag.Parse()
	if *n < 1 {
		return errors.New("-n must be positive")
	}
	if os.Geteuid() != 0 {
		return errors.New("the benchmark needs root (network namespaces)")
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx := context.Background()

	l, err := lab.New(ctx, lab.Config{Prefix: *prefix, Hosts: 1, BinDir: *binDir, Logger: logger})
	if err != nil {
		return err
	}
	defer l.Close()
	h := l.Host(0)

	weftCNI, err := h.CNI(lab.CNIOptions{CNIVersion: "1.0.0"})
	if err != nil {
		return err
	}
	refConf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0",
		"name":       "refnet",
		"plugins": []any{map[string]any{
			"type":      "bridge",
			"bridge":    "refbr0",
			"isGateway": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": "10.99.0.0/16"}}},
				"dataDir": filepath.Join(l.Dir(), "host-local"),
			},
		}},
	})
	refCNI, err := h.CNI(lab.CNIOptions{ConfList: refConf})
	if err != nil {
		return err
	}
	subjects := []*subject{{name: "weft", cni: weftCNI}, {name: "bridge+host-local", cni: refCNI}}

	fmt.Printf("creating %d container namespaces…\n", 2**n)
	for _, s := range subjects {
		for range *n {
			c, err := h.NewContainer()
			if err != nil {
				return err
			}
			s.ctrs = append(s.ctrs, c)
		}
	}

	// Warm up both paths once (page cache, first bridge creation) outside the sample.
	for _, s := range subjects {
		c := s.ctrs[0]
		rt := &libcni.RuntimeConf{ContainerID: "warmup", NetNS: c.NSPath, IfName: "eth0"}
		if _, err := s.cni.Add(ctx, rt); err != nil {
			return fmt.Errorf("%s warm-up ADD: %w", s.name, err)
		}
		if err := s.cni.Del(ctx, rt); err != nil {
			return fmt.Errorf("%s warm-up DEL: %w", s.name, err)
		}
	}

	fmt.Printf("timing %d ADDs then %d DELs per plugin, interleaved…\n", *n, *n)
	for i := range *n {
		for _, s := range order(subjects, i) {
			d, err := timed(h, s, i, true)
			if err != nil {
				return fmt.Errorf("%s ADD #%d: %w", s.name, i, err)
			}
			s.add = append(s.add, d)
		}
	}
	for i := range *n {
		for _, s := range order(subjects, i) {
			d, err := timed(h, s, i, false)
			if err != nil {
				return fmt.Errorf("%s DEL #%d: %w", s.name, i, err)
			}
			s.del = append(s.del, d)
		}
	}

	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "plugin\tADD p50\tADD p99\tDEL p50\tDEL p99\t")
	for _, s := range subjects {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t\n", s.name,
			ms(pct(s.add, 50)), ms(pct(s.add, 99)), ms(pct(s.del, 50)), ms(pct(s.del, 99)))
	}
	wf, rf := subjects[0], subjects[1]
	fmt.Fprintf(w, "weft/reference\t%.2fx\t%.2fx\t%.2fx\t%.2fx\t\n",
		ratio(pct(wf.add, 50), pct(rf.add, 50)), ratio(pct(wf.add, 99), pct(rf.add, 99)),
		ratio(pct(wf.del, 50), pct(rf.del, 50)), ratio(pct(wf.del, 99), pct(rf.del, 99)))
	w.Flush()
	fmt.Printf("(n=%d per plugin, cniVersion 1.0.0, 1 lab host, %s)\n", *n, time.Now().Format(time.RFC3339))
	if sriov.vfs == 0 {
		return nil
	}
	l.Close() // one lab at a time on the machine
	return runSRIOV(ctx, *binDir, sriov, logger)
}

// order alternates which plugin goes first, so neither always runs right after the other.
func order(s []*subject, i int) []*subject {
	if i%2 == 0 {
		return s
	}
	return []*subject{s[1], s[0]}
}

// timed runs one ADD or DEL of eth0 for container i of s inside the host namespace and
// returns the duration of the bare libcni call.
func timed(h *lab.Host, s *subject, i int, add bool) (time.Duration, error) {
	return timedIf(h, s, i, "eth0", add)
}

// pct returns the p-th percentile (nearest rank).
func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	k := (p*len(s) + 99) / 100 // ceil(p/100 · n)
	if k < 1 {
		k = 1
	}
	return s[k-1]
}

func ratio(a, b time.Duration) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }
