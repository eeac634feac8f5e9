package chaostest

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/mesh/segments"
	"github.com/weftnet/weft/router"
)

// A 30 ms delay line between two hosts (15 ms each way on the underlay) raises their
// container↔container figure by 30 ± 5 ms, measured and estimated, while the
// container↔bridge segments stay under 1 ms; /status, `weft status segments` and the
// status page in Chromium (pageShowsSegments) name the underlay as the segment that grew.
// One lab and one baseline wait for all three views (they were two tests, each waiting
// half a minute for its own baseline).
func TestSegments(t *testing.T) {
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("this test needs Debian's chromium package (apt-get install -y chromium; .ci/run installs it): %v", err)
	}
	// --no-direct: container traffic rides VXLAN to the other host's underlay address, so it
	// takes the host route through the delay line (direct routing would reach the other host
	// on L2 and bypass it). Probes every 100 ms: underlay probes run 5 times slower than link
	// probes (slower still on a quiet link), and the underlay's median must turn over before
	// the underlay can be blamed.
	l := newMeshLab(t, "wsgseg", 2, "--no-direct", "--probe-interval", "100ms")
	ctx := testCtx(t, 5*time.Minute)
	a, b := l.Host(0), l.Host(1)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)

	fig := func(p router.SegmentPath, seg string) router.SegmentFigure {
		for _, f := range p.Segments {
			if f.Segment == seg {
				return f
			}
		}
		return router.SegmentFigure{}
	}
	measure := func(from *lab.Host, to netip.Addr) (router.MeasureResult, error) {
		var res router.MeasureResult
		err := cni.NewClient(from.Socket, 30*time.Second).Post(testCtx(t, 30*time.Second), "/v1/segments/measure",
			router.MeasureRequest{Address: to, Count: 10}, &res)
		if err == nil && res.Lost > 2 {
			err = fmt.Errorf("%d of %d echoes lost", res.Lost, res.Sent)
		}
		return res, err
	}

	// Every segment measured and a baseline for each (5 figures older than 20 s).
	var before router.SegmentPath
	waitFor(t, ctx, 90*time.Second, "every segment of A's path to B with a baseline", func() error {
		p, err := segmentPathOf(t, a, b.Name)
		if err != nil {
			return err
		}
		for _, f := range p.Segments {
			if f.Samples == 0 || !f.HasBaseline {
				return fmt.Errorf("segment %+v not measured or without a baseline", f)
			}
		}
		before = p
		return nil
	})
	base, err := measure(a, cs[1].addr)
	if err != nil {
		t.Fatalf("on-demand measurement before the delay: %v", err)
	}
	t.Logf("before: %+v; measured end to end %.2fms", before.Segments, base.RTTms)

	// The underlay namespace becomes the router between A and B (as in TestRelays).
	pageDelayLine(t, ctx, l, a, b, 15*time.Millisecond)

	waitFor(t, ctx, 90*time.Second, "A's end-to-end figure to B up by 30 ± 5 ms, the underlay named", func() error {
		p, err := segmentPathOf(t, a, b.Name)
		if err != nil {
			return err
		}
		e2e := fig(p, segments.EndToEnd)
		grown := e2e.RTTms - e2e.BaselineRTTms
		if !e2e.Grew || grown < 25 || grown > 35 || p.Slow != segments.Underlay {
			return fmt.Errorf("end to end %.2fms against %.2fms (+%.2f), grew %v, slow %q; segments %+v",
				e2e.RTTms, e2e.BaselineRTTms, grown, e2e.Grew, p.Slow, p.Segments)
		}
		for _, seg := range []string{segments.Bridge, segments.RemoteBridge} {
			if f := fig(p, seg); f.Grew || f.RTTms >= 1 || f.Samples == 0 {
				return fmt.Errorf("%s segment %+v: want under 1 ms and not grown", seg, f)
			}
		}
		return nil
	})
	waitFor(t, ctx, 30*time.Second, "the measured end-to-end RTT up by 30 ± 5 ms", func() error {
		res, err := measure(a, cs[1].addr)
		if err != nil {
			return err
		}
		if d := res.RTTms - base.RTTms; d < 25 || d > 35 {
			return fmt.Errorf("measured %.2fms against %.2fms before (+%.2f); samples %v", res.RTTms, base.RTTms, d, res.Samples)
		}
		return nil
	})
	out, err := a.CLI(ctx, "status", "segments")
	if err != nil {
		t.Fatalf("weft status segments: %v %s", err, out)
	}
	if !strings.Contains(string(out), "slow segment: "+segments.Underlay) || !strings.Contains(string(out), "GREW") {
		t.Fatalf("weft status segments does not name the underlay:\n%s", out)
	}
	t.Logf("weft status segments on %s:\n%s", a.Name, out)
	// The interface counters of what weft owns: the bridge, the VXLAN device, the underlay
	// NIC and the veths summed per network.
	var st router.SegmentsStatus
	if err := cliJSON(ctx, a, &st, "status", "segments"); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, f := range st.Interfaces {
		if f.Counters.TxPackets > 0 || f.Counters.RxPackets > 0 {
			kinds[f.Kind] = true
		}
	}
	for _, k := range []string{segments.KindBridge, segments.KindVXLAN, segments.KindUnderlay, segments.KindVeth} {
		if !kinds[k] {
			t.Errorf("no counters of a %s interface with traffic: %+v", k, st.Interfaces)
		}
	}
	pageShowsSegments(t, ctx, browser, a, b)
}

// Over WireGuard both ends count bytes per peer: each side's TX against the other's RX
// gives the loss cross-check, near 0 on a clean underlay; the WireGuard device's counters
// are listed with the others. A 30 s cross-check window (2 min in production) so a ratio
// shows after 15 s, not a minute.
func TestSegmentsCrossCheckWireGuard(t *testing.T) {
	mostlyWaiting(t) // the cross-check window
	pw := passwordFile(t, "a long cluster password for the segments test")
	l := newMeshLab(t, "wsgcc", 2, "--password-file", pw, "--encrypt", "always", "--probe-interval", "200ms",
		"--loss-crosscheck-window", "30s")
	ctx := testCtx(t, 8*time.Minute)
	a, b := l.Host(0), l.Host(1)
	cs := onePerHost(t, ctx, l)
	pingAll(t, ctx, cs)
	// crossCheck waits until from's cross-check to `to` lies in [lo, hi].
	crossCheck := func(from, to *lab.Host, lo, hi float64, within time.Duration) {
		waitFor(t, ctx, within, fmt.Sprintf("%s's loss cross-check to %s in [%.2f, %.2f]", from.Name, to.Name, lo, hi), func() error {
			var st router.SegmentsStatus
			if err := cliJSON(testCtx(t, 10*time.Second), from, &st, "status", "segments"); err != nil {
				return err
			}
			wg := false
			for _, f := range st.Interfaces {
				wg = wg || f.Kind == segments.KindWireGuard && f.Counters.TxPackets > 0
			}
			if !wg {
				return fmt.Errorf("no WireGuard device with traffic in %+v", st.Interfaces)
			}
			for _, p := range st.Paths {
				if p.Peer != to.Name {
					continue
				}
				if p.LossCrossCheck == nil {
					return fmt.Errorf("no cross-check yet on %+v", p)
				}
				if r := *p.LossCrossCheck; r < lo || r > hi {
					return fmt.Errorf("cross-check %.3f", r)
				}
				t.Logf("%s → %s: tunnel loss cross-check %.4f", from.Name, to.Name, *p.LossCrossCheck)
				return nil
			}
			return fmt.Errorf("no path to %s", to.Name)
		})
	}
	crossCheck(a, b, 0, 0.05, 75*time.Second)
	crossCheck(b, a, 0, 0.05, 30*time.Second)

	// 20 % loss each way on the underlay between A and B (the delay line, no delay): A's
	// TX against B's RX shows it within the 30 s window.
	gw := "198.18.0.1"
	for _, cmd := range [][]string{
		{"ip", "-n", l.UnderlayNetNS(), "addr", "add", gw + "/24", "dev", l.Prefix() + "br"},
		{"ip", "netns", "exec", l.UnderlayNetNS(), "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf." + l.Prefix() + "br.send_redirects=0"},
		{"ip", "-n", a.Name, "route", "add", b.Addr.Addr().String() + "/32", "via", gw},
		{"ip", "-n", b.Name, "route", "add", a.Addr.Addr().String() + "/32", "via", gw},
	} {
		if out, err := exec.CommandContext(ctx, cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", cmd, err, out)
		}
	}
	dl, err := lab.NewDelayLine(lab.DelayConfig{NSPath: "/run/netns/" + l.UnderlayNetNS(), Name: l.Prefix() + "dl", Loss: 0.2, Seed: 1,
		Routes: []netip.Prefix{netip.PrefixFrom(a.Addr.Addr(), 32), netip.PrefixFrom(b.Addr.Addr(), 32)}})
	if err != nil {
		t.Fatalf("delay line: %v", err)
	}
	t.Cleanup(func() { dl.Close() })
	crossCheck(a, b, 0.12, 0.28, 90*time.Second)
	t.Logf("delay line: %+v", dl.Stats())
}
