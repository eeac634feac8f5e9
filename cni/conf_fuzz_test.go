package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

// recordingPeer stands in for the local peer on a unix socket: it keeps the last ADD it was
// sent and answers with the result the fuzzer chose.
type recordingPeer struct {
	mu     sync.Mutex // guards the fields below
	got    []AttachRequest
	answer []byte
}

func startRecordingPeer(t testing.TB) (*recordingPeer, string) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "weft.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	p := &recordingPeer{}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req AttachRequest
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(Error{Code: types.ErrDecodingFailure, Message: err.Error()})
			return
		}
		p.mu.Lock()
		p.got = append(p.got, req)
		answer := p.answer
		p.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write(answer)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return p, sock
}

func (p *recordingPeer) reset(answer []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got, p.answer = nil, answer
}

func (p *recordingPeer) requests() []AttachRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]AttachRequest(nil), p.got...)
}

// FuzzPluginAdd runs the plugin's ADD end to end on fuzzed stdin, CNI_ARGS and CNI_* values,
// against a fake peer that answers a fuzzed result. A configuration or CNI_ARGS the plugin
// refuses must fail with a CNI error code and send nothing to the peer; an accepted one must
// reach the peer exactly as parsed (same names, network, MTU, services), and whatever the
// peer answers, the plugin prints a result in the configured version or fails with a code.
func FuzzPluginAdd(f *testing.F) {
	peer, sock := startRecordingPeer(f)
	good := `{"ifname":"eth0","netns":"/var/run/netns/x","host_ifname":"weftabc","bridge":"weft","address":"10.40.0.5/16","gateway":"10.40.0.1","mtu":1420}`
	for _, c := range []struct{ conf, args, cid, ifname, netns, answer string }{
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/var/run/netns/x", good},
		{`{"cniVersion":"0.3.1","name":"n","type":"weft","network":"blue","mtu":9000}`, "K8S_POD_NAME=web-0;K8S_POD_NAMESPACE=ns;IgnoreUnknown=1", "c1", "eth0", "/var/run/netns/x", good},
		{`{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":576}`, "name=db;WEFT_SERVICES=http/tcp/80, dns/udp/53", "c1", "net1", "/proc/1/ns/net", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","mtu":65535}`, "WEFT_SERVICES=x/tcp/0,y/udp/65535", strings.Repeat("c", 512), strings.Repeat("i", 15), "/", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","network":"abcdefghijklmnopqrstuvwxyz012345"}`, "K8S_POD_NAME=" + strings.Repeat("a", 300), "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", `{"address":"0.0.0.0/0","gateway":"0.0.0.0"}`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", `{"address":"10.40.0.5/32","gateway":"255.255.255.255","mtu":-1}`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", `{"address":"fd00::5/64","gateway":"fd00::1"}`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", `{"address":"10.40.0.5/16","gateway":"10.40.0.1","dns":{"nameservers":["10.40.0.1"],"search":["weft.local"]}}`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", `{"code":11,"msg":"try again"}`},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", `garbage`},
		{`{"cniVersion":"9.9.9","name":"n","type":"weft"}`, "", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","mtu":575}`, "", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","mtu":65536}`, "", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","network":"Bad!"}`, "", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft","socket":"rel"}`, "", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","type":"weft"}`, "", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, "broken", "c1", "eth0", "/x", good},
		{`{"cniVersion":"1.1.0","name":"n","type":"weft"}`, ";", "c1", "eth0", "/x", good},
		{`[]`, "", "", "", "", ""},
		{`{"name":"n","mtu":1e400}`, "", "", "", "", ""},
	} {
		f.Add(c.conf, c.args, c.cid, c.ifname, c.netns, c.answer)
	}
	f.Fuzz(func(t *testing.T, conf, args, cid, ifname, netns, answer string) {
		// Every configuration talks to the fake peer, never to a real one at the default
		// socket: an absent or absolute "socket" is pointed at the fake; a bad one stays, to
		// be refused.
		var raw map[string]any
		if json.Unmarshal([]byte(conf), &raw) == nil && raw != nil {
			if s, ok := raw["socket"].(string); !ok && raw["socket"] == nil || ok && filepath.IsAbs(s) {
				raw["socket"] = sock
			}
			b, _ := json.Marshal(raw)
			conf = string(b)
		}
		peer.reset([]byte(answer))
		parsed, perr := ParseConf([]byte(conf))
		var ca ContainerArgs
		var aerr error
		if perr == nil {
			if !slices.Contains(SupportedVersions, parsed.CNIVersion) {
				// skel refuses these before the plugin runs (an empty cniVersion reads
				// as 0.1.0); the chaos test TestBadInput drives that through the binary.
				t.Skipf("cniVersion %q: skel's to refuse", parsed.CNIVersion)
			}
			if parsed.Socket != sock {
				// JSON the rewrite above could not read (a number out of range, keys in
				// another case) but ParseConf accepts: never dial a socket the test does not own.
				t.Skipf("configuration names socket %q", parsed.Socket)
			}
			ca, aerr = ParseArgs(args, cid)
		}
		var out bytes.Buffer
		p := Plugin{Stdout: &out, Timeout: 5 * time.Second}
		err := p.Add(&skel.CmdArgs{ContainerID: cid, IfName: ifname, Netns: netns, Args: args, StdinData: []byte(conf)})
		var ce *types.Error
		if err != nil && (!errors.As(err, &ce) || ce.Code == 0 || ce.Msg == "") {
			t.Fatalf("Add failed with %T %v: want a CNI error with a code and a message", err, err)
		}
		sent := peer.requests()
		if perr != nil || aerr != nil {
			if err == nil || len(sent) != 0 {
				t.Fatalf("refused input (conf %v, args %v) gave Add error %v and sent %d requests", perr, aerr, err, len(sent))
			}
			return
		}
		if len(sent) != 1 {
			t.Fatalf("accepted input sent %d requests to the peer", len(sent))
		}
		want := AttachRequest{ContainerID: cid, IfName: ifname, NetNS: netns, CNINetwork: parsed.Name,
			Network: parsed.Network, Name: ca.Name, MTU: parsed.MTU, Services: ca.Services}
		if !validUTF8(cid, ifname, netns, parsed.Name, ca.Name, strings.Join(ca.Services, ",")) {
			return // JSON replaces invalid UTF-8; the peer validates what it gets
		}
		if !reflect.DeepEqual(sent[0], want) {
			t.Fatalf("the peer got %+v, want %+v", sent[0], want)
		}
		if ca.Name == "" && cid != "" {
			t.Fatalf("CNI_ARGS %q with container %q gave no name", args, cid)
		}
		for _, s := range ca.Services {
			if s == "" || strings.Contains(s, ",") || strings.TrimSpace(s) != s {
				t.Fatalf("CNI_ARGS %q gave service %q", args, s)
			}
		}
		if err == nil {
			var res struct {
				CNIVersion string `json:"cniVersion"`
				IPs        []struct {
					Address string `json:"address"`
				} `json:"ips"`
			}
			if jerr := json.Unmarshal(out.Bytes(), &res); jerr != nil || res.CNIVersion != parsed.CNIVersion {
				t.Fatalf("Add printed %q for cniVersion %q: %v", out.String(), parsed.CNIVersion, jerr)
			}
			for _, ip := range res.IPs {
				if _, err := netip.ParsePrefix(ip.Address); err != nil {
					t.Fatalf("Add printed address %q for the peer's answer %q: %v", ip.Address, answer, err)
				}
			}
		}
	})
}

func validUTF8(ss ...string) bool {
	for _, s := range ss {
		if !utf8.ValidString(s) {
			return false
		}
	}
	return true
}
