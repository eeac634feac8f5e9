package chaostest

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/weftnet/weft/chaos-tests/lab"
	"github.com/weftnet/weft/datapath/shape"
	"github.com/weftnet/weft/router"
)

// Issue #15's rates, end to end on one host with the real peer, libcni and the real plugin:
// a container limited (through the runtime's bandwidth capability) to 20 Mbit/s egress and
// 10 Mbit/s ingress measures 0.85–1.05× of each over a 10 s TCP run; ping under that load
// stays within 10 ms of idle; an unlimited neighbour on the same host is not limited;
// nothing of weft's is visible inside the container; DEL leaves no ifb or qdisc. A network's
// default rates (`weft network create --ingress-rate/--egress-rate`) apply when the
// runtime sends none.
func TestBandwidthHoldsItsRate(t *testing.T) {
	if _, err := exec.LookPath("tc"); err != nil {
		t.Fatalf("the bandwidth test needs tc to look inside the container: %v", err)
	}
	l := newLab(t, lab.Config{Prefix: "wcbw"})
	ctx := testCtx(t, 3*time.Minute)
	h := l.Host(0)
	c := mustCNI(t, h, lab.CNIOptions{ConfList: []byte(`{"cniVersion":"1.1.0","name":"weft","plugins":[
		{"type":"weft","socket":"` + h.Socket + `","capabilities":{"bandwidth":true}}]}`)})

	const ingressRate, egressRate = 10_000_000, 20_000_000
	lim, partner, free := mustContainer(t, h), mustContainer(t, h), mustContainer(t, h)
	limRT := lim.RuntimeConf("eth0")
	// Kubernetes' CRI sends a 2^31-bit burst when a pod sets none (plugins #609).
	limRT.CapabilityArgs = map[string]any{"bandwidth": map[string]any{
		"ingressRate": ingressRate, "ingressBurst": 1 << 31, "egressRate": egressRate, "egressBurst": 1 << 31}}
	res, err := c.Add(ctx, limRT)
	if err != nil {
		t.Fatalf("ADD the limited container: %v", err)
	}
	limAddr, err := lab.ResultAddress(res)
	if err != nil {
		t.Fatal(err)
	}
	partnerAddr := mustAdd(t, ctx, c, partner)
	mustAdd(t, ctx, c, free)
	st := mustStatus(t, ctx, h)
	limAt, _ := st.Attachment(lim.ID, "eth0")
	freeAt, _ := st.Attachment(free.ID, "eth0")
	waitPing(t, ctx, partner, limAddr.Addr())
	waitPing(t, ctx, free, partnerAddr.Addr())

	// Nothing of weft's inside the container: no tbf, no ingress qdisc, no ifb.
	q, err := lim.Exec(ctx, "tc", "qdisc", "show")
	if err != nil {
		t.Fatalf("tc in the container: %v: %s", err, q)
	}
	for _, kind := range []string{"tbf", "ingress", "ifb"} {
		if strings.Contains(string(q), kind) {
			t.Errorf("tc qdisc inside the container shows %s:\n%s", kind, q)
		}
	}
	if links, _ := lim.LinkNames(); slices.ContainsFunc(links, func(n string) bool { return strings.HasPrefix(n, shape.IfbPrefix) }) {
		t.Errorf("an ifb inside the container: %v", links)
	}
	hq, _ := h.Exec(ctx, "tc", "qdisc", "show", "dev", limAt.HostIfName)
	t.Logf("host side of the limited container:\n%s", hq)

	idle := pingRTTs(ctx, partner, limAddr.Addr(), 15, 0)
	if len(idle) < 10 {
		t.Fatalf("idle ping partner → limited: %d of 15 answered", len(idle))
	}
	idleAvg := mean(idle)
	t.Logf("idle ping partner → limited: avg %.3f ms max %.3f ms", idleAvg, slices.Max(idle))

	for _, dir := range []struct {
		name     string
		from, to *lab.Container
		toAddr   netip.Addr
		rate     float64
	}{
		{"egress", lim, partner, partnerAddr.Addr(), egressRate},
		{"ingress", partner, lim, limAddr.Addr(), ingressRate},
	} {
		var rtts []float64
		pingDone := make(chan struct{})
		go func() {
			defer close(pingDone)
			// 40 pings at 0.2 s end before the 10 s flow; the first 5 (the flow's first
			// second, its slow start) are not counted.
			rtts = pingRTTs(ctx, partner, limAddr.Addr(), 40, 5)
		}()
		got := measureTCP(t, ctx, dir.from, dir.to, dir.toAddr, 10*time.Second)
		<-pingDone
		ratio := got / dir.rate
		t.Logf("%s: %.2f Mbit/s = %.3f× of %.0f Mbit/s", dir.name, got/1e6, ratio, dir.rate/1e6)
		if ratio < 0.85 || ratio > 1.05 {
			t.Errorf("%s measured %.2f Mbit/s, %.3f× of the %.0f Mbit/s limit; want 0.85–1.05×", dir.name, got/1e6, ratio, dir.rate/1e6)
		}
		if len(rtts) < 20 {
			t.Errorf("%s: only %d of 35 counted pings answered under load", dir.name, len(rtts))
			continue
		}
		slices.Sort(rtts)
		avg, p90 := mean(rtts), rtts[len(rtts)*9/10]
		t.Logf("%s: ping under load avg %.3f ms, p90 %.3f ms, max %.3f ms (idle %.3f ms), %d answers",
			dir.name, avg, p90, rtts[len(rtts)-1], idleAvg, len(rtts))
		if avg > idleAvg+10 || p90 > idleAvg+10 {
			t.Errorf("%s: ping under load avg %.3f ms p90 %.3f ms, more than 10 ms above idle %.3f ms", dir.name, avg, p90, idleAvg)
		}
	}

	// `weft status rates` shows the limits and the drops; the burst was clamped.
	var rates []router.RateStatus
	out, err := h.CLI(ctx, "status", "rates", "--json")
	if err == nil {
		err = json.Unmarshal(out, &rates)
	}
	if err != nil {
		t.Fatalf("status rates: %v", err)
	}
	for _, r := range rates {
		switch r.ContainerID {
		case lim.ID:
			if r.Ingress == nil || r.Ingress.RateBits != ingressRate || r.Egress == nil || r.Egress.RateBits != egressRate {
				t.Errorf("status rates for the limited container: %+v %+v", r.Ingress, r.Egress)
			} else {
				t.Logf("status rates: ingress %+v egress %+v", *r.Ingress, *r.Egress)
				if r.Egress.BurstBits > 8*uint64(r.Egress.LimitBytes)+64 {
					t.Errorf("the runtime's 2^31-bit burst was not clamped: %d bits", r.Egress.BurstBits)
				}
			}
		case partner.ID, free.ID:
			if r.Ingress != nil || r.Egress != nil {
				t.Errorf("status rates shows limits on unlimited %s: %+v %+v", r.ContainerID, r.Ingress, r.Egress)
			}
		}
	}
	text, _ := h.CLI(ctx, "status", "rates")
	t.Logf("weft status rates:\n%s", text)
	before, err := scrapeMetrics(h)
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	const inDrops, egDrops = `weft_shape_drops_total{direction="ingress"}`, `weft_shape_drops_total{direction="egress"}`
	t.Logf("metrics: %s %v, %s %v", inDrops, before[inDrops], egDrops, before[egDrops])
	if before[`weft_shape_attachments{direction="egress"}`] != 1 {
		t.Errorf("weft_shape_attachments{egress} = %v, want 1", before[`weft_shape_attachments{direction="egress"}`])
	}

	// The unlimited neighbour on the same host: no qdisc of weft's on its veth, and it
	// goes far beyond the neighbour's limits.
	fq, _ := h.Exec(ctx, "tc", "qdisc", "show", "dev", freeAt.HostIfName)
	if strings.Contains(string(fq), "tbf") || strings.Contains(string(fq), "ingress") {
		t.Errorf("weft shaped the unlimited neighbour:\n%s", fq)
	}
	freeRate := measureTCP(t, ctx, free, partner, partnerAddr.Addr(), 3*time.Second)
	t.Logf("unlimited neighbour: %.1f Mbit/s", freeRate/1e6)
	if freeRate < 5*egressRate {
		t.Errorf("the unlimited neighbour measured %.1f Mbit/s, not above 5× the limited one's %d Mbit/s", freeRate/1e6, egressRate/1_000_000)
	}

	// A network's default rates, set with the CLI, apply when the runtime sends none.
	if out, err := h.CLI(ctx, "network", "create", "capped", "--subnet", "10.52.0.0/16",
		"--ingress-rate", "10mbit", "--egress-rate", "20mbit", "--egress-burst", "100kbit"); err != nil {
		t.Fatalf("network create with rates: %v: %s", err, out)
	}
	cc := mustCNI(t, h, lab.CNIOptions{Name: "capped", ConfList: []byte(`{"cniVersion":"1.1.0","name":"capped","plugins":[
		{"type":"weft","socket":"` + h.Socket + `","network":"capped","capabilities":{"bandwidth":true}}]}`)})
	def := mustContainer(t, h)
	if _, err := cc.Add(ctx, def.RuntimeConf("eth0")); err != nil {
		t.Fatalf("ADD on the capped network: %v", err)
	}
	out, err = h.CLI(ctx, "status", "rates", "--json")
	if err == nil {
		err = json.Unmarshal(out, &rates)
	}
	if err != nil {
		t.Fatalf("status rates: %v", err)
	}
	found := false
	for _, r := range rates {
		if r.ContainerID == def.ID {
			found = true
			if r.Ingress == nil || r.Ingress.RateBits != 10e6 || r.Egress == nil || r.Egress.RateBits != 20e6 {
				t.Errorf("the capped network's defaults were not applied: %+v %+v", r.Ingress, r.Egress)
			}
		}
	}
	if !found {
		t.Errorf("status rates lacks %s: %+v", def.ID, rates)
	}

	// DEL leaves no ifb and no qdisc of weft's on the host.
	if err := c.Del(ctx, limRT); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if err := cc.Del(ctx, def.RuntimeConf("eth0")); err != nil {
		t.Fatalf("DEL on the capped network: %v", err)
	}
	after, err := scrapeMetrics(h)
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	if after[inDrops] < before[inDrops] || after[egDrops] < before[egDrops] || after[`weft_shape_attachments{direction="egress"}`] != 0 {
		t.Errorf("metrics after DEL: drops %v/%v (before %v/%v) must not go down; shaped %v, want 0",
			after[inDrops], after[egDrops], before[inDrops], before[egDrops], after[`weft_shape_attachments{direction="egress"}`])
	}
	links, err := h.LinkNames()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range links {
		if strings.HasPrefix(n, shape.IfbPrefix) || n == limAt.HostIfName {
			t.Errorf("DEL left %s on the host", n)
		}
	}
	if all, _ := h.Exec(ctx, "tc", "qdisc", "show"); strings.Contains(string(all), "tbf") || strings.Contains(string(all), "ingress") {
		t.Errorf("DEL left qdiscs on the host:\n%s", all)
	}
}

// measureTCP sends from one container to another for d over one TCP connection and returns
// the receiver's goodput in bit/s (bytes received × 8 over first to last byte). The sockets
// are made inside each namespace; the goroutines that use them run anywhere.
func measureTCP(t *testing.T, ctx context.Context, from, to *lab.Container, toAddr netip.Addr, d time.Duration) float64 {
	t.Helper()
	var ln net.Listener
	inNS(t, to, func() (err error) {
		ln, err = net.Listen("tcp4", net.JoinHostPort(toAddr.String(), "0"))
		return err
	})
	defer ln.Close()
	type result struct {
		bytes       int64
		first, last time.Time
		err         error
	}
	got := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer conn.Close()
		var r result
		buf := make([]byte, 128<<10)
		for {
			n, err := conn.Read(buf)
			if n > 0 {
				if r.bytes == 0 {
					r.first = time.Now()
				}
				r.bytes += int64(n)
				r.last = time.Now()
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					r.err = err
				}
				got <- r
				return
			}
		}
	}()
	var conn net.Conn
	inNS(t, from, func() (err error) {
		dl := net.Dialer{Timeout: 5 * time.Second}
		conn, err = dl.DialContext(ctx, "tcp4", ln.Addr().String())
		return err
	})
	buf := make([]byte, 64<<10)
	end := time.Now().Add(d)
	conn.SetWriteDeadline(end.Add(5 * time.Second))
	for time.Now().Before(end) {
		if _, err := conn.Write(buf); err != nil {
			t.Fatalf("send %s → %s: %v", from.Name, to.Name, err)
		}
	}
	conn.Close()
	select {
	case r := <-got:
		if r.err != nil || r.bytes == 0 {
			t.Fatalf("receive %s → %s: %d bytes, %v", from.Name, to.Name, r.bytes, r.err)
		}
		return float64(r.bytes) * 8 / r.last.Sub(r.first).Seconds()
	case <-time.After(30 * time.Second): // bounded: a receiver that never sees EOF fails the test
		t.Fatalf("receive %s → %s: no end within 30 s", from.Name, to.Name)
	}
	return 0
}

// inNS runs fn on a thread inside the container's namespace.
func inNS(t *testing.T, c *lab.Container, fn func() error) {
	t.Helper()
	n, err := ns.GetNS(c.NSPath)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := n.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatalf("in %s: %v", c.Name, err)
	}
}

var pingLine = regexp.MustCompile(`icmp_seq=([0-9]+) .*time=([0-9.]+) ms`)

// pingRTTs pings dst n times at 0.2 s from src and returns the RTTs (ms) of the answers to
// all but the first skip.
func pingRTTs(ctx context.Context, src *lab.Container, dst netip.Addr, n, skip int) []float64 {
	out, _ := src.Exec(ctx, "ping", "-n", "-c", strconv.Itoa(n), "-i", "0.2", "-W", "1", dst.String())
	var rtts []float64
	for _, m := range pingLine.FindAllStringSubmatch(string(out), -1) {
		seq, _ := strconv.Atoi(m[1])
		if v, err := strconv.ParseFloat(m[2], 64); err == nil && seq > skip {
			rtts = append(rtts, v)
		}
	}
	return rtts
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}
