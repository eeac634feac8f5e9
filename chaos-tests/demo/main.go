// Command demo is what `make demo` runs: it builds a weft lab (hosts are network
// namespaces on a shared underlay, each running a real `weft peer`), attaches containers
// through libcni and the real plugin, shows the CNI results, pings between the
// containers, prints `weft status`, and keeps everything up until Ctrl-C (or Enter). After a
// clean teardown it exits 0, interrupted or not.
//
//	make demo        # builds bin/weft, bin/weft-cni and bin/weft-demo, runs bin/weft-demo -bin bin
//	make demo-down   # bin/weft-demo -down: remove a lab left by a killed demo
//
// Run it as a binary: `go run` exits 1 after a SIGINT whatever the demo did.
//
// It needs root. Every namespace is named weftdemo-…; the lab directory (peer data,
// sockets, logs, pid files) is /tmp/weftdemo unless -dir says otherwise.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"golang.org/x/sys/unix"

	"github.com/weftnet/weft/chaos-tests/lab"
)

const prefix = "weftdemo"

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() (err error) {
	var (
		binDir     = flag.String("bin", "bin", "directory holding the weft and weft-cni binaries")
		hosts      = flag.Int("hosts", 3, "number of hosts (peers)")
		containers = flag.Int("containers", 6, "number of containers, spread over the hosts")
		dir        = flag.String("dir", filepath.Join(os.TempDir(), prefix), "lab directory (removed on exit)")
		down       = flag.Bool("down", false, "remove a leftover demo lab (namespaces, peers recorded in -dir) and exit")
		verbose    = flag.Bool("v", false, "log the lab's own steps")
		noWait     = flag.Bool("no-wait", false, "tear down right after the demo instead of waiting for Ctrl-C")
	)
	flag.Parse()
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	if os.Geteuid() != 0 {
		return errors.New("the demo needs root (network namespaces); try sudo")
	}
	if *down {
		step("removing leftover demo lab (prefix %s, dir %s)", prefix, *dir)
		return lab.Cleanup(prefix, *dir, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	}
	if _, err := os.Stat(*dir); err == nil {
		return fmt.Errorf("%s exists: a demo is running or was killed; run with -down first", *dir)
	}

	defer takeTerminal()()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	step("building a lab: %d host(s) on underlay 198.18.0.0/24, each running `weft peer`; host 0 is the first peer, the others are seeded with it", *hosts)
	var l *lab.Lab
	l, err = lab.New(ctx, lab.Config{Prefix: prefix, Hosts: *hosts, BinDir: *binDir, Logger: logger, Dir: *dir, NoStart: true,
		PeerArgs: func(i int) []string {
			if i == 0 {
				return nil
			}
			return []string{"--peers", l.Host(0).Addr.Addr().String(), "--raft-voters", fmt.Sprint(min(*hosts, 3))}
		}})
	if err != nil {
		return err
	}
	step("cluster key: %s (random, mode 0600, as `weft keygen -o FILE` makes one); every peer runs with --key-file, so gossip, Raft and probes are authenticated", l.KeyFile())
	defer func() {
		step("tearing down")
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("teardown: %w", cerr))
			return
		}
		step("lab removed")
	}()
	if err := show(ctx, l, *hosts, *containers, *noWait); err != nil {
		if ctx.Err() != nil {
			// Ctrl-C while the demo was still running: what failed was the interruption,
			// and the teardown above decides how the demo ends.
			step("interrupted: %v", err)
			return nil
		}
		return err
	}
	return nil
}

// show starts the peers, attaches and pings the containers, prints the status commands and,
// unless noWait, waits for Ctrl-C (or Enter, on a terminal).
func show(ctx context.Context, l *lab.Lab, hosts, containers int, noWait bool) error {
	if err := l.StartAll(ctx); err != nil {
		return err
	}
	for _, h := range l.Hosts() {
		fmt.Printf("    %s: netns %s, eth0 %s, peer pid %d, socket %s, log %s\n",
			h.Name, h.Name, h.Addr, h.PID(), h.Socket, h.LogPath)
	}

	step("waiting for the mesh (memberlist) and the Raft cluster that owns the address blocks")
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	err := lab.Poll(wctx, 250*time.Millisecond, func() error { return meshReady(wctx, l) })
	cancel()
	if err != nil {
		return fmt.Errorf("the mesh did not form: %w", err)
	}
	out, _ := l.Host(0).CLI(ctx, "status", "peers")
	fmt.Println(indent(strings.TrimRight(string(out), "\n")))

	type attached struct {
		ctr  *lab.Container
		addr netip.Prefix
	}
	var all []attached
	for j := range containers {
		h := l.Host(j % hosts)
		cni, err := h.CNI(lab.CNIOptions{})
		if err != nil {
			return err
		}
		ctr, err := h.NewContainer()
		if err != nil {
			return err
		}
		step("CNI ADD %s (netns %s) on %s through libcni → weft-cni → peer", ctr.ID, ctr.Name, h.Name)
		res, err := cni.Add(ctx, ctr.RuntimeConf("eth0"))
		if err != nil {
			return fmt.Errorf("ADD %s: %w\n%s", ctr.ID, err, h.LogTail(20))
		}
		r, err := current.GetResult(res)
		if err != nil {
			return err
		}
		js, _ := json.MarshalIndent(r, "    ", "  ")
		fmt.Printf("    result (cniVersion %s):\n    %s\n", res.Version(), js)
		a, err := lab.ResultAddress(res)
		if err != nil {
			return err
		}
		all = append(all, attached{ctr, a})
	}

	failed := 0
	for _, src := range all {
		for _, dst := range all {
			if src.ctr == dst.ctr {
				continue
			}
			if src.addr.Addr() == dst.addr.Addr() {
				failed++
				step("ping %s → %s: BUG: both hold %s", src.ctr.ID, dst.ctr.ID, src.addr.Addr())
				continue
			}
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := lab.Poll(pctx, 200*time.Millisecond, func() error { return src.ctr.Ping(pctx, dst.addr.Addr()) })
			cancel()
			if err != nil {
				failed++
				step("ping %s (%s) → %s (%s): FAILED: %v", src.ctr.ID, src.addr.Addr(), dst.ctr.ID, dst.addr.Addr(), err)
			} else {
				step("ping %s (%s) → %s (%s): ok", src.ctr.ID, src.addr.Addr(), dst.ctr.ID, dst.addr.Addr())
			}
		}
	}

	for _, h := range l.Hosts() {
		step("weft status --socket %s   (on %s)", h.Socket, h.Name)
		out, err := h.StatusText(ctx)
		if err != nil {
			return err
		}
		fmt.Println(indent(strings.TrimRight(out, "\n")))
	}
	// Block usage travels by gossip: give it a moment so the table below is complete.
	uctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	lab.Poll(uctx, 200*time.Millisecond, func() error {
		var st struct {
			Peers []struct {
				Used *int `json:"used"`
			} `json:"peers"`
		}
		if err := cliJSON(uctx, l.Host(0), &st, "status", "ipam"); err != nil {
			return err
		}
		for _, p := range st.Peers {
			if p.Used == nil {
				return errors.New("usage not known yet")
			}
		}
		return nil
	})
	cancel()
	step("weft status connections   (on %s): the link chosen for each remote peer", l.Host(0).Name)
	out, _ = l.Host(0).CLI(ctx, "status", "connections")
	fmt.Println(indent(strings.TrimRight(string(out), "\n")))
	step("weft status ipam   (on %s): which peer owns which block, by Raft", l.Host(0).Name)
	out, _ = l.Host(0).CLI(ctx, "status", "ipam")
	fmt.Println(indent(strings.TrimRight(string(out), "\n")))
	if failed > 0 {
		step("%d ping(s) failed", failed)
	}
	if noWait {
		return nil
	}
	if len(all) > 1 {
		step("lab is up. Try: sudo ip netns exec %s ping %s", all[0].ctr.Name, all[len(all)-1].addr.Addr())
	}
	enter := pressedEnter()
	if enter != nil {
		step("Enter or Ctrl-C tears it down")
	} else {
		step("Ctrl-C tears it down")
	}
	select {
	case <-ctx.Done():
		fmt.Println()
	case <-enter:
	}
	return nil
}

// takeTerminal makes the demo the terminal's foreground process group, so that Ctrl-C
// interrupts the demo alone: under `make demo`, make then sees the demo's own exit status (0
// after a clean teardown) instead of being interrupted itself and reporting it. The returned
// function gives the terminal back to the group that had it. Nothing changes when stdin is
// not a terminal.
func takeTerminal() (giveBack func()) {
	fd := int(os.Stdin.Fd())
	orig, err := unix.IoctlGetInt(fd, unix.TIOCGPGRP)
	if err != nil {
		return func() {}
	}
	if err := unix.Setpgid(0, 0); err != nil {
		return func() {}
	}
	// A process outside the foreground group may change it only with SIGTTOU ignored.
	signal.Ignore(syscall.SIGTTOU)
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPGRP, unix.Getpgrp()); err != nil {
		return func() {}
	}
	return func() { unix.IoctlSetPointerInt(fd, unix.TIOCSPGRP, orig) }
}

// pressedEnter is closed when a line is read from stdin, if stdin is a terminal; nil
// otherwise (under a script or `timeout`, where stdin may be empty and must not end the demo).
func pressedEnter() <-chan struct{} {
	if _, err := unix.IoctlGetTermios(int(os.Stdin.Fd()), unix.TCGETS); err != nil {
		return nil // not a terminal
	}
	done := make(chan struct{})
	go func() {
		// The goroutine outlives the demo's wait when Ctrl-C comes first; the process exits
		// right after the teardown, so it is never left behind for long.
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err == nil {
			close(done)
		}
	}()
	return done
}

// meshReady: every peer sees every other alive and knows a Raft leader.
func meshReady(ctx context.Context, l *lab.Lab) error {
	for _, h := range l.Hosts() {
		var peers []struct {
			State string `json:"state"`
		}
		if err := cliJSON(ctx, h, &peers, "status", "peers"); err != nil {
			return err
		}
		alive := 0
		for _, p := range peers {
			if p.State == "alive" {
				alive++
			}
		}
		if alive != len(l.Hosts()) {
			return fmt.Errorf("%s sees %d of %d peers", h.Name, alive, len(l.Hosts()))
		}
		var ipam struct {
			Leader string `json:"leader"`
		}
		if err := cliJSON(ctx, h, &ipam, "status", "ipam"); err != nil {
			return err
		}
		if ipam.Leader == "" {
			return fmt.Errorf("%s knows no raft leader yet", h.Name)
		}
	}
	return nil
}

func cliJSON(ctx context.Context, h *lab.Host, v any, args ...string) error {
	out, err := h.CLI(ctx, append(args, "--json")...)
	if err != nil {
		return err
	}
	return json.Unmarshal(out, v)
}

func step(format string, args ...any) {
	fmt.Printf("==> "+format+"\n", args...)
}

func indent(s string) string {
	out := "    "
	for _, r := range s {
		out += string(r)
		if r == '\n' {
			out += "    "
		}
	}
	return out
}
