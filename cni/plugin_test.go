package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

func TestParseConf(t *testing.T) {
	cases := []struct {
		in   string
		code uint
		want string
	}{
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"`, types.ErrDecodingFailure, "decode"},
		{`{"cniVersion":"1.1.0","type":"weft"}`, types.ErrInvalidNetworkConfig, `"name"`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","socket":"rel.sock"}`, types.ErrInvalidNetworkConfig, `"socket"`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","network":"Bad!"}`, types.ErrInvalidNetworkConfig, `"network"`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","mtu":10}`, types.ErrInvalidNetworkConfig, `"mtu"`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","mtu":"big"}`, types.ErrDecodingFailure, "decode"},
	}
	for _, c := range cases {
		_, err := ParseConf([]byte(c.in))
		var e *types.Error
		if !errors.As(err, &e) || e.Code != c.code || !strings.Contains(e.Error(), c.want) {
			t.Errorf("ParseConf(%s) = %v, want code %d mentioning %s", c.in, err, c.code, c.want)
		}
	}
	conf, err := ParseConf([]byte(`{"cniVersion":"1.1.0","name":"n","type":"weft"}`))
	if err != nil || conf.Socket != DefaultSocket || conf.Network != DefaultNetwork {
		t.Fatalf("defaults: %+v, %v", conf, err)
	}
}

func TestParseArgs(t *testing.T) {
	cases := []struct{ args, want string }{
		{"", "cid"},
		{"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web-0", "web-0"},
		{"name=db;K8S_POD_NAME=web-0", "web-0"},
		{"name=db", "db"},
		{"FOO=bar", "cid"},
	}
	for _, c := range cases {
		got, err := ParseArgs(c.args, "cid")
		if err != nil || got.Name != c.want {
			t.Errorf("ParseArgs(%q).Name = %q, %v; want %q", c.args, got.Name, err, c.want)
		}
	}
	got, err := ParseArgs("K8S_POD_NAME=web;WEFT_SERVICES=http/tcp/80, dns/udp/53", "cid")
	if err != nil || strings.Join(got.Services, " ") != "http/tcp/80 dns/udp/53" {
		t.Errorf("WEFT_SERVICES: %+v, %v", got, err)
	}
	if _, err := ParseArgs("broken", "cid"); err == nil || !strings.Contains(err.Error(), "CNI_ARGS") {
		t.Errorf("malformed CNI_ARGS: %v", err)
	}
}

// servePeer answers ADD with a fixed attachment, standing in for the peer so the result
// conversion can be checked for every spec version without a kernel.
func servePeer(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "weft.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req AttachRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Name != "web-0" || req.CNINetwork != "n" {
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(Error{Code: 7, Message: "unexpected request"})
			return
		}
		json.NewEncoder(w).Encode(AttachResult{
			IfName: req.IfName, NetNS: req.NetNS, HostIfName: "weftabc", Bridge: "weft",
			Address: "10.40.0.5/16", Gateway: "10.40.0.1", MTU: 1420,
		})
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestAddAnswersInTheConfiguredVersion(t *testing.T) {
	sock := servePeer(t)
	for _, v := range SupportedVersions {
		var out bytes.Buffer
		p := Plugin{Stdout: &out}
		conf := `{"cniVersion":"` + v + `","name":"n","type":"weft","socket":"` + sock + `"}`
		err := p.Add(&skel.CmdArgs{ContainerID: "c1", IfName: "eth0", Netns: "/var/run/netns/x", Args: "K8S_POD_NAME=web-0", StdinData: []byte(conf)})
		if err != nil {
			t.Fatalf("%s: %v", v, err)
		}
		var res struct {
			CNIVersion string `json:"cniVersion"`
			IPs        []struct {
				Address string `json:"address"`
				Version string `json:"version"`
			} `json:"ips"`
		}
		if err := json.Unmarshal(out.Bytes(), &res); err != nil {
			t.Fatalf("%s: %v: %s", v, err, out.String())
		}
		if res.CNIVersion != v || len(res.IPs) != 1 || res.IPs[0].Address != "10.40.0.5/16" {
			t.Fatalf("%s: result %s", v, out.String())
		}
		if strings.HasPrefix(v, "0.") && res.IPs[0].Version != "4" {
			t.Fatalf("%s: 0.x results carry the IP version: %s", v, out.String())
		}
	}
}

func TestUnreachablePeer(t *testing.T) {
	conf := []byte(`{"cniVersion":"1.1.0","name":"n","type":"weft","socket":"` + filepath.Join(t.TempDir(), "none.sock") + `"}`)
	p := Plugin{}
	var e *types.Error
	if err := p.Status(&skel.CmdArgs{StdinData: conf}); !errors.As(err, &e) || e.Code != CodePluginNotAvailable {
		t.Fatalf("STATUS with no peer = %v, want code 50", err)
	}
	if err := p.Add(&skel.CmdArgs{ContainerID: "c", IfName: "eth0", Netns: "/x", StdinData: conf}); !errors.As(err, &e) || e.Code != types.ErrTryAgainLater {
		t.Fatalf("ADD with no peer = %v, want code 11", err)
	}
	if err := p.Del(&skel.CmdArgs{ContainerID: "c", IfName: "eth0", StdinData: conf}); !errors.As(err, &e) || e.Code != types.ErrTryAgainLater {
		t.Fatalf("DEL with no peer = %v, want code 11 so the runtime retries", err)
	}
}

// Only the primary interface gets the default route; a secondary one routes its range; a
// range that does not hold the address is refused.
func TestBuildResultSecondaryRoutesItsRangeOnly(t *testing.T) {
	base := AttachResult{IfName: "net2", Address: "10.50.0.2/16", Gateway: "10.50.0.1", MTU: 1400, Range: "10.50.0.0/16", Network: "media"}
	primary, err := buildResult(&base)
	if err != nil || len(primary.Routes) != 1 || primary.Routes[0].Dst.String() != "0.0.0.0/0" {
		t.Fatalf("primary routes: %v %v", primary, err)
	}
	sec := base
	sec.Secondary = true
	res, err := buildResult(&sec)
	if err != nil || len(res.Routes) != 1 || res.Routes[0].Dst.String() != "10.50.0.0/16" || res.Routes[0].GW.String() != "10.50.0.1" {
		t.Fatalf("secondary routes: %+v %v", res, err)
	}
	for _, bad := range []string{"", "garbage", "10.60.0.0/16"} {
		sec.Range = bad
		if _, err := buildResult(&sec); err == nil {
			t.Errorf("range %q accepted", bad)
		}
	}
}

// A VF attachment's result names the VF by pciID (CNI 1.1) on its one interface, the
// container's: no bridge, no host end, no gateway, no routes.
func TestBuildResultOfAVF(t *testing.T) {
	for _, kind := range []string{KindSRIOV, KindDPDK} {
		res := &AttachResult{ContainerID: "c1", IfName: "net1", NetNS: "/var/run/netns/c1", Kind: kind, PCIID: "0000:30:02.0",
			Address: "10.80.0.5/16", Network: "fast", Range: "10.80.0.0/16"}
		if kind == KindSRIOV {
			res.ContainerMAC, res.MTU = "02:00:00:00:00:05", 1400
		}
		r, err := buildResult(res)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		out, err := r.GetAsVersion("1.1.0")
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if err := out.PrintTo(&buf); err != nil {
			t.Fatal(err)
		}
		var got struct {
			Interfaces []map[string]any `json:"interfaces"`
			IPs        []map[string]any `json:"ips"`
			Routes     []any            `json:"routes"`
		}
		if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
			t.Fatal(err)
		}
		if len(got.Interfaces) != 1 || got.Interfaces[0]["pciID"] != "0000:30:02.0" || got.Interfaces[0]["name"] != "net1" ||
			got.Interfaces[0]["sandbox"] != "/var/run/netns/c1" {
			t.Fatalf("%s: interfaces %v", kind, got.Interfaces)
		}
		if len(got.IPs) != 1 || got.IPs[0]["address"] != "10.80.0.5/16" || got.IPs[0]["gateway"] != nil || got.IPs[0]["interface"] != float64(0) {
			t.Fatalf("%s: ips %v", kind, got.IPs)
		}
		if len(got.Routes) != 0 {
			t.Fatalf("%s: routes %v", kind, got.Routes)
		}
		if mac := got.Interfaces[0]["mac"]; (kind == KindSRIOV) != (mac == "02:00:00:00:00:05") {
			t.Fatalf("%s: mac %v", kind, mac)
		}
	}
}
