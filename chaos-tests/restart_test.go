package chaostest

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/weftnet/weft/chaos-tests/lab"
)

// A restarted peer (graceful or kill -9) still knows every attachment with the same
// address, containers keep talking while it is down and after, and new ADDs never reuse
// a live address.
func TestPeerRestart(t *testing.T) {
	for _, tc := range []struct {
		name   string
		prefix string
		down   func(ctx context.Context, h *lab.Host) error
	}{
		{"SIGTERM", "wcrsterm", func(ctx context.Context, h *lab.Host) error { return h.Stop(ctx) }},
		{"SIGKILL", "wcrskill", func(_ context.Context, h *lab.Host) error { return h.Kill() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, lab.Config{Prefix: tc.prefix})
			ctx := testCtx(t, 2*time.Minute)
			h := l.Host(0)
			c := mustCNI(t, h, lab.CNIOptions{})

			c1, c2 := mustContainer(t, h), mustContainer(t, h)
			a1 := mustAdd(t, ctx, c, c1)
			a2 := mustAdd(t, ctx, c, c2)
			waitPing(t, ctx, c1, a2.Addr())
			before := mustStatus(t, ctx, h).SortedAttachments()

			pid := h.PID()
			if err := tc.down(ctx, h); err != nil {
				t.Fatalf("%s peer: %v", tc.name, err)
			}
			if h.Running() {
				t.Fatalf("peer still running after %s", tc.name)
			}
			// Containers keep their connectivity while the peer is down.
			waitPing(t, ctx, c1, a2.Addr())

			if err := h.Start(ctx); err != nil {
				t.Fatalf("restart peer: %v", err)
			}
			if h.PID() == pid {
				t.Fatalf("peer PID unchanged (%d) after restart", pid)
			}
			after := mustStatus(t, ctx, h)
			if got := after.SortedAttachments(); !slices.Equal(got, before) {
				t.Fatalf("attachments changed across restart:\nbefore %+v\nafter  %+v", before, got)
			}
			assertAttachment(t, after, h, c1.ID, a1)
			assertAttachment(t, after, h, c2.ID, a2)
			waitPing(t, ctx, c1, a2.Addr())
			waitPing(t, ctx, c2, a1.Addr())
			for _, ctr := range []*lab.Container{c1, c2} {
				if err := c.Check(ctx, ctr.RuntimeConf("eth0")); err != nil {
					t.Errorf("CHECK %s after restart: %v", ctr.ID, err)
				}
			}

			c3 := mustContainer(t, h)
			a3 := mustAdd(t, ctx, c, c3)
			if a3.Addr() == a1.Addr() || a3.Addr() == a2.Addr() {
				t.Fatalf("ADD after restart got %s, already owned by a running container (%s, %s)", a3, a1, a2)
			}
			waitPing(t, ctx, c3, a1.Addr())
		})
	}
}

// 200 ADD/DEL cycles leave no host veth, no used address and no attachment record.
func TestAddDelCycles(t *testing.T) {
	const cycles = 200
	l := newLab(t, lab.Config{Prefix: "wccycle"})
	ctx := testCtx(t, 8*time.Minute)
	h := l.Host(0)
	c := mustCNI(t, h, lab.CNIOptions{})
	ctr := mustContainer(t, h)

	// The bridge may appear with the first ADD; everything else must be as before.
	linksBefore := withoutBridge(t, h)
	seen := make(map[netip.Addr]int)
	start := time.Now()
	for i := range cycles {
		ctr.ID = fmt.Sprintf("cycle-%03d", i)
		rtc := ctr.RuntimeConf("eth0")
		res, err := c.Add(ctx, rtc)
		if err != nil {
			t.Fatalf("cycle %d ADD: %v", i, err)
		}
		a, err := lab.ResultAddress(res)
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		assertInRange(t, a)
		seen[a.Addr()]++
		if err := c.Del(ctx, rtc); err != nil {
			t.Fatalf("cycle %d DEL: %v", i, err)
		}
	}
	t.Logf("%d ADD/DEL cycles in %s, %d distinct addresses", cycles, time.Since(start).Round(time.Millisecond), len(seen))

	s := mustStatus(t, ctx, h)
	if len(s.Attachments) != 0 {
		t.Errorf("%d attachment records left: %+v", len(s.Attachments), s.Attachments)
	}
	if u := s.Used(); u != 0 {
		t.Errorf("%d addresses still used: %+v", u, s.Networks)
	}
	if left := weftLinks(t, h); len(left) != 0 {
		t.Errorf("host veths left: %v", left)
	}
	linksAfter := withoutBridge(t, h)
	if !slices.Equal(linksBefore, linksAfter) {
		t.Errorf("host links changed: %v -> %v", linksBefore, linksAfter)
	}
	if names, err := ctr.LinkNames(); err != nil || !slices.Equal(names, []string{"lo"}) {
		t.Errorf("container links after cycles: %v (err %v), want [lo]", names, err)
	}
}

func withoutBridge(t *testing.T, h *lab.Host) []string {
	t.Helper()
	names, err := h.LinkNames()
	if err != nil {
		t.Fatal(err)
	}
	return slices.DeleteFunc(names, func(n string) bool { return n == "weft" })
}
