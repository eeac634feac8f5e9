package nslab_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/weftnet/weft/datapath/nslab"
)

// Namespaces of these tests are named wdp-<pid>-…

func TestLabCaptureAndCleanup(t *testing.T) {
	prefix := fmt.Sprintf("wdp-%d-", os.Getpid()%100000)
	l := nslab.NewTest(t, nslab.Config{Prefix: prefix, Hosts: 2, NoIPv6: true})
	h0, h1 := l.Hosts[0], l.Hosts[1]
	for _, n := range []*nslab.NS{l.Underlay, h0.NS, h1.NS} {
		if _, err := os.Stat(nslab.NetNSPath(n.Name)); err != nil || !strings.HasPrefix(n.Name, prefix) {
			t.Fatalf("namespace %s: %v", n.Name, err)
		}
	}
	c, err := nslab.StartCapture(h1.Path(), nslab.UnderlayDev)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := h0.WaitPing(ctx, h1.Underlay.Addr()); err != nil {
		t.Fatal(err)
	}
	frames := c.Stop()
	c.Stop() // safe twice
	icmp := 0
	for _, f := range frames {
		if len(f) >= 34 && binary.BigEndian.Uint16(f[12:14]) == 0x0800 && f[23] == 1 {
			icmp++
		}
	}
	if icmp < 2 {
		t.Fatalf("captured %d frames, %d of them ICMP; want the echo request and reply", len(frames), icmp)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := os.Stat(nslab.NetNSPath(h0.Name)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("namespace %s left behind: %v", h0.Name, err)
	}
	if err := nslab.DeleteNetNS(h0.Name); err != nil {
		t.Fatalf("deleting a gone namespace: %v", err)
	}
	if _, err := nslab.CreateNetNS("../x"); err == nil {
		t.Fatal("a namespace name with a path separator was accepted")
	}
}

func TestPoll(t *testing.T) {
	n := 0
	if err := nslab.Poll(t.Context(), time.Millisecond, func() error {
		if n++; n < 3 {
			return fmt.Errorf("try %d", n)
		}
		return nil
	}); err != nil || n != 3 {
		t.Fatalf("Poll = %v after %d tries, want nil after 3", err, n)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	err := nslab.Poll(ctx, time.Millisecond, func() error { return errors.New("not yet") })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "not yet") {
		t.Fatalf("Poll past its deadline = %v, want the deadline and the last error", err)
	}
}
