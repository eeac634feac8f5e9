package ipam

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/mesh/identity"
)

func TestUsageTableKeepsOneReportPerPeerAndRejectsBadOnes(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	u := NewUsageTable(UsageConfig{Now: func() time.Time { return now }})
	send := func(r UsageReport) { u.NotifyMsg(mustJSON(r)) }
	v := now.UnixNano()
	send(UsageReport{Peer: "p1", Version: v, Used: map[string]int{"10.40.0.0/26": 3}})
	send(UsageReport{Peer: "p1", Version: v - 1, Used: map[string]int{"10.40.0.0/26": 9}}) // older
	if n, ok := u.Used("p1", "10.40.0.0/26"); !ok || n != 3 {
		t.Fatalf("used = %d %v, want 3 (newest report)", n, ok)
	}
	bad := []struct {
		reason string
		r      UsageReport
	}{
		{"future", UsageReport{Peer: "p1", Version: now.Add(48 * time.Hour).UnixNano(), Used: map[string]int{"10.40.0.0/26": 7}}},
		{"invalid", UsageReport{Peer: "", Version: v + 1}},
		{"invalid", UsageReport{Peer: "p1", Version: -5}},
		{"invalid", UsageReport{Peer: "p1", Version: v + 1, Used: map[string]int{"not a cidr": 1}}},
		{"invalid", UsageReport{Peer: "p1", Version: v + 1, Used: map[string]int{"10.40.0.0/26": -1}}},
		{"invalid", UsageReport{Peer: strings.Repeat("x", maxNameLen+1), Version: v + 1}},
	}
	big := UsageReport{Peer: "p1", Version: v + 1, Used: map[string]int{}}
	for i := 0; i <= maxUsageBlocks; i++ {
		big.Used[Network{Name: "x", Subnet: clusterNet.Subnet, BlockBits: 26}.Block(i).String()] = 1
	}
	bad = append(bad, struct {
		reason string
		r      UsageReport
	}{"oversize", big})
	for _, tt := range bad {
		before := counterValue(u.rejected.WithLabelValues(tt.reason))
		send(tt.r)
		if after := counterValue(u.rejected.WithLabelValues(tt.reason)); after != before+1 {
			t.Errorf("%s report %+.80v not counted", tt.reason, tt.r)
		}
	}
	u.NotifyMsg([]byte("{garbage"))
	u.MergeRemoteState([]byte("[garbage"), false)
	if counterValue(u.rejected.WithLabelValues("malformed")) != 2 {
		t.Error("malformed input not counted")
	}
	if n, _ := u.Used("p1", "10.40.0.0/26"); n != 3 {
		t.Fatalf("bad reports changed the table: %d", n)
	}
	// Push/pull carries every report; pruning forgets peers gone from the membership.
	send(UsageReport{Peer: "p2", Version: v, Used: map[string]int{"10.40.0.64/26": 1}})
	other := NewUsageTable(UsageConfig{Now: func() time.Time { return now }})
	other.MergeRemoteState(u.LocalState(false), false)
	if _, ok := other.Used("p2", "10.40.0.64/26"); !ok {
		t.Fatal("push/pull lost p2's report")
	}
	other.Prune(func(name string) bool { return name == "p1" })
	if _, ok := other.Used("p2", "10.40.0.64/26"); ok {
		t.Fatal("p2's report survived its leaving the membership")
	}
	var all []UsageReport
	if json.Unmarshal(other.LocalState(false), &all) != nil || len(all) != 1 {
		t.Fatalf("after prune: %v", all)
	}
	// Publish sends only changes.
	if other.Publish("me", map[string]int{"10.40.1.0/26": 1}) == nil {
		t.Fatal("first publish sent nothing")
	}
	if other.Publish("me", map[string]int{"10.40.1.0/26": 1}) != nil {
		t.Fatal("unchanged usage published again")
	}
	sent := other.Publish("me", map[string]int{"10.40.1.0/26": 2})
	if sent == nil {
		t.Fatal("changed usage not published")
	}
	// Once settled, the last report goes out once more (the last of a burst may be lost).
	now = now.Add(DefaultUsageResendAfter - time.Millisecond)
	if other.Publish("me", map[string]int{"10.40.1.0/26": 2}) != nil {
		t.Fatal("resent before ResendAfter")
	}
	now = now.Add(time.Millisecond)
	if again := other.Publish("me", map[string]int{"10.40.1.0/26": 2}); !bytes.Equal(again, sent) {
		t.Fatalf("after ResendAfter got %q, want the last report again %q", again, sent)
	}
	now = now.Add(time.Hour)
	if other.Publish("me", map[string]int{"10.40.1.0/26": 2}) != nil {
		t.Fatal("resent more than once")
	}
}

// signedUsage is a set of peers with identities and the key lookup every table uses.
type signedUsage struct {
	ids  map[string]*identity.Identity
	keys map[string]ed25519.PublicKey
}

func newSignedUsage(names ...string) *signedUsage {
	s := &signedUsage{ids: map[string]*identity.Identity{}, keys: map[string]ed25519.PublicKey{}}
	for _, n := range names {
		s.ids[n] = identity.Generate()
		s.keys[n] = s.ids[n].Public()
	}
	return s
}

func (s *signedUsage) lookup(o string) (ed25519.PublicKey, bool) { k, ok := s.keys[o]; return k, ok }

func (s *signedUsage) table(self string, now time.Time, max int) *UsageTable {
	return NewUsageTable(UsageConfig{Now: func() time.Time { return now }, Signer: s.ids[self], Keys: s.lookup, MaxReports: max})
}

// sign signs r as signer (not necessarily r.Peer).
func sign(signer *identity.Identity, r UsageReport) UsageReport {
	r.Sig = signer.Sign(UsageDomain, r.signedBytes())
	return r
}

func rejectedBy(u *UsageTable, reason string) float64 {
	return counterValue(u.rejected.WithLabelValues(reason))
}

func TestSignedUsageRefusesForgedAbsurdAndFloods(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	v := now.UnixNano()
	s := newSignedUsage("me", "p1", "p2", "mallory")
	u := s.table("me", now, 0)
	u.Publish("me", map[string]int{"10.40.0.0/26": 1})
	p1 := s.table("p1", now, 0)
	good := p1.Publish("p1", map[string]int{"10.40.0.64/26": 3})
	u.NotifyMsg(good)
	if n, ok := u.Used("p1", "10.40.0.64/26"); !ok || n != 3 {
		t.Fatalf("signed report not kept: %d %v", n, ok)
	}
	blk := map[string]int{"10.40.0.64/26": 9}
	cases := []struct {
		reason string
		r      UsageReport
	}{
		{usageBadSignature, sign(s.ids["mallory"], UsageReport{Peer: "p1", Version: v + 1, Used: blk})},
		{usageBadSignature, UsageReport{Peer: "p1", Version: v + 1, Used: blk}}, // unsigned
		{usageBadSignature, func() UsageReport { // p1's real report with its figures changed
			var r UsageReport
			json.Unmarshal(good, &r)
			r.Used, r.Version = blk, r.Version+1
			return r
		}()},
		{usageUnknownOrigin, sign(s.ids["mallory"], UsageReport{Peer: "stranger", Version: v + 1, Used: blk})},
		{usageFuture, sign(s.ids["p1"], UsageReport{Peer: "p1", Version: math.MaxInt64, Used: blk})},
		{usageOverCapacity, sign(s.ids["p1"], UsageReport{Peer: "p1", Version: v + 1, Used: map[string]int{"10.40.0.64/26": math.MaxInt64}})},
		{usageOverCapacity, sign(s.ids["p1"], UsageReport{Peer: "p1", Version: v + 1, Used: map[string]int{"10.40.0.64/26": 65}})},
		{usageOverCapacity, sign(s.ids["p1"], UsageReport{Peer: "p1", Version: v + 1, Used: map[string]int{"10.0.0.0/8": 1 << 20, "11.0.0.0/8": 1}})},
		{usageInvalid, UsageReport{Peer: "p1", Version: v + 1, Used: blk, Sig: []byte{1, 2, 3}}},
	}
	for _, tt := range cases {
		before := rejectedBy(u, tt.reason)
		u.NotifyMsg(mustJSON(tt.r))
		u.MergeRemoteState(mustJSON([]UsageReport{tt.r}), false)
		if after := rejectedBy(u, tt.reason); after != before+2 {
			t.Errorf("%s: report %.120s counted %v times, want 2", tt.reason, mustJSON(tt.r), after-before)
		}
	}
	if n, _ := u.Used("p1", "10.40.0.64/26"); n != 3 {
		t.Fatalf("refused reports changed p1's figures to %d", n)
	}
	// 100k reports in one state from one member: refused whole, each unverified.
	flood := make([]UsageReport, 100_000)
	for i := range flood {
		flood[i] = UsageReport{Peer: fmt.Sprintf("f%d", i), Version: 1}
	}
	u.MergeRemoteState(mustJSON(flood), false)
	if rejectedBy(u, usageTooMany) != 1 {
		t.Fatal("a state of 100k reports not refused as too_many_reports")
	}
	var all []UsageReport
	if json.Unmarshal(u.LocalState(false), &all) != nil || len(all) != 2 {
		t.Fatalf("table after the flood holds %d reports", len(all))
	}
	// Relayed: p2's report reaches u through p1's state, signature intact.
	p2 := s.table("p2", now, 0)
	p1.NotifyMsg(p2.Publish("p2", map[string]int{"10.40.0.128/26": 2}))
	u.MergeRemoteState(p1.LocalState(false), false)
	if n, ok := u.Used("p2", "10.40.0.128/26"); !ok || n != 2 {
		t.Fatalf("relayed report: %d %v", n, ok)
	}
}

func TestUsageTableFullAndOwnReportReasserted(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	s := newSignedUsage("me", "p1", "p2", "p3")
	u := s.table("me", now, 3) // me, p1, p2
	u.Publish("me", map[string]int{"10.40.0.0/26": 1})
	for _, p := range []string{"p1", "p2", "p3"} {
		u.NotifyMsg(s.table(p, now, 0).Publish(p, map[string]int{}))
	}
	if _, ok := u.Used("p3", ""); ok || rejectedBy(u, usageTableFull) != 1 {
		t.Fatalf("table over MaxReports: table_full = %v", rejectedBy(u, usageTableFull))
	}
	// A state listing more than MaxReports is refused whole.
	u.MergeRemoteState(mustJSON(make([]UsageReport, 4)), false)
	if rejectedBy(u, usageTooMany) != 1 {
		t.Fatal("state over MaxReports not refused")
	}
	// Pruned with membership: p2 leaves, p3 fits.
	u.Prune(func(n string) bool { return n != "p2" })
	u.NotifyMsg(s.table("p3", now, 0).Publish("p3", map[string]int{"10.40.0.192/26": 4}))
	if n, ok := u.Used("p3", "10.40.0.192/26"); !ok || n != 4 {
		t.Fatal("p3 refused after p2 was pruned")
	}
	if _, ok := u.Used("me", "10.40.0.0/26"); !ok {
		t.Fatal("prune dropped this peer's own report")
	}
	// An older session of me, clock a minute ahead, reported other figures: not kept, and
	// the next Publish re-asserts at a newer version even though nothing changed here.
	old := sign(s.ids["me"], UsageReport{Peer: "me", Version: now.Add(time.Minute).UnixNano(), Used: map[string]int{"10.40.0.0/26": 50}})
	u.NotifyMsg(mustJSON(old))
	if n, _ := u.Used("me", "10.40.0.0/26"); n != 1 {
		t.Fatalf("own report replaced by gossip: %d", n)
	}
	msg := u.Publish("me", map[string]int{"10.40.0.0/26": 1})
	var r UsageReport
	if msg == nil || json.Unmarshal(msg, &r) != nil || r.Version <= old.Version {
		t.Fatalf("no re-assertion over version %d: %s", old.Version, msg)
	}
	other := s.table("p1", now, 0)
	other.NotifyMsg(mustJSON(old))
	other.NotifyMsg(msg)
	if n, _ := other.Used("me", "10.40.0.0/26"); n != 1 {
		t.Fatalf("re-asserted figures did not win elsewhere: %d", n)
	}
}

// FuzzUsageReport feeds reports with valid-but-extreme figures and garbage: nothing out of
// bounds is ever kept.
func FuzzUsageReport(f *testing.F) {
	f.Add([]byte(`{"peer":"p1","version":1000000000000000000,"used":{"10.40.0.0/26":3}}`))
	f.Add([]byte(`{"peer":"p1","version":9223372036854775807,"used":{"10.40.0.0/26":9223372036854775807}}`))
	f.Add([]byte(`{"peer":"p1","version":1,"used":{"0.0.0.0/0":1048576}}`))
	f.Add([]byte(`{"peer":"p1","version":1,"used":{"::/0":1}}`))
	f.Add([]byte(`[{"peer":"p1","version":1}]`))
	now := time.Unix(1_000_000_000, 0)
	f.Fuzz(func(t *testing.T, b []byte) {
		u := NewUsageTable(UsageConfig{Now: func() time.Time { return now }})
		u.NotifyMsg(b)
		u.MergeRemoteState(b, false)
		var all []UsageReport
		if err := json.Unmarshal(u.LocalState(false), &all); err != nil {
			t.Fatal(err)
		}
		for _, r := range all {
			if reason, err := u.validate(r); err != nil {
				t.Fatalf("kept a %s report: %v", reason, err)
			}
		}
	})
}

// A state with forged reports is checked only up to maxUsageForgeries of them.
func TestUsageStateForgeriesBounded(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	names := []string{"me", "mallory"}
	for i := range 20 {
		names = append(names, fmt.Sprintf("p%d", i))
	}
	s := newSignedUsage(names...)
	u := s.table("me", now, 0)
	var state []UsageReport
	for i := range 20 {
		state = append(state, sign(s.ids["mallory"], UsageReport{Peer: fmt.Sprintf("p%d", i), Version: now.UnixNano(), Used: map[string]int{}}))
	}
	u.MergeRemoteState(mustJSON(state), false)
	if rejectedBy(u, usageBadSignature) != maxUsageForgeries || rejectedBy(u, usageAfterForgery) != 20-maxUsageForgeries {
		t.Fatalf("bad_signature %v, after_forgery %v", rejectedBy(u, usageBadSignature), rejectedBy(u, usageAfterForgery))
	}
}
