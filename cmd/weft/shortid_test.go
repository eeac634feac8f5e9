package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/weftnet/weft/router"
)

func TestShortIDsAreUniqueAndShort(t *testing.T) {
	long := "4f1c2a9b7d3e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4"
	cases := []struct {
		name string
		ids  []string
		want map[string]string
	}{
		{"demo names differ only at the end", []string{"weftdemo-h0-c0", "weftdemo-h0-c1", "weftdemo-h1-c2"},
			map[string]string{"weftdemo-h0-c0": "weftdemo-h0-c0", "weftdemo-h0-c1": "weftdemo-h0-c1", "weftdemo-h1-c2": "weftdemo-h1-"}},
		{"short IDs whole", []string{"c1", "c2"}, map[string]string{"c1": "c1", "c2": "c2"}},
		{"docker IDs cut to 12", []string{long, "9" + long[1:]}, map[string]string{long: long[:12], "9" + long[1:]: "9" + long[1:12]}},
		{"shared 14 characters need 15", []string{long, long[:14] + "x" + long[15:]},
			map[string]string{long: long[:15], long[:14] + "x" + long[15:]: long[:14] + "x"}},
		{"a prefix of another is shown whole", []string{"abcdefghijklmn", "abcdefghijklmnop"},
			map[string]string{"abcdefghijklmn": "abcdefghijklmn", "abcdefghijklmnop": "abcdefghijklmno"}},
		{"one container, two interfaces", []string{long, long}, map[string]string{long: long[:12]}},
		{"none", nil, map[string]string{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := shortIDs(c.ids, 12)
			if len(got) != len(c.want) {
				t.Fatalf("got %v, want %v", got, c.want)
			}
			seen := map[string]string{}
			for id, w := range c.want {
				if got[id] != w {
					t.Errorf("short(%q) = %q, want %q", id, got[id], w)
				}
				if other, dup := seen[got[id]]; dup {
					t.Errorf("%q and %q both read %q", id, other, got[id])
				}
				seen[got[id]] = id
			}
		})
	}
}

func TestStatusContainerColumnTellsDemoContainersApart(t *testing.T) {
	st := router.Status{Name: "weftdemo-h0"}
	for i, id := range []string{"weftdemo-h0-c0", "weftdemo-h0-c1"} {
		st.Attachments = append(st.Attachments, router.AttachmentStatus{
			ContainerID: id, IfName: "eth0", Network: "default", Name: id,
			Address: netip.MustParsePrefix("10.40.0." + string(rune('2'+i)) + "/16"),
		})
	}
	var out bytes.Buffer
	printStatus(&out, st)
	for _, id := range []string{"weftdemo-h0-c0", "weftdemo-h0-c1"} {
		found := false
		for _, line := range strings.Split(out.String(), "\n") {
			if fields := strings.Fields(line); len(fields) >= 4 && fields[3] == id {
				found = true
			}
		}
		if !found {
			t.Errorf("no row shows container %s in full:\n%s", id, out.String())
		}
	}
}
