package ipam

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/mesh/identity"
)

// pinSet is a KeyLookup over identities made in the test, as Mesh.PublicKey is over the mesh's
// pins. Safe for concurrent use.
type pinSet struct {
	mu   sync.Mutex
	keys map[string]ed25519.PublicKey
	ids  map[string]*identity.Identity
}

func newPinSet() *pinSet {
	return &pinSet{keys: map[string]ed25519.PublicKey{}, ids: map[string]*identity.Identity{}}
}

// add makes name's identity and pins its key.
func (p *pinSet) add(name string) *identity.Identity {
	id := identity.Generate()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.keys[name], p.ids[name] = id.Public(), id
	return id
}

func (p *pinSet) lookup(name string) (ed25519.PublicKey, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	k, ok := p.keys[name]
	return k, ok
}

// signedBy encodes d as gossip signed under name with id's key (which need not be name's).
func signedBy(t *testing.T, name string, id *identity.Identity, d tableDelta) []byte {
	t.Helper()
	raw := mustJSON(d)
	return mustJSON(signedDelta{Delta: raw, Signer: name, Sig: id.Sign(deltaSignDomain, deltaSignMessage(name, raw))})
}

func rejected(c *Cluster, reason string) float64 {
	return testutil.ToFloat64(c.metrics.tableRejected.WithLabelValues(reason))
}

// holdConfiguration gives a client's view a configuration, as a fetch would.
func holdConfiguration(c *Cluster, voters, nonvoters []string) {
	c.view.mu.Lock()
	defer c.view.mu.Unlock()
	c.view.voters, c.view.nonvoters, c.view.confHash = voters, nonvoters, 1
}

// A client with Keys applies a delta only when a raft member of the table it holds signed it
// with its pinned key; forged, unsigned, tampered or replayed deltas are refused and counted,
// and change nothing.
func TestTableDeltaSignatures(t *testing.T) {
	tc := newTestCluster(t)
	c := tc.start("c1").c
	pins := newPinSet()
	leader, spare, rogue := pins.add("v1"), pins.add("n1"), pins.add("r1")
	c.cfg.Keys = pins.lookup
	h := c.TableHandler()

	// No configuration held yet: a signed delta is deferred to the first fetch, not counted.
	claim := func(prev, index uint64, peer, block string) tableDelta {
		return tableDelta{Prev: prev, Index: index, Op: opClaim, Peer: peer, Network: &clusterNet, Block: netip.MustParsePrefix(block)}
	}
	first := claim(0, 5, "p1", "10.40.0.0/26")
	h.NotifyMsg(signedBy(t, "v1", leader, first))
	c.view.mu.Lock()
	deferred, version := c.view.wantFetch, c.view.state.Version
	c.view.mu.Unlock()
	if !deferred || version != 0 {
		t.Fatalf("a delta before any configuration: wantFetch %v, version %d; want a fetch and no change", deferred, version)
	}

	holdConfiguration(c, []string{"v1", "v2", "v3"}, []string{"n1"})
	forged := claim(0, 5, "r1", "10.40.0.0/26") // the rogue gives itself a block
	tampered := signedBy(t, "v1", leader, first)
	var env signedDelta
	if err := json.Unmarshal(tampered, &env); err != nil {
		t.Fatal(err)
	}
	env.Delta = mustJSON(forged)
	for _, tt := range []struct {
		what, reason string
		msg          []byte
	}{
		{"a bare delta", "unsigned", mustJSON(forged)},
		{"an envelope without a signature", "unsigned", mustJSON(signedDelta{Delta: mustJSON(forged), Signer: "v1"})},
		{"a delta signed by a key holder outside the configuration", "signer", signedBy(t, "r1", rogue, forged)},
		{"a delta signed by a name nobody pinned", "signer", signedBy(t, "v9", rogue, forged)},
		{"a delta under the leader's name, signed with another key", "signature", signedBy(t, "v1", rogue, forged)},
		{"the leader's delta with another body", "signature", mustJSON(env)},
		{"a voter with no pinned key", "signature", signedBy(t, "v2", rogue, forged)},
	} {
		before := rejected(c, tt.reason)
		h.NotifyMsg(tt.msg)
		if got := rejected(c, tt.reason); got != before+1 {
			t.Errorf("%s: weft_ipam_table_rejected_total{reason=%q} %v → %v, want one more", tt.what, tt.reason, before, got)
		}
		if rows := c.Status().Blocks; len(rows) != 0 {
			t.Fatalf("%s changed the table: %+v", tt.what, rows)
		}
	}
	// A signature is bound to its signer's name: the spare's signature does not pass as the leader's.
	raw := mustJSON(forged)
	replayed := mustJSON(signedDelta{Delta: raw, Signer: "v1", Sig: spare.Sign(deltaSignDomain, deltaSignMessage("n1", raw))})
	before := rejected(c, "signature")
	h.NotifyMsg(replayed)
	if rejected(c, "signature") != before+1 || len(c.Status().Blocks) != 0 {
		t.Fatal("a signature made under one name was accepted under another")
	}

	// The leader's signed delta is applied; so is one signed by a non-voter of the held
	// configuration (promoted and elected before this client refetched).
	h.NotifyMsg(signedBy(t, "v1", leader, first))
	h.NotifyMsg(signedBy(t, "n1", spare, claim(5, 6, "p2", "10.40.0.64/26")))
	rows := c.Status().Blocks
	if len(rows) != 2 || rows[0].Owner != "p1" || rows[1].Owner != "p2" {
		t.Fatalf("signed deltas not applied: %+v", rows)
	}
}

// fakeFetch serves body as the table, from a server its transport proved to be server.
func fakeFetch(body []byte, server string) FetchFunc {
	return func(context.Context, raft.ServerAddress) ([]byte, string, error) { return body, server, nil }
}

func servedBody(t *testing.T, voters, nonvoters []string, owner string) []byte {
	t.Helper()
	st := newFSMState()
	st.ClusterID, st.Version = "abcd", 9
	st.Networks[clusterNet.Name] = clusterNet
	st.Owners[clusterNet.Name] = map[netip.Prefix]string{netip.MustParsePrefix("10.40.0.0/26"): owner}
	return mustJSON(servedTable{State: st, Leader: voters[0], Voters: voters, Nonvoters: nonvoters, Conf: 7})
}

// A fetched table is installed only from a server that proved a name in the configuration the
// client holds, or, holding none, in the configuration the table itself names.
func TestTableFetchChecksTheServer(t *testing.T) {
	tc := newTestCluster(t)
	c := tc.start("c1").c
	pins := newPinSet()
	c.cfg.Keys = pins.lookup
	ctx := context.Background()
	owner := func() string {
		rows := c.Status().Blocks
		if len(rows) != 1 {
			return ""
		}
		return rows[0].Owner
	}
	fetch := func(body []byte, server string) error {
		c.cfg.FetchTable = fakeFetch(body, server)
		return c.fetchFrom(ctx, "addr", 0)
	}

	// Bootstrap: nothing held; the server must be named by the table it serves.
	before := rejected(c, "server")
	if err := fetch(servedBody(t, []string{"v1", "v2", "v3"}, nil, "r1"), "r1"); !errors.Is(err, ErrBadTable) || rejected(c, "server") != before+1 {
		t.Fatalf("a table served by a peer its configuration does not name: %v", err)
	}
	before = rejected(c, "unproven")
	if err := fetch(servedBody(t, []string{"v1"}, nil, "r1"), ""); !errors.Is(err, ErrBadTable) || rejected(c, "unproven") != before+1 {
		t.Fatalf("a table from a server that proved no name: %v", err)
	}
	if owner() != "" {
		t.Fatalf("a refused table was installed: %+v", c.Status().Blocks)
	}
	if err := fetch(servedBody(t, []string{"v1", "v2", "v3"}, []string{"n1"}, "p1"), "v2"); err != nil || owner() != "p1" {
		t.Fatalf("a table served by a voter it names: %v, owner %q", err, owner())
	}

	// Now the client holds v1..v3 and n1, and v1 is alive: only those may serve.
	c.Observe([]Member{
		{Name: "v1", RaftAddr: "v1", Alive: true, InCluster: true, ClusterID: "abcd"},
		{Name: "r1", RaftAddr: "r1", Alive: true, InCluster: true, ClusterID: "abcd"},
	})
	before = rejected(c, "server")
	if err := fetch(servedBody(t, []string{"r1"}, nil, "r1"), "r1"); !errors.Is(err, ErrBadTable) || rejected(c, "server") != before+1 {
		t.Fatalf("a self-consistent table from a peer outside the held configuration: %v", err)
	}
	if owner() != "p1" {
		t.Fatalf("the refused table replaced the held one: %+v", c.Status().Blocks)
	}
	if got := fetchTargets(c.raftPeers, []string{"v1", "v2", "v3", "n1"}); len(got) != 1 || got[0].Name != "v1" {
		t.Errorf("fetch targets %+v, want only v1 (the one held member alive)", got)
	}
	if err := fetch(servedBody(t, []string{"v1", "v2", "n1"}, []string{"c9"}, "p2"), "n1"); err != nil || owner() != "p2" {
		t.Fatalf("a table served by a non-voter of the held configuration: %v, owner %q", err, owner())
	}

	// Every held member gone (v1, v2, n1, c9 not alive): the client bootstraps again.
	c.Observe([]Member{{Name: "r1", RaftAddr: "r1", Alive: true, InCluster: true, ClusterID: "abcd"}})
	if err := fetch(servedBody(t, []string{"v7"}, nil, "p3"), "r1"); !errors.Is(err, ErrBadTable) {
		t.Fatalf("re-bootstrap from a server its table does not name: %v", err)
	}
}

// Over the real transport: a server whose certificate key is not the one pinned for its name
// serves no table, and a client that checks identities learns who served it.
func TestTableFetchOverTransportChecksIdentity(t *testing.T) {
	key := transportTestKey("tablesig")
	pins := newPinSet()
	v1, clientID, rogue := pins.add("v1"), pins.add("c1"), identity.Generate()
	body := servedBody(t, []string{"v1"}, nil, "p1")
	serve := func(id *identity.Identity) *PeerTransport {
		tr, _ := newTestTransportCfg(t, TransportConfig{Key: key, Name: "v1", Identity: id.Signer(), Keys: pins.lookup})
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(body) }),
			ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(tr.RPCListener())
		t.Cleanup(func() { srv.Close() })
		return tr
	}
	honest, impostor := serve(v1), serve(rogue)

	tc := newTestCluster(t)
	c := tc.start("c1").c
	c.cfg.Keys = pins.lookup
	client, _ := newTestTransportCfg(t, TransportConfig{Key: key, Name: "c1", Identity: clientID.Signer(), Keys: pins.lookup})
	c.cfg.FetchTable = HTTPTableFetcher(client.DialRPC)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	before := refusedCount(client, refusedIdentity)
	err := c.fetchFrom(ctx, raft.ServerAddress(impostor.Addr().String()), 0)
	if !errors.Is(err, errIdentity) {
		t.Fatalf("fetch from a server under v1's name with another key: %v, want the identity error", err)
	}
	if refusedCount(client, refusedIdentity) != before+1 || len(c.Status().Blocks) != 0 {
		t.Fatalf("the impostor's table: refusals %v, table %+v", refusedCount(client, refusedIdentity)-before, c.Status().Blocks)
	}
	if err := c.fetchFrom(ctx, raft.ServerAddress(honest.Addr().String()), 0); err != nil {
		t.Fatalf("fetch from v1: %v", err)
	}
	if rows := c.Status().Blocks; len(rows) != 1 || rows[0].Owner != "p1" {
		t.Fatalf("v1's table not installed: %+v", rows)
	}
	_, server, err := HTTPTableFetcher(client.DialRPC)(ctx, raft.ServerAddress(honest.Addr().String()))
	if err != nil || server != "v1" {
		t.Fatalf("the fetcher named the server %q (%v), want v1", server, err)
	}
}

// End to end on a test cluster whose nodes sign: clients learn every block from the leader's
// signed deltas and fetches, and a client holding the cluster key cannot give itself a block
// in the others' tables, neither under its own name nor under the leader's.
func TestSignedTableReachesClients(t *testing.T) {
	tc := newTestCluster(t)
	tc.nonvoters = 1
	tc.bootstrap("p1", "p2", "p3", "p4")
	tc.nameCluster()
	for _, name := range []string{"c1", "c2", "c3"} {
		tc.start(name)
	}
	pins := newPinSet()
	for _, n := range tc.liveNodes() {
		n.c.cfg.Signer, n.c.cfg.Keys = pins.add(n.name), pins.lookup
	}
	tc.converge("every client to hold the configuration", func() bool {
		for _, name := range []string{"c1", "c2", "c3"} {
			c := tc.nodes[name].c
			c.view.mu.Lock()
			n := len(c.view.voters)
			c.view.mu.Unlock()
			if n != 3 {
				return false
			}
		}
		return true
	})
	ctx := context.Background()
	want := map[netip.Prefix]string{}
	for _, name := range []string{"c1", "c2", "p4"} {
		b, err := tc.nodes[name].c.Claim(ctx, clusterNet, name)
		if err != nil {
			t.Fatalf("%s claim: %v", name, err)
		}
		want[b] = name
	}
	want = tc.tablesAgree(tc.converge, want)
	for _, name := range []string{"c1", "c2", "c3"} {
		c := tc.nodes[name].c
		if r := c.Role(); r != RoleClient {
			t.Fatalf("%s is a %s, want a client", name, r)
		}
		for _, reason := range []string{"unsigned", "signer", "signature", "server", "unproven"} {
			if n := rejected(c, reason); n != 0 {
				t.Errorf("%s refused %v honest inputs as %q", name, n, reason)
			}
		}
	}
	// A later claim reaches the clients by gossip alone (one signed delta).
	b, err := tc.nodes["c2"].c.Claim(ctx, clusterNet, "c2")
	if err != nil {
		t.Fatal(err)
	}
	want[b] = "c2"
	msgs := tc.leaderNode().c.TableBroadcasts()
	for _, name := range []string{"c1", "c3"} {
		c := tc.nodes[name].c
		applied := testutil.ToFloat64(c.metrics.tableDeltas)
		for _, m := range msgs {
			c.TableHandler().NotifyMsg(m)
		}
		if testutil.ToFloat64(c.metrics.tableDeltas) <= applied || !slices.ContainsFunc(c.Status().Blocks, func(r BlockOwnership) bool { return r.CIDR == b }) {
			t.Fatalf("%s did not apply the leader's signed delta: %+v", name, c.Status().Blocks)
		}
	}
	want = tc.tablesAgree(tc.converge, want)

	// c3 holds the cluster key and its own identity; it forges the next delta.
	c1 := tc.nodes["c1"].c
	c1.view.mu.Lock()
	next := c1.view.state.Version
	c1.view.mu.Unlock()
	steal := tableDelta{Prev: next, Index: next + 1, Op: opRemovePeer, Peer: "c1"}
	leader := tc.leaderNode().name
	for _, msg := range [][]byte{
		signedBy(t, "c3", pins.ids["c3"], steal),
		signedBy(t, leader, pins.ids["c3"], steal),
	} {
		for _, name := range []string{"c1", "c2"} {
			tc.nodes[name].c.TableHandler().NotifyMsg(msg)
		}
	}
	for _, name := range []string{"c1", "c2"} {
		c := tc.nodes[name].c
		if rejected(c, "signer") != 1 || rejected(c, "signature") != 1 {
			t.Errorf("%s: signer %v, signature %v refusals; want 1 each", name, rejected(c, "signer"), rejected(c, "signature"))
		}
	}
	tc.tablesAgree(tc.converge, want)
}

// With two or more Raft members in the mesh, a client with no configuration installs a table
// only once two members of different names report the same configuration: a lone key holder
// serving a configuration of its own is never confirmed.
func TestTableBootstrapNeedsTwoMembers(t *testing.T) {
	tc := newTestCluster(t)
	c := tc.start("c1").c
	c.cfg.Keys = newPinSet().lookup
	c.Observe([]Member{
		{Name: "v1", RaftAddr: "v1", Alive: true, InCluster: true, ClusterID: "abcd"},
		{Name: "v2", RaftAddr: "v2", Alive: true, InCluster: true, ClusterID: "abcd"},
		{Name: "r1", RaftAddr: "r1", Alive: true, InCluster: true, ClusterID: "abcd"},
	})
	ctx := context.Background()
	fetch := func(body []byte, server string) {
		t.Helper()
		c.cfg.FetchTable = fakeFetch(body, server)
		if err := c.fetchFrom(ctx, raft.ServerAddress(server), 0); err != nil {
			t.Fatalf("fetch from %s: %v", server, err)
		}
	}
	installed := func() bool { return len(c.Status().Blocks) != 0 }
	real := servedBody(t, []string{"v1", "v2", "v3"}, nil, "p1")
	forged := servedBody(t, []string{"r1"}, nil, "r1")

	fetch(forged, "r1")
	fetch(forged, "r1") // the same server twice confirms nothing
	if installed() {
		t.Fatalf("a lone server's configuration was installed: %+v", c.Status().Blocks)
	}
	// The next fetches go to other members than the one waiting for confirmation.
	var mu sync.Mutex
	var asked []string
	c.cfg.FetchTable = func(_ context.Context, addr raft.ServerAddress) ([]byte, string, error) {
		mu.Lock()
		defer mu.Unlock()
		asked = append(asked, string(addr))
		return nil, "", errors.New("unreachable")
	}
	for i := 1; i <= 20; i++ {
		c.mu.Lock()
		c.lastFetch = time.Time{}
		c.mu.Unlock()
		c.SyncTable(ctx, time.Now())
		pollUntil(t, 5*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			c.mu.Lock()
			defer c.mu.Unlock()
			return len(asked) == i && !c.fetching
		}, "the fetch to be made")
	}
	if slices.Contains(asked, "r1") {
		t.Fatalf("fetched again from the server waiting for confirmation: %v", asked)
	}
	fetch(real, "v1") // disagrees with r1: becomes the candidate instead
	if installed() {
		t.Fatal("two servers that disagree confirmed each other")
	}
	fetch(servedBody(t, []string{"v3", "v2", "v1"}, nil, "p1"), "v2") // same set, another order
	if rows := c.Status().Blocks; len(rows) != 1 || rows[0].Owner != "p1" {
		t.Fatalf("two members agreeing did not install the table: %+v", rows)
	}
	c.view.mu.Lock()
	voters := c.view.voters
	c.view.mu.Unlock()
	if len(voters) != 3 {
		t.Fatalf("held voters %v, want v1..v3", voters)
	}
}
