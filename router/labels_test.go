package router

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weftnet/weft/cni"
	"github.com/weftnet/weft/ipam"
	"github.com/weftnet/weft/mesh/identity"
)

// labelPair is two label stores of peers a and b, each trusting the other's identity key.
func labelPair(t *testing.T) (a, b *labelStore, ida, idb *identity.Identity) {
	t.Helper()
	ida, idb = identity.Generate(), identity.Generate()
	keys := func(peer string) (ed25519.PublicKey, bool) {
		switch peer {
		case "a":
			return ida.Public(), true
		case "b":
			return idb.Public(), true
		}
		return nil, false
	}
	var err error
	if a, err = newLabelStore(labelStoreConfig{Self: "a", Signer: ida, Keys: keys, Registerer: prometheus.NewRegistry()}); err != nil {
		t.Fatal(err)
	}
	if b, err = newLabelStore(labelStoreConfig{Self: "b", Signer: idb, Keys: keys, Registerer: prometheus.NewRegistry()}); err != nil {
		t.Fatal(err)
	}
	return a, b, ida, idb
}

func labelled(id, addr string, labels map[string]string) ipam.Attachment {
	return ipam.Attachment{ContainerID: id, IfName: "eth0", Network: "default", Name: id, Address: netip.MustParseAddr(addr), Labels: labels}
}

func TestLabelGossip(t *testing.T) {
	a, b, _, idb := labelPair(t)
	var sent [][]byte
	a.broadcast = func(msg []byte) error { sent = append(sent, msg); return nil }

	a.publish(labelled("db", "10.40.0.2", map[string]string{"app": "db"}))
	a.publish(labelled("plain", "10.40.0.3", nil))
	if len(sent) != 2 {
		t.Fatalf("%d broadcasts, want one per record", len(sent))
	}
	// Broadcasts and push/pull both bring the records.
	b.NotifyMsg(sent[0])
	if got := b.remote(); len(got) != 1 || got[0].Peer != "a" || !maps.Equal(got[0].Labels, map[string]string{"app": "db"}) {
		t.Fatalf("after the broadcast: %+v", got)
	}
	select {
	case <-b.changed:
	default:
		t.Fatal("a merged record did not signal a change")
	}
	b.MergeRemoteState(a.LocalState(false), false)
	if got := b.remote(); len(got) != 2 || got[1].Labels != nil || got[1].ContainerID != "plain" {
		t.Fatalf("after push/pull: %+v", got)
	}
	// A label change replaces the record; an old version does not come back.
	old := sent[0]
	a.publish(labelled("db", "10.40.0.2", map[string]string{"app": "db", "tier": "back"}))
	b.NotifyMsg(sent[2])
	b.NotifyMsg(old)
	if got := b.remote(); !maps.Equal(got[0].Labels, map[string]string{"app": "db", "tier": "back"}) {
		t.Fatalf("after a change and a stale copy: %+v", got[0])
	}
	// DEL: a tombstone takes it away.
	a.unpublish(labelled("db", "10.40.0.2", nil))
	b.NotifyMsg(sent[3])
	if got := b.remote(); len(got) != 1 || got[0].ContainerID != "plain" {
		t.Fatalf("after the tombstone: %+v", got)
	}
	// b's own records never come from gossip, and a does not list its own as remote.
	if got := a.remote(); len(got) != 0 {
		t.Fatalf("a lists its own records as remote: %+v", got)
	}

	// Untrusted input: each bad record refused and counted, nothing changed.
	unsigned := labelRecord{Peer: "a", Addr: netip.MustParseAddr("10.40.0.9"), Container: "x", Network: "default", Labels: map[string]string{"app": "x"}, Version: 1 << 62}
	forged := unsigned
	forged.Sig = idb.Sign(labelSignDomain, forged.signedBytes()) // signed by b in a's name
	badLabel := unsigned
	badLabel.Labels = map[string]string{"bad key": "v"}
	noAddr := unsigned
	noAddr.Addr = netip.Addr{}
	tomb := unsigned
	tomb.Deleted = true
	many := unsigned
	many.Labels = map[string]string{}
	for i := 0; i <= cni.MaxLabels; i++ {
		many.Labels[fmt.Sprintf("k%d", i)] = "v"
	}
	mine := unsigned
	mine.Peer = "b"
	before := b.remote()
	for _, r := range []labelRecord{unsigned, forged, badLabel, noAddr, tomb, many, mine} {
		msg, _ := json.Marshal(labelMessage{Records: []labelRecord{r}})
		b.NotifyMsg(msg)
	}
	b.NotifyMsg([]byte("garbage"))
	b.MergeRemoteState([]byte(`{"r":[{"p":"a"}]}`), false)
	b.NotifyMsg(make([]byte, 4*maxLabelBroadcast))
	if after := b.remote(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("refused records changed the store:\n%+v\n%+v", before, after)
	}
	for reason, want := range map[string]float64{"signature": 2, "invalid": 5, "malformed": 1, "oversize": 1} {
		if got := testutil.ToFloat64(b.refusedC.WithLabelValues(reason)); got != want {
			t.Errorf("refused %s: %v, want %v", reason, got, want)
		}
	}
}

// A record as it travels without labels (an unlabelled container; the encoding before a
// container had labels to carry) decodes and round-trips.
func TestLabelRecordEncoding(t *testing.T) {
	a, b, _, _ := labelPair(t)
	a.publish(labelled("c", "10.40.0.4", nil))
	state := a.LocalState(false)
	if strings.Contains(string(state), `"l"`) {
		t.Fatalf("an unlabelled record carries a labels key: %s", state)
	}
	var m labelMessage
	if err := json.Unmarshal(state, &m); err != nil || len(m.Records) != 1 || m.Records[0].Labels != nil {
		t.Fatalf("decode %s: %v %+v", state, err, m)
	}
	b.MergeRemoteState(state, true)
	if got := b.remote(); len(got) != 1 || got[0].Address != netip.MustParseAddr("10.40.0.4") {
		t.Fatalf("round trip: %+v", got)
	}
}

func TestLabelStoreBounds(t *testing.T) {
	_, b, ida, _ := labelPair(t)
	var recs []labelRecord
	for i := 0; i <= maxLabelRecordsPerPeer; i++ {
		r := labelRecord{Peer: "a", Addr: netip.AddrFrom4([4]byte{10, 40, byte(i >> 8), byte(i)}), Container: fmt.Sprint("c", i), Network: "default", Version: 1}
		r.Sig = ida.Sign(labelSignDomain, r.signedBytes())
		recs = append(recs, r)
	}
	if n := b.merge(recs); n != maxLabelRecordsPerPeer {
		t.Fatalf("merged %d records, want the bound %d", n, maxLabelRecordsPerPeer)
	}
	if got := testutil.ToFloat64(b.refusedC.WithLabelValues("full")); got != 1 {
		t.Fatalf("refused full: %v", got)
	}
}

func TestApplyLabelChange(t *testing.T) {
	cur := map[string]string{"app": "db", "tier": "back"}
	got, err := applyLabelChange(cur, map[string]string{"app": "web", "zone": "a"}, []string{"tier", "absent"})
	if err != nil || !maps.Equal(got, map[string]string{"app": "web", "zone": "a"}) || cur["app"] != "db" {
		t.Fatalf("change: %v %v (cur %v)", got, err, cur)
	}
	if _, err := applyLabelChange(cur, map[string]string{"app": "x"}, []string{"app"}); err == nil || !strings.Contains(err.Error(), `"app" is both`) {
		t.Fatalf("set and remove: %v", err)
	}
	if _, err := applyLabelChange(cur, map[string]string{"bad key": "x"}, nil); err == nil || !strings.Contains(err.Error(), `"bad key"`) {
		t.Fatalf("bad key: %v", err)
	}
}

// wpoContainer makes a network namespace standing in for a container (this file's prefix).
func wpoContainer(t *testing.T, n int) string {
	t.Helper()
	name := fmt.Sprintf("wpo-%d-c%d", os.Getpid(), n)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/var/run/netns/" + name
}

// Labels from the ADD are stored, listed by status and endpoints, published, changed by POST
// /v1/labels, and kept across a restart.
func TestLabelAPI(t *testing.T) {
	dir := t.TempDir()
	p := startPeer(t, dir)
	h := p.apiHandler()
	ctx := context.Background()
	req := addReq("web1", wpoContainer(t, 1))
	req.Name = "web"
	req.Labels = map[string]string{"app": "web"}
	if _, err := p.client.Add(ctx, req); err != nil {
		t.Fatal(err)
	}
	if _, err := p.client.Add(ctx, addReq("plain", wpoContainer(t, 2))); err != nil {
		t.Fatal(err)
	}
	// The socket is not only the plugin's: a bad label is refused there too, and attaches nothing.
	bad := addReq("bad", wpoContainer(t, 3))
	bad.Labels = map[string]string{"bad key": "x"}
	var ce *cni.Error
	if _, err := p.client.Add(ctx, bad); !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Message, `"bad key"`) {
		t.Fatalf("ADD with a bad label: %v", err)
	}
	eps := p.endpoints()
	if len(eps) != 2 || eps[1].ContainerID != "web1" || !maps.Equal(eps[1].Labels, req.Labels) || eps[0].Labels != nil || eps[1].Peer != "p1" {
		t.Fatalf("endpoints: %+v", eps)
	}
	var st Status
	if code, msg := apiCall(t, h, "GET", "/v1/status", "", &st); code != 200 || len(st.Attachments) != 2 || !maps.Equal(st.Attachments[1].Labels, req.Labels) {
		t.Fatalf("status: %d %s %+v", code, msg, st.Attachments)
	}
	// Published for the other peers: the state this peer gossips holds the record.
	if s := string(p.labels.LocalState(false)); !strings.Contains(s, `"l":{"app":"web"}`) {
		t.Fatalf("gossiped state: %s", s)
	}

	var res LabelResult
	// By name (unique here), set one and remove one.
	if code, msg := apiCall(t, h, "POST", "/v1/labels", `{"container":"web","set":{"tier":"front"},"remove":["app"]}`, &res); code != 200 ||
		res.Container != "web1" || !maps.Equal(res.Labels, map[string]string{"tier": "front"}) {
		t.Fatalf("label: %d %s %+v", code, msg, res)
	}
	if rec, _ := p.alloc.Get(ipam.Key{ContainerID: "web1", IfName: "eth0"}); !maps.Equal(rec.Labels, res.Labels) {
		t.Fatalf("stored: %+v", rec.Labels)
	}
	if s := string(p.labels.LocalState(false)); !strings.Contains(s, `"l":{"tier":"front"}`) {
		t.Fatalf("re-gossiped state: %s", s)
	}
	for _, tt := range []struct {
		body string
		code int
		msg  string
	}{
		{`{"container":"nope","set":{"a":"b"}}`, 404, `nope`},
		{`{"container":"web1","set":{"bad key":"b"}}`, 400, `"bad key"`},
		{`{"container":"web1","set":{"a":"b"},"remove":["a"]}`, 400, "both set and removed"},
		{`{"container":"web1"}`, 400, "no label"},
		{`{"set":{"a":"b"}}`, 400, "no container"},
	} {
		if code, msg := apiCall(t, h, "POST", "/v1/labels", tt.body, nil); code != tt.code || !strings.Contains(msg, tt.msg) {
			t.Errorf("label %s: %d %q, want %d mentioning %q", tt.body, code, msg, tt.code, tt.msg)
		}
	}
	if rec, _ := p.alloc.Get(ipam.Key{ContainerID: "web1", IfName: "eth0"}); !maps.Equal(rec.Labels, map[string]string{"tier": "front"}) {
		t.Fatalf("refused changes changed the labels: %+v", rec.Labels)
	}

	p.stop()
	q := startPeer(t, dir)
	if eps := q.endpoints(); len(eps) != 2 || !maps.Equal(eps[1].Labels, map[string]string{"tier": "front"}) {
		t.Fatalf("after restart: %+v", eps)
	}
	if s := string(q.labels.LocalState(false)); !strings.Contains(s, `"l":{"tier":"front"}`) {
		t.Fatalf("restarted peer does not publish its labels: %s", s)
	}
	if err := q.client.Del(ctx, addReq("web1", "")); err != nil {
		t.Fatal(err)
	}
	var m labelMessage
	json.Unmarshal(q.labels.LocalState(false), &m)
	for _, r := range m.Records {
		if r.Container == "web1" && !r.Deleted {
			t.Fatalf("DEL left a live record: %+v", r)
		}
	}
}

// A peer down past the grace loses its records, and gossip cannot bring them back until it
// is up again; rmpeer forgets them at once.
func TestLabelPeerDown(t *testing.T) {
	a, b, _, _ := labelPair(t)
	now := time.Unix(1_000_000, 0)
	b.now = func() time.Time { return now }
	a.publish(labelled("db", "10.40.0.2", map[string]string{"app": "db"}))
	state := a.LocalState(false)
	b.MergeRemoteState(state, false)
	b.peerDown("a")
	if got := b.remote(); len(got) != 1 {
		t.Fatalf("records dropped before the grace: %+v", got)
	}
	now = now.Add(b.downGrace)
	if got := b.remote(); len(got) != 0 {
		t.Fatalf("records of a peer down past the grace: %+v", got)
	}
	b.MergeRemoteState(state, false)
	if got := b.remote(); len(got) != 0 || testutil.ToFloat64(b.refusedC.WithLabelValues("down")) != 1 {
		t.Fatalf("push/pull brought a down peer's records back: %+v", got)
	}
	b.peerUp("a")
	b.MergeRemoteState(state, false)
	if got := b.remote(); len(got) != 1 {
		t.Fatalf("records of a peer back up: %+v", got)
	}
	b.forgetPeer("a")
	if got := b.remote(); len(got) != 0 {
		t.Fatalf("after forgetPeer: %+v", got)
	}
}
