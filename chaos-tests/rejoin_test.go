package chaostest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// The first peer of a cluster (started without --peers) is stopped, stays down for 10 s and
// is started again: it must find the others — through its member snapshot, or, with the
// snapshot lost, because they retry it — and be seen alive by all within 5 s of its start;
// no route to another host's blocks may vanish from its kernel (nor host 1's routes) while
// it is down and rejoining, and its containers keep talking to the others'.
func TestFirstPeerRestartKeepsForwarding(t *testing.T) {
	mostlyWaiting(t) // 10 s down, three times
	for _, tc := range []struct {
		name, prefix string
		down         func(ctx context.Context, h *lab.Host) error
		loseSnapshot bool
	}{
		{"SIGTERM", "wrjnterm", func(ctx context.Context, h *lab.Host) error { return h.Stop(ctx) }, false},
		{"SIGKILL", "wrjnkill", func(_ context.Context, h *lab.Host) error { return h.Kill() }, false},
		{"snapshot lost", "wrjnnosn", func(ctx context.Context, h *lab.Host) error { return h.Stop(ctx) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			firstPeerRestart(t, tc.prefix, tc.down, tc.loseSnapshot)
		})
	}
}

func firstPeerRestart(t *testing.T, prefix string, stop func(context.Context, *lab.Host) error, loseSnapshot bool) {
	const (
		down       = 10 * time.Second
		seenWithin = 5 * time.Second
	)
	l := newMeshLab(t, prefix, 3)
	ctx := testCtx(t, 4*time.Minute)
	h0, h1 := l.Host(0), l.Host(1)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)

	// Every host routes to the two other hosts' blocks, and host 0 has written the members
	// it knows.
	want := map[*lab.Host][]string{}
	waitFor(t, ctx, 30*time.Second, "routes to every other host's block", func() error {
		for _, h := range []*lab.Host{h0, h1} {
			dsts, err := blockRoutes(h)
			if err != nil {
				return err
			}
			if len(dsts) != 2 {
				return fmt.Errorf("%s routes to %v; want one block per other host", h.Name, dsts)
			}
			want[h] = dsts
		}
		return nil
	})
	snapshot := filepath.Join(h0.DataDir, "members.json")
	waitFor(t, ctx, 30*time.Second, "host 0's member snapshot", func() error {
		b, err := os.ReadFile(snapshot)
		if err != nil {
			return err
		}
		for _, h := range l.Hosts()[1:] {
			if !strings.Contains(string(b), `"`+h.Name+`"`) {
				return fmt.Errorf("%s lacks %s:\n%s", snapshot, h.Name, b)
			}
		}
		return nil
	})

	// From here to the end: watch the routes of host 0 and host 1, and ping both ways.
	watchCtx, stopWatch := context.WithCancel(ctx)
	var (
		mu      sync.Mutex
		vanish  []string
		samples int
		wg      sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for watchCtx.Err() == nil {
			for h, dsts := range want {
				got, err := blockRoutes(h)
				mu.Lock()
				samples++
				switch {
				case err != nil:
					vanish = append(vanish, fmt.Sprintf("%s: %v", h.Name, err))
				default:
					for _, d := range dsts {
						if !slices.Contains(got, d) {
							vanish = append(vanish, fmt.Sprintf("%s %s: route to %s gone (has %v)", time.Now().Format("15:04:05.000"), h.Name, d, got))
						}
					}
				}
				mu.Unlock()
			}
			select {
			case <-watchCtx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	type pingResult struct {
		sent, received int
		err            error
	}
	pings := make([]pingResult, 2)
	for i, pair := range [][2]placed{{cs[0], cs[1]}, {cs[1], cs[0]}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent, recv, err := pingUntil(watchCtx, pair[0].ctr, pair[1].addr.String())
			pings[i] = pingResult{sent, recv, err}
		}()
	}

	if err := stop(ctx, h0); err != nil {
		t.Fatalf("stop host 0's peer: %v", err)
	}
	stopped := time.Now()
	if loseSnapshot {
		if err := os.Remove(snapshot); err != nil {
			t.Fatal(err)
		}
	}
	// Down for a fixed time: the scenario itself, not a wait for a condition.
	select {
	case <-time.After(down):
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	restart := time.Now()
	if err := h0.Start(ctx); err != nil {
		t.Fatalf("start host 0's peer again: %v", err)
	}
	ready := time.Since(restart)
	waitFor(t, ctx, 30*time.Second, "host 0 alive everywhere", func() error { return aliveEverywhere(ctx, l.Hosts()) })
	seen := time.Since(restart)
	t.Logf("host 0 down %v; after its start: ready %v, seen alive by all %v",
		restart.Sub(stopped).Round(time.Millisecond), ready.Round(time.Millisecond), seen.Round(time.Millisecond))
	if seen > seenWithin {
		t.Errorf("host 0 seen alive by all %v after its start, want at most %v", seen.Round(time.Millisecond), seenWithin)
	}

	// Keep watching until host 0's datapath has left its start-up phase and converged
	// exactly for a few rounds: that is when a wrong view would withdraw routes.
	waitFor(t, ctx, time.Minute, "host 0's datapath converging exactly", func() error {
		if !strings.Contains(h0.LogTail(200), "the datapath converges exactly") {
			return fmt.Errorf("no such log line yet")
		}
		return nil
	})
	mu.Lock()
	target := samples + 2*3*len(want) // three more rounds of 500 ms for each watched host
	mu.Unlock()
	waitFor(t, ctx, 30*time.Second, "more route samples", func() error {
		mu.Lock()
		defer mu.Unlock()
		if samples < target {
			return fmt.Errorf("%d of %d samples", samples, target)
		}
		return nil
	})
	stopWatch()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d route samples of %s and %s", samples, h0.Name, h1.Name)
	if len(vanish) > 0 {
		t.Errorf("%d samples lacked a route, first ones:\n%s", len(vanish), strings.Join(vanish[:min(len(vanish), 10)], "\n"))
	}
	for i, p := range pings {
		lost := p.sent - p.received
		t.Logf("ping %s -> %s: %d sent, %d lost", cs[i].ctr.Name, cs[1-i].ctr.Name, p.sent, lost)
		switch {
		case p.err != nil:
			t.Errorf("ping %s: %v", cs[i].ctr.Name, p.err)
		case p.sent < 20:
			// Five a second for 15 s or more; a loaded machine delays ping's timer, so only
			// check that the pings covered the down time at all.
			t.Errorf("ping %s sent only %d", cs[i].ctr.Name, p.sent)
		case lost > p.sent/20:
			t.Errorf("ping %s lost %d of %d, want at most 5%%", cs[i].ctr.Name, lost, p.sent)
		}
	}
}

// blockRoutes lists the destinations of h's routes to remote blocks (10.40.x.y/N more
// specific than the /16).
func blockRoutes(h *lab.Host) ([]string, error) {
	var out []string
	err := h.Do(func() error {
		routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst != nil && strings.HasPrefix(r.Dst.String(), "10.40.") && !strings.HasSuffix(r.Dst.String(), "/16") {
				out = append(out, r.Dst.String())
			}
		}
		return nil
	})
	slices.Sort(out)
	return out, err
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) (?:packets )?received`)

// pingUntil pings dst from ctr five times a second until ctx ends and returns how many
// echoes went out and came back. ping prints its statistics on SIGINT, which it gets by PID
// (`ip netns exec` execs ping in its own process); -w bounds it should that fail.
func pingUntil(ctx context.Context, ctr *lab.Container, dst string) (sent, received int, err error) {
	var out bytes.Buffer
	cmd := exec.Command("ip", "netns", "exec", ctr.Name, "ping", "-i", "0.2", "-W", "1", "-w", "240", dst)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var werr error
	select {
	case werr = <-done:
	case <-ctx.Done():
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			return 0, 0, fmt.Errorf("interrupt ping: %v", err)
		}
		werr = <-done
	}
	m := pingStats.FindSubmatch(out.Bytes())
	if m == nil {
		return 0, 0, fmt.Errorf("no ping statistics (%v): %s", werr, out.Bytes())
	}
	sent, _ = strconv.Atoi(string(m[1]))
	received, _ = strconv.Atoi(string(m[2]))
	return sent, received, nil
}
