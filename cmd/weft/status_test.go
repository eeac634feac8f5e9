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
