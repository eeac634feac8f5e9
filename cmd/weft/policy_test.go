package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/router"
)

func TestPolicyName(t *testing.T) {
	for _, tt := range []struct{ in, want, err string }{
		{`{"name": "db", "network": "default"}`, "db", ""},
		{"name: db\nnetwork: default\n", "db", ""},
		{"metadata:\n  name: db-only\n", "", `no top-level "name"`},
		{"network: default\n", "", `no top-level "name"`},
		{`{"name": ""}`, "", `no top-level "name"`},
		{`{"name": 5}`, "", "not a string"},
		{`{"name": ["a"]}`, "", "not a string"},
		{"name: [unclosed\n", "", "not YAML or JSON"},
		{"- a\n- b\n", "", "not YAML or JSON"},
	} {
		got, err := policyName([]byte(tt.in))
		if got != tt.want || (tt.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("policyName(%q) = %q, %v; want %q, %q", tt.in, got, err, tt.want, tt.err)
		}
	}
}

func TestLabelRequest(t *testing.T) {
	req, err := labelRequest("web", []string{"app=web", "tier-", "empty=", "app=web"})
	if err != nil || req.Container != "web" || len(req.Set) != 2 || req.Set["app"] != "web" || req.Set["empty"] != "" || strings.Join(req.Remove, ",") != "tier" {
		t.Fatalf("%+v %v", req, err)
	}
	for _, bad := range [][]string{{"app"}, {"=v"}, {"-"}, {"app=a", "app=b"}} {
		if _, err := labelRequest("web", bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if got := formatLabels(map[string]string{"b": "2", "a": "1"}); got != "a=1,b=2" {
		t.Errorf("formatLabels: %q", got)
	}
	if got := formatLabels(nil); got != "(none)" {
		t.Errorf("formatLabels(nil): %q", got)
	}
}

// policyPeer serves the policy and label endpoints as the peer does, with a validator that
// wants JSON naming a network, and records what it was asked.
type policyPeer struct {
	mu       sync.Mutex // guards the fields below
	reqs     []string
	policies map[string]router.PolicyInfo
}

func (f *policyPeer) start(t *testing.T) string {
	t.Helper()
	f.policies = map[string]router.PolicyInfo{}
	sock := filepath.Join(t.TempDir(), "weft.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fail := func(w http.ResponseWriter, status int, msg string) {
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(cni.Error{Code: 7, Message: msg})
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.reqs = append(f.reqs, r.Method+" "+r.URL.EscapedPath())
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == "POST" && r.URL.Path == "/v1/policies":
			var req router.PolicyRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				fail(w, 400, "decode: "+err.Error())
				return
			}
			var spec struct {
				Network string `yaml:"network"`
			}
			if err := yaml.Unmarshal(req.File, &spec); err != nil {
				fail(w, 400, fmt.Sprintf("policy apply %s: invalid policy: line 1: %v", req.Name, err))
				return
			}
			info := router.PolicyInfo{Name: req.Name, Network: spec.Network, Version: uint64(len(f.reqs)), Spec: req.File}
			f.policies[req.Name] = info
			info.Spec = nil
			json.NewEncoder(w).Encode(info)
		case r.Method == "GET" && r.URL.Path == "/v1/policies":
			out := []router.PolicyInfo{}
			for _, p := range f.policies {
				p.Spec = nil
				out = append(out, p)
			}
			json.NewEncoder(w).Encode(out)
		case strings.HasPrefix(r.URL.Path, "/v1/policies/"):
			name := strings.TrimPrefix(r.URL.Path, "/v1/policies/")
			p, ok := f.policies[name]
			if !ok {
				fail(w, 404, fmt.Sprintf("policy %s: no such policy: %q", r.Method, name))
				return
			}
			if r.Method == "DELETE" {
				delete(f.policies, name)
				json.NewEncoder(w).Encode(struct{}{})
				return
			}
			json.NewEncoder(w).Encode(p)
		case r.Method == "POST" && r.URL.Path == "/v1/labels":
			var req router.LabelRequest
			json.NewDecoder(r.Body).Decode(&req)
			if req.Container != "web" {
				fail(w, 404, fmt.Sprintf("label %s: no such container attached on peer p1", req.Container))
				return
			}
			labels := map[string]string{"app": "web"}
			for _, k := range req.Remove {
				delete(labels, k)
			}
			for k, v := range req.Set {
				labels[k] = v
			}
			json.NewEncoder(w).Encode(router.LabelResult{Container: "web1", Labels: labels})
		case r.Method == "GET" && r.URL.Path == "/v1/policy/explain":
			q := r.URL.Query()
			if q.Get("src") != "client" || q.Get("dst") != "db" || q.Get("proto") != "tcp" || q.Get("port") != "5432" {
				fail(w, 400, "policy explain: unexpected query "+r.URL.RawQuery)
				return
			}
			v := router.PolicyExplainVerdict{Selected: true, Policy: "default/db-only-web", Rule: -1,
				Counter: "netpol_default_db-only-web_ingress_default", Reason: "default deny of policy default/db-only-web (ingress of 10.40.0.2): no rule matches"}
			json.NewEncoder(w).Encode(router.PolicyExplain{Src: netip.MustParseAddr("10.40.0.3"), Dst: netip.MustParseAddr("10.40.0.2"),
				Proto: "tcp", Port: 5432, Reason: v.Reason, Egress: router.PolicyExplainVerdict{Allowed: true, Rule: -1, Reason: "default allow"}, Ingress: v})
		default:
			fail(w, 404, "no endpoint")
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestPolicyCommands(t *testing.T) {
	fp := &policyPeer{}
	sock := fp.start(t)
	dir := t.TempDir()
	yamlFile := filepath.Join(dir, "db.yaml")
	os.WriteFile(yamlFile, []byte("name: db-only\nnetwork: default\n"), 0o600)
	jsonFile := filepath.Join(dir, "web.json")
	os.WriteFile(jsonFile, []byte(`{"name": "web", "network": "default", "ingress": []}`), 0o600)
	garbage := filepath.Join(dir, "bad.json")
	os.WriteFile(garbage, []byte(`{"name": "bad", "network": `), 0o600)
	noName := filepath.Join(dir, "noname.json")
	os.WriteFile(noName, []byte(`{"network": "default"}`), 0o600)

	// The YAML file reaches the peer as written (the peer validates it; the CLI reads the name).
	out, err := runWeft(t, "--socket", sock, "policy", "apply", "-f", yamlFile)
	if err != nil || !strings.Contains(out, "applied policy db-only to network") {
		t.Fatalf("apply yaml: %q %v", out, err)
	}
	if out, err = runWeft(t, "--socket", sock, "policy", "apply", "-f", jsonFile); err != nil || !strings.Contains(out, "applied policy web to network default") {
		t.Fatalf("apply json: %q %v", out, err)
	}
	if _, err = runWeft(t, "--socket", sock, "policy", "apply", "-f", garbage); err == nil || !strings.Contains(err.Error(), "not YAML or JSON") {
		t.Fatalf("apply garbage: %v", err)
	}
	if _, err = runWeft(t, "--socket", sock, "policy", "apply", "-f", noName); err == nil || !strings.Contains(err.Error(), `no top-level "name"`) {
		t.Fatalf("apply without a name: %v", err)
	}
	if _, err = runWeft(t, "--socket", sock, "policy", "apply", "-f", filepath.Join(dir, "missing")); err == nil {
		t.Fatal("apply of a missing file succeeded")
	}
	if _, err = runWeft(t, "--socket", sock, "policy", "apply"); err == nil || !strings.Contains(err.Error(), "filename") {
		t.Fatalf("apply without -f: %v", err)
	}
	big := filepath.Join(dir, "big.json")
	os.WriteFile(big, []byte(`{"name":"big","x":"`+strings.Repeat("x", 70000)+`"}`), 0o600)
	if _, err = runWeft(t, "--socket", sock, "policy", "apply", "-f", big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("apply of a big file: %v", err)
	}
	// The peer's refusal (the validator's reason and position) comes through whole.
	refused := filepath.Join(dir, "refused.yaml")
	os.WriteFile(refused, []byte("name: refused\nnetwork: [1]\n"), 0o600)
	if _, err = runWeft(t, "--socket", sock, "policy", "apply", "-f", refused); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("peer refusal: %v", err)
	}

	out, err = runWeft(t, "--socket", sock, "policy", "ls")
	if err != nil || !strings.Contains(out, "NAME") || !strings.Contains(out, "web") || !strings.Contains(out, "db-only") {
		t.Fatalf("ls: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "policy", "ls", "--json")
	var list []router.PolicyInfo
	if err != nil || json.Unmarshal([]byte(out), &list) != nil || len(list) != 2 {
		t.Fatalf("ls --json: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "policy", "show", "web")
	if err != nil || !strings.Contains(out, "name:    web") || !strings.Contains(out, `"ingress": []`) {
		t.Fatalf("show: %q %v", out, err)
	}
	if _, err = runWeft(t, "--socket", sock, "policy", "show", "nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("show unknown: %v", err)
	}
	if out, err = runWeft(t, "--socket", sock, "policy", "rm", "web"); err != nil || !strings.Contains(out, "removed policy web") {
		t.Fatalf("rm: %q %v", out, err)
	}
	if out, err = runWeft(t, "--socket", sock, "policy", "ls"); err != nil || strings.Contains(out, "web") {
		t.Fatalf("ls after rm: %q %v", out, err)
	}

	if out, err = runWeft(t, "--socket", sock, "label", "web", "tier=front", "app-"); err != nil || !strings.Contains(out, "container web1 labels: tier=front") {
		t.Fatalf("label: %q %v", out, err)
	}
	if _, err = runWeft(t, "--socket", sock, "label", "nope", "a=b"); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("label unknown: %v", err)
	}
	if _, err = runWeft(t, "--socket", sock, "label", "web", "oops"); err == nil || !strings.Contains(err.Error(), "neither") {
		t.Fatalf("label bad arg: %v", err)
	}
	fp.mu.Lock()
	defer fp.mu.Unlock()
	want := []string{"POST /v1/policies", "POST /v1/policies", "POST /v1/policies", "GET /v1/policies", "GET /v1/policies",
		"GET /v1/policies/web", "GET /v1/policies/nope", "DELETE /v1/policies/web", "GET /v1/policies", "POST /v1/labels", "POST /v1/labels"}
	if len(fp.policies) != 1 || fp.policies["db-only"].Network != "default" || !strings.Contains(string(fp.policies["db-only"].Spec), "name: db-only") {
		t.Fatalf("policies the peer holds: %+v", fp.policies)
	}
	if strings.Join(fp.reqs, "\n") != strings.Join(want, "\n") {
		t.Fatalf("requests:\n%s\nwant:\n%s", strings.Join(fp.reqs, "\n"), strings.Join(want, "\n"))
	}
}

func TestPolicyExplainCommand(t *testing.T) {
	fp := &policyPeer{}
	sock := fp.start(t)
	out, err := runWeft(t, "--socket", sock, "policy", "explain", "client", "db", "5432")
	if err != nil || !strings.Contains(out, "DENIED: client (10.40.0.3) -> db (10.40.0.2) tcp/5432") ||
		!strings.Contains(out, "default deny of policy default/db-only-web") || !strings.Contains(out, "counter netpol_default_db-only-web_ingress_default") {
		t.Fatalf("explain: %q %v", out, err)
	}
	out, err = runWeft(t, "--socket", sock, "policy", "explain", "client", "db", "TCP/5432", "--json")
	var ex router.PolicyExplain
	if err != nil || json.Unmarshal([]byte(out), &ex) != nil || ex.Ingress.Policy != "default/db-only-web" {
		t.Fatalf("explain --json: %q %v", out, err)
	}
	if _, err := runWeft(t, "--socket", sock, "policy", "explain", "client", "db", "tcp/http"); err == nil || !strings.Contains(err.Error(), "PORT") {
		t.Fatalf("explain with a bad port: %v", err)
	}
}

func TestSplitProtoPort(t *testing.T) {
	for in, want := range map[string]string{"5432": "tcp 5432", "udp/53": "udp 53", "ICMP": "icmp 0", "sctp/9": "sctp 9"} {
		p, n, err := splitProtoPort(in)
		if err != nil || fmt.Sprintf("%s %d", p, n) != want {
			t.Errorf("%s: %s %d %v, want %s", in, p, n, err, want)
		}
	}
	for _, in := range []string{"", "0", "tcp/", "tcp/70000", "x/y"} {
		if _, _, err := splitProtoPort(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}
