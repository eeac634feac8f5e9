package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// sriovOpts selects the SR-IOV comparison (#14): ADD and DEL of a VF attachment (a stand-in
// VF: a macvlan listed in a faithful sysfs tree, moved into the container, renamed,
// addressed) against a veth attachment on a bridge network, both as net1 of the same
// containers' kind, interleaved in one lab host.
type sriovOpts struct {
	vfs    int    // VFs (and so attachments of each kind live at the peak) per round
	rounds int    // rounds of vfs ADDs then vfs DELs per kind
	prefix string // lab prefix
}

// sriovFlags registers the comparison's flags; run calls it before flag.Parse.
func sriovFlags() *sriovOpts {
	o := &sriovOpts{}
	flag.IntVar(&o.vfs, "sriov-vfs", 16, "stand-in VFs for the SR-IOV vs veth comparison (1..63); 0 skips it")
	flag.IntVar(&o.rounds, "sriov-rounds", 5, "rounds of ADD-all then DEL-all in the SR-IOV comparison")
	flag.StringVar(&o.prefix, "sriov-prefix", "weftbsr", "lab name prefix of the SR-IOV comparison")
	return o
}

// runSRIOV times ADD and DEL of net1 on an SR-IOV network (--mode sriov, --dpdk off) and on
// a bridge network, o.rounds × o.vfs each, alternating which goes first, and prints medians,
// p99 and the SR-IOV/veth ratios. Only the bare libcni calls are timed; the SR-IOV DEL
// includes returning the VF to the host under its name, MAC and MTU.
func runSRIOV(ctx context.Context, binDir string, o *sriovOpts, logger *slog.Logger) error {
	if o.vfs < 1 || o.vfs > 63 || o.rounds < 1 {
		return fmt.Errorf("-sriov-vfs %d must be 1..63 and -sriov-rounds %d positive", o.vfs, o.rounds)
	}
	l, err := lab.New(ctx, lab.Config{Prefix: o.prefix, Hosts: 1, BinDir: binDir, Logger: logger,
		SRIOV: &lab.SRIOVConfig{VFs: o.vfs}})
	if err != nil {
		return err
	}
	defer l.Close()
	h := l.Host(0)
	// Setup polls (a fresh peer may still elect its Raft leader), bounded.
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, args := range [][]string{
		{"network", "create", "fast", "--subnet", "10.77.0.0/24", "--mode", "sriov", "--pf", h.SRIOVPF(), "--dpdk", "off"},
		{"network", "create", "slow", "--subnet", "10.76.0.0/24"},
	} {
		if err := lab.Poll(sctx, 250*time.Millisecond, func() error {
			_, err := h.CLI(sctx, args...)
			return err
		}); err != nil {
			return fmt.Errorf("weft %v: %w", args, err)
		}
	}
	var subjects []*subject
	for _, s := range []struct{ name, network string }{{"sriov", "fast"}, {"veth", "slow"}} {
		c, err := h.CNI(lab.CNIOptions{Name: "weft-" + s.network, Network: s.network})
		if err != nil {
			return err
		}
		subjects = append(subjects, &subject{name: s.name, cni: c})
	}

	// Warm up both paths once (first block of each network, page cache) outside the sample.
	warm, err := h.NewContainer()
	if err != nil {
		return err
	}
	for _, s := range subjects {
		rt := &libcni.RuntimeConf{ContainerID: "warmup", NetNS: warm.NSPath, IfName: "net1"}
		var res types.Result
		if err := lab.Poll(sctx, 250*time.Millisecond, func() error {
			var err error
			res, err = s.cni.Add(sctx, rt)
			return err
		}); err != nil {
			return fmt.Errorf("%s warm-up ADD: %w", s.name, err)
		}
		if s.name == "sriov" {
			if err := isVF(h, res); err != nil {
				return fmt.Errorf("the sriov network attached no VF, nothing to compare: %w", err)
			}
		}
		if err := s.cni.Del(ctx, rt); err != nil {
			return fmt.Errorf("%s warm-up DEL: %w", s.name, err)
		}
	}
	warm.Delete()

	fmt.Printf("timing %d rounds of %d ADDs then %d DELs per kind (net1), interleaved…\n", o.rounds, o.vfs, o.vfs)
	for r := range o.rounds {
		for _, s := range subjects {
			s.ctrs = s.ctrs[:0]
			for range o.vfs {
				c, err := h.NewContainer()
				if err != nil {
					return err
				}
				s.ctrs = append(s.ctrs, c)
			}
		}
		for _, add := range []bool{true, false} {
			for i := range o.vfs {
				for _, s := range order(subjects, r+i) {
					d, err := timedIf(h, s, i, "net1", add)
					if err != nil {
						return fmt.Errorf("%s round %d %s #%d: %w", s.name, r, verb(add), i, err)
					}
					if add {
						s.add = append(s.add, d)
					} else {
						s.del = append(s.del, d)
					}
				}
			}
		}
		for _, s := range subjects {
			for _, c := range s.ctrs {
				c.Delete()
			}
		}
	}

	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "attachment\tADD p50\tADD p99\tDEL p50\tDEL p99\t")
	for _, s := range subjects {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t\n", s.name,
			ms(pct(s.add, 50)), ms(pct(s.add, 99)), ms(pct(s.del, 50)), ms(pct(s.del, 99)))
	}
	sr, ve := subjects[0], subjects[1]
	fmt.Fprintf(w, "sriov/veth\t%.2fx\t%.2fx\t%.2fx\t%.2fx\t\n",
		ratio(pct(sr.add, 50), pct(ve.add, 50)), ratio(pct(sr.add, 99), pct(ve.add, 99)),
		ratio(pct(sr.del, 50), pct(ve.del, 50)), ratio(pct(sr.del, 99), pct(ve.del, 99)))
	w.Flush()
	fmt.Printf("(n=%d per kind, %d stand-in VFs, cniVersion 1.1.0, 1 lab host, %s)\n",
		len(sr.add), o.vfs, time.Now().Format(time.RFC3339))
	if len(sr.add) != len(ve.add) || len(sr.del) != len(ve.del) {
		return errors.New("unequal sample counts")
	}
	return nil
}

// isVF checks that an ADD result's interface is one of h's stand-in VFs (by MAC).
func isVF(h *lab.Host, res types.Result) error {
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return err
	}
	fix := h.SRIOV()
	for _, x := range r.Interfaces {
		for i := range 64 { // sriovtest allows 64 VFs
			if m := fix.MAC(i); len(m) > 0 && m.String() == x.Mac {
				return nil
			}
		}
	}
	return fmt.Errorf("result interfaces %+v hold no stand-in VF's mac", r.Interfaces)
}

func verb(add bool) string {
	if add {
		return "ADD"
	}
	return "DEL"
}

// timedIf runs one ADD or DEL of interface ifname for container i of s inside the host
// namespace and returns the duration of the bare libcni call.
func timedIf(h *lab.Host, s *subject, i int, ifname string, add bool) (time.Duration, error) {
	conf, list := s.cni.Libcni()
	c := s.ctrs[i]
	rt := &libcni.RuntimeConf{ContainerID: c.ID, NetNS: c.NSPath, IfName: ifname}
	var d time.Duration
	err := h.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var err error
		start := time.Now()
		if add {
			_, err = conf.AddNetworkList(ctx, list, rt)
		} else {
			err = conf.DelNetworkList(ctx, list, rt)
		}
		d = time.Since(start)
		return err
	})
	return d, err
}
