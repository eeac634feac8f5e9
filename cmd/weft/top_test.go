package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/router"
)

func topFixture() topFrame {
	return topFrame{
		Now: time.Date(2026, 12, 2, 7, 0, 0, 0, time.UTC),
		Peers: []router.PeerStatus{{Name: "a", State: "alive", Self: true}, {Name: "b", State: "alive"},
			{Name: "c", State: "alive"}, {Name: "d", State: "dead"}},
		Routes: []router.Route{
			{Peer: "c", Path: []string{"b", "c"}, RTTms: 4, SLA: "gold", SLAOK: false, Reason: "direct link down", Link: "vxlan"},
			{Peer: "b", Path: []string{"b"}, RTTms: 1.25, JitterMs: 0.1, SLA: "default", SLAOK: true, Link: "vxlan", Direct: router.Hop{Up: true}},
			{Peer: "d", Path: []string{}, SLA: "default", SLAOK: false, Reason: "unreachable", Link: "direct"},
		},
		Perf: []router.PerfResult{{From: "a", To: "b", Network: "default", Throughput: 99.5e6, RateCap: 100e6, RTTP50ms: 0.2, RTTP99ms: 0.9}},
	}
}

// One plain frame: a summary, one row per path in peer order with its state, and the last perf result.
func TestRenderTopPlain(t *testing.T) {
	var out bytes.Buffer
	renderTop(&out, topFixture(), false)
	s := out.String()
	if strings.Contains(s, "\x1b") {
		t.Errorf("a plain frame holds ANSI codes:\n%q", s)
	}
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) != 6 {
		t.Fatalf("want summary, header, 3 rows, perf line; got\n%s", s)
	}
	if !strings.Contains(lines[0], "weft top — a — 07:00:00 — 4 peers (3 alive), 3 paths, 2 not meeting their SLA") {
		t.Errorf("summary %q", lines[0])
	}
	want := [][]string{
		{"PEER", "STATE", "PATH", "LINK", "RTT", "JITTER", "LOSS", "SLA", "SINCE", "WHY"},
		{"b", "alive", "b", "vxlan", "1.25ms", "0.10ms", "0.0%", "default", "ok"},
		{"c", "alive", "b→c", "vxlan", "(down)", "4.00ms", "0.00ms", "0.0%", "gold", "VIOLATED"},
		{"d", "dead", "-", "direct", "(down)", "0.00ms", "0.00ms", "0.0%", "default", "NO", "PATH"},
	}
	for i, w := range want {
		f := strings.Fields(lines[i+1])
		if len(f) < len(w) || strings.Join(f[:len(w)], " ") != strings.Join(w, " ") {
			t.Errorf("row %d %q, want it to start with %q", i, lines[i+1], w)
		}
	}
	if !strings.Contains(lines[5], "last perf: a → b over default") || !strings.Contains(lines[5], "99.5 Mbit/s (cap 100.0 Mbit/s)") {
		t.Errorf("perf line %q", lines[5])
	}
}

// In colour, rows are red when the SLA fails and stay aligned (all colour codes are one length).
func TestRenderTopColour(t *testing.T) {
	var out bytes.Buffer
	renderTop(&out, topFixture(), true)
	lines := strings.Split(out.String(), "\n")
	if !strings.HasPrefix(lines[2], ansiGreen+"b ") || !strings.HasPrefix(lines[3], ansiRed+"c ") || !strings.HasPrefix(lines[4], ansiRed+"d ") {
		t.Errorf("row colours:\n%q", lines[1:5])
	}
	col := strings.Index(lines[1], "STATE")
	for _, l := range lines[2:5] {
		if strings.Index(l, "alive") != col && strings.Index(l, "dead") != col {
			t.Errorf("row %q not aligned under STATE at %d", l, col)
		}
	}
}

func TestPrintTrace(t *testing.T) {
	var out bytes.Buffer
	printTrace(&out, router.Trace{Address: "10.40.0.130", Container: "db", Network: "default", Block: "10.40.0.128/26", Owner: "c",
		Path: []string{"b", "c"}, Mode: "vxlan", Relayed: true, State: "relayed", RTTms: 4, Figures: "measured", SLA: "gold", Reason: "direct link down",
		Hops: []router.TraceHop{{From: "a", To: "b", Mode: "vxlan", RTTms: 1.5, Up: true, Figures: "measured"}, {From: "b", To: "c", RTTms: 2.5, Up: true, Figures: "gossiped"}}})
	s := out.String()
	for _, want := range []string{"trace 10.40.0.130 (db), network default, block 10.40.0.128/26", "owner  c, relayed, first hop vxlan (relayed)",
		"path   b → c  rtt 4.00ms", "sla gold VIOLATED", "why    direct link down"} {
		if !strings.Contains(s, want) {
			t.Errorf("missing %q in\n%s", want, s)
		}
	}
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if f := strings.Fields(lines[len(lines)-1]); strings.Join(f, " ") != "b → c - 2.50ms 0.00ms 0.0% up gossiped" {
		t.Errorf("last hop row %q", lines[len(lines)-1])
	}
	out.Reset()
	printTrace(&out, router.Trace{Address: "10.40.0.5", Container: "web", Owner: "a", Local: true, Reason: "a container on this host"})
	if !strings.Contains(out.String(), "owner  a (this peer): a container on this host") || strings.Contains(out.String(), "HOP") {
		t.Errorf("local trace:\n%s", out.String())
	}
}

func TestFormatRateAndPrintPerf(t *testing.T) {
	for bps, want := range map[float64]string{2.5e9: "2.50 Gbit/s", 20e6: "20.0 Mbit/s", 64e3: "64.0 kbit/s", 12: "12 bit/s"} {
		if got := formatRate(bps); got != want {
			t.Errorf("formatRate(%v) = %q, want %q", bps, got, want)
		}
	}
	var out bytes.Buffer
	printPerf(&out, router.PerfResult{From: "a", To: "b", Network: "default", Source: "10.40.0.7", Sink: "10.40.0.70", Seconds: 5, RateCap: 20e6,
		Throughput: 19.9e6, Received: 12_437_500, Sent: 12_500_000, RTTP50ms: 0.2, RTTP99ms: 1.1, JitterMs: 0.05, Loss: 0.004, Probes: 250})
	s := out.String()
	for _, want := range []string{"perf a → b over default (10.40.0.7 → 10.40.0.70), 5.0 s, cap 20.0 Mbit/s", "throughput  19.9 Mbit/s at the receiver",
		"rtt p50 0.200 ms  p99 1.100 ms  jitter 0.050 ms  loss 0.4% (250 probes"} {
		if !strings.Contains(s, want) {
			t.Errorf("missing %q in\n%s", want, s)
		}
	}
}
