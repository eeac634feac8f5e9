package ipam

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath/netpol"
)

// netpolValidator is the validator the router wires in (router.validatePolicy): netpol's
// parser, its policy re-encoded as the canonical form. (netpol imports nothing of ipam, so
// the tests run the real parser rather than a fake of it.)
func netpolValidator(name string, file []byte) ([]byte, string, error) {
	p, err := netpol.Parse(name, file)
	if err != nil {
		return nil, "", err
	}
	canonical, err := json.Marshal(p)
	return canonical, p.Network, err
}

// cidrPolicy is a valid policy file of about n bytes: its size is a /32 peer per 25 bytes.
func cidrPolicy(name string, n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "name: %s\nnetwork: default\ningress:\n", name)
	for i := 0; b.Len() < n; i++ {
		if i%netpol.MaxPeers == 0 {
			b.WriteString("  - action: allow\n    peers:\n")
		}
		fmt.Fprintf(&b, "      - cidr: 10.%d.%d.%d/32\n", i>>16&255, i>>8&255, i&255)
	}
	return b.String()
}

func policyObj(name, network, spec string) *PolicyObject {
	return &PolicyObject{Name: name, Network: network, Spec: json.RawMessage(spec)}
}

func TestFSMPolicyPutRemoveSnapshot(t *testing.T) {
	f, refusals := initFSM(t)
	res := applyCmd(f, 2, command{Op: opPolicyPut, Policy: policyObj("db", "default", `{"a":1}`)})
	if res.Err != "" || res.Index != 2 {
		t.Fatalf("put: %+v", res)
	}
	st := f.copyState()
	if p := st.Policies["db"]; p.Version != 2 || p.Network != "default" || string(p.Spec) != `{"a":1}` || st.PolicyIndex != 2 || st.Version != 2 {
		t.Fatalf("after put: %+v", st)
	}
	// The same put again is a no-op: no version, no delta.
	if res := applyCmd(f, 3, command{Op: opPolicyPut, Policy: policyObj("db", "default", `{"a":1}`)}); res.Err != "" || res.Index != 2 {
		t.Fatalf("retried put: %+v", res)
	}
	if d := f.deltasAfter(1); len(d) != 1 || d[0].Policy == nil || d[0].Policy.Name != "db" {
		t.Fatalf("deltas: %+v", d)
	}
	// A changed spec replaces it at the new index.
	if res := applyCmd(f, 4, command{Op: opPolicyPut, Policy: policyObj("db", "default", `{"a":2}`)}); res.Err != "" || res.Index != 4 {
		t.Fatalf("update: %+v", res)
	}
	if res := applyCmd(f, 5, command{Op: opPolicyPut, Policy: policyObj("web", "default", `{"b":1}`)}); res.Err != "" {
		t.Fatalf("put web: %+v", res)
	}

	// Snapshot and restore keep the policies.
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	g := newFSM()
	if err := g.Restore(io.NopCloser(bytes.NewReader(snap.(fsmSnapshot)))); err != nil {
		t.Fatal(err)
	}
	if got := g.copyState(); len(got.Policies) != 2 || string(got.Policies["db"].Spec) != `{"a":2}` || got.PolicyIndex != 5 {
		t.Fatalf("restored: %+v", got.Policies)
	}

	// Remove, then remove again: unknown.
	if res := applyCmd(f, 6, command{Op: opPolicyRemove, Policy: &PolicyObject{Name: "db"}}); res.Err != "" {
		t.Fatalf("rm: %+v", res)
	}
	before := stateJSON(f)
	for _, tt := range []struct {
		cmd  command
		want error
		msg  string
	}{
		{command{Op: opPolicyRemove, Policy: &PolicyObject{Name: "db"}}, ErrUnknownPolicy, `"db"`},
		{command{Op: opPolicyRemove}, ErrInvalidPolicy, "without a policy"},
		{command{Op: opPolicyPut}, ErrInvalidPolicy, "without a policy"},
		{command{Op: opPolicyPut, Policy: policyObj("Bad_Name", "default", `{}`)}, ErrInvalidPolicy, "Bad_Name"},
		{command{Op: opPolicyPut, Policy: policyObj(strings.Repeat("a", 64), "default", `{}`)}, ErrInvalidPolicy, "1-63"},
		{command{Op: opPolicyPut, Policy: policyObj("x", "nope", `{}`)}, ErrUnknownNetwork, `"nope"`},
		{command{Op: opPolicyPut, Policy: policyObj("x", "", `{}`)}, ErrInvalidPolicy, "network"},
		{command{Op: opPolicyPut, Policy: policyObj("x", "default", ``)}, ErrInvalidPolicy, "empty spec"},
		{command{Op: opPolicyPut, Policy: policyObj("x", "default", `{"a":"`+strings.Repeat("x", MaxPolicySpecBytes)+`"}`)}, ErrInvalidPolicy, "at most 65536"},
	} {
		res := applyCmd(f, 10, tt.cmd)
		if err := res.err(); !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s %+v: %v, want %v mentioning %q", tt.cmd.Op, tt.cmd.Policy, err, tt.want, tt.msg)
		}
	}
	if after := stateJSON(f); after != before {
		t.Fatalf("refused policy commands changed the state:\n%s\n%s", before, after)
	}
	if len(*refusals) != 9 {
		t.Fatalf("refusals counted: %d %v", len(*refusals), *refusals)
	}
}

// A snapshot from before policies (no "policies" key) restores, and takes policies after.
func TestFSMRestoreSnapshotWithoutPolicies(t *testing.T) {
	old := `{"cluster_id":"c1","networks":{"default":{"name":"default","subnet":"10.40.0.0/16","block_bits":26}},"owners":{},"pinned":true,"version":7}`
	f := newFSM()
	if err := f.Restore(io.NopCloser(strings.NewReader(old))); err != nil {
		t.Fatal(err)
	}
	if res := applyCmd(f, 8, command{Op: opPolicyPut, Policy: policyObj("db", "default", `{}`)}); res.Err != "" {
		t.Fatalf("put after an old snapshot: %+v", res)
	}
	// A snapshot with a bad policy is refused whole.
	bad := strings.Replace(old, `"version":7`, `"version":7,"policies":{"db":{"name":"other","network":"default","spec":{}}}`, 1)
	g := newFSM()
	if err := g.Restore(io.NopCloser(strings.NewReader(bad))); err == nil || !strings.Contains(err.Error(), "filed under") {
		t.Fatalf("misfiled policy restored: %v", err)
	}
}

func TestFSMPolicyBounds(t *testing.T) {
	f, _ := initFSM(t)
	idx := uint64(2)
	for i := 0; i < MaxPolicies; i++ {
		if res := applyCmd(f, idx, command{Op: opPolicyPut, Policy: policyObj(fmt.Sprintf("p%d", i), "default", `{}`)}); res.Err != "" {
			t.Fatalf("put %d: %+v", i, res)
		}
		idx++
	}
	res := applyCmd(f, idx, command{Op: opPolicyPut, Policy: policyObj("one-more", "default", `{}`)})
	if err := res.err(); !errors.Is(err, ErrPolicyLimit) || !strings.Contains(err.Error(), "at most 1000") {
		t.Fatalf("policy %d: %v", MaxPolicies+1, err)
	}
	// Replacing one of the 1000 is still allowed.
	if res := applyCmd(f, idx+1, command{Op: opPolicyPut, Policy: policyObj("p0", "default", `{"x":1}`)}); res.Err != "" {
		t.Fatalf("replace at the bound: %+v", res)
	}

	// The specs together are bounded.
	g, _ := initFSM(t)
	big := `{"a":"` + strings.Repeat("x", MaxPolicySpecBytes-10) + `"}`
	n := MaxPolicyTotalBytes / len(big)
	for i := 0; i < n; i++ {
		if res := applyCmd(g, uint64(2+i), command{Op: opPolicyPut, Policy: policyObj(fmt.Sprintf("b%d", i), "default", big)}); res.Err != "" {
			t.Fatalf("big %d: %+v", i, res)
		}
	}
	res = applyCmd(g, uint64(2+n), command{Op: opPolicyPut, Policy: policyObj("over", "default", big)})
	if err := res.err(); !errors.Is(err, ErrPolicyLimit) || !strings.Contains(err.Error(), "total") {
		t.Fatalf("over the byte total: %v", err)
	}
}

// Clients apply policy deltas; one stripped of its spec (too large to gossip) makes them fetch.
func TestPolicyDeltas(t *testing.T) {
	f, _ := initFSM(t)
	view := f.copyState()
	applyCmd(f, 2, command{Op: opPolicyPut, Policy: policyObj("db", "default", `{"a":1}`)})
	applyCmd(f, 3, command{Op: opPolicyPut, Policy: policyObj("big", "default", `{"a":"`+strings.Repeat("x", 2000)+`"}`)})
	applyCmd(f, 4, command{Op: opPolicyRemove, Policy: &PolicyObject{Name: "db"}})
	d := f.deltasAfter(1)
	if len(d) != 3 {
		t.Fatalf("deltas: %+v", d)
	}
	if err := applyDelta(&view, stripPolicySpec(d[0])); err != nil {
		t.Fatalf("small put: %v", err)
	}
	if string(view.Policies["db"].Spec) != `{"a":1}` || view.PolicyIndex != 2 {
		t.Fatalf("view after put: %+v", view.Policies)
	}
	stripped := stripPolicySpec(d[1])
	if len(stripped.Policy.Spec) != 0 || len(d[1].Policy.Spec) == 0 {
		t.Fatalf("large delta not stripped, or the FSM's copy changed: %+v", stripped.Policy)
	}
	if raw, _ := json.Marshal(stripped); len(raw) > maxPolicyDeltaBytes {
		t.Fatalf("stripped delta is %d bytes", len(raw))
	}
	if err := applyDelta(&view, stripped); !errors.Is(err, errTableGap) {
		t.Fatalf("stripped put: %v, want a fetch", err)
	}
	if view.Version != 2 {
		t.Fatalf("stripped put moved the view to %d", view.Version)
	}
	// After the fetch (here: the FSM's table) the remove applies.
	view = f.copyState()
	view.Version, view.Policies = 3, map[string]PolicyObject{"db": *policyObj("db", "default", `{}`), "big": f.copyState().Policies["big"]}
	if err := applyDelta(&view, d[2]); err != nil || len(view.Policies) != 1 || view.PolicyIndex != 4 {
		t.Fatalf("rm delta: %v %+v", err, view.Policies)
	}
	// A rm of an unknown policy is a bad table and changes nothing.
	if err := applyDelta(&view, tableDelta{Prev: 4, Index: 5, Op: opPolicyRemove, Policy: &PolicyObject{Name: "zzz"}}); !errors.Is(err, ErrBadTable) || view.Version != 4 {
		t.Fatalf("rm unknown: %v", err)
	}
}

// Puts and removes through the cluster: from a follower (forwarded), validated where the file
// arrives, visible on every member; garbage refused with the validator's reason.
func TestClusterPolicies(t *testing.T) {
	tc := newTestCluster(t)
	tc.bootstrap("a", "b", "c")
	for _, n := range tc.liveNodes() {
		n.c.cfg.ValidatePolicy = netpolValidator
	}
	ctx := context.Background()
	var from string
	for _, n := range tc.liveNodes() {
		if !n.c.IsLeader() {
			from = n.name
		}
	}
	c := tc.nodes[from].c
	const file = `{"name": "db", "network": "default", "ingress": [{"action": "allow", "peers": [{"cidr": "10.1.0.0/16"}]}]}`
	canonical, _, err := netpolValidator("db", []byte(file))
	if err != nil {
		t.Fatalf("the test's own policy: %v", err)
	}
	var p PolicyObject
	tc.reconcileUntil("a policy put through a follower", func() bool {
		var err error
		p, err = c.PutPolicy(ctx, "db", []byte(file))
		if err != nil && !errors.Is(err, ErrNoQuorum) {
			t.Fatalf("put: %v", err)
		}
		return err == nil
	})
	if p.Version == 0 || string(p.Spec) != string(canonical) {
		t.Fatalf("put answered %+v", p)
	}
	for _, n := range tc.liveNodes() {
		tc.reconcileUntil(n.name+" to hold the policy", func() bool {
			got, ok := n.c.Policy("db")
			return ok && got.Version == p.Version
		})
	}
	for _, tt := range []struct {
		name, file string
		want       error
		msg        string
	}{
		{"db", `{"name": "db", "network": "default", "ingress": [`, ErrInvalidPolicy, "line 1"},
		{"db", `{"name": "db", "rules": []}`, ErrInvalidPolicy, `unknown field "rules"`},
		{"db", `{"name": "db", "network": "nope"}`, ErrUnknownNetwork, `"nope"`},
		{"Bad", `{"name": "Bad", "network": "default"}`, ErrInvalidPolicy, "Bad"},
		{"db", `{"name": "other", "network": "default"}`, ErrInvalidPolicy, `names policy "other", not "db"`},
	} {
		_, err := c.PutPolicy(ctx, tt.name, []byte(tt.file))
		if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("put %s %s: %v, want %v mentioning %q", tt.name, tt.file, err, tt.want, tt.msg)
		}
	}
	if got, _ := c.Policy("db"); got.Version != p.Version {
		t.Fatalf("a refused put changed the policy: %+v", got)
	}
	if err := c.RemovePolicy(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	if err := c.RemovePolicy(ctx, "db"); !errors.Is(err, ErrUnknownPolicy) {
		t.Fatalf("second rm: %v", err)
	}
	for _, n := range tc.liveNodes() {
		tc.reconcileUntil(n.name+" to drop the policy", func() bool {
			ps, idx := n.c.Policies()
			return len(ps) == 0 && idx > p.Version
		})
	}
	// A peer without a validator refuses puts.
	c.cfg.ValidatePolicy = nil
	if _, err := c.PutPolicy(ctx, "db", []byte(`{"network":"default"}`)); !errors.Is(err, ErrInvalidPolicy) || !strings.Contains(err.Error(), "no policy validator") {
		t.Fatalf("put without a validator: %v", err)
	}
}

// A client (outside the Raft configuration) learns policies as it learns blocks: a small
// put by its gossiped delta, one too large to gossip by the fetch its stripped delta causes,
// and a removal; its own puts are forwarded.
func TestClientsLearnPolicies(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 0
	tc.bootstrap("p1", "p2", "p3")
	tc.nameCluster()
	tc.start("c1")
	for _, n := range tc.liveNodes() {
		n.c.cfg.ValidatePolicy = netpolValidator
	}
	for i := 0; i < 5; i++ {
		tc.gossip()
		for _, n := range tc.liveNodes() {
			n.c.Reconcile(context.Background(), tc.members(), time.Now())
		}
	}
	c1 := tc.nodes["c1"].c
	if r := c1.Role(); r != RoleClient {
		t.Fatalf("c1 is a %s, want a client", r)
	}
	ctx := context.Background()
	small, err := c1.PutPolicy(ctx, "small", []byte(`{"name":"small","network":"default"}`))
	if err != nil {
		t.Fatal(err)
	}
	large, err := tc.nodes["p2"].c.PutPolicy(ctx, "large", []byte(cidrPolicy("large", 4000)))
	if err != nil {
		t.Fatal(err)
	}
	if len(large.Spec) <= maxPolicyDeltaBytes {
		t.Fatalf("the large policy's spec is %d bytes: small enough to gossip", len(large.Spec))
	}
	tc.converge("c1 to hold both policies", func() bool {
		s, ok1 := c1.Policy("small")
		l, ok2 := c1.Policy("large")
		return ok1 && ok2 && s.Version == small.Version && l.Version == large.Version && string(l.Spec) == string(large.Spec)
	})
	if err := c1.RemovePolicy(ctx, "large"); err != nil {
		t.Fatal(err)
	}
	tc.converge("c1 to drop the removed policy", func() bool {
		_, ok := c1.Policy("large")
		return !ok && c1.PolicyIndex() > large.Version
	})
}

// A validator's refusal is ErrInvalidPolicy and the validator's own error, and says
// "invalid policy" once whether or not the validator's text already does.
func TestInvalidPolicySaysItOnce(t *testing.T) {
	own := errors.New("invalid policy: port 0")
	for _, err := range []error{own, errors.New("port 0")} {
		c := &Cluster{cfg: ClusterConfig{ValidatePolicy: func(string, []byte) ([]byte, string, error) { return nil, "", err }}}
		_, got := c.validatePolicy("p", []byte("x"))
		if !errors.Is(got, ErrInvalidPolicy) || !errors.Is(got, err) {
			t.Fatalf("%v: not both ErrInvalidPolicy and the validator's error", got)
		}
		if got.Error() != "invalid policy: port 0" {
			t.Fatalf("message %q, want %q", got.Error(), "invalid policy: port 0")
		}
	}
}
