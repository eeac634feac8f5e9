package lab

import (
	"context"
	"os"
	"testing"
	"time"
)

// Launch returns while the peer runs, before it is known to answer; WaitReady then
// finds it ready, and a second Launch is refused like a second Start.
func TestLaunch(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("lab tests need root (network namespaces)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := New(ctx, Config{Prefix: "wsclt", Hosts: 1, BinDir: fakeBinDir(t), NoStart: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	h := l.Host(0)
	if err := h.Launch(); err != nil {
		t.Fatal(err)
	}
	if h.PID() == 0 {
		t.Fatal("no peer process after Launch")
	}
	if err := h.Launch(); err == nil {
		t.Error("a second Launch of a running peer succeeded")
	}
	if err := h.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if h.Running() {
		t.Error("peer still running after Stop")
	}
}
