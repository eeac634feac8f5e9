package ipam

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
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
	if other.Publish("me", map[string]int{"10.40.1.0/26": 2}) == nil {
		t.Fatal("changed usage not published")
	}
}
