package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/router"
)

func TestNetworkCreateFlags(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want router.NetworkRequest
		iso  string // "" unset, else the value sent
	}{
		{[]string{"--subnet", "10.50.0.0/16"}, router.NetworkRequest{Name: "media", Subnet: "10.50.0.0/16", BlockSize: 26}, ""},
		{[]string{"--subnet=10.50.0.0/16", "--block-size", "24", "--mtu", "9000", "--encrypt", "always", "--sla", "gold: rtt<=5ms", "--isolated=false"},
			router.NetworkRequest{Name: "media", Subnet: "10.50.0.0/16", BlockSize: 24, MTU: 9000, Encrypt: "always", SLA: "gold: rtt<=5ms"}, "false"},
		{[]string{"--subnet", "10.50.0.0/16", "--isolated"}, router.NetworkRequest{Name: "media", Subnet: "10.50.0.0/16", BlockSize: 26}, "true"},
		{[]string{"--subnet", "10.60.0.0/16", "--mode", "sriov", "--pf", "ens1f0", "--vlan", "100", "--dpdk", "auto"},
			router.NetworkRequest{Name: "media", Subnet: "10.60.0.0/16", BlockSize: 26, Mode: "sriov", PF: "ens1f0", VLAN: 100, DPDK: "auto"}, ""},
	} {
		create, _, err := newRootCmd().Find([]string{"network", "create"})
		if err != nil {
			t.Fatal(err)
		}
		if err := create.ParseFlags(tt.args); err != nil {
			t.Fatalf("%v: %v", tt.args, err)
		}
		got, err := networkRequest(create, "media")
		if err != nil {
			t.Fatalf("%v: %v", tt.args, err)
		}
		iso := ""
		if got.Isolated != nil {
			iso = map[bool]string{true: "true", false: "false"}[*got.Isolated]
		}
		got.Isolated = nil
		if got != tt.want || iso != tt.iso {
			t.Errorf("%v: %+v isolated %q, want %+v isolated %q", tt.args, got, iso, tt.want, tt.iso)
		}
	}
	for _, bad := range [][]string{{"--subnet", "10.50.0.0/16", "--mtu", "lots"}, {"--subnet", "10.50.0.0/16", "--isolated=maybe"}, {"--block-size", "x"}} {
		create, _, _ := newRootCmd().Find([]string{"network", "create"})
		if err := create.ParseFlags(bad); err == nil {
			t.Errorf("%v parsed", bad)
		}
	}
}

// fakePeer serves the network endpoints on a unix socket and records what it was asked.
type fakePeer struct {
	mu   sync.Mutex // guards reqs
	reqs []string
}

func (f *fakePeer) start(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "weft.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	media := router.NetworkInfo{Name: "media", Subnet: "10.50.0.0/16", BlockSize: 26, Gateway: "10.50.0.1", MTU: 9000, Isolated: true,
		Blocks: []ipam.BlockOwnership{{Network: "media", CIDR: netip.MustParsePrefix("10.50.0.0/26"), Owner: "host-a"}}}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.reqs = append(f.reqs, r.Method+" "+r.URL.EscapedPath()+" "+strings.TrimSpace(string(body)))
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		switch r.Method + " " + r.URL.EscapedPath() {
		case "GET /v1/networks":
			json.NewEncoder(w).Encode([]router.NetworkInfo{{Name: "default", Subnet: "10.40.0.0/16", BlockSize: 26, Gateway: "10.40.0.1"}, media})
		case "POST /v1/networks", "GET /v1/networks/media":
			json.NewEncoder(w).Encode(media)
		case "DELETE /v1/networks/media":
			w.WriteHeader(http.StatusConflict)
			json.NewEncoder(w).Encode(cni.Error{Code: 7, Message: "network rm media: network in use: network media has 1 blocks owned by host-a (1)"})
		default:
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(cni.Error{Code: 7, Message: "no such network"})
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestNetworkCommands(t *testing.T) {
	t.Setenv("WEFT_MTU", "1300") // the daemon's setting must not leak into a definition
	t.Setenv("WEFT_ENCRYPT", "always")
	fp := &fakePeer{}
	sock := fp.start(t)
	out, err := runWeft(t, "--socket", sock, "network", "create", "media", "--subnet", "10.50.0.0/16", "--mtu", "9000")
	if err != nil || !strings.Contains(out, "created network media 10.50.0.0/16 (/26 blocks, gateway 10.50.0.1, isolated)") {
		t.Fatalf("create: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "network", "ls")
	if err != nil || !strings.Contains(out, "NAME") || !strings.Contains(out, "default") || !strings.Contains(out, "(peer)") || !strings.Contains(out, "9000") {
		t.Fatalf("ls: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "network", "ls", "--json")
	var nets []router.NetworkInfo
	if err != nil || json.Unmarshal([]byte(out), &nets) != nil || len(nets) != 2 {
		t.Fatalf("ls --json: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "network", "inspect", "media")
	if err != nil || !strings.Contains(out, "10.50.0.0/26") || !strings.Contains(out, "host-a") || !strings.Contains(out, "isolated") {
		t.Fatalf("inspect: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "network", "inspect", "media", "--json")
	var info router.NetworkInfo
	if err != nil || json.Unmarshal([]byte(out), &info) != nil || len(info.Blocks) != 1 {
		t.Fatalf("inspect --json: %q %v", out, err)
	}
	if _, err = runWeft(t, "--socket", sock, "network", "rm", "media"); err == nil || !strings.Contains(err.Error(), "host-a") {
		t.Fatalf("rm: %v, want the peer's refusal naming the owner", err)
	}
	if _, err = runWeft(t, "--socket", sock, "network", "inspect", "a/b"); err == nil {
		t.Fatal("inspect of a name with a slash succeeded")
	}
	if _, err = runWeft(t, "--socket", sock, "network", "create", "x"); err == nil || !strings.Contains(err.Error(), "subnet") {
		t.Fatalf("create without --subnet: %v", err)
	}
	fp.mu.Lock()
	defer fp.mu.Unlock()
	want := []string{
		`POST /v1/networks {"name":"media","subnet":"10.50.0.0/16","block_size":26,"mtu":9000}`,
		"GET /v1/networks ", "GET /v1/networks ", "GET /v1/networks/media ", "GET /v1/networks/media ",
		"DELETE /v1/networks/media ", "GET /v1/networks/a%2Fb ",
	}
	if strings.Join(fp.reqs, "\n") != strings.Join(want, "\n") {
		t.Fatalf("requests:\n%s\nwant:\n%s", strings.Join(fp.reqs, "\n"), strings.Join(want, "\n"))
	}
}

// ls and inspect show how a network attaches: bridge, or sriov with its PF, VLAN and DPDK.
func TestNetworkPrintsMode(t *testing.T) {
	nets := []router.NetworkInfo{
		{Name: "default", Subnet: "10.40.0.0/16", BlockSize: 26},
		{Name: "fast", Subnet: "10.80.0.0/16", BlockSize: 26, Mode: "sriov", PF: "ens1f0", VLAN: 12, DPDK: "auto"},
	}
	var ls bytes.Buffer
	printNetworks(&ls, nets)
	lines := strings.Split(ls.String(), "\n")
	if !strings.Contains(lines[0], "MODE") || !strings.Contains(lines[0], "PF") ||
		!strings.Contains(lines[1], "bridge") || !strings.Contains(lines[2], "sriov") || !strings.Contains(lines[2], "ens1f0") {
		t.Fatalf("ls:\n%s", ls.String())
	}
	var insp bytes.Buffer
	printNetwork(&insp, nets[1])
	for _, want := range []string{"mode:", "sriov pf ens1f0 vlan 12 dpdk auto", "pf:", "ens1f0", "vlan:", "12", "dpdk:", "auto"} {
		if !strings.Contains(insp.String(), want) {
			t.Errorf("inspect lacks %q:\n%s", want, insp.String())
		}
	}
	insp.Reset()
	printNetwork(&insp, nets[0])
	if !strings.Contains(insp.String(), "bridge") || strings.Contains(insp.String(), "pf:") {
		t.Errorf("inspect of a bridge network:\n%s", insp.String())
	}
}
