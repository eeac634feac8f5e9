package mesh

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseSnapshotRefusesBadFiles(t *testing.T) {
	now := time.Now()
	for name, in := range map[string]string{
		"garbage":       "\x00\xffnot json",
		"truncated":     `{"version":1,"members":[{"name":"a"`,
		"wrong version": `{"version":2,"members":[]}`,
		"no version":    `{"members":[]}`,
		"too large":     `{"version":1,"members":[],"pad":"` + strings.Repeat("x", snapshotMaxBytes) + `"}`,
		"not an object": `[1,2,3]`,
	} {
		members, _, err := parseSnapshot([]byte(in), "self", now)
		if !errors.Is(err, ErrBadSnapshot) || members != nil {
			t.Errorf("%s: got %v, %v; want ErrBadSnapshot and nothing", name, members, err)
		}
	}
}

func TestParseSnapshotSkipsBadEntries(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	ts := func(d time.Duration) string { return now.Add(d).Format(time.RFC3339Nano) }
	in := `{"version":1,"members":[
		{"name":"good","addr":"10.0.0.1:6783","last_seen":"` + ts(-time.Minute) + `"},
		{"name":"v6","addr":"[2001:db8::1]:6783","last_seen":"` + ts(-2*time.Minute) + `"},
		{"name":"self","addr":"10.0.0.2:6783","last_seen":"` + ts(0) + `"},
		{"name":"bad/name","addr":"10.0.0.3:6783","last_seen":"` + ts(0) + `"},
		{"name":"","addr":"10.0.0.3:6783","last_seen":"` + ts(0) + `"},
		{"name":"noport","addr":"10.0.0.4","last_seen":"` + ts(0) + `"},
		{"name":"port0","addr":"10.0.0.4:0","last_seen":"` + ts(0) + `"},
		{"name":"unspec","addr":"0.0.0.0:6783","last_seen":"` + ts(0) + `"},
		{"name":"mcast","addr":"224.0.0.1:6783","last_seen":"` + ts(0) + `"},
		{"name":"future","addr":"10.0.0.5:6783","last_seen":"` + ts(1000*time.Hour) + `"},
		{"name":"ancient","addr":"10.0.0.6:6783","last_seen":"` + ts(-snapshotMaxAge-time.Hour) + `"},
		{"name":"good","addr":"10.0.0.9:6783","last_seen":"` + ts(-time.Hour) + `"}
	]}`
	members, skipped, err := parseSnapshot([]byte(in), "self", now)
	if err != nil {
		t.Fatal(err)
	}
	want := []snapshotMember{
		{Name: "good", Addr: netip.MustParseAddrPort("10.0.0.1:6783"), LastSeen: now.Add(-time.Minute)},
		{Name: "v6", Addr: netip.MustParseAddrPort("[2001:db8::1]:6783"), LastSeen: now.Add(-2 * time.Minute)},
	}
	if len(members) != len(want) {
		t.Fatalf("members %+v, want %+v", members, want)
	}
	for i := range want {
		if members[i].Name != want[i].Name || members[i].Addr != want[i].Addr || !members[i].LastSeen.Equal(want[i].LastSeen) {
			t.Errorf("member %d = %+v, want %+v", i, members[i], want[i])
		}
	}
	// self, bad/name, "", noport, port0, unspec, mcast, future, ancient, duplicate good.
	if len(skipped) != 10 {
		t.Errorf("skipped %d entries, want 10: %q", len(skipped), skipped)
	}
	for _, s := range []string{"is this peer", "future", "too long ago", "listed twice", "not a unicast address"} {
		if !strings.Contains(strings.Join(skipped, "\n"), s) {
			t.Errorf("no skipped entry says %q: %q", s, skipped)
		}
	}
}

func TestSnapshotKeepsTheMostRecent(t *testing.T) {
	now := time.Now()
	byName := map[string]snapshotMember{}
	for i := range snapshotMaxMembers + 50 {
		n := fmt.Sprintf("p%03d", i)
		byName[n] = snapshotMember{Name: n, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 6783), LastSeen: now.Add(-time.Duration(i) * time.Second)}
	}
	data, err := encodeSnapshot(boundSnapshot(byName, now))
	if err != nil {
		t.Fatal(err)
	}
	members, skipped, err := parseSnapshot(data, "self", now)
	if err != nil || len(skipped) != 0 {
		t.Fatalf("round trip: %v, skipped %q", err, skipped)
	}
	if len(members) != snapshotMaxMembers || members[0].Name != "p000" || members[len(members)-1].Name != fmt.Sprintf("p%03d", snapshotMaxMembers-1) {
		t.Fatalf("kept %d members, %s..%s; want the %d most recent", len(members), members[0].Name, members[len(members)-1].Name, snapshotMaxMembers)
	}
	if len(data) > snapshotMaxBytes/2 {
		t.Errorf("a full snapshot takes %d bytes, too close to the %d read limit", len(data), snapshotMaxBytes)
	}
}

func TestSnapshotTableWritesOnlyOnChange(t *testing.T) {
	now := time.Now()
	a := Peer{Name: "a", Addr: netip.MustParseAddrPort("10.0.0.1:6783"), State: StateAlive}
	b := Peer{Name: "b", Addr: netip.MustParseAddrPort("10.0.0.2:6783"), State: StateAlive}
	self := Peer{Name: "me", Addr: netip.MustParseAddrPort("10.0.0.3:6783"), State: StateAlive, Self: true}
	old := snapshotMember{Name: "old", Addr: netip.MustParseAddrPort("10.0.0.9:6783"), LastSeen: now.Add(-time.Hour)}
	tab := newSnapshotTable([]snapshotMember{old})
	if !tab.observe([]Peer{self, a, b}, now) {
		t.Fatal("first alive set not a change")
	}
	if tab.observe([]Peer{self, a, b}, now.Add(time.Second)) {
		t.Fatal("same alive set reported as a change")
	}
	dead := b
	dead.State = StateDead
	if !tab.observe([]Peer{self, a, dead}, now.Add(2*time.Second)) {
		t.Fatal("a death is not a change")
	}
	moved := a
	moved.Addr = netip.MustParseAddrPort("10.0.0.7:6783")
	if !tab.observe([]Peer{self, moved, dead}, now.Add(3*time.Second)) {
		t.Fatal("a new address is not a change")
	}
	got := tab.list(now.Add(3 * time.Second))
	names := []string{}
	for _, m := range got {
		names = append(names, m.Name+"="+m.Addr.String())
	}
	// The dead member and the one from the old file stay, older ones last; self never.
	if w := "a=10.0.0.7:6783 b=10.0.0.2:6783 old=10.0.0.9:6783"; strings.Join(names, " ") != w {
		t.Fatalf("snapshot %v, want %s", names, w)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "members.json")
	for _, content := range []string{"first", "second"} {
		if err := writeFileAtomic(path, []byte(content)); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(path); err != nil || string(b) != content {
			t.Fatalf("read back %q, %v; want %q", b, err, content)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d files, want only the snapshot (temp files left?)", len(entries))
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	if err := writeFileAtomic(filepath.Join(dir, "missing", "x.json"), []byte("x")); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}

func TestReadSnapshotMissingFileIsEmpty(t *testing.T) {
	members, skipped, err := readSnapshot(filepath.Join(t.TempDir(), "none.json"), "self", time.Now())
	if err != nil || members != nil || skipped != nil {
		t.Fatalf("missing file: %v %v %v", members, skipped, err)
	}
}
