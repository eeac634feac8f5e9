package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/router"
)

// `weft status connections` has one row per (peer, network) with the network's mode; the
// peer is named on its first row; JSON carries the network.
func TestPrintConnectionsPerNetwork(t *testing.T) {
	conns := []router.Connection{
		{Peer: "b", Network: "control", Address: "192.0.2.20", Mode: "vxlan", State: "established", Reason: "plaintext: network control is --encrypt never", Blocks: []string{"10.60.0.0/26"}},
		{Peer: "b", Network: "default", Address: "192.0.2.20", Mode: "vxlan", State: "established", Reason: "vxlan", Blocks: []string{"10.40.0.0/26", "10.40.0.64/26"}},
		{Peer: "b", Network: "media", Address: "192.0.2.20", Mode: "wireguard", State: "established", Reason: "encrypted: network media is --encrypt always", Blocks: []string{}},
		{Peer: "c", Network: "control", Address: "192.0.2.30", State: "none", Reason: "no link", OutOfRange: []string{"0.0.0.0/1"}},
	}
	var out bytes.Buffer
	printConnections(&out, conns)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 5 {
		t.Fatalf("want a header and 4 rows:\n%s", out.String())
	}
	want := [][]string{
		{"PEER", "ADDRESS", "NETWORK", "MODE", "STATE", "BLOCKS", "REASON"},
		{"b", "192.0.2.20", "control", "vxlan", "established", "1"},
		{"default", "vxlan", "established", "2"},
		{"media", "wireguard", "established", "0"},
		{"c", "192.0.2.30", "control", "-", "none", "0", "no", "link", "(1", "blocks", "outside"},
	}
	for i, w := range want {
		f := strings.Fields(lines[i])
		if len(f) < len(w) || strings.Join(f[:len(w)], " ") != strings.Join(w, " ") {
			t.Errorf("line %d %q, want it to start with %q", i, lines[i], w)
		}
	}
	data, err := json.Marshal(conns[0])
	if err != nil || !strings.Contains(string(data), `"network":"control"`) {
		t.Fatalf("JSON %s %v", data, err)
	}
}

// `weft status routes` names the networks a path serves.
func TestPrintRoutesNamesNetworks(t *testing.T) {
	routes := []router.Route{
		{Peer: "b", Path: []string{"b"}, Networks: []string{"default", "media"}, RTTms: 1.5, SLA: "any", SLAOK: true, Since: time.Now(), Reason: "direct"},
		{Peer: "c", Path: []string{"b", "c"}, Networks: []string{"control"}, RTTms: 3, SLA: "any", SLAOK: true, Since: time.Now(), Reason: "relayed",
			Hops: []router.Hop{{From: "a", To: "b", RTTms: 1.5, Up: true}, {From: "b", To: "c", RTTms: 1.5, Up: true}}, Link: "vxlan"},
		{Peer: "d", Path: []string{}, SLA: "any", Unmeasured: true, Since: time.Now()},
	}
	var out bytes.Buffer
	printRoutes(&out, routes)
	lines := strings.Split(out.String(), "\n")
	for _, w := range [][]string{
		{"PEER", "PATH", "NETWORKS", "RTT"},
		{"b", "b", "default,media", "1.50ms"},
		{"c", "b", "→", "c", "control", "3.00ms"},
	} {
		found := false
		for _, l := range lines {
			f := strings.Fields(l)
			if len(f) >= len(w) && strings.Join(f[:len(w)], " ") == strings.Join(w, " ") {
				found = true
			}
		}
		if !found {
			t.Errorf("no line starts with %q:\n%s", w, out.String())
		}
	}
	if !strings.Contains(out.String(), "d  none  -") && !strings.Contains(strings.Join(strings.Fields(out.String()), " "), "d none - ?") {
		t.Errorf("a path serving no network shows -:\n%s", out.String())
	}
	data, _ := json.Marshal(routes[0])
	if !strings.Contains(string(data), `"networks":["default","media"]`) {
		t.Fatalf("JSON %s", data)
	}
}

// With networks of different SLA classes, a peer has one row per class: each names its
// networks, its class and whether the class holds on its path.
func TestPrintRoutesOneRowPerClass(t *testing.T) {
	routes := []router.Route{
		{Peer: "d", Path: []string{"d"}, Networks: []string{"default", "std"}, RTTms: 4, JitterMs: 3, SLA: "default: (no bounds)", SLAOK: true, Since: time.Now(), Reason: "direct"},
		{Peer: "d", Path: []string{"b", "d"}, Networks: []string{"media"}, RTTms: 5, JitterMs: 1, SLA: "gold: rtt<=6ms,jitter<=2ms", SLAOK: true, Since: time.Now(), Reason: "via b",
			Hops: []router.Hop{{From: "a", To: "b", RTTms: 2, Up: true}, {From: "b", To: "d", RTTms: 3, Up: true}}},
		{Peer: "e", Path: []string{"e"}, Networks: []string{"media"}, RTTms: 9, SLA: "gold: rtt<=6ms,jitter<=2ms", SLAOK: false, Since: time.Now(), Reason: "no path meets"},
	}
	var out bytes.Buffer
	printRoutes(&out, routes)
	text := out.String()
	for _, w := range []string{
		"d d default,std 4.00ms 3.00ms 0.0% default: (no bounds) ok",
		"d b → d media 5.00ms 1.00ms 0.0% gold: rtt<=6ms,jitter<=2ms ok",
		"e e media 9.00ms 0.00ms 0.0% gold: rtt<=6ms,jitter<=2ms VIOLATED",
	} {
		found := false
		for _, l := range strings.Split(text, "\n") {
			if strings.HasPrefix(strings.Join(strings.Fields(l), " "), w) {
				found = true
			}
		}
		if !found {
			t.Errorf("no row %q:\n%s", w, text)
		}
	}
	data, _ := json.Marshal(routes[1])
	for _, field := range []string{`"peer":"d"`, `"sla":"gold: rtt\u003c=6ms,jitter\u003c=2ms"`, `"sla_ok":true`, `"networks":["media"]`} {
		if !strings.Contains(string(data), field) {
			t.Errorf("JSON %s lacks %s", data, field)
		}
	}
}

// `weft status peers` shows each peer's SR-IOV PFs as free/total (and free DPDK VFs), "-"
// for none; JSON carries them.
func TestPrintPeersSRIOV(t *testing.T) {
	since := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	peers := []router.PeerStatus{
		{Name: "a", State: "alive", Address: "192.0.2.10", RaftRole: "voter", Capabilities: []string{"vxlan"}, Since: since, Self: true,
			SRIOV: []router.PFStatus{{PF: "ens1f0", Free: 3, FreeDPDK: 1, Total: 4}, {PF: "ens1f1", Free: 0, Total: 8}}},
		{Name: "b", State: "alive", Address: "192.0.2.20", RaftRole: "voter", Capabilities: []string{"vxlan"}, Since: since, SRIOV: []router.PFStatus{}},
		{Name: "c", State: "alive", Address: "192.0.2.30", Capabilities: []string{}, Since: since}, // an older peer
	}
	var out bytes.Buffer
	printPeers(&out, peers)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	want := []string{
		"NAME STATE ADDRESS RAFT CAPABILITIES SINCE SR-IOV",
		"a (self) alive 192.0.2.10 voter vxlan 2026-01-02T03:04:05Z ens1f0 3/4 (dpdk 1), ens1f1 0/8",
		"b alive 192.0.2.20 voter vxlan 2026-01-02T03:04:05Z -",
		"c alive 192.0.2.30 - 2026-01-02T03:04:05Z -",
	}
	if len(lines) != len(want) {
		t.Fatalf("want a header and 3 rows:\n%s", out.String())
	}
	for i, w := range want {
		if got := strings.Join(strings.Fields(lines[i]), " "); got != w {
			t.Errorf("line %d %q, want %q", i, got, w)
		}
	}
	data, _ := json.Marshal(peers[0])
	if !strings.Contains(string(data), `"sriov":[{"pf":"ens1f0","free":3,"free_dpdk":1,"total":4},{"pf":"ens1f1","free":0,"free_dpdk":0,"total":8}]`) {
		t.Fatalf("JSON %s", data)
	}
}
