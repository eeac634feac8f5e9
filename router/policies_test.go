package router

import (
	"encoding/base64"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weftnet/weft/ipam"
)

// startPeerWith is startPeer with the configuration changed by tune first.
func startPeerWith(t *testing.T, dataDir string, tune func(*Config)) *testPeer {
	t.Helper()
	return startWiredPeer(t, dataDir, tune, nil)
}

// waitFor polls cond every 10 ms until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(10 * time.Millisecond) // poll interval
	}
}

func policyBody(name, file string) string {
	return fmt.Sprintf(`{"name":%q,"file":%q}`, name, base64.StdEncoding.EncodeToString([]byte(file)))
}

func TestPolicyAPI(t *testing.T) {
	var mu sync.Mutex
	var seen [][]ipam.PolicyObject
	// No ValidatePolicy: the peer's own, netpol.Parse, as every real peer runs.
	p := startPeerWith(t, t.TempDir(), func(c *Config) {
		c.OnPolicies = func(ps []ipam.PolicyObject) {
			mu.Lock()
			seen = append(seen, ps)
			mu.Unlock()
		}
	})
	h := p.apiHandler()
	waitFor(t, 10*time.Second, "the cluster to define its networks", func() bool { return len(p.cluster.Networks()) > 0 })

	const file = "name: db\nnetwork: default\nselector: {matchLabels: {app: db}}\n" +
		"ingress: [{action: allow, peers: [{selector: {matchLabels: {app: web}}}]}]\n"
	canonical, _, err := validatePolicy("db", []byte(file))
	if err != nil {
		t.Fatalf("the test's own policy: %v", err)
	}
	var info PolicyInfo
	waitFor(t, 10*time.Second, "a policy apply", func() bool {
		code, msg := apiCall(t, h, "POST", "/v1/policies", policyBody("db", file), &info)
		if code != 200 && code != 503 {
			t.Fatalf("apply: %d %s", code, msg)
		}
		return code == 200
	})
	if info.Name != "db" || info.Network != "default" || info.Version == 0 || info.Spec != nil {
		t.Fatalf("apply answered %+v", info)
	}
	var list []PolicyInfo
	if code, msg := apiCall(t, h, "GET", "/v1/policies", "", &list); code != 200 || len(list) != 1 || list[0].Name != "db" || list[0].Spec != nil {
		t.Fatalf("list: %d %s %+v", code, msg, list)
	}
	var shown PolicyInfo
	if code, msg := apiCall(t, h, "GET", "/v1/policies/db", "", &shown); code != 200 || string(shown.Spec) != string(canonical) {
		t.Fatalf("show: %d %s %+v", code, msg, shown)
	}
	waitFor(t, 5*time.Second, "OnPolicies to see the policy", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) > 0 && len(seen[len(seen)-1]) == 1 && seen[len(seen)-1][0].Name == "db"
	})

	// Garbage is refused with the validator's reason and position, and changes nothing.
	for _, tt := range []struct {
		body string
		code int
		msg  string
	}{
		{policyBody("db", `{"name": "db", "network": "default", "ingress": [`), 400, "line 1"},
		{policyBody("db", "name: db\nnetwork: default\nallow: [web]\n"), 400, `line 3 column 1: policy: unknown field "allow"`},
		{policyBody("db", `{"name": "db", "network": "nope"}`), 400, `"nope"`},
		{policyBody("db", `{"name": "other", "network": "default"}`), 400, `"other"`},
		{policyBody("Bad_Name", `{"name": "Bad_Name", "network": "default"}`), 400, "Bad_Name"},
		{policyBody("db", ``), 400, "empty file"},
		{`{"name":"db","file":"not base64!"}`, 400, "decode"},
		{`{"name":"db","file":"", "extra": 1}`, 400, "unknown field"},
	} {
		if code, msg := apiCall(t, h, "POST", "/v1/policies", tt.body, nil); code != tt.code || !strings.Contains(msg, tt.msg) {
			t.Errorf("apply %s: %d %q, want %d mentioning %q", tt.body, code, msg, tt.code, tt.msg)
		}
	}
	if code, _ := apiCall(t, h, "GET", "/v1/policies/db", "", &shown); code != 200 || shown.Version != info.Version {
		t.Fatalf("a refused apply changed the policy: %+v", shown)
	}

	if code, msg := apiCall(t, h, "GET", "/v1/policies/nope", "", nil); code != 404 || !strings.Contains(msg, `"nope"`) {
		t.Fatalf("show unknown: %d %s", code, msg)
	}
	if code, msg := apiCall(t, h, "DELETE", "/v1/policies/db", "", nil); code != 200 {
		t.Fatalf("rm: %d %s", code, msg)
	}
	if code, msg := apiCall(t, h, "DELETE", "/v1/policies/db", "", nil); code != 404 || !strings.Contains(msg, "no such policy") {
		t.Fatalf("rm again: %d %s", code, msg)
	}
	if code, msg := apiCall(t, h, "PUT", "/v1/policies/db", "", nil); code != 405 {
		t.Fatalf("PUT: %d %s", code, msg)
	}
	waitFor(t, 5*time.Second, "OnPolicies to see the removal", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) > 1 && len(seen[len(seen)-1]) == 0
	})
}
