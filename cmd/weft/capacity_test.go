package main

import (
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/router"
)

// capacityPeer answers /v1/capacity as a peer would, for networks fast (SR-IOV), full
// (SR-IOV, no free VF) and default (bridge).
func capacityPeer(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "weft.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	answers := map[string]router.Capacity{
		"fast": {Network: "fast", Mode: "sriov", PF: "ens1f0", DPDK: "off", Peers: []router.PeerCapacity{
			{Name: "host-b", Address: "192.0.2.20", Free: 3, Total: 4}, {Name: "host-a", Address: "192.0.2.10", Free: 1, Total: 8}}},
		"full":    {Network: "full", Mode: "sriov", PF: "ens2f0", DPDK: "on", Peers: []router.PeerCapacity{}},
		"default": {Network: "default", Mode: "bridge", Peers: []router.PeerCapacity{{Name: "host-a", Address: "192.0.2.10"}, {Name: "host-b", Address: "192.0.2.20"}}},
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		name := r.URL.Query().Get("network")
		c, ok := answers[name]
		if r.Method != http.MethodGet || r.URL.Path != "/v1/capacity" || !ok {
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(cni.Error{Code: 7, Message: `capacity: ipam: unknown network: "` + name + `"`})
			return
		}
		json.NewEncoder(w).Encode(c)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestCapacityCommand(t *testing.T) {
	sock := capacityPeer(t)
	out, err := runWeft(t, "--socket", sock, "capacity", "fast")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	want := []string{
		"network fast (sriov on ens1f0) takes netdev VFs; free on:",
		"PEER ADDRESS FREE TOTAL",
		"host-b 192.0.2.20 3 4",
		"host-a 192.0.2.10 1 8",
	}
	if len(lines) != len(want) {
		t.Fatalf("capacity fast:\n%s", out)
	}
	for i, w := range want {
		if got := strings.Join(strings.Fields(lines[i]), " "); got != w {
			t.Errorf("line %d %q, want %q", i, got, w)
		}
	}
	out, err = runWeft(t, "--socket", sock, "capacity", "full")
	if err != nil || !strings.Contains(out, "fits nowhere: no alive peer has free VFs bound to a DPDK driver on ens2f0") {
		t.Fatalf("capacity full: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "capacity", "default")
	if err != nil || !strings.Contains(out, "fits on every alive peer") || !strings.Contains(out, "host-b") {
		t.Fatalf("capacity default: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "capacity", "fast", "--json")
	var c router.Capacity
	if err != nil || json.Unmarshal([]byte(out), &c) != nil || len(c.Peers) != 2 || c.Peers[0].Free != 3 || c.DPDK != "off" {
		t.Fatalf("capacity --json: %q %v", out, err)
	}
	for _, field := range []string{`"free": 3`, `"total": 4`, `"pf": "ens1f0"`} {
		if !strings.Contains(out, field) {
			t.Errorf("JSON lacks %s:\n%s", field, out)
		}
	}
	// The peer's refusal names the network; a name with odd bytes travels escaped.
	if _, err := runWeft(t, "--socket", sock, "capacity", "no pe&x"); err == nil || !strings.Contains(err.Error(), `"no pe&x"`) {
		t.Fatalf("unknown network: %v", err)
	}
	if _, err := runWeft(t, "--socket", sock, "capacity"); err == nil {
		t.Fatal("capacity without a network succeeded")
	}
}
