package router

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
)

// apiCall sends one request to h and decodes a 200 answer into out; it returns the status and
// the error message of any other answer.
func apiCall(t *testing.T, h http.Handler, method, path, body string, out any) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, "http://weft"+path, strings.NewReader(body))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if !json.Valid(w.Body.Bytes()) {
		t.Fatalf("%s %s: answer is not JSON: %q", method, path, w.Body.String())
	}
	if w.Code != http.StatusOK {
		var e cni.Error
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Code == 0 || e.Message == "" {
			t.Fatalf("%s %s: HTTP %d %q is not a cni.Error", method, path, w.Code, w.Body.String())
		}
		return w.Code, e.Message
	}
	if out != nil {
		if err := json.Unmarshal(w.Body.Bytes(), out); err != nil {
			t.Fatalf("%s %s: decode %q: %v", method, path, w.Body.String(), err)
		}
	}
	return w.Code, ""
}

// wnoContainer makes a network namespace standing in for a container (this file's prefix).
func wnoContainer(t *testing.T, n int) string {
	t.Helper()
	name := fmt.Sprintf("wno-%d-c%d", os.Getpid(), n)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

func TestNetworkAPI(t *testing.T) {
	p := startPeer(t, t.TempDir())
	h := p.apiHandler()
	ctx := context.Background()

	// The cluster pins its networks once this peer leads: wait for it.
	deadline := time.Now().Add(10 * time.Second)
	for len(p.cluster.Networks()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the cluster defines no network 10s after start")
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
	var list []NetworkInfo
	if code, msg := apiCall(t, h, "GET", "/v1/networks", "", &list); code != 200 || len(list) != 1 || list[0].Name != "default" || list[0].Subnet != "10.40.0.0/16" || list[0].Isolated {
		t.Fatalf("list before create: %d %s %+v", code, msg, list)
	}
	var info NetworkInfo
	body := `{"name":"media","subnet":"10.50.0.0/16","mtu":9000,"encrypt":"always","sla":"gold:  rtt<=5ms ,loss<=0.1%"}`
	if code, msg := apiCall(t, h, "POST", "/v1/networks", body, &info); code != 200 {
		t.Fatalf("create media: %d %s", code, msg)
	}
	want := NetworkInfo{Name: "media", Subnet: "10.50.0.0/16", BlockSize: 26, Gateway: "10.50.0.1", MTU: 9000, Encrypt: "always", SLA: "gold: rtt<=5ms,loss<=0.1%", Isolated: true}
	if fmt.Sprint(info) != fmt.Sprint(want) {
		t.Fatalf("created %+v, want %+v", info, want)
	}
	// Retrying the same create succeeds; the CLI's spelling of the SLA does not matter.
	if code, msg := apiCall(t, h, "POST", "/v1/networks", body, nil); code != 200 {
		t.Fatalf("create media again: %d %s", code, msg)
	}
	for _, tt := range []struct {
		body   string
		status int
		msg    string
	}{
		{`{"name":"over","subnet":"10.50.128.0/17"}`, 400, "overlaps network media"},
		{`{"name":"over","subnet":"10.0.0.0/8"}`, 400, "overlaps network"},
		{`{"name":"media","subnet":"10.70.0.0/16"}`, 409, "already exists"},
		{`{"name":"lo","subnet":"127.0.0.0/16"}`, 400, "127.0.0.0/8"},
		{`{"name":"x","subnet":"10.70.0.1/16"}`, 400, "host bits"},
		{`{"name":"x","subnet":"banana"}`, 400, `subnet "banana"`},
		{`{"name":"x","subnet":"10.70.0.0/16","block_size":31}`, 400, "block size"},
		{`{"name":"x","subnet":"10.70.0.0/16","block_size":-5}`, 400, "block size"},
		{`{"name":"x","subnet":"10.70.0.0/16","mtu":70000}`, 400, "MTU 70000"},
		{`{"name":"x","subnet":"10.70.0.0/16","encrypt":"sometimes"}`, 400, "encrypt"},
		{`{"name":"x","subnet":"10.70.0.0/16","sla":"gold"}`, 400, "SLA"},
		{`{"name":"averyveryverylongname","subnet":"10.70.0.0/16"}`, 400, "at most 15"},
		{`{"name":"UPPER","subnet":"10.70.0.0/16"}`, 400, "lower-case"},
		{`{"subnet":"10.70.0.0/16"}`, 400, "no name"},
		{`{"name":"x","subnet":"10.70.0.0/16","colour":"red"}`, 400, "unknown field"},
		{`{"name":"x"`, 400, "decode"},
		{`{"name":"x","subnet":"10.70.0.0/16"} {}`, 400, "trailing data"},
	} {
		if code, msg := apiCall(t, h, "POST", "/v1/networks", tt.body, nil); code != tt.status || !strings.Contains(msg, tt.msg) {
			t.Errorf("create %s: %d %q, want %d mentioning %q", tt.body, code, msg, tt.status, tt.msg)
		}
	}
	if _, ok := p.cluster.Network("x"); ok {
		t.Fatal("a refused create defined a network")
	}
	if code, _ := apiCall(t, h, "POST", "/v1/networks", `{"name":"control","subnet":"10.60.0.0/16","isolated":false,"block_size":24}`, &info); code != 200 || info.Isolated || info.BlockSize != 24 {
		t.Fatalf("create control: %d %+v", code, info)
	}
	if code, _ := apiCall(t, h, "GET", "/v1/networks", "", &list); code != 200 || len(list) != 3 || list[0].Name != "control" || list[2].Name != "media" {
		t.Fatalf("list: %+v", list)
	}
	var got NetworkInfo
	if code, msg := apiCall(t, h, "GET", "/v1/networks/media", "", &got); code != 200 || got.Name != "media" || len(got.Blocks) != 0 {
		t.Fatalf("inspect media: %d %s %+v", code, msg, got)
	}
	if code, msg := apiCall(t, h, "GET", "/v1/networks/nope", "", nil); code != 404 || !strings.Contains(msg, "nope") {
		t.Fatalf("inspect of an unknown network: %d %s", code, msg)
	}
	if code, _ := apiCall(t, h, "PUT", "/v1/networks", "{}", nil); code != 405 {
		t.Fatalf("PUT /v1/networks: %d", code)
	}
	if code, _ := apiCall(t, h, "POST", "/v1/networks/media", "{}", nil); code != 405 {
		t.Fatalf("POST /v1/networks/media: %d", code)
	}

	// With more networks defined, the default one attaches and reports as before.
	c1 := wnoContainer(t, 1)
	r1, err := p.client.Add(ctx, addReq("c1", c1))
	if err != nil || r1.Gateway != "10.40.0.1" {
		t.Fatalf("add on default beside media and control: %+v %v", r1, err)
	}
	if st := p.status(); len(st.Attachments) != 1 {
		t.Fatalf("status: %+v", st)
	}
	if code, msg := apiCall(t, h, "GET", "/v1/ipam", "", nil); code != 200 {
		t.Fatalf("ipam status: %d %s", code, msg)
	}
	if err := p.client.Del(ctx, addReq("c1", "")); err != nil {
		t.Fatal(err)
	}

	// rm: the default and unknown networks are refused, one with owned blocks names the owner.
	if code, msg := apiCall(t, h, "DELETE", "/v1/networks/default", "", nil); code != 409 || !strings.Contains(msg, "cannot be removed") {
		t.Fatalf("rm default: %d %s", code, msg)
	}
	if code, _ := apiCall(t, h, "DELETE", "/v1/networks/nope", "", nil); code != 404 {
		t.Fatalf("rm of an unknown network: %d", code)
	}
	onMedia := addReq("c2", wnoContainer(t, 2))
	onMedia.Network = "media"
	r2, err := p.client.Add(ctx, onMedia) // claims a block of media
	if err != nil {
		t.Fatal(err)
	}
	a2 := netip.MustParsePrefix(r2.Address)
	if code, msg := apiCall(t, h, "DELETE", "/v1/networks/media", "", nil); code != 409 || !strings.Contains(msg, "p1 (1)") || !strings.Contains(msg, "c2/eth0 ("+a2.Addr().String()+")") {
		t.Fatalf("rm of media while c2 is attached: %d %s", code, msg)
	}
	if code, _ := apiCall(t, h, "GET", "/v1/networks/media", "", &got); code != 200 || len(got.Blocks) != 1 || !got.Blocks[0].CIDR.Contains(a2.Addr()) || got.Blocks[0].Owner != "p1" {
		t.Fatalf("inspect media: %+v", got)
	}
	// A block of a second network shows in status ipam; the other views still answer.
	var ist IPAMStatus
	if code, msg := apiCall(t, h, "GET", "/v1/ipam", "", &ist); code != 200 || !strings.Contains(fmt.Sprint(ist.Blocks), "media") {
		t.Fatalf("ipam status with a block of media: %d %s %+v", code, msg, ist.Blocks)
	}
	for _, path := range []string{"/v1/status", "/v1/connections", "/v1/routes", "/v1/peers"} {
		if code, msg := apiCall(t, h, "GET", path, "", nil); code != 200 {
			t.Fatalf("%s with a second network: %d %s", path, code, msg)
		}
	}
	if err := p.client.Delete(ctx, "/v1/networks/control", nil); err != nil {
		t.Fatalf("rm control through the client: %v", err)
	}
	if names := networkNames(p.cluster.Networks()); strings.Join(names, ",") != "default,media" {
		t.Fatalf("networks after rm: %v", names)
	}
}

func networkNames(nets []ipam.Network) []string {
	var out []string
	for _, n := range nets {
		out = append(out, n.Name)
	}
	return out
}

// The request's pure checks, without a peer.
func TestNetworkFromRequest(t *testing.T) {
	no := false
	n, err := networkFromRequest(NetworkRequest{Name: "std", Subnet: "10.70.0.0/16", Isolated: &no})
	if err != nil || n.BlockBits != ipam.DefaultBlockBits || n.Isolated || n.Subnet != netip.MustParsePrefix("10.70.0.0/16") {
		t.Fatalf("%+v %v", n, err)
	}
	n, err = networkFromRequest(NetworkRequest{Name: "std", Subnet: "10.70.0.0/16"})
	if err != nil || !n.Isolated {
		t.Fatalf("isolated must default to true: %+v %v", n, err)
	}
	if _, err := networkFromRequest(NetworkRequest{Name: "std", Subnet: "10.70.0.0/16", SLA: strings.Repeat("x", 1<<16)}); err == nil {
		t.Fatal("a huge SLA was accepted")
	}
	if _, err := networkFromRequest(NetworkRequest{Name: "std", Subnet: "fd00::/64"}); err == nil {
		t.Fatal("an IPv6 subnet was accepted")
	}
	var buf bytes.Buffer
	json.NewEncoder(&buf).Encode(NetworkRequest{Name: "a"})
	if strings.Contains(buf.String(), "isolated") {
		t.Fatalf("an unset isolated must not travel: %s", buf.String())
	}
}
